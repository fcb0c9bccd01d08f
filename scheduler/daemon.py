"""The daemon: owns the state dir, the clock, the dispatcher, the runner and the ledger.

Foreground only (systemd style). Start-up order matters: the config is
validated completely before anything is locked, logged or launched, so a bad
file changes nothing; the runner's fork server is exec'd before APScheduler's
threads start; runs a dead predecessor left behind are ended and recorded
``lost`` before anything new runs.

Signals and control commands become events for the main thread: SIGTERM/
SIGINT drain and exit 0, SIGHUP reloads (a bad new file leaves the running
config untouched, as nginx does).
"""

from __future__ import annotations

import gc
import os
import queue
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from scheduler.errors import ConfigError, ScheddError
from scheduler.statedir import (
    StateDirLock,
    base_env,
    default_state_dir,
    make_private_dir,
    resolve_state_dir,
)

if TYPE_CHECKING:
    from scheduler.config import Config, JobSpec
    from scheduler.ledger import Ledger
    from scheduler.plugins import Registry

#: How long SIGTERM waits for running runs before ending their process trees.
DEFAULT_SHUTDOWN_GRACE = 30.0

__all__ = ["Daemon", "ReloadResult", "base_env", "default_state_dir", "resolve_state_dir"]


def builtin_task_modules(registry: Registry) -> list[str]:
    """Task modules the launcher may import ahead of time.

    Only schedd's own tasks: a third-party module that hangs or crashes at
    import must cost its own runs, never the launcher every run goes through.
    """
    own = {p.name for p in registry.plugins if p.distribution == "schedd" and not p.error}
    return sorted(
        {t.target.partition(":")[0] for t in registry.task_types.values() if t.plugin in own}
    )


@dataclass
class ReloadResult:
    at: datetime
    ok: bool
    errors: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)


def _schedule_key(spec: JobSpec) -> tuple[Any, ...]:
    return (spec.trigger_kind, spec.trigger_expr, spec.timezone, spec.enabled, spec.catchup_window)


class Daemon:
    def __init__(
        self,
        config: Config,
        registry: Registry,
        state_dir: Path,
        *,
        pm: Any = None,
        shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
        echo: bool = True,
    ) -> None:
        self.config = config
        self.registry = registry
        self.state_dir = state_dir
        self.pm = pm
        self.shutdown_grace = shutdown_grace
        self.echo = echo
        self.started_at = datetime.now(UTC)
        self.last_reload: ReloadResult | None = None
        self.ledger: Ledger | None = None
        self.paused: set[str] = set()
        self._pause_lock = threading.Lock()
        self._events: queue.SimpleQueue[tuple[str, Future[Any] | None]] = queue.SimpleQueue()
        self._restore_signals: Callable[[], None] | None = None

    # ---- lifecycle ----------------------------------------------------------------
    def run(self) -> int:
        from scheduler.apsched import Clock
        from scheduler.control_api import DaemonControl
        from scheduler.control_server import ControlServer
        from scheduler.dispatch import Dispatcher
        from scheduler.hooks import HookCaller
        from scheduler.ledger import LEDGER_FILE, Ledger
        from scheduler.logs import JobLogs, setup_daemon_logging
        from scheduler.records import LogRecorder, TeeRecorder
        from scheduler.runner import Runner, cgroups_in_use

        make_private_dir(self.state_dir)
        lock = StateDirLock(self.state_dir)
        lock.acquire()
        control = None
        gc.disable()  # start-up builds only long-lived state (per job); frozen below
        try:
            setup_daemon_logging(self.state_dir, echo=self.echo)
            self.ledger = ledger = Ledger.open(self.state_dir / LEDGER_FILE)
            lost = self._recover(ledger)
            self.paused = ledger.paused() & set(self.config.jobs)
            self.job_logs = JobLogs(self.state_dir / "logs")
            self._apply_job_policies(self.config.jobs)
            cgroups, how = cgroups_in_use()  # before the launcher: it must inherit the result
            logger.info(f"resource limits: {how}")
            self._sweep_cgroups(cgroups)
            self.runner = Runner(
                on_line=self.job_logs.write,
                on_event=self._on_run_event,
                preload=builtin_task_modules(self.registry),
                cgroups=cgroups,
            )
            try:
                self.runner.start()
            except (OSError, RuntimeError) as exc:
                raise ScheddError(f"could not start the run launcher: {exc}") from exc
            self.hooks = HookCaller(self.pm)
            self.hooks.start()
            self.dispatcher = Dispatcher(
                self.runner,
                self.registry.task_types,
                TeeRecorder(ledger, LogRecorder()),
                job_logs=self.job_logs,
                hooks=self.hooks,
                base_env=base_env(),
            )
            self.clock = Clock(self.dispatcher, self.dispatcher.missed)
            last_slots = ledger.last_slots()
            self.clock.load(
                (s for s in self.config.jobs.values() if s.id not in self.paused), last_slots
            )
            self.dispatcher.start(self.config.jobs)
            self._install_signals()
            self._rerun_lost(lost)  # before the clock: a lost slot goes first
            self.clock.start()
            control = ControlServer(self.state_dir / "control.sock", DaemonControl(self))
            control.start()
            for warning in self.config.warnings:  # e.g. an env_file others may read
                logger.warning(str(warning))
            enabled = sum(1 for j in self.config.jobs.values() if j.enabled)
            logger.info(
                f"schedd {os.getpid()} started: {self.config.path}, {len(self.config.jobs)} jobs "
                f"({enabled} enabled, {len(self.paused)} paused), state dir {self.state_dir}"
            )
            gc.freeze()  # start-up state lives as long as the daemon: collections skip it
            gc.enable()
            return self._main_loop()
        finally:
            gc.enable()
            if self._restore_signals is not None:
                self._restore_signals()
                self._restore_signals = None
            if control is not None:
                control.close()
            if self.ledger is not None:
                self.ledger.close()
            lock.release()

    def _recover(self, ledger: Ledger) -> list[Any]:
        """Record runs a dead daemon left ``running`` as ``lost``; end their survivors."""
        from scheduler.records import NODE
        from scheduler.recovery import end_run_processes

        lost = ledger.recover(NODE)
        if lost:
            ids = [x.record.run_id for x in lost]
            logger.warning(f"{len(lost)} run(s) were running when the last daemon died: lost")
            for x in lost:
                logger.warning(x.record.summary())
            end_run_processes(ids)
        return lost

    @staticmethod
    def _sweep_cgroups(cgroups: Any) -> None:
        """Remove the empty per-run cgroups a crashed daemon left behind."""
        from scheduler.cgroups import sweep

        if cgroups is not None and (n := sweep(cgroups)):
            logger.info(f"removed {n} stale run cgroup(s) left by an earlier daemon")

    def _rerun_lost(self, lost: list[Any]) -> None:
        """Re-run each lost slot once for jobs with ``rerun_lost: true``.

        A slot that was already lost twice (the run and its re-run) is not
        tried again, so a job that kills the daemon every time cannot loop.
        """
        assert self.ledger is not None
        for x in lost:
            rec = x.record
            spec = self.config.jobs.get(rec.job)
            if spec is None or not spec.rerun_lost or rec.scheduled_for is None:
                continue
            history = self.ledger.history(rec.job, limit=1000, status="lost")
            times = Counter(h["scheduled_for"] for h in history)
            slot_text = rec.scheduled_for.isoformat()
            if max((n for s, n in times.items() if _same_instant(s, slot_text)), default=0) > 1:
                logger.warning(f"job {rec.job!r}: slot {slot_text} was lost twice; not re-run")
                continue
            answer = self.dispatcher.start_slot(
                rec.job, rec.scheduled_for, f"rerun of lost run {rec.run_id}", rec.attempt + 1
            )
            logger.info(f"job {rec.job!r}: re-running lost slot {slot_text}: {answer['message']}")

    def _main_loop(self) -> int:
        last_tick = time.monotonic()
        while True:
            try:
                kind, reply = self._events.get(timeout=60)
            except queue.Empty:
                kind, reply = "tick", None
            if kind == "stop":
                self._shutdown()
                return 0
            if kind == "reload":
                result = self.reload()
                if reply is not None:
                    reply.set_result(result)
            now = time.monotonic()
            if now - last_tick >= 60:
                last_tick = now
                self.job_logs.close_idle()

    def request(self, event: str) -> None:
        """Ask the main thread to ``stop`` or ``reload`` (signal handlers use it)."""
        self._events.put((event, None))

    def ask_main(self, event: str, timeout: float = 60.0) -> Any:
        """Run ``event`` on the main thread and wait for its result (control commands)."""
        reply: Future[Any] = Future()
        self._events.put((event, reply))
        return reply.result(timeout)

    def set_paused(self, jobs: list[str] | None, paused: bool) -> dict[str, Any]:
        """Pause or resume jobs (None: all). Persisted, so a pause survives a restart."""
        assert self.ledger is not None
        ids = list(self.config.jobs) if jobs is None else jobs
        unknown = [j for j in ids if j not in self.config.jobs]
        if unknown:
            raise ScheddError(f"no job {unknown[0]!r} in the running config")
        changed, unchanged = [], []
        with self._pause_lock:
            for job_id in ids:
                if (job_id in self.paused) == paused:
                    unchanged.append(job_id)
                    continue
                self.ledger.set_paused(job_id, paused)
                if paused:
                    self.paused.add(job_id)
                    self.clock.remove(job_id)
                else:
                    self.paused.discard(job_id)
                    self.clock.add(self.config.jobs[job_id])  # from now: no catch-up
                changed.append(job_id)
        verb = "paused" if paused else "resumed"
        if changed:
            logger.info(f"{verb}: {', '.join(changed)}")
        return {"changed": changed, "unchanged": unchanged}

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_signal(signum: int, _frame: Any) -> None:
            self._events.put(("reload" if signum == signal.SIGHUP else "stop", None))

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_signal)
        self._wake_on_signals()

    def _wake_on_signals(self) -> None:
        """Wake the main loop whichever thread a signal lands on.

        The kernel may deliver a signal sent to the process to any of its
        threads. Python runs the handler on the main thread, but only once
        that thread executes bytecode again, and the main loop sleeps in a
        queue wait that only a signal delivered to the main thread itself
        interrupts: without this, a SIGHUP or SIGTERM could wait for the
        loop's 60 s tick (measured: 6 of 40 SIGHUPs took longer than 5 s).
        The C-level handler writes to the wakeup fd from whatever thread it
        runs on; a small thread turns that into a no-op event, and the main
        thread, woken, runs the handler.
        """
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(read_fd, True)
        previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

        def pump() -> None:
            try:
                while os.read(read_fd, 64):
                    self._events.put(("wake", None))
            except OSError:
                pass
            finally:
                os.close(read_fd)

        def restore() -> None:
            signal.set_wakeup_fd(previous)
            os.close(write_fd)  # the pump reads EOF and ends

        threading.Thread(target=pump, name="schedd-signals", daemon=True).start()
        self._restore_signals = restore

    def _shutdown(self) -> None:
        logger.info("shutting down: no new runs; waiting for running runs to finish")
        self.clock.stop()
        running = self.dispatcher.running()
        if running and not self.dispatcher.drain(self.shutdown_grace):
            left = len(self.dispatcher.running())
            logger.warning(f"shutdown grace {self.shutdown_grace:g}s expired: ending {left} run(s)")
        elif not running:
            self.dispatcher.drain(0)
        grace = max((j.kill_grace for j in self.config.jobs.values()), default=10.0)
        self.runner.close(grace)
        self.dispatcher.drain(5)
        self.dispatcher.stop()
        self.hooks.stop()
        self.job_logs.close()
        if self.ledger is not None:
            self.ledger.flush(5)
        logger.info("schedd stopped")

    # ---- reload -------------------------------------------------------------------
    def reload(self) -> ReloadResult:
        from scheduler.config import load_config

        logger.info(f"reloading {self.config.path}")
        try:
            new = load_config(self.config.path, self.registry)
        except ConfigError as exc:
            errors = [str(p) for p in exc.problems]
        except Exception as exc:  # a loader bug must not take the running schedule down
            logger.opt(exception=exc).error("reload failed inside schedd (a bug: please report)")
            errors = [f"{self.config.path}: internal error while loading: {type(exc).__name__}"]
        else:
            errors = []
        if errors:
            for line in errors:
                logger.error(line)
            logger.error("reload rejected: still running the previous config unchanged")
            self.last_reload = ReloadResult(datetime.now(UTC), False, errors)
            return self.last_reload
        for warning in new.warnings:
            logger.warning(str(warning))
        old = self.config.jobs
        added = [j for j in new.jobs if j not in old]
        removed = [j for j in old if j not in new.jobs]
        changed = [j for j in new.jobs if j in old and new.jobs[j] != old[j]]
        for job_id in removed:
            self.clock.remove(job_id)
        for job_id in changed:
            if _schedule_key(new.jobs[job_id]) != _schedule_key(old[job_id]):
                self.clock.remove(job_id)
                if job_id not in self.paused:
                    self.clock.add(new.jobs[job_id])
        for job_id in added:
            if job_id not in self.paused:
                self.clock.add(new.jobs[job_id])
        self._apply_job_policies(new.jobs)
        self.dispatcher.update_jobs(new.jobs)
        self.config = new
        self.last_reload = ReloadResult(datetime.now(UTC), True, [], added, removed, changed)
        logger.info(
            f"reload applied: {len(added)} added, {len(removed)} removed, {len(changed)} changed"
            + "".join(
                f"; {k}: {', '.join(v)}"
                for k, v in (("added", added), ("removed", removed), ("changed", changed))
                if v
            )
        )
        return self.last_reload

    def _apply_job_policies(self, jobs: Mapping[str, JobSpec]) -> None:
        """Log rotation per job, and history retention (pruned in small chunks on the
        ledger's writer thread, never on the scheduling path)."""
        from scheduler.ledger_writer import Retention
        from scheduler.logs import JobLogPolicy

        retentions: dict[tuple[int, float], Retention] = {}  # jobs share equal settings
        policies: dict[tuple[str, int], JobLogPolicy] = {}
        for spec in jobs.values():
            if self.ledger is not None:
                key = (spec.history_limit, spec.history_max_age)
                if key not in retentions:
                    retentions[key] = Retention(*key)
                self.ledger.set_retention(spec.id, retentions[key])
            rotation = (spec.log_rotation, spec.log_retention)
            if rotation not in policies:
                policies[rotation] = JobLogPolicy(*rotation)
            self.job_logs.set_policy(spec.id, policies[rotation])

    def _on_run_event(self, job_id: str, run_id: str, message: str) -> None:
        logger.info(f"job {job_id!r} run {run_id}: {message}")
        self.job_logs.note(job_id, run_id, message)


def _same_instant(a: str | None, b: str) -> bool:
    if a is None:
        return False
    try:
        return datetime.fromisoformat(a) == datetime.fromisoformat(b)
    except ValueError:
        return False
