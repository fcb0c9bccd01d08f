"""What a ``shell`` run executes: the task function behind ``schedd_plugins.run_shell:run``.

Standard library only (plus :mod:`scheduler.child`), so a fresh fork that
imports it pays next to nothing, and the launcher can preload it for free. The
task type's metadata and parameter model live in :mod:`schedd_plugins.shell`;
``ctx.params`` arrive already validated and normalised by that model.

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
from typing import TYPE_CHECKING

from scheduler.child import in_own_process

if TYPE_CHECKING:
    from scheduler.types import RunContext

SHELL = "/bin/sh"
EXIT_NOT_FOUND = 127
EXIT_NOT_EXECUTABLE = 126


def run(ctx: RunContext) -> int:
    params = ctx.params
    command: str | list[str] = params["command"]
    cwd: str | None = params.get("cwd")
    extra: dict[str, str] = params.get("env") or {}
    argv = [SHELL, "-c", command] if isinstance(command, str) else list(command)
    env = dict(os.environ)
    env.update(
        SCHEDD_JOB_ID=ctx.job_id,
        SCHEDD_RUN_ID=ctx.run_id,
        SCHEDD_TASK=ctx.task,
        SCHEDD_ATTEMPT=str(ctx.attempt),
        SCHEDD_SCHEDULED_FOR=ctx.scheduled_for.isoformat() if ctx.scheduled_for else "",
    )
    env.update(extra)
    if cwd is not None and not os.path.isdir(cwd):  # noqa: PTH112  (no pathlib to import)
        print(f"schedd shell: working directory {cwd!r} does not exist", file=sys.stderr)
        return 1
    if cwd is not None and "PWD" not in extra:
        env["PWD"] = os.path.abspath(cwd)  # noqa: PTH100  (as `cd` would; scripts read $PWD)
    # Our own buffered output must land before the command's.
    sys.stdout.flush()
    sys.stderr.flush()
    if in_own_process():
        return _exec(argv, env, cwd)
    return _spawn(argv, env, cwd)


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
