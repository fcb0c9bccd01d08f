"""The daemon: owns the state dir, the clock, the dispatcher and the runner.

Foreground only (systemd style). Start-up order matters: the runner's fork
server is exec'd before any thread exists, and the config is validated
completely before anything is locked, logged or launched, so a bad file
changes nothing.

Signals are turned into events for the main thread: SIGTERM/SIGINT drain and
exit 0, SIGHUP reloads (a bad new file leaves the running config untouched,
as nginx does).
"""

from __future__ import annotations

import fcntl
import os
import queue
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from scheduler.errors import ConfigError, ScheddError

if TYPE_CHECKING:
    from scheduler.config import Config, JobSpec
    from scheduler.plugins import Registry

LOCK_FILE = "schedd.lock"
#: How long SIGTERM waits for running runs before ending their process trees.
DEFAULT_SHUTDOWN_GRACE = 30.0
#: Variables a run inherits from the daemon's environment; everything else is
#: dropped so the daemon's own secrets never reach a job it did not name them for.
BASE_ENV_KEYS = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "PYTHONPATH",
    "VIRTUAL_ENV",
)
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/schedd")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "schedd"


def resolve_state_dir(explicit: str | None, config: Config) -> Path:
    if explicit:
        return Path(explicit).expanduser().resolve()
    if config.state_dir is not None:
        return config.state_dir
    return default_state_dir()


def base_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    env = {k: v for k, v in environ.items() if k in BASE_ENV_KEYS or k.startswith("LC_")}
    env.setdefault("PATH", DEFAULT_PATH)
    return env


def builtin_task_modules(registry: Registry) -> list[str]:
    """Task modules the launcher may import ahead of time.

    Only schedd's own tasks: a third-party module that hangs or crashes at
    import must cost its own runs, never the launcher every run goes through.
    """
    own = {p.name for p in registry.plugins if p.distribution == "schedd" and not p.error}
    return sorted(
        {t.target.partition(":")[0] for t in registry.task_types.values() if t.plugin in own}
    )


class StateDirLock:
    """An exclusive flock on the state dir; the kernel drops it when we die,
    so a stale lock file never blocks a restart and is never used to signal anyone."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ScheddError(
                f"another schedd daemon (pid {holder}) is using {self.path.parent}; "
                "stop it first or pass a different --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


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
        self._events: queue.SimpleQueue[str] = queue.SimpleQueue()

    # ---- lifecycle ----------------------------------------------------------------
    def run(self) -> int:
        from scheduler.apsched import Clock
        from scheduler.dispatch import Dispatcher
        from scheduler.hooks import HookCaller
        from scheduler.logs import JobLogs, setup_daemon_logging
        from scheduler.records import LogRecorder
        from scheduler.runner import Runner

        old_umask = os.umask(0o077)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        finally:
            os.umask(old_umask)
        lock = StateDirLock(self.state_dir)
        lock.acquire()
        try:
            setup_daemon_logging(self.state_dir, echo=self.echo)
            self.job_logs = JobLogs(self.state_dir / "logs")
            self._apply_log_policies(self.config.jobs)
            self.runner = Runner(
                on_line=self.job_logs.write,
                on_event=self._on_run_event,
                preload=builtin_task_modules(self.registry),
            )
            self.runner.start()
            self.hooks = HookCaller(self.pm)
            self.hooks.start()
            self.dispatcher = Dispatcher(
                self.runner,
                self.registry.task_types,
                LogRecorder(),
                job_logs=self.job_logs,
                hooks=self.hooks,
                base_env=base_env(),
            )
            self.clock = Clock(self.dispatcher, self.dispatcher.missed)
            for spec in self.config.jobs.values():
                self.clock.add(spec)
            self.dispatcher.start(self.config.jobs)
            self._install_signals()
            self.clock.start()
            enabled = sum(1 for j in self.config.jobs.values() if j.enabled)
            logger.info(
                f"schedd {os.getpid()} started: {self.config.path}, {len(self.config.jobs)} jobs "
                f"({enabled} enabled), state dir {self.state_dir}"
            )
            return self._main_loop()
        finally:
            lock.release()

    def _main_loop(self) -> int:
        idle_check = time.monotonic()
        while True:
            try:
                event = self._events.get(timeout=60)
            except queue.Empty:
                event = "tick"
            if event == "stop":
                self._shutdown()
                return 0
            if event == "reload":
                self.reload()
            if time.monotonic() - idle_check >= 60:
                idle_check = time.monotonic()
                self.job_logs.close_idle()

    def request(self, event: str) -> None:
        """Ask the main thread to ``stop`` or ``reload`` (signal handlers and control use it)."""
        self._events.put(event)

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_signal(signum: int, _frame: Any) -> None:
            self._events.put("reload" if signum == signal.SIGHUP else "stop")

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_signal)

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
        logger.info("schedd stopped")

    # ---- reload -------------------------------------------------------------------
    def reload(self) -> ReloadResult:
        from scheduler.config import load_config

        logger.info(f"reloading {self.config.path}")
        try:
            new = load_config(self.config.path, self.registry)
        except ConfigError as exc:
            errors = [str(p) for p in exc.problems]
            for line in errors:
                logger.error(line)
            logger.error("reload rejected: still running the previous config unchanged")
            self.last_reload = ReloadResult(datetime.now(UTC), False, errors)
            return self.last_reload
        old = self.config.jobs
        added = [j for j in new.jobs if j not in old]
        removed = [j for j in old if j not in new.jobs]
        changed = [j for j in new.jobs if j in old and new.jobs[j] != old[j]]
        for job_id in removed:
            self.clock.remove(job_id)
        for job_id in changed:
            if _schedule_key(new.jobs[job_id]) != _schedule_key(old[job_id]):
                self.clock.remove(job_id)
                self.clock.add(new.jobs[job_id])
        for job_id in added:
            self.clock.add(new.jobs[job_id])
        self._apply_log_policies(new.jobs)
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

    def _apply_log_policies(self, jobs: Mapping[str, JobSpec]) -> None:
        from scheduler.logs import JobLogPolicy

        for spec in jobs.values():
            self.job_logs.set_policy(spec.id, JobLogPolicy(spec.log_rotation, spec.log_retention))

    def _on_run_event(self, job_id: str, run_id: str, message: str) -> None:
        logger.info(f"job {job_id!r} run {run_id}: {message}")
        self.job_logs.note(job_id, run_id, message)
