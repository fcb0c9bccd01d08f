"""Run-ledger throughput (started + record per run) and the cost of ``schedd history``'s read path.

Run from the repository root: ``.venv/bin/python bench/ledger_bench.py [--runs 20000]``.

Write side: ``--runs`` RunRecords go through ``started()`` then ``record()``
(two rows handed over per run, one table row each) as fast as one thread can
hand them over; the clock stops when ``flush()`` returns, i.e. when every
row is committed with the configured durability. Reported: runs/s, commits
and rows per commit (the batching in effect), and the caller's cost per call.
Then a paced load (``--rate`` runs/s): commits/s, and how long a row waits
between hand-over and commit (what a SIGKILL of the daemon can lose).

Read side: a fresh interpreter that imports :mod:`scheduler.ledger`, opens the
file read-only and fetches ``history(limit=50)``, against bare ``python -c
pass``; medians of ``--reps`` runs. ``--sqlalchemy-python PATH`` also times the
same query through SQLAlchemy Core in an interpreter that has it installed.
"""

from __future__ import annotations

import argparse
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scheduler.ledger import Ledger  # noqa: E402
from scheduler.records import RunRecord  # noqa: E402

T0 = datetime(2027, 1, 1, tzinfo=UTC)


def write(path: Path, runs: int, jobs: int, first: int = 0, **options: object) -> dict[str, float]:
    led = Ledger.open(path, **options)  # type: ignore[arg-type]
    calls: list[float] = []
    t0 = time.perf_counter()
    for i in range(first, first + runs):
        job = f"job{i % jobs:04d}"
        slot = T0 + timedelta(minutes=i // jobs)
        start = slot + timedelta(seconds=1)
        c0 = time.perf_counter()
        led.started(RunRecord(f"r{i:09d}", job, slot, "success", started_at=start, pid=i), i)
        led.record(
            RunRecord(
                f"r{i:09d}",
                job,
                slot,
                "success",
                started_at=start,
                ended_at=start + timedelta(seconds=2),
                exit_code=0,
            )
        )
        calls.append(time.perf_counter() - c0)
    handed = time.perf_counter() - t0
    assert led.flush(120), "writer did not catch up"
    total = time.perf_counter() - t0
    stats = led.stats()
    led.close()
    calls.sort()
    return {
        "runs_s": runs / total,
        "handover_s": runs / handed,
        "commits": stats["commits"],
        "rows_per_commit": 2 * runs / max(1, stats["commits"]),
        "call_p50_us": calls[len(calls) // 2] * 1e6 / 2,
        "call_p99_us": calls[int(len(calls) * 0.99)] * 1e6 / 2,
    }


def throughput(runs: int, reps: int, jobs: int = 100) -> list[float]:
    """Runs/s of the default ledger (:func:`write`), one fresh file per repetition."""
    rates = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(reps):
            rates.append(write(Path(tmp) / f"t{rep}.db", runs, jobs)["runs_s"])
    return rates


def paced(path: Path, rate: float, seconds: float, **options: object) -> dict[str, float]:
    """``rate`` runs/s for ``seconds``; every ~2 ms, count the runs handed over but not committed.

    That backlog is what a SIGKILL of the daemon would lose at that instant.
    """
    led = Ledger.open(path, **options)  # type: ignore[arg-type]
    watch = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    behind: list[int] = []
    t0 = time.perf_counter()
    i = 0
    while (now := time.perf_counter()) - t0 < seconds:
        while i < (now - t0) * rate:
            slot = T0 + timedelta(minutes=i)
            led.started(RunRecord(f"r{i:09d}", "j", slot, "success", started_at=slot), None)
            led.record(RunRecord(f"r{i:09d}", "j", slot, "success", started_at=slot, ended_at=slot))
            i += 1
        behind.append(i - watch.execute("SELECT COUNT(*) FROM runs").fetchone()[0])
        time.sleep(0.002)
    led.flush(10)
    stats = led.stats()
    led.close()
    watch.close()
    behind.sort()
    return {
        "commits_s": stats["commits"] / seconds,
        "rows_per_commit": 2 * i / max(1, stats["commits"]),
        "behind_p50": behind[len(behind) // 2],
        "behind_max": behind[-1],
    }


def fresh(cmd: list[str], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


READ = (
    "import sys; from pathlib import Path; from scheduler.ledger import Ledger; "
    "rows = Ledger.open(Path(sys.argv[1]), readonly=True).history({args}); "
    "assert len(rows) == 50"
)
SQLA = (
    "import sys, sqlalchemy as sa; "
    "e = sa.create_engine('sqlite:///file:' + sys.argv[1] + '?mode=ro&uri=true'); "
    "c = e.connect(); rows = c.execute(sa.text('SELECT * FROM runs ORDER BY created_at DESC, "
    "run_id DESC LIMIT 50')).fetchall(); assert len(rows) == 50"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20_000)
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--rate", type=float, default=1000.0, help="runs/s for the paced test")
    ap.add_argument("--history-rows", type=int, default=100_000, help="rows in the read test file")
    ap.add_argument("--sqlalchemy-python", metavar="PATH", help="a python with sqlalchemy")
    args = ap.parse_args()
    print(
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"{platform.machine()}, {args.runs} runs over {args.jobs} jobs\n"
    )
    configs: list[tuple[str, dict[str, object]]] = [
        ("WAL, sync NORMAL, group commit <= 500 rows (default)", {}),
        ("WAL, sync NORMAL, <= 500 rows, 20 ms linger", {"batch_wait": 0.02}),
        ("WAL, sync NORMAL, 1 row per commit", {"batch_rows": 1}),
        ("WAL, sync FULL, group commit <= 500 rows", {"synchronous": "FULL"}),
        ("WAL, sync FULL, 1 row per commit", {"synchronous": "FULL", "batch_rows": 1}),
    ]
    print(
        "| durability and batching | runs/s | hand-over runs/s | commits | rows/commit "
        "| call p50 µs | call p99 µs |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in configs:
            r = write(Path(tmp) / f"w{len(name)}.db", args.runs, args.jobs, **options)
            print(
                f"| {name} | {r['runs_s']:,.0f} | {r['handover_s']:,.0f} | {r['commits']:.0f} "
                f"| {r['rows_per_commit']:.0f} | {r['call_p50_us']:.1f} | {r['call_p99_us']:.1f} |"
            )
        print(
            f"\n| paced at {args.rate:g} runs/s for 3 s | commits/s | rows/commit "
            "| runs not yet committed: p50 | max |"
        )
        print("|---|---:|---:|---:|---:|")
        for name, options in configs[:2] + configs[3:4]:
            r = paced(Path(tmp) / f"p{len(name)}.db", args.rate, 3.0, **options)
            print(
                f"| {name} | {r['commits_s']:.0f} | {r['rows_per_commit']:.1f} "
                f"| {r['behind_p50']:.0f} | {r['behind_max']:.0f} |"
            )
        db = Path(tmp) / "ledger.db"
        t0 = time.perf_counter()
        write(db, args.history_rows, args.jobs)
        print(f"\n(read-test file: {args.history_rows:,} rows in {time.perf_counter() - t0:.1f} s)")
        cases = [
            ("python -c pass", [sys.executable, "-c", "pass"]),
            ("python -c 'import sqlite3'", [sys.executable, "-c", "import sqlite3"]),
            (
                "import + open + history(limit=50)",
                [sys.executable, "-c", READ.format(args="limit=50"), str(db)],
            ),
            (
                "... history(job, limit=50)",
                [sys.executable, "-c", READ.format(args="'job0007', limit=50"), str(db)],
            ),
            (
                "... history(status='success', limit=50)",
                [sys.executable, "-c", READ.format(args="status='success', limit=50"), str(db)],
            ),
        ]
        if args.sqlalchemy_python:
            cases.append(("SQLAlchemy: python -c pass", [args.sqlalchemy_python, "-c", "pass"]))
            cases.append(
                (
                    "SQLAlchemy: import + engine + same query",
                    [args.sqlalchemy_python, "-c", SQLA, str(db)],
                )
            )
        print(f"\n| fresh interpreter ({args.reps} runs, median) | ms |")
        print("|---|---:|")
        for name, cmd in cases:
            print(f"| {name} | {fresh(cmd, args.reps):.1f} |")
        with Ledger.open(db, readonly=True) as led:
            for name, call in (
                ("history(limit=50)", lambda: led.history(limit=50)),
                ("history(job, limit=50)", lambda: led.history("job0007", limit=50)),
                ("last_outcomes()", led.last_outcomes),
                ("last_slots()", led.last_slots),
            ):
                t0 = time.perf_counter()
                for _ in range(5):
                    call()
                print(
                    f"\nin-process {name}: {(time.perf_counter() - t0) / 5 * 1000:.2f} ms", end=""
                )
        print()


if __name__ == "__main__":
    main()
