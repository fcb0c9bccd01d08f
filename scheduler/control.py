"""The control socket: how ``schedd`` commands talk to a running daemon.

``STATE_DIR/control.sock`` is a Unix stream socket private to the daemon's
user. File modes are the first fence (bound under umask 0o077 inside the 0700
state dir, then chmod 0600); the second is a kernel-reported peer credential
check (``SO_PEERCRED``) on every connection, so a loosened mode still lets
only the daemon's uid and root in. A refused peer gets an error response and a
log line and never reaches the handler.

Protocol, version 1: one request per connection. The client sends one JSON
object on one line (``\\n``-terminated, at most :data:`MAX_REQUEST` bytes)::

    {"v": 1, "cmd": "trigger", "args": {"job": "backup", "force": false}}

and reads one JSON line back::

    {"v": 1, "ok": true, "result": ...}
    {"v": 1, "ok": false, "error": "no job 'bakup'", "code": "error"}

A response that streams (none in version 1; the client reads by lines so one
can be added) is a sequence of such lines, the last one carrying ``"end": true``.
Error codes: ``bad_json``, ``bad_request``, ``bad_version``, ``unknown_command``,
``bad_args``, ``too_large``, ``timeout``, ``forbidden``, ``busy``, ``internal``,
and ``error`` (a :class:`~scheduler.errors.ScheddError` from the handler, or
the ``code`` attribute such an error carries). Nothing malformed crashes the
server or sends a traceback; each connection is bounded in size, time
(:data:`READ_TIMEOUT` to send the request) and number (:data:`MAX_CONNECTIONS`).

This module holds what both ends share (the protocol, the
:class:`ControlHandler` contract, the client); the server lives in
:mod:`scheduler.control_server` and is re-exported here. ``schedd status``
imports only this module, so it stays standard library only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
from collections.abc import Callable, Iterator
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol, cast

from scheduler.errors import ScheddError

if TYPE_CHECKING:
    from scheduler.control_server import ControlServer

__all__ = [
    "CLIENT_TIMEOUT",
    "COMMANDS",
    "MAX_CONNECTIONS",
    "MAX_REQUEST",
    "PROTOCOL_VERSION",
    "READ_TIMEOUT",
    "SOCKET_NAME",
    "ControlClient",
    "ControlError",
    "ControlHandler",
    "ControlServer",
    "NoDaemon",
]

SOCKET_NAME: Final = "control.sock"
PROTOCOL_VERSION: Final = 1
#: A request is a command name and a few ids; anything bigger is a mistake or an attack.
MAX_REQUEST: Final = 64 * 1024
#: Seconds a client has, from connecting, to send its whole request.
READ_TIMEOUT: Final = 5.0
#: Connections served at once; more get a ``busy`` error right away.
MAX_CONNECTIONS: Final = 16
#: Seconds a client waits for an answer (a reload of a huge file takes a while).
CLIENT_TIMEOUT: Final = 120.0
_SUN_PATH_MAX: Final = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux


class ControlHandler(Protocol):
    """What the daemon exposes through the socket; the daemon implements it.

    Every value crossing the socket is JSON: times are ISO-8601 strings with
    a UTC offset (``datetime``/``date``/``Path``/sets/tuples are converted if
    returned, anything else not JSON is an ``internal`` error), durations are
    float seconds. Methods run on connection threads, up to
    ``max_connections`` at once, so they must be thread-safe; work that
    belongs on the daemon's main thread (reload, stop) is handed over there
    and, for reload, waited for. Refusals (unknown job or run id, a paused job
    triggered without ``force`` ...) are raised as
    :class:`~scheduler.errors.ScheddError`; the client sees its message, and
    its ``code`` attribute if it has a string one (default ``"error"``).
    Arguments arrive already type-checked (see :data:`COMMANDS`).
    """

    def status(self) -> dict[str, Any]:
        """The daemon at a glance::

            {"pid": int, "started_at": str, "uptime_s": float, "config_path": str,
             "state_dir": str, "jobs": int,
             "running": [{"run_id": str, "job": str, "started_at": str, "pid": int | None}],
             "last_reload": {"at": str, "ok": bool, "errors": [str]} | None}

        ``errors`` are located problems as ``PATH:LINE:COL: message``;
        ``last_reload`` is None until the first reload. Extra keys are allowed.
        """
        ...

    def jobs(self) -> list[dict[str, Any]]:
        """Every job of the running config, in file order::

            [{"id": str, "task": str, "trigger": str, "timezone": str, "enabled": bool,
              "paused": bool, "next_fire": str | None,
              "last": {"status": str, "ended_at": str | None, "run_id": str} | None}]

        ``trigger`` is the schedule in words; ``next_fire`` is None when the
        job is disabled, paused or will not fire again.
        """
        ...

    def trigger(self, job: str, force: bool) -> dict[str, Any]:
        """Fire ``job`` now, through the job's overlap policy unless ``force``
        (which also fires a paused or disabled job). Returns
        ``{"job": str, "run_id": str | None, "message": str}``; ``run_id`` is
        None when no run started yet (queued behind a running one) and
        ``message`` says what happened."""
        ...

    def pause(self, jobs: list[str] | None) -> dict[str, Any]:
        """Stop firing ``jobs`` (None: every job); running runs continue.
        Unknown ids raise before anything changes. Returns
        ``{"changed": [job ids now paused], "unchanged": [ids already paused]}``."""
        ...

    def resume(self, jobs: list[str] | None) -> dict[str, Any]:
        """Undo :meth:`pause` for ``jobs`` (None: every job); same result shape,
        ``changed`` being the ids that were paused."""
        ...

    def history(self, job: str | None, limit: int, status: str | None) -> list[dict[str, Any]]:
        """The last ``limit`` (1-100000) run records, newest first, of ``job``
        (None: all jobs) whose status is ``status`` (None: any; one of success,
        failed, timeout, killed, skipped, missed, lost, running)::

            [{"run_id": str, "job": str, "status": str, "scheduled_for": str | None,
              "started_at": str | None, "ended_at": str | None, "attempt": int,
              "exit_code": int | None, "signal": str | None, "error": str | None,
              "reason": str}]
        """
        ...

    def reload(self) -> dict[str, Any]:
        """Re-read the config file and apply it, or keep the old one if it is
        invalid. Returns when done::

            {"ok": bool, "errors": [str], "added": [str], "removed": [str], "changed": [str]}

        ``errors`` are ``PATH:LINE:COL: message`` lines; a rejected reload is
        ``ok: false`` with errors, not a ScheddError."""
        ...

    def cancel(self, run_id: str) -> dict[str, Any]:
        """End a running run's process tree (SIGTERM, the job's kill grace,
        SIGKILL); returns at once with ``{"run_id": str, "job": str, "message": str}``.
        An unknown or finished run raises ScheddError."""
        ...

    def stop(self, grace: float | None) -> dict[str, Any]:
        """Begin a graceful shutdown and return at once (before exiting) with
        ``{"pid": int, "grace": float}``: running runs get ``grace`` seconds
        (None: the daemon's ``--shutdown-grace``) before their trees are ended.
        The CLI then waits for ``pid`` to exit."""
        ...


class _Arg(NamedTuple):
    check: Callable[[object], bool]
    expect: str
    default: object = None
    required: bool = False


def _is_id(value: object) -> bool:
    """A short string a file name or SQLite can hold: JSON's ``"\\u0000"`` and
    lone-surrogate escapes (``"\\udcff"``) decode to strings neither takes."""
    if not isinstance(value, str) or not 0 < len(value) <= 1024 or "\0" in value:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _is_optional_id(value: object) -> bool:
    return value is None or _is_id(value)


def _is_ids(value: object) -> bool:
    return value is None or (isinstance(value, list) and all(_is_id(v) for v in value))


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _is_limit(value: object) -> bool:
    return type(value) is int and 1 <= value <= 100_000


def _is_grace(value: object) -> bool:
    return value is None or (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and value >= 0
    )


_IDS = _Arg(_is_ids, "a list of job ids, or null for all jobs")
#: Each command's arguments: what they must be and their defaults (``ping`` is
#: answered by the server itself, with ``{"pid": int}``).
COMMANDS: Final[dict[str, dict[str, _Arg]]] = {
    "status": {},
    "jobs": {},
    "trigger": {
        "job": _Arg(_is_id, "a job id", required=True),
        "force": _Arg(_is_bool, "true or false", False),
    },
    "pause": {"jobs": _IDS},
    "resume": {"jobs": _IDS},
    "history": {
        "job": _Arg(_is_optional_id, "a job id or null"),
        "limit": _Arg(_is_limit, "an integer from 1 to 100000", 20),
        "status": _Arg(_is_optional_id, "a run status or null"),
    },
    "reload": {},
    "cancel": {"run_id": _Arg(_is_id, "a run id", required=True)},
    "stop": {"grace": _Arg(_is_grace, "a number of seconds >= 0, or null")},
}


def check_args(cmd: str, args: dict[str, Any]) -> str | None:
    """What is wrong with ``args`` for ``cmd``, or None."""
    spec = COMMANDS[cmd]
    for name in args:
        if name not in spec:
            known = ", ".join(spec) or "none"
            return f"unknown argument {name!r} (arguments: {known})"
    for name, arg in spec.items():
        if name not in args:
            if arg.required:
                return f"missing argument {name!r} ({arg.expect})"
        elif not arg.check(args[name]):
            shown = json.dumps(args[name])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            return f"{name} must be {arg.expect}, not {shown}"
    return None


class NoDaemon(ScheddError):
    """Nothing listens on the state dir's control socket (missing, or stale)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        super().__init__(f"no schedd daemon on {state_dir}; start one with `schedd run`")


class ControlError(ScheddError):
    """The daemon answered with an error; ``code`` says which kind."""

    def __init__(self, message: str, code: str = "error") -> None:
        self.code = code
        super().__init__(message)


@contextlib.contextmanager
def socket_address(path: Path) -> Iterator[str]:
    """A name ``bind``/``connect`` accept for ``path``, however long it is.

    ``sun_path`` holds 107 bytes; a deeper state dir is reached through an
    open descriptor of its folder (``/proc/self/fd/N/control.sock``), which
    names the same inode without a ``chdir`` (that would race other threads).
    """
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _encode(value: object) -> object:
    """JSON for the few non-JSON types a handler may return."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(message: dict[str, Any]) -> bytes:
    """One protocol line."""
    return json.dumps(message, default=_encode, allow_nan=False).encode() + b"\n"


def error_response(message: str, code: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "ok": False, "error": message, "code": code}


class ControlClient:
    """Calls a daemon through ``STATE_DIR/control.sock``.

    Raises :class:`NoDaemon` when nothing listens there, and
    :class:`ControlError` (a ScheddError) with the daemon's message otherwise.
    """

    def __init__(self, state_dir: Path, *, timeout: float = CLIENT_TIMEOUT) -> None:
        self.state_dir = state_dir
        self.path = state_dir / SOCKET_NAME
        self.timeout = timeout

    def call(self, cmd: str, **args: Any) -> Any:
        request = dumps({"v": PROTOCOL_VERSION, "cmd": cmd, "args": args})
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(self.timeout)
            self._connect(sock)
            # A server that refuses (busy, forbidden) may answer and close before reading.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(request)
            line = self._read_line(sock)
        try:
            response = json.loads(line)
            ok = response["ok"]
        except (ValueError, TypeError, KeyError):
            raise ScheddError(f"unreadable answer from the daemon at {self.path}") from None
        if ok is True:
            return response.get("result")
        error, code = response.get("error"), response.get("code")
        raise ControlError(str(error or "unknown error"), str(code or "error"))

    def _connect(self, sock: socket.socket) -> None:
        try:
            with socket_address(self.path) as address:
                sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise NoDaemon(self.state_dir) from None
        except PermissionError:
            raise ScheddError(
                f"permission denied on {self.path}: the daemon belongs to another user"
            ) from None
        except TimeoutError:
            raise ScheddError(f"the daemon at {self.path} is not accepting connections") from None

    def _read_line(self, sock: socket.socket) -> bytes:
        chunks: list[bytes] = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                end = chunk.find(b"\n")
                if end >= 0:
                    chunks.append(chunk[:end])
                    break
                chunks.append(chunk)
        except TimeoutError:
            raise ScheddError(
                f"the daemon at {self.path} did not answer within {self.timeout:g}s"
            ) from None
        except ConnectionResetError:
            pass
        if not chunks:
            raise ScheddError(f"the daemon at {self.path} closed the connection without answering")
        return b"".join(chunks)

    # ---- one helper per command (arguments and results as in ControlHandler) ----------
    def ping(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.call("ping"))

    def status(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.call("status"))

    def jobs(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self.call("jobs"))

    def trigger(self, job: str, force: bool = False) -> dict[str, Any]:
        return cast(dict[str, Any], self.call("trigger", job=job, force=force))

    def pause(self, jobs: list[str] | None) -> dict[str, Any]:
        return cast(dict[str, Any], self.call("pause", jobs=jobs))

    def resume(self, jobs: list[str] | None) -> dict[str, Any]:
        return cast(dict[str, Any], self.call("resume", jobs=jobs))

    def history(
        self, job: str | None = None, limit: int = 20, status: str | None = None
    ) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self.call("history", job=job, limit=limit, status=status))

    def reload(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.call("reload"))

    def cancel(self, run_id: str) -> dict[str, Any]:
        return cast(dict[str, Any], self.call("cancel", run_id=run_id))

    def stop(self, grace: float | None = None) -> dict[str, Any]:
        return cast(dict[str, Any], self.call("stop", grace=grace))


def __getattr__(name: str) -> Any:
    """``ControlServer`` loads on first use, keeping the client path small."""
    if name == "ControlServer":
        from scheduler.control_server import ControlServer

        return ControlServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
