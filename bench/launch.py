"""Launch throughput of isolated runs vs the floor (raw fork) and the naive way (fresh python).

Run from the repository root: ``.venv/bin/python bench/launch.py [--reps 5] [--runs 300]``.
Prints a Markdown table (median and min-max runs/s over the repetitions, and
ratios) and the lateness of the schedd runner: time from ``launch()`` to the
task's "started" marker, p50/p90/p99.

Raw ``fork`` (one and two in flight) and ``posix_spawn`` are measured before
the runner starts its reader thread, so this process never forks while it has
threads; ``vs raw fork`` divides each row by the raw fork with the same number
of runs in flight, measured in this same process. The runner is measured
twice: with the child importing the task's module (a target whose module was
not preloaded), and with that module preloaded in the launcher
(``Runner(preload=...)``): the daemon preloads every plugin's task modules, so
the rows marked ``[daemon's path]`` are what the daemon does. The difference is
the import in a fresh fork, ~1.5 ms for ``tests.runner_tasks`` (``tests`` is a
namespace package, so finding it scans every ``sys.path`` entry, in a process
where every page written is a copy). Last, the built-in ``shell`` task running
``true`` with its module preloaded, as the daemon runs it: ``--shell-target``
names its target (``schedd_plugins.shell:run`` before the task modules were split).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scheduler.runner import Runner, RunRequest
from scheduler.types import RunContext

NOOP_MODULE = "tests.runner_tasks"
NOOP = f"{NOOP_MODULE}:noop"
SHELL_TARGET = "schedd_plugins.run_shell:run"
#: The shell task's params as the config loader hands them over (validated, defaults filled).
SHELL_TRUE = {"command": "true", "cwd": None, "env": {}}
FORK = "raw os.fork()+_exit+waitpid"
FORK_2 = "raw os.fork()+_exit+wait, 2 in flight"
FRESH = "fresh python -c 'import pluggy, yaml, loguru'"
#: Marks the rows that run a task the way the daemon does (its module preloaded).
DAEMON_PATH = " [daemon's path]"


def rate(n: int, fn: Callable[[int], None]) -> float:
    t0 = time.perf_counter()
    fn(n)
    return n / (time.perf_counter() - t0)


def raw_fork(n: int) -> None:
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)


def raw_fork_2(n: int) -> None:
    """Raw fork + ``_exit`` with two in flight: a new one as soon as either is reaped."""
    alive = started = 0
    while started < n or alive:
        while started < n and alive < 2:
            if os.fork() == 0:
                os._exit(0)
            started += 1
            alive += 1
        os.wait()
        alive -= 1


def spawn_true(n: int) -> None:
    for _ in range(n):
        pid = os.posix_spawn("/bin/true", ["true"], {})
        os.waitpid(pid, 0)


def fresh_python(n: int) -> None:
    for _ in range(n):
        subprocess.run([sys.executable, "-c", "import pluggy, yaml, loguru"], check=True)


class RunnerBench:
    def __init__(
        self,
        preload: tuple[str, ...] = (),
        target: str = NOOP,
        params: dict[str, object] | None = None,
    ) -> None:
        self.runner = Runner(on_line=lambda *a: None, on_event=lambda *a: None, preload=preload)
        self.runner.start()
        self.target = target
        self.params = params or {}
        self.lateness: list[float] = []
        self.seq = 0

    def _req(self) -> RunRequest:
        self.seq += 1
        run_id = f"bench-{self.seq}"
        ctx = RunContext(job_id="bench", run_id=run_id, task="noop", params=self.params)
        return RunRequest(run_id=run_id, job_id="bench", target=self.target, ctx=ctx, env={})

    def _record(self, h: object) -> None:
        started, launched = h.task_started, h.started_at.timestamp()  # type: ignore[attr-defined]
        if started is not None:
            self.lateness.append(started - launched)

    def sequential(self, n: int) -> None:
        for _ in range(n):
            h = self.runner.launch(self._req())
            res = h.wait(30)
            assert res is not None and res.status == "success", res
            self._record(h)

    def in_flight(self, n: int, width: int = 2) -> None:
        slots = threading.Semaphore(width)
        handles = []
        for _ in range(n):
            slots.acquire()
            h = self.runner.launch(self._req())
            h.add_done_callback(lambda _r: slots.release())
            handles.append(h)
        for h in handles:
            res = h.wait(30)
            assert res is not None and res.status == "success", res
            self._record(h)

    def close(self) -> None:
        self.runner.close(1.0)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--runs", type=int, default=300, help="runs per repetition (fast methods)")
    ap.add_argument("--python-runs", type=int, default=8, help="runs per repetition (fresh python)")
    ap.add_argument("--shell-target", default=SHELL_TARGET, help="the shell task's target")
    args = ap.parse_args()
    os.chdir(Path(__file__).resolve().parent.parent)

    results: dict[str, list[float]] = {}

    def measure(name: str, n: int, fn: Callable[[int], None]) -> None:
        fn(max(2, n // 10))  # warm up
        results[name] = [rate(n, fn) for _ in range(args.reps)]

    measure(FORK, args.runs, raw_fork)
    measure(FORK_2, args.runs, raw_fork_2)
    measure("posix_spawn /bin/true", args.runs, spawn_true)
    lateness: dict[str, list[float]] = {}
    shell_module = args.shell_target.partition(":")[0]
    setups = (
        ("no-op", "child imports target", (), NOOP, None),
        ("no-op", "target preloaded" + DAEMON_PATH, (NOOP_MODULE,), NOOP, None),
        (
            "shell `true`",
            "task module preloaded" + DAEMON_PATH,
            (shell_module,),
            args.shell_target,
            SHELL_TRUE,
        ),
    )
    for what, how, preload, target, params in setups:
        bench = RunnerBench(preload, target, params)
        try:
            for mode, fn in (("sequential", bench.sequential), ("2 in flight", bench.in_flight)):
                measure(f"schedd Runner {what}, {mode}, {how}", args.runs, fn)
                lateness[f"{what}, {mode}, {how}"], bench.lateness = bench.lateness, []
        finally:
            bench.close()
    measure(FRESH, args.python_runs, fresh_python)

    fork = {1: statistics.median(results[FORK]), 2: statistics.median(results[FORK_2])}
    fresh = statistics.median(results[FRESH])
    print(
        f"\n{os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"Linux {platform.release()}; {args.reps} reps\n"
    )
    print("| method | runs/s (median) | min-max | vs raw fork | vs fresh python |")
    print("|---|---:|---:|---:|---:|")
    for name, rates in results.items():
        med = statistics.median(rates)
        width = 2 if "2 in flight" in name else 1
        print(
            f"| {name} | {med:.0f} | {min(rates):.0f}-{max(rates):.0f} "
            f"| {med / fork[width]:.0%} | {med / fresh:.1f}x |"
        )
    print(
        "\n`vs raw fork`: against the raw fork with the same number in flight, measured above."
        f"\nRows marked{DAEMON_PATH} are the daemon's real path: it preloads plugin task modules"
        "\nin the launcher; `child imports target` imports the module in each fresh fork."
    )
    print("\nschedd lateness, launch() -> task started marker:\n")
    print("| mode | runs | p50 ms | p90 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|")
    for mode, values in lateness.items():
        ms = [v * 1000 for v in values]
        print(f"| {mode} | {len(ms)} | {pct(ms, 50):.2f} | {pct(ms, 90):.2f} | {pct(ms, 99):.2f} |")


if __name__ == "__main__":
    main()
