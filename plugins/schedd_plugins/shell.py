"""The ``shell`` task: run a command line or an argv list.

In a run's own process (``scheduler.child.in_own_process()``) the command *replaces*
the Python process (``exec``): nothing is left to do afterwards, the process tree
stays one deep for the runner's timeout kill, signals reach the command directly,
and the exit status -- including death by a signal -- is the command's own. Run
in-process (tests), it becomes a subprocess and a signal death maps to 128 + signum,
as in a shell.

Either way stdin, stdout and stderr are inherited: the run's stdin is /dev/null and
its stdout/stderr are the log pipes. The command also sees the run's identity as
``SCHEDD_JOB_ID``, ``SCHEDD_RUN_ID``, ``SCHEDD_TASK``, ``SCHEDD_ATTEMPT`` and
``SCHEDD_SCHEDULED_FOR`` (ISO 8601, empty when unscheduled); ``env`` can override them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, field_validator

from scheduler.child import in_own_process
from scheduler.hookspecs import hookimpl
from scheduler.params import TaskParams
from scheduler.types import TaskType

if TYPE_CHECKING:
    from scheduler.types import RunContext

SHELL = "/bin/sh"
EXIT_NOT_FOUND = 127
EXIT_NOT_EXECUTABLE = 126


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
        return value

    @field_validator("cwd")
    @classmethod
    def _check_cwd(cls, value: str | None) -> str | None:
        if value is not None and (not value or "\0" in value):
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
        return value


@hookimpl
def schedd_task_types() -> list[TaskType]:
    return [
        TaskType(
            name="shell",
            target="schedd_plugins.shell:run",
            summary="Run a command (string via /bin/sh -c, or an argv list without a shell)",
            params=ShellParams,
        )
    ]


def run(ctx: RunContext) -> int:
    p = ShellParams.model_validate(ctx.params)
    argv = [SHELL, "-c", p.command] if isinstance(p.command, str) else list(p.command)
    env = dict(os.environ)
    env.update(
        SCHEDD_JOB_ID=ctx.job_id,
        SCHEDD_RUN_ID=ctx.run_id,
        SCHEDD_TASK=ctx.task,
        SCHEDD_ATTEMPT=str(ctx.attempt),
        SCHEDD_SCHEDULED_FOR=ctx.scheduled_for.isoformat() if ctx.scheduled_for else "",
    )
    env.update(p.env)
    if p.cwd is not None and not Path(p.cwd).is_dir():
        print(f"schedd shell: working directory {p.cwd!r} does not exist", file=sys.stderr)
        return 1
    if p.cwd is not None and "PWD" not in p.env:
        env["PWD"] = str(Path(p.cwd).absolute())  # as `cd` would; scripts read $PWD
    # Our own buffered output must land before the command's.
    sys.stdout.flush()
    sys.stderr.flush()
    if in_own_process():
        return _exec(argv, env, p.cwd)
    return _spawn(argv, env, p.cwd)


def _exec(argv: list[str], env: dict[str, str], cwd: str | None) -> int:
    import signal

    if cwd is not None:
        os.chdir(cwd)
    # Python ignores SIGPIPE/SIGXFSZ and exec keeps ignored signals ignored: restore
    # the defaults so `producer | head` ends quietly, as subprocess does.
    for name in ("SIGPIPE", "SIGXFSZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:  # still here: the exec failed
        return _cannot_run(argv[0], exc)


def _spawn(argv: list[str], env: dict[str, str], cwd: str | None) -> int:
    import subprocess

    try:
        proc = subprocess.run(argv, env=env, cwd=cwd, check=False)
    except OSError as exc:
        return _cannot_run(argv[0], exc)
    return 128 - proc.returncode if proc.returncode < 0 else proc.returncode


def _cannot_run(program: str, exc: OSError) -> int:
    print(f"schedd shell: cannot run {program!r}: {exc.strerror or exc}", file=sys.stderr)
    return EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_NOT_EXECUTABLE
