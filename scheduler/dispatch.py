"""Decide what each fire becomes: a run, a queued run, a retry, or a record of why not.

APScheduler only says *when*; every policy (overlap, catch-up, jitter,
retries) is decided here, on one thread, so no two decisions about a job can
race. Other threads only put events on the queue: APScheduler's thread
(fires), the runner's reader thread (run ends) and the control side (manual
triggers, reloads, shutdown).

Every fire ends as a record: a run outcome, or ``skipped``/``missed`` with the
reason. Nothing is dropped silently.
"""

from __future__ import annotations

import heapq
import itertools
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from loguru import logger

from scheduler.catchup import decide
from scheduler.errors import ScheddError
from scheduler.records import NODE, Recorder, RunRecord, new_run_id
from scheduler.runspec import Start, build_request
from scheduler.types import RunInfo, RunResult, TaskType

if TYPE_CHECKING:
    from scheduler.config import JobSpec
    from scheduler.hooks import HookCaller
    from scheduler.logs import JobLogs
    from scheduler.runner import RunHandle, Runner

T = TypeVar("T")

#: Exponential retry backoff never waits longer than this (seconds).
MAX_RETRY_DELAY = 3600.0


@dataclass
class _Active:
    handle: RunHandle
    start: Start
    info: RunInfo
    cancelled: str | None = None


@dataclass(slots=True)  # one per job: slots and a list (not a 600-byte deque) keep it small
class _JobState:
    spec: JobSpec
    active: dict[str, _Active] = field(default_factory=dict)
    waiting: Start | None = None
    backlog: list[datetime] = field(default_factory=list)  # catch-up slots, oldest first
    pending: int = 0  # starts waiting on a jitter or retry timer
    removed: bool = False

    @property
    def busy(self) -> bool:
        return bool(self.active) or self.pending > 0


class Dispatcher:
    def __init__(
        self,
        runner: Runner,
        task_types: Mapping[str, TaskType],
        recorder: Recorder,
        *,
        job_logs: JobLogs | None = None,
        hooks: HookCaller | None = None,
        base_env: Mapping[str, str] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
    ) -> None:
        self._runner = runner
        self._task_types = task_types
        self._recorder = recorder
        self._job_logs = job_logs
        self._hooks = hooks
        self._base_env = dict(base_env or {})
        self._clock = clock
        self._rng = rng or random.Random()
        self._states: dict[str, _JobState] = {}
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._idle = threading.Event()

    # ---- called from other threads -------------------------------------------------
    def start(self, jobs: Mapping[str, JobSpec]) -> None:
        self._states = {j: _JobState(spec) for j, spec in jobs.items()}
        self._thread = threading.Thread(target=self._loop, name="schedd-dispatch", daemon=True)
        self._thread.start()

    def fire(self, job_id: str, slots: list[datetime]) -> None:
        """APScheduler's executor hands every due slot here, late ones included."""
        self._events.put(("fire", job_id, slots))

    def missed(self, job_id: str, slots: list[datetime], more: int) -> None:
        """Slots the trigger jumped over because the daemon fell far behind."""
        self._events.put(("missed", job_id, slots, more))

    def ask(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run ``fn`` on the dispatcher thread and return its result (control commands)."""
        fut: Future[T] = Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        self._events.put(("call", run))
        return fut.result(timeout)

    def trigger_now(self, job_id: str, *, force: bool = False) -> dict[str, Any]:
        """A manual start through the overlap policy (``force`` bypasses it)."""

        def go() -> dict[str, Any]:
            state = self._states.get(job_id)
            if state is None or state.removed:
                raise ScheddError(f"no job {job_id!r} in the running config")
            if not self._accepting:
                raise ScheddError("the daemon is shutting down")
            run_id, message = self._request(
                state, Start(None, reason="manual trigger", force=force)
            )
            return {"job": job_id, "run_id": run_id, "message": message}

        return self.ask(go)

    def start_slot(
        self, job_id: str, slot: datetime, reason: str, attempt: int = 1
    ) -> dict[str, Any]:
        """Start one given slot now through the overlap policy (re-running a lost slot
        uses the next ``attempt``, so its record never collides with the lost one)."""

        def go() -> dict[str, Any]:
            state = self._states.get(job_id)
            if state is None or state.removed:
                raise ScheddError(f"no job {job_id!r} in the running config")
            run_id, message = self._request(state, Start(slot, attempt, reason))
            return {"job": job_id, "run_id": run_id, "message": message}

        return self.ask(go)

    def cancel_run(self, run_id: str, reason: str = "cancelled by schedd cancel") -> dict[str, Any]:
        """End one running run's whole tree (TERM, grace, KILL); it is recorded ``killed``."""

        def go() -> dict[str, Any]:
            for state in self._states.values():
                act = state.active.get(run_id)
                if act is not None:
                    if act.cancelled is None:
                        act.cancelled = reason
                        act.handle.cancel(reason)
                    return {
                        "run_id": run_id,
                        "job": state.spec.id,
                        "message": "ending its process tree",
                    }
            raise ScheddError(f"no running run {run_id!r} (see `schedd status`)")

        return self.ask(go)

    def update_jobs(self, jobs: Mapping[str, JobSpec]) -> None:
        self._events.put(("update", dict(jobs)))

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the dispatcher thread (for tests and the control side)."""
        self._events.put(("call", fn))

    def running(self) -> list[RunInfo]:
        return [a.info for s in list(self._states.values()) for a in list(s.active.values())]

    def drain(self, grace: float) -> bool:
        """Stop starting runs; wait up to ``grace`` s for active runs. True if all ended."""
        self._idle.clear()
        self._events.put(("drain",))
        return self._idle.wait(grace)

    def stop(self) -> None:
        self._events.put(("stop",))
        if self._thread is not None:
            self._thread.join(10)

    # ---- the dispatcher thread ----------------------------------------------------
    def _loop(self) -> None:
        while True:
            timeout = None
            if self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                event = None
            self._run_due_timers()
            if event is None:
                continue
            if event[0] == "stop":
                return
            try:
                self._handle(event)
            except Exception as exc:  # a bug here must not stop all scheduling
                logger.opt(exception=exc).error(f"dispatcher error handling {event[0]}: {exc!r}")

    def _handle(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "fire":
            self._on_fire(event[1], event[2])
        elif kind == "done":
            self._on_done(event[1], event[2], event[3])
        elif kind == "missed":
            for slot in event[2]:
                self._missed(event[1], slot, "daemon fell behind (stalled or suspended)")
            if event[3]:
                logger.warning(f"job {event[1]!r}: more missed slots than could be listed")
        elif kind == "update":
            self._on_update(event[1])
        elif kind == "call":
            event[1]()
        elif kind == "drain":
            self._on_drain()
        self._check_idle()

    def _after(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn))

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            try:
                fn()
            except Exception as exc:
                logger.opt(exception=exc).error(f"dispatcher timer failed: {exc!r}")
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._accepting and not any(s.busy for s in self._states.values()):
            self._idle.set()

    # ---- policies -------------------------------------------------------------------
    def _on_fire(self, job_id: str, slots: list[datetime]) -> None:
        state = self._states.get(job_id)
        if state is None or state.removed:
            return
        spec = state.spec
        if not self._accepting:
            for slot in slots:
                self._skip(spec.id, slot, "daemon is shutting down")
            return
        plan = decide(slots, self._clock(), spec.catchup, spec.catchup_window)
        for slot, why in plan.missed:
            self._missed(spec.id, slot, why)
        for slot, why in plan.run:
            self._request(state, Start(slot, reason=why))
        if plan.backlog:
            state.backlog.extend(plan.backlog)
            self._pump(state)

    def _request(self, state: _JobState, start: Start) -> tuple[str | None, str]:
        """Apply the overlap policy; returns (run id if started now, what happened)."""
        spec = state.spec
        if start.force or spec.overlap == "allow" or not state.busy:
            return self._begin(state, start)
        running = ", ".join(state.active) or "a pending start"
        if spec.overlap == "skip":
            why = f"previous run still active ({running}); overlap: skip"
            self._skip(spec.id, start.slot, why)
            return None, f"skipped: {why}"
        if spec.overlap == "queue":
            if state.waiting is not None:
                why = "one run is already queued; overlap: queue"
                self._skip(spec.id, start.slot, why)
                return None, f"skipped: {why}"
            state.waiting = start
            return None, f"queued behind {running} (overlap: queue)"
        # replace
        if state.waiting is not None:
            old = state.waiting
            self._skip(spec.id, old.slot, "replaced by a newer slot before it started", old.attempt)
        state.waiting = start
        for run_id, act in state.active.items():
            if act.cancelled is None:
                act.cancelled = "replaced by a newer run (overlap: replace)"
                act.handle.cancel(act.cancelled)
                logger.info(f"job {spec.id!r}: ending run {run_id} to replace it")
        return None, f"ending {running} first, then starting (overlap: replace)"

    def _begin(self, state: _JobState, start: Start) -> tuple[str | None, str]:
        jitter = state.spec.jitter
        if jitter > 0 and start.attempt == 1 and not start.force:
            delay = self._rng.uniform(0, jitter)
            state.pending += 1

            def go() -> None:
                state.pending -= 1
                self._launch(state, start)

            self._after(delay, go)
            return None, f"starting after a jitter delay of {delay:.1f}s"
        run_id = self._launch(state, start)
        return run_id, f"started run {run_id}" if run_id else "could not start (see the log)"

    def _launch(self, state: _JobState, start: Start) -> str | None:
        spec = state.spec
        if state.removed or not self._accepting:
            self._skip(
                spec.id, start.slot, "job removed or daemon stopping before start", start.attempt
            )
            return None
        run_id = new_run_id()
        task = self._task_types.get(spec.task)
        if task is None:
            self._record(spec.id, run_id, start, "failed", reason=f"task {spec.task!r} unavailable")
            return None
        try:
            request = build_request(spec, task, run_id, start, self._base_env)
        except ScheddError as exc:  # the env file is gone, unreadable or broken now
            if self._job_logs is not None:
                self._job_logs.note(spec.id, run_id, f"not started: {exc}")
            self._record(spec.id, run_id, start, "failed", reason=f"not started: {exc}")
            return None
        try:
            handle = self._runner.launch(request)
        except Exception as exc:
            logger.opt(exception=exc).error(f"job {spec.id!r}: could not launch: {exc!r}")
            self._record(spec.id, run_id, start, "failed", reason=f"could not launch: {exc}")
            return None
        info = RunInfo(
            job_id=spec.id,
            run_id=run_id,
            task=spec.task,
            scheduled_for=start.slot,
            started_at=_task_start(handle.started_at, start.slot),
            attempt=start.attempt,
            pid=handle.pid,
            node=NODE,
        )
        state.active[run_id] = _Active(handle, start, info)
        try:
            self._recorder.started(
                RunRecord(
                    run_id,
                    spec.id,
                    start.slot,
                    "running",
                    start.attempt,
                    started_at=_task_start(handle.started_at, start.slot),
                    pid=handle.pid,
                    reason=start.reason,
                )
            )
        except Exception as exc:
            logger.opt(exception=exc).error(f"could not record the start of {run_id}: {exc!r}")
        if self._job_logs is not None:
            slot = start.slot.isoformat() if start.slot else "none"
            self._job_logs.note(
                spec.id, run_id, f"started: {start.reason}, slot {slot}, attempt {start.attempt}"
            )
        if self._hooks is not None:
            self._hooks.started(info)
        handle.add_done_callback(lambda result: self._events.put(("done", spec.id, run_id, result)))
        return run_id

    def _on_done(self, job_id: str, run_id: str, result: RunResult) -> None:
        state = self._states.get(job_id)
        act = state.active.pop(run_id, None) if state else None
        if state is None or act is None:
            return
        spec = state.spec
        started_why = "" if act.start.reason == "scheduled" else act.start.reason
        reason = act.cancelled or result.reason or started_why
        self._records(
            RunRecord(
                run_id=run_id,
                job=job_id,
                scheduled_for=act.start.slot,
                status=result.status,
                attempt=act.start.attempt,
                started_at=_task_start(result.started_at, act.start.slot),
                ended_at=result.ended_at,
                exit_code=result.exit_code,
                signal=result.signal,
                error=result.error,
                pid=act.info.pid or act.handle.pid,
                reason=reason,
            )
        )
        if self._job_logs is not None:
            self._job_logs.note(job_id, run_id, f"ended: {_describe(result)}")
        if self._hooks is not None:
            self._hooks.finished(act.info, result)
        retryable = result.status in ("failed", "timeout") or (
            result.status == "killed" and act.cancelled is None
        )
        if (
            retryable
            and act.start.attempt <= spec.retries
            and self._accepting
            and not state.removed
        ):
            delay = min(spec.retry_delay * 2 ** (act.start.attempt - 1), MAX_RETRY_DELAY)
            nxt = Start(act.start.slot, act.start.attempt + 1, f"retry after {result.status}")
            logger.info(
                f"job {job_id!r}: attempt {nxt.attempt} in {delay:g}s after {result.status}"
            )
            state.pending += 1

            def retry() -> None:
                state.pending -= 1
                self._launch(state, nxt)
                self._pump(state)

            self._after(delay, retry)
        self._pump(state)

    def _pump(self, state: _JobState) -> None:
        """Start the queued or catch-up run once the job is free."""
        if state.busy or not self._accepting or state.removed:
            return
        if state.waiting is not None:
            start, state.waiting = state.waiting, None
            self._begin(state, start)
        elif state.backlog:
            slot = state.backlog.pop(0)
            self._begin(state, Start(slot, reason="catch-up (catchup: all)"))

    def _on_update(self, jobs: dict[str, JobSpec]) -> None:
        for job_id, state in list(self._states.items()):
            if job_id not in jobs:
                state.removed = True
                self._drop_waiting(state, "job removed by reload")
                if not state.active:
                    del self._states[job_id]
        for job_id, spec in jobs.items():
            existing = self._states.get(job_id)
            if existing is None:
                self._states[job_id] = _JobState(spec)
            else:
                existing.spec, existing.removed = spec, False

    def _on_drain(self) -> None:
        self._accepting = False
        for state in self._states.values():
            self._drop_waiting(state, "daemon is shutting down")

    def _drop_waiting(self, state: _JobState, reason: str) -> None:
        if state.waiting is not None:
            self._skip(state.spec.id, state.waiting.slot, reason, state.waiting.attempt)
            state.waiting = None
        while state.backlog:
            self._skip(state.spec.id, state.backlog.pop(0), reason)

    # ---- records --------------------------------------------------------------------
    def _skip(self, job_id: str, slot: datetime | None, reason: str, attempt: int = 1) -> None:
        self._records(RunRecord(new_run_id(), job_id, slot, "skipped", attempt, reason=reason))

    def _missed(self, job_id: str, slot: datetime, reason: str) -> None:
        self._records(RunRecord(new_run_id(), job_id, slot, "missed", reason=reason))

    def _record(self, job_id: str, run_id: str, start: Start, status: Any, reason: str) -> None:
        now = self._clock()
        self._records(
            RunRecord(run_id, job_id, start.slot, status, start.attempt, now, now, reason=reason)
        )

    def _records(self, rec: RunRecord) -> None:
        try:
            self._recorder.record(rec)
        except Exception as exc:
            logger.opt(exception=exc).error(f"could not record {rec.summary()}: {exc!r}")


def _task_start(launched: datetime, slot: datetime | None) -> datetime:
    """A run launched ahead of its slot (LAUNCH_LEAD) starts its task at the slot."""
    return max(launched, slot) if slot is not None else launched


def _describe(result: RunResult) -> str:
    text: str = result.status
    if result.exit_code is not None:
        text += f", exit code {result.exit_code}"
    if result.signal:
        text += f", signal {result.signal}"
    if result.error:
        text += f", {result.error}"
    return text + f", {result.duration:.3f}s"
