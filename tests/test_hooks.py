"""Run-lifecycle hooks: called for every run, and never able to stall the caller."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

from scheduler.hooks import HookCaller
from scheduler.hookspecs import hookimpl
from scheduler.plugins import load_plugins
from scheduler.types import RunInfo, RunResult

NOW = datetime(2027, 1, 1, tzinfo=UTC)
INFO = RunInfo(job_id="j", run_id="r1", task="shell", scheduled_for=NOW, started_at=NOW)
RESULT = RunResult("success", NOW, NOW, exit_code=0)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.event = threading.Event()

    @hookimpl
    def schedd_run_started(self, run: RunInfo) -> None:
        self.calls.append(("started", run.run_id))

    @hookimpl
    def schedd_run_finished(self, run: RunInfo, result: RunResult) -> None:
        self.calls.append(("finished", result.status))
        self.event.set()


class Raises:
    @hookimpl
    def schedd_run_started(self, run: RunInfo) -> None:
        raise RuntimeError("notifier is down")


class Hangs:
    def __init__(self) -> None:
        self.release = threading.Event()

    @hookimpl
    def schedd_run_started(self, run: RunInfo) -> None:
        if run.run_id == "hang":
            self.release.wait(30)


def caller(*plugins: Any, deadline: float = 5.0) -> HookCaller:
    pm, registry = load_plugins(extra=plugins)
    assert not registry.broken, registry.broken
    hooks = HookCaller(pm, deadline=deadline)
    hooks.start()
    return hooks


def test_hooks_receive_started_and_finished() -> None:
    rec = Recorder()
    hooks = caller(rec)
    hooks.started(INFO)
    hooks.finished(INFO, RESULT)
    assert rec.event.wait(5)
    assert rec.calls == [("started", "r1"), ("finished", "success")]
    hooks.stop()


def test_a_raising_hook_is_logged_and_others_still_run() -> None:
    rec = Recorder()
    hooks = caller(Raises(), rec)
    for _ in range(3):
        hooks.started(INFO)
    hooks.finished(INFO, RESULT)
    assert rec.event.wait(5)
    assert rec.calls.count(("started", "r1")) == 3
    hooks.stop()


def test_a_hanging_hook_never_blocks_the_caller_or_later_calls() -> None:
    rec, hang = Recorder(), Hangs()
    hooks = caller(hang, rec, deadline=0.3)
    t0 = time.monotonic()
    hooks.started(RunInfo("j", "hang", "shell", NOW, NOW))
    hooks.finished(INFO, RESULT)
    assert time.monotonic() - t0 < 0.1  # the caller (the dispatcher) never waits
    assert rec.event.wait(5)  # the stuck call was abandoned; later calls went on
    assert ("finished", "success") in rec.calls
    hang.release.set()
    hooks.stop()


def test_no_plugin_hooks_means_no_threads() -> None:
    before = set(threading.enumerate())  # threads of earlier tests may end meanwhile
    hooks = caller()
    hooks.started(INFO)
    assert set(threading.enumerate()) - before == set()
    hooks.stop()
