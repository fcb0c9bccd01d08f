"""The ledger's single writer thread: queue, batched commits, retries, pruning.

Why a thread and a queue: the dispatcher thread decides every fire, and a
commit can wait on the disk or on a reader's lock. Handing a record over
costs a queue put (microseconds); the writer commits whatever has
accumulated in one transaction, so throughput grows with load instead of
paying one commit per row.

Why retry forever: the ledger is the product's memory. A transient failure
(locked, disk full, I/O error) is logged and retried with backoff until it
clears; only a row SQLite can never store is logged and dropped, so it
cannot block the rows behind it. Nothing is raised into the caller.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from scheduler.ledger_schema import RUN_COLUMNS, LedgerError, SqliteBackend, to_text

if TYPE_CHECKING:
    import sqlite3

    from loguru import Logger

    from scheduler.records import RunRecord

T = TypeVar("T")

#: A batch is what was handed over while the previous commit ran (group
#: commit), at most this many rows ...
BATCH_ROWS = 500
#: ... after lingering this long (s) for more rows. 0 by default: measured at
#: 1,000 runs/s, a 20 ms linger cut commits from ~430/s to ~45/s but left ~13
#: runs uncommitted at any instant instead of ~2, and peak throughput was the
#: same (batches fill to 500 by themselves under load). Worth raising only
#: with synchronous=FULL on a disk with slow fsyncs.
BATCH_WAIT = 0.0
#: Pruning deletes at most this many rows per transaction, so it never holds
#: the write lock for long; chunks are interleaved with write batches.
PRUNE_CHUNK = 1000
#: Every job's history is pruned to its retention this often (seconds).
PRUNE_EVERY = 300.0
RETRY_MIN, RETRY_MAX = 0.05, 5.0
#: Statuses that wrote no output lines to the job's log.
_NO_OUTPUT = ("skipped", "missed")
FINISHED = "status <> 'running'"

_INSERT = (
    f"INSERT INTO runs ({', '.join(RUN_COLUMNS)}) VALUES ({', '.join('?' * len(RUN_COLUMNS))}) "
    "ON CONFLICT DO NOTHING"
)
_FINISH = (
    "UPDATE runs SET status = ?, started_at = COALESCE(?, started_at), ended_at = ?, "
    "exit_code = ?, signal = ?, error = ?, pid = COALESCE(?, pid), reason = ?, "
    "log_path = COALESCE(?, log_path) WHERE run_id = ?"
)
_ADVANCE = (
    "INSERT INTO job_state (job, last_slot, paused, updated_at) VALUES (?, ?, FALSE, ?) "
    "ON CONFLICT (job) DO UPDATE SET last_slot = excluded.last_slot, "
    "updated_at = excluded.updated_at "
    "WHERE job_state.last_slot IS NULL OR job_state.last_slot < excluded.last_slot"
)


@dataclass(frozen=True, slots=True)
class Retention:
    """Keep at most ``max_rows`` finished rows per job, none older than ``max_age`` s.

    A limit <= 0 is no limit. ``running`` rows are never pruned. Nothing is
    pruned automatically unless a retention is given (per job with
    ``Ledger.set_retention``, or for every job to ``Ledger.open``), so the
    ledger never contradicts the history limits of the user's config.
    """

    max_rows: int = 10_000
    max_age: float = 90 * 86400.0


@dataclass(slots=True)
class Call:
    """Work for the writer thread, done after every row queued before it is committed."""

    fn: Callable[[sqlite3.Connection], Any] | None
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


_STOP = Call(None)
#: (kind "start"/"final", record, pid_start, time.time() when handed over)
Write = tuple[str, "RunRecord", "int | None", float]
SlotKey = tuple[str, datetime, int]


class Writer:
    """Owns the write connection; every write and every write transaction happens here."""

    def __init__(
        self,
        backend: SqliteBackend,
        conn: sqlite3.Connection,
        log: Logger,
        *,
        batch_rows: int = BATCH_ROWS,
        batch_wait: float = BATCH_WAIT,
        retention: Retention | None = None,
    ) -> None:
        self._db, self._conn, self._log = backend, conn, log
        self._batch_rows, self._batch_wait = max(1, batch_rows), max(0.0, batch_wait)
        self.default_retention = retention  # None: prune only jobs given a retention
        self.retention: dict[str, Retention] = {}
        self._queue: queue.SimpleQueue[Write | Call] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending: dict[SlotKey, int] = {}
        self._closed = False
        self._abandon = threading.Event()
        self._touched: set[str] = set()
        self._prune_work: deque[str] = deque()
        self._next_prune = time.monotonic() + min(PRUNE_EVERY, 10.0)  # first round soon
        self._first_round = True
        self.counts = {"rows": 0, "commits": 0, "retries": 0, "dropped": 0, "duplicates": 0}
        self._thread = threading.Thread(target=self._run, name="schedd-ledger", daemon=True)
        self._thread.start()

    # ---- any thread ---------------------------------------------------------------
    def put(self, item: Write) -> bool:
        """Queue a row; False (and logged) once the writer is closed."""
        rec = item[1]
        with self._lock:
            if self._closed:
                self._log.error(f"run ledger closed; not recorded: {rec.summary()}")
                return False
            if rec.scheduled_for is not None:
                key = (rec.job, rec.scheduled_for, rec.attempt)
                self._pending[key] = self._pending.get(key, 0) + 1
            self._queue.put(item)  # under the lock: never behind close()'s stop marker
        return True

    def queued(self, key: SlotKey) -> bool:
        with self._lock:
            return key in self._pending

    def flush(self, timeout: float) -> bool:
        call = Call(None)
        if not self._submit(call):  # closing or closed: done once the thread has ended
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return call.done.wait(timeout)

    def call(
        self, fn: Callable[[sqlite3.Connection], T], timeout: float | None, *, transaction: bool
    ) -> T:
        """Run ``fn`` on the writer thread (in one transaction unless told otherwise)."""
        call = Call((lambda c: self.transact(fn)) if transaction else fn)
        if not self._submit(call):
            raise LedgerError("the run ledger is closed")
        if not call.done.wait(timeout):
            raise LedgerError(f"the run ledger's writer did not answer within {timeout}s")
        if call.error is not None:
            raise LedgerError(f"run ledger: {call.error}") from call.error
        result: T = call.result
        return result

    def _submit(self, call: Call) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._queue.put(call)
            return True

    def close(self, timeout: float) -> None:
        """Commit what is queued (up to ``timeout`` s, then give up on it), stop, close."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._abandon.set()
            self._thread.join(2.0)

    def qsize(self) -> int:
        return self._queue.qsize()

    # ---- the writer thread ----------------------------------------------------------
    def _run(self) -> None:
        """Loop: a batch of rows, then the call that ended it, then one slice of pruning.

        A bug here must not silently end all recording: it is logged, and the loop goes on.
        """
        while True:
            try:
                if not self._step():
                    return
            except Exception as exc:
                self._log.opt(exception=exc).error(f"run ledger writer error: {exc!r}")
                self._abandon.wait(RETRY_MIN)

    def _step(self) -> bool:
        """One turn of the loop; False once stopped."""
        wait = 0.0 if self._prune_work else max(0.0, self._next_prune - time.monotonic())
        try:
            item: Write | Call | None = self._queue.get(timeout=wait)
        except queue.Empty:
            item = None
        call = item if isinstance(item, Call) else None
        if item is not None and not isinstance(item, Call):
            batch = [item]
            call = self._collect(batch)
            try:
                self._write(batch)
            except Exception as exc:  # a bug; the call behind the batch must still be answered
                self._log.opt(exception=exc).error(f"run ledger writer error: {exc!r}")
        if call is _STOP:
            self._stop()
            return False
        if call is not None:
            if call.fn is not None:
                try:
                    call.result = call.fn(self._conn)
                except Exception as exc:
                    call.error = exc
            call.done.set()
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PRUNE_EVERY
            first, self._first_round = self._first_round, False
            self._plan_prune(first)
        if self._prune_work and not self._abandon.is_set():
            self._prune_step()
        return True

    def _collect(self, batch: list[Write]) -> Call | None:
        """Take queued rows until none is left (after ``batch_wait``) or the batch is full."""
        deadline = time.monotonic() + self._batch_wait
        while len(batch) < self._batch_rows:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    return None
            if isinstance(item, Call):
                return item
            batch.append(item)
        return None

    def transact(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one write transaction; retry transient errors (logged) until it commits.

        Raises a permanent error, or a transient one once :meth:`close` gave up waiting.
        """
        conn, delay = self._conn, RETRY_MIN
        while True:
            try:
                conn.execute(self._db.begin_write)
                result = fn(conn)
                conn.execute("COMMIT")
                self.counts["commits"] += 1
                return result
            except Exception as exc:
                self._rollback()
                if not self._db.transient(exc) or self._abandon.is_set():
                    raise
                self.counts["retries"] += 1
                self._log.error(f"run ledger write failed, retrying in {delay:g}s: {exc}")
                self._abandon.wait(delay)
                delay = min(delay * 2, RETRY_MAX)

    def _rollback(self) -> None:
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except Exception as exc:  # SQLite may already have rolled back (I/O error, full disk)
            self._log.warning(f"run ledger rollback: {exc}")

    def _write(self, batch: list[Write]) -> None:
        self._write_rows(batch)
        with self._lock:
            for _, rec, _, _ in batch:
                if rec.scheduled_for is not None:
                    key = (rec.job, rec.scheduled_for, rec.attempt)
                    if self._pending.get(key, 0) <= 1:
                        self._pending.pop(key, None)
                    else:
                        self._pending[key] -= 1

    def _write_rows(self, batch: list[Write]) -> None:
        """Commit ``batch``; on a permanent error, find and drop the bad row(s) one by one."""
        try:
            duplicates = self.transact(lambda c: self._apply(c, batch))
        except Exception as exc:
            if self._abandon.is_set():
                self.counts["dropped"] += len(batch)
                self._log.error(f"run ledger closed: {len(batch)} row(s) not written: {exc}")
            elif len(batch) > 1:
                for item in batch:
                    self._write_rows([item])
            else:
                self.counts["dropped"] += 1
                self._log.error(f"run ledger cannot store {batch[0][1].summary()}: {exc!r}")
            return
        self.counts["rows"] += len(batch) - len(duplicates)
        self.counts["duplicates"] += len(duplicates)
        for message in duplicates:
            self._log.warning(message)
        self._touched.update(rec.job for _, rec, _, _ in batch)

    def _apply(self, conn: sqlite3.Connection, batch: list[Write]) -> list[str]:
        """Write ``batch``; returns one warning per row ignored as a duplicate."""
        duplicates: list[str] = []
        slots: dict[str, str] = {}
        sql = self._db.sql
        for kind, rec, pid_start, queued_at in batch:
            slot = to_text(rec.scheduled_for)
            final = kind == "final"
            log_path = None if final and rec.status in _NO_OUTPUT else f"logs/{rec.job}.log"
            started, ended = to_text(rec.started_at), to_text(rec.ended_at)
            status = rec.status if final else "running"
            outcome = (ended, rec.exit_code, rec.signal, rec.error) if final else (None,) * 4
            missing = True
            if final:
                finish = (status, started, *outcome, rec.pid, rec.reason, log_path, rec.run_id)
                missing = conn.execute(sql(_FINISH), finish).rowcount == 0
            if missing:  # no 'running' row: a run started elsewhere, or a skip/miss
                created = started or to_text(datetime.fromtimestamp(queued_at, UTC))
                row = (rec.run_id, rec.job, slot, rec.attempt, status, created, started, *outcome)
                row2 = (rec.pid, pid_start, rec.node, rec.reason, log_path)
                if conn.execute(sql(_INSERT), (*row, *row2)).rowcount == 0:
                    duplicates.append(self._duplicate(conn, rec, slot))
            if slot is not None and slot > slots.get(rec.job, ""):
                slots[rec.job] = slot
        now = to_text(datetime.now(UTC))
        for job, slot in slots.items():
            conn.execute(sql(_ADVANCE), (job, slot, now))
        return duplicates

    def _duplicate(self, conn: sqlite3.Connection, rec: RunRecord, slot: str | None) -> str:
        what = f"run ledger: run {rec.run_id} of job {rec.job!r}"
        if slot is None:
            return f"{what} was already recorded; duplicate ignored"
        sql = "SELECT run_id, status FROM runs WHERE job = ? AND scheduled_for = ? AND attempt = ?"
        other = conn.execute(self._db.sql(sql), (rec.job, slot, rec.attempt)).fetchone()
        held = f"run {other[0]} ({other[1]})" if other else "another row"
        return (
            f"{what}: slot {slot} attempt {rec.attempt} is already held by {held}; "
            "duplicate ignored (each slot runs once)"
        )

    # ---- pruning --------------------------------------------------------------------
    def prune(self, job: str, ret: Retention) -> int:
        """Prune one job completely, one chunk per transaction (writer thread only)."""
        total = 0
        while (n := self.transact(lambda c: self._prune_chunk(c, job, ret))) > 0:
            total += n
            if n < PRUNE_CHUNK:
                break
        return total

    def _plan_prune(self, first_round: bool) -> None:
        jobs = set(self.retention)
        if self.default_retention is not None:
            jobs |= self._touched
            if first_round:  # jobs with no new rows since start still age out
                jobs |= {r[0] for r in self._conn.execute("SELECT DISTINCT job FROM runs")}
        self._touched = set()
        if jobs:  # a job without rows has nothing to prune: skip its transaction
            jobs &= {r[0] for r in self._conn.execute("SELECT DISTINCT job FROM runs")}
        self._prune_work.extend(sorted(jobs - set(self._prune_work)))

    def _prune_step(self) -> None:
        """One chunk for the job at the head of the round, between write batches."""
        job = self._prune_work[0]
        ret = self.retention.get(job, self.default_retention)
        n = 0
        if ret is not None:
            try:
                n = self.transact(lambda c: self._prune_chunk(c, job, ret))
            except Exception as exc:
                self._log.error(f"run ledger: pruning {job!r} failed: {exc!r}")
        if n < PRUNE_CHUNK:
            self._prune_work.popleft()

    def _prune_chunk(self, conn: sqlite3.Connection, job: str, ret: Retention) -> int:
        deleted = 0
        pick = f"SELECT run_id FROM runs WHERE job = ? AND {FINISHED} AND"
        if ret.max_age > 0:
            cutoff = to_text(datetime.now(UTC) - timedelta(seconds=ret.max_age))
            sql = f"DELETE FROM runs WHERE run_id IN ({pick} created_at < ? LIMIT ?)"
            deleted += conn.execute(self._db.sql(sql), (job, cutoff, PRUNE_CHUNK)).rowcount
        if ret.max_rows > 0 and deleted < PRUNE_CHUNK:
            edge = conn.execute(
                self._db.sql(
                    f"SELECT created_at, run_id FROM runs WHERE job = ? AND {FINISHED} "
                    "ORDER BY created_at DESC, run_id DESC LIMIT 1 OFFSET ?"
                ),
                (job, ret.max_rows - 1),
            ).fetchone()
            if edge is not None:
                older = "(created_at < ? OR (created_at = ? AND run_id < ?))"
                sql = f"DELETE FROM runs WHERE run_id IN ({pick} {older} LIMIT ?)"
                params = (job, edge[0], edge[0], edge[1], PRUNE_CHUNK - deleted)
                deleted += conn.execute(self._db.sql(sql), params).rowcount
        return deleted

    def _stop(self) -> None:
        left = self._queue.qsize()
        if left:
            self._log.error(f"run ledger closed with {left} queued item(s) unwritten")
        self._conn.close()


__all__ = ["BATCH_ROWS", "BATCH_WAIT", "PRUNE_CHUNK", "PRUNE_EVERY", "Retention", "Writer"]
