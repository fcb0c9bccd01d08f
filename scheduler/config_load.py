"""Loading a config file: validate every part, merge defaults, parse schedules.

Imported by :func:`scheduler.config.load_config` on first use (it brings
pydantic). Every problem is collected with its position and raised once as a
:class:`~scheduler.errors.ConfigError`; a key whose problem is already said is
remembered as bad, so nothing downstream repeats or compounds it.

This module holds the file's rules (top level, ``defaults``, each job's
task, trigger, zone, params and schedule) and the order of a load; the rest
is split by job: :mod:`scheduler.config_validate` turns pydantic's errors
into located problems, :mod:`scheduler.config_extras` handles the keys that
reach outside the file (``env_file``, ``run_as``, ``limits``) and hides
secrets in messages, and :mod:`scheduler.config_fast` is the fast path.

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
from datetime import UTC, datetime, time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast
from zoneinfo import ZoneInfo

from scheduler import config_model as m
from scheduler import triggers
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
from scheduler.config_extras import JobExtras, merged_limits
from scheduler.config_fast import FastPath, Intervals
from scheduler.config_validate import BAD, UNSET, Part, Scope, validate
from scheduler.errors import ConfigError, Problem
from scheduler.yamlsrc import Loc, PathT, Source, kind

if TYPE_CHECKING:
    from scheduler.plugins import Registry


_JOB_ID: Final = re.compile(JOB_ID_PATTERN)


def _position(loc: Loc) -> tuple[int, int]:
    return loc.line, loc.col


class Loader:
    """One load: collects every problem, then returns a Config or raises once."""

    def __init__(self, src: Source, registry: Registry, path: Path, *, to_run: bool = True) -> None:
        self.src = src
        self.registry = registry
        self.path = path
        self.to_run = to_run
        self.problems: list[Problem] = list(src.problems)  # errors only
        self.warnings: list[Problem] = []
        self.extras = JobExtras(
            src, path, self.problems, self.warnings, root=os.geteuid() == 0, to_run=to_run
        )
        self.fast: FastPath | None = None  # set up once the jobs are known to take it
        self.now = datetime.now(UTC)
        self.interval = Intervals()  # shared with the fast path

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
                self.fast = FastPath(
                    src, self.registry, self.extras, self.interval, defaults, jobs=len(raw_jobs)
                )
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
            warnings = self.extras.scrub(warnings)
        if self.problems:
            raise ConfigError(self.extras.scrub(list(dict.fromkeys(self.problems))) + warnings)
        return Config(self.path, zone or DEFAULT_TIMEZONE, state_dir, jobs, warnings)

    def validate(
        self, model: Any, raw: dict[Any, Any], path: PathT, where: str, known: list[str]
    ) -> Part:
        scope = Scope(self.src, path, "", where, known=tuple(known))
        obj, bad, problems = validate(model, raw, scope)
        self.problems.extend(problems)
        part = Part(path, bad=bad, raw=raw)
        if obj is not None:
            part.values = {k: getattr(obj, k) for k in obj.model_fields_set}
        return part

    def defaults(self, raw: Any) -> Part:
        path: PathT = ("defaults",)
        if raw is None or self.src.is_invalid(path):
            return Part(path)
        if not isinstance(raw, dict):
            shape = f"defaults must be a mapping of job keys (got {kind(raw)})"
            self.error(self.src.value_loc(path), shape)
            return Part(path)
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

    def fast_job(self, job_id: Any, raw: Any, defaults: Part, top_zone: str) -> JobSpec | None:
        """The job's JobSpec from :mod:`scheduler.config_fast` if nothing about it needs
        reporting, else None (then :meth:`job` says what is wrong)."""
        return self.fast.job(job_id, raw, defaults, top_zone) if self.fast else None

    def job(self, job_id: Any, raw: Any, defaults: Part, top_zone: str | None) -> JobSpec | None:
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
            """The value that applies (or UNSET/BAD) and the part it comes from."""
            if part.wrote(k):
                return part.values.get(k, BAD), path
            if defaults.wrote(k) and not (k in TRIGGER_KEYS and own_trigger):
                return defaults.values.get(k, BAD), defaults.path
            return UNSET, path

        task, task_at = pick("task")
        task_type = None
        if task is UNSET:
            known = ", ".join(sorted(self.registry.task_types)) or "none"
            self.error(key(), f"job {name!r} is missing required key 'task' (known tasks: {known})")
        elif task is not BAD:
            task_type = self.registry.task_types.get(task)
            if task_type is None:
                self.error(src.value_loc((*task_at, "task")), self.unknown_task(task))
        found = [k for k in TRIGGER_KEYS if pick(k)[0] is not UNSET]
        if len(found) != 1:
            listed = ", ".join(found) or "none"
            message = f"job {name!r} needs exactly one of cron, every, at (found: {listed})"
            locs = sorted((src.key_loc((*pick(k)[1], k)) for k in found), key=_position)
            self.error(locs[1] if len(locs) > 1 else key(), message)
        zone, _ = pick("timezone")
        zone = top_zone if zone is UNSET else None if zone is BAD else zone
        params = self.params(task_type, *pick("params"))
        schedule, expr = None, ""
        if len(found) == 1:  # with a bad zone, still report a bad expression
            value, at = pick(found[0])
            written = raw if at == path else defaults.raw
            schedule, expr = self.schedule(name, found[0], value, at, zone or "UTC", written)
        values = {k: pick(k)[0] for k in JOB_DEFAULTS}
        env_file, env_file_at = pick("env_file")
        if isinstance(env_file, str):
            values["env_file"] = self.extras.env_file(env_file, env_file_at)
        if "env" in part.bad or "env" in defaults.bad:
            return None
        values["env"] = {**defaults.values.get("env", {}), **part.values.get("env", {})}
        values["run_as"] = self.extras.run_as(*pick("run_as"))
        if "limits" in part.bad or "limits" in defaults.bad:
            return None
        values["limits"] = self.extras.limits(
            merged_limits(defaults.values, part.values),
            defaults.values,
            part.values,
            path,
            defaults.path,
        )
        if len(self.problems) > before or schedule is None or params is None or zone is None:
            return None
        if any(v is BAD for v in values.values()):
            return None
        for k, default in JOB_DEFAULTS.items():
            if values[k] is UNSET:
                values[k] = default
        return JobSpec(
            id=name, task=task, params=params, trigger_kind=cast(TriggerKind, found[0]),
            trigger_expr=expr, schedule=schedule, timezone=zone, line=src.key_line(path), **values,
        )  # fmt: skip

    def params(self, task_type: Any, raw: Any, at: PathT) -> dict[str, Any] | None:
        if task_type is None or raw is BAD:
            return None
        base = (*at, "params")
        model = task_type.params
        known = tuple(f.alias or n for n, f in model.model_fields.items())
        where = f"in params of task {task_type.name!r}"
        scope = Scope(self.src, base, "params", where, known=known, list_known=True)
        try:
            obj, _bad, problems = validate(model, {} if raw is UNSET else raw, scope)
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
        if value is BAD:
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
