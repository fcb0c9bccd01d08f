"""The ``schedd`` command.

Start-up cost is paid per invocation, so this module imports only click at
the top; every command imports the modules it needs when it runs (pydantic,
apscheduler and loguru each cost 100-500 ms here).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

if TYPE_CHECKING:
    from scheduler.config import Config, JobSpec
    from scheduler.plugins import Registry

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_INVALID = 1  # the config (or a named job) is invalid, or the command failed
EXIT_USAGE = 2  # click's own code for bad arguments


def _friendly_errors(fn: F) -> F:
    """Turn schedd's own errors into one clear line each (no traceback unless --debug)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from scheduler.errors import ConfigError, ScheddError

        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            if _debug():
                raise
            for problem in exc.problems:
                click.echo(str(problem), err=True)
            n = sum(1 for p in exc.problems if p.severity == "error")
            click.echo(f"{n} error{'s' if n != 1 else ''}; nothing was changed.", err=True)
            sys.exit(EXIT_INVALID)
        except ScheddError as exc:
            if _debug():
                raise
            click.echo(f"schedd: {exc}", err=True)
            sys.exit(EXIT_INVALID)

    return cast(F, wrapper)


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("debug"))


config_option = click.option(
    "--config",
    "-c",
    "config_path",
    metavar="PATH",
    help="Schedule file (default: $SCHEDD_CONFIG, then ./schedd.yaml).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _registry() -> Registry:
    from scheduler.plugins import load_plugins

    _, registry = load_plugins()
    return registry


def _load(config_path: str | None, *, to_run: bool = False) -> tuple[Config, Registry]:
    """Load the config; ``to_run``: this process will run its jobs (see load_config)."""
    from scheduler.config import find_config, load_config

    registry = _registry()
    return load_config(find_config(config_path), registry, to_run=to_run), registry


def _print_plugin_warnings(registry: Registry) -> None:
    for info in registry.broken:
        click.echo(
            f"warning: plugin {info.name!r} ({info.distribution}) failed to load: {info.error}",
            err=True,
        )
    for problem in registry.problems:
        click.echo(f"warning: {problem}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
@click.version_option(package_name="schedd", prog_name="schedd")
def main(debug: bool) -> None:
    """schedd: run jobs on cron, interval and one-shot schedules, each in an isolated process."""


@main.command()
@config_option
@_friendly_errors
def validate(config_path: str | None) -> None:
    """Check a schedule file completely; exit 1 listing every error."""
    config, registry = _load(config_path)
    _print_plugin_warnings(registry)
    for warning in config.warnings:
        click.echo(str(warning), err=True)
    enabled = sum(1 for j in config.jobs.values() if j.enabled)
    n = len(config.jobs)
    click.echo(
        f"{_display_path(config.path)}: OK, {n} job{'s' if n != 1 else ''} ({enabled} enabled), "
        f"{len(registry.task_types)} task types"
    )


def _display_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@main.command()
@config_option
@click.option("--state-dir", metavar="DIR", help="Ask the daemon of this state dir.")
@json_option
@_friendly_errors
def jobs(config_path: str | None, state_dir: str | None, as_json: bool) -> None:
    """List jobs: schedule in words, next fire; live state when a daemon runs.

    With a running daemon (found through --state-dir or the config's
    state_dir) the rows come from it: paused or not, last outcome. Without
    one they are computed from the config file.
    """
    from scheduler.cli_runs import live_jobs

    rows = live_jobs(state_dir, config_path) if state_dir or config_path or _has_config() else None
    live = rows is not None
    if rows is None:
        rows = _offline_jobs(config_path)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    from scheduler.cli_control import when

    table = []
    for r in rows:
        nxt = r["next_fire"]
        state = "disabled" if not r["enabled"] else ("paused" if r.get("paused") else "")
        last = r.get("last") or {}
        cells = [str(r["id"]), str(r["task"]), str(r["trigger"]), str(r["timezone"])]
        cells.append(state or (when(nxt) if live and nxt else str(nxt or "never")))
        if live:
            cells.append(f"{last.get('status', '-')} {when(last.get('ended_at'))}" if last else "-")
        table.append(cells)
    headers = ["JOB", "TASK", "TRIGGER", "TZ", "NEXT FIRE"] + (["LAST"] if live else [])
    click.echo(_table(headers, table))


def _has_config() -> bool:
    import os

    return bool(os.environ.get("SCHEDD_CONFIG")) or Path("schedd.yaml").is_file()


def _offline_jobs(config_path: str | None) -> list[dict[str, Any]]:
    from datetime import UTC

    config, _ = _load(config_path)
    now = datetime.now(UTC)
    rows = []
    for job in config.jobs.values():
        nxt = job.schedule.next_after(now) if job.enabled else None
        rows.append(
            {
                "id": job.id,
                "task": job.task,
                "trigger": job.schedule.describe(),
                "timezone": job.timezone,
                "enabled": job.enabled,
                "paused": None,
                "next_fire": nxt.isoformat() if nxt else None,
                "last": None,
                "description": job.description,
            }
        )
    return rows


@main.command(name="next")
@click.argument("job_id", metavar="JOB")
@config_option
@click.option("--count", "-n", default=5, show_default=True, type=click.IntRange(1, 100_000))
@click.option(
    "--from",
    "from_",
    metavar="ISO-8601",
    help="Start after this time (default: now). Without an offset it is in the job's time zone.",
)
@json_option
@_friendly_errors
def next_(
    config_path: str | None, job_id: str, count: int, from_: str | None, as_json: bool
) -> None:
    """Print the next fire times of JOB, strictly after --from."""
    from datetime import UTC

    from scheduler.errors import ScheddError

    config, _ = _load(config_path)
    job = _find_job(config, job_id)
    if from_ is None:
        start = datetime.now(UTC)
    else:
        try:
            start = datetime.fromisoformat(from_)
        except ValueError:
            raise ScheddError(
                f"--from {from_!r} is not an ISO-8601 date-time (e.g. 2027-03-28T01:30:00+01:00)"
            ) from None
        if start.tzinfo is None:
            start = start.replace(tzinfo=job.schedule.tz)
    times: list[str] = []
    t: datetime | None = start
    while len(times) < count:
        assert t is not None
        t = job.schedule.next_after(t)
        if t is None:
            break
        times.append(t.isoformat())
    if as_json:
        click.echo(json.dumps(times))
    else:
        for s in times:
            click.echo(s)


@main.command()
@json_option
@_friendly_errors
def plugins(as_json: bool) -> None:
    """List plugins, their distributions and task types; broken ones with their error."""
    from scheduler.plugins import describe_plugins, load_plugins

    _, registry = load_plugins(strict=False)
    described = describe_plugins(registry)
    if as_json:
        click.echo(
            json.dumps({"plugins": described, "problems": list(registry.problems)}, indent=2)
        )
        return
    rows = []
    for p in described:
        if p["blocked"]:
            state = "blocked"
        elif p["error"]:
            state = f"BROKEN: {p['error']}"
        else:
            state = ", ".join(t["name"] for t in p["task_types"]) or "-"
        rows.append([p["name"], f"{p['distribution']} {p['version']}", state])
    click.echo(_table(["PLUGIN", "DISTRIBUTION", "TASK TYPES"], rows))
    for problem in registry.problems:
        click.echo(f"error: {problem}", err=True)
    if described:
        click.echo("")
        for p in described:
            for t in p["task_types"]:
                click.echo(f"  {t['name']:<12} {t['summary']}")


@main.command()
@config_option
@click.option(
    "--state-dir", metavar="DIR", help="Logs, lock and state (default: the config's state_dir)."
)
@click.option(
    "--shutdown-grace",
    default="30s",
    show_default=True,
    metavar="DURATION",
    help="On SIGTERM, how long running runs may finish before their trees are ended.",
)
@_friendly_errors
def run(config_path: str | None, state_dir: str | None, shutdown_grace: str) -> None:
    """Run the daemon in the foreground (SIGHUP reloads, SIGTERM drains and exits)."""
    from scheduler.config import find_config, load_config
    from scheduler.daemon import Daemon, resolve_state_dir
    from scheduler.durations import parse_duration
    from scheduler.errors import ScheddError
    from scheduler.plugins import load_plugins

    try:
        grace = parse_duration(shutdown_grace)
    except ValueError as exc:
        raise ScheddError(f"--shutdown-grace: {exc}") from None
    pm, registry = load_plugins()
    config = load_config(find_config(config_path), registry)
    _print_plugin_warnings(registry)  # the config's warnings go to the daemon log
    daemon = Daemon(
        config,
        registry,
        resolve_state_dir(state_dir, config.state_dir),
        pm=pm,
        shutdown_grace=grace,
    )
    sys.exit(daemon.run())


@main.command(name="run-once")
@click.argument("job_id", metavar="JOB")
@config_option
@click.option("--timeout", metavar="DURATION", help="Override the job's timeout.")
@_friendly_errors
def run_once_cmd(job_id: str, config_path: str | None, timeout: str | None) -> None:
    """Run JOB once now, isolated as the daemon would, streaming its output.

    Exit status: 0 success, the task's exit code when it failed, 124 on
    timeout, 128+N when killed by signal N.
    """
    from scheduler.durations import parse_duration
    from scheduler.errors import ScheddError
    from scheduler.runonce import run_once

    config, registry = _load(config_path, to_run=True)
    job = _find_job(config, job_id)
    task = registry.task_types.get(job.task)
    if task is None:
        raise ScheddError(f"task {job.task!r} of job {job_id!r} is not available")
    try:
        limit = parse_duration(timeout) if timeout else None
    except ValueError as exc:
        raise ScheddError(f"--timeout: {exc}") from None
    sys.exit(run_once(job, task, timeout=limit))


def _find_job(config: Config, job_id: str) -> JobSpec:
    from scheduler.errors import ScheddError

    job = config.jobs.get(job_id)
    if job is None:
        import difflib

        hint = difflib.get_close_matches(job_id, list(config.jobs), n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ScheddError(f"no job {job_id!r} in {_display_path(config.path)}{extra}")
    return job


@main.command()
@_friendly_errors
def schema() -> None:
    """Print the JSON Schema of the schedule file (for editor completion)."""
    from scheduler.config import config_json_schema

    click.echo(json.dumps(config_json_schema(_registry()), indent=2))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(str(c))) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        cells = (str(c).ljust(w) for c, w in zip(row, widths, strict=True))
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _register_commands() -> None:
    from scheduler.cli_control import register
    from scheduler.cli_runs import history

    register(main)
    main.add_command(history)


_register_commands()

if __name__ == "__main__":  # pragma: no cover
    main()
