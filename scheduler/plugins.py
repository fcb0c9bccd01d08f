"""Build the plugin manager and load plugins from the ``schedd`` entry-point group.

STUB: records fixed, loading pending.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from scheduler.types import TaskType

ENTRY_POINT_GROUP = "schedd"
DISABLE_ENV = "SCHEDD_DISABLE_PLUGINS"
STRICT_ENV = "SCHEDD_STRICT_PLUGINS"


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """One entry point as loaded (or not). ``error`` is set when it failed."""

    name: str
    distribution: str
    version: str
    module: str
    task_types: tuple[str, ...] = ()
    error: str | None = None
    blocked: bool = False


@dataclass(frozen=True, slots=True)
class Registry:
    """What the loaded plugins provide: task types by name, and what went wrong."""

    task_types: Mapping[str, TaskType] = field(default_factory=dict)
    plugins: tuple[PluginInfo, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def broken(self) -> tuple[PluginInfo, ...]:
        return tuple(p for p in self.plugins if p.error)
