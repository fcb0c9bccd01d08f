"""Helpers for plugin authors' tests: run a task the way schedd does.

``run_task_inprocess`` is fast and lets pytest's ``capfd``/``capsys``, fixtures
and debuggers see the task; ``run_task_isolated`` runs it through
``python -m scheduler.child`` in a fresh process, the way the daemon's runner
launches it, so imports, exit statuses and signals behave exactly as in
production. Both validate ``params`` with the task's own model first, so a test
fails with pydantic's message when the params are wrong::

    from scheduler.testing import run_task_inprocess, run_task_isolated

    def test_greet(capfd):
        assert run_task_inprocess("greet", {"name": "world"}).exit_code == 0
        assert capfd.readouterr().out == "hello world\\n"

    def test_greet_isolated():
        run = run_task_isolated("greet", {"name": "world"})
        assert (run.exit_code, run.stdout) == (0, "hello world\\n")
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from scheduler.child import SPEC_ENV, ChildOutcome, run_task, spec_to_json
from scheduler.types import RunContext, TaskType

if TYPE_CHECKING:
    from scheduler.plugins import Registry

__all__ = ["ChildOutcome", "IsolatedRun", "make_context", "run_task_inprocess", "run_task_isolated"]


@dataclass(frozen=True, slots=True)
class IsolatedRun:
    """A finished isolated run. ``returncode`` is raw (``-N`` = killed by signal N)."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def exit_code(self) -> int:
        """The status as a shell reports it: 128 + N for a death by signal N."""
        return 128 - self.returncode if self.returncode < 0 else self.returncode

    @property
    def signal(self) -> str | None:
        return signal.Signals(-self.returncode).name if self.returncode < 0 else None


def _resolve(task: TaskType | str, registry: Registry | None) -> TaskType:
    if isinstance(task, TaskType):
        return task
    from scheduler.plugins import explain_unknown_task, load_plugins

    if registry is None:
        _, registry = load_plugins()
    found = registry.task_types.get(task)
    if found is None:
        raise LookupError(explain_unknown_task(registry, task))
    return found


def make_context(
    task: TaskType | str,
    params: Mapping[str, Any],
    *,
    job_id: str = "test",
    registry: Registry | None = None,
) -> tuple[TaskType, RunContext]:
    """Validate ``params`` with the task's model (raising pydantic's ``ValidationError``)
    and build the :class:`RunContext` the runner would, params normalised to JSON values."""
    task_type = _resolve(task, registry)
    model = task_type.params.model_validate(dict(params))
    ctx = RunContext(
        job_id=job_id,
        run_id=f"{job_id}-{os.getpid()}-{datetime.now(UTC).strftime('%H%M%S%f')}",
        task=task_type.name,
        params=model.model_dump(mode="json"),
        scheduled_for=datetime.now(UTC).replace(microsecond=0),
    )
    return task_type, ctx


def run_task_inprocess(
    task: TaskType | str,
    params: Mapping[str, Any],
    *,
    job_id: str = "test",
    registry: Registry | None = None,
) -> ChildOutcome:
    """Run the task in this process (output goes to this process's stdout/stderr)."""
    task_type, ctx = make_context(task, params, job_id=job_id, registry=registry)
    return run_task(task_type.target, ctx)


def run_task_isolated(
    task: TaskType | str,
    params: Mapping[str, Any],
    *,
    job_id: str = "test",
    registry: Registry | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = 60.0,
) -> IsolatedRun:
    """Run the task via ``python -m scheduler.child`` with stdin from /dev/null.

    The spec travels in ``$SCHEDD_RUN_SPEC`` rather than argv, as the runner should
    pass it: argv is visible to every user in ``ps``. ``env`` replaces the child's
    environment (default: this process's).
    """
    task_type, ctx = make_context(task, params, job_id=job_id, registry=registry)
    child_env = dict(os.environ if env is None else env)
    child_env[SPEC_ENV] = spec_to_json(task_type.target, ctx)
    proc = subprocess.run(
        [sys.executable, "-m", "scheduler.child"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=child_env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )
    return IsolatedRun(proc.returncode, proc.stdout, proc.stderr)
