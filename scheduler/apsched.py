"""The only place that touches APScheduler: it decides WHEN, nothing else.

APScheduler 3's defaults drop runs silently (``misfire_grace_time=1``,
``coalesce=True``, ``max_instances=1``; its issues #17, #296, #342, #423), so
every one is set on purpose here: no grace limit, no coalescing, no instance
limit. Every due slot, late ones included, is handed to the dispatcher, which
owns overlap and catch-up and records a reason for each slot it does not run.

When the daemon falls far behind (suspend, a clock jump), APScheduler would
enumerate every missed slot in one go; the trigger adapter caps that: past
``MAX_CATCHUP_RUNS`` late slots or the job's ``catchup_window`` it jumps ahead
and reports the slots it jumped over as missed.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from apscheduler.executors.base import BaseExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger

from scheduler.catchup import LATE_AFTER, MAX_CATCHUP_RUNS

if TYPE_CHECKING:
    from scheduler.config import JobSpec
    from scheduler.dispatch import Dispatcher
    from scheduler.triggers import Schedule

#: At most this many jumped-over slots are recorded one by one; the rest are counted.
MAX_MISSED_RECORDS = 1000

MissedCallback = Callable[[str, list[datetime], int], None]


class ScheduleTrigger(BaseTrigger):  # type: ignore[misc]
    """Adapts a shared :class:`~scheduler.triggers.Schedule` to APScheduler, per job."""

    __slots__ = ("_behind", "job_id", "lookback", "on_missed", "schedule")

    def __init__(
        self, job_id: str, schedule: Schedule, lookback: float, on_missed: MissedCallback
    ) -> None:
        self.job_id = job_id
        self.schedule = schedule
        self.lookback = timedelta(seconds=max(lookback, LATE_AFTER))
        self.on_missed = on_missed
        self._behind = 0

    def _next(self, t: datetime) -> datetime | None:
        # UTC throughout: two datetimes sharing a ZoneInfo compare by wall time
        # and ignore ``fold``, which would misorder the two copies of a repeated hour.
        nxt = self.schedule.next_after(t)
        return nxt.astimezone(UTC) if nxt is not None else None

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        now = now.astimezone(UTC)
        if previous_fire_time is None:
            return self._next(now - timedelta(microseconds=1))
        late_line = now - timedelta(seconds=LATE_AFTER)
        nxt = self._next(previous_fire_time)
        if nxt is not None and nxt <= late_line and nxt < now - self.lookback:
            # Older than the catch-up window: jump to the first slot inside it.
            nxt = self._jump(nxt, now - self.lookback)
        if nxt is None or nxt > late_line:
            self._behind = 0
            return nxt
        self._behind += 1
        if self._behind > MAX_CATCHUP_RUNS:
            # More late slots than catch-up would ever run: jump to the present.
            self._behind = 0
            return self._jump(nxt, late_line)
        return nxt

    def _jump(self, first: datetime, to: datetime) -> datetime | None:
        """Skip from ``first`` to the first slot at or after ``to``, reporting each
        skipped slot (the first MAX_MISSED_RECORDS of them) as missed."""
        resume = self._next(to - timedelta(microseconds=1))
        skipped: list[datetime] = []
        more = 0
        t: datetime | None = first
        while t is not None and (resume is None or t < resume):
            if len(skipped) == MAX_MISSED_RECORDS:
                more = 1  # counting further could take very long
                break
            skipped.append(t)
            t = self._next(t)
        if skipped:
            self.on_missed(self.job_id, skipped, more)
        return resume

    def __str__(self) -> str:
        return self.schedule.describe()


class DispatchExecutor(BaseExecutor):  # type: ignore[misc]
    """Hands due slots to the dispatcher instead of running anything."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        super().__init__()
        self._dispatcher = dispatcher

    def submit_job(self, job: Any, run_times: list[datetime]) -> None:
        self._dispatcher.fire(job.id, list(run_times))

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:  # pragma: no cover
        raise AssertionError("submit_job is overridden")


def _never_called() -> None:  # pragma: no cover - the executor never calls job functions
    raise AssertionError("schedd jobs are run by the dispatcher")


class Clock:
    """Owns the BackgroundScheduler; add/remove/reschedule jobs by JobSpec."""

    def __init__(self, dispatcher: Dispatcher, on_missed: MissedCallback) -> None:
        self._on_missed = on_missed
        self._scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={"default": DispatchExecutor(dispatcher)},
            job_defaults={
                "misfire_grace_time": None,
                "coalesce": False,
                "max_instances": 2**31 - 1,
            },
        )

    def add(self, spec: JobSpec, *, after: datetime | None = None) -> None:
        """Schedule ``spec``. With ``after`` (the last slot the ledger saw handled),
        the first fire is the slot following it, so slots missed while the daemon
        was down come due at once and go through the catch-up policy."""
        if not spec.enabled:
            return
        trigger = ScheduleTrigger(spec.id, spec.schedule, spec.catchup_window, self._on_missed)
        extra: dict[str, Any] = {}
        if after is not None:
            first = trigger._next(after)
            if first is None:
                return  # a one-shot whose slot was already handled
            extra["next_run_time"] = first
        self._scheduler.add_job(
            _never_called, trigger=trigger, id=spec.id, name=spec.id, replace_existing=True, **extra
        )

    def remove(self, job_id: str) -> None:
        if self._scheduler.get_job(job_id) is not None:
            self._scheduler.remove_job(job_id)

    def next_fire(self, job_id: str) -> datetime | None:
        job = self._scheduler.get_job(job_id)
        return job.next_run_time if job is not None else None

    def start(self) -> None:
        self._scheduler.start()

    def stop(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
