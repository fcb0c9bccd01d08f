"""Bad config input never crashes anything (issue 7, item 4).

Random and mutated YAML (byte flips, lost and doubled lines, swapped values,
tags that would run code, huge numbers, deep nesting, alias bombs, NUL
bytes, invalid UTF-8, tabs) goes through the real loader with the real
built-in plugins, then through ``schedd validate``: the answer is a Config
or a ConfigError whose every problem names the file, never another
exception, never a traceback, and a ``!!python/...`` tag runs nothing (its
marker file is never created).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.cli import main
from scheduler.config import Config, load_config
from scheduler.errors import ConfigError
from scheduler.plugins import load_plugins
from tests.helpers import ROOT

EXAMPLE = (ROOT / "config" / "example.yaml").read_bytes()
_, REGISTRY = load_plugins()
#: Where a code-running tag would leave its trace; must never exist.
MARKER = Path(f"/tmp/schedd-fuzz-marker-{os.getpid()}")

FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_EVIL_TAGS = [
    f"!!python/object/apply:os.system ['touch {MARKER}']",
    f"!!python/object/apply:subprocess.call [[touch, {MARKER}]]",
    f'!!python/object/new:os.system ["touch {MARKER}"]',
    "!!python/name:os.system",
    "!!python/module:os",
    "!!binary aGVsbG8=",
    "!!set {a, b}",
    "!!omap [a: 1]",
    "!foo bar",
    "!<tag:yaml.org,2002:python/object/apply:os.system> ['true']",
]
_SCALARS = [
    "9" * 400,
    "-" + "9" * 50,
    "1e400",
    "-.inf",
    ".nan",
    "0x7fffffffffffffffffff",
    "1_000_000_000_000_000",
    "190:20:30:99999999",
    "9999-12-31T23:59:59",
    "0001-01-01",
    "'\\0'",
    '"\\0"',
    '"\\uD800"',
    '"\\x00\\t\\e"',
    "~",
    "''",
    "[]",
    "{}",
    "*undefined",
    "&a x",
    "<<: *a",
    "'" + "x" * 3000 + "'",
]


def _laughs(depth: int, width: int, mapping: bool) -> bytes:
    """The "billion laughs": each level names the previous one ``width`` times."""
    lines = ["l0: &l0 [lol]"]
    for i in range(1, depth + 1):
        refs = [f"*l{i - 1}"] * width
        if mapping:
            body = "{" + ", ".join(f"k{n}: {r}" for n, r in enumerate(refs)) + "}"
        else:
            body = "[" + ", ".join(refs) + "]"
        lines.append(f"l{i}: &l{i} {body}")
    job = f"jobs:\n  a: {{task: shell, every: 1s, params: {{command: *l{depth}}}}}\n"
    return ("\n".join(lines) + "\n" + job).encode()


def _deep(depth: int, kind: str) -> bytes:
    if kind == "flow-list":
        return b"jobs: " + b"[" * depth + b"]" * depth + b"\n"
    if kind == "flow-map":
        return b"jobs: " + b"{a: " * depth + b"1" + b"}" * depth + b"\n"
    return b"jobs:\n" + b"".join(b"  " * (i + 1) + b"k:\n" for i in range(depth)) + b"\n"


def mutated_from(base: bytes) -> st.SearchStrategy[bytes]:
    """``base`` with one to four mutations of the kinds the issue lists."""
    return _mutated(base)


@st.composite
def _mutated(draw: st.DrawFn, base: bytes) -> bytes:
    data = base
    for _ in range(draw(st.integers(1, 4))):
        lines = data.split(b"\n")
        op = draw(
            st.sampled_from(
                ["flip", "delete", "dup", "swap", "tag", "scalar", "nul", "utf8", "tab", "insert"]
            )
        )
        i = draw(st.integers(0, len(lines) - 1))
        if op == "flip" and data:
            at = draw(st.integers(0, len(data) - 1))
            data = data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]) + data[at + 1 :]
            continue
        if op == "delete":
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            a, b = lines[i].partition(b": "), lines[j].partition(b": ")
            if a[1] and b[1]:
                lines[i], lines[j] = a[0] + a[1] + b[2], b[0] + b[1] + a[2]
            else:
                lines[i], lines[j] = lines[j], lines[i]
        elif op in ("tag", "scalar"):
            pool = _EVIL_TAGS if op == "tag" else _SCALARS
            new = draw(st.sampled_from(pool)).encode()
            head, sep, _ = lines[i].partition(b": ")
            lines[i] = head + b": " + new if sep else lines[i] + b" " + new
        elif op == "nul":
            at = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:at] + b"\0" + lines[i][at:]
        elif op == "utf8":
            at = draw(st.integers(0, len(lines[i])))
            bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]))
            lines[i] = lines[i][:at] + bad + lines[i][at:]
        elif op == "tab":
            lines[i] = b"\t" + lines[i].lstrip(b" ")
        else:
            lines.insert(i, draw(st.binary(max_size=40)))
        data = b"\n".join(lines)
    return data


random_yaml = st.one_of(
    mutated_from(EXAMPLE),
    st.binary(max_size=300),
    st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.builds(_laughs, st.integers(1, 12), st.integers(2, 12), st.booleans()),
    st.builds(_deep, st.integers(50, 3000), st.sampled_from(["flow-list", "flow-map", "block"])),
    st.lists(
        st.sampled_from([*_EVIL_TAGS, *_SCALARS, "jobs:", "  a:", "    task: shell", "- x", ": "]),
        max_size=12,
    ).map(lambda parts: "\n".join(parts).encode()),
)


def check_load(path: Path) -> Config | None:
    """Load ``path``: a Config, or None after checking the ConfigError is located."""
    try:
        return load_config(path, REGISTRY)
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert str(problem).startswith(f"{path}:"), problem
            assert problem.message and "Traceback" not in problem.message
        assert any(p.severity == "error" for p in exc.problems)
        return None
    finally:
        assert not MARKER.exists(), "a YAML tag ran code"


@FUZZ
@given(random_yaml)
def test_random_yaml_loads_or_raises_a_located_error(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    path = tmp_path_factory.mktemp("cfg") / "schedd.yaml"
    path.write_bytes(data)
    config = check_load(path)
    if config is not None:
        for spec in config.jobs.values():  # what a daemon would build from it works
            spec.schedule.describe()
            for name, value in spec.env.items():
                assert "\0" not in name + value
                (name + value).encode()


def test_the_unmutated_example_loads() -> None:
    """The fuzz base is valid, so mutations near valid input are exercised."""
    assert len(load_config(ROOT / "config" / "example.yaml", REGISTRY).jobs) == 9


@pytest.mark.parametrize("tag", _EVIL_TAGS[:5])
@pytest.mark.parametrize("where", ["top", "job", "param", "key"])
def test_a_python_tag_is_a_located_error_and_runs_nothing(
    tmp_path: Path, tag: str, where: str
) -> None:
    body = {
        "top": f"jobs: {tag}\n",
        "job": f"jobs:\n  a: {tag}\n",
        "param": f"jobs:\n  a:\n    task: shell\n    every: 1s\n    params:\n      x: {tag}\n",
        "key": f"jobs:\n  ? {tag}\n  : {{task: shell, every: 1s}}\n",
    }[where]
    path = tmp_path / "schedd.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as caught:
        load_config(path, REGISTRY)
    assert not MARKER.exists()
    expect = ("unsupported YAML tag", "a mapping key must be a plain value")  # `? [list]: ...`
    assert any(e in p.message and p.line >= 1 for p in caught.value.problems for e in expect)


_BOUNDED = """
import resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))
from scheduler.config import load_config
from scheduler.errors import ConfigError
from scheduler.plugins import load_plugins
_, registry = load_plugins()
for name in sys.argv[1:]:
    try:
        load_config(name, registry)
    except ConfigError as exc:
        print(exc.problems[0])
    else:
        print(name, "loaded")
print("peak KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_alias_bombs_and_deep_nesting_are_refused_within_bounds(tmp_path: Path) -> None:
    """A billion laughs (10^9 list items, or as mappings) and 100,000 levels of
    nesting are refused with a located error, in a process whose address space
    is capped at 1.5 GB and within the subprocess timeout."""
    files = {
        "laughs.yaml": _laughs(9, 10, False),
        "laughs-map.yaml": _laughs(9, 10, True),
        "laughs-wide.yaml": _laughs(3, 1000, False),
        "deep-list.yaml": _deep(100_000, "flow-list"),
        "deep-map.yaml": _deep(100_000, "flow-map"),
        "deep-block.yaml": _deep(3000, "block"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    out = subprocess.run(
        [sys.executable, "-c", _BOUNDED, *(str(tmp_path / n) for n in files)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == len(files) + 1
    for name, line in zip(files, lines, strict=False):
        assert line.startswith(f"{tmp_path / name}:"), line
        assert "loaded" not in line
    assert any("aliases expand to too many values" in line for line in lines[:3])
    assert all("nests deeper than" in line for line in lines[3:6]), lines


# -- the same through the CLI -------------------------------------------------------


@settings(FUZZ, max_examples=40)  # each invocation loads the plugins again
@given(random_yaml)
def test_validate_exits_0_or_1_with_located_lines(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    path = tmp_path_factory.mktemp("cli") / "schedd.yaml"
    path.write_bytes(data)
    result = CliRunner().invoke(main, ["validate", "--config", str(path)])
    assert not MARKER.exists()
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    assert result.exit_code in (0, 1), result.output
    if result.exit_code == 1:
        errors = [line for line in result.stderr.splitlines() if not line.endswith("changed.")]
        assert errors and all(line.startswith(f"{path}") for line in errors), result.stderr


def test_validate_in_a_real_process_never_prints_a_traceback(tmp_path: Path) -> None:
    samples = [
        _laughs(9, 10, False),
        _deep(20_000, "flow-map"),
        b"jobs: " + _EVIL_TAGS[0].encode() + b"\n",
        EXAMPLE.replace(b"heartbeat:", b"heart\0beat:"),
        EXAMPLE.replace(b"every: 2s", b"every: \xff\xfe"),
        EXAMPLE.replace(b"  heartbeat:", b"\theartbeat:"),
        b'state_dir: "a\\0b"\n' + EXAMPLE.split(b"state_dir: state", 1)[1],
    ]
    for n, data in enumerate(samples):
        path = tmp_path / f"s{n}.yaml"
        path.write_bytes(data)
        out = subprocess.run(
            [sys.executable, "-m", "scheduler.cli", "validate", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert out.returncode == 1, (n, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr + out.stdout
        assert out.stderr.startswith(f"{path}:"), out.stderr
    assert not MARKER.exists()


@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        ('state_dir: "a\\0b"', "state_dir must not contain a NUL character"),
        ('state_dir: "\\uDC00"', "state_dir must be valid Unicode text"),
        ('defaults: {env: {X: "a\\0"}}', "env.X must not contain a NUL character"),
        ('defaults: {env: {X: "\\uD800"}}', "env.X must be valid Unicode text"),
        ("defaults: {history_limit: 99999999999999999999}", "history_limit must be at most"),
        ("defaults: {retries: 2147483648}", "retries must be at most 2147483647"),
    ],
)
def test_strings_the_os_refuses_are_config_errors(
    tmp_path: Path, snippet: str, message: str
) -> None:
    """Found by this fuzzing: a NUL or a lone surrogate (YAML escapes) in
    ``state_dir`` or ``env`` passed validation, then ``schedd run`` died with
    a ValueError traceback creating the state dir, and every run of the job
    failed (or was killed) setting its environment; a huge history_limit made
    every pruning round of the job fail in SQLite."""
    path = tmp_path / "schedd.yaml"
    path.write_text(f"{snippet}\njobs:\n  a: {{task: shell, every: 1s, params: {{command: x}}}}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, REGISTRY)
    (problem,) = caught.value.problems
    assert problem.line == 1 and problem.col > 1
    assert message in problem.message
