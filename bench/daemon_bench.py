"""Fire lateness, start-up, RSS and idle CPU of a real `schedd run` with many jobs loaded.

Run from the repository root: ``.venv/bin/python bench/daemon_bench.py [--jobs 10000]``.

Phase 1 (lateness): N filler jobs that never fire during the test (``cron:
"H H 1 1 *"``, one distinct expression per job, as real configs have) plus
probe jobs firing every second whose task prints ``time.time()`` as its first
line. Lateness = that time - the scheduled slot. APScheduler's own in-process
lateness (a BackgroundScheduler job function recording time.time() - its
scheduled time) is measured in the same run as the reference.

Phase 2 (idle): the filler jobs alone; CPU seconds used by the daemon over
the window (from /proc/PID/stat) and its RSS.

Optionally ``--hog`` runs a CPU hog on one core during phase 1.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEDD_RUN = [sys.executable, "-m", "scheduler.cli", "run"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
SLOT_RE = re.compile(r"^(\S+ \S+) (\w+) schedd: started: \S+, slot (\S+),")
RAN_RE = re.compile(r"^\S+ \S+ (\w+) stdout: ran-at (\d+\.\d+)")


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


def start_daemon(config: Path, state: Path) -> tuple[subprocess.Popen[bytes], float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*SCHEDD_RUN, "-c", str(config), "--state-dir", str(state)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = state / "schedd.log"
    while not (log.exists() and "started:" in log.read_text()):
        if proc.poll() is not None:
            raise SystemExit("daemon exited during start-up")
        time.sleep(0.02)
    return proc, time.perf_counter() - t0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def lateness_ms(state: Path) -> list[float]:
    out: list[float] = []
    for log in (state / "logs").glob("probe-*.log"):
        slots: dict[str, float] = {}
        for line in log.read_text().splitlines():
            m = SLOT_RE.match(line)
            if m:
                slots[m.group(2)] = datetime.fromisoformat(m.group(3)).timestamp()
                continue
            m = RAN_RE.match(line)
            if m and m.group(1) in slots:
                out.append((float(m.group(2)) - slots[m.group(1)]) * 1000)
    return out


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def aps_reference(seconds: float, jobs: int) -> list[float]:
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.cron import CronTrigger

    late: list[float] = []

    def probe(scheduled: float) -> None:
        late.append((time.time() - scheduled) * 1000)

    sched = BackgroundScheduler(timezone="UTC")
    for i in range(jobs):
        sched.add_job(lambda: None, CronTrigger(month=1, day=1, hour=i % 24, minute=i % 60))
    sched.start()
    start = int(time.time()) + 1
    for k in range(int(seconds)):
        for _p in range(2):
            when = datetime.fromtimestamp(start + k).astimezone()
            sched.add_job(probe, "date", run_date=when, args=[start + k])
    time.sleep(seconds + 1)
    sched.shutdown(wait=False)
    return late


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
    ap.add_argument("--hog", action="store_true")
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, load {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        config = tmpdir / "schedd.yaml"
        write_config(config, args.jobs, args.probes)
        hog = None
        if args.hog:
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        proc, startup = start_daemon(config, tmpdir / "state1")
        time.sleep(args.seconds)
        rss_busy = rss_mb(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        if hog:
            hog.kill()
        late = lateness_ms(tmpdir / "state1")
        ref = aps_reference(min(args.seconds, 15), args.jobs)

        write_config(config, args.jobs, 0)
        proc, startup_idle = start_daemon(config, tmpdir / "state2")
        time.sleep(3)
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(args.idle)
        idle_cpu = (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0) * 100
        rss_idle = rss_mb(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)

    hog_note = ", CPU hog on one core" if args.hog else ""
    print(f"\n{args.jobs} jobs loaded{hog_note}; lateness = scheduled slot -> task code running\n")
    print("| measure | n | p50 ms | p90 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|---:|")
    print(row("schedd: slot -> first line of task code in the isolated child", late))
    print(row("APScheduler in-process job function (reference)", ref))
    print("\n| daemon | value |\n|---|---:|")
    print(f"| start-up to 'started' (s) | {startup:.2f} (idle run: {startup_idle:.2f}) |")
    print(f"| RSS while firing (MB) | {rss_busy:.1f} |")
    print(f"| RSS idle (MB) | {rss_idle:.1f} |")
    print(f"| idle CPU over {args.idle:.0f}s (% of one core) | {idle_cpu:.2f} |")


if __name__ == "__main__":
    main()
