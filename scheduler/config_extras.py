"""The job keys that reach outside the file: ``env_file``, ``run_as``, ``limits``,
and the secrets to hide in what loading says.

A seam apart from the loader's own rules because these keys depend on the
machine, not the YAML: an env file is read now (so ``validate`` and reload
catch what a run would meet) and its values become secrets to mask; a
``run_as`` user is looked up in the user database and needs root to take
effect; ``limits`` merge with ``defaults`` key by key. Both the fast and the
validated path of a job call :class:`JobExtras` for them, so each file and
each user is read once per load, and each problem reported once per place
that names it. Problems go into the loader's own lists.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from scheduler import config_model as m
from scheduler import confine, envfile, redact
from scheduler.config_validate import BAD, UNSET
from scheduler.errors import Problem
from scheduler.yamlsrc import Loc, PathT, Source


def _limit_keys(value: Any) -> dict[str, Any]:
    """The keys a validated ``limits:`` sets (``limits: null`` sets none)."""
    if not isinstance(value, m.LimitFields):
        return {}
    return {k: getattr(value, k) for k in value.model_fields_set if getattr(value, k) is not None}


def merged_limits(base: dict[str, Any], own: dict[str, Any]) -> confine.Limits | None:
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


class JobExtras:
    """One load's env files, users and secrets; problems go to the loader's lists.

    ``root``: whether this process can switch users at all; ``to_run``: the
    jobs are about to run here, so a ``run_as`` without root is an error (else
    a warning, see :func:`scheduler.config.load_config`).
    """

    def __init__(
        self,
        src: Source,
        path: Path,
        problems: list[Problem],
        warnings: list[Problem],
        *,
        root: bool,
        to_run: bool,
    ) -> None:
        self.src = src
        self.path = path
        self.problems = problems
        self.warnings = warnings
        self.root = root
        self.to_run = to_run
        self.users: dict[str, confine.RunAs | confine.RunAsError] = {}
        # Each env_file once per place that names it: usable or not (problems said once).
        self.env_files: dict[tuple[str, PathT], bool] = {}
        self.env_paths: dict[str, str] = {}  # as written -> absolute
        self.env_reads: dict[str, tuple[envfile.EnvFileError | None, str | None]] = {}
        self.secrets: list[str] = []  # values read from env files, hidden in messages

    def error(self, loc: Loc, message: str) -> None:
        self.problems.append(self.src.problem(loc, message))

    def env_file(self, value: str, at: PathT) -> Any:
        """The absolute path of the env file ``value`` named in the mapping at ``at``
        (a job or defaults), or BAD once its problem has been reported."""
        path = self.env_paths.get(value)
        if path is None:
            path = self.env_paths[value] = os.path.normpath(
                self.path.parent / Path(value).expanduser()
            )
        key = (path, at)
        ok = self.env_files.get(key)
        if ok is None:
            ok = self.env_files[key] = self.check_env_file(path, at)
        return path if ok else BAD

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
        """The job's resolved ``run_as`` (or UNSET/BAD), its problems reported at its value."""
        if value is UNSET or value is BAD or value is None:
            return None if value is None else value
        loc = self.src.value_loc((*at, "run_as"))
        user = self.user(value)
        if isinstance(user, confine.RunAsError):
            self.error(loc, str(user))
            return BAD
        if not self.root:
            if self.to_run:
                self.error(
                    loc,
                    f"run_as {value!r} needs schedd to run as root, and it runs as {_identity()};"
                    " start it as root or remove run_as",
                )
                return BAD
            self.warnings.append(
                self.src.problem(
                    loc,
                    f"run_as {value!r} takes effect only when schedd runs as root;"
                    f" started as {_identity()}, the daemon would refuse this file",
                    warning=True,
                )
            )
        return user

    def limits(
        self,
        limits: confine.Limits | None,
        base: dict[str, Any],
        own: dict[str, Any],
        at: PathT,
        defaults_at: PathT,
    ) -> Any:
        """The merged ``limits`` (or BAD), once a negative ``nice`` was checked against root:
        reported at the ``nice`` that applies, the job's own or ``defaults``'."""
        if limits is None or limits.nice is None or limits.nice >= 0 or self.root:
            return limits
        own_nice = "nice" in _limit_keys(own.get("limits"))
        loc = self.src.value_loc((*(at if own_nice else defaults_at), "limits", "nice"))
        if self.to_run:
            self.error(
                loc,
                f"nice {limits.nice} (a higher priority) needs schedd to run as root, and it"
                f" runs as {_identity()}; use 0..19 or start it as root",
            )
            return BAD
        self.warnings.append(
            self.src.problem(
                loc,
                f"nice {limits.nice} takes effect only when schedd runs as root; started as"
                f" {_identity()}, the daemon would refuse this file",
                warning=True,
            )
        )
        return limits

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
