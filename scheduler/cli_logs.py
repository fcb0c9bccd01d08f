"""``schedd logs``: a job's output, read straight from ``STATE_DIR/logs/JOB.log``.

Reading the file rather than asking the daemon means logs work with no daemon
running (after a crash is when people want them most) and cost the daemon
nothing. The daemon is the only writer (see :mod:`scheduler.logs`); loguru
rotates by renaming the file and creating a new one, which ``--follow``
notices by the inode changing, and reads the old file to its end first.

Lines are ``TIME RUN_ID STREAM: TEXT``, where TIME itself holds one space
(``2026-11-28 12:04:02.123+0000``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import click

from scheduler.cli_control import _daemon_options, _friendly, complete_job_ids, resolve_state_dir

__all__ = ["follow", "logs", "parse_log_line", "tail"]

#: Seconds between looks at a followed file.
FOLLOW_POLL = 0.2
_BLOCK = 65536

Keep = Callable[[bytes], bool]


def parse_log_line(line: str) -> dict[str, str | None]:
    """One log line as ``{time, run_id, stream, text}``; a line in another shape
    (there should be none) keeps its text with the other fields None."""
    parts = line.split(" ", 3)
    if len(parts) == 4:
        stream, sep, text = parts[3].partition(": ")
        if not sep and parts[3].endswith(":"):  # an empty message, trailing space stripped
            stream, sep, text = parts[3][:-1], ":", ""
        if sep and stream and " " not in stream:
            return {
                "time": f"{parts[0]} {parts[1]}",
                "run_id": parts[2],
                "stream": stream,
                "text": text,
            }
    return {"time": None, "run_id": None, "stream": None, "text": line}


def _last_newline(f: BinaryIO, size: int) -> int:
    pos = size
    while pos > 0:
        start = max(0, pos - _BLOCK)
        f.seek(start)
        i = f.read(pos - start).rfind(b"\n")
        if i >= 0:
            return start + i
        pos = start
    return -1


def tail(f: BinaryIO, count: int, keep: Keep) -> tuple[list[bytes], int]:
    """The last ``count`` complete lines of ``f`` that ``keep`` accepts, oldest
    first, and the offset just after the last newline (where following starts;
    a half-written last line is left for the follower to complete).

    Reads backwards in blocks, so a 1 GB file costs only its tail, unless the
    filter matches rarely.
    """
    end = _last_newline(f, os.fstat(f.fileno()).st_size)
    if end < 0:
        return [], 0
    found: list[bytes] = []
    pos, carry = end, b""
    while len(found) < count:
        if pos == 0:
            if keep(carry):
                found.append(carry)
            break
        start = max(0, pos - _BLOCK)
        f.seek(start)
        parts = (f.read(pos - start) + carry).split(b"\n")
        carry, pos = parts.pop(0), start
        found.extend(line for line in reversed(parts) if keep(line))
    found = found[:count]
    found.reverse()
    return found, end + 1


def follow(path: Path, f: BinaryIO, pos: int, keep: Keep, emit: Callable[[bytes], None]) -> None:
    """Emit each complete line appended to ``path`` after ``pos``, forever.

    Rotation (``path`` now names another file) switches to the new file once
    the old one is read to its end; truncation in place starts over at 0.
    """
    ident = os.fstat(f.fileno())
    key = (ident.st_dev, ident.st_ino)
    buf = b""
    while True:
        f.seek(pos)
        data = f.read()
        if data:
            pos += len(data)
            *lines, buf = (buf + data).split(b"\n")
            for line in lines:
                if keep(line):
                    emit(line)
            sys.stdout.flush()
            continue
        try:
            st = path.stat()
        except FileNotFoundError:  # between the rename and the new file
            time.sleep(FOLLOW_POLL)
            continue
        if (st.st_dev, st.st_ino) != key:
            if buf and keep(buf):
                emit(buf)
            f.close()
            f = path.open("rb")
            ident = os.fstat(f.fileno())
            key, pos, buf = (ident.st_dev, ident.st_ino), 0, b""
        elif os.fstat(f.fileno()).st_size < pos:
            pos, buf = 0, b""
        else:
            time.sleep(FOLLOW_POLL)


def _open_when_there(path: Path) -> BinaryIO:
    while True:
        try:
            return path.open("rb")
        except FileNotFoundError:
            time.sleep(FOLLOW_POLL)


@click.command()
@click.argument("job", shell_complete=complete_job_ids)
@click.option("--run", "run_id", metavar="RUN_ID", help="Only the lines of this run.")
@click.option(
    "--lines",
    "-n",
    metavar="N",
    default=50,
    show_default=True,
    type=click.IntRange(0),
    help="How many of the last lines to show.",
)
@click.option("--follow", "-f", "follow_", is_flag=True, help="Print new lines until Ctrl-C.")
@_daemon_options
@_friendly
def logs(
    job: str,
    run_id: str | None,
    lines: int,
    follow_: bool,
    state_dir: str | None,
    config_path: str | None,
    as_json: bool,
) -> None:
    """Print a job's output (no daemon needed).

    Reads STATE_DIR/logs/JOB.log directly. --json prints one JSON object per
    line: time, run_id, stream, text.
    """
    import re

    from scheduler.config import JOB_ID_PATTERN, JOB_ID_RULE
    from scheduler.errors import ScheddError

    if not re.fullmatch(JOB_ID_PATTERN, job):
        raise click.BadParameter(f"{job!r} is not a job id ({JOB_ID_RULE})", param_hint="JOB")
    path = resolve_state_dir(state_dir, config_path) / "logs" / f"{job}.log"
    marker = [os.fsencode(run_id)] if run_id else None  # argv bytes, as given

    def keep(line: bytes) -> bool:
        return marker is None or line.split(b" ", 3)[2:3] == marker

    def emit(line: bytes) -> None:
        text = line.decode("utf-8", errors="replace")
        click.echo(json.dumps(parse_log_line(text)) if as_json else text)

    f: BinaryIO | None = None
    try:
        try:
            f = path.open("rb")
        except FileNotFoundError:
            if not follow_:
                raise ScheddError(f"no log for job {job!r} yet ({path} does not exist)") from None
            click.echo(f"waiting for {path} to appear ...", err=True)
            f, pos = _open_when_there(path), 0
        else:
            found, pos = tail(f, lines, keep)
            for line in found:
                emit(line)
            if not follow_:
                f.seek(pos)
                rest = f.read()
                if rest and keep(rest):
                    emit(rest)
                return
        sys.stdout.flush()
        follow(path, f, pos, keep, emit)
    except KeyboardInterrupt:
        sys.exit(0)
    except BrokenPipeError:  # piped into `head`: stop quietly, and keep the exit flush quiet
        sys.stdout = Path(os.devnull).open("w")  # noqa: SIM115
        sys.exit(0)
    finally:
        if f is not None:
            f.close()
