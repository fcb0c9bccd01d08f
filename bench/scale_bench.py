"""Config load and daemon start-up at scale: the "Scale and start-up" targets.

Run from the repository root: ``.venv/bin/python bench/scale_bench.py``
(``--sizes 1000,10000`` and ``--daemon-sizes 10000`` for a quicker run,
``--idle 20`` for the idle window in seconds).

Prints, per size, the wall time of ``schedd validate`` (a fresh process, as a
user runs it), the in-process ``load_config`` time, then for a real ``schedd
run`` the time until "started" appears in its log, its RSS, and the CPU it
uses while idle. The best of ``--repeat`` runs is shown for the short timings,
since other processes on a 2-core machine add noise that only ever slows a run
down. The small example config's ``schedd validate`` is compared with a bare
``python -c pass``.

The generated config mixes job kinds as real ones do: an ``H`` cron shell job
(H expands per job id, so every job parses its own expression), an interval
shell job with an argv list, and a weekday cron http job with params; every
job's params differ. The daemon runs a "quiet" variant of the same mix (the
same kinds, shapes and number of distinct schedules, but days or a month
away), so that the idle CPU it reports is the daemon's own and not that of
the hundreds of runs per minute the load-time mix would start.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEDD = [sys.executable, "-m", "scheduler.cli"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
EXAMPLE = ROOT / "config" / "example.yaml"


def write_config(path: Path, jobs: int, *, quiet: bool = False) -> None:
    # quiet: 1 January only (unless today is), and intervals of days (due at 00:00 UTC).
    day, unit = ("1 1", "d") if quiet else ("* *", "m")
    lines = ["timezone: Europe/Berlin", "jobs:"]
    for i in range(jobs):
        if i % 3 == 0:
            lines += [
                f"  job-{i}:",
                "    task: shell",
                f'    cron: "H {i % 24} {day} *"',
                f"    params: {{command: 'echo {i}'}}",
            ]
        elif i % 3 == 1:
            lines += [
                f"  job-{i}:",
                "    task: shell",
                f"    every: {i % 50 + 1}{unit}",
                f"    params: {{command: [echo, '{i}']}}",
            ]
        else:
            weekdays = "*" if quiet else "1-5"  # with both day fields set, either would do
            lines += [
                f"  job-{i}:",
                "    task: http",
                f'    cron: "*/5 {i % 24} {day} {weekdays}"',
                f"    params: {{url: 'http://127.0.0.1/{i}', expect_status: [200, 204]}}",
            ]
    path.write_text("\n".join(lines) + "\n")


def wall(cmd: list[str], repeat: int) -> float:
    """Best wall time of ``cmd`` over ``repeat`` runs; it must succeed."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - t0)
    return best


def load_time(path: Path, repeat: int) -> float:
    """Best in-process ``load_config`` time (plugins loaded once beforehand), of the
    scheduler package in this checkout (not whichever one is installed)."""
    if str(ROOT) not in sys.path[:1]:
        sys.path.insert(0, str(ROOT))
    from scheduler.config import load_config
    from scheduler.plugins import load_plugins

    _, registry = load_plugins()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        config = load_config(path, registry)
        best = min(best, time.perf_counter() - t0)
        del config
    return best


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def daemon(path: Path, idle: float) -> tuple[float, float, float]:
    """Start-up seconds, RSS in MB after the idle window, idle CPU percent."""
    with tempfile.TemporaryDirectory(prefix="schedd-scale-") as tmp:
        state = Path(tmp) / "state"
        log = state / "schedd.log"
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [*SCHEDD, "run", "-c", str(path), "--state-dir", str(state)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while not (log.exists() and " started: " in log.read_text()):
                if proc.poll() is not None:
                    raise SystemExit(f"the daemon exited during start-up ({proc.returncode})")
                if time.perf_counter() - t0 > 300:
                    raise SystemExit("the daemon did not start within 300 s")
                time.sleep(0.02)
            started = time.perf_counter() - t0
            time.sleep(2)  # let start-up stragglers (first fires, log flushes) settle
            c0, w0 = cpu_seconds(proc.pid), time.perf_counter()
            time.sleep(idle)
            cpu = (cpu_seconds(proc.pid) - c0) / (time.perf_counter() - w0) * 100
            rss = rss_mb(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return started, rss, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--daemon-sizes", default="10000,100000")
    ap.add_argument("--idle", type=float, default=20.0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    daemon_sizes = [int(s) for s in args.daemon_sizes.split(",") if s]
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    bare = wall([sys.executable, "-c", "pass"], 10)
    small = wall([*SCHEDD, "validate", "-c", str(EXAMPLE)], 10)
    print(
        f"small example: validate {small * 1000:.0f} ms, python -c pass {bare * 1000:.0f} ms,"
        f" ratio {small / bare:.1f}x (target <= 15x)"
    )
    with tempfile.TemporaryDirectory(prefix="schedd-scale-cfg-") as tmp:
        configs: dict[int, Path] = {}
        for n in sizes:
            configs[n] = Path(tmp) / f"jobs{n}.yaml"
            write_config(configs[n], n)
        for n in sizes:
            repeat = args.repeat if n < 100_000 else max(1, args.repeat - 1)
            v = wall([*SCHEDD, "validate", "-c", str(configs[n])], repeat)
            load = load_time(configs[n], repeat)
            print(f"{n:>7} jobs: validate {v:6.2f} s, load_config {load:6.2f} s")
        for n in daemon_sizes:
            quiet = Path(tmp) / f"quiet{n}.yaml"
            write_config(quiet, n, quiet=True)
            started, rss, cpu = daemon(quiet, args.idle)
            print(
                f"{n:>7} jobs: daemon started in {started:5.2f} s, RSS {rss:6.0f} MB,"
                f" idle CPU {cpu:5.2f} % over {args.idle:g} s"
            )
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
