"""Daemon side of isolated runs: launch through the fork server, stream output, collect results.

The daemon has threads, so it never forks: :meth:`Runner.start` execs
:mod:`scheduler.launcher` once and :meth:`Runner.launch` sends it one framed
request per run, with the write ends of three pipes (stdout, stderr, status)
attached as ``SCM_RIGHTS``. The daemon keeps only the read ends, so end of
file on all three proves that the run's supervisor and every process it
started are gone; only then does the run resolve, after its last line.

One reader thread drains every run's pipes through a selector: output is
split into lines (a line without a newline is cut every 64 KiB so memory
stays bounded), decoded as UTF-8 with ``errors="replace"`` and handed to
``on_line(job_id, run_id, stream, text)``. Supervisor events (timeout,
escalation) go to ``on_event(job_id, run_id, message)``. Callbacks run in the
reader thread and must be quick; an exception in one is logged and dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from scheduler.child import ctx_to_json
from scheduler.launcher import default_env, pack, spawn
from scheduler.types import RunContext, RunResult

log = logging.getLogger("schedd.runner")

#: Longest piece of a line delivered at once; longer lines arrive in pieces.
LINE_LIMIT = 64 * 1024
#: After a status pipe closes, how long stray holders may keep output pipes open.
OUTPUT_LINGER = 2.0
#: How long :meth:`Runner.start` waits for the launcher's ready message.
START_TIMEOUT = 15.0
_STREAMS = ("stdout", "stderr", "status")

OnLine = Callable[[str, str, str, str], None]
OnEvent = Callable[[str, str, str], None]


def _no_event(job_id: str, run_id: str, message: str) -> None:
    log.info("%s/%s: %s", job_id, run_id, message)


@dataclass(frozen=True, slots=True)
class RunRequest:
    """One run to launch. ``env`` is the task's whole environment (nothing is inherited).

    ``timeout`` counts from the task's start; ``kill_grace`` is the time
    between SIGTERM and SIGKILL when a run is ended for any reason.
    """

    run_id: str
    job_id: str
    target: str
    ctx: RunContext
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    timeout: float | None = None
    kill_grace: float = 10.0


class RunHandle:
    """A launched run. ``pid`` (task) and ``task_started`` (wall time) fill in as reported.

    ``reason`` says why a ``killed`` run was ended (the cancel reason, or the
    launcher or supervisor dying).
    """

    def __init__(self, runner: Runner, req: RunRequest) -> None:
        self.run_id = req.run_id
        self.job_id = req.job_id
        self.request = req
        self.started_at = datetime.now(UTC)
        self.pid: int | None = None
        self.task_started: float | None = None
        self.reason: str | None = None
        self._runner = runner
        self._cancel_reason: str | None = None
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
        _safely(fn, self._result)

    def _resolve(self, result: RunResult) -> None:
        with self._lock:
            if self._result is not None:
                return
            self._result = result
            callbacks, self._callbacks = self._callbacks, []
        self._done.set()
        for fn in callbacks:
            _safely(fn, result)


def _safely(fn: Callable[..., None], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("runner callback %r failed", fn)


class _Launcher:
    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.proc = proc
        self.sock = sock
        self.pid = proc.pid
        self.ready = threading.Event()
        self.dead = False
        self.closing = False
        self.buf = b""


class _RunIO:
    """Reader-thread state of one run: its open pipes, partial lines, status messages."""

    def __init__(self, handle: RunHandle, fds: list[int], launcher: _Launcher) -> None:
        self.handle = handle
        self.fds = dict(zip(fds, _STREAMS, strict=True))
        self.bufs = {fd: bytearray() for fd in fds}
        self.launcher = launcher
        self.result: dict[str, Any] | None = None
        self.lost: str | None = None
        self.status_eof = 0.0


class Runner:
    """Launches isolated runs and streams their output; one per daemon.

    ``preload`` names modules the launcher imports once (plugin modules), so
    children find them already imported. ``launcher_env`` replaces the
    launcher's minimal default environment (see :func:`~scheduler.launcher.default_env`).
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
    ) -> None:
        self._on_line = on_line
        self._on_event = on_event
        self._preload = list(preload)
        self._launcher_env = dict(default_env() if launcher_env is None else launcher_env)
        self._lock = threading.Lock()
        self._ios: dict[str, _RunIO] = {}  # unresolved runs
        self._pending: list[_RunIO | _Launcher] = []
        self._linger: list[_RunIO] = []  # reader only: status closed, output still open
        self._launcher: _Launcher | None = None
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread: threading.Thread | None = None
        self._closing = self._stopping = False

    @property
    def launcher_pid(self) -> int | None:
        launcher = self._launcher
        return None if launcher is None or launcher.dead else launcher.pid

    def start(self) -> None:
        """Exec the launcher and start the reader; raise if the launcher does not come up."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._read_loop, name="schedd-runner", daemon=True
            )
            self._thread.start()
            launcher = self._spawn_launcher()
        deadline = time.monotonic() + START_TIMEOUT
        while not launcher.ready.wait(0.05):
            if launcher.dead or launcher.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"schedd launcher failed to start (exit {launcher.proc.poll()})")

    def launch(self, req: RunRequest) -> RunHandle:
        """Send one run to the launcher and return at once; thread-safe."""
        handle = RunHandle(self, req)
        msg = pack(
            {
                "op": "run",
                "nfds": 3,
                "run_id": req.run_id,
                "target": req.target,
                "ctx": ctx_to_json(req.ctx),
                "env": dict(req.env),
                "cwd": req.cwd,
                "timeout": req.timeout,
                "kill_grace": req.kill_grace,
            }
        )
        with self._lock:
            if self._closing or self._thread is None:
                raise RuntimeError("runner is not running")
            if req.run_id in self._ios:
                raise ValueError(f"run {req.run_id!r} is already running")
            pipes = [os.pipe2(os.O_CLOEXEC) for _ in _STREAMS]
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
            io = self._ios[req.run_id] = _RunIO(handle, [r for r, _ in pipes], launcher)
            self._post(io)
        return handle

    def running(self) -> list[RunHandle]:
        return [io.handle for io in self._snapshot()]

    def close(self, grace: float = 10.0, reason: str = "shutdown") -> None:
        """End every run (SIGTERM tree, ``grace``, SIGKILL), then the launcher; idempotent."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("Runner.close() cannot be called from a runner callback")
        with self._lock:
            if self._closing:
                return
            self._closing = True
            handles = [io.handle for io in self._ios.values()]
            for h in handles:
                h._cancel_reason = h._cancel_reason or reason
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
        self._stopping = True
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(5.0)
        for io in self._snapshot():
            self._finish(io, lost="runner closed")
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- launcher management (called with self._lock held) ------------------------------

    def _spawn_launcher(self) -> _Launcher:
        self._launcher = _Launcher(*spawn(self._preload, self._launcher_env))
        self._post(self._launcher)
        return self._launcher

    def _send(self, data: bytes, fds: list[int]) -> _Launcher:
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

    def _control(self, msg: Mapping[str, Any], launcher: _Launcher | None = None) -> None:
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
            handle._cancel_reason = handle._cancel_reason or reason
            self._control({"op": "cancel", "run_id": handle.run_id}, io.launcher)

    def _post(self, item: _RunIO | _Launcher) -> None:
        self._pending.append(item)
        with contextlib.suppress(BlockingIOError):  # already woken
            os.write(self._wake_w, b"x")

    # -- reader thread -------------------------------------------------------------------

    def _read_loop(self) -> None:
        while not self._stopping:
            first = min((io.status_eof for io in self._linger), default=None)
            timeout = None if first is None else first + OUTPUT_LINGER - time.monotonic()
            for key, _ in self._sel.select(None if timeout is None else max(timeout, 0.01)):
                data = key.data
                try:
                    if data is None:
                        self._on_wake()
                    elif isinstance(data, _Launcher):
                        self._on_launcher(data)
                    else:
                        self._on_pipe(data, key.fd)
                except Exception:  # one bad message must not stop every run's output
                    log.exception("schedd runner: reader error")
            now = time.monotonic()
            for io in [io for io in self._linger if now - io.status_eof > OUTPUT_LINGER]:
                self._finish(io)

    def _snapshot(self) -> list[_RunIO]:
        with self._lock:  # launch() adds runs from other threads
            return list(self._ios.values())

    def _on_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        with self._lock:
            pending, self._pending = self._pending, []
        for item in pending:
            if isinstance(item, _Launcher):
                self._sel.register(item.sock, selectors.EVENT_READ, item)
            else:
                for fd in item.fds:
                    self._sel.register(fd, selectors.EVENT_READ, item)

    def _on_launcher(self, launcher: _Launcher) -> None:
        try:
            data = launcher.sock.recv(4096)
        except OSError:
            data = b""
        if data:
            *lines, launcher.buf = (launcher.buf + data).split(b"\n")
            for line in lines:
                msg = json.loads(line)
                for warning in msg.get("warnings", ()):
                    log.warning("schedd launcher: %s", warning)
                launcher.ready.set()
            return
        with self._lock:
            launcher.dead = True
            self._sel.unregister(launcher.sock)
            launcher.sock.close()
        if launcher.closing:
            return
        try:
            code: int | None = launcher.proc.wait(0.5)
        except subprocess.TimeoutExpired:
            code = None
        why = f"schedd launcher died unexpectedly (pid {launcher.pid}, exit status {code})"
        log.error("%s; the next launch starts a new one", why)
        for io in self._snapshot():
            if io.launcher is launcher and io.lost is None:
                io.lost = why

    def _on_pipe(self, io: _RunIO, fd: int) -> None:
        try:
            data = os.read(fd, LINE_LIMIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        stream = io.fds[fd]
        if stream == "status":
            self._on_status(io, io.bufs[fd], data)
        else:
            self._split(io, fd, stream, data)
        if not data:
            self._sel.unregister(fd)
            os.close(fd)
            del io.fds[fd]
            if not io.fds:
                self._finish(io)
            elif stream == "status":  # the supervisor is gone: stray writers get a deadline
                io.status_eof = time.monotonic()
                self._linger.append(io)

    def _split(self, io: _RunIO, fd: int, stream: str, data: bytes) -> None:
        buf = io.bufs[fd]
        buf += data
        pos, end = 0, len(buf)
        job, run = io.handle.job_id, io.handle.run_id
        while pos < end:
            nl = buf.find(b"\n", pos, pos + LINE_LIMIT + 1)
            if nl >= 0:
                cut, nxt = nl, nl + 1
            elif end - pos > LINE_LIMIT or (not data and end > pos):
                cut = nxt = _utf8_cut(buf, pos, min(end, pos + LINE_LIMIT))
            else:
                break
            _safely(self._on_line, job, run, stream, buf[pos:cut].decode("utf-8", "replace"))
            pos = nxt
        del buf[:pos]

    def _on_status(self, io: _RunIO, buf: bytearray, data: bytes) -> None:
        buf += data
        *lines, rest = bytes(buf).split(b"\n")
        buf[:] = rest
        h = io.handle
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            ev = msg.get("ev")
            if ev == "spawned":
                h.pid = msg["pid"]
            elif ev == "started":
                h.task_started = msg["t"]
            elif ev == "event":
                _safely(self._on_event, h.job_id, h.run_id, msg["msg"])
            elif ev == "result":
                io.result = msg

    def _finish(self, io: _RunIO, lost: str | None = None) -> None:
        """Resolve the run once its pipes are closed (or given up on)."""
        for fd in list(io.fds):
            if not self._stopping:
                self._sel.unregister(fd)
            os.close(fd)
        io.fds.clear()
        if io in self._linger:
            self._linger.remove(io)
        h, msg = io.handle, io.result
        lost = io.lost or lost
        if msg is None:
            msg = {"status": "killed", "ended": time.time()}
            lost = lost or "the run's supervisor ended without reporting a result"
        if msg["status"] == "killed":
            h.reason = h._cancel_reason or lost or msg.get("reason")
        if lost and h._cancel_reason is None:
            _safely(self._on_event, h.job_id, h.run_id, f"run lost: {lost}")
        result = RunResult(
            status=msg["status"],
            started_at=h.started_at,
            ended_at=datetime.fromtimestamp(msg["ended"], UTC),
            exit_code=msg.get("exit_code"),
            signal=msg.get("signal"),
            error=msg.get("error"),
            reason=h.reason,
        )
        with self._lock:
            self._ios.pop(h.run_id, None)
        h._resolve(result)


def _utf8_cut(buf: bytearray, start: int, end: int) -> int:
    """Move a cut back to a character boundary (3 bytes at most), so pieces decode whole."""
    cut = end
    for _ in range(3):
        if cut <= start + 1 or cut >= len(buf) or buf[cut] & 0xC0 != 0x80:
            break
        cut -= 1
    return cut if cut >= len(buf) or buf[cut] & 0xC0 != 0x80 else end
