"""The ``python`` task type: call ``pkg.module:function(*args, **kwargs)``.

For functions that do not take a :class:`~scheduler.types.RunContext`: existing
library code, management commands. Metadata only (parameter model and hook);
the run itself is :func:`schedd_plugins.run_python.run`, which imports no
pydantic. The function's return value becomes the exit status by the same
rules as any task (``scheduler.child.exit_status``); a target that cannot be
imported gives 127, like a missing command.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from scheduler.child import TARGET_PATTERN
from scheduler.hookspecs import hookimpl
from scheduler.params import TaskParams
from scheduler.types import TaskType


class PythonParams(TaskParams):
    """``args``/``kwargs`` come from YAML, so they are plain JSON-like values."""

    target: str = Field(
        pattern=TARGET_PATTERN, description="function to call, as 'pkg.module:function'"
    )
    args: list[Any] = Field(default_factory=list, description="positional arguments")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments")


@hookimpl
def schedd_task_types() -> list[TaskType]:
    return [
        TaskType(
            name="python",
            target="schedd_plugins.run_python:run",
            summary="Call a Python function 'pkg.module:function' with args and kwargs",
            params=PythonParams,
        )
    ]
