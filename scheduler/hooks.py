"""Call run-lifecycle hooks without letting them touch scheduling.

Hooks are plugin code running in the daemon, so each call is handed to a
worker thread through a bounded queue: the caller never waits. A call that
raises is logged; one that runs past the deadline is abandoned (a thread
cannot be killed) and a fresh worker takes over. After too many abandoned
workers hooks are switched off, with an error in the log, rather than let a
hanging plugin pile up threads.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loguru import logger

if TYPE_CHECKING:
    import pluggy

    from scheduler.types import RunInfo, RunResult

HOOK_DEADLINE = 5.0
QUEUE_LIMIT = 10_000
MAX_ABANDONED = 4


class HookCaller:
    def __init__(self, pm: pluggy.PluginManager | None, *, deadline: float = HOOK_DEADLINE) -> None:
        self._pm = pm
        self._deadline = deadline
        self._queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue(QUEUE_LIMIT)
        self._current: tuple[str, float] | None = None  # (hook, started) of the busy worker
        self._lock = threading.Lock()
        self._abandoned = 0
        self._disabled = pm is None or not self._has_impls(pm)
        self._worker: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._stopping = threading.Event()
        self.dropped = 0

    @staticmethod
    def _has_impls(pm: pluggy.PluginManager) -> bool:
        hooks = (pm.hook.schedd_run_started, pm.hook.schedd_run_finished)
        return any(h.get_hookimpls() for h in hooks)

    def start(self) -> None:
        if self._disabled:
            return
        self._spawn_worker()
        self._watchdog = threading.Thread(target=self._watch, name="schedd-hook-watch", daemon=True)
        self._watchdog.start()

    def started(self, run: RunInfo) -> None:
        self._submit("schedd_run_started", {"run": run})

    def finished(self, run: RunInfo, result: RunResult) -> None:
        self._submit("schedd_run_finished", {"run": run, "result": result})

    def stop(self) -> None:
        self._stopping.set()
        if self._worker is not None:
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)

    def _submit(self, hook: str, kwargs: dict[str, Any]) -> None:
        if self._disabled:
            return
        try:
            self._queue.put_nowait((hook, kwargs))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.error(f"lifecycle hook queue full: {self.dropped} hook call(s) dropped")

    def _spawn_worker(self) -> None:
        self._worker = threading.Thread(
            target=self._work, args=(self._queue,), name="schedd-hooks", daemon=True
        )
        self._worker.start()

    def _work(self, q: queue.Queue[tuple[str, dict[str, Any]] | None]) -> None:
        assert self._pm is not None
        me = threading.current_thread()
        while True:
            item = q.get()
            if item is None or self._worker is not me:
                # Stopped, or this worker was abandoned: a new one owns the queue.
                if item is not None:
                    q.put(item)
                return
            hook, kwargs = item
            with self._lock:
                self._current = (hook, time.monotonic())
            caller: Callable[..., Any] = getattr(self._pm.hook, hook)
            try:
                caller(**kwargs)
            except Exception as exc:
                logger.opt(exception=exc).error(f"lifecycle hook {hook} raised: {exc!r}")
            with self._lock:
                if self._worker is not me:
                    return
                self._current = None

    def _watch(self) -> None:
        while not self._stopping.wait(min(1.0, self._deadline / 2)):
            with self._lock:
                current = self._current
                if current is None or time.monotonic() - current[1] < self._deadline:
                    continue
                self._abandoned += 1
                self._current = None
                hook = current[0]
                if self._abandoned > MAX_ABANDONED:
                    self._disabled = True
                    self._worker = None
                    logger.error(
                        f"lifecycle hook {hook} hung past {self._deadline}s; "
                        f"{self._abandoned} hung calls so far: lifecycle hooks are now disabled"
                    )
                    return
                logger.error(
                    f"lifecycle hook {hook} still running after {self._deadline}s: abandoned it"
                )
                self._spawn_worker()
