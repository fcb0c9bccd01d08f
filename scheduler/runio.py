"""The runner's reader thread: every run's pipes and every launcher socket through one selector.

Output is split into lines (a line without a newline is cut every
:data:`LINE_LIMIT` bytes, on a UTF-8 character boundary, so memory stays
bounded), decoded as UTF-8 with ``errors="replace"`` and handed to
``on_line(job_id, run_id, stream, text)``, with the run's secret values
masked (:mod:`scheduler.redact`). Status messages fill in the run's
handle; supervisor events go to ``on_event(job_id, run_id, message)``.
Callbacks run in this thread and must be quick; an exception in one is
logged and dropped.

A run resolves once its three pipes (stdout, stderr, status) are all at end of
file, which proves its supervisor and every process it started are gone; if
strays keep the output pipes open after the status pipe closed, they get
:data:`OUTPUT_LINGER` seconds.

The loop is a bare ``epoll`` and a dict from fd to its owner: the daemon pays
this per run, on every run's critical path. :meth:`Reader.add` registers a new
run's pipes from the launching thread directly (``epoll_ctl`` may run while
another thread waits in ``epoll_wait``; the owner is in the dict before the fd
is in the epoll set), which spares a wakeup round trip per run. Only this
thread removes fds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from scheduler.redact import Masker
from scheduler.types import RunResult

if TYPE_CHECKING:
    from scheduler.runner import RunHandle

log = logging.getLogger("schedd.runner")

#: Longest piece of a line delivered at once; longer lines arrive in pieces.
LINE_LIMIT = 64 * 1024
#: After a status pipe closes, how long stray holders may keep output pipes open.
OUTPUT_LINGER = 2.0
STREAMS = ("stdout", "stderr", "status")

OnLine = Callable[[str, str, str, str], None]
OnEvent = Callable[[str, str, str], None]


def safely(fn: Callable[..., None], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("runner callback %r failed", fn)


class LauncherConn:
    """The daemon's end of one launcher process."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.proc = proc
        self.sock = sock
        self.pid = proc.pid
        self.ready = threading.Event()
        self.dead = False
        self.closing = False
        self.buf = b""


class RunIO:
    """Reader-thread state of one run: its open pipes, partial lines, status messages."""

    def __init__(self, handle: RunHandle, fds: list[int], launcher: LauncherConn) -> None:
        self.handle = handle
        self.fds = dict(zip(fds, STREAMS, strict=True))
        self.bufs = {fd: bytearray() for fd in fds}
        self.launcher = launcher
        self.result: dict[str, Any] | None = None
        self.lost: str | None = None
        self.status_eof = 0.0
        secrets = handle.request.secrets
        self.masker = Masker(secrets) if secrets else None


class Reader:
    """The epoll loop. ``lock`` guards ``ios`` (unresolved runs by id), shared with the runner."""

    def __init__(
        self, lock: threading.Lock, ios: dict[str, RunIO], on_line: OnLine, on_event: OnEvent
    ) -> None:
        self._lock = lock
        self._ios = ios
        self._on_line = on_line
        self._on_event = on_event
        self._owners: dict[int, RunIO | LauncherConn] = {}
        self._linger: list[RunIO] = []
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._stopping = False
        self.thread = threading.Thread(target=self._loop, name="schedd-runner", daemon=True)

    def add(self, item: RunIO | LauncherConn) -> None:
        """Start reading a new run's pipes or a launcher's socket; any thread.

        The reader may handle (and drop) a run's first pipe before its last is
        added, so the fds are listed before the first is registered.
        """
        if isinstance(item, LauncherConn):
            self._watch(item.sock.fileno(), item)
        else:
            for fd in list(item.fds):
                self._watch(fd, item)

    def _watch(self, fd: int, owner: RunIO | LauncherConn) -> None:
        self._owners[fd] = owner
        self._epoll.register(fd, select.EPOLLIN)

    def _unwatch(self, fd: int) -> None:
        self._epoll.unregister(fd)
        del self._owners[fd]

    def snapshot(self) -> list[RunIO]:
        with self._lock:  # launch() adds runs from other threads
            return list(self._ios.values())

    def stop(self) -> None:
        """End the thread, resolve what is left as lost, release the epoll set."""
        self._stopping = True
        os.write(self._wake_w, b"x")
        if self.thread.ident is not None:
            self.thread.join(5.0)
        for io in self.snapshot():
            self.finish(io, lost="runner closed")
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _loop(self) -> None:
        owners, wake = self._owners, self._wake_r
        while not self._stopping:
            first = min((io.status_eof for io in self._linger), default=None)
            timeout = -1.0 if first is None else max(first + OUTPUT_LINGER - time.monotonic(), 0.01)
            for fd, _ in self._epoll.poll(timeout):
                owner = owners.get(fd)  # None: removed since epoll_wait returned
                try:
                    if fd == wake:
                        with contextlib.suppress(BlockingIOError):
                            os.read(wake, 4096)
                    elif isinstance(owner, RunIO):
                        self._on_pipe(owner, fd)
                    elif owner is not None:
                        self._on_launcher(owner)
                except Exception:  # one bad message must not stop every run's output
                    log.exception("schedd runner: reader error")
            if self._linger:
                now = time.monotonic()
                for io in [io for io in self._linger if now - io.status_eof > OUTPUT_LINGER]:
                    self.finish(io)

    def _on_launcher(self, launcher: LauncherConn) -> None:
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
            self._unwatch(launcher.sock.fileno())
            launcher.sock.close()
        if launcher.closing:
            return
        try:
            code: int | None = launcher.proc.wait(0.5)
        except subprocess.TimeoutExpired:
            code = None
        why = f"schedd launcher died unexpectedly (pid {launcher.pid}, exit status {code})"
        log.error("%s; the next launch starts a new one", why)
        for io in self.snapshot():
            if io.launcher is launcher and io.lost is None:
                io.lost = why

    def _on_pipe(self, io: RunIO, fd: int) -> None:
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
            self._unwatch(fd)
            os.close(fd)
            del io.fds[fd]
            if not io.fds:
                self.finish(io)
            elif stream == "status":  # the supervisor is gone: stray writers get a deadline
                io.status_eof = time.monotonic()
                self._linger.append(io)

    def _split(self, io: RunIO, fd: int, stream: str, data: bytes) -> None:
        buf = io.bufs[fd]
        buf += data
        pos, end = 0, len(buf)
        job, run = io.handle.job_id, io.handle.run_id
        masker = io.masker
        while pos < end:
            nl = buf.find(b"\n", pos, pos + LINE_LIMIT + 1)
            if nl >= 0:
                cut, nxt = nl, nl + 1
            elif end - pos > LINE_LIMIT or (not data and end > pos):
                cut = nxt = utf8_cut(buf, pos, min(end, pos + LINE_LIMIT))
            else:
                break
            text = buf[pos:cut].decode("utf-8", "replace")
            if masker is not None:
                text = masker.mask(text)
            safely(self._on_line, job, run, stream, text)
            pos = nxt
        del buf[:pos]

    def _on_status(self, io: RunIO, buf: bytearray, data: bytes) -> None:
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
            if ev == "started":
                h.task_started = msg["ns"] / 1e9
                h.pid = msg.get("pid", h.pid)
            elif ev == "event":
                safely(self._on_event, h.job_id, h.run_id, msg["msg"])
            elif ev == "result":
                io.result = msg
                if h.pid is None:
                    h.pid = msg.get("pid")

    def finish(self, io: RunIO, lost: str | None = None) -> None:
        """Resolve the run once its pipes are closed (or given up on)."""
        for fd in list(io.fds):
            if not self._stopping:
                self._unwatch(fd)
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
            h.reason = h.cancel_reason or lost or msg.get("reason")
        elif msg.get("reason"):  # e.g. a resource limit the run hit
            h.reason = msg["reason"]
        if lost and h.cancel_reason is None:
            safely(self._on_event, h.job_id, h.run_id, f"run lost: {lost}")
        error = msg.get("error")
        if error and io.masker is not None:  # an exception's message may quote a secret
            error = io.masker.mask(error)
        result = RunResult(
            status=msg["status"],
            started_at=h.started_at,
            ended_at=datetime.fromtimestamp(
                msg["ended_ns"] / 1e9 if "ended_ns" in msg else msg["ended"], UTC
            ),
            exit_code=msg.get("exit_code"),
            signal=msg.get("signal"),
            error=error,
            reason=h.reason,
        )
        with self._lock:
            self._ios.pop(h.run_id, None)
        h.resolve(result)


def utf8_cut(buf: bytearray, start: int, end: int) -> int:
    """Move a cut back to a character boundary (3 bytes at most), so pieces decode whole."""
    cut = end
    for _ in range(3):
        if cut <= start + 1 or cut >= len(buf) or buf[cut] & 0xC0 != 0x80:
            break
        cut -= 1
    return cut if cut >= len(buf) or buf[cut] & 0xC0 != 0x80 else end
