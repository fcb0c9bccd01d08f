"""The ``shell`` task type: run a command line or an argv list.

Metadata only: the parameter model the daemon validates a job's ``params:``
with, and the hook that declares the task. The run itself is
:func:`schedd_plugins.run_shell.run`, a module with standard-library imports
only, so a run's freshly forked process never imports pydantic.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from scheduler.hookspecs import hookimpl
from scheduler.params import TaskParams
from scheduler.types import TaskType


class ShellParams(TaskParams):
    """``command`` as a string goes to ``/bin/sh -c``; as a list it is exec'd without a
    shell, so arguments need no quoting. ``env`` is added on top of the run's environment."""

    command: str | list[str] = Field(
        description="shell command line, or argv list run without a shell"
    )
    cwd: str | None = Field(default=None, description="working directory for the command")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment variables")

    @field_validator("command")
    @classmethod
    def _check_command(cls, value: str | list[str]) -> str | list[str]:
        parts = [value] if isinstance(value, str) else value
        if not parts or not parts[0].strip():
            raise ValueError("command must not be empty")
        if any("\0" in p for p in parts):
            raise ValueError("command must not contain NUL characters")
        if not all(_encodable(p) for p in parts):
            raise ValueError("command must be valid Unicode text (no lone surrogate escapes)")
        return value

    @field_validator("cwd")
    @classmethod
    def _check_cwd(cls, value: str | None) -> str | None:
        if value is not None and (not value or "\0" in value or not _encodable(value)):
            raise ValueError("cwd must be a non-empty path")
        return value

    @field_validator("env")
    @classmethod
    def _check_env(cls, value: dict[str, str]) -> dict[str, str]:
        for name, val in value.items():
            if not name or "=" in name or "\0" in name:
                raise ValueError(f"invalid environment variable name {name!r}")
            if "\0" in val:
                raise ValueError(f"environment variable {name} contains a NUL character")
            if not _encodable(name) or not _encodable(val):
                raise ValueError(f"environment variable {name!r} is not valid Unicode text")
        return value


def _encodable(text: str) -> bool:
    """False for a string the OS cannot take: a YAML ``"\\uD800"`` escape makes a
    lone surrogate, which ``execve`` would refuse only once the run starts."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


@hookimpl
def schedd_task_types() -> list[TaskType]:
    return [
        TaskType(
            name="shell",
            target="schedd_plugins.run_shell:run",
            summary="Run a command (string via /bin/sh -c, or an argv list without a shell)",
            params=ShellParams,
        )
    ]
