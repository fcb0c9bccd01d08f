"""The fast path of loading a job: a JobSpec when nothing about the job needs saying.

A config with 100,000 jobs spends most of its load on its jobs, so each job
first goes through :meth:`FastPath.job`, which applies the same rules with
the same validators as the validated path (:meth:`scheduler.config_load.Loader.job`)
but none of its reporting machinery (scopes, re-validation rounds,
locations), and gives up (None) on anything unusual; the loader then sends
the job down the validated path, which says exactly what is wrong. The
difference is seconds, and keeping the two apart keeps each readable: this
module must never report a problem (``tests/test_scale.py`` checks that
both paths give the same result).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import fields
from typing import TYPE_CHECKING, Any, Final
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ValidationError
from pydantic_core import SchemaSerializer, SchemaValidator

from scheduler import config_model as m
from scheduler import confine, triggers
from scheduler.config import JOB_DEFAULTS, JOB_ID_PATTERN, JobSpec
from scheduler.config_extras import JobExtras, merged_limits
from scheduler.config_validate import BAD, Part
from scheduler.yamlsrc import Source

if TYPE_CHECKING:
    from scheduler.plugins import Registry

_JOB_ID: Final = re.compile(JOB_ID_PATTERN)
# FastPath.job builds JobSpecs positionally: its fields are these, in this order.
_SPEC_FIELDS: Final = [
    *("id", "task", "params", "trigger_kind", "trigger_expr", "schedule", "timezone"),
    *JOB_DEFAULTS,
    "line",
]
if [f.name for f in fields(JobSpec)] != _SPEC_FIELDS:  # pragma: no cover - a guard for edits
    raise AssertionError("JobSpec's fields and JOB_DEFAULTS disagree; update FastPath.job")
_ENV_AT: Final = list(JOB_DEFAULTS).index("env")
_ENV_FILE_AT: Final = list(JOB_DEFAULTS).index("env_file")
_LIMITS_AT: Final = list(JOB_DEFAULTS).index("limits")
_RUN_AS_AT: Final = list(JOB_DEFAULTS).index("run_as")


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


#: Above this many jobs, the fast path validates with :func:`config_model.job_keys` (building
#: it costs a few milliseconds, a few percent of a small config's ``schedd validate``).
MANY_JOBS: Final = 200


def _written_keys(raw: Any) -> dict[str, Any]:
    """The keys a job writes, validated: what ``config_model.job_keys()`` returns."""
    obj = m.JobFields.model_validate(raw)
    return {k: getattr(obj, k) for k in obj.model_fields_set}


class Intervals:
    """``every:`` schedules by (seconds, zone), shared by both paths of one load.

    Interval schedules are immutable, so jobs with the same interval and zone
    share one. A class of its own, not a method of the loader, so that the
    fast path holds no reference back to the loader: a cycle would keep the
    loader and its parsed source alive until the garbage collector ran.
    """

    def __init__(self) -> None:
        self.every: dict[tuple[float, str], triggers.Schedule] = {}

    def __call__(self, seconds: Any, zone: str) -> triggers.Schedule:
        key = (seconds, zone)
        found = self.every.get(key)
        if found is None or type(seconds) is not float:
            found = triggers.parse_every(seconds, ZoneInfo(zone))
            if type(seconds) is float:
                self.every[key] = found
        return found


class FastPath:
    """One load's fast path: set up once the jobs are known to take it."""

    def __init__(
        self,
        src: Source,
        registry: Registry,
        extras: JobExtras,
        interval: Intervals,
        defaults: Part,
        *,
        jobs: int,
    ) -> None:
        self.src = src
        self.registry = registry
        self.extras = extras
        self.interval = interval  # the loader's: both paths share its schedules
        self.checkers: dict[str, Callable[[Any], dict[str, Any]]] = {}
        self.job_keys: Callable[[Any], dict[str, Any]] = _written_keys
        if jobs > MANY_JOBS:  # worth building the faster validator
            self.job_keys = m.job_keys().validator.validate_python
        # Each job id's line, and the job keys' values when a job sets none.
        self.job_lines = src.key_lines(("jobs",))
        self.job_base = [(k, defaults.values.get(k, v)) for k, v in JOB_DEFAULTS.items()]
        self.job_base_values = [v for _k, v in self.job_base]

    def job(self, job_id: Any, raw: Any, defaults: Part, top_zone: str) -> JobSpec | None:
        """The job's JobSpec if nothing about it needs reporting, else None.

        The same validators and merge rules as the loader's ``job``, which any
        None sends the job to; this path adds no problem or warning of its own
        (an env file's are reported once per place, by :meth:`JobExtras.env_file`).
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
        except Exception:  # reported (a plugin's validator may raise anything) by Loader.job
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
            env_file = job_keys[_ENV_FILE_AT] = self.extras.env_file(env_file, env_file_at)
            if env_file is BAD:
                return None
        limits = job_keys[_LIMITS_AT] = merged_limits(base, own)
        if limits is not None and (limits.nice or 0) < 0 and not self.extras.root:
            return None  # Loader.job says what is wrong, where
        run_as = own["run_as"] if "run_as" in own else base.get("run_as")
        if run_as is not None:
            user = self.extras.user(run_as)
            if not self.extras.root or isinstance(user, confine.RunAsError):
                return None  # Loader.job says what is wrong, where
            job_keys[_RUN_AS_AT] = user
        line = self.job_lines.get(job_id)
        if line is None:
            line = self.src.key_line(("jobs", job_id))
        args = (job_id, task, params, trigger, text, schedule, zone, *job_keys, line)
        return JobSpec(*args)  # the order of the fields is checked at import
