"""Daemon side of isolated runs: launch through the fork server, stream output, collect results.

The daemon has threads, so it never forks: :meth:`Runner.start` execs
:mod:`scheduler.launcher` once and :meth:`Runner.launch` sends it one framed
request per run, with the write ends of three pipes (stdout, stderr, status)
attached as ``SCM_RIGHTS``. The daemon keeps only the read ends, so end of
file on all three proves that the run's supervisor and every process it
started are gone; only then does the run resolve, after its last line.

One reader thread (:mod:`scheduler.runio`) drains every run's pipes: output
goes line by line to ``on_line(job_id, run_id, stream, text)``, supervisor
events (timeout, escalation) to ``on_event(job_id, run_id, message)``.
Callbacks run in the reader thread and must be quick; an exception in one is
logged and dropped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from scheduler import confine
from scheduler.cgroups import Cgroups, needs_cgroup
from scheduler.cgroups import detect as detect_cgroups
from scheduler.child import ctx_to_json
from scheduler.launcher import default_env, pack, spawn
from scheduler.runio import (
    LINE_LIMIT,
    OUTPUT_LINGER,
    STREAMS,
    LauncherConn,
    OnEvent,
    OnLine,
    Reader,
    RunIO,
    safely,
)
from scheduler.types import RunContext, RunResult

__all__ = ["LINE_LIMIT", "OnEvent", "OnLine", "RunHandle", "RunRequest", "Runner"]

log = logging.getLogger("schedd.runner")

#: How long :meth:`Runner.start` waits for the launcher's ready message.
START_TIMEOUT = 15.0


def _no_event(job_id: str, run_id: str, message: str) -> None:
    log.info("%s/%s: %s", job_id, run_id, message)


@dataclass(frozen=True, slots=True)
class RunRequest:
    """One run to launch. ``env`` is the task's whole environment (nothing is inherited).

    ``timeout`` counts from the task's start; ``kill_grace`` is the time
    between SIGTERM and SIGKILL when a run is ended for any reason.
    ``not_before`` (epoch seconds) lets a run be launched a little ahead of its
    slot: the process is forked and the target imported at once, and the task
    function is called at ``not_before``, so isolation costs no lateness.
    ``env`` and ``secrets`` stay out of ``repr()``: a log line must not show them.
    ``limits`` and ``run_as`` are enforced in the task process (:mod:`scheduler.confine`).
    """

    run_id: str
    job_id: str
    target: str
    ctx: RunContext
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    cwd: str | None = None
    timeout: float | None = None
    kill_grace: float = 10.0
    not_before: float | None = None
    #: Values masked as ``***`` in the run's output lines and error (see scheduler.redact).
    secrets: tuple[str, ...] = field(default=(), repr=False)
    limits: confine.Limits | None = None
    run_as: confine.RunAs | None = None


class RunHandle:
    """A launched run. ``pid`` (task) and ``task_started`` (wall time) fill in as reported.

    ``reason`` says why a ``killed`` run was ended (the cancel reason, or the
    launcher or supervisor dying). ``cancel_reason`` and :meth:`resolve` belong
    to the runner.
    """

    def __init__(self, runner: Runner, req: RunRequest) -> None:
        self.run_id = req.run_id
        self.job_id = req.job_id
        self.request = req
        self.started_at = datetime.now(UTC)
        self.pid: int | None = None
        self.task_started: float | None = None
        self.reason: str | None = None
        self.cancel_reason: str | None = None
        self._runner = runner
        self._result: RunResult | None = None
        self._done = threading.Event()
        self._callbacks: list[Callable[[RunResult], None]] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<RunHandle {self.job_id}/{self.run_id} pid={self.pid} result={self._result}>"

    @property
    def result(self) -> RunResult | None:
        return self._result

    def cancel(self, reason: str = "cancelled") -> None:
        """End the run's whole tree: SIGTERM, ``kill_grace``, SIGKILL; outcome ``killed``."""
        self._runner._cancel(self, reason)

    def wait(self, timeout: float | None = None) -> RunResult | None:
        self._done.wait(timeout)
        return self._result

    def add_done_callback(self, fn: Callable[[RunResult], None]) -> None:
        """Call ``fn`` once with the result: from the reader thread, or now if already done."""
        with self._lock:
            if self._result is None:
                self._callbacks.append(fn)
                return
        safely(fn, self._result)

    def resolve(self, result: RunResult) -> None:
        with self._lock:
            if self._result is not None:
                return
            self._result = result
            callbacks, self._callbacks = self._callbacks, []
        self._done.set()
        for fn in callbacks:
            safely(fn, result)


class Runner:
    """Launches isolated runs and streams their output; one per daemon.

    ``preload`` names modules the launcher imports once (plugin modules), so
    children find them already imported. ``launcher_env`` replaces the
    launcher's minimal default environment (see :func:`~scheduler.launcher.default_env`).
    ``cgroups`` is where runs with memory/process limits get their cgroup:
    ``"auto"`` detects it once (:func:`cgroups_in_use`), None means rlimits only.
    If the launcher dies, its runs resolve as ``killed`` and the next
    :meth:`launch` starts a new one (logged). Callbacks must not call :meth:`close`.
    """

    def __init__(
        self,
        *,
        on_line: OnLine,
        on_event: OnEvent = _no_event,
        preload: Sequence[str] = (),
        launcher_env: Mapping[str, str] | None = None,
        cgroups: Cgroups | str | None = "auto",
    ) -> None:
        self._preload = list(preload)
        self._cgroups = cgroups
        self._launcher_env = dict(default_env() if launcher_env is None else launcher_env)
        self._lock = threading.Lock()
        self._ios: dict[str, RunIO] = {}  # unresolved runs
        self._reader = Reader(self._lock, self._ios, on_line, on_event)
        self._launcher: LauncherConn | None = None
        self._started = self._closing = False

    @property
    def launcher_pid(self) -> int | None:
        launcher = self._launcher
        return None if launcher is None or launcher.dead else launcher.pid

    def start(self) -> None:
        """Exec the launcher and start the reader; raise if the launcher does not come up."""
        _ = self.cgroups  # before the launcher exists: detection may move this process (v2)
        with self._lock:
            if self._started:
                return
            self._started = True
            self._reader.thread.start()
            launcher = self._spawn_launcher()
        deadline = time.monotonic() + START_TIMEOUT
        while not launcher.ready.wait(0.05):
            if launcher.dead or launcher.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"schedd launcher failed to start (exit {launcher.proc.poll()})")

    @property
    def cgroups(self) -> Cgroups | None:
        if isinstance(self._cgroups, str):
            self._cgroups = cgroups_in_use()[0]
        return self._cgroups

    def launch(self, req: RunRequest) -> RunHandle:
        """Send one run to the launcher and return at once; thread-safe."""
        handle = RunHandle(self, req)
        extra: dict[str, Any] = {}
        if req.limits is not None:
            extra["limits"] = limits = req.limits.to_json()
            cg = self.cgroups if needs_cgroup(limits) else None
            if cg is not None:
                extra["cgroups"] = cg.to_json()
        if req.run_as is not None:
            extra["run_as"] = req.run_as.to_json()
        msg = pack(
            {
                **extra,
                "op": "run",
                "nfds": 3,
                "run_id": req.run_id,
                "target": req.target,
                "ctx": ctx_to_json(req.ctx),
                "env": dict(req.env),
                "cwd": req.cwd,
                "timeout": req.timeout,
                "kill_grace": req.kill_grace,
                "not_before": req.not_before,
            }
        )
        with self._lock:
            if self._closing or not self._started:
                raise RuntimeError("runner is not running")
            if req.run_id in self._ios:
                raise ValueError(f"run {req.run_id!r} is already running")
            pipes = [os.pipe2(os.O_CLOEXEC) for _ in STREAMS]
            writes = [w for _, w in pipes]
            try:
                launcher = self._send(msg, writes)
            except BaseException:
                for r, _ in pipes:
                    os.close(r)
                raise
            finally:
                for w in writes:
                    os.close(w)
            for r, _ in pipes:
                os.set_blocking(r, False)
            io = self._ios[req.run_id] = RunIO(handle, [r for r, _ in pipes], launcher)
            self._reader.add(io)
        return handle

    def running(self) -> list[RunHandle]:
        return [io.handle for io in self._reader.snapshot()]

    def close(self, grace: float = 10.0, reason: str = "shutdown") -> None:
        """End every run (SIGTERM tree, ``grace``, SIGKILL), then the launcher; idempotent."""
        if threading.current_thread() is self._reader.thread:
            raise RuntimeError("Runner.close() cannot be called from a runner callback")
        with self._lock:
            if self._closing:
                return
            self._closing = True
            handles = [io.handle for io in self._ios.values()]
            for h in handles:
                h.cancel_reason = h.cancel_reason or reason
            self._control({"op": "cancel", "run_id": None})
        deadline = time.monotonic() + grace
        for h in handles:
            h.wait(max(0.0, deadline - time.monotonic()))
        if any(h.result is None for h in handles):
            with self._lock:
                self._control({"op": "hurry", "run_id": None})
            deadline = time.monotonic() + 5.0
            for h in handles:
                h.wait(max(0.0, deadline - time.monotonic()))
        launcher = self._launcher
        if launcher is not None:
            with self._lock:
                launcher.closing = True
                if not launcher.dead:
                    with contextlib.suppress(OSError):
                        launcher.sock.shutdown(socket.SHUT_WR)  # EOF: the launcher exits
            try:
                launcher.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                launcher.proc.kill()
                launcher.proc.wait()
        deadline = time.monotonic() + OUTPUT_LINGER + 1.0
        for h in self.running():
            h.wait(max(0.0, deadline - time.monotonic()))
        self._reader.stop()

    # -- launcher management (called with self._lock held) ------------------------------

    def _spawn_launcher(self) -> LauncherConn:
        self._launcher = LauncherConn(*spawn(self._preload, self._launcher_env))
        self._reader.add(self._launcher)
        return self._launcher

    def _send(self, data: bytes, fds: list[int]) -> LauncherConn:
        """Send to the live launcher, restarting it once if it has died."""
        for attempt in (1, 2):
            launcher = self._launcher
            if launcher is None or launcher.dead:
                if launcher is not None:
                    log.warning("schedd launcher (pid %s) died; starting another", launcher.pid)
                launcher = self._spawn_launcher()
            try:
                sent = socket.send_fds(launcher.sock, [data], fds, socket.MSG_NOSIGNAL)
                if sent < len(data):
                    launcher.sock.sendall(data[sent:], socket.MSG_NOSIGNAL)
                return launcher
            except OSError:
                launcher.dead = True  # the reader closes its socket on EOF
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _control(self, msg: Mapping[str, Any], launcher: LauncherConn | None = None) -> None:
        launcher = launcher or self._launcher
        if launcher is None or launcher.dead:
            return
        try:
            launcher.sock.sendall(pack(msg), socket.MSG_NOSIGNAL)
        except OSError:
            launcher.dead = True

    def _cancel(self, handle: RunHandle, reason: str) -> None:
        with self._lock:
            io = self._ios.get(handle.run_id)
            if io is None or handle.result is not None:
                return
            handle.cancel_reason = handle.cancel_reason or reason
            self._control({"op": "cancel", "run_id": handle.run_id}, io.launcher)


_detected: tuple[Cgroups | None, str] | None = None


def cgroups_in_use() -> tuple[Cgroups | None, str]:
    """The cgroup mechanism of this process's runs, detected once, and a sentence saying so."""
    global _detected
    if _detected is None:
        _detected = detect_cgroups()
    return _detected
