"""What a ``python`` run executes: the task function behind ``schedd_plugins.run_python:run``.

Calls ``pkg.module:function(*args, **kwargs)`` from the (already validated)
params. Standard library only (plus :mod:`scheduler.child`), so a fresh fork
that imports it pays next to nothing; the metadata and parameter model live in
:mod:`schedd_plugins.python`.

The function's return value becomes the exit status by the same rules as any
task (``scheduler.child.exit_status``); a target that cannot be imported gives
127, like a missing command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scheduler.child import exit_status, load_target

if TYPE_CHECKING:
    from scheduler.types import RunContext


def prepare(ctx: RunContext) -> None:
    """Import the target before the slot (see ``scheduler.child.run_task``), so the
    user's function starts on time; a target that cannot be imported fails here
    exactly as it would in :func:`run`."""
    load_target(ctx.params["target"])


def run(ctx: RunContext) -> int:
    params = ctx.params
    func = load_target(params["target"])  # TargetError -> exit status 127 in the child
    code, _ = exit_status(func(*params.get("args", ()), **params.get("kwargs", {})))
    return code


run.prepare = prepare  # type: ignore[attr-defined]
