"""The run ledger's storage layer: schema, migrations, and the SQLite backend.

Everything that would change for PostgreSQL lives here; :mod:`scheduler.ledger`
only speaks the portable SQL described below through :class:`SqliteBackend`.

Why a hand-written list instead of a migration tool: the ledger has two
tables, the read path must stay import-cheap (see :mod:`scheduler.ledger`),
and every step is plain SQL that SQLite (>= 3.24) and PostgreSQL (>= 9.5)
both accept, so the same list can build a PostgreSQL ledger later:

- types are ``TEXT``, ``INTEGER``, ``BIGINT`` and ``BOOLEAN`` only (SQLite
  maps them by affinity; ``BOOLEAN``/``TRUE``/``FALSE`` need SQLite 3.23);
- times are UTC ISO-8601 text of fixed width (``2024-05-01T02:00:00.000000Z``):
  exact to the microsecond like ``datetime``, and sorting as text sorts by time;
- no ``AUTOINCREMENT``, no ``WITHOUT ROWID``, no partial indexes.

``MIGRATIONS[i]`` takes a database from version ``i`` to ``i + 1``. A
database that has never been opened is version 0. Each migration runs in
one transaction together with the row that records it in
``schema_version``, so a failed step leaves the database at the old version.
Never edit a released step: append a new one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from scheduler.errors import ScheddError

#: Every status a ``runs`` row can have. ``running`` exists only in the ledger:
#: a row is inserted as ``running`` when the run starts and finalised by its record.
STATUSES = ("running", "success", "failed", "timeout", "killed", "skipped", "missed", "lost")

#: One column list, so reads and writes cannot drift from the schema.
RUN_COLUMNS = (
    "run_id",
    "job",
    "scheduled_for",
    "attempt",
    "status",
    "created_at",
    "started_at",
    "ended_at",
    "exit_code",
    "signal",
    "error",
    "pid",
    "pid_start",
    "node",
    "reason",
    "log_path",
)

_V1 = (
    # One row per attempt of one fire. (job, scheduled_for, attempt) is the
    # exactly-once key: a second insert of the same key is ignored. Manual runs
    # have a NULL slot, and NULLs never collide in a UNIQUE constraint (SQLite
    # and PostgreSQL agree), so they are never deduplicated.
    # created_at is when the fire was decided (started, skipped or missed): it
    # is never NULL, unlike started_at, so it orders history and ages rows out
    # the same way for every status and on every backend (SQLite sorts NULLs
    # first, PostgreSQL last).
    """
    CREATE TABLE runs (
        run_id        TEXT    NOT NULL PRIMARY KEY,
        job           TEXT    NOT NULL,
        scheduled_for TEXT,
        attempt       INTEGER NOT NULL DEFAULT 1,
        status        TEXT    NOT NULL,
        created_at    TEXT    NOT NULL,
        started_at    TEXT,
        ended_at      TEXT,
        exit_code     INTEGER,
        signal        TEXT,
        error         TEXT,
        pid           INTEGER,
        pid_start     BIGINT,
        node          TEXT    NOT NULL,
        reason        TEXT    NOT NULL DEFAULT '',
        log_path      TEXT,
        CONSTRAINT runs_slot_key UNIQUE (job, scheduled_for, attempt)
    )
    """,
    # runs_slot_key's index already serves lookups by (job, scheduled_for).
    # By status: recovery's 'running' rows, and history filtered by status
    # newest first without sorting every row of that status.
    "CREATE INDEX runs_status ON runs (status, created_at DESC, run_id DESC)",
    # History is read newest first, per job or overall; run_id breaks ties.
    "CREATE INDEX runs_job_recent ON runs (job, created_at DESC, run_id DESC)",
    "CREATE INDEX runs_recent ON runs (created_at DESC, run_id DESC)",
    # Per-job schedule state: the newest slot handled (run, skipped or missed),
    # which the daemon resumes after on restart, and whether the job is paused.
    """
    CREATE TABLE job_state (
        job        TEXT    NOT NULL PRIMARY KEY,
        last_slot  TEXT,
        paused     BOOLEAN NOT NULL DEFAULT FALSE,
        updated_at TEXT    NOT NULL
    )
    """,
)

#: Ordered migrations; ``MIGRATIONS[i]`` upgrades version ``i`` to ``i + 1``.
MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1,)

_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version    INTEGER NOT NULL PRIMARY KEY,
    applied_at TEXT    NOT NULL
)
"""


class LedgerError(ScheddError):
    """The ledger cannot be opened or used; the message says why, in one line."""


class SchemaError(LedgerError):
    """The schema is unusable here: too new, too old to read, foreign, or a migration failed."""


SQLITE_TABLES = "SELECT name FROM sqlite_master WHERE type = 'table'"


def current_version(conn: sqlite3.Connection, tables_sql: str = SQLITE_TABLES) -> int:
    """The database's schema version: 0 when it has none yet.

    A database that holds tables but no ``schema_version`` is not a ledger;
    migrating it could corrupt someone else's data, so that is an error.
    """
    tables = {r[0] for r in conn.execute(tables_sql)}
    if "schema_version" not in tables:
        if tables:
            raise SchemaError(
                f"not a schedd ledger: it has tables ({', '.join(sorted(tables))}) "
                "but no schema_version"
            )
        return 0
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def check_version(version: int, known: int, where: str) -> None:
    """Refuse a database written by a newer schedd: its rows may mean things we do not know."""
    if version > known:
        raise SchemaError(
            f"{where}: ledger schema version {version} is newer than this schedd understands "
            f"(version {known}); upgrade schedd, or use another state dir"
        )


def migrate(
    conn: sqlite3.Connection,
    where: str,
    migrations: Sequence[Sequence[str]] = MIGRATIONS,
    *,
    begin: str = "BEGIN IMMEDIATE",
    tables_sql: str = SQLITE_TABLES,
) -> tuple[int, int]:
    """Bring the database to ``len(migrations)``; returns ``(old, new)`` versions.

    ``conn`` must be in autocommit mode (``isolation_level=None``); each step
    runs in its own transaction started with ``begin`` (``BEGIN IMMEDIATE`` in
    SQLite takes the write lock first, so two processes opening the same new
    file cannot both migrate it: the second waits, then sees the new version).
    """
    known = len(migrations)
    conn.execute(begin)
    try:
        old = current_version(conn, tables_sql)
        check_version(old, known, where)
        conn.execute(_VERSION_TABLE)
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    version = old
    while version < known:
        conn.execute(begin)
        try:
            # Read again inside the lock: another process may have migrated meanwhile.
            version = current_version(conn, tables_sql)
            if version >= known:
                conn.execute("COMMIT")
                break
            for step in migrations[version]:
                conn.execute(step)
            conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                (version + 1, to_text(datetime.now(UTC))),
            )
            conn.execute("COMMIT")
        except Exception as exc:
            _rollback(conn)
            if isinstance(exc, SchemaError):
                raise
            raise SchemaError(
                f"{where}: migrating the ledger from version {version} to {version + 1} "
                f"failed, nothing was changed: {exc}"
            ) from exc
        version += 1
    return old, version


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open (SQLite ends some failed ones by itself)."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def to_text(dt: datetime | None) -> str | None:
    """Fixed-width UTC ISO text (sorts as text in time order); naive datetimes are taken as UTC."""
    if dt is None:
        return None
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC).replace(tzinfo=None)
    return dt.isoformat(timespec="microseconds") + "Z"


def from_text(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


class SqliteBackend:
    """Connections, pragmas, transactions and error classes for SQLite.

    A PostgreSQL backend would provide the same members (``begin_write`` =
    ``BEGIN``, ``sql()`` turning ``?`` into ``%s``, ``transient()`` matching
    serialization and connection errors, ``tables_sql`` from
    ``information_schema``); the ledger's statements need no other change.

    Connections are in autocommit mode (``isolation_level=None``): the ledger
    opens every transaction itself, so a transaction never stays open by
    accident and each read sees the newest commit.
    """

    name = "sqlite"
    begin_write = "BEGIN IMMEDIATE"
    tables_sql = SQLITE_TABLES

    def __init__(self, path: Path, *, synchronous: str = "NORMAL", busy_timeout: float = 5.0):
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise LedgerError(f"unknown SQLite synchronous mode {synchronous!r}")
        self.path = path
        self.synchronous = synchronous.upper()
        self.busy_timeout = busy_timeout

    def connect(self, *, readonly: bool) -> sqlite3.Connection:
        """A connection usable from any one thread at a time (callers serialise)."""
        try:
            if readonly:
                if not self.path.exists():
                    raise LedgerError(f"no run ledger at {self.path} (has the daemon run here?)")
                uri = f"file:{quote(str(self.path))}?mode=ro"
                return sqlite3.connect(
                    uri,
                    uri=True,
                    isolation_level=None,
                    check_same_thread=False,
                    timeout=self.busy_timeout,
                )
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=self.busy_timeout
            )
            # WAL: readers never block the writer and vice versa; the mode is
            # stored in the file, so read-only openers get it without asking.
            mode = str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
            if mode.lower() != "wal":
                conn.close()
                raise LedgerError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            return conn
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open the run ledger {self.path}: {exc}") from exc

    @staticmethod
    def sql(text: str) -> str:
        """Statements are written with ``?`` placeholders, SQLite's paramstyle."""
        return text

    @staticmethod
    def transient(exc: BaseException) -> bool:
        """Worth retrying: locked, busy, read-only file, disk full, I/O error.

        Anything else (a value SQLite cannot store, a constraint) fails the
        same way every time, so retrying it would only block the rows behind it.
        """
        return isinstance(exc, sqlite3.OperationalError)


__all__ = [
    "MIGRATIONS",
    "RUN_COLUMNS",
    "SQLITE_TABLES",
    "STATUSES",
    "LedgerError",
    "SchemaError",
    "SqliteBackend",
    "check_version",
    "current_version",
    "from_text",
    "migrate",
    "to_text",
]
