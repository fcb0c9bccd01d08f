"""Time faults (issue 7, item 5): wall-clock steps and a long suspend.

The scheduling layer runs for real (APScheduler's own ``_process_jobs`` and
``Job._get_run_times``, our trigger adapter, the dispatcher and its catch-up
policy) under an injected wall clock: APScheduler reads ``datetime.now`` in
its scheduler module and the daemon's Clock in ``scheduler.apsched``; both
are pointed at a clock the test sets. Runs go to a recording runner that
ends each run at once.

* Wall clock 2 h back: no slot runs twice; the next fire is the first slot
  after the last one run; the scheduler's next wake-up is bounded.
* Wall clock 10 years forward: a bounded number of runs (the catch-up
  bound), the jumped-over slots recorded in bulk (a capped list and a count),
  and every step finishes (pytest-timeout ends a hang).

The long suspend is real: a daemon SIGSTOPped for several intervals, then
SIGCONT; see :func:`test_a_stopped_daemon_records_what_it_missed_and_goes_on`.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import apscheduler.schedulers.base
import pytest

import scheduler.apsched
from scheduler.apsched import LAUNCH_LEAD, MAX_MISSED_RECORDS, MAX_SLEEP, Clock
from scheduler.catchup import LATE_AFTER, MAX_CATCHUP_RUNS
from scheduler.config import JobSpec, load_config
from scheduler.control import ControlClient
from scheduler.dispatch import Dispatcher
from scheduler.plugins import load_plugins
from scheduler.records import RunRecord
from scheduler.types import RunResult
from tests.helpers import Daemon, daemon, wait_for

__all__ = ["daemon"]  # the fixture

T0 = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)


class WallClock:
    """The injected wall clock: a ``datetime`` whose ``now()`` is the test's."""

    def __init__(self, start: datetime) -> None:
        self.t = start
        clock = self

        class Now(datetime):
            @classmethod
            def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
                return clock.t.astimezone(tz) if tz is not None else clock.t

        self.cls = Now


class InstantHandle:
    """A run that ends (success) as soon as the dispatcher listens for its end."""

    def __init__(self, req: Any, started: datetime) -> None:
        self.req, self.run_id, self.job_id = req, req.run_id, req.job_id
        self.started_at, self.pid = started, 4242

    def add_done_callback(self, fn: Callable[[RunResult], None]) -> None:
        fn(RunResult("success", self.started_at, self.started_at, exit_code=0))

    def cancel(self, reason: str = "") -> None:  # pragma: no cover - never running
        pass


class Runs:
    """Runner and recorder in one: what was launched, what was recorded."""

    def __init__(self, wall: WallClock) -> None:
        self.wall = wall
        self.launched: list[Any] = []
        self.records: list[RunRecord] = []
        self.lock = threading.Lock()

    def launch(self, req: Any) -> InstantHandle:
        with self.lock:
            self.launched.append(req)
        return InstantHandle(req, self.wall.t)

    def started(self, rec: RunRecord) -> None:
        pass

    def record(self, rec: RunRecord) -> None:
        with self.lock:
            self.records.append(rec)

    def slots(self, job: str) -> list[datetime]:
        return [r.ctx.scheduled_for for r in self.launched if r.job_id == job]

    def missed(self, job: str) -> list[RunRecord]:
        return [r for r in self.records if r.job == job and r.status == "missed"]


class World:
    """Clock + dispatcher + recording runner under one injected wall clock."""

    def __init__(self, specs: dict[str, JobSpec], task_types: Any) -> None:
        self.wall = WallClock(T0 + timedelta(milliseconds=500))  # between slots
        self.runs = Runs(self.wall)
        self.dispatcher = Dispatcher(
            self.runs,  # type: ignore[arg-type]
            task_types,
            self.runs,
            clock=lambda: self.wall.t,
        )
        self.clock = Clock(self.dispatcher, self.dispatcher.missed)
        self.specs = specs

    def start(self) -> None:
        self.clock.load(self.specs.values(), {})
        self.dispatcher.start(self.specs)

    def tick(self) -> float | None:
        """One round of APScheduler's loop at the current wall time; the dispatcher
        has handled everything it was handed when this returns."""
        wait: float | None = self.clock._scheduler._process_jobs()
        seen = -1
        for _ in range(10_000):  # fires, runs' ends, the catch-up backlog they pump
            self.dispatcher.ask(lambda: None)
            now_seen = len(self.runs.launched) + len(self.runs.records)
            if now_seen == seen:
                break
            seen = now_seen
        return wait

    def next_fire(self, job: str) -> datetime | None:
        """Clock.next_fire, read from the job store (the scheduler thread never
        runs here, and APScheduler's lookups only see the store once it has)."""
        found = self.clock._store.lookup_job(job)
        when: datetime | None = found.next_run_time if found is not None else None
        return None if when is None else when + LAUNCH_LEAD

    def advance(self, seconds: float, step: float) -> None:
        """Let wall time pass normally, ticking every ``step`` seconds."""
        end = self.wall.t + timedelta(seconds=seconds)
        while self.wall.t < end:
            self.wall.t += timedelta(seconds=step)
            self.tick()


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], World]]:
    made: list[World] = []

    def make(jobs: str) -> World:
        path = tmp_path / "schedd.yaml"
        path.write_text("jobs:\n" + jobs)
        _, registry = load_plugins()
        config = load_config(path, registry)
        w = World(config.jobs, registry.task_types)
        monkeypatch.setattr(apscheduler.schedulers.base, "datetime", w.wall.cls)
        monkeypatch.setattr(scheduler.apsched, "datetime", w.wall.cls)
        w.start()
        made.append(w)
        return w

    yield make
    for w in made:
        w.dispatcher.stop()


JOBS = """\
  fast:
    task: shell
    every: 10s
    params: {command: 'true'}
  minutely:
    task: shell
    cron: "* * * * *"
    params: {command: 'true'}
"""


def test_normal_time_runs_every_slot_once(world: Callable[[str], World]) -> None:
    """The harness itself: a minute of normal time runs each slot exactly once."""
    w = world(JOBS)
    w.advance(60, step=1)
    assert w.runs.slots("fast") == [T0 + timedelta(seconds=s) for s in range(10, 61, 10)]
    assert w.runs.slots("minutely") == [T0 + timedelta(minutes=1)]
    assert not w.runs.missed("fast")


@pytest.mark.timeout(60)
def test_wall_clock_two_hours_back(world: Callable[[str], World]) -> None:
    w = world(JOBS)
    w.advance(120, step=1)
    ran = {job: list(w.runs.slots(job)) for job in ("fast", "minutely")}
    last = {job: slots[-1] for job, slots in ran.items()}
    w.wall.t -= timedelta(hours=2)
    wait = w.tick()
    # Not a hang: the next wake-up is a bounded, finite wait, re-checked soon.
    assert wait is not None and 0 <= wait <= MAX_SLEEP
    # The next fire is the first slot after the last one run, not a replay.
    assert w.next_fire("fast") == last["fast"] + timedelta(seconds=10)
    assert w.next_fire("minutely") == last["minutely"] + timedelta(minutes=1)
    w.advance(2 * 3600 + 120, step=5)  # the clock catches up, and two minutes more
    for job in ("fast", "minutely"):
        slots = w.runs.slots(job)
        assert len(slots) == len(set(slots)), f"{job}: a slot ran twice"
        assert slots == sorted(slots)
        assert slots[: len(ran[job])] == ran[job]
        resumed = slots[len(ran[job])]
        assert resumed > last[job], "an already-run slot ran again"
    assert w.runs.slots("fast")[-1] >= T0 + timedelta(seconds=230)
    assert not w.runs.missed("fast") and not w.runs.missed("minutely")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("catchup", ["latest", "all", "none"])
def test_wall_clock_ten_years_forward(world: Callable[[str], World], catchup: str) -> None:
    w = world(
        f"""\
  second:
    task: shell
    every: 1s
    catchup: {catchup}
    catchup_window: 400d
    params: {{command: 'true'}}
  hourly:
    task: shell
    cron: "0 * * * *"
    catchup: {catchup}
    params: {{command: 'true'}}
"""
    )
    w.advance(5, step=1)
    before = {job: len(w.runs.slots(job)) for job in ("second", "hourly")}
    w.wall.t += timedelta(days=3653)
    jumped_at = w.wall.t
    w.tick()
    for job in ("second", "hourly"):
        runs = len(w.runs.slots(job)) - before[job]
        # At most the catch-up bound of runs (catchup: all runs them one by one).
        limit = {"latest": 1, "all": MAX_CATCHUP_RUNS, "none": 0}[catchup]
        assert runs <= limit + 1, (job, runs)
        if catchup == "latest":
            assert runs == 1, job
        # The missed slots are recorded in bulk: capped lists, not one row per slot.
        missed = w.runs.missed(job)
        assert 1 <= len(missed) <= 2 * MAX_MISSED_RECORDS + MAX_CATCHUP_RUNS + 2 * LATE_AFTER
    # Afterwards time goes on normally from the new "now".
    w.advance(10, step=1)
    latest = w.runs.slots("second")[-1]
    assert latest >= jumped_at + timedelta(seconds=9)
    per_slot = Counter(w.runs.slots("second"))
    assert max(per_slot.values()) == 1
    assert w.next_fire("second") <= w.wall.t + timedelta(seconds=1)  # type: ignore[operator]


def test_a_far_future_fire_is_rechecked_within_max_sleep(world: Callable[[str], World]) -> None:
    """A job due in a year must not put the scheduler to sleep for a year: the
    sleep is measured on the monotonic clock, which neither a wall-clock step
    nor a system suspend moves, so a long sleep would fire late by that much."""
    w = world("  yearly:\n    task: shell\n    cron: '0 0 1 1 *'\n    params: {command: 'true'}\n")
    wait = w.tick()
    assert wait is not None and wait <= MAX_SLEEP
    w.wall.t = datetime(2028, 1, 1, 0, 0, 30, tzinfo=UTC)  # the clock jumps past the fire
    w.tick()
    assert w.runs.slots("yearly") == [datetime(2028, 1, 1, tzinfo=UTC)]


# -- long suspend: a real daemon, SIGSTOP, SIGCONT --------------------------------

SUSPEND = """
jobs:
  tick:
    task: shell
    every: 1s
    params: {command: 'echo tick'}
  strict:
    task: shell
    every: 1s
    catchup: none
    overlap: allow
    params: {command: 'true'}
  inflight:
    task: shell
    every: 1d
    params: {command: 'sleep 1; echo finished while the daemon was stopped'}
  overrun:
    task: shell
    every: 1d
    timeout: 1s
    kill_grace: 1s
    params: {command: 'sleep 60'}
"""
STOP_FOR = LATE_AFTER + 3  # long enough that some slots come due later than LATE_AFTER


def test_a_stopped_daemon_records_what_it_missed_and_goes_on(
    daemon: Callable[..., Daemon],
) -> None:
    d = daemon(SUSPEND).start()
    client = ControlClient(d.state, timeout=30)
    wait_for(lambda: len(client.history("tick", status="success")) >= 1, what="first tick")
    assert client.trigger("inflight")["run_id"]
    assert client.trigger("overrun")["run_id"]
    d.signal(signal.SIGSTOP)
    stopped = datetime.now(UTC)
    time.sleep(STOP_FOR)
    resumed = datetime.now(UTC)
    d.signal(signal.SIGCONT)

    # The runs that were in flight ended on their own, under their supervisors,
    # and are recorded with their real outcome once the daemon reads them.
    def outcome(job: str) -> str | None:
        rows = client.history(job, limit=5)
        return rows[0]["status"] if rows and rows[0]["status"] != "running" else None

    wait_for(lambda: outcome("inflight") is not None, what="in-flight run recorded")
    wait_for(lambda: outcome("overrun") is not None, what="overrun recorded")
    assert outcome("inflight") == "success"
    assert "finished while the daemon was stopped" in d.job_log("inflight")
    assert outcome("overrun") == "timeout"

    # It goes on firing.
    after = resumed + timedelta(seconds=1)

    def fired_after() -> int:
        rows = client.history("tick", limit=100, status="success")
        return sum(1 for r in rows if datetime.fromisoformat(r["scheduled_for"]) > after)

    wait_for(lambda: fired_after() >= 2, what="ticks after SIGCONT")

    # Slots that came due more than LATE_AFTER late were recorded missed, by policy.
    def in_stop(row: dict[str, Any]) -> bool:
        return stopped < datetime.fromisoformat(row["scheduled_for"]) < resumed

    tick_rows = [r for r in client.history("tick", limit=200) if in_stop(r)]
    strict_rows = [r for r in client.history("strict", limit=200) if in_stop(r)]
    tick_missed = [r for r in tick_rows if r["status"] == "missed"]
    strict_missed = [r for r in strict_rows if r["status"] == "missed"]
    assert tick_missed and all("catchup: latest" in r["reason"] for r in tick_missed), tick_rows
    assert strict_missed and all("catchup is none" in r["reason"] for r in strict_missed)
    # Every slot of the stop has exactly one record: run, skipped or missed.
    for rows in (tick_rows, strict_rows):
        slots = Counter(r["scheduled_for"] for r in rows)
        assert max(slots.values()) == 1, slots
        assert len(slots) >= STOP_FOR - 2
    # catchup: latest runs no late slot when on-time ones exist; overlap: skip
    # lets one of the on-time ones run and records the rest skipped.
    assert {r["status"] for r in tick_rows} <= {"missed", "skipped", "success"}
    assert "Traceback" not in d.daemon_log()
