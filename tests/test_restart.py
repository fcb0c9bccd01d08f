"""Restart behaviour with a real daemon: catch-up of slots missed while it was down,
and recovery of runs a killed daemon left behind.

The outage is simulated by moving the ledger's "last handled slot" back in
time before the daemon starts, which is exactly what a daemon that was down
for that long would find.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from scheduler.ledger import Ledger
from scheduler.ledger_schema import to_text
from scheduler.records import NODE, RunRecord
from tests.helpers import Daemon, daemon, wait_for

__all__ = ["daemon"]  # the fixture


def rows(state: Path, job: str) -> list[dict[str, object]]:
    with Ledger.open(state / "ledger.db", readonly=True) as ledger:
        return ledger.history(job, limit=1000)


def rewind(state: Path, job: str) -> datetime:
    """Pretend the daemon was down for a minute: six 10 s slots went by unhandled.

    Called 6-7 s past a 10 s grid point, so at start-up every one of the six
    is late (more than LATE_AFTER) and the next slot is still in the future:
    the batch holds late slots only and each policy shows its own behaviour.
    """
    while not 6.0 <= time.time() % 10 < 7.0:
        time.sleep(0.05)
    grid = datetime.fromtimestamp(time.time() // 10 * 10, UTC)
    last = grid - timedelta(seconds=60)
    conn = sqlite3.connect(state / "ledger.db")
    with conn:
        conn.execute(
            "INSERT INTO job_state (job, last_slot, paused, updated_at) VALUES (?, ?, 0, ?) "
            "ON CONFLICT (job) DO UPDATE SET last_slot = excluded.last_slot",
            (job, to_text(last), to_text(last)),
        )
    conn.close()
    return last


def config(policy: str) -> str:
    return f"""
        jobs:
          tenner:
            task: shell
            every: 10s
            catchup: {policy}
            catchup_window: 1h
            params: {{command: 'echo run for $SCHEDD_SCHEDULED_FOR'}}
        """


@pytest.mark.parametrize(
    ("policy", "runs", "missed"),
    [("none", 0, 6), ("latest", 1, 5), ("all", 6, 0)],
)
def test_catch_up_after_downtime(
    daemon: Callable[..., Daemon], policy: str, runs: int, missed: int
) -> None:
    d = daemon(config(policy))
    d.start()
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
    last = rewind(d.state, "tenner")
    d.start()

    def caught_up() -> bool:
        late = [r for r in rows(d.state, "tenner") if r["scheduled_for"] and
                datetime.fromisoformat(str(r["scheduled_for"])) <= last + timedelta(seconds=60)
                and datetime.fromisoformat(str(r["scheduled_for"])) > last]  # fmt: skip
        done = [r for r in late if r["status"] in ("success", "missed")]
        return len(done) == 6

    wait_for(caught_up, timeout=20, what=f"catch-up decisions ({policy})")
    late = [
        r for r in rows(d.state, "tenner")
        if r["scheduled_for"]
        and last < datetime.fromisoformat(str(r["scheduled_for"])) <= last + timedelta(seconds=60)
    ]  # fmt: skip
    assert sum(r["status"] == "success" for r in late) == runs
    assert sum(r["status"] == "missed" for r in late) == missed
    slots = [r["scheduled_for"] for r in late]
    assert len(slots) == len(set(slots))  # each slot decided exactly once
    d.signal(signal.SIGTERM)
    assert d.wait() == 0


def plant_running(state: Path, job: str, slot: datetime, run_id: str) -> None:
    """A row a killed daemon left behind: started, never finished."""
    with Ledger.open(state / "ledger.db") as ledger:
        ledger.started(RunRecord(run_id, job, slot, "running", started_at=slot, node=NODE))
        assert ledger.flush()


LOST = """
    jobs:
      fragile:
        task: shell
        every: 1d
        rerun_lost: {rerun}
        params: {{command: 'echo rerun of slot $SCHEDD_SCHEDULED_FOR attempt $SCHEDD_ATTEMPT'}}
    """


def test_lost_run_is_recorded_and_rerun_once(daemon: Callable[..., Daemon]) -> None:
    d = daemon(LOST.format(rerun="true"))
    d.start()
    d.signal(signal.SIGTERM)
    d.wait()
    slot = datetime(2026, 1, 1, tzinfo=UTC)
    plant_running(d.state, "fragile", slot, "deadbeef0001")
    d.start()
    wait_for(lambda: "attempt 2" in d.job_log("fragile"), what="the re-run")

    def of_slot() -> list[dict[str, object]]:
        lost_slot = "2026-01-01T00:00:00.000000Z"
        return [r for r in rows(d.state, "fragile") if r["scheduled_for"] == lost_slot]

    wait_for(lambda: len(of_slot()) == 2 and of_slot()[0]["status"] == "success", what="rerun")
    rerun, lost = of_slot()
    assert (lost["run_id"], lost["status"], lost["attempt"]) == ("deadbeef0001", "lost", 1)
    assert rerun["attempt"] == 2
    assert rerun["reason"] == "rerun of lost run deadbeef0001"
    assert "lost" in d.daemon_log()
    d.signal(signal.SIGTERM)
    d.wait()
    # The re-run dies too (planted again as running): the slot is not tried a third time.
    with Ledger.open(d.state / "ledger.db") as ledger:
        ledger.started(
            RunRecord("deadbeef0002", "fragile", slot, "running", 3, started_at=slot, node=NODE)
        )
        assert ledger.flush()
    d.start()
    wait_for(lambda: "was lost twice" in d.daemon_log(), what="loop guard")
    assert d.job_log("fragile").count("attempt 3") == 0
    d.signal(signal.SIGTERM)
    assert d.wait() == 0


def test_lost_run_without_opt_in_is_not_rerun(daemon: Callable[..., Daemon]) -> None:
    d = daemon(LOST.format(rerun="false"))
    d.start()
    d.signal(signal.SIGTERM)
    d.wait()
    plant_running(d.state, "fragile", datetime(2026, 1, 1, tzinfo=UTC), "deadbeef0003")
    d.start()
    wait_for(lambda: any(r["status"] == "lost" for r in rows(d.state, "fragile")), what="lost")
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
    lost_slot = "2026-01-01T00:00:00.000000Z"
    of_slot = [r["status"] for r in rows(d.state, "fragile") if r["scheduled_for"] == lost_slot]
    assert of_slot == ["lost"]
