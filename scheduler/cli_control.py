"""``schedd`` commands that talk to a running daemon, plus ``schedd logs``.

``register(main)`` adds them to the ``schedd`` group. They find the daemon by
its state dir: ``--state-dir``, else the ``state_dir`` of the config
(``--config``, ``$SCHEDD_CONFIG``, ``./schedd.yaml``), else the default. The
config is read for that one key only (not validated, no plugins loaded): a
control command must work while the file is being edited, and ``schedd
reload`` exists precisely to report a broken file's errors from the daemon.

These run on every ``schedd status``, so only click is imported up front;
``scheduler.cli`` is imported lazily too, which keeps this module importable
from ``cli.py`` at any point (no import cycle under ``python -m``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

if TYPE_CHECKING:
    from click.shell_completion import CompletionItem

    from scheduler.control import ControlClient

F = TypeVar("F", bound=Callable[..., Any])


def _friendly(fn: F) -> F:
    """``scheduler.cli._friendly_errors``, looked up when the command runs."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from scheduler.cli import _friendly_errors

        return _friendly_errors(fn)(*args, **kwargs)

    return cast(F, wrapper)


def _daemon_options(fn: F) -> F:
    """``--state-dir``, ``--config`` and ``--json``, shared by every command here."""
    fn = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(fn)
    fn = click.option(
        "--config",
        "-c",
        "config_path",
        metavar="PATH",
        type=click.Path(dir_okay=False),
        help="Find the state dir from this schedule file's state_dir.",
    )(fn)
    return click.option(
        "--state-dir",
        metavar="DIR",
        # Not readable=True (click's default): another user's 0700 state dir must get
        # the control client's clear "belongs to another user", not a usage error.
        type=click.Path(file_okay=False, readable=False),
        help="The daemon's state dir (default: the config's state_dir, else the default).",
    )(fn)


# ---- finding the daemon -------------------------------------------------------------
def _read_config(config_path: str | None) -> tuple[Path, dict[str, Any]] | None:
    """The config file and its top-level mapping (unvalidated); None if no file is found."""
    from scheduler import yamlsrc
    from scheduler.config import CONFIG_ENV, find_config
    from scheduler.errors import ScheddError

    if config_path is None and not os.environ.get(CONFIG_ENV) and not Path("schedd.yaml").is_file():
        return None
    path = find_config(config_path)
    try:
        src = yamlsrc.parse_bytes(path.read_bytes(), str(path))
    except OSError as exc:
        raise ScheddError(f"cannot read {path}: {exc.strerror}") from None
    if src.fatal:
        raise ScheddError(f"{src.problems[0]} (pass --state-dir to reach the daemon)")
    return path, src.data if isinstance(src.data, dict) else {}


def resolve_state_dir(state_dir: str | None, config_path: str | None) -> Path:
    """Where the daemon lives, by the rules of ``schedd run`` (explicit, config, default)."""
    from scheduler.errors import ScheddError
    from scheduler.statedir import default_state_dir

    if state_dir:
        return Path(state_dir).expanduser().resolve()
    found = _read_config(config_path)
    if found is None:
        return default_state_dir()
    path, data = found
    value = data.get("state_dir")
    if value is None or value == "":
        return default_state_dir()
    if not isinstance(value, str) or "\0" in value:
        raise ScheddError(f"{path}: state_dir is not a path; pass --state-dir")
    return Path(os.path.normpath(path.parent / Path(value).expanduser()))


def _client(state_dir: str | None, config_path: str | None) -> ControlClient:
    from scheduler.control import ControlClient

    return ControlClient(resolve_state_dir(state_dir, config_path))


# ---- output ---------------------------------------------------------------------------
def _span(seconds: float, units: int = 2) -> str:
    """A duration in its largest ``units`` units: ``3h2m``, ``45s``."""
    s = max(0, int(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size or (unit == "s" and not parts):
            parts.append(f"{s // size}{unit}")
            s %= size
    return "".join(parts[:units])


def when(value: object, now: datetime | None = None, *, relative: bool = True) -> str:
    """An ISO time as ``2026-11-28 12:04:02 (3m ago)``, in the local zone."""
    if not isinstance(value, str) or not value:
        return "-"
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        return value
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    text = f"{at.astimezone():%Y-%m-%d %H:%M:%S}"
    if not relative:
        return text
    delta = ((now or datetime.now(UTC)) - at).total_seconds()
    if abs(delta) < 1:
        return f"{text} (just now)"
    span = _span(abs(delta), 1)
    return f"{text} ({'in ' + span if delta < 0 else span + ' ago'})"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    from scheduler.cli import _table as table

    return table(headers, rows)


def _emit_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2))


def _names(ids: object) -> str:
    return ", ".join(str(i) for i in ids) if isinstance(ids, list) else ""


# ---- completion ---------------------------------------------------------------------
def complete_job_ids(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Job ids for shell completion: the config's ``jobs`` keys, else the daemon's.

    Runs on every Tab, so it reads the YAML without validating it; it must
    never fail, so any error means no suggestions.
    """
    from click.shell_completion import CompletionItem

    items: list[CompletionItem] = []
    try:
        found = _read_config(ctx.params.get("config_path"))
        if found is not None:
            jobs = found[1].get("jobs")
            for job_id, body in (jobs if isinstance(jobs, dict) else {}).items():
                help_ = body.get("description") if isinstance(body, dict) else None
                items.append(CompletionItem(str(job_id), help=help_ or None))
        else:
            from scheduler.control import ControlClient

            state = resolve_state_dir(ctx.params.get("state_dir"), None)
            items = [CompletionItem(j["id"]) for j in ControlClient(state, timeout=1).jobs()]
    except Exception:
        return []
    return [i for i in items if str(i.value).startswith(incomplete)]


def complete_run_ids(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Ids of the daemon's running runs, for ``schedd cancel``; [] on any error."""
    from click.shell_completion import CompletionItem

    from scheduler.control import ControlClient

    try:
        state = resolve_state_dir(ctx.params.get("state_dir"), ctx.params.get("config_path"))
        running = ControlClient(state, timeout=1).status().get("running") or []
        return [
            CompletionItem(r["run_id"], help=r.get("job"))
            for r in running
            if str(r["run_id"]).startswith(incomplete)
        ]
    except Exception:
        return []


# ---- daemon commands ---------------------------------------------------------------
@click.command()
@_daemon_options
@_friendly
def status(state_dir: str | None, config_path: str | None, as_json: bool) -> None:
    """Show the running daemon's state.

    Pid, uptime, config file, number of jobs, running runs and the result of
    the last reload (with its errors if it was rejected).
    """
    info = _client(state_dir, config_path).status()
    if as_json:
        _emit_json(info)
        return
    reload_ = info.get("last_reload")
    if not reload_:
        reload_text = "none since start"
    elif reload_.get("ok"):
        reload_text = f"{when(reload_.get('at'))}: applied"
    else:
        reload_text = f"{when(reload_.get('at'))}: REJECTED, the old schedule keeps running"
    running = info.get("running") or []
    since = when(info.get("started_at"), relative=False)
    rows = [
        ["pid", str(info.get("pid", "?"))],
        ["up", f"{_span(info.get('uptime_s') or 0)} (since {since})"],
        ["config", str(info.get("config_path", "?"))],
        ["state dir", str(info.get("state_dir", "?"))],
        ["jobs", str(info.get("jobs", "?"))],
        ["running", str(len(running))],
        ["last reload", reload_text],
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")
    for error in (reload_ or {}).get("errors") or []:
        click.echo(f"  {error}")
    if running:
        click.echo("")
        table = [
            [
                str(r.get("run_id")),
                str(r.get("job")),
                when(r.get("started_at")),
                str(r.get("pid") or "-"),
            ]
            for r in running
        ]
        click.echo(_table(["RUN", "JOB", "STARTED", "PID"], table))


@click.command()
@click.argument("job", shell_complete=complete_job_ids)
@click.option("--force", is_flag=True, help="Fire even if paused, disabled or still running.")
@_daemon_options
@_friendly
def trigger(
    job: str, force: bool, state_dir: str | None, config_path: str | None, as_json: bool
) -> None:
    """Fire JOB now.

    The job's overlap policy applies unless --force, which also fires a
    paused or disabled job.
    """
    result = _client(state_dir, config_path).trigger(job, force)
    if as_json:
        _emit_json(result)
    elif result.get("message"):
        click.echo(str(result["message"]))
    else:
        click.echo(f"triggered {job}: run {result.get('run_id')}")


def _pause_command(verb: str, done: str, summary: str) -> click.Command:
    """``pause`` and ``resume`` differ only in words and the handler method."""

    @click.command(name=verb, help=summary)
    @click.argument("jobs", nargs=-1, metavar="JOB...", shell_complete=complete_job_ids)
    @click.option("--all", "all_", is_flag=True, help="Every job.")
    @_daemon_options
    @_friendly
    def command(
        jobs: tuple[str, ...],
        all_: bool,
        state_dir: str | None,
        config_path: str | None,
        as_json: bool,
    ) -> None:
        if bool(jobs) == all_:
            raise click.UsageError(f"name the jobs to {verb}, or pass --all (not both)")
        client = _client(state_dir, config_path)
        result = getattr(client, verb)(None if all_ else list(jobs))
        if as_json:
            _emit_json(result)
            return
        changed, unchanged = result.get("changed") or [], result.get("unchanged") or []
        if changed:
            click.echo(f"{done}: {_names(changed)}")
        if unchanged:
            click.echo(f"already {'paused' if verb == 'pause' else 'active'}: {_names(unchanged)}")
        if not changed and not unchanged:
            click.echo("no jobs")

    return command


pause = _pause_command(
    "pause",
    "paused",
    "Stop firing JOBs until resumed.\n\nRunning runs go on; --all pauses every job.",
)
resume = _pause_command(
    "resume", "resumed", "Fire paused JOBs on schedule again.\n\n--all resumes every job."
)


@click.command()
@_daemon_options
@_friendly
def reload(state_dir: str | None, config_path: str | None, as_json: bool) -> None:
    """Re-read the daemon's config file.

    Prints the jobs added, removed and changed; an invalid file is rejected
    with its errors and exit status 1, and the old schedule keeps running.
    """
    result = _client(state_dir, config_path).reload()
    if as_json:
        _emit_json(result)
    elif result.get("ok"):
        parts = [
            f"{len(result.get(k) or [])} {k} ({_names(result.get(k))})"
            for k in ("added", "removed", "changed")
            if result.get(k)
        ]
        click.echo(f"reload applied: {', '.join(parts) or 'no changes'}")
    else:
        errors = result.get("errors") or []
        for error in errors:
            click.echo(str(error), err=True)
        n = len(errors)
        click.echo(
            f"reload rejected ({n} error{'s' if n != 1 else ''}): the old schedule keeps running",
            err=True,
        )
    if not result.get("ok"):
        sys.exit(1)


@click.command()
@click.argument("run_id", metavar="RUN_ID", shell_complete=complete_run_ids)
@_daemon_options
@_friendly
def cancel(run_id: str, state_dir: str | None, config_path: str | None, as_json: bool) -> None:
    """End a running run's process tree.

    SIGTERM, then SIGKILL after the job's kill grace.
    """
    result = _client(state_dir, config_path).cancel(run_id)
    if as_json:
        _emit_json(result)
    else:
        click.echo(str(result.get("message") or f"cancelling run {run_id} of {result.get('job')}"))


def _duration(value: str | None, option: str) -> float | None:
    from scheduler.durations import parse_duration

    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an unreaped daemon has exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] not in (["Z"], ["X"])


def _daemon_gone(state: Path, pid: object) -> bool:
    from scheduler.control import ControlClient
    from scheduler.errors import ScheddError

    if isinstance(pid, int) and pid > 0 and _pid_alive(pid):
        return False
    try:
        answer = ControlClient(state, timeout=2).ping()
    except ScheddError:
        return True
    return isinstance(pid, int) and answer.get("pid") != pid  # a new daemon took over


@click.command()
@click.option(
    "--grace",
    metavar="DURATION",
    help="How long running runs may finish (default: the daemon's --shutdown-grace).",
)
@click.option(
    "--wait",
    metavar="DURATION",
    help="How long to wait for the exit (default: the grace period + 60s).",
)
@_daemon_options
@_friendly
def stop(
    grace: str | None,
    wait: str | None,
    state_dir: str | None,
    config_path: str | None,
    as_json: bool,
) -> None:
    """Stop the daemon; return once it has exited.

    Running runs get --grace to finish; exit 1 if the daemon is still there
    after --wait.
    """
    from scheduler.durations import format_duration
    from scheduler.errors import ScheddError

    grace_s, wait_s = _duration(grace, "--grace"), _duration(wait, "--wait")
    client = _client(state_dir, config_path)
    result = client.stop(grace_s)
    pid, effective = result.get("pid"), result.get("grace")
    limit = wait_s if wait_s is not None else float(effective or 0) + 60
    if not as_json:
        click.echo(
            f"stopping schedd (pid {pid}); runs get {_span(float(effective or 0))} to finish",
            err=True,
        )
    start = time.monotonic()
    while not _daemon_gone(client.state_dir, pid):
        if time.monotonic() - start >= limit:
            raise ScheddError(
                f"the daemon (pid {pid}) has not exited after {format_duration(round(limit, 3))}; "
                f"it may still be ending runs (see {client.state_dir / 'schedd.log'})"
            )
        time.sleep(0.1)
    waited = round(time.monotonic() - start, 3)
    if as_json:
        _emit_json({"pid": pid, "stopped": True, "waited_s": waited})
    else:
        click.echo(f"schedd stopped (pid {pid})")


def register(group: click.Group) -> None:
    """Add the daemon commands and ``logs`` to ``group`` (the ``schedd`` group)."""
    from scheduler.cli_logs import logs

    for command in (status, trigger, pause, resume, reload, cancel, stop, logs):
        group.add_command(command)


def _main() -> None:
    """``python -m scheduler.cli_control``: these commands alone (for tests and
    until ``cli.py`` registers them)."""

    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
    def group(debug: bool) -> None:
        """schedd daemon control commands."""

    register(group)
    group(prog_name="schedd")


if __name__ == "__main__":
    _main()
