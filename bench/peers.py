"""Launch-throughput floors and peers that ``bench/launch.py`` does not measure.

Run from the repository root: ``.venv/bin/python bench/peers.py [--reps 5] [--runs 300]``.

* Floors with ``width`` runs in flight: raw ``os.fork()`` + ``_exit`` and
  ``posix_spawn`` of ``/bin/true``, reaped with ``os.wait()`` so a new one
  starts as soon as any finishes (``bench/launch.py`` measures them one at a
  time only).
* Peer: APScheduler 3 ``BackgroundScheduler`` with its ``ProcessPoolExecutor``
  (``max_workers=width``) running a no-op job function: completed jobs/s, with
  at most ``width`` jobs submitted and not yet finished. The pool's worker
  processes are reused, so this is the price of APScheduler dispatch and
  pickling, not of process creation (no isolation between runs).

Call this in a fresh process (nothing else loaded, no threads before the
floors): ``bench/run.py`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _timed(n: int, fn: Callable[[int], None]) -> float:
    t0 = time.perf_counter()
    fn(n)
    return n / (time.perf_counter() - t0)


def _keep_in_flight(n: int, width: int, start: Callable[[], int]) -> None:
    """Start ``n`` processes with ``start()``, never more than ``width`` alive, reap all."""
    alive = 0
    started = 0
    while started < n or alive:
        while started < n and alive < width:
            start()
            started += 1
            alive += 1
        os.wait()
        alive -= 1


def _fork_exit() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    return pid


def _spawn_true() -> int:
    return os.posix_spawn("/bin/true", ["true"], {})


def fork_rate(n: int, width: int = 1) -> float:
    """Raw ``os.fork()`` + ``os._exit(0)`` + wait, ``width`` in flight: runs/s."""
    return _timed(n, lambda k: _keep_in_flight(k, width, _fork_exit))


def spawn_rate(n: int, width: int = 1) -> float:
    """``posix_spawn("/bin/true")`` + wait, ``width`` in flight: runs/s."""
    return _timed(n, lambda k: _keep_in_flight(k, width, _spawn_true))


class ApsPool:
    """APScheduler 3 BackgroundScheduler + ProcessPoolExecutor running ``bench.probe:noop``."""

    def __init__(self, width: int) -> None:
        from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED
        from apscheduler.executors.pool import ProcessPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        self.width = width
        self.errors = 0
        self._slots = threading.Semaphore(width)
        self._left = 0
        self._all_done = threading.Event()
        self._lock = threading.Lock()
        self.sched = BackgroundScheduler(
            timezone="UTC",
            executors={"default": ProcessPoolExecutor(max_workers=width)},
            job_defaults={"misfire_grace_time": None, "coalesce": False, "max_instances": 1000},
        )
        self.sched.add_listener(self._done, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
        self.sched.start()

    def _done(self, event: Any) -> None:
        if getattr(event, "exception", None) is not None:
            self.errors += 1
        self._slots.release()
        with self._lock:
            self._left -= 1
            if self._left == 0:
                self._all_done.set()

    def run(self, n: int) -> None:
        """Submit ``n`` no-op jobs, at most ``width`` unfinished; return when all completed."""
        with self._lock:
            self._left = n
            self._all_done.clear()
        for _ in range(n):
            self._slots.acquire()
            self.sched.add_job("bench.probe:noop")
        if not self._all_done.wait(120):
            raise RuntimeError("APScheduler process pool: jobs did not complete")

    def close(self) -> None:
        self.sched.shutdown(wait=True)


def aps_pool_rates(runs: int, reps: int, width: int) -> list[float]:
    pool = ApsPool(width)
    try:
        pool.run(max(2 * width, runs // 10))  # warm up: the pool spawns its workers lazily
        rates = [_timed(runs, pool.run) for _ in range(reps)]
    finally:
        pool.close()
    if pool.errors:
        raise RuntimeError(f"APScheduler process pool: {pool.errors} jobs failed")
    return rates


def measure(runs: int, reps: int, widths: tuple[int, ...] = (1, 2)) -> dict[str, list[float]]:
    """Every floor and peer above, ``reps`` repetitions of ``runs`` runs: runs/s per repetition.

    Keys: ``fork/<width>``, ``spawn/<width>``, ``aps-pool/<width>``. The floors
    go first, before APScheduler starts any thread in this process.
    """
    out: dict[str, list[float]] = {}
    for width in widths:
        for name, fn in (("fork", fork_rate), ("spawn", spawn_rate)):
            fn(max(2, runs // 10), width)  # warm up
            out[f"{name}/{width}"] = [fn(runs, width) for _ in range(reps)]
    for width in widths:
        out[f"aps-pool/{width}"] = aps_pool_rates(runs, reps, width)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--json", action="store_true", help="print the raw rates as JSON")
    args = ap.parse_args()
    result = measure(args.runs, args.reps)
    if args.json:
        print(json.dumps(result))
        return
    print("| method/in flight | runs/s (median) | min-max |\n|---|---:|---:|")
    for name, rates in result.items():
        print(f"| {name} | {statistics.median(rates):.0f} | {min(rates):.0f}-{max(rates):.0f} |")


if __name__ == "__main__":
    main()
