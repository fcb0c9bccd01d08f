"""The daemon's end of the control socket (the protocol is in :mod:`scheduler.control`).

One accept thread admits connections; each admitted one gets a thread of its
own that reads one request, calls the handler and answers. Everything a
client controls is bounded: the peer must pass the credential check before a
byte is read, the request must arrive within ``read_timeout`` and fit in
``max_request`` bytes, and at most ``max_connections`` are served at once
(more get ``busy`` at once), so neither a silent client nor a flood of them
can pin the daemon's threads. Log lines go to the ``schedd.control`` stdlib
logger, which the daemon routes into its own log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scheduler.control import (
    COMMANDS,
    MAX_CONNECTIONS,
    MAX_REQUEST,
    PROTOCOL_VERSION,
    READ_TIMEOUT,
    ControlHandler,
    check_args,
    dumps,
    error_response,
    socket_address,
)
from scheduler.errors import ScheddError

__all__ = ["ControlServer"]

_log = logging.getLogger("schedd.control")
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


#: After answering, how long (s) and how much (bytes) to read what a client still sends.
_DRAIN_TIME = 1.0
_DRAIN_BYTES = 4 * 1024 * 1024


def _drain(conn: socket.socket, *, wait: bool) -> None:
    """Read and drop what the client has still sent (an oversized request, or a
    request we refused unread). Closing a Unix socket with unread input makes
    the peer's next read fail with ECONNRESET before it sees our answer."""
    deadline = time.monotonic() + _DRAIN_TIME
    total = 0
    while total < _DRAIN_BYTES:
        try:
            if wait:
                conn.settimeout(max(0.0, deadline - time.monotonic()) or 0.001)
                chunk = conn.recv(65536)
            else:  # with a timeout set, Python would poll before recv: make it non-blocking
                conn.setblocking(False)
                chunk = conn.recv(65536)
        except (BlockingIOError, TimeoutError):
            return
        if not chunk:
            return
        total += len(chunk)
        if wait and time.monotonic() >= deadline:
            return


class _Reject(Exception):
    """A request that gets an error response (never a traceback)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.response = error_response(message, code)


class ControlServer:
    """Serves a :class:`~scheduler.control.ControlHandler` on ``path``.

    ``start()`` binds and returns once the socket accepts connections;
    ``close()`` stops accepting, removes the socket file (only if it is still
    the one this server bound, so a late close never removes a successor's)
    and waits briefly for connections in flight.
    """

    def __init__(
        self,
        path: Path,
        handler: ControlHandler,
        *,
        max_request: int = MAX_REQUEST,
        read_timeout: float = READ_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.path = path
        self.handler = handler
        self.max_request = max_request
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self._uid = os.geteuid()
        self._sock: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._wake: tuple[int, int] | None = None
        self._active = 0
        self._idle = threading.Condition()

    # ---- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        """Bind privately and start accepting.

        The umask makes the socket inode 0600-or-stricter the moment ``bind``
        creates it (there is no window in which a chmod has not happened yet);
        the explicit chmod documents the intent. The umask is process-wide,
        so other threads creating files meanwhile get private ones: harmless.
        """
        self._clear_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o077)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with socket_address(self.path) as address:
                sock.bind(address)
            self.path.chmod(0o600)
            sock.listen(64)
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        st = self.path.stat()
        self._inode = (st.st_dev, st.st_ino)
        if self.path.parent.stat().st_mode & 0o077:
            _log.warning(f"control: {self.path.parent} is open to other users; it should be 0700")
        sock.setblocking(False)
        self._sock = sock
        self._wake = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._thread.start()

    def _clear_stale(self) -> None:
        """Remove a socket left by a dead daemon; refuse to touch anything else."""
        try:
            mode = self.path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ScheddError(f"{self.path} exists and is not a socket; remove it first")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
            try:
                with socket_address(self.path) as address:
                    probe.connect(address)
            except (ConnectionRefusedError, FileNotFoundError):
                self.path.unlink(missing_ok=True)
                return
        raise ScheddError(f"another schedd daemon answers on {self.path}")

    def close(self, timeout: float = 2.0) -> None:
        """Stop serving; connections in flight get ``timeout`` seconds to finish."""
        if self._thread is None or self._wake is None:
            return
        os.write(self._wake[1], b"x")
        self._thread.join()
        self._thread = None
        for fd in self._wake:
            os.close(fd)
        self._wake = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with contextlib.suppress(OSError):
            st = self.path.lstat()
            if (st.st_dev, st.st_ino) == self._inode:
                self.path.unlink()
        with self._idle:
            self._idle.wait_for(lambda: self._active == 0, timeout=timeout)

    # ---- connections ----------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._sock is not None and self._wake is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._sock, selectors.EVENT_READ)
            sel.register(self._wake[0], selectors.EVENT_READ)
            while True:
                ready = sel.select()
                if any(key.fileobj == self._wake[0] for key, _ in ready):
                    return
                try:
                    conn, _ = self._sock.accept()
                except OSError:  # the client gave up already, or descriptors ran out
                    time.sleep(0.01)
                    continue
                try:
                    self._admit(conn)
                except Exception:
                    _log.exception("control: could not serve a connection")
                    conn.close()

    def _admit(self, conn: socket.socket) -> None:
        conn.settimeout(self.read_timeout)
        refusal = self._check_peer(conn)
        if refusal is None:
            with self._idle:
                busy = self._active >= self.max_connections
                if not busy:
                    self._active += 1
            if busy:
                _log.warning(f"control: {self.max_connections} connections open; refused one")
                message = f"the daemon is serving {self.max_connections} connections; try again"
                refusal = error_response(message, "busy")
        if refusal is not None:
            # A few bytes into an empty socket buffer, and a drain that never
            # waits: the accept loop is not held up by a refused client.
            with contextlib.suppress(OSError):
                conn.settimeout(0.5)
                conn.sendall(dumps(refusal))
                _drain(conn, wait=False)
            conn.close()
            return
        try:
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()
        except BaseException:
            self._done()
            raise

    def _check_peer(self, conn: socket.socket) -> dict[str, Any] | None:
        """None if the kernel says the peer runs as our uid or root, else the refusal."""
        try:
            raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            pid, uid, gid = _PEERCRED.unpack(raw)
        except (OSError, struct.error) as exc:
            _log.warning(f"control: refused a connection without peer credentials ({exc})")
            return error_response("permission denied: no peer credentials", "forbidden")
        if uid in (self._uid, 0):
            return None
        allowed = "root" if self._uid == 0 else f"uid {self._uid} and root"
        _log.warning(
            f"control: refused a connection from pid {pid} uid {uid} gid {gid} "
            f"(only {allowed} may control this daemon)"
        )
        return error_response(
            f"permission denied: uid {uid} may not control this daemon", "forbidden"
        )

    def _done(self) -> None:
        with self._idle:
            self._active -= 1
            self._idle.notify_all()

    def _serve(self, conn: socket.socket) -> None:
        try:
            try:
                data = dumps(self._respond(self._read(conn)))
            except _Reject as reject:
                data = dumps(reject.response)
            except (TypeError, ValueError) as exc:  # the handler returned something not JSON
                _log.error(f"control: the result is not JSON: {exc}")
                data = dumps(error_response("internal error: the result is not JSON", "internal"))
            conn.settimeout(self.read_timeout)
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            _drain(conn, wait=True)
        except OSError as exc:  # the client went away; nothing to tell it
            _log.debug(f"control: connection dropped: {exc}")
        except Exception:
            _log.exception("control: unexpected error serving a connection")
        finally:
            conn.close()
            self._done()

    def _read(self, conn: socket.socket) -> bytes:
        """The request line: up to the first newline, or EOF."""
        deadline = time.monotonic() + self.read_timeout
        late = f"no complete request within {self.read_timeout:g}s"
        buf = bytearray()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Reject(late, "timeout")
            conn.settimeout(remaining)
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                raise _Reject(late, "timeout") from None
            end = chunk.find(b"\n")
            buf += chunk if end < 0 else chunk[:end]
            if len(buf) > self.max_request:
                raise _Reject(f"request larger than {self.max_request} bytes", "too_large")
            if not chunk or end >= 0:
                return bytes(buf)

    def _respond(self, raw: bytes) -> dict[str, Any]:
        try:
            request = json.loads(raw)
        except (ValueError, RecursionError):
            raise _Reject("the request is not valid JSON", "bad_json") from None
        if not isinstance(request, dict):
            raise _Reject("the request must be a JSON object", "bad_request")
        version = request.get("v")
        if type(version) is not int or version != PROTOCOL_VERSION:
            raise _Reject(
                f"unsupported protocol version {json.dumps(version)}; "
                f"this daemon speaks version {PROTOCOL_VERSION}",
                "bad_version",
            )
        cmd = request.get("cmd")
        if not isinstance(cmd, str) or (cmd not in COMMANDS and cmd != "ping"):
            known = ", ".join(sorted([*COMMANDS, "ping"]))
            shown = json.dumps(cmd)[:60]
            raise _Reject(f"unknown command {shown}; known: {known}", "unknown_command")
        args = request.get("args", {})
        if not isinstance(args, dict):
            raise _Reject("args must be a JSON object", "bad_args")
        if cmd == "ping":
            return {"v": PROTOCOL_VERSION, "ok": True, "result": {"pid": os.getpid()}}
        problem = check_args(cmd, args)
        if problem:
            raise _Reject(f"{cmd}: {problem}", "bad_args")
        method: Callable[..., Any] = getattr(self.handler, cmd)
        try:
            result = method(**{n: args.get(n, a.default) for n, a in COMMANDS[cmd].items()})
        except ScheddError as exc:
            code = getattr(exc, "code", "error")
            raise _Reject(str(exc), code if isinstance(code, str) else "error") from None
        except Exception:
            _log.exception(f"control: {cmd} failed")
            raise _Reject(f"internal error in {cmd}; see the daemon log", "internal") from None
        return {"v": PROTOCOL_VERSION, "ok": True, "result": result}
