"""When a job fires: cron (crontab(5)-exact), every (real elapsed time), at (one-shot).

STUB: interface fixed, implementation pending.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from datetime import datetime
from zoneinfo import ZoneInfo


class TriggerError(ValueError):
    """A schedule expression is invalid. ``offset`` is the 0-based character
    index inside the expression where the problem starts, when known, so the
    config loader can point at the exact column."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset


class Schedule(ABC):
    """A parsed trigger. Immutable; may be shared by many jobs."""

    tz: ZoneInfo

    @abstractmethod
    def next_after(self, t: datetime) -> datetime | None:
        """The first fire time strictly after aware ``t`` (in ``self.tz``), or None."""

    @abstractmethod
    def describe(self) -> str:
        """The schedule in words, for ``schedd jobs``."""


def parse_cron(expr: str, tz: ZoneInfo, job_id: str) -> Schedule:
    raise NotImplementedError


def parse_every(seconds: float, tz: ZoneInfo) -> Schedule:
    raise NotImplementedError


def parse_at(when: datetime, tz: ZoneInfo) -> Schedule:
    raise NotImplementedError
