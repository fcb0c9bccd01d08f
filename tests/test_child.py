"""The child side of a run: target loading, exit-status mapping, the spec, ``python -m``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from scheduler.child import (
    SPEC_ENV,
    ChildOutcome,
    ctx_from_json,
    ctx_to_json,
    exit_status,
    preloaded_target,
    run_task,
    spec_to_json,
)
from scheduler.types import RunContext

TASKMODS = Path(__file__).parent / "fixtures" / "taskmods"
WHEN = datetime(2027, 3, 28, 1, 30, tzinfo=timezone(timedelta(hours=1)))


@pytest.fixture(autouse=True)
def _taskmods_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TASKMODS))


def ctx(**params: Any) -> RunContext:
    return RunContext(job_id="job1", run_id="run1", task="t", params=params, scheduled_for=WHEN)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONUNBUFFERED", SPEC_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(TASKMODS), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def run_child(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scheduler.child", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env or child_env(),
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("target", "code", "note"),
    [
        ("ret_none", 0, None),
        ("ret_zero", 0, None),
        ("ret_three", 3, None),
        ("ret_big", 255, "outside 0..255"),
        ("ret_negative", 255, "outside 0..255"),
        ("ret_true", 0, None),
        ("ret_false", 1, "returned False"),
        ("ret_str", 0, "a str; ignored"),
    ],
)
def test_return_value_maps_to_exit_status(target: str, code: int, note: str | None) -> None:
    out = run_task(f"schedd_test_tasks:{target}", ctx())
    assert out.exit_code == code
    assert out.error is None
    if note is None:
        assert out.note is None
    else:
        assert out.note is not None and note in out.note


def test_exit_status_never_turns_failure_into_success() -> None:
    assert exit_status(256) == (255, "task returned 256, outside 0..255; exit status 255")
    assert exit_status(-256)[0] == 255
    assert exit_status(128)[0] == 128
    assert exit_status(1.0)[0] == 0  # a float is not an int status: ignored


def test_task_receives_context_and_runs_in_process(capfd: pytest.CaptureFixture[str]) -> None:
    out = run_task("schedd_test_tasks:show_ctx", ctx(a=1, b=["x"]))
    seen = json.loads(capfd.readouterr().out)
    assert out == ChildOutcome(0)
    assert seen["job_id"] == "job1" and seen["params"] == {"a": 1, "b": ["x"]}
    assert seen["scheduled_for"] == WHEN.isoformat()
    assert seen["own_process"] is False


def test_exception_gives_1_traceback_and_type(capfd: pytest.CaptureFixture[str]) -> None:
    out = run_task("schedd_test_tasks:raises", ctx())
    err = capfd.readouterr().err
    assert out == ChildOutcome(1, error="ValueError")
    assert "Traceback" in err and "in raises" in err and "task went wrong on purpose" in err


@pytest.mark.parametrize(
    ("code", "expected", "stderr"),
    [(None, 0, ""), (0, 0, ""), (4, 4, ""), ("fatal: config missing", 1, "config missing")],
)
def test_system_exit_behaves_like_sys_exit(
    capfd: pytest.CaptureFixture[str], code: Any, expected: int, stderr: str
) -> None:
    out = run_task("schedd_test_tasks:exits", ctx(code=code))
    assert out.exit_code == expected and out.error is None
    assert stderr in capfd.readouterr().err


@pytest.mark.parametrize(
    ("target", "message", "error"),
    [
        (
            "schedd_no_such_module:run",
            "cannot import module 'schedd_no_such_module'",
            "ModuleNotFoundError",
        ),
        ("schedd_test_tasks:missing", "has no attribute 'missing'", "AttributeError"),
        ("schedd_test_tasks:NOT_CALLABLE", "is not callable (a int object)", "TargetError"),
        ("schedd_test_tasks.run", "malformed task target", "TargetError"),
        ("schedd_test_tasks:ret_none\n", "malformed task target", "TargetError"),
        ("schedd_bad_import:run", "cannot import name 'no_such_name'", "ImportError"),
    ],
)
def test_unloadable_target_gives_127(
    capfd: pytest.CaptureFixture[str], target: str, message: str, error: str
) -> None:
    out = run_task(target, ctx())
    err = capfd.readouterr().err
    assert out.exit_code == 127 and out.error == error
    assert message in err and "schedd: " in err


def test_nested_import_error_shows_where(capfd: pytest.CaptureFixture[str]) -> None:
    run_task("schedd_bad_import:run", ctx())
    assert "schedd_bad_import.py" in capfd.readouterr().err


def test_import_time_crash_and_lazy_import_are_task_failures(
    capfd: pytest.CaptureFixture[str],
) -> None:
    assert run_task("schedd_raising_module:run", ctx()) == ChildOutcome(1, error="RuntimeError")
    assert "task module failed while importing" in capfd.readouterr().err
    lazy = run_task("schedd_test_tasks:lazy_import_fails", ctx())
    assert lazy == ChildOutcome(1, error="ModuleNotFoundError")


def test_dotted_attribute_target() -> None:
    assert run_task("schedd_test_tasks:Greeter.greet", ctx()).exit_code == 0


# -- the spec --------------------------------------------------------------------------


def test_ctx_round_trips_through_json() -> None:
    original = RunContext(
        job_id="j",
        run_id="r",
        task="shell",
        params={"command": "true", "n": [1, 2]},
        scheduled_for=WHEN,
        attempt=3,
        timeout=2.5,
    )
    data = json.loads(json.dumps(ctx_to_json(original)))
    assert data["scheduled_for"] == "2027-03-28T01:30:00+01:00"
    assert ctx_from_json(data) == original
    assert ctx_from_json(json.dumps(data)) == original
    plain = RunContext(job_id="j", run_id="r", task="t")
    assert ctx_from_json(ctx_to_json(plain)) == plain


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"surprise": 1}, "unknown run context keys: surprise"),
        ({"job_id": 5}, "'job_id' must be a string"),
        ({"params": [1]}, "'params' must be an object"),
        ({"attempt": "2"}, "'attempt' must be an integer"),
        ({"attempt": True}, "'attempt' must be an integer"),
        ({"timeout": "soon"}, "'timeout' must be a number"),
        ({"scheduled_for": 17}, "ISO 8601"),
    ],
)
def test_malformed_ctx_is_rejected(change: dict[str, Any], message: str) -> None:
    data = {**ctx_to_json(ctx()), **change}
    with pytest.raises(ValueError, match=message):
        ctx_from_json(data)


# -- python -m scheduler.child ---------------------------------------------------------


def test_main_runs_spec_from_argv_with_clean_stdout() -> None:
    spec = spec_to_json("schedd_test_tasks:show_ctx", ctx(x=1))
    proc = run_child(spec)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1  # nothing but the task's own line
    seen = json.loads(lines[0])
    assert seen["params"] == {"x": 1} and seen["scheduled_for"] == WHEN.isoformat()
    assert seen["own_process"] is True
    assert proc.stderr == ""


def test_main_reads_spec_from_env_and_hides_it_from_the_task() -> None:
    spec = spec_to_json("schedd_test_tasks:show_ctx", ctx())
    proc = run_child(env=child_env(**{SPEC_ENV: spec}))
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["job_id"] == "job1" and seen["spec_env"] is None


@pytest.mark.parametrize(
    ("target", "params", "code", "stderr"),
    [
        ("schedd_test_tasks:ret_three", {}, 3, ""),
        ("schedd_test_tasks:raises", {}, 1, "ValueError: task went wrong on purpose"),
        ("schedd_test_tasks:exits", {"code": 9}, 9, ""),
        ("schedd_test_tasks:interrupted", {}, 130, "KeyboardInterrupt"),
        ("nope_module_xyz:run", {}, 127, "No module named 'nope_module_xyz'"),
    ],
)
def test_main_exit_codes(target: str, params: dict[str, Any], code: int, stderr: str) -> None:
    proc = run_child(spec_to_json(target, ctx(**params)))
    assert proc.returncode == code
    assert stderr in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{not json"], "bad spec: spec is not valid JSON"),
        (['{"target": "a:b"}'], 'exactly "target" and "ctx"'),
        (['{"target": "a:b", "ctx": {"job_id": "j"}}'], "'run_id' must be a string"),
        ([], "no spec given"),
        (["{}", "extra"], "usage:"),
    ],
)
def test_main_rejects_bad_spec_with_2(args: list[str], message: str) -> None:
    proc = run_child(*args)
    assert proc.returncode == 2
    assert message in proc.stderr and proc.stdout == ""


def test_output_is_flushed_before_a_fork_server_style_exit() -> None:
    # A fork-server child leaves with os._exit, which skips Python's own flushing.
    code = (
        "import os, sys\n"
        "from scheduler.child import run_task\n"
        "from scheduler.types import RunContext\n"
        "out = run_task('schedd_test_tasks:partial_line', RunContext('j', 'r', 't'))\n"
        "os._exit(out.exit_code)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=30,
        check=False,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        0,
        "no newline at the end",
        "err without newline",
    )


def test_child_imports_nothing_heavy() -> None:
    code = (
        "import sys, scheduler.child\n"
        "heavy = ('pydantic', 'pluggy', 'yaml', 'loguru', 'apscheduler', 'sqlalchemy', 'click')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert proc.stdout.strip() == "[]"


def test_ctx_to_json_is_plain_json() -> None:
    data = ctx_to_json(RunContext("j", "r", "t", scheduled_for=datetime(2027, 1, 1, tzinfo=UTC)))
    assert json.loads(json.dumps(data)) == data
    assert data["scheduled_for"] == "2027-01-01T00:00:00+00:00"


# -- targets the fork server resolves before forking ------------------------------------


def test_preloaded_target_resolves_only_plain_functions_of_imported_modules(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import types

    import tests.runner_tasks as tasks

    assert preloaded_target("tests.runner_tasks:noop") is tasks.noop
    assert preloaded_target("tests.runner_tasks:no_such_function") is None
    assert preloaded_target("tests.runner_tasks:Collector.on_line") is None  # dotted: the child
    assert preloaded_target("schedd_not_imported_xyz:run") is None  # never imported here
    assert preloaded_target("not a target") is None
    called = []
    lazy = types.ModuleType("schedd_lazy_xyz")
    lazy.__getattr__ = lambda name: called.append(name)  # type: ignore[attr-defined]
    lazy.__spec__ = None
    monkeypatch.setitem(sys.modules, "schedd_lazy_xyz", lazy)
    assert preloaded_target("schedd_lazy_xyz:run") is None
    assert called == []  # no module code runs in the fork server
