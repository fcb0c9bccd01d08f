"""From a job and a slot to the request the runner executes.

One place builds a run's context, environment and limits, so a scheduled
run, a retry, a manual trigger and ``schedd run-once`` cannot drift apart:
what a plugin author debugs with run-once is what the daemon runs.

A run's environment is exactly, later entries winning: the base allow-list
taken from the daemon's environment (:func:`scheduler.statedir.base_env`),
the job's ``env_file`` (read now, so a rotated secret needs no reload), the
job's ``env``, and the ``SCHEDD_*`` variables that say which run this is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from scheduler.types import RunContext, TaskType

if TYPE_CHECKING:
    from scheduler.config import JobSpec
    from scheduler.runner import RunRequest


@dataclass(frozen=True, slots=True)
class Start:
    """A request to start one attempt of one slot (``slot`` None: a manual run)."""

    slot: datetime | None
    attempt: int = 1
    reason: str = "scheduled"
    force: bool = False


def run_env(job_id: str, run_id: str, start: Start) -> dict[str, str]:
    """The variables that tell a run who it is (and let recovery find its processes)."""
    return {
        "SCHEDD_JOB_ID": job_id,
        "SCHEDD_RUN_ID": run_id,
        "SCHEDD_SCHEDULED_FOR": start.slot.isoformat() if start.slot else "",
        "SCHEDD_ATTEMPT": str(start.attempt),
    }


def build_request(
    spec: JobSpec,
    task: TaskType,
    run_id: str,
    start: Start,
    base_env: Mapping[str, str],
    *,
    timeout: float | None = None,
) -> RunRequest:
    """The run's request; ``timeout`` overrides the job's (run-once --timeout).

    Raises :class:`~scheduler.envfile.EnvFileError` if the job's env file
    cannot be read or parsed now.
    """
    from scheduler import redact
    from scheduler.runner import RunRequest

    from_file: dict[str, str] = {}
    if spec.env_file is not None:
        from scheduler import envfile

        from_file = envfile.read(spec.env_file)
    secrets = (
        *from_file.values(),
        *redact.env_secrets(spec.env),
        *redact.params_secrets(spec.params),
    )

    limit = spec.timeout if timeout is None else timeout
    identity = spec.run_as.env() if spec.run_as is not None else {}
    ctx = RunContext(
        job_id=spec.id,
        run_id=run_id,
        task=spec.task,
        params=spec.params,
        scheduled_for=start.slot,
        attempt=start.attempt,
        timeout=limit,
    )
    return RunRequest(
        run_id=run_id,
        job_id=spec.id,
        target=task.target,
        ctx=ctx,
        env={**base_env, **identity, **from_file, **spec.env, **run_env(spec.id, run_id, start)},
        secrets=tuple(dict.fromkeys(secrets)),
        timeout=limit,
        kill_grace=spec.kill_grace,
        # The daemon launches a slot's run slightly ahead of it; the task starts on time.
        not_before=start.slot.timestamp() if start.slot is not None else None,
        limits=spec.limits,
        run_as=spec.run_as,
    )
