"""Random command lines never crash ``schedd`` (issue 7, item 4).

Every command gets random arguments drawn from its own options, the other
commands' options, good and bad values (paths to valid, invalid and missing
configs, durations, times, ids, undecodable bytes as Linux hands them to
Python) and plain random text. In-process through click's CliRunner for
speed, plus a few real processes. The answer is always exit 0, 1 (a clear
one-line error) or 2 (usage), never a traceback, and nothing is written: the
work dir (with its config, state dir, ledger and job log) is byte for byte
the same afterwards, and the repository gains no file.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import click
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import scheduler.statedir
from scheduler.cli import main
from scheduler.ledger import LEDGER_FILE, Ledger
from scheduler.records import RunRecord
from tests.helpers import ROOT

CONFIG = """\
state_dir: state
jobs:
  tick:
    task: shell
    every: 1h
    params: {command: 'true'}
  nightly:
    task: shell
    cron: "30 2 * * *"
    timezone: Europe/Berlin
    params: {command: 'true'}
  once:
    task: shell
    at: 2030-01-01T00:00:00
    params: {command: 'true'}
"""

#: Commands that never start a daemon or a run, whatever their arguments.
SAFE = [
    "validate", "jobs", "next", "plugins", "schema", "history", "logs",
    "status", "trigger", "pause", "resume", "reload", "cancel", "stop",
]  # fmt: skip
OPTIONS = [
    "--config", "-c", "--state-dir", "--json", "--count", "-n", "--from", "--limit",
    "--status", "--run", "--lines", "--force", "--all", "--grace", "--wait", "--timeout",
    "--shutdown-grace", "--debug", "--help", "-h", "--version", "--", "-", "--bogus", "-x",
]  # fmt: skip
#: Characters argv can carry on Linux: any text without NUL, and undecodable
#: bytes, which Python hands over as lone surrogates (U+DC80-U+DCFF).
ARG_TEXT = st.text(
    st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=30
) | (st.binary(min_size=1, max_size=20).map(lambda b: os.fsdecode(b.replace(b"\0", b"\xff"))))
VALUES = [
    "tick", "nightly", "once", "nope", "../../etc/passwd", "/etc/passwd", "a/b", ".", "..",
    "0", "-1", "1", "100000", "100001", "99999999999999999999", "1e400", "nan", "inf",
    "5s", "1h30m", "-5s", "0s", "999999999d", "2027-03-28T02:30", "9999-12-31T23:59:59",
    "0001-01-01T00:00:00+14:00", "2027-13-45", "now", "success", "missed", "bogus", "",
    "1a2b3c4d5e6f70809", "\udcff\udcfe", "é", "{}", "-",
]  # fmt: skip


ZONES = [
    UTC,
    timezone(timedelta(hours=14)),
    timezone(-timedelta(hours=14)),
    ZoneInfo("Europe/Berlin"),
]


class Workdir:
    """A work dir with a valid, an invalid and a code-running config, a state
    dir with a ledger and a job log, and nothing listening on its socket."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.good = root / "schedd.yaml"
        self.good.write_text(CONFIG)
        self.bad = root / "bad.yaml"
        self.bad.write_text("jobs:\n  x: {task: shell, every: -1s}\n  x: 1\n")
        self.marker = root / "MARKER"
        self.evil = root / "evil.yaml"
        self.evil.write_text(f"jobs: !!python/object/apply:os.system ['touch {self.marker}']\n")
        self.state = root / "state"
        (self.state / "logs").mkdir(parents=True)
        (self.state / "logs" / "tick.log").write_text(
            "2027-01-01T00:00:00.000000+0000 1a2b3c4d5e6f70809 stdout: hello {}\n"
        )
        with Ledger.open(self.state / LEDGER_FILE) as ledger:
            slot = datetime(2027, 1, 1, tzinfo=UTC)
            ledger.record(RunRecord("1a2b3c4d5e6f70809", "tick", slot, "success", 1, slot, slot))
            ledger.record(RunRecord("1a2b3c4d5e6f7080a", "tick", slot, "missed", 2))
            ledger.flush()
        self.default_state = root / "default-state"
        self.before = self.snapshot()

    def snapshot(self) -> dict[str, str]:
        """Every file under the work dir with a hash of its content."""
        out = {}
        for path in sorted(self.root.rglob("*")):
            if path.is_file():
                rel = str(path.relative_to(self.root))
                if rel.endswith(("-wal", "-shm")):  # SQLite's own, also for readers
                    continue
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        return out

    def values(self) -> list[str]:
        paths = [self.good, self.bad, self.evil, self.state, self.root / "missing.yaml"]
        return [*VALUES, *(str(p) for p in paths)]


def _repo_status() -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workdir]:
    before = _repo_status()
    work = Workdir(tmp_path_factory.mktemp("cli-fuzz"))
    yield work
    assert work.snapshot() == work.before, "a command wrote into the work dir"
    assert not work.marker.exists()
    assert not work.default_state.exists()
    assert _repo_status() == before, "a command wrote into the repository"


@contextmanager
def inside(work: Workdir) -> Iterator[None]:
    """cwd in the work dir, no $SCHEDD_CONFIG, and the default state dir there too."""
    old_cwd, old_default = Path.cwd(), scheduler.statedir.default_state_dir
    old_env = os.environ.pop("SCHEDD_CONFIG", None)
    os.chdir(work.root)
    scheduler.statedir.default_state_dir = lambda: work.default_state
    try:
        yield
    finally:
        os.chdir(old_cwd)
        scheduler.statedir.default_state_dir = old_default
        if old_env is not None:
            os.environ["SCHEDD_CONFIG"] = old_env


def _value(work: Workdir, param: click.Parameter | None = None) -> st.SearchStrategy[str]:
    """Any value; for a typed parameter mostly one of its type, so the command runs."""
    anything = st.sampled_from(work.values()) | ARG_TEXT
    kind = param.type if param is not None else None
    if isinstance(kind, click.Choice):
        typed: st.SearchStrategy[str] = st.sampled_from([str(c) for c in kind.choices])
    elif isinstance(kind, click.types.IntParamType):
        typed = st.integers(-3, 100_003).map(str)
    elif param is not None and param.name in ("job", "job_id", "jobs"):
        typed = st.sampled_from(["tick", "nightly", "once", "nope"])
    elif param is not None and param.name == "from_":
        typed = st.datetimes(timezones=st.sampled_from([None, *ZONES])).map(datetime.isoformat)
    elif param is not None and param.name in ("grace", "wait", "timeout", "shutdown_grace"):
        typed = st.sampled_from(["0", "1.5", "5s", "1h30m", "-1s", "1e400", "nan", "2w", "x"])
    else:
        return anything
    return st.one_of(*[typed] * 7, anything)


@st.composite
def command_line(draw: st.DrawFn, work: Workdir, name: str) -> list[str]:
    """``name`` with a random selection of its own options and arguments (values
    good or bad), and now and then a stray token from anywhere."""
    command = main.commands[name]
    argv = [name]
    for param in command.params:
        if isinstance(param, click.Argument):
            count = 1 if param.nargs == 1 else draw(st.integers(0, 3))
            if draw(st.integers(0, 9)) == 0:  # sometimes leave a required one out
                count = 0
            argv += [draw(_value(work, param)) for _ in range(count)]
    options = [p for p in command.params if isinstance(p, click.Option) and p.name != "help"]
    chosen = draw(st.lists(st.sampled_from(options), max_size=4, unique_by=id)) if options else []
    for option in chosen:
        if option.name == "follow_":
            continue  # --follow waits for lines forever, by design
        argv.append(draw(st.sampled_from(option.opts)))
        if not option.is_flag:
            argv.append(draw(_value(work, option)))
    for _ in range(draw(st.integers(0, 2)) if draw(st.integers(0, 5)) == 0 else 0):
        at = draw(st.integers(1, len(argv)))
        argv.insert(at, draw(st.sampled_from(OPTIONS) | _value(work)))
    return [a for a in argv if a not in ("--debug", "-f", "--follow")]


def check(argv: list[str], code: int, output: str, exception: BaseException | None) -> None:
    assert exception is None or isinstance(exception, SystemExit), (argv, repr(exception))
    assert "Traceback" not in output, (argv, output)
    assert code in (0, 1, 2), (argv, code, output)
    if code == 1 and "--help" not in argv:
        assert output.strip(), (argv, "exit 1 without a message")


@pytest.mark.parametrize("command", SAFE)
def test_random_arguments_to_each_command(work: Workdir, command: str) -> None:
    """Each command with random arguments: 0, 1 or 2, one clear message, no traceback."""

    @settings(
        max_examples=100,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(command_line(work, command))
    def run(argv: list[str]) -> None:
        with inside(work):
            result = CliRunner().invoke(main, argv, catch_exceptions=True)
        check(argv, result.exit_code, result.output, result.exception)

    run()


def test_run_with_bad_arguments_starts_nothing(work: Workdir) -> None:
    """``schedd run`` would start a daemon if its arguments were good, so it
    gets only bad ones here: an invalid, code-running or missing config, or a
    bad grace. Each is refused with exit 1 or 2 before anything starts."""
    bad = [
        ["run", "-c", str(work.bad)],
        ["run", "-c", str(work.evil), "--state-dir", str(work.default_state)],
        ["run", "-c", str(work.root / "missing.yaml")],
        ["run", "-c", str(work.good), "--shutdown-grace", "forever"],
        ["run", "-c", str(work.good), "--shutdown-grace", "-1s"],
        ["run", "-c", str(work.good), "--shutdown-grace", "1e400"],
        ["run", "--bogus"],
        ["run-once", "nope", "-c", str(work.good)],
        ["run-once", "tick", "-c", str(work.good), "--timeout", "\udcff"],
        ["run-once", "tick", "-c", str(work.bad)],
    ]
    for argv in bad:
        with inside(work):
            result = CliRunner().invoke(main, argv)
        check(argv, result.exit_code, result.output, result.exception)
        assert result.exit_code in (1, 2), (argv, result.output)


def test_real_processes_with_hostile_arguments(work: Workdir) -> None:
    """A few through a real ``python -m scheduler.cli``: undecodable bytes in
    argv, huge numbers, out-of-range times, and no daemon to talk to."""
    cases: list[list[str | bytes]] = [
        ["validate", "-c", b"\xff\xfe.yaml"],
        ["next", "tick", "-c", str(work.good), "--from", "9999-12-31T23:59:59", "-n", "3"],
        ["next", "once", "-c", str(work.good), "--from", "0001-01-01T00:00:00+14:00"],
        ["next", b"\xff", "-c", str(work.good)],
        ["history", "-n", "99999999999999999999", "--state-dir", str(work.state)],
        ["history", b"\xff", "--state-dir", str(work.state)],
        ["logs", "../../etc/passwd", "--state-dir", str(work.state)],
        ["logs", "tick", "--state-dir", str(work.state), "--run", b"\xff", "-n", "0"],
        ["trigger", "tick", "--state-dir", str(work.state)],
        ["stop", "--grace", "1e400", "--state-dir", str(work.state)],
        ["status", "--state-dir", b"/nonexistent/\xff"],
    ]
    env = {k: v for k, v in os.environ.items() if k != "SCHEDD_CONFIG"}
    for argv in cases:
        out = subprocess.run(
            [sys.executable, "-m", "scheduler.cli", *argv],
            capture_output=True,
            timeout=60,
            cwd=work.root,
            env={**env, "PYTHONPATH": str(ROOT)},
        )
        text = (out.stdout + out.stderr).decode(errors="replace")
        assert "Traceback" not in text, (argv, text)
        assert out.returncode in (0, 1, 2), (argv, out.returncode, text)
