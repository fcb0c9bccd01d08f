"""Validating one mapping of the file against its model, every problem located.

The seam between pydantic and the rest of loading: pydantic stops at nothing
but returns nothing on error, and speaks of ``loc`` tuples and error types;
the loader needs the valid keys kept, the bad ones named, and each problem
said plainly at its line and column. So this module turns pydantic errors
into :class:`~scheduler.errors.Problem` objects (:func:`validate`, with a
:class:`Scope` saying where the mapping sits and how to name its keys), and
holds :class:`Part`, the valid/bad/raw view of one validated mapping that
the rest of loading reads. It knows nothing of jobs, schedules or plugins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final

from pydantic import BaseModel, ValidationError

from scheduler import config_model as m
from scheduler.errors import Problem
from scheduler.yamlsrc import PathT, Source, kind

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


# -- one validated mapping, as the loader reads it ---------------------------------

#: What the loader's ``pick`` gives for a key nobody wrote...
UNSET: Final = object()
#: ...and for a key written with a problem already reported (in :attr:`Part.bad`).
BAD: Final = object()


@dataclass
class Part:
    """``defaults`` or one job after validation: the keys it wrote that are
    valid (``values``), the ones already reported as invalid (``bad``), and
    the mapping as written (``raw``)."""

    path: PathT
    values: dict[str, Any] = field(default_factory=dict)
    bad: set[str] = field(default_factory=set)
    raw: dict[Any, Any] = field(default_factory=dict)

    def wrote(self, key: str) -> bool:
        return key in self.values or key in self.bad
