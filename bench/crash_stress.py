"""Kill the daemon with SIGKILL at random moments, again and again, then audit the ledger.

Run from the repository root: ``.venv/bin/python bench/crash_stress.py [--iterations 50]``.
The test suite runs a few iterations of the same loop (tests/test_crash.py).

Each iteration starts ``schedd run`` on the same state dir (so it first
recovers what the previous, killed daemon left behind), lets it work for a
random 0.3-2 s while short and long runs are in flight, and SIGKILLs it.
After the last iteration one daemon starts and stops cleanly, and the audit
proves: the ledger opens and passes ``PRAGMA integrity_check`` after every
kill, no (job, slot, attempt) has two runs, nothing is left ``running``, and
no process of any run is alive.
"""

from __future__ import annotations

import argparse
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEDD_RUN = [sys.executable, "-m", "scheduler.cli", "run"]
sys.path.insert(0, str(ROOT))

CONFIG = """\
jobs:
  quick:
    task: shell
    every: 1s
    params: {command: 'echo quick'}
  slow:
    task: shell
    every: 1s
    overlap: allow
    params: {command: 'echo slow; sleep 0.7; echo done'}
  escapee:
    task: shell
    every: 2s
    catchup: all
    params: {command: 'setsid sleep 30 & sleep 1'}
"""


@dataclass
class Audit:
    iterations: int = 0
    opened_clean: int = 0
    rows: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    left_running: int = 0
    lost: int = 0
    surviving_processes: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            self.opened_clean == self.iterations
            and self.duplicates == 0
            and self.left_running == 0
            and self.surviving_processes == 0
        )


def _start(config: Path, state: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [*SCHEDD_RUN, "-c", str(config), "--state-dir", str(state)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = state / "schedd.log"
    deadline = time.monotonic() + 30
    marker = f"schedd {proc.pid} started"
    while not (log.exists() and marker in log.read_text(errors="replace")):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"daemon did not start (exit {proc.poll()})")
        time.sleep(0.02)
    return proc


def _integrity(db: Path) -> bool:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return bool(conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok")
    finally:
        conn.close()


def run(
    iterations: int,
    seed: int = 0,
    workdir: Path | None = None,
    wait: tuple[float, float] = (0.3, 2.0),
) -> Audit:
    """``iterations`` start/SIGKILL cycles, each killing after a random ``wait`` range (s)."""
    from scheduler.recovery import run_processes

    rng = random.Random(seed)
    audit = Audit()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        config = Path(tmp) / "schedd.yaml"
        config.write_text(CONFIG)
        state = Path(tmp) / "state"
        db = state / "ledger.db"
        for _ in range(iterations):
            proc = _start(config, state)
            time.sleep(rng.uniform(*wait))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            audit.iterations += 1
            audit.opened_clean += _integrity(db)
        proc = _start(config, state)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        rows = conn.execute("SELECT run_id, status FROM runs").fetchall()
        audit.rows = len(rows)
        for _, status in rows:
            audit.statuses[status] = audit.statuses.get(status, 0) + 1
        audit.duplicates = conn.execute(
            "SELECT COUNT(*) FROM (SELECT job, scheduled_for, attempt FROM runs "
            "WHERE scheduled_for IS NOT NULL AND status NOT IN ('skipped', 'missed') "
            "GROUP BY job, scheduled_for, attempt HAVING COUNT(*) > 1)"
        ).fetchone()[0]
        audit.left_running = audit.statuses.get("running", 0)
        audit.lost = audit.statuses.get("lost", 0)
        ids = [r for r, _ in rows]
        conn.close()
        deadline = time.monotonic() + 10
        while run_processes(ids) and time.monotonic() < deadline:
            time.sleep(0.1)
        audit.surviving_processes = len(run_processes(ids))
    audit.seconds = time.monotonic() - t0
    return audit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    audit = run(args.iterations, args.seed)
    print("| measure | value |\n|---|---:|")
    print(f"| SIGKILL iterations | {audit.iterations} |")
    print(f"| ledger opened clean (integrity_check ok) | {audit.opened_clean} |")
    print(f"| runs recorded | {audit.rows} |")
    for status, n in sorted(audit.statuses.items()):
        print(f"| status {status} | {n} |")
    print(f"| slots with two runs | {audit.duplicates} |")
    print(f"| rows left running | {audit.left_running} |")
    print(f"| run processes alive afterwards | {audit.surviving_processes} |")
    print(f"| wall time (s) | {audit.seconds:.1f} |")
    print(f"\nresult: {'PASS' if audit.ok else 'FAIL'}")
    sys.exit(0 if audit.ok else 1)


if __name__ == "__main__":
    main()
