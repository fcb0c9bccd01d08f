"""The config file: find it, load it, validate all of it, hand out plain records.

Validation is complete before anything runs: every problem in the file (all
jobs, all keys, plugin params, schedule expressions) is collected with its
``file:line:col`` and raised once as :class:`~scheduler.errors.ConfigError`.

Merge rules for ``defaults`` (a partial job, validated once; its errors point
at ``defaults``):

* each key applies to every job that does not set it;
* ``env`` is merged key by key, the job's value winning; ``env_file`` is
  replaced as a whole (``env_file: null`` in a job drops the defaults' one);
* ``cron``/``every``/``at`` count as one key: a job that sets any of them
  ignores all three in ``defaults``;
* ``params`` are replaced as a whole, never merged, and are validated against
  each job's task.

Values: durations as in :mod:`scheduler.durations` (``90``, ``5m``, ``1h30m``);
``env`` values may be strings, numbers or booleans and become strings
(``true``/``false`` as YAML spells them); ``at`` takes a YAML timestamp or an
ISO 8601 string, a naive one or a bare date (midnight) meaning the job's time
zone, and a time in the past is only a warning; ``state_dir`` and ``env_file`` expand ``~``
and are relative to the config file's directory; an ``env_file`` is read at
load (its problems are config errors, a file other users may read is a
warning) and again at each run's start. Unknown keys are errors at
every level; duplicate keys too (see :mod:`scheduler.yamlsrc`).

This module imports no pydantic, apscheduler or loguru at import time: the
records below are plain dataclasses and the models load on first use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from scheduler.errors import ConfigError, Problem, ScheddError

if TYPE_CHECKING:
    from scheduler.confine import Limits, RunAs
    from scheduler.plugins import Registry
    from scheduler.triggers import Schedule

__all__ = [
    "CONFIG_ENV",
    "CONFIG_NAME",
    "JOB_DEFAULTS",
    "Config",
    "JobSpec",
    "config_json_schema",
    "find_config",
    "load_config",
]

#: Where ``find_config`` looks when no path is given.
CONFIG_ENV: Final = "SCHEDD_CONFIG"
CONFIG_NAME: Final = "schedd.yaml"

# The built-in defaults, in one place (the README documents them).
#: Top-level ``timezone`` when the file sets none.
DEFAULT_TIMEZONE: Final = "UTC"
DEFAULT_JITTER: Final = 0.0
DEFAULT_TIMEOUT: Final[float | None] = None
DEFAULT_KILL_GRACE: Final = 10.0
DEFAULT_OVERLAP: Final = "skip"
DEFAULT_CATCHUP: Final = "latest"
DEFAULT_CATCHUP_WINDOW: Final = 86400.0
DEFAULT_RETRIES: Final = 0
DEFAULT_RETRY_DELAY: Final = 10.0
DEFAULT_LOG_ROTATION: Final = "10 MB"
DEFAULT_LOG_RETENTION: Final = 5
DEFAULT_ENABLED: Final = True
DEFAULT_DESCRIPTION: Final = ""
DEFAULT_RERUN_LOST: Final = False
DEFAULT_HISTORY_LIMIT: Final = 1000
DEFAULT_HISTORY_MAX_AGE: Final = 90 * 86400.0

#: Every job key with a built-in default (durations in seconds), for docs and ``schedd``.
JOB_DEFAULTS: Final[dict[str, Any]] = {
    "jitter": DEFAULT_JITTER,
    "timeout": DEFAULT_TIMEOUT,
    "kill_grace": DEFAULT_KILL_GRACE,
    "overlap": DEFAULT_OVERLAP,
    "catchup": DEFAULT_CATCHUP,
    "catchup_window": DEFAULT_CATCHUP_WINDOW,
    "retries": DEFAULT_RETRIES,
    "retry_delay": DEFAULT_RETRY_DELAY,
    "env": {},
    "env_file": None,
    "log_rotation": DEFAULT_LOG_ROTATION,
    "log_retention": DEFAULT_LOG_RETENTION,
    "enabled": DEFAULT_ENABLED,
    "description": DEFAULT_DESCRIPTION,
    "rerun_lost": DEFAULT_RERUN_LOST,
    "history_limit": DEFAULT_HISTORY_LIMIT,
    "history_max_age": DEFAULT_HISTORY_MAX_AGE,
    "limits": None,
    "run_as": None,
}

OVERLAP_POLICIES: Final = ("skip", "queue", "replace", "allow")
CATCHUP_POLICIES: Final = ("none", "latest", "all")
TRIGGER_KEYS: Final = ("cron", "every", "at")
#: Job ids become file names, hence the narrow alphabet and length.
JOB_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
JOB_ID_RULE: Final = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
ENV_NAME_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_]*$"

TriggerKind = Literal["cron", "every", "at"]
Overlap = Literal["skip", "queue", "replace", "allow"]
Catchup = Literal["none", "latest", "all"]


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One validated job. Plain values only (durations in seconds), so the
    daemon and CLI read it without pydantic; ``line`` is the job id's line."""

    id: str
    task: str
    params: dict[str, Any]
    trigger_kind: TriggerKind
    trigger_expr: str
    schedule: Schedule
    timezone: str
    jitter: float = DEFAULT_JITTER
    timeout: float | None = DEFAULT_TIMEOUT
    kill_grace: float = DEFAULT_KILL_GRACE
    overlap: Overlap = DEFAULT_OVERLAP
    catchup: Catchup = DEFAULT_CATCHUP
    catchup_window: float = DEFAULT_CATCHUP_WINDOW
    retries: int = DEFAULT_RETRIES
    retry_delay: float = DEFAULT_RETRY_DELAY
    # Values may be secret: kept out of repr() so no log line or traceback shows them.
    env: dict[str, str] = field(default_factory=dict, repr=False)
    #: Absolute path of the job's env file, re-read at each run's start (see scheduler.envfile).
    env_file: str | None = None
    log_rotation: str = DEFAULT_LOG_ROTATION
    log_retention: int = DEFAULT_LOG_RETENTION
    enabled: bool = DEFAULT_ENABLED
    description: str = DEFAULT_DESCRIPTION
    rerun_lost: bool = DEFAULT_RERUN_LOST
    history_limit: int = DEFAULT_HISTORY_LIMIT
    history_max_age: float = DEFAULT_HISTORY_MAX_AGE
    limits: Limits | None = None
    run_as: RunAs | None = None
    line: int = 0


@dataclass(frozen=True, slots=True)
class Config:
    """A whole valid file. ``jobs`` keeps file order; ``warnings`` did not stop loading."""

    path: Path
    timezone: str
    state_dir: Path | None
    jobs: dict[str, JobSpec]
    warnings: list[Problem] = field(default_factory=list)


def find_config(explicit: str | None) -> Path:
    """The config to use: ``explicit``, else ``$SCHEDD_CONFIG``, else ``./schedd.yaml``.

    A path that is named but missing is an error rather than a fall-through,
    so a typo in ``--config`` never silently loads some other file.
    """
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ScheddError(f"config file not found: {explicit} (given with --config)")
        return path.absolute()
    from_env = os.environ.get(CONFIG_ENV)
    if from_env:
        path = Path(from_env).expanduser()
        if not path.is_file():
            raise ScheddError(f"config file not found: {from_env} (from ${CONFIG_ENV})")
        return path.absolute()
    path = Path(CONFIG_NAME)
    if path.is_file():
        return path.absolute()
    raise ScheddError(
        f"no config file: --config not given, ${CONFIG_ENV} not set,"
        f" and no ./{CONFIG_NAME} in {Path.cwd()}"
    )


def load_config(path: str | Path, registry: Registry, *, to_run: bool = True) -> Config:
    """Read, parse and validate ``path``; raise ConfigError listing every problem.

    Problems name the file as given (``path``), which reads best in a
    terminal; ``Config.path`` is absolute, which survives a ``chdir``.
    ``to_run``: the jobs are about to run from this process (daemon, reload,
    run-once), so ``run_as`` without root is an error; otherwise (``schedd
    validate``, listings) it is only a warning: people check a root daemon's
    file as themselves.
    """
    from scheduler import yamlsrc
    from scheduler.config_load import Loader

    name = str(path)
    absolute = Path(os.path.normpath(Path(path).expanduser().absolute()))
    try:
        data = absolute.read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError([Problem(name, 0, 0, f"cannot read config file: {reason}")]) from None
    # Loading builds millions of objects and no cycles: see gc_paused. The parsed
    # source (the raw values, and nodes if it needed them) is freed before it resumes.
    with yamlsrc.gc_paused():
        src = yamlsrc.parse_bytes(data, name)
        try:
            return Loader(src, registry, absolute, to_run=to_run).load()
        finally:
            del src


def config_json_schema(registry: Registry) -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of the file, for editors (yaml-language-server).

    Built from the same models that validate the file; each task's params
    schema applies through ``if task == X then params: ...``.
    """
    from scheduler.config_model import json_schema

    return json_schema(registry)
