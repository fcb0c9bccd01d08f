"""Dispatch policies (overlap, catch-up, retries, jitter) driven by an injected clock.

The runner is replaced by a recording stand-in here so each decision can be
checked deterministically; tests/test_daemon.py covers the same paths with
real processes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from scheduler.catchup import MAX_CATCHUP_RUNS
from scheduler.config import JobSpec, load_config
from scheduler.dispatch import Dispatcher
from scheduler.plugins import load_plugins
from scheduler.records import RunRecord
from scheduler.types import RunResult

T0 = datetime(2027, 1, 4, 12, 0, tzinfo=UTC)


class FakeHandle:
    def __init__(self, req: Any) -> None:
        self.req = req
        self.run_id = req.run_id
        self.job_id = req.job_id
        self.started_at = T0
        self.pid = 4242
        self.cancelled: str | None = None
        self._callbacks: list[Callable[[RunResult], None]] = []

    def add_done_callback(self, fn: Callable[[RunResult], None]) -> None:
        self._callbacks.append(fn)

    def cancel(self, reason: str = "cancelled") -> None:
        self.cancelled = reason
        self.finish("killed", signal="SIGTERM")

    def finish(self, status: str, exit_code: int | None = None, signal: str | None = None) -> None:
        result = RunResult(status, T0, T0, exit_code=exit_code, signal=signal)  # type: ignore[arg-type]
        for fn in self._callbacks:
            fn(result)


class FakeRunner:
    def __init__(self) -> None:
        self.launched: list[FakeHandle] = []

    def launch(self, req: Any) -> FakeHandle:
        handle = FakeHandle(req)
        self.launched.append(handle)
        return handle


class ListRecorder:
    def __init__(self) -> None:
        self.records: list[RunRecord] = []
        self.running: list[RunRecord] = []

    def started(self, rec: RunRecord) -> None:
        self.running.append(rec)

    def record(self, rec: RunRecord) -> None:
        self.records.append(rec)

    def statuses(self) -> list[str]:
        return [r.status for r in self.records]


class Harness:
    def __init__(self, spec: JobSpec, task_types: Any) -> None:
        self.now = T0
        self.runner = FakeRunner()
        self.recorder = ListRecorder()
        self.spec = spec
        self.task_types = task_types
        self.dispatcher = Dispatcher(
            self.runner,  # type: ignore[arg-type]
            task_types,
            self.recorder,
            clock=lambda: self.now,
        )
        self.dispatcher.start({spec.id: spec})

    def sync(self) -> None:
        """Wait until the dispatcher thread has handled everything queued so far."""
        done = threading.Event()
        self.dispatcher.call(done.set)
        assert done.wait(5)

    def fire(self, *slots: datetime) -> None:
        self.dispatcher.fire(self.spec.id, list(slots))
        self.sync()

    def finish(self, index: int, status: str = "success", **kw: Any) -> None:
        self.runner.launched[index].finish(status, **kw)
        self.sync()


def make_spec(tmp_path: Path, **job: Any) -> tuple[JobSpec, Any]:
    lines = ["jobs:", "  j:", "    task: shell", "    every: 1m", "    params: {command: 'true'}"]
    lines += [f"    {k}: {v}" for k, v in job.items()]
    path = tmp_path / "schedd.yaml"
    path.write_text("\n".join(lines) + "\n")
    _, registry = load_plugins()
    config = load_config(path, registry)
    return config.jobs["j"], registry.task_types


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(**job: Any) -> Harness:
        spec, task_types = make_spec(tmp_path, **job)
        h = Harness(spec, task_types)
        made.append(h)
        return h

    yield make
    for h in made:
        h.dispatcher.stop()


def test_on_time_fire_launches_with_slot_and_env(harness: Callable[..., Harness]) -> None:
    h = harness(env="{FOO: bar}")
    h.fire(T0)
    (handle,) = h.runner.launched
    assert handle.req.ctx.scheduled_for == T0
    assert handle.req.env["FOO"] == "bar"
    assert handle.req.env["SCHEDD_JOB_ID"] == "j"
    assert handle.req.env["SCHEDD_SCHEDULED_FOR"] == T0.isoformat()
    assert handle.req.target == h.task_types["shell"].target
    h.finish(0)
    assert h.recorder.statuses() == ["success"]


def test_overlap_skip_records_the_skipped_slot(harness: Callable[..., Harness]) -> None:
    h = harness(overlap="skip")
    h.fire(T0)
    h.now = T0 + timedelta(minutes=1)
    h.fire(h.now)
    assert len(h.runner.launched) == 1
    assert h.recorder.records[0].status == "skipped"
    assert h.recorder.records[0].scheduled_for == h.now
    assert "still active" in h.recorder.records[0].reason


def test_overlap_queue_keeps_one_waiting_and_runs_it_after(harness: Callable[..., Harness]) -> None:
    h = harness(overlap="queue")
    h.fire(T0)
    h.fire(T0 + timedelta(minutes=1))
    h.fire(T0 + timedelta(minutes=2))  # a second waiting one is skipped
    assert len(h.runner.launched) == 1
    assert h.recorder.statuses() == ["skipped"]
    assert h.recorder.records[0].scheduled_for == T0 + timedelta(minutes=2)
    h.finish(0)
    assert len(h.runner.launched) == 2
    assert h.runner.launched[1].req.ctx.scheduled_for == T0 + timedelta(minutes=1)


def test_overlap_replace_cancels_running_then_starts(harness: Callable[..., Harness]) -> None:
    h = harness(overlap="replace")
    h.fire(T0)
    h.fire(T0 + timedelta(minutes=1))
    first = h.runner.launched[0]
    assert first.cancelled and "replace" in first.cancelled
    h.sync()  # the cancelled run's end arrives as its own event
    assert len(h.runner.launched) == 2
    assert h.runner.launched[1].req.ctx.scheduled_for == T0 + timedelta(minutes=1)
    assert h.recorder.records[0].status == "killed"
    assert "replaced" in h.recorder.records[0].reason


def test_overlap_allow_runs_concurrently(harness: Callable[..., Harness]) -> None:
    h = harness(overlap="allow")
    h.fire(T0)
    h.fire(T0 + timedelta(minutes=1))
    assert len(h.runner.launched) == 2
    assert h.recorder.records == []


def test_retries_back_off_exponentially_and_stop(harness: Callable[..., Harness]) -> None:
    h = harness(retries=2, retry_delay="0.05s")
    h.fire(T0)
    h.finish(0, "failed", exit_code=3)
    h.sync()
    _wait_for(lambda: len(h.runner.launched) == 2)
    assert h.runner.launched[1].req.ctx.attempt == 2
    assert h.runner.launched[1].req.ctx.scheduled_for == T0
    h.finish(1, "timeout")
    _wait_for(lambda: len(h.runner.launched) == 3)
    h.finish(2, "failed", exit_code=1)
    h.sync()
    assert [r.attempt for r in h.recorder.records] == [1, 2, 3]
    assert h.recorder.statuses() == ["failed", "timeout", "failed"]
    assert len(h.runner.launched) == 3  # retries: 2 means three attempts in all


def test_cancelled_run_is_not_retried(harness: Callable[..., Harness]) -> None:
    h = harness(retries=3, retry_delay="0.01s", overlap="replace")
    h.fire(T0)
    h.fire(T0 + timedelta(minutes=1))  # replaces (cancels) the first
    h.sync()
    h.sync()
    assert [hd.req.ctx.attempt for hd in h.runner.launched] == [1, 1]


def test_catchup_none_records_late_slots_missed(harness: Callable[..., Harness]) -> None:
    h = harness(catchup="none")
    h.now = T0 + timedelta(minutes=10)
    h.fire(T0, T0 + timedelta(minutes=1), h.now)
    assert len(h.runner.launched) == 1
    assert h.runner.launched[0].req.ctx.scheduled_for == h.now
    assert h.recorder.statuses() == ["missed", "missed"]


def test_catchup_latest_runs_only_the_newest_late_slot(harness: Callable[..., Harness]) -> None:
    h = harness(catchup="latest")
    h.now = T0 + timedelta(minutes=10)
    late = [T0 + timedelta(minutes=i) for i in range(3)]
    h.fire(*late)
    assert [x.req.ctx.scheduled_for for x in h.runner.launched] == [late[-1]]
    assert [r.scheduled_for for r in h.recorder.records] == late[:-1]
    assert set(h.recorder.statuses()) == {"missed"}


def test_catchup_all_runs_each_late_slot_in_order(harness: Callable[..., Harness]) -> None:
    h = harness(catchup="all")
    h.now = T0 + timedelta(minutes=10)
    late = [T0 + timedelta(minutes=i) for i in range(3)]
    h.fire(*late)
    for i in range(3):
        assert h.runner.launched[i].req.ctx.scheduled_for == late[i]
        h.finish(i)
    assert h.recorder.statuses() == ["success"] * 3


def test_catchup_all_is_bounded(harness: Callable[..., Harness]) -> None:
    h = harness(catchup="all", catchup_window="1d")
    h.now = T0 + timedelta(hours=5)
    late = [T0 + timedelta(minutes=i) for i in range(MAX_CATCHUP_RUNS + 20)]
    h.fire(*late)
    missed = [r for r in h.recorder.records if r.status == "missed"]
    assert [r.scheduled_for for r in missed] == late[:20]


def test_catchup_window_limits_late_runs(harness: Callable[..., Harness]) -> None:
    h = harness(catchup="latest", catchup_window="5m")
    h.now = T0 + timedelta(hours=1)
    h.fire(T0)
    assert h.runner.launched == []
    assert h.recorder.records[0].status == "missed"
    assert "catchup_window" in h.recorder.records[0].reason


def test_jitter_delays_the_start(harness: Callable[..., Harness]) -> None:
    h = harness(jitter="0.3s")
    h.dispatcher._rng.seed(1)
    h.fire(T0)
    assert h.runner.launched == []  # waiting on the jitter timer
    _wait_for(lambda: len(h.runner.launched) == 1, timeout=2)
    h.fire(T0 + timedelta(minutes=1))  # busy while running
    assert h.recorder.statuses() == ["skipped"]


def test_drain_skips_waiting_and_refuses_new(harness: Callable[..., Harness]) -> None:
    h = harness(overlap="queue")
    h.fire(T0)
    h.fire(T0 + timedelta(minutes=1))
    assert not h.dispatcher.drain(0.05)  # one still running
    assert h.recorder.statuses() == ["skipped"]
    h.fire(T0 + timedelta(minutes=2))
    assert h.recorder.statuses() == ["skipped", "skipped"]
    h.finish(0)
    assert h.dispatcher.drain(1)
    assert len(h.runner.launched) == 1


def _wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_manual_trigger_goes_through_the_overlap_policy(harness: Callable[..., Harness]) -> None:
    from scheduler.errors import ScheddError

    h = harness(overlap="skip")
    first = h.dispatcher.trigger_now("j")
    assert first["run_id"] == h.runner.launched[0].run_id
    assert h.runner.launched[0].req.ctx.scheduled_for is None
    second = h.dispatcher.trigger_now("j")
    assert second["run_id"] is None and second["message"].startswith("skipped")
    forced = h.dispatcher.trigger_now("j", force=True)
    assert forced["run_id"] == h.runner.launched[1].run_id
    with pytest.raises(ScheddError, match="no job 'nope'"):
        h.dispatcher.trigger_now("nope")


def test_cancel_run_ends_it_and_records_why(harness: Callable[..., Harness]) -> None:
    from scheduler.errors import ScheddError

    h = harness(retries=2)
    h.fire(T0)
    run_id = h.runner.launched[0].run_id
    answer = h.dispatcher.cancel_run(run_id)
    assert answer["job"] == "j"
    h.sync()
    assert h.runner.launched[0].cancelled == "cancelled by schedd cancel"
    assert h.recorder.records[-1].status == "killed"
    assert h.recorder.records[-1].reason == "cancelled by schedd cancel"
    assert len(h.runner.launched) == 1  # a cancelled run is not retried
    with pytest.raises(ScheddError, match="no running run"):
        h.dispatcher.cancel_run(run_id)
