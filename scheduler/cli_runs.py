"""``schedd history`` and the live half of ``schedd jobs``.

History is read straight from the ledger file (read-only, WAL), so it works
whether or not a daemon is running and never waits on one.
"""

from __future__ import annotations

import json
from typing import Any

import click

from scheduler.cli_control import (
    _daemon_options,
    _friendly,
    _table,
    complete_job_ids,
    resolve_state_dir,
    when,
)

STATUSES = ("running", "success", "failed", "timeout", "killed", "skipped", "missed", "lost")


@click.command()
@click.argument("job", required=False, shell_complete=complete_job_ids)
@click.option("--limit", "-n", default=20, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--status", type=click.Choice(STATUSES), help="Only runs that ended so.")
@_daemon_options
@_friendly
def history(
    job: str | None,
    limit: int,
    status: str | None,
    state_dir: str | None,
    config_path: str | None,
    as_json: bool,
) -> None:
    """Past runs, newest first: every fire, including skipped and missed slots."""
    import re

    from scheduler.config import JOB_ID_PATTERN, JOB_ID_RULE
    from scheduler.errors import ScheddError
    from scheduler.ledger import LEDGER_FILE, Ledger

    if job is not None and not re.fullmatch(JOB_ID_PATTERN, job):  # no such job, ever
        raise click.BadParameter(f"{job!r} is not a job id ({JOB_ID_RULE})", param_hint="JOB")

    state = resolve_state_dir(state_dir, config_path)
    path = state / LEDGER_FILE
    if not path.exists():
        raise ScheddError(f"no run history in {state} yet (no {LEDGER_FILE})")
    with Ledger.open(path, readonly=True) as ledger:
        rows = ledger.history(job, limit=limit, status=status)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    table = [
        [
            str(r["run_id"]),
            str(r["job"]),
            _outcome(r),
            when(r.get("scheduled_for"), relative=False),
            when(r.get("started_at")),
            _duration(r),
            str(r.get("reason") or ""),
        ]
        for r in rows
    ]
    click.echo(_table(["RUN", "JOB", "STATUS", "SLOT", "STARTED", "TOOK", "REASON"], table))


def _outcome(r: dict[str, Any]) -> str:
    text = str(r["status"])
    if r.get("exit_code") not in (None, 0):
        text += f" ({r['exit_code']})"
    if r.get("signal"):
        text += f" ({r['signal']})"
    if (r.get("attempt") or 1) > 1:
        text += f" #{r['attempt']}"
    return text


def _duration(r: dict[str, Any]) -> str:
    from datetime import datetime

    try:
        took = datetime.fromisoformat(r["ended_at"]) - datetime.fromisoformat(r["started_at"])
    except (TypeError, ValueError, KeyError):
        return "-"
    return f"{took.total_seconds():.2f}s"


def live_jobs(state_dir: str | None, config_path: str | None) -> list[dict[str, Any]] | None:
    """The running daemon's view of its jobs, or None when no daemon answers."""
    from scheduler.control import ControlClient, NoDaemon

    try:
        state = resolve_state_dir(state_dir, config_path)
        return ControlClient(state).jobs()
    except NoDaemon:
        return None
