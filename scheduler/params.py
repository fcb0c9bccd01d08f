"""Base class for task parameter schemas.

Every task type's ``params`` model subclasses :class:`TaskParams`, which
forbids unknown keys: a typo in a job's ``params:`` must be a config error,
not a silently ignored setting.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class TaskParams(BaseModel):
    """Subclass this for a task type's parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)
