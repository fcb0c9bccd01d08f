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

Scale (DESIGN.md "Scale and start-up"): ``add_job`` costs about 0.25 ms per
job (it inspects the job function's signature every time, and the memory
store inserts into a sorted list, O(n) each), so the daemon's start-up goes
through :meth:`Clock.load` instead: it builds the APScheduler Job objects
directly, the way APScheduler's persistent job stores rebuild theirs, shares
whatever jobs can share (parsed schedules are shared by the config already;
here the catch-up window and the first fire time of each schedule), and puts
them into the memory store with one sort.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from apscheduler.executors.base import BaseExecutor
from apscheduler.job import Job
from apscheduler.jobstores.base import ConflictingIdError
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.util import datetime_to_utc_timestamp, obj_to_ref

from scheduler.catchup import LATE_AFTER, MAX_CATCHUP_RUNS

if TYPE_CHECKING:
    from scheduler.config import JobSpec
    from scheduler.dispatch import Dispatcher
    from scheduler.triggers import Schedule

#: Runs are launched this long before their slot (the fork and the target's import
#: happen then) and the task function is called at the slot: isolation costs no lateness.
LAUNCH_LEAD = timedelta(milliseconds=50)
#: At most this many jumped-over slots are recorded one by one; the rest are counted.
MAX_MISSED_RECORDS = 1000
#: The scheduler re-reads the wall clock at least this often (seconds); see _Scheduler.
MAX_SLEEP = 60.0
#: Every job's (unused) keyword arguments: one shared, never-modified mapping.
_NO_KWARGS: dict[str, Any] = {}

MissedCallback = Callable[[str, list[datetime], int], None]


class ScheduleTrigger(BaseTrigger):  # type: ignore[misc]
    """Adapts a shared :class:`~scheduler.triggers.Schedule` to APScheduler, per job.

    Per job because it reports missed slots under the job's id and counts the
    job's late slots; everything else it holds is shared, and ``__slots__``
    keeps it at five pointers (a daemon may hold 100,000 of these).
    """

    __slots__ = ("_behind", "job_id", "lookback", "on_missed", "schedule")

    def __init__(
        self,
        job_id: str,
        schedule: Schedule,
        lookback: float | timedelta,
        on_missed: MissedCallback,
    ) -> None:
        self.job_id = job_id
        self.schedule = schedule
        if not isinstance(lookback, timedelta):
            lookback = _lookback(lookback)
        self.lookback = lookback
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
        """APScheduler's fire times are slots minus :data:`LAUNCH_LEAD`: the run is
        launched that much ahead and its task starts at the slot itself."""
        prev = None if previous_fire_time is None else previous_fire_time + LAUNCH_LEAD
        slot = self._next_slot(prev, now)
        return None if slot is None else slot - LAUNCH_LEAD

    def first_fire_after(self, last_slot: datetime) -> datetime | None:
        """The fire time of the slot after ``last_slot`` (restart catch-up)."""
        slot = self._next(last_slot)
        return None if slot is None else slot - LAUNCH_LEAD

    def _next_slot(self, previous_fire_time: datetime | None, now: datetime) -> datetime | None:
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
        self._dispatcher.fire(job.id, [t + LAUNCH_LEAD for t in run_times])

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:  # pragma: no cover
        raise AssertionError("submit_job is overridden")


def _never_called() -> None:  # pragma: no cover - the executor never calls job functions
    raise AssertionError("schedd jobs are run by the dispatcher")


def _lookback(catchup_window: float) -> timedelta:
    return timedelta(seconds=max(catchup_window, LATE_AFTER))


def _store_order(entry: tuple[Job, float | None]) -> tuple[float, str]:
    """MemoryJobStore's order: next run time (none: last), then job id."""
    job, timestamp = entry
    return (math.inf if timestamp is None else timestamp, job.id)


class _JobStore(MemoryJobStore):  # type: ignore[misc]
    """APScheduler's memory store, plus loading many jobs with one sort.

    ``MemoryJobStore.add_job`` inserts into a sorted list (O(n) per job, so
    quadratic for a whole config); :meth:`add_many` appends and sorts once,
    leaving the list and the index exactly as ``add_job`` one by one would.
    """

    def add_many(self, jobs: list[Job]) -> None:
        stamps: dict[int, float | None] = {}  # per next run time: jobs often share one
        entries: list[tuple[Job, float | None]] = []
        for job in jobs:
            when = job.next_run_time
            if id(when) not in stamps:
                stamps[id(when)] = datetime_to_utc_timestamp(when)
            entries.append((job, stamps[id(when)]))
        index: dict[str, tuple[Job, float | None]] = self._jobs_index
        if len({job.id for job in jobs} | set(index)) != len(jobs) + len(index):
            raise ConflictingIdError(next(j.id for j in jobs if j.id in index))
        listed: list[tuple[Job, float | None]] = self._jobs
        listed.extend(entries)
        listed.sort(key=_store_order)
        index.update((entry[0].id, entry) for entry in entries)


class _Scheduler(BackgroundScheduler):  # type: ignore[misc]
    """APScheduler's background scheduler, never sleeping longer than MAX_SLEEP.

    It sleeps until the next fire time on the monotonic clock, which neither
    a wall-clock step nor a system suspend advances: with only a yearly job,
    a clock stepped forward past its fire time (or a machine that slept
    through it) would be noticed months late. Waking at least once a minute
    bounds that lateness; the wake-up is one look at the head of a sorted list.
    """

    def _process_jobs(self) -> float | None:
        wait: float | None = super()._process_jobs()
        return wait if wait is None else min(wait, MAX_SLEEP)


#: Every job's APScheduler settings; see the module docstring for why.
_JOB_DEFAULTS: dict[str, Any] = {
    "misfire_grace_time": None,
    "coalesce": False,
    "max_instances": 2**31 - 1,
}


class Clock:
    """Owns the BackgroundScheduler; add/remove/reschedule jobs by JobSpec."""

    def __init__(self, dispatcher: Dispatcher, on_missed: MissedCallback) -> None:
        self._on_missed = on_missed
        self._store = _JobStore()
        self._scheduler = _Scheduler(
            timezone=UTC,
            executors={"default": DispatchExecutor(dispatcher)},
            jobstores={"default": self._store},
            job_defaults=_JOB_DEFAULTS,
        )
        self._lookbacks: dict[float, timedelta] = {}

    def load(self, specs: Iterable[JobSpec], after: Mapping[str, datetime]) -> None:
        """Schedule many jobs before :meth:`start`, as :meth:`add` would one by one.

        ``after`` maps job ids to the last slot the ledger saw handled (see
        :meth:`add`). The Job objects are built as APScheduler's persistent
        stores rebuild theirs (``__setstate__``'s fields plus the scheduler and
        store), with the settings ``add_job`` would give them; jobs without a
        handled slot share their schedule's first fire time.
        """
        from scheduler.yamlsrc import gc_paused

        if self._scheduler.running:
            for spec in specs:
                self.add(spec, after=after.get(spec.id))
            return
        now = datetime.now(UTC)
        firsts: dict[int, datetime | None] = {}
        func_ref = obj_to_ref(_never_called)
        jobs: list[Job] = []
        with gc_paused():  # see there: 100,000 jobs are a million long-lived objects
            for spec in specs:
                if not spec.enabled:
                    continue
                lookback = self._lookbacks.get(spec.catchup_window)
                if lookback is None:
                    lookback = self._lookbacks[spec.catchup_window] = _lookback(spec.catchup_window)
                trigger = ScheduleTrigger(spec.id, spec.schedule, lookback, self._on_missed)
                last = after.get(spec.id)
                if last is not None:
                    first = trigger.first_fire_after(last)
                    if first is None:
                        continue  # a one-shot whose slot was already handled
                else:
                    key = id(spec.schedule)  # alive in spec, so the id is not reused
                    if key in firsts:
                        first = firsts[key]
                    else:
                        first = firsts[key] = trigger.get_next_fire_time(None, now)
                job = Job.__new__(Job)  # the fields Job.__setstate__ sets, then two more
                job.id = spec.id
                job.func_ref = func_ref
                job.func = _never_called
                job.trigger = trigger
                job.executor = "default"
                job.args = ()
                job.kwargs = _NO_KWARGS
                job.name = spec.id
                job.misfire_grace_time = _JOB_DEFAULTS["misfire_grace_time"]
                job.coalesce = _JOB_DEFAULTS["coalesce"]
                job.max_instances = _JOB_DEFAULTS["max_instances"]
                job.next_run_time = first
                job._scheduler = self._scheduler
                job._jobstore_alias = "default"
                jobs.append(job)
            self._store.add_many(jobs)

    def add(self, spec: JobSpec, *, after: datetime | None = None) -> None:
        """Schedule ``spec``. With ``after`` (the last slot the ledger saw handled),
        the first fire is the slot following it, so slots missed while the daemon
        was down come due at once and go through the catch-up policy."""
        if not spec.enabled:
            return
        lookback = self._lookbacks.get(spec.catchup_window) or _lookback(spec.catchup_window)
        trigger = ScheduleTrigger(spec.id, spec.schedule, lookback, self._on_missed)
        extra: dict[str, Any] = {}
        if after is not None:
            first = trigger.first_fire_after(after)
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
        when: datetime | None = job.next_run_time if job is not None else None
        return None if when is None else when + LAUNCH_LEAD

    def start(self) -> None:
        self._scheduler.start()

    def stop(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
