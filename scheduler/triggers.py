"""When a job fires: cron (crontab(5)-exact), every (real elapsed time), at (one-shot).

Syntax and day rules live in :mod:`scheduler.cron`; this module turns the
wall-clock times an expression names into instants in the job's time zone.

Daylight saving, per job time zone (DESIGN.md "Time", cronie cron(8)):

* Wall-clock jobs, whose *hour* field begins with ``*`` (``*``, ``*/n``,
  ``@hourly``), fire at every instant whose local time matches: both copies of
  a repeated fall-back hour, nothing for local times inside a spring-forward
  gap. cronie treats a job as wildcard when the minute *or* the hour field
  begins with ``*`` (cron.c find_jobs, MIN_STAR|HR_STAR); the product spec keys
  on the hour only, so ``*/5 2 * * *`` is a fixed-time job here.
* Every other cron job is fixed-time: each local date-time it names fires
  once; one inside a gap fires at the first instant after the gap (the
  transition), one inside a fold only at its first occurrence. Several local
  times landing on one instant fire once.

Every search is bounded (about 400 years, the Gregorian cycle; never-firing
expressions are rejected at parse time) and each result is strictly after the
given instant, so successive fire times strictly increase.

Results are aware datetimes in the job's zone. Compare them by instant
(``.timestamp()`` or after ``.astimezone(UTC)``): Python compares two
datetimes sharing a tzinfo by wall time and ignores ``fold``, so the second
02:30 of a fall-back night would sort before the first 02:45.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from bisect import bisect_right
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from scheduler import cron
from scheduler.cron import TriggerError

__all__ = [
    "AtSchedule",
    "CronSchedule",
    "EverySchedule",
    "Schedule",
    "TriggerError",
    "parse_at",
    "parse_cron",
    "parse_every",
]

_UTC = UTC
_EPOCH = datetime(1970, 1, 1, tzinfo=_UTC)
_NAIVE_EPOCH = datetime(1970, 1, 1)
_SECOND = timedelta(seconds=1)
_MICRO = timedelta(microseconds=1)
# Offset sampling step. No two offset changes in tzdata 2026.6 lie within 3 days of each
# other (checked over every zone's TZif table), so a 6-hour window holds at most one.
_SAMPLE = 6 * 3600
# Keep a two-day margin inside datetime's range so local offsets never overflow it.
_MIN_TS = -62135596800 + 2 * 86400  # 0001-01-03T00:00:00Z
_MAX_TS = 253402300799 - 2 * 86400  # 9999-12-29T23:59:59Z


def _ts(t: datetime) -> int:
    """Whole epoch seconds at or before aware ``t``, exactly (no float rounding)."""
    return (t - _EPOCH) // _SECOND


def _naive(seconds: int) -> datetime:
    return _NAIVE_EPOCH + timedelta(seconds=seconds)


def _naive_ts(t: datetime) -> int:
    return (t - _NAIVE_EPOCH) // _SECOND


def _offset(tz: ZoneInfo, ts: int) -> int:
    off = datetime.fromtimestamp(ts, tz).utcoffset()
    assert off is not None
    return off // _SECOND


def _local_offset(tz: ZoneInfo, local: datetime, fold: int) -> int:
    off = local.replace(tzinfo=tz, fold=fold).utcoffset()
    assert off is not None
    return off // _SECOND


def _first_change(tz: ZoneInfo, lo: int, hi: int) -> int:
    """Smallest x in (lo, hi] whose UTC offset differs from lo's; hi must differ."""
    base = _offset(tz, lo)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _offset(tz, mid) == base:
            lo = mid
        else:
            hi = mid
    return hi


_transition_cache: dict[tuple[ZoneInfo, int], tuple[int, ...]] = {}


def _transitions(tz: ZoneInfo, year: int) -> tuple[int, ...]:
    """Offset changes in a UTC year, found by sampling and bisecting (zoneinfo has no API)."""
    key = (tz, year)
    found = _transition_cache.get(key)
    if found is None:
        start = max(_ts(datetime(year, 1, 1, tzinfo=_UTC)), _MIN_TS)
        end = _ts(datetime(year + 1, 1, 1, tzinfo=_UTC)) if year < 9999 else _MAX_TS
        points = [*range(start - 1, end - 1, _SAMPLE), end - 1]
        offs = [_offset(tz, p) for p in points]
        found = tuple(
            _first_change(tz, a, b)
            for a, b, oa, ob in zip(points, points[1:], offs, offs[1:], strict=False)
            if oa != ob
        )
        _transition_cache[key] = found
    return found


def _next_boundary(tz: ZoneInfo, ts: int) -> int:
    """The next offset change after ``ts``, or the next UTC new year if sooner.

    A new year is a harmless pseudo-boundary for the segment walk (the offset
    just stays), and it keeps every lookup inside one cached year.
    """
    year = datetime.fromtimestamp(ts, _UTC).year
    trans = _transitions(tz, year)
    i = bisect_right(trans, ts)
    if i < len(trans):
        return trans[i]
    return _ts(datetime(year + 1, 1, 1, tzinfo=_UTC)) if year < 9999 else _MAX_TS


def _resolve(tz: ZoneInfo, local: datetime) -> tuple[int, bool]:
    """Instant for whole-second naive ``local`` under the fixed-time rule, and
    whether ``local`` is ambiguous (then the instant is the first occurrence)."""
    n = _naive_ts(local)
    before = _local_offset(tz, local, 0)  # fold=0: the offset before any transition
    after = _local_offset(tz, local, 1)
    u = n - before
    if _offset(tz, u) == before:
        return u, before != after
    # In a gap: the transition lies in (n - after, n - before].
    return _first_change(tz, n - after, u), False


class Schedule(ABC):
    """A parsed trigger. Immutable; may be shared by many jobs."""

    tz: ZoneInfo

    @abstractmethod
    def next_after(self, t: datetime) -> datetime | None:
        """The first fire time strictly after aware ``t`` (in ``self.tz``), or None."""

    @abstractmethod
    def describe(self) -> str:
        """The schedule in words, for ``schedd jobs``."""


def _aware_ts(t: datetime) -> int:
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"next_after needs an aware datetime, got naive {t.isoformat()}")
    return _ts(t)


class CronSchedule(Schedule):
    """A cron expression bound to a zone. ``expanded`` is the text actually run
    (H terms replaced by this job's numbers, macros by their fields)."""

    __slots__ = ("expanded", "source", "spec", "tz", "wall_clock")

    def __init__(self, source: str, expanded: str, spec: cron.CronSpec, tz: ZoneInfo) -> None:
        self.source = source
        self.expanded = expanded
        self.spec = spec
        self.tz = tz
        self.wall_clock = spec.hour_star

    def __repr__(self) -> str:
        return f"<CronSchedule {self.describe()}>"

    def describe(self) -> str:
        shown = f'cron "{self.source}"'
        if self.expanded != self.source:
            shown += f' = "{self.expanded}"'
        return f"{shown} ({self.tz.key or self.tz})"

    def next_after(self, t: datetime) -> datetime | None:
        ts = max(_aware_ts(t), _MIN_TS)
        if ts >= _MAX_TS:
            return None
        found = self._next_wall(ts) if self.wall_clock else self._next_fixed(ts)
        if found is None or found >= _MAX_TS:
            return None
        return datetime.fromtimestamp(found, self.tz)

    def _next_wall(self, ts: int) -> int | None:
        """Walk UTC-offset segments: inside one the local clock runs linearly, so the
        first naive match after the segment's start is the answer if it maps
        before the segment ends; otherwise carry on from the next segment."""
        tz, spec = self.tz, self.spec
        s, step = ts, _SECOND  # first segment: strictly after ts; later ones: from their start
        while s < _MAX_TS:
            off = _offset(tz, s)
            end = _next_boundary(tz, s)
            m = spec.next_match(_naive(s + off) + step)
            if m is None:
                return None
            cand = _naive_ts(m) - off
            if cand < end:
                return cand
            s, step = end, timedelta(0)
        return None

    def _next_fixed(self, ts: int) -> int | None:
        """Fixed-time local times map monotonically onto instants, so the answer is
        the first naive match after local(ts) -- unless ts is in the second pass
        of a fold, where matches up to the fold's end map to the first pass."""
        tz, spec = self.tz, self.spec
        start = _naive(ts + _offset(tz, ts)) + _SECOND
        for _ in range(3):
            m = spec.next_match(start)
            if m is None:
                return None
            u, ambiguous = _resolve(tz, m)
            if u > ts:
                return u
            if not ambiguous:  # cannot happen: every match after local(ts) is later
                break
            # Skip to the end of the first pass: the transition seen at the old offset.
            before = _local_offset(tz, m, 0)
            second = _naive_ts(m) - _local_offset(tz, m, 1)
            start = _naive(_first_change(tz, u, second) + before)
        raise AssertionError(f"no progress resolving {self.describe()} after {ts}")


# As large as _shared: H expressions expand to many distinct plain ones.
@lru_cache(maxsize=1 << 17)
def _parse_plain(expr: str) -> cron.ParsedCron:
    return cron.parse(expr)


@lru_cache(maxsize=1 << 17)
def _shared(source: str, expanded: str, tz: ZoneInfo) -> CronSchedule:
    return CronSchedule(source, expanded, _parse_plain(expanded).spec, tz)


def parse_cron(expr: str, tz: ZoneInfo, job_id: str) -> Schedule:
    """Parse a cron expression for one job.

    Jobs whose (written form, expanded form, zone) agree get the same object,
    so the daemon can group them; the written form is part of the key only
    because ``describe()`` shows it (``H 3 * * *`` vs a literal ``37 3 * * *``).
    """
    if not isinstance(expr, str):
        raise TriggerError(f"a cron expression must be a string, not {type(expr).__name__}", 0)
    if not cron.has_hash(expr):
        parsed = _parse_plain(expr)
        return _shared(parsed.source, parsed.expanded, tz)
    quick = cron.expand_hash(expr, job_id)  # H terms filled in from a per-expression template
    if quick is not None:
        try:
            _parse_plain(quick[1])
        except TriggerError:
            quick = None  # parse() below says what is wrong, at the right offset
    if quick is None:
        parsed = cron.parse(expr, job_id)
        quick = parsed.source, parsed.expanded
    return _shared(quick[0], quick[1], tz)


def _fmt_seconds(seconds: float) -> str:
    if seconds != int(seconds):
        return f"{seconds:g}s"
    rest, parts = int(seconds), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts)


class EverySchedule(Schedule):
    """Fixed real-time interval anchored at the Unix epoch, so every process and
    ``schedd next`` compute the same fire times without stored state."""

    __slots__ = ("interval_us", "seconds", "tz")

    def __init__(self, seconds: float, tz: ZoneInfo) -> None:
        self.seconds = seconds
        self.interval_us = round(seconds * 1_000_000)
        self.tz = tz

    # By value: a reload compares old and new JobSpecs, and a fresh parse of an
    # unchanged ``every`` must not make the job look changed.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EverySchedule):
            return NotImplemented
        return (self.interval_us, self.seconds, self.tz) == (
            other.interval_us,
            other.seconds,
            other.tz,
        )

    def __hash__(self) -> int:
        return hash((self.interval_us, self.tz))

    def describe(self) -> str:
        return f"every {_fmt_seconds(self.seconds)}"

    def next_after(self, t: datetime) -> datetime | None:
        _aware_ts(t)
        us = (t - _EPOCH) // _MICRO
        try:
            return (_EPOCH + (us // self.interval_us + 1) * self.interval_us * _MICRO).astimezone(
                self.tz
            )
        except OverflowError:
            return None


def parse_every(seconds: float, tz: ZoneInfo) -> Schedule:
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise TriggerError(f"every needs a number of seconds, got {seconds!r}", 0)
    if not math.isfinite(seconds) or seconds < 1:
        raise TriggerError(f"every needs at least 1 second, got {seconds!r}", 0)
    if seconds > 100 * 366 * 86400:
        raise TriggerError(f"every allows at most 100 years, got {seconds!r} seconds", 0)
    return EverySchedule(seconds, tz)


class AtSchedule(Schedule):
    """One instant, already resolved to the job's zone."""

    __slots__ = ("instant", "tz")

    def __init__(self, instant: datetime, tz: ZoneInfo) -> None:
        self.instant = instant
        self.tz = tz

    def __eq__(self, other: object) -> bool:  # by value, as EverySchedule
        if not isinstance(other, AtSchedule):
            return NotImplemented
        same = (self.instant - _EPOCH, self.instant.isoformat(), self.tz)
        return same == (other.instant - _EPOCH, other.instant.isoformat(), other.tz)

    def __hash__(self) -> int:
        return hash((self.instant - _EPOCH, self.tz))

    def describe(self) -> str:
        return f"at {self.instant.isoformat()}"

    def next_after(self, t: datetime) -> datetime | None:
        _aware_ts(t)
        # Compare offsets from the UTC epoch: same-tzinfo comparison (or subtraction)
        # ignores fold, and astimezone() overflows at the calendar's ends (0001-01-01+14:00).
        if self.instant - _EPOCH > t - _EPOCH:
            return self.instant
        return None


def parse_at(when: datetime, tz: ZoneInfo) -> Schedule:
    """A naive ``when`` is local time in ``tz`` under the fixed-time rule (gap:
    first instant after it; fold: first occurrence); an aware one is kept."""
    if not isinstance(when, datetime):
        raise TriggerError(f"at needs a date-time, got {when!r}", 0)
    try:
        if when.tzinfo is None or when.utcoffset() is None:
            whole = when.replace(microsecond=0, fold=0)
            u, _ = _resolve(tz, whole)
            in_gap = _naive(u + _offset(tz, u)) != whole
            micro = 0 if in_gap else when.microsecond
            instant = (_EPOCH + timedelta(seconds=u, microseconds=micro)).astimezone(tz)
        else:
            instant = when.astimezone(tz)
    except (OverflowError, ValueError) as exc:  # within a day of year 1 or 9999
        raise TriggerError(f"at {when.isoformat()} is outside the supported dates", 0) from exc
    return AtSchedule(instant, tz)
