"""Daylight saving: hand-checked cases, a brute-force oracle around every transition,
two-year properties in many zones, and croniter away from transition days.

Transitions used below (checked against zoneinfo):
  Berlin     2027-03-28 02:00 CET -> 03:00 CEST;   2027-10-31 03:00 CEST -> 02:00 CET
  New York   2027-03-14 02:00 EST -> 03:00 EDT;    2027-11-07 02:00 EDT -> 01:00 EST
  Lord_Howe  2027-10-03 02:00 +10:30 -> 02:30 +11; 2027-04-04 02:00 +11 -> 01:30 +10:30
  Santiago   2027-09-05 00:00 -04 -> 01:00 -03;    2027-04-04 00:00 -03 -> 2027-04-03 23:00 -04
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from functools import cache
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from hypothesis import HealthCheck, assume, given, reject, settings
from hypothesis import strategies as st
from test_cron import DAY_NAMES, MONTH_NAMES, cron_field

from scheduler.cron import CronSpec, parse
from scheduler.triggers import CronSchedule, TriggerError, parse_cron

ZONES = [
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "America/Santiago",
    "Asia/Kolkata",
    "UTC",
]
MINUTE = timedelta(minutes=1)


def fires(expr: str, zone: str, start: str, n: int) -> list[str]:
    sched = parse_cron(expr, ZoneInfo(zone), "job")
    t: datetime | None = datetime.fromisoformat(start)
    out = []
    for _ in range(n):
        assert t is not None
        t = sched.next_after(t)
        assert t is not None
        out.append(t.isoformat())
    return out


# --- hand-checked --------------------------------------------------------------------

B, NY = "Europe/Berlin", "America/New_York"

CASES = [
    # Fixed time in the gap: once, at the first instant after it; in the fold: first pass only.
    ("30 2 * * *", B, "2027-03-27T12:00:00+01:00",
     ["2027-03-28T03:00:00+02:00", "2027-03-29T02:30:00+02:00"]),
    ("30 2 * * *", B, "2027-10-30T12:00:00+02:00",
     ["2027-10-31T02:30:00+02:00", "2027-11-01T02:30:00+01:00"]),
    ("30 2 * * *", NY, "2027-03-13T12:00:00-05:00",
     ["2027-03-14T03:00:00-04:00", "2027-03-15T02:30:00-04:00"]),
    ("30 2 * * *", NY, "2027-11-06T12:00:00-04:00",
     ["2027-11-07T02:30:00-05:00", "2027-11-08T02:30:00-05:00"]),
    ("30 1 * * *", NY, "2027-11-06T12:00:00-04:00",
     ["2027-11-07T01:30:00-04:00", "2027-11-08T01:30:00-05:00"]),
    # Started inside the second pass, the first pass's time is already gone.
    ("30 2 * * *", B, "2027-10-31T02:10:00+01:00", ["2027-11-01T02:30:00+01:00"]),
    ("30 1 * * *", NY, "2027-11-07T01:10:00-05:00", ["2027-11-08T01:30:00-05:00"]),
    # Wall clock: the gap's hour does not exist; the fold's hour happens twice.
    ("0 * * * *", B, "2027-03-28T00:30:00+01:00",
     ["2027-03-28T01:00:00+01:00", "2027-03-28T03:00:00+02:00", "2027-03-28T04:00:00+02:00"]),
    ("0 * * * *", B, "2027-10-31T01:30:00+02:00",
     ["2027-10-31T02:00:00+02:00", "2027-10-31T02:00:00+01:00", "2027-10-31T03:00:00+01:00"]),
    ("0 * * * *", NY, "2027-03-14T00:30:00-05:00",
     ["2027-03-14T01:00:00-05:00", "2027-03-14T03:00:00-04:00", "2027-03-14T04:00:00-04:00"]),
    ("0 * * * *", NY, "2027-11-07T00:30:00-04:00",
     ["2027-11-07T01:00:00-04:00", "2027-11-07T01:00:00-05:00", "2027-11-07T02:00:00-05:00"]),
    ("*/15 * * * *", B, "2027-03-28T01:40:00+01:00",
     ["2027-03-28T01:45:00+01:00", "2027-03-28T03:00:00+02:00", "2027-03-28T03:15:00+02:00"]),
    ("*/15 * * * *", B, "2027-10-31T02:40:00+02:00",
     ["2027-10-31T02:45:00+02:00", "2027-10-31T02:00:00+01:00", "2027-10-31T02:15:00+01:00",
      "2027-10-31T02:30:00+01:00", "2027-10-31T02:45:00+01:00", "2027-10-31T03:00:00+01:00"]),
    ("*/15 * * * *", NY, "2027-03-14T01:40:00-05:00",
     ["2027-03-14T01:45:00-05:00", "2027-03-14T03:00:00-04:00", "2027-03-14T03:15:00-04:00"]),
    ("*/15 * * * *", NY, "2027-11-07T01:40:00-04:00",
     ["2027-11-07T01:45:00-04:00", "2027-11-07T01:00:00-05:00", "2027-11-07T01:15:00-05:00",
      "2027-11-07T01:30:00-05:00", "2027-11-07T01:45:00-05:00", "2027-11-07T02:00:00-05:00"]),
    # Fixed, every minute of the gap hour: the 60 gap minutes collapse into one fire.
    ("* 2 * * *", B, "2027-03-27T02:58:00+01:00",
     ["2027-03-27T02:59:00+01:00", "2027-03-28T03:00:00+02:00", "2027-03-29T02:00:00+02:00"]),
    ("* 2 * * *", B, "2027-10-31T02:58:00+02:00",
     ["2027-10-31T02:59:00+02:00", "2027-11-01T02:00:00+01:00"]),
    ("* 2 * * *", NY, "2027-03-13T02:58:00-05:00",
     ["2027-03-13T02:59:00-05:00", "2027-03-14T03:00:00-04:00", "2027-03-15T02:00:00-04:00"]),
    ("* 1 * * *", NY, "2027-11-07T01:58:00-04:00",
     ["2027-11-07T01:59:00-04:00", "2027-11-08T01:00:00-05:00"]),
    # Several gap times and the time right after the gap are one instant: one fire.
    ("0,30 2,3 * * *", B, "2027-03-28T01:00:00+01:00",
     ["2027-03-28T03:00:00+02:00", "2027-03-28T03:30:00+02:00", "2027-03-29T02:00:00+02:00"]),
    # Daily jobs keep their local time across both changes.
    ("@daily", B, "2027-03-27T12:00:00+01:00",
     ["2027-03-28T00:00:00+01:00", "2027-03-29T00:00:00+02:00"]),
    ("@daily", NY, "2027-11-06T12:00:00-04:00",
     ["2027-11-07T00:00:00-04:00", "2027-11-08T00:00:00-05:00"]),
    # Santiago switches at midnight: @daily falls in the gap, 23:30 in the fold.
    ("@daily", "America/Santiago", "2027-09-04T12:00:00-04:00",
     ["2027-09-05T01:00:00-03:00", "2027-09-06T00:00:00-03:00"]),
    ("30 23 * * *", "America/Santiago", "2027-04-03T12:00:00-03:00",
     ["2027-04-03T23:30:00-03:00", "2027-04-04T23:30:00-04:00"]),
    # Lord Howe moves by 30 minutes.
    ("*/15 * * * *", "Australia/Lord_Howe", "2027-04-04T01:20:00+11:00",
     ["2027-04-04T01:30:00+11:00", "2027-04-04T01:45:00+11:00", "2027-04-04T01:30:00+10:30",
      "2027-04-04T01:45:00+10:30", "2027-04-04T02:00:00+10:30"]),
    ("15 2 * * *", "Australia/Lord_Howe", "2027-10-02T12:00:00+10:30",
     ["2027-10-03T02:30:00+11:00", "2027-10-04T02:15:00+11:00"]),
    # Seconds: fixed gap time collapses; wall-clock seconds repeat in the fold.
    ("30 30 2 * * *", B, "2027-03-27T12:00:00+01:00",
     ["2027-03-28T03:00:00+02:00", "2027-03-29T02:30:30+02:00"]),
    ("*/20 0 * * * *", B, "2027-10-31T02:59:30+02:00",
     ["2027-10-31T02:00:00+01:00", "2027-10-31T02:00:20+01:00", "2027-10-31T02:00:40+01:00",
      "2027-10-31T03:00:00+01:00"]),
]  # fmt: skip


@pytest.mark.parametrize(("expr", "zone", "start", "expected"), CASES)
def test_hand_checked(expr: str, zone: str, start: str, expected: list[str]) -> None:
    assert fires(expr, zone, start, len(expected)) == expected


# --- brute-force oracle around every transition ----------------------------------------


def _transitions(tz: ZoneInfo, year: int) -> list[datetime]:
    """Offset changes in a year, scanned minute-exact by a method independent of triggers.py."""
    out = []
    t = datetime(year, 1, 1, tzinfo=UTC)
    step = timedelta(hours=1)
    while t.year == year:
        if t.astimezone(tz).utcoffset() != (t + step).astimezone(tz).utcoffset():
            u = t
            while u.astimezone(tz).utcoffset() == t.astimezone(tz).utcoffset():
                u += MINUTE
            out.append(u)
        t += step
    return out


def _oracle(spec: CronSpec, wall: bool, tz: ZoneInfo, lo: datetime, hi: datetime) -> list[float]:
    """The definition, checked minute by minute: which instants in (lo, hi] fire."""
    got: set[datetime] = set()
    u = lo
    while u <= hi:
        local = u.astimezone(tz)
        if spec.matches(local.replace(tzinfo=None)) and (wall or local.fold == 0):
            got.add(u)
        if not wall and (u - MINUTE).astimezone(tz).utcoffset() != local.utcoffset():
            # A gap: local times from the old clock's reading up to the new one don't exist.
            n = (u - MINUTE).astimezone(tz).replace(tzinfo=None) + MINUTE
            while n < local.replace(tzinfo=None):
                if spec.matches(n):
                    got.add(u)
                n += MINUTE
        u += MINUTE
    return sorted(x.timestamp() for x in got if x > lo)


ORACLE_EXPRS = [
    "30 2 * * *",
    "0 * * * *",
    "*/15 * * * *",
    "* 2 * * *",
    "0 0 * * *",
    "30 1 * * *",
    "*/20 0-3 * * *",
    "0,30 23 * * *",
    "45 */2 * * *",
    "0 2,3 * * *",
    "* * * * *",
]


def _windows() -> list[tuple[str, datetime]]:
    out = [(z, t) for z in ZONES for t in _transitions(ZoneInfo(z), 2027)]
    out += [
        ("Asia/Kolkata", datetime(2027, 3, 28, tzinfo=UTC)),
        ("UTC", datetime(2027, 10, 31, tzinfo=UTC)),
    ]
    return out  # fmt: skip


@pytest.mark.parametrize(("zone", "centre"), _windows())
def test_matches_brute_force_oracle_around_transitions(zone: str, centre: datetime) -> None:
    tz = ZoneInfo(zone)
    lo, hi = centre - timedelta(hours=26), centre + timedelta(hours=26)
    for expr in ORACLE_EXPRS:
        sched = parse_cron(expr, tz, "job")
        assert isinstance(sched, CronSchedule)
        expected = _oracle(sched.spec, sched.wall_clock, tz, lo, hi)
        got = []
        t = sched.next_after(lo)
        while t is not None and t <= hi:
            got.append(t.timestamp())
            t = sched.next_after(t)
        assert got == expected, (zone, expr)


def test_oracle_sees_transitions() -> None:
    assert len(_windows()) == 10
    assert [t.isoformat() for t in _transitions(ZoneInfo("Australia/Lord_Howe"), 2027)] == [
        "2027-04-03T15:00:00+00:00",
        "2027-10-02T15:30:00+00:00",
    ]


# --- two years in many zones -----------------------------------------------------------

YEAR_EXPRS = [
    "30 2 * * *",
    "0 * * * *",
    "*/30 1-3 * * *",
    "0 0 * * *",
    "15 */3 * * *",
    "0 2 1,15 * sun",
    "* 2 * * 0",
    "30 0 * * 1-5",
]


@pytest.mark.parametrize("zone", ZONES)
def test_two_years_of_fires_are_ordered_and_each_named_by_the_expression(zone: str) -> None:
    tz = ZoneInfo(zone)
    start, end = datetime(2027, 1, 1, tzinfo=tz), datetime(2029, 1, 1, tzinfo=tz)
    for expr in YEAR_EXPRS:
        sched = parse_cron(expr, tz, "job")
        assert isinstance(sched, CronSchedule)
        prev = start.timestamp()
        local_dates: set[date] = set()
        t = sched.next_after(start)
        while t is not None and t < end:
            assert t.tzinfo is tz
            ts = t.timestamp()
            assert ts > prev, (expr, t)
            naive = t.replace(tzinfo=None)
            if sched.spec.matches(naive):
                assert sched.wall_clock or t.fold == 0, (expr, t)  # fixed: first pass only
            else:
                # Only a fixed-time job's gap time may fire off its own time, at the gap's end.
                before = datetime.fromtimestamp(ts - 1, tz)
                assert not sched.wall_clock and before.utcoffset() != t.utcoffset(), (expr, t)
                gap_start = before.replace(tzinfo=None) + timedelta(seconds=1)
                found = sched.spec.next_match(gap_start)
                assert found is not None and found < naive, (expr, t)
            local_dates.add(naive.date())
            prev = ts
            t = sched.next_after(t)
        if expr == "30 2 * * *":
            assert len(local_dates) == 731  # exactly one fire per local day, DST or not


# --- croniter on ordinary days in a DST zone -------------------------------------------

NEW_YORK = ZoneInfo("America/New_York")


@cache
def _ny_transition_days() -> frozenset[date]:
    days = set()
    d = date(2000, 1, 1)
    while d.year < 2041:
        a = datetime(d.year, d.month, d.day, 12, tzinfo=NEW_YORK).utcoffset()
        e = d + timedelta(days=1)
        if a != datetime(e.year, e.month, e.day, 12, tzinfo=NEW_YORK).utcoffset():
            days.update({d, e})
        d = e
    return frozenset(days)


_WALL_EXPR = st.tuples(
    cron_field(0, 59, None),
    st.sampled_from(["*", "*/2", "*/3", "*/5", "*/7", "*/12", "*/25"]),
    cron_field(1, 31, None),
    cron_field(1, 12, MONTH_NAMES),
    cron_field(0, 7, DAY_NAMES, dow=True),
).map(" ".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(expr=_WALL_EXPR, start=st.datetimes(datetime(2001, 1, 1), datetime(2037, 1, 1)))
def test_wall_clock_matches_croniter_away_from_transitions(expr: str, start: datetime) -> None:
    transition_days = _ny_transition_days()
    assume(start.date() not in transition_days)
    try:
        parse(expr)
    except TriggerError as e:
        assert "never fires" in e.message
        reject()
    sched = parse_cron(expr, NEW_YORK, "x")
    begin = start.replace(tzinfo=NEW_YORK)
    it = croniter(expr, begin, day_or=True, implement_cron_bug=True, max_years_between_matches=50)
    t: datetime | None = begin
    for _ in range(5):
        assert t is not None
        t = sched.next_after(t)
        assert t is not None
        expected = it.get_next(datetime)
        crossed = any(
            begin.date() + timedelta(days=k) in transition_days
            for k in range((t.date() - begin.date()).days + 1)
        )
        if crossed:
            break
        assert t.timestamp() == expected.timestamp(), (expr, begin)
