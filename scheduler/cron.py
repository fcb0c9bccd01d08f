"""Crontab expressions: field parsing, and matching in naive local time.

This module knows nothing about time zones. It answers "which wall-clock
date-times does this expression name?"; :mod:`scheduler.triggers` decides which
instants those become when daylight saving moves the clock.

Rules followed, checked against cronie (github.com/cronie-crond/cronie, commit
5f9f16b, ``src/entry.c`` load_entry/get_list/get_range/get_number,
``src/cron.c`` find_jobs, ``man/crontab.5``):

* Fields: minute 0-59, hour 0-23, day-of-month 1-31, month 1-12, day-of-week
  0-7. 0 and 7 are both Sunday (load_entry sets both bits when either is set).
* A field is a comma list of terms; a term is ``*``, ``N``, ``A-B``, ``*/S`` or
  ``A-B/S`` (get_range). ``*`` means first-last of the field, so in
  day-of-week ``*/S`` walks 0..7. ``*`` may stand inside a list (get_range
  accepts it in R_START). Numbers are ASCII decimal, leading zeros allowed
  (strtol). A step larger than the range only leaves its first value (cronie
  merely warns).
* Names: the three-letter month (jan-dec) and day (sun-sat) names, any case
  (strcasecmp in get_number), only in those two fields, also as range ends.
* The day rule (find_jobs): DOM_STAR / DOW_STAR are set when the field's text
  *begins with* ``*`` (load_entry tests only the first character), so ``*/2``
  counts as star and ``1,*`` does not. If either flag is set, a day must match
  both fields; if neither is, it matches when either field matches.
* Macros (load_entry): ``@yearly``/``@annually`` = ``0 0 1 1 *``, ``@monthly`` =
  ``0 0 1 * *``, ``@weekly`` = ``0 0 * * 0``, ``@daily``/``@midnight`` =
  ``0 0 * * *``, ``@hourly`` = ``0 * * * *`` (cronie flags @hourly HR_STAR,
  which that text reproduces).

schedd's deliberate differences from cronie, each an extension or stricter:

* A backwards range is an error; cronie silently selects nothing. cronie's one
  repair, ``X-0`` read as ``X-7`` (so ``fri-sun`` works), is kept, but only in
  day-of-week (cronie applies it in every field, where it is meaningless) and
  also before a step (cronie skips it there by accident of its state machine).
* ``A/S`` is accepted as ``A-max/S`` (as croniter normalises it);
  cronie rejects it.
* Macros match case-insensitively (cronie: strcmp); ``@reboot`` is refused since
  schedd has no boot event. cronie's ``~`` random ranges are not supported.
* An optional leading seconds field (6 fields; 5 fields means second 0).
* Jenkins-style ``H`` terms (``h`` too), with h = :func:`hash_value` of the job
  id and field: ``H`` = lo + h % size over the field, except day-of-month 1-28
  and day-of-week 0-6; ``H(a-b)`` = a + h % (b-a+1); ``H/n`` and ``H(a-b)/n``
  start at lo + h % n (modulo the range size instead when n exceeds it) and
  step by n to the range's end (31 for day-of-month, where Jenkins uses 28).
  Fields holding H count as restricted for the day rule.
"""

from __future__ import annotations

import calendar
import hashlib
import re
from bisect import bisect_left
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache


class TriggerError(ValueError):
    """A schedule expression is invalid. ``offset`` is the 0-based character
    index inside the expression where the problem starts, when known, so the
    config loader can point at the exact column."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset


_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    # Part of the H seed: 5-field order with seconds last, so adding seconds moves nothing.
    hash_index: int
    lo: int
    hi: int
    names: tuple[str, ...]  # names[i] means lo + i
    h_hi: int  # plain H picks from lo..h_hi
    hstep_hi: int  # H/n walks lo..hstep_hi


_SECOND = _Field("second", 5, 0, 59, (), 59, 59)
_MINUTE = _Field("minute", 0, 0, 59, (), 59, 59)
_HOUR = _Field("hour", 1, 0, 23, (), 23, 23)
# Plain H stays within 1-28 so a hashed day exists in every month (Jenkins does the same).
_DOM = _Field("day-of-month", 2, 1, 31, (), 28, 31)
_MONTH = _Field("month", 3, 1, 12, _MONTHS, 12, 12)
# H in day-of-week picks from 0-6 so Sunday is not twice as likely as other days.
_DOW = _Field("day-of-week", 4, 0, 7, _DAYS, 6, 6)
_FIVE = (_MINUTE, _HOUR, _DOM, _MONTH, _DOW)

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

_TERM = re.compile(
    r"(?:(?P<star>\*)"
    r"|(?P<h>[Hh])(?:\((?P<hlo>[A-Za-z0-9]+)-(?P<hhi>[A-Za-z0-9]+)\))?"
    r"|(?P<lo>[A-Za-z0-9]+)(?:-(?P<hi>[A-Za-z0-9]+))?)"
    r"(?:/(?P<step>[A-Za-z0-9]+))?"
)
_HAS_H = re.compile(r"(?:^|[\s,])[Hh]")


def has_hash(expr: str) -> bool:
    """Whether the expansion depends on the job id (no month/day name starts with h)."""
    return _HAS_H.search(expr) is not None


def hash_value(job_id: str, field_index: int) -> int:
    """The stable number behind every ``H`` of one field of one job.

    sha256 of ``"<job id>:<field index>"`` (UTF-8), first 8 bytes big-endian;
    field index is 0 minute, 1 hour, 2 day-of-month, 3 month, 4 day-of-week,
    5 second. Python's ``hash()`` is salted per process, so it would move jobs
    on every restart.
    """
    digest = hashlib.sha256(f"{job_id}:{field_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


@dataclass(frozen=True, eq=False)
class CronSpec:
    """The compiled expression: sorted allowed values per field plus the star flags."""

    seconds: tuple[int, ...]
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    doms: tuple[int, ...]
    months: tuple[int, ...]
    dows: frozenset[int]  # 0-6, Sunday 0
    dom_star: bool
    dow_star: bool
    hour_star: bool
    _days: dict[int, tuple[int, ...]] = field(default_factory=dict, repr=False)

    def days_in(self, year: int, month: int) -> tuple[int, ...]:
        """Matching days of one month, memoised because every search asks for them."""
        key = year * 16 + month
        days = self._days.get(key)
        if days is None:
            if len(self._days) > 4096:
                self._days.clear()
            first_wd, ndays = calendar.monthrange(year, month)
            first_sun0 = (first_wd + 1) % 7
            by_dom = {d for d in self.doms if d <= ndays}
            by_dow = {d for d in range(1, ndays + 1) if (first_sun0 + d - 1) % 7 in self.dows}
            chosen = by_dom & by_dow if self.dom_star or self.dow_star else by_dom | by_dow
            days = tuple(sorted(chosen))
            self._days[key] = days
        return days

    def matches(self, t: datetime) -> bool:
        """Whether naive ``t`` (whole second) is named by the expression."""
        return (
            t.second in self.seconds
            and t.minute in self.minutes
            and t.hour in self.hours
            and t.month in self.months
            and t.day in self.days_in(t.year, t.month)
        )

    def next_match(self, start: datetime) -> datetime | None:
        """The first naive time >= ``start`` (rounded up to a whole second) that matches.

        Jumps field by field with bisect; the 401-year bound is safe because
        the Gregorian calendar repeats every 400 years and parse() has
        already rejected expressions that never fire. None past year 9999.
        """
        y, mo, d = start.year, start.month, start.day
        h, mi, s = start.hour, start.minute, start.second
        if start.microsecond:
            s += 1
        months, hours, minutes, seconds = self.months, self.hours, self.minutes, self.seconds
        last_year = min(y + 401, 9999)
        while y <= last_year:
            i = bisect_left(months, mo)
            if i == len(months):
                y, mo, d, h, mi, s = y + 1, months[0], 1, 0, 0, 0
                continue
            if months[i] != mo:
                mo, d, h, mi, s = months[i], 1, 0, 0, 0
            days = self.days_in(y, mo)
            i = bisect_left(days, d)
            if i == len(days):
                mo, d, h, mi, s = mo + 1, 1, 0, 0, 0
                if mo > 12:
                    y, mo = y + 1, 1
                continue
            if days[i] != d:
                d, h, mi, s = days[i], 0, 0, 0
            i = bisect_left(hours, h)
            if i == len(hours):
                d, h, mi, s = d + 1, 0, 0, 0
                continue
            if hours[i] != h:
                h, mi, s = hours[i], 0, 0
            i = bisect_left(minutes, mi)
            if i == len(minutes):
                h, mi, s = h + 1, 0, 0
                continue
            if minutes[i] != mi:
                mi, s = minutes[i], 0
            i = bisect_left(seconds, s)
            if i == len(seconds):
                mi, s = mi + 1, 0
                continue
            return datetime(y, mo, d, h, mi, seconds[i])
        return None


@dataclass(frozen=True, slots=True)
class ParsedCron:
    source: str  # the expression as written, whitespace normalised
    expanded: str  # H terms replaced by numbers, macros by their fields
    spec: CronSpec


def _err(message: str, offset: int) -> TriggerError:
    return TriggerError(message, offset)


def _value(text: str, pos: int, f: _Field) -> int:
    allowed = f"{f.lo}-{f.hi}"
    if f.names:
        allowed += f" or names {f.names[0]}-{f.names[-1]}"
    if text.isascii() and text.isdigit():
        v = int(text)
        if not f.lo <= v <= f.hi:
            raise _err(f"{f.name} value {v} is out of range (allowed {allowed})", pos)
        return v
    if not f.names:
        raise _err(f"{text!r} is not a number; the {f.name} field takes {allowed}", pos)
    low = text.lower()
    if low in f.names:
        return f.lo + f.names.index(low)
    raise _err(f"unknown {f.name} name {text!r} (allowed {allowed})", pos)


def _step(text: str | None, pos: int, f: _Field) -> int:
    if text is None:
        return 1
    if not (text.isascii() and text.isdigit()):
        raise _err(f"step {text!r} in the {f.name} field must be a whole number >= 1", pos)
    n = int(text)
    if n == 0:
        raise _err(f"step 0 in the {f.name} field: a step must be at least 1", pos)
    return n


def _hash_term(m: re.Match[str], base: int, f: _Field, hval: int) -> tuple[range, str]:
    if m.group("hlo") is not None:
        lo = _value(m.group("hlo"), base + m.start("hlo"), f)
        hi = _value(m.group("hhi"), base + m.start("hhi"), f)
        if lo > hi:
            raise _err(f"H range ({lo}-{hi}) in the {f.name} field runs backwards", base)
        ranged = True
    else:
        lo, hi, ranged = f.lo, f.h_hi, False
    if m.group("step") is None:
        v = lo + hval % (hi - lo + 1)
        return range(v, v + 1), str(v)
    step = _step(m.group("step"), base + m.start("step"), f)
    if not ranged:
        hi = f.hstep_hi
    # Reduce modulo the span too, so a step wider than the range still leaves one value.
    start = lo + hval % min(step, hi - lo + 1)
    values = range(start, hi + 1, step)
    text = str(start) if len(values) == 1 else f"{start}-{hi}/{step}"
    return values, text


def _parse_field(text: str, base: int, f: _Field, job_id: str) -> tuple[set[int], str]:
    """Values of one field and its H-expanded text; ``base`` is its offset in the expression."""
    values: set[int] = set()
    out: list[str] = []
    pos = base
    for term in text.split(","):
        if not term:
            raise _err(f"empty item in the {f.name} list {text!r}", pos)
        m = _TERM.fullmatch(term)
        if m is None:
            raise _err(
                f"cannot read {term!r} in the {f.name} field; expected *, N, A-B, */S, A-B/S,"
                f" A/S, H, H(A-B), H/S or a comma list of these, N in {f.lo}-{f.hi}",
                pos,
            )
        if m.group("h") is not None:
            rng, expanded = _hash_term(m, pos, f, hash_value(job_id, f.hash_index))
            values.update(rng)
            out.append(expanded)
        else:
            step = _step(m.group("step"), pos + m.start("step"), f)
            if m.group("star") is not None:
                lo, hi = f.lo, f.hi
            else:
                lo = _value(m.group("lo"), pos, f)
                if m.group("hi") is not None:
                    hi = _value(m.group("hi"), pos + m.start("hi"), f)
                    if f is _DOW and hi == 0 and lo > 0:
                        hi = 7  # cronie: "fri-sun" / "5-0" means 5-7
                    if lo > hi:
                        raise _err(
                            f"range {term.split('/')[0]!r} in the {f.name} field runs backwards"
                            f" ({lo} > {hi}); ranges cannot wrap, write two ranges instead",
                            pos,
                        )
                else:
                    hi = f.hi if m.group("step") is not None else lo
            values.update(range(lo, hi + 1, step))
            out.append(term)
        pos += len(term) + 1
    return values, ",".join(out)


@dataclass(frozen=True, slots=True)
class _HashTemplate:
    """An expression with H terms, split once so each job only fills in its numbers.

    ``fields`` holds, per field, its text when it has no H term, else its
    terms: a term's text, or for an H term its match, offset and field.
    """

    source: str
    fields: tuple[str | tuple[str | tuple[re.Match[str], int, _Field], ...], ...]


@lru_cache(maxsize=4096)
def _hash_template(expr: str) -> _HashTemplate | None:
    """The template of ``expr``, or None if it is not a plain 5/6-field expression
    whose terms all read (then :func:`parse` finds and words the problem)."""
    tokens = [(m.start(), m.group()) for m in re.finditer(r"\S+", expr)]
    if len(tokens) not in (5, 6):
        return None
    kinds = _FIVE if len(tokens) == 5 else (_SECOND, *_FIVE)
    fields: list[str | tuple[str | tuple[re.Match[str], int, _Field], ...]] = []
    for (pos, text), f in zip(tokens, kinds, strict=True):
        if not _HAS_H.search(text):
            fields.append(text)
            continue
        terms: list[str | tuple[re.Match[str], int, _Field]] = []
        for term in text.split(","):
            m = _TERM.fullmatch(term)
            if m is None:
                return None
            terms.append((m, pos, f) if m.group("h") is not None else term)
            pos += len(term) + 1
        fields.append(tuple(terms))
    return _HashTemplate(" ".join(t for _, t in tokens), tuple(fields))


def expand_hash(expr: str, job_id: str) -> tuple[str, str] | None:
    """``(source, expanded)`` as :func:`parse` gives them for ``expr`` with H
    terms, without parsing ``expr`` again for every job (a config may have
    thousands of H jobs, and each expands differently). None when the template
    does not read or an H term is invalid: :func:`parse` then reports why. The
    expansion itself is still to be parsed (and so checked) by the caller.
    """
    template = _hash_template(expr)
    if template is None:
        return None
    out: list[str] = []
    try:
        for field_ in template.fields:
            if isinstance(field_, str):
                out.append(field_)
                continue
            texts: list[str] = []
            hval: int | None = None
            for term in field_:
                if isinstance(term, str):
                    texts.append(term)
                    continue
                m, pos, f = term
                if hval is None:
                    hval = hash_value(job_id, f.hash_index)
                texts.append(_hash_term(m, pos, f, hval)[1])
            out.append(",".join(texts))
    except TriggerError:
        return None
    return template.source, " ".join(out)


def _max_days(month: int) -> int:
    return 29 if month == 2 else calendar.monthrange(2001, month)[1]


def parse(expr: str, job_id: str = "") -> ParsedCron:
    """Validate ``expr`` and compile it; H terms are seeded with ``job_id``."""
    if not isinstance(expr, str):
        raise TriggerError(f"a cron expression must be a string, not {type(expr).__name__}", 0)
    tokens = [(m.start(), m.group()) for m in re.finditer(r"\S+", expr)]
    if not tokens:
        raise TriggerError("empty cron expression; expected 5 fields or an @macro", 0)
    source = " ".join(t for _, t in tokens)
    if tokens[0][1].startswith("@"):
        pos, word = tokens[0]
        if len(tokens) > 1:
            raise _err(f"{word} takes no further fields", tokens[1][0])
        low = word.lower()
        if low == "@reboot":
            raise _err("@reboot is not supported: schedd has no boot event", pos)
        if low not in MACROS:
            raise _err(f"unknown macro {word!r}; allowed: {', '.join(MACROS)}", pos)
        return ParsedCron(source, MACROS[low], parse(MACROS[low]).spec)
    if len(tokens) not in (5, 6):
        where = tokens[6][0] if len(tokens) > 6 else len(expr.rstrip())
        raise _err(
            f"expected 5 fields (minute hour day-of-month month day-of-week) or 6 with"
            f" leading seconds, got {len(tokens)}",
            where,
        )
    fields = _FIVE if len(tokens) == 5 else (_SECOND, *_FIVE)
    sets: list[set[int]] = []
    texts: list[str] = []
    for (pos, text), f in zip(tokens, fields, strict=True):
        vals, expanded = _parse_field(text, pos, f, job_id)
        sets.append(vals)
        texts.append(expanded)
    if len(tokens) == 5:
        sets.insert(0, {0})
        raw = [t for _, t in tokens]
    else:
        raw = [t for _, t in tokens[1:]]
    secs, mins, hours, doms, months, dows = sets
    dom_star, dow_star = raw[2].startswith("*"), raw[4].startswith("*")
    spec = CronSpec(
        seconds=tuple(sorted(secs)),
        minutes=tuple(sorted(mins)),
        hours=tuple(sorted(hours)),
        doms=tuple(sorted(doms)),
        months=tuple(sorted(months)),
        dows=frozenset(d % 7 for d in dows),
        dom_star=dom_star,
        dow_star=dow_star,
        hour_star=raw[1].startswith("*"),
    )
    # With OR the weekday side always fires. With AND every (month, day) that
    # exists falls on every weekday within a 400-year cycle (Feb 29 included),
    # so only the month/day pairing can make the expression empty.
    if (dom_star or dow_star) and not any(
        d <= _max_days(m) for m in spec.months for d in spec.doms
    ):
        dom_pos = tokens[-3][0]
        raise _err(
            f"never fires: no month in {raw[3]!r} has a day {raw[2]!r}"
            " (February has at most 29 days; April, June, September and November 30)",
            dom_pos,
        )
    return ParsedCron(source, " ".join(texts), spec)
