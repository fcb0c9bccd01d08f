"""Schedule objects: sharing, describe(), the next_after contract, every and at."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from scheduler.triggers import (
    CronSchedule,
    TriggerError,
    parse_at,
    parse_cron,
    parse_every,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
UTCZ = ZoneInfo("UTC")


def at(s: str) -> datetime:
    return datetime.fromisoformat(s)


# --- cron schedules: sharing, describe, contract --------------------------------------


def test_equal_expressions_share_one_instance() -> None:
    a = parse_cron("0 3 * * 1-5", BERLIN, "a")
    assert parse_cron("0 3 * * 1-5", BERLIN, "b") is a
    assert parse_cron(" 0  3 * *\t1-5", BERLIN, "c") is a
    assert parse_cron("0 3 * * 1-5", NEW_YORK, "a") is not a


def test_h_jobs_with_equal_expansion_share_one_instance() -> None:
    by_expansion: dict[str, CronSchedule] = {}
    for i in range(61):  # 61 ids over 60 minutes: at least two collide
        sched = parse_cron("H 3 * * *", BERLIN, f"job{i}")
        assert isinstance(sched, CronSchedule)
        if sched.expanded in by_expansion:
            assert by_expansion[sched.expanded] is sched
            break
        by_expansion[sched.expanded] = sched
    else:
        pytest.fail("no two ids shared an expansion")


def test_describe_and_expanded() -> None:
    plain = parse_cron("0 3 * * 1-5", BERLIN, "x")
    assert plain.describe() == 'cron "0 3 * * 1-5" (Europe/Berlin)'
    hashed = parse_cron("H 3 * * *", BERLIN, "backup")
    assert isinstance(hashed, CronSchedule)
    assert hashed.expanded == "28 3 * * *"
    assert hashed.describe() == 'cron "H 3 * * *" = "28 3 * * *" (Europe/Berlin)'
    daily = parse_cron("@daily", UTCZ, "x")
    assert daily.describe() == 'cron "@daily" = "0 0 * * *" (UTC)'


def test_wall_clock_is_keyed_on_the_hour_field() -> None:
    def wall(expr: str) -> bool:
        sched = parse_cron(expr, BERLIN, "x")
        assert isinstance(sched, CronSchedule)
        return sched.wall_clock

    assert wall("0 * * * *") and wall("5 */2 * * *") and wall("@hourly")
    assert not wall("*/5 2 * * *") and not wall("* 2 * * *") and not wall("@daily")
    assert not wall("0 1,* * * *")  # cronie's HR_STAR looks at the first character only


def test_result_is_aware_in_the_job_zone_whatever_the_input_zone() -> None:
    sched = parse_cron("0 3 * * *", BERLIN, "x")
    got = sched.next_after(at("2027-06-01T12:00:00-07:00"))
    assert got is not None
    assert got.tzinfo is BERLIN
    assert got.isoformat() == "2027-06-02T03:00:00+02:00"


def test_strictly_after_and_sub_second_inputs() -> None:
    sched = parse_cron("0 3 * * *", UTCZ, "x")
    assert sched.next_after(at("2027-01-01T03:00:00+00:00")) == at("2027-01-02T03:00:00+00:00")
    assert sched.next_after(at("2027-01-01T02:59:59.999999+00:00")) == at(
        "2027-01-01T03:00:00+00:00"
    )
    assert sched.next_after(at("2027-01-01T03:00:00.000001+00:00")) == at(
        "2027-01-02T03:00:00+00:00"
    )


def test_fold_input_is_read_as_its_instant() -> None:
    # 02:45 with fold=1 is the second pass (01:45 UTC): next hour is 03:00 CET. With fold=0
    # it is 00:45 UTC, and the next wall-clock hour is the second 02:00 (01:00 UTC).
    sched = parse_cron("0 * * * *", BERLIN, "x")
    second_pass = datetime(2027, 10, 31, 2, 45, tzinfo=BERLIN, fold=1)
    got = sched.next_after(second_pass)
    assert got is not None and got.isoformat() == "2027-10-31T03:00:00+01:00"
    first_pass = datetime(2027, 10, 31, 2, 45, tzinfo=BERLIN, fold=0)
    got = sched.next_after(first_pass)
    assert got is not None and got.isoformat() == "2027-10-31T02:00:00+01:00"


def test_naive_input_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        parse_cron("0 3 * * *", UTCZ, "x").next_after(datetime(2027, 1, 1))


# --- every --------------------------------------------------------------------------


def test_every_is_anchored_to_the_epoch() -> None:
    sched = parse_every(300, BERLIN)
    got = sched.next_after(at("2027-01-01T00:02:30+00:00"))
    assert got is not None and got.isoformat() == "2027-01-01T01:05:00+01:00"
    assert sched.next_after(at("2027-01-01T00:05:00+00:00")) == at("2027-01-01T00:10:00+00:00")
    seven = parse_every(7, UTCZ)
    assert seven.next_after(datetime.fromtimestamp(1, UTC)) == datetime.fromtimestamp(7, UTC)
    odd = parse_every(86400 * 7 + 13, UTCZ)
    got = odd.next_after(at("2027-05-05T05:05:05+00:00"))
    assert got is not None and got.timestamp() % (86400 * 7 + 13) == 0


def test_every_keeps_real_time_across_dst() -> None:
    hourly = parse_every(3600, BERLIN)
    got = hourly.next_after(at("2027-03-28T01:00:00+01:00"))
    assert got is not None and got.isoformat() == "2027-03-28T03:00:00+02:00"
    got = hourly.next_after(at("2027-10-31T02:00:00+02:00"))
    assert got is not None and got.isoformat() == "2027-10-31T02:00:00+01:00"


def test_every_fractional_seconds() -> None:
    sched = parse_every(1.5, UTCZ)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert sched.next_after(epoch) == epoch + timedelta(seconds=1.5)
    assert sched.next_after(epoch + timedelta(seconds=1.5)) == epoch + timedelta(seconds=3)


@pytest.mark.parametrize(
    ("seconds", "words"),
    [
        (300, "every 5m"),
        (5400, "every 1h30m"),
        (86400, "every 1d"),
        (45, "every 45s"),
        (90061, "every 1d1h1m1s"),
        (1.5, "every 1.5s"),
        (60.0, "every 1m"),
    ],
)
def test_every_describe(seconds: float, words: str) -> None:
    assert parse_every(seconds, UTCZ).describe() == words


@pytest.mark.parametrize("bad", [0, -5, 0.5, float("nan"), float("inf"), "5", True, None])
def test_every_rejects(bad: object) -> None:
    with pytest.raises(TriggerError):
        parse_every(bad, UTCZ)  # type: ignore[arg-type]


def test_every_past_the_calendar_end_is_none() -> None:
    sched = parse_every(86400 * 365 * 50, UTCZ)
    assert sched.next_after(datetime(9990, 1, 1, tzinfo=UTC)) is None


# --- at -----------------------------------------------------------------------------


def test_at_aware_is_kept_and_expressed_in_job_zone() -> None:
    sched = parse_at(datetime(2027, 1, 1, tzinfo=UTC), BERLIN)
    assert sched.describe() == "at 2027-01-01T01:00:00+01:00"
    got = sched.next_after(at("2026-12-31T00:00:00+00:00"))
    assert got is not None and got.isoformat() == "2027-01-01T01:00:00+01:00"
    assert sched.next_after(at("2027-01-01T00:00:00+00:00")) is None  # not strictly after
    assert sched.next_after(at("2027-01-01T00:00:01+00:00")) is None


def test_at_naive_is_local_time() -> None:
    sched = parse_at(datetime(2027, 6, 1, 12, 0, 0, 250000), BERLIN)
    assert sched.describe() == "at 2027-06-01T12:00:00.250000+02:00"


def test_at_naive_in_a_gap_is_the_first_instant_after_it() -> None:
    sched = parse_at(datetime(2027, 3, 28, 2, 30), BERLIN)
    assert sched.describe() == "at 2027-03-28T03:00:00+02:00"
    ny = parse_at(datetime(2027, 3, 14, 2, 0, 0, 500), NEW_YORK)
    assert ny.describe() == "at 2027-03-14T03:00:00-04:00"


def test_at_naive_in_a_fold_is_the_first_occurrence() -> None:
    sched = parse_at(datetime(2027, 10, 31, 2, 30), BERLIN)
    assert sched.describe() == "at 2027-10-31T02:30:00+02:00"
    got = sched.next_after(at("2027-10-31T02:00:00+02:00"))
    assert got is not None and got.isoformat() == "2027-10-31T02:30:00+02:00"
    assert sched.next_after(at("2027-10-31T02:10:00+01:00")) is None  # second pass: gone
    # The aware second occurrence stays what it says.
    later = parse_at(datetime(2027, 10, 31, 2, 30, tzinfo=BERLIN, fold=1), BERLIN)
    assert later.describe() == "at 2027-10-31T02:30:00+01:00"
    got = later.next_after(at("2027-10-31T02:40:00+02:00"))
    assert got is not None and got.isoformat() == "2027-10-31T02:30:00+01:00"


def test_at_fixed_offset_input() -> None:
    sched = parse_at(datetime(2027, 1, 1, 9, tzinfo=timezone(timedelta(hours=9))), UTCZ)
    assert sched.describe() == "at 2027-01-01T00:00:00+00:00"


def test_at_rejects_non_datetimes() -> None:
    with pytest.raises(TriggerError):
        parse_at("2027-01-01", UTCZ)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("when", "zone"),
    [
        (datetime(9999, 12, 31, 23), NEW_YORK),
        (datetime(1, 1, 1), ZoneInfo("Asia/Tokyo")),
        (datetime(9999, 12, 31, 23, tzinfo=UTC), ZoneInfo("Asia/Tokyo")),
    ],
)
def test_at_at_the_ends_of_the_calendar_is_a_trigger_error(when: datetime, zone: ZoneInfo) -> None:
    with pytest.raises(TriggerError, match="outside the supported dates"):
        parse_at(when, zone)
