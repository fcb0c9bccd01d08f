"""The run ledger against real SQLite files: schema, lifecycle, exactly-once, recovery, crashes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from loguru import logger

import scheduler.ledger as ledger_mod
import scheduler.ledger_writer as writer_mod
from scheduler.ledger import (
    Ledger,
    LedgerError,
    Retention,
    SchemaError,
    pid_start_time,
    process_matches,
)
from scheduler.ledger_schema import MIGRATIONS, migrate
from scheduler.records import NODE, RunRecord

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2027, 1, 4, 12, 0, tzinfo=UTC)


def slot(i: int) -> datetime:
    return T0 + timedelta(minutes=i)


def rid(i: int) -> str:
    return f"run{i:06d}"


def run(i: int, job: str = "a", status: str = "success", **kw: object) -> RunRecord:
    """A finished run of slot i that started at slot i (so created_at orders by i)."""
    fields: dict[str, object] = {"started_at": slot(i), "ended_at": slot(i) + timedelta(seconds=1)}
    fields.update(kw)
    s = fields.pop("slot", slot(i))
    return RunRecord(rid(i), job, s, status, **fields)  # type: ignore[arg-type]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
def ledger(db: Path) -> Iterator[Ledger]:
    led = Ledger.open(db)
    yield led
    led.close()


@pytest.fixture
def logs() -> Iterator[list[str]]:
    """Warnings and errors the ledger logged, as ``LEVEL message`` lines."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(f"{m.record['level'].name} {m}"), level="WARNING")
    yield lines
    logger.remove(sink)


def raw(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(db, isolation_level=None)


# ---- schema and migrations ---------------------------------------------------------------
def test_new_file_gets_the_current_schema_in_wal_mode(db: Path) -> None:
    Ledger.open(db).close()
    conn = raw(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == len(MIGRATIONS)
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert {"runs", "job_state", "runs_status", "runs_job_recent", "runs_recent"} <= names
    plan = " ".join(
        str(r[3])
        for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM runs WHERE job = 'a' "
            "ORDER BY created_at DESC, run_id DESC LIMIT 50"
        )
    )
    assert "runs_job_recent" in plan and "TEMP B-TREE" not in plan


def test_migrates_an_older_file_and_keeps_its_rows(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Version 0: the shape a schedd that knew no migration yet left behind.
    conn = raw(db)
    assert migrate(conn, str(db), MIGRATIONS[:0]) == (0, 0)
    conn.close()
    with Ledger.open(db) as led:  # 0 -> 1
        led.record(run(1))
        assert led.flush()
    # A later release appends a step; opening the v1 file upgrades it in place.
    v2 = (*MIGRATIONS, ("ALTER TABLE runs ADD COLUMN host_load INTEGER",))
    monkeypatch.setattr(ledger_mod, "MIGRATIONS", v2)
    with Ledger.open(db) as led:
        assert [r["run_id"] for r in led.history()] == [rid(1)]
    conn = raw(db)
    assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == 2
    assert "host_load" in {r[1] for r in conn.execute("PRAGMA table_info(runs)")}


def test_a_failed_migration_changes_nothing(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Ledger.open(db).close()
    bad = (*MIGRATIONS, ("ALTER TABLE runs ADD COLUMN x INTEGER", "THIS IS NOT SQL"))
    monkeypatch.setattr(ledger_mod, "MIGRATIONS", bad)
    with pytest.raises(SchemaError, match="from version 1 to 2 failed, nothing was changed"):
        Ledger.open(db)
    conn = raw(db)
    assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == 1
    assert "x" not in {r[1] for r in conn.execute("PRAGMA table_info(runs)")}


def test_refuses_a_file_from_a_newer_schedd(db: Path) -> None:
    Ledger.open(db).close()
    raw(db).execute("INSERT INTO schema_version VALUES (99, '2030-01-01T00:00:00.000000Z')")
    for readonly in (False, True):
        with pytest.raises(SchemaError, match="version 99 is newer than this schedd"):
            Ledger.open(db, readonly=readonly)


def test_readonly_open_never_creates_or_migrates(db: Path) -> None:
    with pytest.raises(LedgerError, match="no run ledger at"):
        Ledger.open(db, readonly=True)
    assert not db.exists()
    conn = raw(db)
    migrate(conn, str(db), MIGRATIONS[:0])
    conn.close()
    with pytest.raises(SchemaError, match="older than this schedd"):
        Ledger.open(db, readonly=True)


def test_refuses_a_foreign_database_or_a_file_that_is_not_one(db: Path) -> None:
    raw(db).execute("CREATE TABLE accounts (id INTEGER)")
    with pytest.raises(SchemaError, match="not a schedd ledger"):
        Ledger.open(db)
    junk = db.with_name("junk.db")
    junk.write_bytes(b"not a database at all" * 100)
    for readonly in (False, True):
        with pytest.raises(LedgerError, match="not a database"):
            Ledger.open(junk, readonly=readonly)


# ---- writes ----------------------------------------------------------------------------
def test_started_then_record(ledger: Ledger) -> None:
    started = RunRecord(rid(1), "a", slot(1), "success", started_at=slot(1), pid=4321)
    ledger.started(started, pid_start=777)
    assert ledger.flush()
    (row,) = ledger.history()
    assert row["status"] == "running" and row["ended_at"] is None
    assert (row["pid"], row["pid_start"], row["log_path"]) == (4321, 777, "logs/a.log")
    ledger.record(run(1, exit_code=0, pid=None))
    assert ledger.flush()
    (row,) = ledger.history()
    assert row["status"] == "success" and row["exit_code"] == 0
    assert row["pid"] == 4321 and row["pid_start"] == 777  # kept from the start
    assert row["started_at"] == "2027-01-04T12:01:00.000000Z"
    assert row["ended_at"] == "2027-01-04T12:01:01.000000Z"


def test_record_is_an_upsert_by_run_id(ledger: Ledger) -> None:
    ledger.record(run(1, status="failed", exit_code=3))
    ledger.record(run(1, status="killed", signal="SIGTERM", reason="replaced"))
    assert ledger.flush()
    (row,) = ledger.history()
    assert (row["status"], row["signal"], row["reason"]) == ("killed", "SIGTERM", "replaced")


def test_a_second_row_for_the_same_slot_and_attempt_is_ignored(
    ledger: Ledger, logs: list[str]
) -> None:
    ledger.started(RunRecord(rid(1), "a", slot(1), "success", started_at=slot(1)))
    ledger.started(RunRecord(rid(2), "a", slot(1), "success", started_at=slot(1)))  # same key
    ledger.record(run(3, slot=slot(1)))  # a final record for the same key: also ignored
    ledger.started(RunRecord(rid(4), "a", slot(1), "success", attempt=2))  # a retry is new
    ledger.record(run(5, slot=None))
    ledger.record(run(6, slot=None))  # manual runs have no slot and never collide
    assert ledger.flush()
    assert sorted(r["run_id"] for r in ledger.history()) == [rid(1), rid(4), rid(5), rid(6)]
    assert ledger.stats()["duplicates"] == 2
    dup = [line for line in logs if "duplicate ignored" in line]
    assert len(dup) == 2 and all(line.startswith("WARNING") and rid(1) in line for line in dup)


def test_last_slot_only_moves_forward(ledger: Ledger) -> None:
    ledger.record(run(5))
    ledger.record(run(2, status="missed"))  # same batch, older slot
    assert ledger.flush()
    assert ledger.last_slots() == {"a": slot(5)}
    ledger.record(run(3, status="skipped"))  # later batch, older slot
    ledger.started(RunRecord(rid(9), "b", slot(9), "success"))  # a start counts as handled
    ledger.record(run(10, slot=None))  # a manual run has no slot
    assert ledger.flush()
    assert ledger.last_slots() == {"a": slot(5), "b": slot(9)}
    ledger.record(run(7, status="skipped"))
    assert ledger.flush()
    assert ledger.last_slots()["a"] == slot(7)


def test_pause_survives_reopen(db: Path) -> None:
    with Ledger.open(db) as led:
        led.record(run(1))
        led.set_paused("a", True)
        led.set_paused("b", True)
        led.set_paused("b", False)
    with Ledger.open(db, readonly=True) as led:
        assert led.paused() == {"a"}
        assert led.last_slots() == {"a": slot(1)}  # pausing did not touch last_slot


def test_slot_taken_sees_queued_and_committed_rows(ledger: Ledger) -> None:
    ledger.record(run(1))
    assert ledger.slot_taken("a", slot(1))  # before any commit
    assert ledger.flush()
    assert ledger.slot_taken("a", slot(1))
    assert not ledger.slot_taken("a", slot(1), attempt=2)
    assert not ledger.slot_taken("a", slot(2))
    assert not ledger.slot_taken("b", slot(1))


def test_recover_marks_only_this_nodes_running_rows_lost(db: Path) -> None:
    with Ledger.open(db) as dead:
        dead.started(RunRecord(rid(1), "a", slot(1), "success", pid=101, node="n1"), 5001)
        dead.started(RunRecord(rid(2), "a", None, "success", pid=102, node="n1"), 5002)
        dead.started(RunRecord(rid(3), "a", slot(3), "success", pid=103, node="n2"), 5003)
        dead.record(run(4, node="n1"))
    with Ledger.open(db) as led:
        led.started(RunRecord(rid(5), "a", slot(5), "success", pid=105, node="n1"), 5005)
        lost = led.recover("n1")
        assert sorted((x.record.run_id, x.record.pid, x.pid_start) for x in lost) == [
            (rid(1), 101, 5001),
            (rid(2), 102, 5002),
        ]
        assert all(x.record.status == "lost" and "n1 stopped" in x.record.reason for x in lost)
        assert lost[0].record.job == "a"
        assert led.flush()
        status = {r["run_id"]: r["status"] for r in led.history()}
    assert status == {
        rid(1): "lost",
        rid(2): "lost",
        rid(3): "running",  # another node's run
        rid(4): "success",
        rid(5): "running",  # started by the live daemon
    }


# ---- reads -------------------------------------------------------------------------------
def test_history_filters_limits_and_orders_newest_first(ledger: Ledger) -> None:
    for i in range(10):
        ledger.record(run(i, job="a" if i % 2 else "b", status="failed" if i % 3 else "success"))
    ledger.started(RunRecord(rid(10), "a", slot(10), "success", started_at=slot(10)))
    assert ledger.flush()
    assert [r["run_id"] for r in ledger.history(limit=3)] == [rid(10), rid(9), rid(8)]
    assert [r["run_id"] for r in ledger.history("a", limit=3)] == [rid(10), rid(9), rid(7)]
    assert [r["run_id"] for r in ledger.history("a", status="failed")] == [rid(7), rid(5), rid(1)]
    assert ledger.history("nope") == []
    rows = ledger.history(limit=100)
    assert len(rows) == 11
    back = json.loads(json.dumps(rows))
    assert back == rows
    need = {"run_id", "job", "scheduled_for", "started_at", "ended_at", "status", "exit_code"}
    assert need | {"attempt", "pid", "node", "reason", "log_path"} <= set(rows[0])
    with pytest.raises(LedgerError, match="unknown status"):
        ledger.history(status="done")


def test_last_outcomes_is_the_newest_finished_row_per_job(ledger: Ledger) -> None:
    ledger.record(run(1, job="a", status="failed"))
    ledger.record(run(2, job="a"))
    ledger.started(RunRecord(rid(3), "a", slot(3), "success", started_at=slot(3)))
    ledger.record(run(4, job="b", status="missed"))
    assert ledger.flush()
    out = ledger.last_outcomes()
    assert {j: (r["run_id"], r["status"]) for j, r in out.items()} == {
        "a": (rid(2), "success"),
        "b": (rid(4), "missed"),
    }


def test_prune_by_rows_and_by_age_in_chunks(ledger: Ledger, db: Path) -> None:
    now = datetime.now(UTC)
    for i in range(2500):
        ledger.record(run(i, job="a", started_at=now - timedelta(seconds=2500 - i)))
    for i in range(2500, 2510):
        ledger.record(run(i, job="b", started_at=now - timedelta(days=100 - (i - 2500))))
    ledger.started(
        RunRecord(rid(9999), "b", slot(9999), "success", started_at=now - timedelta(days=200))
    )
    ledger.record(run(2600, job="b", started_at=now))
    assert ledger.flush()
    commits = ledger.stats()["commits"]
    assert ledger.prune("a", max_rows=100, max_age=0) == 2400
    assert ledger.stats()["commits"] - commits == 3  # at most 1000 rows per transaction
    kept = [r["run_id"] for r in ledger.history("a", limit=1000)]
    assert kept == [rid(i) for i in range(2499, 2399, -1)]
    # By age: 10 rows 91..100 days old go; the running row, however old, stays.
    assert ledger.prune("b", max_rows=0, max_age=90.5 * 86400) == 10
    assert {r["run_id"] for r in ledger.history("b")} == {rid(9999), rid(2600)}
    assert ledger.prune("b", max_rows=1, max_age=0) == 0  # running rows are not counted
    assert ledger.prune("zzz", max_rows=1, max_age=1) == 0


def test_periodic_prune_applies_retention(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_mod, "PRUNE_EVERY", 0.05)
    for default in (None, Retention(max_rows=5, max_age=0)):
        with Ledger.open(db, retention=default) as led:
            led.set_retention("b", Retention(max_rows=2, max_age=0))
            for i in range(30):
                led.record(run(i, job="abc"[i // 10]))
            assert led.flush()
            want = 10 + 2 + 10 if default is None else 5 + 2 + 5
            deadline = time.monotonic() + 5
            while len(led.history(limit=100)) > want and time.monotonic() < deadline:
                time.sleep(0.01)
            assert [r["run_id"] for r in led.history("b")] == [rid(19), rid(18)]
            rows_a = 10 if default is None else 5  # no retention given: never pruned
            assert [r["run_id"] for r in led.history("a")] == [
                rid(i) for i in range(9, 9 - rows_a, -1)
            ]
        db.unlink()


def test_a_reader_sees_commits_while_the_writer_is_open(ledger: Ledger, db: Path) -> None:
    ledger.record(run(1))
    assert ledger.flush()
    with Ledger.open(db, readonly=True) as reader:
        assert reader.readonly
        assert [r["run_id"] for r in reader.history()] == [rid(1)]
        ledger.record(run(2))
        assert ledger.flush()
        assert [r["run_id"] for r in reader.history()] == [rid(2), rid(1)]
        with pytest.raises(LedgerError, match="read-only"):
            reader.record(run(3))
        with pytest.raises(LedgerError, match="read-only"):
            reader.set_paused("a", True)
        assert reader.flush()


# ---- failures ----------------------------------------------------------------------------
def test_the_writer_retries_through_a_locked_database(db: Path, logs: list[str]) -> None:
    """Another connection holds the write lock: a real SQLITE_BUSY, logged and retried."""
    failed = threading.Event()
    sink = logger.add(
        lambda m: failed.set(), level="ERROR", filter=lambda r: "retrying" in r["message"]
    )
    blocker = raw(db)
    with Ledger.open(db, busy_timeout=0.02) as led:
        blocker.execute("BEGIN IMMEDIATE")
        led.record(run(1))
        assert failed.wait(5)
        assert not led.flush(0.05)  # still blocked: nothing was raised, nothing was lost
        blocker.execute("ROLLBACK")
        assert led.flush()
        assert [r["run_id"] for r in led.history()] == [rid(1)]
        assert led.stats()["retries"] >= 1
    logger.remove(sink)
    assert any("database is locked" in line for line in logs)


def test_a_row_sqlite_cannot_store_is_dropped_alone(ledger: Ledger, logs: list[str]) -> None:
    ledger.record(run(1))
    ledger.record(run(2, pid=2**70))  # too big for an SQLite INTEGER: fails every time
    ledger.record(run(3))
    assert ledger.flush()
    assert [r["run_id"] for r in ledger.history()] == [rid(3), rid(1)]
    assert ledger.stats()["dropped"] == 1
    assert any(line.startswith("ERROR") and "cannot store" in line for line in logs)


def test_close_is_idempotent_and_later_records_are_logged_not_raised(
    db: Path, logs: list[str]
) -> None:
    led = Ledger.open(db)
    led.record(run(1))
    led.close()
    led.close()
    led.record(run(2))
    assert any("ledger closed; not recorded" in line for line in logs)
    with Ledger.open(db, readonly=True) as reader:
        assert [r["run_id"] for r in reader.history()] == [rid(1)]


CHILD = """
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from scheduler.ledger import Ledger
from scheduler.records import RunRecord
led = Ledger.open(Path(sys.argv[1]))
first = int(sys.argv[2])
t0 = datetime(2027, 1, 1, tzinfo=UTC)
for i in range(first, first + 10**6):
    s = t0 + timedelta(minutes=i)
    led.started(RunRecord(f"r{i:08d}", "j", s, "success", started_at=s, pid=i), i)
    led.record(RunRecord(f"r{i:08d}", "j", s, "success", started_at=s, ended_at=s, exit_code=0))
    if i == first + 1000:
        led.flush()
        print(i, flush=True)
"""


def kill_mid_stream(db: Path, first: int, delay: float) -> None:
    """Start a writer at row ``first``; SIGKILL it ``delay`` s after 1000 more rows are visible."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", CHILD, str(db), str(first)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == str(first + 1000)
        watch = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
        goal = watch.execute("SELECT COUNT(*) FROM runs").fetchone()[0] + 1000
        deadline = time.monotonic() + 20
        while watch.execute("SELECT COUNT(*) FROM runs").fetchone()[0] < goal:
            assert time.monotonic() < deadline
        watch.close()
        time.sleep(delay)  # land at different points of the writer's batch/commit cycle
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()


def test_sigkill_mid_stream_leaves_a_clean_file(db: Path) -> None:
    for round_, delay in enumerate((0.0, 0.013, 0.031)):
        kill_mid_stream(db, round_ * 10**6, delay)
    conn = raw(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    n, ids, keys = conn.execute(
        "SELECT COUNT(*), COUNT(DISTINCT run_id), COUNT(DISTINCT scheduled_for) FROM runs"
    ).fetchone()
    assert n == ids == keys and n >= 3 * 2001, (n, ids, keys)  # every flushed row, none twice
    statuses = {r[0] for r in conn.execute("SELECT DISTINCT status FROM runs")}
    assert statuses <= {"running", "success"}
    conn.close()
    with Ledger.open(db) as led:  # reopens writable; recovery and catch-up state work
        lost = led.recover(NODE)
        assert all(x.record.status == "lost" and x.pid_start == x.record.pid for x in lost)
        newest = datetime(2027, 1, 1, tzinfo=UTC) + timedelta(minutes=2 * 10**6 + 2000)
        assert led.last_slots()["j"] >= newest


# ---- process identity --------------------------------------------------------------------
def test_pid_start_time_identifies_a_process(tmp_path: Path) -> None:
    me = pid_start_time(os.getpid())
    assert isinstance(me, int) and me > 0
    assert process_matches(os.getpid(), me)
    assert not process_matches(os.getpid(), me + 1)  # a reused pid has another start time
    assert not process_matches(os.getpid(), None)  # unprovable: never a match
    assert not process_matches(None, me)
    assert pid_start_time(2**22 + 12345) is None
    # The command name can hold spaces and ')': parse after the last ')'.
    odd = tmp_path / "odd) name ("
    odd.symlink_to("/bin/sleep")
    proc = subprocess.Popen([str(odd), "5"])
    try:
        start = pid_start_time(proc.pid)
        assert start is not None and start >= me
        assert process_matches(proc.pid, start)
    finally:
        proc.kill()
        proc.wait()
