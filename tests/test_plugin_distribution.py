"""Real plugin distributions, pip-installed and found through the ``schedd`` entry-point group.

Each fixture distribution under ``tests/fixtures`` is copied (so the build leaves
nothing in the source tree) and installed with ``pip install --target`` into its
own folder, offline, once per module. Every check then runs in a fresh
interpreter with ``PYTHONPATH`` naming the folders it should see, which is how
an installed third-party plugin reaches schedd.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from scheduler.child import spec_to_json
from scheduler.plugins import DISABLE_ENV, STRICT_ENV, load_plugins
from scheduler.types import RunContext

FIXTURES = Path(__file__).parent / "fixtures"
DISTRIBUTIONS = ("schedd_hello", "schedd_broken", "schedd_dupe")

# Runs in the subprocess: load plugins, print what a test needs as JSON.
REPORT = """
import json, sys
from scheduler.errors import PluginError
from scheduler.plugins import describe_plugins, explain_unknown_task, load_plugins
try:
    _, reg = load_plugins()
except PluginError as exc:
    print(json.dumps({"strict_error": str(exc)}))
    sys.exit(0)
out = {
    "plugins": {p["name"]: p for p in describe_plugins(reg)},
    "task_types": {n: [t.plugin, t.target] for n, t in reg.task_types.items()},
    "problems": list(reg.problems),
    "why_hello": explain_unknown_task(reg, "hello"),
}
if "hello" in reg.task_types:
    from pydantic import ValidationError
    model = reg.task_types["hello"].params
    out["good"] = model.model_validate({"name": "world"}).model_dump(mode="json")
    try:
        model.model_validate({"name": "world", "times": 0})
    except ValidationError as exc:
        out["bad"] = str(exc)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build and install every fixture distribution, in parallel, once."""
    root = tmp_path_factory.mktemp("dists")
    procs = {}
    targets = {}
    for dist in DISTRIBUTIONS:
        src = root / "src" / dist
        shutil.copytree(FIXTURES / dist, src)
        targets[dist] = root / "site" / dist
        procs[dist] = subprocess.Popen(
            [
                sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                "--no-index", "--disable-pip-version-check", "--quiet",
                "--target", str(targets[dist]), str(src),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
    for dist, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        hint = (
            "\nThe venv needs setuptools>=70.1 (or the 'wheel' package) to build wheels "
            "without build isolation; the dev extras should provide it."
            if "bdist_wheel" in out
            else ""
        )
        assert proc.returncode == 0, f"pip install {dist} failed:\n{out}{hint}"
    return targets


def env_with(paths: list[Path], marker: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (DISABLE_ENV, STRICT_ENV)}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths)
    if marker is not None:
        env["SCHEDD_BROKEN_MARKER"] = str(marker)
    env.update(extra)
    return env


def report(env: Mapping[str, str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", REPORT], capture_output=True, text=True, env=dict(env),
        timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_hello_is_found_through_its_entry_point(installed: dict[str, Path]) -> None:
    out = report(env_with([installed["schedd_hello"]]))
    hello = out["plugins"]["hello"]
    assert (hello["distribution"], hello["version"]) == ("schedd-hello", "1.2.3")
    assert hello["module"] == "schedd_hello.plugin" and hello["error"] is None
    assert hello["task_types"] == [
        {
            "name": "hello",
            "summary": "Print a greeting",
            "target": "schedd_hello.run:hello",
            "available": True,
        }
    ]
    assert out["task_types"]["hello"] == ["hello", "schedd_hello.run:hello"]
    assert {"shell", "python", "http"} <= set(out["task_types"])
    assert out["problems"] == []
    # Its params model does the validation: defaults filled, bad values explained.
    assert out["good"] == {"name": "world", "times": 1}
    assert "times" in out["bad"] and "greater than or equal to 1" in out["bad"]
    # Only the installed distribution provides it: this process does not see it.
    assert "hello" not in load_plugins()[1].task_types


def test_hello_runs_through_the_child(installed: dict[str, Path]) -> None:
    ctx = RunContext("greet", "run-1", "hello", params={"name": "world", "times": 2})
    proc = subprocess.run(
        [sys.executable, "-m", "scheduler.child", spec_to_json("schedd_hello.run:hello", ctx)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True,
        env=env_with([installed["schedd_hello"]]), timeout=60, check=False,
    )  # fmt: skip
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "hello world\nhello world\n", "")


def test_broken_plugin_is_reported_and_the_rest_load(
    installed: dict[str, Path], tmp_path: Path
) -> None:
    marker = tmp_path / "imported"
    out = report(env_with([installed["schedd_hello"], installed["schedd_broken"]], marker))
    broken = out["plugins"]["broken"]
    assert (broken["distribution"], broken["version"]) == ("schedd-broken", "0.0.1")
    assert broken["module"] == "schedd_broken.plugin"
    assert broken["error"] == "RuntimeError: schedd_broken exploded at import"
    assert out["problems"] == []  # conflicts only; the error lives on the plugin
    assert marker.exists()  # it really was imported, and failed
    assert {"hello", "shell", "python", "http"} <= set(out["task_types"])


def test_strict_mode_raises_naming_the_broken_plugin(installed: dict[str, Path]) -> None:
    env = env_with([installed["schedd_hello"], installed["schedd_broken"]], **{STRICT_ENV: "1"})
    message = report(env)["strict_error"]
    assert "plugin 'broken' (schedd-broken 0.0.1): RuntimeError: schedd_broken exploded" in message
    assert "hello" not in message


def test_blocking_prevents_the_import(installed: dict[str, Path], tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    env = env_with(
        [installed["schedd_hello"], installed["schedd_broken"]],
        marker,
        **{DISABLE_ENV: "other, broken", STRICT_ENV: "yes"},
    )
    out = report(env)
    assert "strict_error" not in out  # a blocked plugin is not a failure, even when strict
    broken = out["plugins"]["broken"]
    assert broken["blocked"] is True and broken["error"] is None
    assert broken["distribution"] == "schedd-broken"
    assert not marker.exists()
    assert "hello" in out["task_types"]


def test_duplicate_task_across_distributions(installed: dict[str, Path]) -> None:
    out = report(env_with([installed["schedd_hello"], installed["schedd_dupe"]]))
    assert "hello" not in out["task_types"]
    assert out["task_types"]["dupe-ok"] == ["dupe", "schedd_dupe.plugin:noop"]
    (problem,) = out["problems"]
    assert problem.startswith(
        "task type 'hello' is provided by plugins 'dupe' (schedd-dupe 0.1.0) and "
        "'hello' (schedd-hello 1.2.3); neither is used"
    )
    assert out["why_hello"] == problem
    assert out["plugins"]["hello"]["task_types"][0]["available"] is False


def test_daemon_calls_lifecycle_hooks_and_a_hanging_one_stalls_nothing(
    installed: dict[str, Path], tmp_path: Path
) -> None:
    """The installed plugin's hooks run in a real daemon; its hook for 'stuck' hangs
    forever, and the other jobs still fire on time."""
    import signal
    import time

    events = tmp_path / "events"
    config = tmp_path / "schedd.yaml"
    config.write_text(
        "jobs:\n"
        "  greet:\n    task: hello\n    every: 1s\n    params: {name: hooks}\n"
        "  stuck:\n    task: hello\n    every: 1s\n    params: {name: stuck}\n"
    )
    state = tmp_path / "state"
    env = env_with(
        [installed["schedd_hello"]],
        SCHEDD_HELLO_EVENTS=str(events),
        SCHEDD_HELLO_HANG_JOB="stuck",
    )
    env["PYTHONPATH"] += os.pathsep + str(Path(__file__).resolve().parent.parent)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scheduler.cli",
            "run",
            "-c",
            str(config),
            "--state-dir",
            str(state),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        greet_log = state / "logs" / "greet.log"
        while time.monotonic() < deadline:
            text = greet_log.read_text() if greet_log.exists() else ""
            if text.count("hello hooks") >= 8:
                break
            time.sleep(0.2)
        assert text.count("hello hooks") >= 8  # kept firing every second while a hook hung
        lines = events.read_text().splitlines()
        assert any(ln.startswith("started greet ") for ln in lines)
        assert any(ln.startswith("finished greet ") and ln.endswith(" success") for ln in lines)
        assert (
            "hung past" in (state / "schedd.log").read_text()
            or "abandoned" in (state / "schedd.log").read_text()
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
