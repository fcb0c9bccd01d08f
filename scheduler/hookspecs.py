"""The whole schedd plugin contract.

A plugin is a module (or object) with functions decorated by
``scheduler.hookspecs.hookimpl`` and registered under the ``schedd``
entry-point group::

    # pyproject.toml of your plugin distribution
    [project.entry-points.schedd]
    mytasks = "mytasks.plugin"

Every hook name starts with ``schedd_``; the plugin manager rejects any
``schedd_*`` function that is not specified here (``check_pending``), so a
misspelt hook fails loudly instead of never being called.

Plugin modules named by entry points are imported by the daemon and the CLI to
read *metadata* only. Keep them cheap and free of side effects; put the work
in the task's ``target`` module, which only the isolated child imports.
"""

from __future__ import annotations

from collections.abc import Sequence

import pluggy

from scheduler.types import RunInfo, RunResult, TaskType

PROJECT = "schedd"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def schedd_task_types() -> Sequence[TaskType]:
    """Return the task types this plugin provides.

    Called once when plugins load. Each :class:`~scheduler.types.TaskType`
    names the task (the value of a job's ``task:`` key), the import target of
    the function that runs it (``"pkg.module:function"``), a one-line summary
    and the pydantic model that validates the job's ``params:``.
    Two plugins providing the same task name is an error naming both.

    Example::

        from scheduler.hookspecs import hookimpl
        from scheduler.params import TaskParams
        from scheduler.types import TaskType

        class GreetParams(TaskParams):
            name: str

        @hookimpl
        def schedd_task_types():
            return [TaskType(name="greet", target="mytasks.run:greet",
                             summary="Print a greeting", params=GreetParams)]

    and in ``mytasks/run.py``::

        def greet(ctx):            # ctx: scheduler.types.RunContext
            print(f"hello {ctx.params['name']}")
    """
    raise NotImplementedError


@hookspec
def schedd_run_started(run: RunInfo) -> None:
    """Called in the daemon when a run's child process has started.

    For notifiers and metrics. Calls are bounded in time and isolated from
    the scheduling loop: a hook that raises is logged, one that hangs is
    abandoned after a short deadline; neither delays any job.

    Example::

        @hookimpl
        def schedd_run_started(run):
            statsd.incr(f"schedd.{run.job_id}.started")
    """


@hookspec
def schedd_run_finished(run: RunInfo, result: RunResult) -> None:
    """Called in the daemon when a run has ended, by any path.

    ``result.status`` is ``success``, ``failed``, ``timeout`` or ``killed``.
    The same isolation rules as :func:`schedd_run_started` apply.

    Example::

        @hookimpl
        def schedd_run_finished(run, result):
            if result.status != "success":
                page_oncall(f"{run.job_id} {result.status}")
    """
