"""Frozen records that cross the plugin boundary.

These are the only shapes a plugin sees or returns. They are plain
dataclasses (no pydantic, no apscheduler) so that the child process that runs
a task imports almost nothing besides the task's own target.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from pydantic import BaseModel

#: How a run ended. ``failed`` covers a non-zero exit code and an exception.
RunStatus = Literal["success", "failed", "timeout", "killed"]


@dataclass(frozen=True, slots=True)
class TaskType:
    """A kind of work a job can name in its ``task:`` key.

    ``target`` is imported only inside the isolated child, never in the daemon,
    so a slow or broken task module cannot hurt the scheduler. ``params`` is a
    pydantic model (subclass :class:`scheduler.params.TaskParams`) used to
    validate a job's ``params:`` when the config loads, long before 3 a.m.
    ``plugin`` is filled in by the plugin manager; plugins leave it empty.
    """

    name: str
    target: str
    summary: str
    params: type[BaseModel]
    plugin: str = ""


@dataclass(frozen=True, slots=True)
class RunContext:
    """Everything a task function receives: ``def run(ctx: RunContext) -> int | None``.

    ``params`` are the job's validated params, normalised to JSON-compatible
    values (the child must not need the plugin's pydantic model to read them).
    Returning ``None`` or ``0`` means success, an ``int`` is the exit status,
    an exception means ``failed`` with its traceback in the job log.
    """

    job_id: str
    run_id: str
    task: str
    params: Mapping[str, Any] = field(default_factory=dict)
    scheduled_for: datetime | None = None
    attempt: int = 1
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A run as lifecycle hooks see it when it starts (daemon side)."""

    job_id: str
    run_id: str
    task: str
    scheduled_for: datetime | None
    started_at: datetime
    attempt: int = 1
    pid: int | None = None
    node: str = ""


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a run ended, as lifecycle hooks see it.

    ``exit_code`` is set for ``success``/``failed`` exits; ``signal`` names the
    signal for ``killed``; ``error`` is the exception type name when the task
    raised; ``reason`` says why schedd ended a ``killed`` run (cancelled,
    replaced, shutdown, launcher lost).
    """

    status: RunStatus
    started_at: datetime
    ended_at: datetime
    exit_code: int | None = None
    signal: str | None = None
    error: str | None = None
    reason: str | None = None

    @property
    def duration(self) -> float:
        return (self.ended_at - self.started_at).total_seconds()
