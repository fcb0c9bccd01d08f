"""The pydantic models of the config file, their error messages, and its JSON Schema.

Kept apart from :mod:`scheduler.config` so that importing the records costs no
pydantic. Validators raise messages in the project's style: a phrase starting
with "must" gets the key's name put in front ("retries must be ..."); anything
else is a complete sentence. Pydantic's own messages are rewritten the same
way, without URLs or "Input should be".
"""

from __future__ import annotations

import difflib
import functools
import itertools
import re
import zoneinfo
from datetime import date, datetime
from typing import TYPE_CHECKING, Annotated, Any, NotRequired

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    TypeAdapter,
    WithJsonSchema,
)
from pydantic.json_schema import models_json_schema
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from scheduler import config as c
from scheduler.durations import (
    DURATION_PATTERN,
    SIZE_PATTERN,
    DurationError,
    normalize_size,
    parse_duration,
)
from scheduler.yamlsrc import kind as kind

if TYPE_CHECKING:
    from scheduler.plugins import Registry


class Complete(ValueError):
    """A validator message that is a whole sentence (no key name in front)."""


def did_you_mean(word: object, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` or nothing; case slips are caught first."""
    if not isinstance(word, str):
        return ""
    same = [ch for ch in choices if ch.lower() == word.lower()]
    close = same or difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@functools.cache
def _zones() -> list[str]:
    return sorted(zoneinfo.available_timezones())


def check_timezone(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(
            f"must be an IANA time zone name such as 'Europe/Berlin' (got {kind(value)})"
        )
    try:
        zoneinfo.ZoneInfo(value)
    except Exception:  # not found, a path-like key, an unreadable file ...
        raise Complete(f"invalid time zone {value!r}{did_you_mean(value, _zones())}") from None
    return value


def _explain(exc: DurationError) -> ValueError:
    if exc.reason:
        return ValueError(f"{exc.reason} (got {kind(exc.value)})")
    return ValueError(f"must be a {exc.noun} (got {kind(exc.value)}); {exc.hint}")


def _duration(value: object) -> float:
    try:
        return parse_duration(value)
    except DurationError as exc:
        raise _explain(exc) from None


def _positive_duration(value: object) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise ValueError(f"must be greater than 0 (got {kind(value)})")
    return seconds


def _timeout(value: object) -> float | None:
    if value is None:
        return None
    seconds = _duration(value)
    if seconds <= 0:
        raise ValueError(f"must be greater than 0, or null for no timeout (got {kind(value)})")
    return seconds


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string (got {kind(value)})")
    return value


def _nonempty(value: object) -> str:
    if not _text(value).strip():
        raise ValueError("must not be empty")
    return str(value)


#: Counts (retries, log_retention, history_limit) stop here: SQLite takes no larger
#: integer, and nothing is meant to be counted further (history_limit: 10**30 made
#: every pruning round of the job fail, age-based pruning included).
MAX_COUNT = 2**31 - 1


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"must be a whole number >= 0 (got {kind(value)})")
    if value > MAX_COUNT:
        raise ValueError(f"must be at most {MAX_COUNT} (got {kind(value)})")
    return value


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false (got {kind(value)})")
    return value


def _choice(options: tuple[str, ...]) -> BeforeValidator:
    def check(value: object) -> str:
        if not isinstance(value, str) or value not in options:
            hint = did_you_mean(value, list(options)).replace(" (", "; ").rstrip(")")
            raise ValueError(f"must be one of {', '.join(options)} (got {kind(value)}{hint})")
        return value

    return BeforeValidator(check)


def _size(value: object) -> str:
    try:
        return normalize_size(value)
    except DurationError as exc:
        raise _explain(exc) from None


def _mapping(value: object) -> dict[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping (got {kind(value)})")
    return value


def _env_name(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(c.ENV_NAME_PATTERN, value):
        raise Complete(
            f"invalid environment variable name {kind(value)}:"
            " use letters, digits and '_', not starting with a digit"
        )
    return value


def os_text(value: str) -> str:
    """``value`` if the OS can take it (environment, paths): no NUL, and encodable.

    YAML's ``"\\0"`` and ``"\\uD800"`` escapes make strings that ``execve``
    and ``open`` refuse; caught here they are a located error, not a failed
    run or a daemon that cannot create its state dir.
    """
    if "\0" in value:
        raise ValueError("must not contain a NUL character")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogate escapes)") from None
    return value


def _env_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return os_text(value)
    if isinstance(value, int | float):
        return str(value)
    raise ValueError(f"must be a string, number or true/false (got {kind(value)})")


def _at(value: object) -> datetime | date:
    if isinstance(value, datetime | date):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.strip())
        except ValueError:
            pass
    raise ValueError(
        "must be an ISO 8601 date-time such as 2025-06-01T09:30:00 or"
        f" 2025-06-01 09:30:00+02:00 (got {kind(value)})"
    )


_DURATION_SCHEMA = {
    "anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": DURATION_PATTERN},
    ],
}
_SIZE_SCHEMA = {
    "anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": SIZE_PATTERN}]
}
Duration = Annotated[float, BeforeValidator(_duration), WithJsonSchema(_DURATION_SCHEMA)]
EnvName = Annotated[
    str,
    BeforeValidator(_env_name),
    WithJsonSchema({"type": "string", "pattern": c.ENV_NAME_PATTERN}),
]
EnvValue = Annotated[
    str, BeforeValidator(_env_value), WithJsonSchema({"type": ["string", "number", "boolean"]})
]


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def _unset(description: str) -> Any:
    """A key with no built-in default: None means "not written" (see
    ``model_fields_set``); the validators never let an explicit null through."""
    return Field(None, description=description, json_schema_extra=_no_default)


_STRING = WithJsonSchema({"type": "string"})


def _optional_path(value: object) -> str | None:
    return None if value is None else os_text(_nonempty(value))


#: Memory limits: bytes, or K/M/G/T (also KiB ... TiB), binary units either way.
MEMORY_PATTERN = r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGTkmgt])(?:i[Bb])?)?\s*$"
_MEMORY_RE = re.compile(MEMORY_PATTERN)
_MEMORY_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
MIN_MEMORY = 1 << 20
MAX_MEMORY = (1 << 63) - 1


def _memory(value: object) -> int:
    form = "bytes or an amount with K, M, G or T (binary units: 256M is 256 MiB)"
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (match := _MEMORY_RE.fullmatch(value)):
        amount = float(match.group(1)) * _MEMORY_UNITS[(match.group(2) or "").lower()]
        size = round(amount) if amount <= MAX_MEMORY else MAX_MEMORY + 1  # inf: no OverflowError
    else:
        raise ValueError(f"must be {form} (got {kind(value)})")
    if size < MIN_MEMORY:
        raise ValueError(f"must be at least 1M (got {kind(value)})")
    if size > MAX_MEMORY:  # setrlimit takes a C long: more would fail every run
        raise ValueError(f"must be at most 8E, {MAX_MEMORY} bytes (got {kind(value)})")
    return size


def _at_least_one(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be a whole number >= 1 (got {kind(value)})")
    if value > MAX_COUNT:  # setrlimit would fail every run
        raise ValueError(f"must be at most {MAX_COUNT} (got {kind(value)})")
    return value


#: ``limits.nice`` bounds: setpriority(2)'s range; below 0 needs root.
MIN_NICE, MAX_NICE = -20, 19


def _nice(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_NICE <= value <= MAX_NICE:
        raise ValueError(
            f"must be a whole number from {MIN_NICE} to {MAX_NICE}"
            f" (below 0 needs root; got {kind(value)})"
        )
    return value


#: ``user`` or ``user:group``: names as useradd(8) allows them, no spaces.
RUN_AS_PATTERN = r"^[A-Za-z0-9._][A-Za-z0-9._$-]*(?::[A-Za-z0-9._][A-Za-z0-9._$-]*)?$"


def _run_as(value: object) -> str | None:
    if value is None:  # a job's way out of defaults' run_as
        return None
    if not isinstance(value, str) or not re.fullmatch(RUN_AS_PATTERN, value):
        raise ValueError(f"must be a user name, or USER:GROUP (got {kind(value)})")
    return value


class LimitFields(BaseModel):
    """A job's ``limits:``; each key is optional and overrides the one in ``defaults``."""

    model_config = ConfigDict(
        extra="forbid",
        title="Limits",
        json_schema_extra={"description": "Resource limits of each run, enforced in its process."},
    )

    memory: Annotated[
        int | None,
        BeforeValidator(_memory),
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "integer", "minimum": MIN_MEMORY, "maximum": MAX_MEMORY},
                    {"type": "string", "pattern": MEMORY_PATTERN},
                ]
            }
        ),
    ] = _unset(
        "Address space per process (RLIMIT_AS) and, with a cgroup, the whole run's memory: 256M."
    )
    cpu: Annotated[
        float | None, BeforeValidator(_positive_duration), WithJsonSchema(_DURATION_SCHEMA)
    ] = _unset("CPU time per process (RLIMIT_CPU): SIGXCPU at the limit, SIGKILL 1s later.")
    open_files: Annotated[
        int | None,
        BeforeValidator(_at_least_one),
        WithJsonSchema({"type": "integer", "minimum": 1, "maximum": MAX_COUNT}),
    ] = _unset("Open file descriptors per process (RLIMIT_NOFILE).")
    processes: Annotated[
        int | None,
        BeforeValidator(_at_least_one),
        WithJsonSchema({"type": "integer", "minimum": 1, "maximum": MAX_COUNT}),
    ] = _unset(
        "Processes (and threads) of a run: a cgroup pids limit, else RLIMIT_NPROC (per user)."
    )
    nice: Annotated[
        int | None,
        BeforeValidator(_nice),
        WithJsonSchema({"type": "integer", "minimum": MIN_NICE, "maximum": MAX_NICE}),
    ] = _unset(
        "CPU priority of the run's processes, added to the daemon's nice value: 10 yields"
        " the CPU to other jobs; below 0 needs the daemon to run as root."
    )


class JobFields(BaseModel):
    """A job, and ``defaults`` (a partial job). Every key is optional here
    because ``defaults`` may supply it; ``model_fields_set`` tells what the
    file wrote, and the loader applies the rules that need the merge."""

    model_config = ConfigDict(
        extra="forbid", title="Job", json_schema_extra={"description": "One scheduled job."}
    )

    task: Annotated[str | None, BeforeValidator(_nonempty), _STRING] = _unset(
        "Task type name, from an installed plugin."
    )
    params: Annotated[
        dict[str, Any] | None, BeforeValidator(_mapping), WithJsonSchema({"type": "object"})
    ] = _unset("Parameters of the task type.")
    cron: Annotated[str | None, BeforeValidator(_nonempty), _STRING] = _unset(
        "crontab(5) expression, e.g. '*/5 * * * *' (one of cron, every, at)."
    )
    every: Annotated[
        float | None, BeforeValidator(_positive_duration), WithJsonSchema(_DURATION_SCHEMA)
    ] = _unset("Interval such as 90s, 5m, 1h30m (one of cron, every, at).")
    at: Annotated[datetime | date | None, PlainValidator(_at), _STRING] = _unset(
        "One-shot ISO 8601 date-time; naive: in the job's time zone (one of cron, every, at)."
    )
    timezone: Annotated[str | None, BeforeValidator(check_timezone), _STRING] = _unset(
        "IANA time zone name; default: the top-level timezone."
    )
    jitter: Duration = Field(c.DEFAULT_JITTER, description="Random delay up to this long.")
    timeout: Annotated[
        float | None,
        BeforeValidator(_timeout),
        WithJsonSchema({"anyOf": [_DURATION_SCHEMA, {"type": "null"}]}),
    ] = Field(c.DEFAULT_TIMEOUT, description="Stop a run after this long; null: never.")
    kill_grace: Duration = Field(
        c.DEFAULT_KILL_GRACE, description="Wait between SIGTERM and SIGKILL on timeout."
    )
    overlap: Annotated[c.Overlap, _choice(c.OVERLAP_POLICIES)] = Field(
        c.DEFAULT_OVERLAP, description="When a run is due while one is running."
    )
    catchup: Annotated[c.Catchup, _choice(c.CATCHUP_POLICIES)] = Field(
        c.DEFAULT_CATCHUP, description="Which missed runs to start after downtime."
    )
    catchup_window: Duration = Field(
        c.DEFAULT_CATCHUP_WINDOW, description="How far back a missed run still counts."
    )
    retries: Annotated[int, Field(ge=0, le=MAX_COUNT), BeforeValidator(_count)] = Field(
        c.DEFAULT_RETRIES, description="Extra attempts after a failed run."
    )
    retry_delay: Duration = Field(c.DEFAULT_RETRY_DELAY, description="Wait before a retry.")
    env: Annotated[dict[EnvName, EnvValue], BeforeValidator(_mapping)] = Field(
        default_factory=dict, description="Environment variables, merged with defaults' env."
    )
    env_file: Annotated[
        str | None,
        BeforeValidator(_optional_path),
        WithJsonSchema({"type": ["string", "null"]}),
    ] = Field(
        None,
        description="dotenv file of secret variables (KEY=VALUE lines), relative to this file;"
        " re-read at each run's start; null: none.",
    )
    log_rotation: Annotated[str, BeforeValidator(_size), WithJsonSchema(_SIZE_SCHEMA)] = Field(
        c.DEFAULT_LOG_ROTATION, description="Rotate the job's log file at this size."
    )
    log_retention: Annotated[int, Field(ge=0, le=MAX_COUNT), BeforeValidator(_count)] = Field(
        c.DEFAULT_LOG_RETENTION, description="Rotated log files to keep."
    )
    enabled: Annotated[bool, BeforeValidator(_flag)] = Field(
        c.DEFAULT_ENABLED, description="false: keep the job but never start it."
    )
    description: Annotated[str, BeforeValidator(_text)] = Field(
        c.DEFAULT_DESCRIPTION, description="Free text, shown by schedd jobs."
    )
    rerun_lost: Annotated[bool, BeforeValidator(_flag)] = Field(
        c.DEFAULT_RERUN_LOST,
        description="Re-run a slot once if the daemon died while it was running.",
    )
    history_limit: Annotated[int, Field(ge=1, le=MAX_COUNT), BeforeValidator(_count)] = Field(
        c.DEFAULT_HISTORY_LIMIT, description="Run records kept per job in the ledger."
    )
    history_max_age: Duration = Field(
        c.DEFAULT_HISTORY_MAX_AGE, description="Run records older than this are pruned."
    )
    limits: LimitFields | None = _unset(
        "Resource limits per run; each key overrides the same key in defaults; null: none."
    )
    run_as: Annotated[
        str | None,
        BeforeValidator(_run_as),
        WithJsonSchema(
            {"anyOf": [{"type": "string", "pattern": RUN_AS_PATTERN}, {"type": "null"}]}
        ),
    ] = _unset(
        "Run as this user (USER or USER:GROUP); the daemon must run as root. null: as the daemon."
    )


class ConfigFile(BaseModel):
    """The whole file. The loader validates ``defaults`` and each job on its
    own, so that one bad job does not hide problems in the others."""

    model_config = ConfigDict(
        extra="forbid",
        title="schedd configuration",
        json_schema_extra={"description": "schedd.yaml: time zone, state directory and jobs."},
    )

    timezone: Annotated[str, BeforeValidator(check_timezone)] = Field(
        c.DEFAULT_TIMEZONE, description="IANA time zone name for jobs that set none."
    )
    state_dir: Annotated[str | None, BeforeValidator(_optional_path), _STRING] = _unset(
        "Directory for run history and state; relative to this file."
    )
    defaults: JobFields | None = _unset("Keys applied to every job that does not set them.")
    jobs: dict[str, JobFields] = Field(default_factory=dict, description="Jobs by id.")


JOB_KEYS: list[str] = list(JobFields.model_fields)
#: Keys of the job keys that are mappings of their own, for "did you mean".
NESTED_KEYS: dict[str, list[str]] = {"limits": list(LimitFields.model_fields)}
TOP_KEYS: list[str] = list(ConfigFile.model_fields)


@functools.cache
def job_keys() -> TypeAdapter[dict[str, Any]]:
    """Validates the keys a job writes exactly as :class:`JobFields` does, and
    returns just those keys (``model_fields_set`` with their values).

    A TypedDict of every JobFields field, each with the field's own type and
    validators, and extra keys forbidden: about three times faster than
    building a JobFields with its twenty defaults, which adds up over
    100,000 jobs. Built on first use (a few milliseconds).
    """
    fields: dict[str, Any] = {
        name: NotRequired[Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation]
        for name, f in JobFields.model_fields.items()
    }
    typed_dict: Any = TypedDict  # a TypedDict built at run time, from the model's fields
    keys = typed_dict("JobKeys", fields)
    keys.__pydantic_config__ = ConfigDict(extra="forbid")
    adapter: TypeAdapter[dict[str, Any]] = TypeAdapter(keys)
    return adapter


# -- JSON Schema ---------------------------------------------------------------


def json_schema(registry: Registry) -> dict[str, Any]:
    """See :func:`scheduler.config.config_json_schema`. All models go through one
    ``models_json_schema`` call so that their ``$defs`` share one namespace."""
    tasks = sorted(registry.task_types.values(), key=lambda t: t.name)
    models: list[type[BaseModel]] = [ConfigFile, JobFields]
    for task in tasks:
        if task.params not in models:
            models.append(task.params)
    refs, bundle = models_json_schema(
        [(m, "validation") for m in models], ref_template="#/$defs/{model}"
    )
    defs: dict[str, Any] = bundle["$defs"]
    root = defs.pop(refs[(ConfigFile, "validation")]["$ref"].rsplit("/", 1)[1])
    job_ref = refs[(JobFields, "validation")]["$ref"]
    job = defs[job_ref.rsplit("/", 1)[1]]
    job["properties"]["task"]["examples"] = [t.name for t in tasks]
    job["allOf"] = [
        {
            "if": {"properties": {"task": {"const": t.name}}, "required": ["task"]},
            "then": {"properties": {"params": refs[(t.params, "validation")]}},
        }
        for t in tasks
    ]
    pairs = [list(p) for p in itertools.combinations(c.TRIGGER_KEYS, 2)]
    job["not"] = {"anyOf": [{"required": p} for p in pairs]}
    root["properties"]["defaults"] = {
        "$ref": job_ref,
        "description": root["properties"]["defaults"].get("description", ""),
    }
    root["properties"]["jobs"] = {
        "type": "object",
        "description": root["properties"]["jobs"].get("description", ""),
        "propertyNames": {"pattern": c.JOB_ID_PATTERN},
        "additionalProperties": {"$ref": job_ref},
    }
    # Durations appear seven times: keep one copy under $defs.
    defs = _share(defs, _DURATION_SCHEMA, "#/$defs/Duration")
    defs["Duration"] = {
        "description": "Seconds, or amounts with units ms, s, m, h, d, w: 250ms, 90s, 5m, 1h30m.",
        **_DURATION_SCHEMA,
    }
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **root, "$defs": defs}


def _share(node: Any, shared: dict[str, Any], ref: str) -> Any:
    """``node`` with each dict that contains all of ``shared`` using ``ref`` instead."""
    if isinstance(node, dict):
        if node and all(node.get(k) == v for k, v in shared.items()):
            rest = {k: v for k, v in node.items() if k not in shared}
            return {"$ref": ref, **rest}
        return {k: _share(v, shared, ref) for k, v in node.items()}
    if isinstance(node, list):
        return [_share(v, shared, ref) for v in node]
    return node
