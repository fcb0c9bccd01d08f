"""What happened to each fire: the record every decision produces.

Every fire ends as exactly one record per attempt, including fires that never
started (``skipped`` by the overlap policy, ``missed`` while the daemon was
stalled or outside the catch-up window). The daemon hands records to a
:class:`Recorder`; today that is the daemon log, and the durable ledger
implements the same protocol.
"""

from __future__ import annotations

import secrets
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from loguru import logger

RecordStatus = Literal[
    "running", "success", "failed", "timeout", "killed", "skipped", "missed", "lost"
]


def new_run_id() -> str:
    """Sortable by creation time (millisecond hex prefix), unique by 48 random bits."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(3)}"


NODE = socket.gethostname()


@dataclass(frozen=True, slots=True)
class RunRecord:
    run_id: str
    job: str
    scheduled_for: datetime | None
    status: RecordStatus
    attempt: int = 1
    started_at: datetime | None = None
    ended_at: datetime | None = None
    exit_code: int | None = None
    signal: str | None = None
    error: str | None = None
    pid: int | None = None
    node: str = NODE
    reason: str = ""

    def summary(self) -> str:
        """One human line for logs: what, when, how it ended and why."""
        parts = [f"job {self.job!r}", f"run {self.run_id}"]
        if self.scheduled_for:
            parts.append(f"slot {self.scheduled_for.isoformat()}")
        if self.attempt > 1:
            parts.append(f"attempt {self.attempt}")
        outcome: str = self.status
        if self.exit_code is not None and self.status in ("success", "failed"):
            outcome += f" (exit {self.exit_code})"
        if self.signal:
            outcome += f" ({self.signal})"
        if self.error:
            outcome += f" ({self.error})"
        if self.started_at and self.ended_at:
            outcome += f" in {(self.ended_at - self.started_at).total_seconds():.3f}s"
        if self.reason:
            outcome += f": {self.reason}"
        return ", ".join(parts) + f": {outcome}"


class Recorder(Protocol):
    """Where run records go. Called on the dispatcher thread: must not block."""

    def started(self, rec: RunRecord) -> None:
        """A run's process was launched (``rec.status == "running"``)."""

    def record(self, rec: RunRecord) -> None:
        """A final outcome: a run ended, or a slot was skipped or missed."""


class LogRecorder:
    """Records outcomes in the daemon log until a durable ledger is configured."""

    def started(self, rec: RunRecord) -> None:
        pass  # the job log already says so; the daemon log keeps outcomes only

    def record(self, rec: RunRecord) -> None:
        level = "INFO" if rec.status == "success" else "WARNING"
        logger.log(level, rec.summary())


class TeeRecorder:
    """Hands every record to several recorders (the ledger and the daemon log)."""

    def __init__(self, *recorders: Recorder) -> None:
        self._recorders = recorders

    def started(self, rec: RunRecord) -> None:
        for r in self._recorders:
            r.started(rec)

    def record(self, rec: RunRecord) -> None:
        for r in self._recorders:
            r.record(rec)


__all__ = [
    "NODE",
    "LogRecorder",
    "RecordStatus",
    "Recorder",
    "RunRecord",
    "TeeRecorder",
    "new_run_id",
]
