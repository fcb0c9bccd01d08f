"""Catch-up after an outage, with an injected clock.

The restart path works like this: the ledger's last handled slot gives the
first next_run_time, APScheduler (its real Job._get_run_times, not a copy)
enumerates the slots due since, our trigger adapter bounds that list, and
catchup.decide applies the job's policy. Each step is driven here with a
chosen "now", no sleeping.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from apscheduler.schedulers.background import BackgroundScheduler

from scheduler.apsched import LAUNCH_LEAD, MAX_MISSED_RECORDS, ScheduleTrigger
from scheduler.catchup import LATE_AFTER, MAX_CATCHUP_RUNS, decide
from scheduler.triggers import parse_cron, parse_every

T0 = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)


class Missed:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[datetime], int]] = []

    def __call__(self, job: str, slots: list[datetime], more: int) -> None:
        self.calls.append((job, slots, more))


def due_after_outage(
    schedule: object, last_slot: datetime, now: datetime, window: float
) -> tuple[list[datetime], Missed]:
    """What APScheduler hands the dispatcher when the daemon restarts at ``now``."""
    missed = Missed()
    trigger = ScheduleTrigger("j", schedule, window, missed)  # type: ignore[arg-type]
    sched = BackgroundScheduler(timezone=UTC)
    first = trigger.first_fire_after(last_slot)
    job = sched.add_job(print, trigger=trigger, next_run_time=first)
    # APScheduler's times are the launch times, LAUNCH_LEAD ahead of the slots.
    return [t + LAUNCH_LEAD for t in job._get_run_times(now)], missed


def test_outage_slots_come_due_in_order() -> None:
    hourly = parse_every(3600, ZoneInfo("UTC"))
    now = T0 + timedelta(hours=3, minutes=10)
    due, missed = due_after_outage(hourly, T0, now, window=86400)
    assert due == [T0 + timedelta(hours=h) for h in (1, 2, 3)]
    assert missed.calls == []


@pytest.mark.parametrize(
    ("policy", "runs", "backlog", "missed"),
    [
        ("none", [], [], [1, 2, 3]),
        ("latest", [3], [], [1, 2]),
        ("all", [], [1, 2, 3], []),
    ],
)
def test_each_policy_after_a_three_hour_outage(
    policy: str, runs: list[int], backlog: list[int], missed: list[int]
) -> None:
    hourly = parse_every(3600, ZoneInfo("UTC"))
    now = T0 + timedelta(hours=3, minutes=10)
    due, _ = due_after_outage(hourly, T0, now, window=86400)
    plan = decide(due, now, policy, window=86400)
    slot = {T0 + timedelta(hours=h): h for h in range(1, 4)}
    assert [slot[s] for s, _ in plan.run] == runs
    assert [slot[s] for s in plan.backlog] == backlog
    assert [slot[s] for s, _ in plan.missed] == missed


def test_window_bounds_what_is_caught_up() -> None:
    hourly = parse_every(3600, ZoneInfo("UTC"))
    now = T0 + timedelta(hours=10, minutes=10)
    due, missed = due_after_outage(hourly, T0, now, window=2 * 3600)
    # Slots older than the window are jumped over and reported as missed...
    (call,) = missed.calls
    assert call[1] == [T0 + timedelta(hours=h) for h in range(2, 9)]
    # ...the ones inside it are handed on (the first slot came from the ledger).
    assert due == [T0 + timedelta(hours=h) for h in (1, 9, 10)]
    plan = decide(due, now, "all", window=2 * 3600)
    assert [s for s, _ in plan.missed] == [T0 + timedelta(hours=1)]
    assert plan.backlog == [T0 + timedelta(hours=h) for h in (9, 10)]


def test_a_long_outage_never_floods() -> None:
    every_second = parse_every(1, ZoneInfo("UTC"))
    now = T0 + timedelta(days=3650)  # ten years down, or a clock jump
    due, missed = due_after_outage(every_second, T0, now, window=86400 * 365)
    assert len(due) <= MAX_CATCHUP_RUNS + LATE_AFTER + 3  # + the on-time tail
    assert due[-1] >= now - timedelta(seconds=LATE_AFTER + 1)
    for _job, slots, more in missed.calls:  # each jump lists what it skipped, bounded
        assert len(slots) <= MAX_MISSED_RECORDS
        assert more == (1 if len(slots) == MAX_MISSED_RECORDS else 0)
    assert len(missed.calls) == 2  # past the window, then past the flood cap


def test_cron_slots_across_dst_after_an_outage() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    nightly = parse_cron("30 2 * * *", berlin, "j")
    last = datetime(2027, 3, 26, 2, 30, tzinfo=berlin)
    now = datetime(2027, 3, 29, 9, 0, tzinfo=berlin)
    due, _ = due_after_outage(nightly, last, now, window=7 * 86400)
    assert [d.astimezone(berlin).isoformat() for d in due] == [
        "2027-03-27T02:30:00+01:00",
        "2027-03-28T03:00:00+02:00",  # the gap day: first instant after the gap
        "2027-03-29T02:30:00+02:00",
    ]
    plan = decide(due, now.astimezone(UTC), "latest", window=7 * 86400)
    assert [s for s, _ in plan.run] == [due[-1]]
