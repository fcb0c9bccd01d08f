"""The status pipe between a run's supervisor (and task) and the daemon: what is said, and how.

Newline-terminated JSON objects, each written with
one ``os.write`` (shorter than ``PIPE_BUF``, so never interleaved):
``{"ev":"started","pid":N,"ns":wall_ns}`` (from the task process, which then
closes the pipe so that nothing it forks holds it), ``{"ev":"event","msg":...}``,
and last ``{"ev":"result","status":...,"exit_code":...,"signal":...,
"error":...,"pid":N,"ended":wall}`` (``"ended_ns":wall_ns`` instead of
``"ended"`` for a task that exited by itself with nothing to report). End of
file on it therefore means the supervisor is gone. The task reports its
exception type (or a note about its return value) on a private pipe, read once
the task has been reaped.

Messages are written by freshly forked processes, where every page written is
a copy: so the usual ones are constant or preformatted lines, and the rest are
encoded by hand rather than with the ``json`` encoder (see :func:`encode`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

#: What the task reports when it has nothing to say; compared, never parsed.
DONE = b'{"ev":"done"}\n'
#: The task's "started" line: ``STARTED % (pid, time.time_ns())``.
STARTED = b'{"ev":"started","pid":%d,"ns":%d}\n'
#: The result line of a task that exited by itself with nothing to report.
PLAIN_RESULT = b'{"ev":"result","status":"%s","exit_code":%d,"pid":%d,"ended_ns":%d}\n'
STATUS = (b"failed", b"success")


def send(fd: int, **msg: Any) -> None:
    """Write one status message; a vanished reader must not stop a run from being ended."""
    try:  # noqa: SIM105  (contextlib.suppress costs page copies in a fresh fork)
        os.write(fd, encode(msg))
    except OSError:
        pass


def encode(msg: Mapping[str, Any]) -> bytes:
    """JSON for flat messages of plain values, without touching the ``json`` encoder.

    Every page a forked child writes to is copied; ``json.dumps`` alone touches
    ~100 of them on first use (about 0.2 ms per process here).
    """
    parts = []
    for key, value in msg.items():
        if value is None:
            text = "null"
        elif isinstance(value, int | float) and not isinstance(value, bool):
            text = repr(value)
        elif isinstance(value, str) and _plain(value):
            text = f'"{value}"'
        else:
            text = json.dumps(value)
        parts.append(f'"{key}":{text}')
    return ("{" + ",".join(parts) + "}\n").encode()


def _plain(text: str) -> bool:
    """True when ``text`` needs no JSON escaping."""
    return text.isprintable() and '"' not in text and "\\" not in text


def read_report(fd: int) -> bytes:
    """What the (reaped) task reported on its private pipe.

    The task's last act is one write, so this is one read and, the task
    being gone, end of file. A task that ``exec``'d closed its end on exec and
    reports nothing; one that died abruptly may have left strays holding the
    pipe, hence non-blocking reads.
    """
    data = b""
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
    except OSError:
        pass
    return data


def apply_report(data: bytes, result: dict[str, Any]) -> str | None:
    """Apply a task's report to ``result``; return its note, if any."""
    if data == DONE:
        return None
    note = None
    for line in data.splitlines():
        try:
            msg = json.loads(line)
            if msg.get("error"):
                result["error"] = msg["error"]
            if msg.get("note"):
                note = msg["note"]
            if msg.get("limit"):
                result["limit"] = msg["limit"]
        except (ValueError, AttributeError):
            continue
    return note


def report_done(fd: int, error: str | None, note: str | None, limit: str | None) -> None:
    """The task's last word on its private pipe: :data:`DONE`, or what it has to say."""
    try:
        plain = error is None and note is None and limit is None
        os.write(fd, DONE if plain else done_line(error, note, limit))
    except OSError:
        pass


def done_line(error: str | None, note: str | None, limit: str | None = None) -> bytes:
    """The task's report when it has an exception type, a note or a limit it hit to give."""
    msg = {"ev": "done"}
    if error is not None:
        msg["error"] = error
    if note is not None:
        msg["note"] = note
    if limit is not None:
        msg["limit"] = limit
    return (json.dumps(msg) + "\n").encode()
