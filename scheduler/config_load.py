"""Loading a config file: validate every part, merge defaults, parse schedules.

Imported by :func:`scheduler.config.load_config` on first use (it brings
pydantic). Every problem is collected with its position and raised once as a
:class:`~scheduler.errors.ConfigError`; a key whose problem is already said is
remembered as bad, so nothing downstream repeats or compounds it.

Each job first goes through :meth:`Loader.fast_job`, which applies the same
rules with the same validators but none of the reporting machinery (scopes,
re-validation rounds, locations), and gives up on anything unusual; the job
then goes through :meth:`Loader.job`, which says exactly what is wrong. A
config with 100,000 jobs spends most of its load here, so the difference is
seconds.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ValidationError
from pydantic_core import SchemaSerializer, SchemaValidator

from scheduler import config_model as m
from scheduler import confine, envfile, redact, triggers
from scheduler.config import (
    DEFAULT_TIMEZONE,
    JOB_DEFAULTS,
    JOB_ID_PATTERN,
    JOB_ID_RULE,
    TRIGGER_KEYS,
    Config,
    JobSpec,
    TriggerKind,
)
from scheduler.errors import ConfigError, Problem
from scheduler.yamlsrc import Loc, PathT, Source, kind

if TYPE_CHECKING:
    from scheduler.plugins import Registry


# -- pydantic errors as located, plain-spoken problems ---------------------------

_PHRASES = {
    "string_type": "must be a string",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "list_type": "must be a list",
}
_SHOULD = re.compile(r"^(?:[A-Za-z]+ ){0,3}?should (?=be |have |match |contain )")


@dataclass(frozen=True, slots=True)
class Scope:
    """Where a validated mapping sits and how to name things in it.

    ``base`` is its path in the file; ``label`` prefixes key names in
    messages ("params" -> "params.url"); ``where`` ends unknown/missing-key
    messages ("in job 'backup'"); ``known`` feeds the did-you-mean for its own
    keys, and is listed when nothing is close and ``list_known`` is set.
    """

    src: Source
    base: PathT
    label: str
    where: str
    known: tuple[str, ...] = ()
    list_known: bool = False


def _label(prefix: str, rel: PathT) -> str:
    out = prefix
    for el in rel:
        if isinstance(el, int) and not isinstance(el, bool):
            out += f"[{el}]"
        else:
            out = f"{out}.{el}" if out else str(el)
    return out or "value"


def _follow(raw: Any, loc: tuple[int | str, ...]) -> tuple[PathT, bool]:
    """The part of a pydantic ``loc`` that exists in the data (union-member
    names and missing keys drop out), and whether it names a key."""
    path: list[Any] = []
    data = raw
    for el in loc:
        if el == "[key]":
            return tuple(path), True
        if isinstance(data, dict) and el not in data and isinstance(el, str):
            # pydantic writes a non-string key into ``loc`` as its str()
            el = next((k for k in data if not isinstance(k, str) and str(k) == el), el)
        in_dict = isinstance(data, dict) and el in data
        in_list = isinstance(data, list) and type(el) is int and 0 <= el < len(data)
        if not (in_dict or in_list):
            continue
        data = data[el]
        path.append(el)
    return tuple(path), False


def _unknown(scope: Scope, key: object, parent: PathT) -> str:
    if parent:
        nested = m.NESTED_KEYS.get(parent[-1]) if len(parent) == 1 and not scope.label else None
        hint = m.did_you_mean(key, nested) if nested else ""
        if nested and not hint:
            hint = f"; known keys: {', '.join(nested)}"
        return f"unknown key {kind(key)} in {_label(scope.label, parent)}{hint}"
    hint = m.did_you_mean(key, list(scope.known))
    if not hint and scope.list_known and scope.known:
        hint = f"; known keys: {', '.join(scope.known)}"
    return f"unknown key {kind(key)} {scope.where}{hint}"


def _problem(err: Any, raw: Any, scope: Scope) -> Problem | None:
    src, loc, typ = scope.src, tuple(err["loc"]), err["type"]
    rel, is_key = _follow(raw, loc)
    path = scope.base + rel
    if src.is_invalid(path):
        return None  # the YAML layer already reported this value
    if typ == "extra_forbidden":
        return src.problem(
            src.key_loc(path), _unknown(scope, rel[-1] if rel else loc[-1], rel[:-1])
        )
    if typ == "missing":
        name = loc[-1]
        if rel:
            msg = f"{_label(scope.label, rel)} is missing required key {name!r}"
        else:
            msg = f"missing required key {name!r} {scope.where}"
        return src.problem(src.key_loc(path), msg)
    label = _label(scope.label, rel)
    error = (err.get("ctx") or {}).get("error")
    if typ in ("value_error", "assertion_error") and isinstance(error, BaseException):
        text = str(error)
        got = ""
    else:
        text = _PHRASES.get(typ) or _SHOULD.sub("must ", err["msg"])
        got = f" (got {kind(err['input'])})"
    if isinstance(error, m.Complete):
        msg = text
    elif text.startswith("must "):
        msg = f"{label} {text}{got}"
    else:
        msg = f"{label}: {text}{got}"
    return src.problem(src.key_loc(path) if is_key else src.value_loc(path), msg)


def validate(
    model: type[BaseModel], raw: dict[Any, Any], scope: Scope
) -> tuple[BaseModel | None, set[str], list[Problem]]:
    """Validate ``raw`` against ``model``, collecting every problem.

    Returns the model built from the keys that are valid (so one bad key does
    not hide the others from later checks), the names of the bad keys, and
    the problems. Pydantic stops at nothing but also returns nothing on
    error, so the bad keys are dropped and the rest validated again.
    """
    problems: list[Problem] = []
    bad: set[str] = set()
    data: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(key, str):
            data[key] = value
        elif not scope.src.is_invalid((*scope.base, key)):
            where = scope.src.key_loc((*scope.base, key))
            problems.append(scope.src.problem(where, _unknown(scope, key, ())))
    for _attempt in range(3):
        try:
            return model.model_validate(data), bad, problems
        except ValidationError as exc:
            reported = set(bad)  # a key dropped last round is now "missing": said already
            for err in exc.errors(include_url=False):
                top = err["loc"][0] if err["loc"] else None
                if top in reported:
                    continue
                problem = _problem(err, data, scope)
                if problem is not None:
                    problems.append(problem)
                if isinstance(top, str):
                    bad.add(top)
        kept = {k: v for k, v in data.items() if k not in bad}
        if len(kept) == len(data):
            break
        data = kept
    return None, bad, problems


# -- the loader ---------------------------------------------------------------

_UNSET: Final = object()
_BAD: Final = object()


_JOB_ID: Final = re.compile(JOB_ID_PATTERN)
# fast_job builds JobSpecs positionally: its fields are these, in this order.
_SPEC_FIELDS: Final = [
    *("id", "task", "params", "trigger_kind", "trigger_expr", "schedule", "timezone"),
    *JOB_DEFAULTS,
    "line",
]
if [f.name for f in fields(JobSpec)] != _SPEC_FIELDS:  # pragma: no cover - a guard for edits
    raise AssertionError("JobSpec's fields and JOB_DEFAULTS disagree; update fast_job")
_ENV_AT: Final = list(JOB_DEFAULTS).index("env")
_ENV_FILE_AT: Final = list(JOB_DEFAULTS).index("env_file")
_LIMITS_AT: Final = list(JOB_DEFAULTS).index("limits")
_RUN_AS_AT: Final = list(JOB_DEFAULTS).index("run_as")


def _limit_keys(value: Any) -> dict[str, Any]:
    """The keys a validated ``limits:`` sets (``limits: null`` sets none)."""
    if not isinstance(value, m.LimitFields):
        return {}
    return {k: getattr(value, k) for k in value.model_fields_set if getattr(value, k) is not None}


def _merged_limits(base: dict[str, Any], own: dict[str, Any]) -> confine.Limits | None:
    """``defaults``' limits with the job's on top, key by key; a job's ``limits: null``
    drops them all."""
    if "limits" in own and own["limits"] is None:
        return None
    keys = {**_limit_keys(base.get("limits")), **_limit_keys(own.get("limits"))}
    return confine.Limits(**keys) if keys else None


def _identity() -> str:
    uid = os.geteuid()
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (KeyError, ImportError):
        return f"uid {uid}"


@dataclass
class _Part:
    """``defaults`` or one job after validation: the keys it wrote that are
    valid (``values``), the ones already reported as invalid (``bad``), and
    the mapping as written (``raw``)."""

    path: PathT
    values: dict[str, Any] = field(default_factory=dict)
    bad: set[str] = field(default_factory=set)
    raw: dict[Any, Any] = field(default_factory=dict)

    def wrote(self, key: str) -> bool:
        return key in self.values or key in self.bad


def _params_checker(model: type[BaseModel]) -> Callable[[Any], dict[str, Any]]:
    """``model.model_validate(raw).model_dump(mode="json")`` as one callable; straight
    to pydantic-core (a microsecond less per job) unless the plugin's model
    overrides either method or is not built yet."""
    validator = model.__pydantic_validator__
    own = model.__mro__[: model.__mro__.index(BaseModel)]
    plain = (
        not any(name in vars(k) for k in own for name in ("model_validate", "model_dump"))
        and isinstance(validator, SchemaValidator)
        and isinstance(model.__pydantic_serializer__, SchemaSerializer)
    )
    if plain:
        validate, dump = validator.validate_python, model.__pydantic_serializer__.to_python

        def check(raw: Any) -> dict[str, Any]:
            dumped: dict[str, Any] = dump(validate(raw), mode="json")
            return dumped

        return check

    def check_slowly(raw: Any) -> dict[str, Any]:
        return model.model_validate(raw).model_dump(mode="json")

    return check_slowly


#: Above this many jobs, fast_job validates with :func:`config_model.job_keys` (building
#: it costs a few milliseconds, a few percent of a small config's ``schedd validate``).
_MANY_JOBS: Final = 200


def _written_keys(raw: Any) -> dict[str, Any]:
    """The keys a job writes, validated: what ``config_model.job_keys()`` returns."""
    obj = m.JobFields.model_validate(raw)
    return {k: getattr(obj, k) for k in obj.model_fields_set}


def _position(loc: Loc) -> tuple[int, int]:
    return loc.line, loc.col


class Loader:
    """One load: collects every problem, then returns a Config or raises once."""

    def __init__(self, src: Source, registry: Registry, path: Path, *, to_run: bool = True) -> None:
        self.src = src
        self.registry = registry
        self.path = path
        self.to_run = to_run
        self.root = os.geteuid() == 0
        self.users: dict[str, confine.RunAs | confine.RunAsError] = {}
        self.problems: list[Problem] = list(src.problems)  # errors only
        self.warnings: list[Problem] = []
        self.now = datetime.now(UTC)
        # Interval schedules are immutable: jobs with the same interval and zone share one.
        self.every: dict[tuple[float, str], triggers.Schedule] = {}
        # For fast_job: each job id's line, and the job keys' values when a job sets none.
        self.job_lines: dict[Any, int] = {}
        self.job_base: list[tuple[str, Any]] = []
        self.job_base_values: list[Any] = []
        self.job_keys: Callable[[Any], dict[str, Any]] = _written_keys
        self.checkers: dict[str, Callable[[Any], dict[str, Any]]] = {}
        # Each env_file once per place that names it: usable or not (problems said once).
        self.env_files: dict[tuple[str, PathT], bool] = {}
        self.env_paths: dict[str, str] = {}  # as written -> absolute
        self.env_reads: dict[str, tuple[envfile.EnvFileError | None, str | None]] = {}
        self.secrets: list[str] = []  # values read from env files, hidden in messages

    def error(self, loc: Loc, message: str, *, offset: int | None = None) -> None:
        self.problems.append(self.src.problem(loc, message, offset=offset))

    def load(self) -> Config:
        src, data = self.src, self.src.data
        if src.fatal:
            raise ConfigError(self.problems)
        if data is None:
            empty = "the file is empty; it needs a 'jobs:' mapping"
            raise ConfigError([*self.problems, Problem(src.name, 0, 0, empty)])
        if not isinstance(data, dict):
            shape = f"the top level must be a mapping of {', '.join(m.TOP_KEYS)}"
            self.error(src.value_loc(()), f"{shape} (got {kind(data)})")
            raise ConfigError(self.problems)
        rest = {k: v for k, v in data.items() if k not in ("defaults", "jobs")}
        top = self.validate(m.ConfigFile, rest, (), "at the top level", m.TOP_KEYS)
        zone = top.values.get("timezone", DEFAULT_TIMEZONE) if "timezone" not in top.bad else None
        state_dir = None
        if top.values.get("state_dir"):
            raw_dir = Path(top.values["state_dir"]).expanduser()
            state_dir = Path(os.path.normpath(self.path.parent / raw_dir))
        defaults = self.defaults(data.get("defaults"))
        jobs: dict[str, JobSpec] = {}
        raw_jobs = data.get("jobs")
        if isinstance(raw_jobs, dict):
            # Once the YAML layer reported a problem, every job takes the reporting path.
            fast = zone is not None and not defaults.bad and not src.invalid
            if fast:
                if len(raw_jobs) > _MANY_JOBS:  # worth building the faster validator
                    self.job_keys = m.job_keys().validator.validate_python
                self.job_lines = src.key_lines(("jobs",))
                self.job_base = [(k, defaults.values.get(k, v)) for k, v in JOB_DEFAULTS.items()]
                self.job_base_values = [v for _k, v in self.job_base]
            for job_id, raw in raw_jobs.items():
                spec = self.fast_job(job_id, raw, defaults, zone) if fast and zone else None
                if spec is None:
                    spec = self.job(job_id, raw, defaults, zone)
                if spec is not None:
                    jobs[spec.id] = spec
        elif raw_jobs is not None and not src.is_invalid(("jobs",)):
            shape = f"jobs must be a mapping of job id to job (got {kind(raw_jobs)})"
            self.error(src.value_loc(("jobs",)), shape)
        if not raw_jobs and not src.is_invalid(("jobs",)):
            message = "no jobs defined"
            if "jobs" in data:
                self.warnings.append(src.problem(src.key_loc(("jobs",)), message, warning=True))
            else:
                self.warnings.append(Problem(src.name, 0, 0, message, "warning"))
        warnings = sorted(dict.fromkeys(self.warnings))
        if self.problems or warnings:
            warnings = self.scrub(warnings)
        if self.problems:
            raise ConfigError(self.scrub(list(dict.fromkeys(self.problems))) + warnings)
        return Config(self.path, zone or DEFAULT_TIMEZONE, state_dir, jobs, warnings)

    def validate(
        self, model: Any, raw: dict[Any, Any], path: PathT, where: str, known: list[str]
    ) -> _Part:
        scope = Scope(self.src, path, "", where, known=tuple(known))
        obj, bad, problems = validate(model, raw, scope)
        self.problems.extend(problems)
        part = _Part(path, bad=bad, raw=raw)
        if obj is not None:
            part.values = {k: getattr(obj, k) for k in obj.model_fields_set}
        return part

    def defaults(self, raw: Any) -> _Part:
        path: PathT = ("defaults",)
        if raw is None or self.src.is_invalid(path):
            return _Part(path)
        if not isinstance(raw, dict):
            shape = f"defaults must be a mapping of job keys (got {kind(raw)})"
            self.error(self.src.value_loc(path), shape)
            return _Part(path)
        part = self.validate(m.JobFields, raw, path, "in defaults", m.JOB_KEYS)
        task = part.values.get("task")
        if task is not None and task not in self.registry.task_types:
            self.error(self.src.value_loc((*path, "task")), self.unknown_task(task))
            part.bad.add("task")
        found = [k for k in TRIGGER_KEYS if part.wrote(k)]
        if len(found) > 1:
            locs = sorted((self.src.key_loc((*path, k)) for k in found), key=_position)
            message = f"defaults may set only one of cron, every, at (found: {', '.join(found)})"
            self.error(locs[1], message)
            # Jobs without their own schedule then see one bad key, and say nothing more.
            part.bad = (part.bad - set(found)) | {found[0]}
            for k in found:
                part.values.pop(k, None)
        return part

    def scrub(self, problems: list[Problem]) -> list[Problem]:
        """``problems`` with secret values (see :mod:`scheduler.redact`) shown as ``***``:
        a message may quote a value, and a validator of a plugin may quote anything."""
        values = [*self.secrets, *_config_secrets(self.src.data)]
        # kind() shortens long values to 57 characters and "...": hide that form too.
        # (Numbers are shown bare, strings quoted.)
        values += [form[:57] for v in values for form in (v, repr(v)) if len(form) > 60]
        masker = redact.Masker(values)
        if not masker:
            return problems
        return [replace(p, message=masker.mask(p.message)) for p in problems]

    def env_file(self, value: str, at: PathT) -> Any:
        """The absolute path of the env file ``value`` named in the mapping at ``at``
        (a job or defaults), or _BAD once its problem has been reported."""
        path = self.env_paths.get(value)
        if path is None:
            path = self.env_paths[value] = os.path.normpath(
                self.path.parent / Path(value).expanduser()
            )
        key = (path, at)
        ok = self.env_files.get(key)
        if ok is None:
            ok = self.env_files[key] = self.check_env_file(path, at)
        return path if ok else _BAD

    def check_env_file(self, path: str, at: PathT) -> bool:
        """Read the env file now, so validate and reload catch what a run would meet.
        A file named by many jobs is read once; each place naming it gets the message."""
        found = self.env_reads.get(path)
        if found is None:
            try:
                self.secrets += envfile.read(path).values()
                found = (None, envfile.loose_permissions(path))
            except envfile.EnvFileError as err:
                found = (err, None)
            self.env_reads[path] = found
        error, loose = found
        if error is None and loose is None:
            return True
        loc = self.src.value_loc((*at, "env_file"))
        if error is None:
            self.warnings.append(self.src.problem(loc, str(loose), warning=True))
            return True
        if error.line:  # ENVFILE:LINE: message, and where the config names the file
            named = f"env_file at {self.src.name}:{loc.line}:{loc.col}"
            self.problems.append(Problem(error.path, error.line, 0, f"{error.reason} ({named})"))
        else:
            self.error(loc, error.reason)
        return False

    def unknown_task(self, name: str) -> str:
        known = sorted(self.registry.task_types)
        hint = m.did_you_mean(name, known)
        msg = f"unknown task {name!r}{hint}; known tasks: {', '.join(known) or 'none'}"
        broken = [p for p in self.registry.broken if p.name == name] or list(self.registry.broken)
        if broken:
            listed = ", ".join(f"{p.name!r} ({p.error})" for p in broken)
            msg += f"; plugin{'s' if len(broken) > 1 else ''} that failed to load: {listed}"
        if any(p.blocked and p.name == name for p in self.registry.plugins):
            msg += f"; plugin {name!r} is disabled by $SCHEDD_DISABLE_PLUGINS"
        return msg

    def fast_job(self, job_id: Any, raw: Any, defaults: _Part, top_zone: str) -> JobSpec | None:
        """The job's JobSpec if nothing about it needs reporting, else None.

        The same validators and merge rules as :meth:`job`, which any None
        sends the job to; this path adds no problem or warning of its own
        (an env file's are reported once per place, by :meth:`env_file`).
        One-shot ``at`` jobs always go there (their past-time warning).
        """
        if type(job_id) is not str or type(raw) is not dict or _JOB_ID.fullmatch(job_id) is None:
            return None
        try:
            own = self.job_keys(raw)  # only the keys the job writes
        except ValidationError:
            return None
        base = defaults.values
        where, at, written = own, ("jobs", job_id), raw
        found = ("cron" in own) + ("every" in own) + ("at" in own)
        if not found:  # a job that sets none of cron/every/at takes the one in defaults
            where, at, written = base, defaults.path, defaults.raw
            found = ("cron" in base) + ("every" in base) + ("at" in base)
        if found != 1:
            return None
        trigger = "cron" if "cron" in where else "every" if "every" in where else "at"
        task = own["task"] if "task" in own else base.get("task")
        task_type = self.registry.task_types.get(task) if task is not None else None
        if task_type is None or trigger == "at":
            return None
        zone = own["timezone"] if "timezone" in own else base.get("timezone", top_zone)
        raw_params = own["params"] if "params" in own else base.get("params", {})
        checker = self.checkers.get(task_type.name)
        if checker is None:
            checker = self.checkers[task_type.name] = _params_checker(task_type.params)
        try:
            params = checker(raw_params)
        except Exception:  # reported (a plugin's validator may raise anything) by job()
            return None
        value = where[trigger]
        text = written[trigger]
        if type(text) is not str:  # ``every: 1e3``: "1e3"
            text = self.src.written(written, trigger, (*at, trigger))
        try:
            if trigger == "cron":
                schedule = triggers.parse_cron(value, ZoneInfo(zone), job_id)
            else:
                schedule = self.interval(value, zone)
        except (ValueError, OverflowError):
            return None
        # JobSpec's fields in order (checked at import): positional is twice as fast.
        if own.keys().isdisjoint(JOB_DEFAULTS):
            job_keys = self.job_base_values.copy()
        else:
            job_keys = [own.get(k, v) for k, v in self.job_base]
        job_keys[_ENV_AT] = {**base.get("env", {}), **own.get("env", {})}
        env_file = job_keys[_ENV_FILE_AT]
        if env_file is not None:
            env_file_at = ("jobs", job_id) if "env_file" in own else defaults.path
            env_file = job_keys[_ENV_FILE_AT] = self.env_file(env_file, env_file_at)
            if env_file is _BAD:
                return None
        job_keys[_LIMITS_AT] = _merged_limits(base, own)
        run_as = own["run_as"] if "run_as" in own else base.get("run_as")
        if run_as is not None:
            user = self.user(run_as)
            if not self.root or isinstance(user, confine.RunAsError):
                return None  # job() says what is wrong, where
            job_keys[_RUN_AS_AT] = user
        line = self.job_lines.get(job_id)
        if line is None:
            line = self.src.key_line(("jobs", job_id))
        args = (job_id, task, params, trigger, text, schedule, zone, *job_keys, line)
        return JobSpec(*args)  # the order of the fields is checked at import

    def interval(self, seconds: Any, zone: str) -> triggers.Schedule:
        key = (seconds, zone)
        found = self.every.get(key)
        if found is None or type(seconds) is not float:
            found = triggers.parse_every(seconds, ZoneInfo(zone))
            if type(seconds) is float:
                self.every[key] = found
        return found

    def job(self, job_id: Any, raw: Any, defaults: _Part, top_zone: str | None) -> JobSpec | None:
        src = self.src
        path: PathT = ("jobs", job_id)
        found_key: list[Loc] = []

        def key() -> Loc:
            """The job id's location, worked out only for a message (see yamlsrc.Source)."""
            if not found_key:
                found_key.append(src.key_loc(path))
            return found_key[0]

        before = len(self.problems)
        name = job_id if isinstance(job_id, str) else str(key().raw)
        if not isinstance(job_id, str):
            self.error(key(), f"job id {kind(job_id)} must be a string; quote it: '{key().raw}'")
        elif not _JOB_ID.fullmatch(job_id):
            self.error(key(), f"invalid job id {job_id!r}: use {JOB_ID_RULE}")
        if src.is_invalid(path):
            return None
        if raw is None:
            self.error(key(), f"job {name!r} is empty; it needs a task and one of cron, every, at")
            return None
        if not isinstance(raw, dict):
            shape = f"job {name!r} must be a mapping of job keys (got {kind(raw)})"
            self.error(src.value_loc(path), shape)
            return None
        part = self.validate(m.JobFields, raw, path, f"in job {name!r}", m.JOB_KEYS)
        own_trigger = any(part.wrote(k) for k in TRIGGER_KEYS)

        def pick(k: str) -> tuple[Any, PathT]:
            """The value that applies (or _UNSET/_BAD) and the part it comes from."""
            if part.wrote(k):
                return part.values.get(k, _BAD), path
            if defaults.wrote(k) and not (k in TRIGGER_KEYS and own_trigger):
                return defaults.values.get(k, _BAD), defaults.path
            return _UNSET, path

        task, task_at = pick("task")
        task_type = None
        if task is _UNSET:
            known = ", ".join(sorted(self.registry.task_types)) or "none"
            self.error(key(), f"job {name!r} is missing required key 'task' (known tasks: {known})")
        elif task is not _BAD:
            task_type = self.registry.task_types.get(task)
            if task_type is None:
                self.error(src.value_loc((*task_at, "task")), self.unknown_task(task))
        found = [k for k in TRIGGER_KEYS if pick(k)[0] is not _UNSET]
        if len(found) != 1:
            listed = ", ".join(found) or "none"
            message = f"job {name!r} needs exactly one of cron, every, at (found: {listed})"
            locs = sorted((src.key_loc((*pick(k)[1], k)) for k in found), key=_position)
            self.error(locs[1] if len(locs) > 1 else key(), message)
        zone, _ = pick("timezone")
        zone = top_zone if zone is _UNSET else None if zone is _BAD else zone
        params = self.params(task_type, *pick("params"))
        schedule, expr = None, ""
        if len(found) == 1:  # with a bad zone, still report a bad expression
            value, at = pick(found[0])
            written = raw if at == path else defaults.raw
            schedule, expr = self.schedule(name, found[0], value, at, zone or "UTC", written)
        values = {k: pick(k)[0] for k in JOB_DEFAULTS}
        env_file, env_file_at = pick("env_file")
        if isinstance(env_file, str):
            values["env_file"] = self.env_file(env_file, env_file_at)
        if "env" in part.bad or "env" in defaults.bad:
            return None
        values["env"] = {**defaults.values.get("env", {}), **part.values.get("env", {})}
        values["run_as"] = self.run_as(*pick("run_as"))
        if "limits" in part.bad or "limits" in defaults.bad:
            return None
        values["limits"] = _merged_limits(defaults.values, part.values)
        if len(self.problems) > before or schedule is None or params is None or zone is None:
            return None
        if any(v is _BAD for v in values.values()):
            return None
        for k, default in JOB_DEFAULTS.items():
            if values[k] is _UNSET:
                values[k] = default
        return JobSpec(
            id=name, task=task, params=params, trigger_kind=cast(TriggerKind, found[0]),
            trigger_expr=expr, schedule=schedule, timezone=zone, line=src.key_line(path), **values,
        )  # fmt: skip

    def user(self, spec: str) -> confine.RunAs | confine.RunAsError:
        """``run_as`` resolved once per load (jobs usually share one)."""
        found = self.users.get(spec)
        if found is None:
            try:
                found = confine.resolve_run_as(spec)
            except confine.RunAsError as exc:
                found = exc
            self.users[spec] = found
        return found

    def run_as(self, value: Any, at: PathT) -> Any:
        """The job's resolved ``run_as`` (or _UNSET/_BAD), its problems reported at its value."""
        if value is _UNSET or value is _BAD or value is None:
            return None if value is None else value
        loc = self.src.value_loc((*at, "run_as"))
        user = self.user(value)
        if isinstance(user, confine.RunAsError):
            self.error(loc, str(user))
            return _BAD
        if not self.root:
            if self.to_run:
                self.error(
                    loc,
                    f"run_as {value!r} needs schedd to run as root, and it runs as {_identity()};"
                    " start it as root or remove run_as",
                )
                return _BAD
            self.warnings.append(
                self.src.problem(
                    loc,
                    f"run_as {value!r} takes effect only when schedd runs as root;"
                    f" started as {_identity()}, the daemon would refuse this file",
                    warning=True,
                )
            )
        return user

    def params(self, task_type: Any, raw: Any, at: PathT) -> dict[str, Any] | None:
        if task_type is None or raw is _BAD:
            return None
        base = (*at, "params")
        model = task_type.params
        known = tuple(f.alias or n for n, f in model.model_fields.items())
        where = f"in params of task {task_type.name!r}"
        scope = Scope(self.src, base, "params", where, known=known, list_known=True)
        try:
            obj, _bad, problems = validate(model, {} if raw is _UNSET else raw, scope)
            self.problems.extend(problems)
            if obj is None or problems:
                return None
            dumped: dict[str, Any] = obj.model_dump(mode="json")
            return dumped
        except Exception as exc:  # a plugin's validator is third-party code
            raised = f"plugin {task_type.plugin or 'unknown'!r} raised {type(exc).__name__}: {exc}"
            self.error(self.src.value_loc(base), f"params could not be checked: {raised}")
            return None

    def schedule(
        self, job: str, trigger: str, value: Any, at: PathT, zone: str, written: dict[Any, Any]
    ) -> tuple[triggers.Schedule | None, str]:
        """The parsed schedule and its text as written (``every: 5m`` -> ``"5m"``);
        ``written`` is the mapping the trigger key is in (the job's, or defaults)."""
        if value is _BAD:
            return None, ""
        path = (*at, trigger)
        expr = self.src.written(written, trigger, path)
        tz = ZoneInfo(zone)
        try:
            if trigger == "cron":
                schedule = triggers.parse_cron(value, tz, job)
            elif trigger == "every":
                schedule = self.interval(value, zone)
            else:
                when = value if isinstance(value, datetime) else datetime.combine(value, time())
                schedule = triggers.parse_at(when, tz)
                if schedule.next_after(self.now) is None:
                    past = f"at {expr!r} is in the past; job {job!r} will not run"
                    loc = self.src.value_loc(path)
                    self.warnings.append(self.src.problem(loc, past, warning=True))
        except (ValueError, OverflowError) as exc:  # TriggerError, or a date out of range
            text = str(exc)
            message = f"invalid cron expression: {text}" if trigger == "cron" else text
            self.error(self.src.value_loc(path), message, offset=getattr(exc, "offset", None))
            return None, ""
        return schedule, expr


def _config_secrets(data: Any) -> list[str]:
    """Secret values written in the config: ``env`` values with secret-looking
    names, and secrets in ``params`` (see :mod:`scheduler.redact`), of defaults
    and every job. Only walked when there is a message to scrub."""
    if not isinstance(data, dict):
        return []
    parts = [data.get("defaults")]
    jobs = data.get("jobs")
    if isinstance(jobs, dict):
        parts += jobs.values()
    out: list[str] = []
    for part in parts:
        if isinstance(part, dict):
            env = part.get("env")
            if isinstance(env, dict):
                out += redact.env_secrets(env)
            out += redact.params_secrets(part.get("params"))
    return out
