"""End what a dead daemon's runs left behind, before anything new starts.

Normally nothing survives the daemon: the launcher sees its socket close and
ends every run, and each supervisor has a parent-death signal. This is the
last line of defence for when that chain was itself cut (the launcher and
supervisors SIGKILLed with the daemon, a reboot-less container restart).

Processes are recognised by the ``SCHEDD_RUN_ID`` their run put in their
environment, which every descendant inherits, never by a recorded pid alone:
a pid can be reused by an unrelated process and must never be signalled on
that basis.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

from loguru import logger

MARKER = b"SCHEDD_RUN_ID="


def run_processes(run_ids: Iterable[str]) -> dict[int, str]:
    """Live processes (pid -> run id) whose environment names one of ``run_ids``."""
    wanted = {MARKER + r.encode() for r in run_ids}
    found: dict[int, str] = {}
    if not wanted:
        return found
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        for var in environ.split(b"\0"):
            if var in wanted:
                found[int(entry.name)] = var[len(MARKER) :].decode()
                break
    return found


def end_run_processes(run_ids: Iterable[str], grace: float = 5.0) -> dict[int, str]:
    """SIGTERM every process of these runs, SIGKILL what is left after ``grace``."""
    ids = list(run_ids)
    victims = run_processes(ids)
    if not victims:
        return victims
    for pid, run_id in victims.items():
        logger.warning(f"ending process {pid} left over from lost run {run_id}")
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and run_processes(ids):
        time.sleep(0.05)
    for pid in run_processes(ids):
        _signal(pid, signal.SIGKILL)
    return victims


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)
