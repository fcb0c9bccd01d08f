"""Cron syntax: every feature, the day rule, macros, H, errors, and croniter as an oracle.

croniter (test-only) differs from cronie in ways the generators below avoid:

* it ORs day-of-month and day-of-week unless ``implement_cron_bug=True``, which
  restores cronie's "field text begins with ``*``" rule (used here);
* it widens an equal range written out (``5-5``, ``mon-mon``) to the whole field,
  where cronie means the single value: ranges are generated with a < b;
* ``A/S`` in day-of-week stops at 6, schedd (like cronie's ``*``) walks to 7
  (= Sunday): ``1/3`` is Mon,Thu,Sun here and Mon,Thu in croniter; such terms are
  not generated when 7 would be hit;
* it treats a list containing ``*`` (``1,*``) as a star field, cronie only
  looks at the first character: ``*`` is never generated inside a list.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from hypothesis import HealthCheck, assume, given, reject, settings
from hypothesis import strategies as st

from scheduler.cron import MACROS, hash_value, parse
from scheduler.triggers import Schedule, TriggerError, parse_cron

UTCZ = ZoneInfo("UTC")


def fires(expr: str, start: str, n: int, tz: ZoneInfo = UTCZ, job_id: str = "job") -> list[str]:
    sched = parse_cron(expr, tz, job_id)
    t: datetime | None = datetime.fromisoformat(start)
    out = []
    for _ in range(n):
        assert t is not None
        t = sched.next_after(t)
        assert t is not None
        out.append(t.isoformat())
    return out


def days(expr: str, start: str, n: int) -> list[str]:
    return [f[:10] for f in fires(expr, start, n)]


# --- field syntax -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "minutes"),
    [
        ("*", tuple(range(60))),
        ("7", (7,)),
        ("07", (7,)),
        ("5-8", (5, 6, 7, 8)),
        ("*/20", (0, 20, 40)),
        ("10-30/10", (10, 20, 30)),
        ("50/4", (50, 54, 58)),
        ("1,5-6,*/30", (0, 1, 5, 6, 30)),
        ("59/15", (59,)),
        ("*/90", (0,)),  # cronie only warns about a step wider than the range
        ("10-12/5", (10,)),
    ],
)
def test_minute_field_forms(field: str, minutes: tuple[int, ...]) -> None:
    assert parse(f"{field} * * * *").spec.minutes == minutes


def test_month_and_day_names_any_case_in_values_ranges_and_steps() -> None:
    spec = parse("0 0 * JAN,mar-May,oct/2 Mon-wed,FRI").spec
    assert spec.months == (1, 3, 4, 5, 10, 12)
    assert spec.dows == frozenset({1, 2, 3, 5})


@pytest.mark.parametrize("dow", ["0", "7", "sun", "SUN", "0,7", "7-7"])
def test_sunday_is_0_and_7(dow: str) -> None:
    assert parse(f"0 0 * * {dow}").spec.dows == frozenset({0})
    # 2027-01-03 and 2027-01-10 are Sundays.
    assert days(f"0 0 * * {dow}", "2027-01-01T00:00:00+00:00", 2) == ["2027-01-03", "2027-01-10"]


@pytest.mark.parametrize("dow", ["5-7", "fri-sun", "5-0", "fri-7"])
def test_range_ending_on_sunday(dow: str) -> None:
    assert parse(f"0 0 * * {dow}").spec.dows == frozenset({5, 6, 0})


def test_dow_star_step_and_start_step_walk_up_to_7() -> None:
    assert parse("0 0 * * */2").spec.dows == frozenset({0, 2, 4, 6})
    assert parse("0 0 * * 1/3").spec.dows == frozenset({1, 4, 0})  # 1,4,7
    assert parse("0 0 * * fri-sun/2").spec.dows == frozenset({5, 0})


def test_six_fields_lead_with_seconds() -> None:
    assert fires("*/20 30 2 * * *", "2027-01-01T00:00:00+00:00", 4) == [
        "2027-01-01T02:30:00+00:00",
        "2027-01-01T02:30:20+00:00",
        "2027-01-01T02:30:40+00:00",
        "2027-01-02T02:30:00+00:00",
    ]
    assert parse("0 3 * * *").spec.seconds == (0,)


def test_whitespace_and_tabs_between_fields() -> None:
    assert fires(" 0\t3  * * * ", "2027-01-01T00:00:00+00:00", 1) == ["2027-01-01T03:00:00+00:00"]


# --- the day-of-month / day-of-week rule (cronie cron.c find_jobs) -----------------


def test_both_restricted_means_either() -> None:
    # crontab(5)'s example: 04:30 on the 1st and 15th plus every Friday. 2027-01-01 is a Friday.
    assert days("30 4 1,15 * 5", "2027-01-01T00:00:00+00:00", 9) == [
        "2027-01-01",
        "2027-01-08",
        "2027-01-15",
        "2027-01-22",
        "2027-01-29",
        "2027-02-01",
        "2027-02-05",
        "2027-02-12",
        "2027-02-15",
    ]


def test_star_step_counts_as_star_so_both_must_match() -> None:
    # */2 begins with '*': odd days that are also Fridays.
    assert days("0 0 */2 * 5", "2027-01-01T00:00:00+00:00", 5) == [
        "2027-01-15",
        "2027-01-29",
        "2027-02-05",
        "2027-02-19",
        "2027-03-05",
    ]
    # 1st of the month AND (Sun, Wed or Sat): 2027-05-01 Sat, 2027-08-01 Sun, 2027-09-01 Wed.
    assert days("0 0 1 * */3", "2027-01-01T00:00:00+00:00", 3) == [
        "2027-05-01",
        "2027-08-01",
        "2027-09-01",
    ]


def test_only_first_character_decides_star() -> None:
    # "1,*" and "1-31" are restricted, so the day matches if either field does: every day.
    assert days("0 0 1,* * 5", "2027-01-01T00:00:00+00:00", 3) == [
        "2027-01-02",
        "2027-01-03",
        "2027-01-04",
    ]
    assert days("0 0 1-31 * 5", "2027-01-01T00:00:00+00:00", 2) == ["2027-01-02", "2027-01-03"]


def test_one_restricted_field_alone_decides() -> None:
    assert days("0 0 1,15 * *", "2027-01-01T00:00:00+00:00", 3) == [
        "2027-01-15",
        "2027-02-01",
        "2027-02-15",
    ]
    assert days("0 0 * * 5", "2027-01-01T00:00:00+00:00", 2) == ["2027-01-08", "2027-01-15"]


def test_dom_or_dow_fires_on_weekday_even_when_day_never_exists() -> None:
    # Feb 31 never exists, but with OR the Mondays of February still fire.
    assert days("0 0 31 2 mon", "2027-01-01T00:00:00+00:00", 2) == ["2027-02-01", "2027-02-08"]


# --- macros --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("macro", "fields"),
    [
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@monthly", "0 0 1 * *"),
        ("@weekly", "0 0 * * 0"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@hourly", "0 * * * *"),
        ("@Daily", "0 0 * * *"),
        ("@HOURLY", "0 * * * *"),
    ],
)
def test_macros(macro: str, fields: str) -> None:
    parsed = parse(macro)
    assert parsed.expanded == fields
    start = "2027-03-03T10:20:00+00:00"
    assert fires(macro, start, 3) == fires(fields, start, 3)


def test_macro_table_is_exactly_cronies() -> None:
    assert set(MACROS) == {
        "@yearly",
        "@annually",
        "@monthly",
        "@weekly",
        "@daily",
        "@midnight",
        "@hourly",
    }


# --- H ------------------------------------------------------------------------------


def _independent_hash(job_id: str, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{job_id}:{index}".encode()).digest()[:8], "big")


def test_h_pinned_value_is_sha256_of_job_id_and_field() -> None:
    assert hash_value("backup", 0) == _independent_hash("backup", 0)
    assert parse("H H * * *", "backup").expanded == "28 11 * * *"
    assert _independent_hash("backup", 0) % 60 == 28
    assert _independent_hash("backup", 1) % 24 == 11


def test_h_is_stable_and_depends_on_job_id_only() -> None:
    a = parse("H H H H H", "nightly-report").expanded
    assert parse("H  H H H H", "nightly-report").expanded == a
    assert parse("H H H H H", "nightly-reporT").expanded != a


def test_h_spreads_over_ids() -> None:
    minutes = {parse("H * * * *", f"job-{i}").spec.minutes for i in range(300)}
    assert len(minutes) >= 50


@pytest.mark.parametrize("i", range(40))
def test_h_forms_stay_in_bounds(i: int) -> None:
    job = f"j{i}"
    spec = parse("H(10-20) H H H H", job).spec
    assert len(spec.minutes) == 1 and 10 <= spec.minutes[0] <= 20
    assert len(spec.hours) == 1 and 0 <= spec.hours[0] <= 23
    assert len(spec.months) == 1 and 1 <= spec.months[0] <= 12
    assert len(spec.doms) == 1 and 1 <= spec.doms[0] <= 28
    assert len(spec.dows) == 1 and next(iter(spec.dows)) in range(7)
    spec = parse("H/15 H(0-7)/3 H/10 * *", job).spec
    start = spec.minutes[0]
    assert 0 <= start < 15 and spec.minutes == tuple(range(start, 60, 15))
    assert spec.hours[0] <= 2 and spec.hours == tuple(range(spec.hours[0], 8, 3))
    assert spec.doms[0] <= 10 and spec.doms == tuple(range(spec.doms[0], 32, 10))
    # A step wider than its range still leaves one value inside the range.
    spec = parse("H(5-6)/40 * * * *", job).spec
    assert len(spec.minutes) == 1 and spec.minutes[0] in (5, 6)
    sec = parse("H 0 0 * * *", job).spec.seconds
    assert sec == ((_independent_hash(job, 5) % 60),)


def test_h_fields_count_as_restricted() -> None:
    spec = parse("0 0 H * H", "x").spec
    assert not spec.dom_star and not spec.dow_star
    assert not parse("0 H * * *", "x").spec.hour_star


def test_h_expanded_text_parses_to_the_same_spec() -> None:
    for i in range(30):
        p = parse("H/7 H(2-20)/5 H * H(1-5)", f"id{i}")
        again = parse(p.expanded).spec
        assert (again.minutes, again.hours, again.doms, again.dows) == (
            p.spec.minutes,
            p.spec.hours,
            p.spec.doms,
            p.spec.dows,
        )


# --- errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "offset", "words"),
    [
        ("", 0, "empty"),
        ("0 3 * *", 7, "expected 5 fields"),
        ("0 3 * * * * *", 12, "got 7"),
        ("61 3 * * *", 0, "minute value 61 is out of range (allowed 0-59)"),
        ("0 24 * * *", 2, "hour value 24 is out of range (allowed 0-23)"),
        ("0 3 0 * *", 4, "day-of-month value 0 is out of range (allowed 1-31)"),
        ("0 3 * 13 *", 6, "allowed 1-12 or names jan-dec"),
        ("0 3 * * 8", 8, "allowed 0-7 or names sun-sat"),
        ("0 3 * * fri-mon", 8, "runs backwards"),
        ("0 3 * * 1,fri-mon", 10, "ranges cannot wrap"),
        ("0 3 20-10 * *", 4, "runs backwards (20 > 10)"),
        ("*/0 * * * *", 2, "step 0"),
        ("0 3 * * 1-5/0", 12, "at least 1"),
        ("0 3 * * 1/x", 10, "whole number"),
        ("0 3 * foo *", 6, "unknown month name 'foo'"),
        ("0 3 * * mon-xyz", 12, "unknown day-of-week name 'xyz'"),
        ("0 jan * * *", 2, "not a number; the hour field takes 0-23"),
        ("0 3 * * 1,,2", 10, "empty item"),
        ("0 3 * * 1-", 8, "cannot read '1-'"),
        ("0 3 * * *-5", 8, "cannot read"),
        ("0 3 * * 5~6", 8, "cannot read"),
        ("0 -1 * * *", 2, "cannot read"),
        ("0 3 * * 1.5", 8, "cannot read"),
        ("0 3 * jan- *", 6, "cannot read"),
        ("@reboot", 0, "@reboot is not supported"),
        ("  @reboot", 2, "@reboot"),
        ("@fortnightly", 0, "unknown macro '@fortnightly'; allowed: @yearly"),
        ("@daily 0", 7, "no further fields"),
        ("H(5-1) * * * *", 0, "runs backwards"),
        ("H(0-99) * * * *", 4, "minute value 99 is out of range"),
        ("H/0 * * * *", 2, "step 0"),
        ("H(mon-fri) * * * *", 2, "not a number"),
        ("0 0 30 2 *", 4, "never fires"),
        ("0 0 31 4,6,9,11 *", 4, "never fires"),
        ("0 0 30,31 feb *", 4, "never fires"),
        ("0 0 0 31 4 *", 6, "never fires"),
        ("0 0 31 4 */2", 4, "never fires"),
    ],
)
def test_errors_say_what_and_where(expr: str, offset: int, words: str) -> None:
    with pytest.raises(TriggerError) as info:
        parse_cron(expr, UTCZ, "job")
    assert words in info.value.message
    assert info.value.offset == offset


@pytest.mark.parametrize("bad", [123, None, ["0", "3", "*", "*", "*"]])
def test_non_string_is_an_error(bad: object) -> None:
    with pytest.raises(TriggerError, match="must be a string"):
        parse_cron(bad, UTCZ, "job")  # type: ignore[arg-type]


@pytest.mark.parametrize("expr", ["0 0 29 2 *", "0 0 31 * *", "0 0 31 2 1", "0 0 */30 2 *"])
def test_sparse_but_possible_expressions_are_accepted(expr: str) -> None:
    parse(expr)


def test_leap_day_across_a_century_and_end_of_calendar() -> None:
    assert fires("0 0 29 2 *", "2097-03-01T00:00:00+00:00", 1) == ["2104-02-29T00:00:00+00:00"]
    sched = parse_cron("0 0 29 2 *", UTCZ, "j")
    assert sched.next_after(datetime(9996, 3, 1, tzinfo=UTC)) is None


# --- croniter as an oracle (UTC) -----------------------------------------------------

MONTH_NAMES = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
DAY_NAMES = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]


@st.composite
def cron_field(
    draw: st.DrawFn, lo: int, hi: int, names: list[str] | None, dow: bool = False
) -> str:
    def value(v: int) -> str:
        if names and v - lo < len(names) and draw(st.booleans()):
            name = names[v - lo]
            return draw(st.sampled_from([name, name.upper(), name.capitalize()]))
        return str(v)

    def term() -> str:
        kind = draw(st.sampled_from(["n", "range", "range_step", "start_step"]))
        a = draw(st.integers(lo, hi))
        if kind == "n":
            return value(a)
        step = draw(st.integers(1, hi - lo + 2))
        if kind == "start_step":
            assume(not (dow and (7 - a) % step == 0))  # croniter stops A/S at 6
            return f"{value(a)}/{step}"
        b = draw(st.integers(lo, hi))
        assume(a < b)  # croniter widens a-a to the whole field
        rng = f"{value(a)}-{value(b)}"
        return rng if kind == "range" else f"{rng}/{step}"

    shape = draw(st.sampled_from(["star", "star_step", "list"]))
    if shape == "star":
        return "*"
    if shape == "star_step":
        return f"*/{draw(st.integers(1, hi - lo + 2))}"
    return ",".join(term() for _ in range(draw(st.integers(1, 3))))


_EXPR = st.tuples(
    cron_field(0, 59, None),
    cron_field(0, 23, None),
    cron_field(1, 31, None),
    cron_field(1, 12, MONTH_NAMES),
    cron_field(0, 7, DAY_NAMES, dow=True),
).map(" ".join)
_START = st.datetimes(datetime(2000, 1, 1), datetime(2040, 1, 1)).map(
    lambda d: d.replace(tzinfo=UTC)
)


def _parse_or_reject(expr: str) -> Schedule:
    try:
        return parse_cron(expr, UTCZ, "x")
    except TriggerError as e:
        if "never fires" in e.message:
            reject()
        raise


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(expr=_EXPR, start=_START)
def test_matches_croniter_in_utc(expr: str, start: datetime) -> None:
    sched = _parse_or_reject(expr)
    it = croniter(expr, start, day_or=True, implement_cron_bug=True, max_years_between_matches=50)
    t: datetime | None = start
    for _ in range(5):
        assert t is not None
        t = sched.next_after(t)
        expected = it.get_next(datetime)
        assert t is not None
        assert t.timestamp() == expected.timestamp(), (expr, start)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(sec=cron_field(0, 59, None), rest=_EXPR, start=_START)
def test_matches_croniter_with_seconds(sec: str, rest: str, start: datetime) -> None:
    expr = f"{sec} {rest}"
    sched = _parse_or_reject(expr)
    it = croniter(
        expr,
        start,
        day_or=True,
        implement_cron_bug=True,
        second_at_beginning=True,
        max_years_between_matches=50,
    )
    t: datetime | None = start
    for _ in range(5):
        assert t is not None
        t = sched.next_after(t)
        assert t is not None
        assert t.timestamp() == it.get_next(datetime).timestamp(), (expr, start)
