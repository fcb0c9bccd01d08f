"""Fire lateness, start-up, RSS and idle CPU of a real `schedd run` with many jobs loaded.

Run from the repository root: ``.venv/bin/python bench/daemon_bench.py [--jobs 10000]``.

One daemon per run of this script (:func:`session`):

1. Start-up: ``schedd run`` on N filler jobs that never fire during the test
   (``cron: "H H 1 1 *"``, one distinct expression per job, as real configs
   have) plus probe jobs firing every second whose task prints
   ``time.time()`` as its first line; the clock runs from ``Popen`` until the
   daemon's log says ``started``.
2. Lateness: for ``--seconds``, lateness = that printed time - the scheduled
   slot (from the job log's ``started: ..., slot ...`` line). With ``--hog``
   a second window of the same length follows with a CPU hog pinned to one core.
3. Idle: the probes are paused (``schedd pause``), and the daemon's CPU time
   (from /proc/PID/stat) is sampled over ``--idle`` seconds in several
   sub-windows; then its RSS.

APScheduler's own in-process lateness (a BackgroundScheduler job function
recording ``time.time()`` - its scheduled time, with as many cron jobs
loaded) is measured afterwards as the reference (:func:`aps_reference_phases`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCHEDD = [sys.executable, "-m", "scheduler.cli"]
SCHEDD_RUN = [*SCHEDD, "run"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
SLOT_RE = re.compile(r"^(\S+ \S+) (\w+) schedd: started: \S+, slot (\S+),")
RAN_RE = re.compile(r"^\S+ \S+ (\w+) stdout: ran-at (\d+\.\d+)")
HOG = "while True: pass"


def write_config(path: Path, fillers: int, probes: int) -> None:
    lines = ["timezone: UTC", "jobs:"]
    for i in range(probes):
        lines += [
            f"  probe-{i}:",
            "    task: python",
            "    every: 1s",
            "    params: {target: 'bench.probe:mark'}",
        ]
    for i in range(fillers):
        lines += [
            f"  filler-{i}:",
            "    task: shell",
            '    cron: "H H 1 1 *"',
            "    params: {command: 'true'}",
        ]
    path.write_text("\n".join(lines) + "\n")


def start_daemon(
    config: Path, state: Path, timeout: float = 300.0
) -> tuple[subprocess.Popen[bytes], float]:
    """Start ``schedd run``; return it and the seconds until its log said ``started``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*SCHEDD_RUN, "-c", str(config), "--state-dir", str(state)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = state / "schedd.log"
    marker = f"schedd {proc.pid} started:"
    while not (log.exists() and marker in log.read_text(errors="replace")):
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited during start-up (exit {proc.returncode})")
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"daemon did not start within {timeout:.0f} s")
        time.sleep(0.01)
    return proc, time.perf_counter() - t0


def stop_daemon(proc: subprocess.Popen[bytes], timeout: float = 60) -> float:
    """SIGTERM and wait; the seconds it took to exit."""
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return time.perf_counter() - t0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident set (``VmRSS``) or its peak so far (``VmHWM``) of ``pid``, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc/PID/task/*/children)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def _cpu_total(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(p)
    return total


def tree_rss_mb(pid: int) -> float:
    """RSS of ``pid`` and its descendants (the launcher), shared pages counted in each."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):
            total += rss_mb(p)
    return total


def lateness_samples(state: Path) -> list[tuple[float, float]]:
    """(scheduled slot as a Unix time, lateness in ms) of every probe run in the job logs."""
    out: list[tuple[float, float]] = []
    for log in (state / "logs").glob("probe-*.log"):
        slots: dict[str, float] = {}
        for line in log.read_text().splitlines():
            m = SLOT_RE.match(line)
            if m:
                slots[m.group(2)] = datetime.fromisoformat(m.group(3)).timestamp()
                continue
            m = RAN_RE.match(line)
            if m and m.group(1) in slots:
                slot = slots[m.group(1)]
                out.append((slot, (float(m.group(2)) - slot) * 1000))
    return sorted(out)


def lateness_ms(state: Path) -> list[float]:
    return [ms for _, ms in lateness_samples(state)]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def start_hog(cpu: int | None = 0) -> subprocess.Popen[bytes]:
    """A busy-looping interpreter, pinned to ``cpu`` (None: anywhere)."""
    hog = subprocess.Popen([sys.executable, "-c", HOG])
    if cpu is not None:
        os.sched_setaffinity(hog.pid, {cpu})
    return hog


def stop_hog(hog: subprocess.Popen[bytes]) -> None:
    hog.kill()
    hog.wait()


def _pause_probes(state: Path, probes: int) -> None:
    ids = [f"probe-{i}" for i in range(probes)]
    subprocess.run(
        [*SCHEDD, "pause", *ids, "--state-dir", str(state)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=60,
    )


class _Worker(threading.Thread):
    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.outcome: dict[str, Any] = {}
        self.start()

    def run(self) -> None:
        try:
            self.outcome["during_idle"] = self.fn()
        except Exception:
            self.outcome["during_idle_error"] = traceback.format_exc()


def session(
    workdir: Path,
    jobs: int,
    *,
    probes: int = 2,
    seconds: float = 20.0,
    hog_seconds: float = 0.0,
    idle: float = 0.0,
    idle_windows: int = 5,
    settle: float = 2.0,
    after: Callable[[Path], Any] | None = None,
    during_idle: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """One daemon on ``jobs`` fillers + ``probes`` probes: start-up, lateness, idle.

    Phases, in order: lateness over ``seconds``; if ``hog_seconds``, lateness
    with a CPU hog pinned to core 0; if ``idle``, pause the probes, wait
    ``settle`` s, then CPU % of one core in ``idle_windows`` equal sub-windows
    of ``idle`` s in all; then ``after(state_dir)`` while the daemon still
    runs, probes paused (its result is returned as ``after``).

    ``during_idle()``, if given, runs in a thread while the idle window is
    sampled (and the window waits for it): for work that must not disturb the
    daemon's own CPU time, only share the clock. Its result is returned as
    ``during_idle``, an exception as ``during_idle_error``. Lateness samples are kept
    only for slots inside their window. Returns a JSON-able dict.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "schedd.yaml"
    state = workdir / "state"
    write_config(config, jobs, probes)
    out: dict[str, Any] = {"jobs": jobs, "probes": probes}
    proc, out["startup_s"] = start_daemon(config, state)
    hog = None
    try:
        out["rss_start_mb"] = rss_mb(proc.pid)
        windows: dict[str, tuple[float, float]] = {}
        if seconds > 0:
            t0 = time.time()
            time.sleep(seconds)
            windows["late"] = (t0, time.time())
        if hog_seconds > 0:
            hog = start_hog()
            time.sleep(0.2)
            t0 = time.time()
            time.sleep(hog_seconds)
            windows["late_hog"] = (t0, time.time())
            stop_hog(hog)
            hog = None
        out["rss_busy_mb"] = rss_mb(proc.pid)
        out["tree_rss_busy_mb"] = tree_rss_mb(proc.pid)
        if probes and (idle > 0 or after is not None):
            _pause_probes(state, probes)
        if idle > 0:
            time.sleep(settle)
            tree = [proc.pid, *descendants(proc.pid)]
            tree_c0 = _cpu_total(tree)
            per_window: list[float] = []
            worker = _Worker(during_idle) if during_idle is not None else None
            c0 = cpu_seconds(proc.pid)
            w0 = t_start = time.monotonic()
            for _ in range(idle_windows):
                time.sleep(idle / idle_windows)
                c1, w1 = cpu_seconds(proc.pid), time.monotonic()
                per_window.append((c1 - c0) / (w1 - w0) * 100)
                c0, w0 = c1, w1
            if worker is not None:
                worker.join()
                out.update(worker.outcome)
            out["idle_s"] = w0 - t_start
            out["idle_cpu_windows"] = per_window
            out["idle_cpu_pct"] = statistics.fmean(per_window)
            out["tree_idle_cpu_pct"] = (_cpu_total(tree) - tree_c0) / out["idle_s"] * 100
            out["rss_idle_mb"] = rss_mb(proc.pid)
            out["tree_rss_idle_mb"] = tree_rss_mb(proc.pid)
        if after is not None:
            out["after"] = after(state)
        out["rss_peak_mb"] = rss_mb(proc.pid, "VmHWM")
    finally:
        if hog is not None:
            stop_hog(hog)
        out["stop_s"] = stop_daemon(proc)
    samples = lateness_samples(state)
    for key, (a, b) in windows.items():
        out[key] = [ms for slot, ms in samples if a <= slot < b]
    return out


def aps_reference_phases(
    phases: list[tuple[int, bool]],
    seconds: float,
    probes: int = 2,
    interval: float = 1.0,
) -> list[list[float]]:
    """APScheduler's in-process lateness (ms), one list per ``(jobs loaded, CPU hog)`` phase.

    One BackgroundScheduler (default thread pool); before each phase it is
    paused and filled up to ``jobs`` cron jobs (``month=1, day=1``, a distinct
    trigger object each, never firing here). Each phase then schedules
    ``probes`` date jobs per slot, a slot every ``interval`` s for
    ``seconds``; each records ``time.time()`` - its slot. ``jobs`` must not
    decrease from one phase to the next.
    """
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.cron import CronTrigger

    late: list[float] = []

    def probe(scheduled: float) -> None:
        late.append((time.time() - scheduled) * 1000)

    sched = BackgroundScheduler(timezone="UTC")
    sched.start()
    loaded = 0
    results: list[list[float]] = []
    try:
        for jobs, hog_on in phases:
            sched.pause()
            for i in range(loaded, jobs):
                sched.add_job(lambda: None, CronTrigger(month=1, day=1, hour=i % 24, minute=i % 60))
            loaded = max(loaded, jobs)
            sched.resume()
            hog = start_hog() if hog_on else None
            try:
                time.sleep(0.1)
                start = time.time() + 0.2
                slots = int(seconds / interval)
                for k in range(slots):
                    when = start + k * interval
                    for _p in range(probes):
                        run_date = datetime.fromtimestamp(when).astimezone()
                        sched.add_job(probe, "date", run_date=run_date, args=[when])
                time.sleep(max(0.0, start - time.time() + slots * interval + 0.1))
            finally:
                if hog is not None:
                    stop_hog(hog)
            results.append(late[:])
            late.clear()
    finally:
        sched.shutdown(wait=False)
    return results


def aps_reference(seconds: float, jobs: int) -> list[float]:
    """APScheduler's in-process lateness (ms) with ``jobs`` cron jobs loaded, 2 probes/s."""
    return aps_reference_phases([(jobs, False)], seconds)[0]


def row(name: str, values: list[float]) -> str:
    if not values:
        return f"| {name} | 0 | - | - | - | - |"
    return (
        f"| {name} | {len(values)} | {statistics.median(values):.2f} | {pct(values, 0.9):.2f} "
        f"| {pct(values, 0.99):.2f} | {max(values):.2f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--probes", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--idle", type=float, default=30)
    ap.add_argument("--hog", action="store_true", help="add a lateness window with a CPU hog")
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, load {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        res = session(
            Path(tmp),
            args.jobs,
            probes=args.probes,
            seconds=args.seconds,
            hog_seconds=args.seconds if args.hog else 0.0,
            idle=args.idle,
        )
    phases = [(args.jobs, False)] + ([(args.jobs, True)] if args.hog else [])
    ref = aps_reference_phases(phases, min(args.seconds, 15), args.probes)

    print(f"\n{args.jobs} jobs loaded; lateness = scheduled slot -> task code running\n")
    print("| measure | n | p50 ms | p90 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|---:|")
    print(row("schedd: slot -> first line of task code in the isolated child", res["late"]))
    print(row("APScheduler in-process job function (reference)", ref[0]))
    if args.hog:
        print(row("schedd, CPU hog on one core", res["late_hog"]))
        print(row("APScheduler reference, CPU hog on one core", ref[1]))
    print("\n| daemon | value |\n|---|---:|")
    print(f"| start-up to 'started' (s) | {res['startup_s']:.2f} |")
    print(f"| RSS after start-up (MB) | {res['rss_start_mb']:.1f} |")
    print(f"| RSS while firing (MB) | {res['rss_busy_mb']:.1f} |")
    if args.idle > 0:
        print(f"| RSS idle (MB) | {res['rss_idle_mb']:.1f} |")
        print(f"| idle CPU over {args.idle:.0f}s (% of one core) | {res['idle_cpu_pct']:.2f} |")


if __name__ == "__main__":
    main()
