"""Run every schedd benchmark and write a report: Markdown tables, PNG plots, raw JSON.

Run from anywhere (the repository's venv, matplotlib installed)::

    .venv/bin/python bench/run.py            # full: ~10-15 minutes
    .venv/bin/python bench/run.py --quick    # under a minute; small sizes, short windows

Results go to ``bench/results/<date>_<cores>cpu_py<version>_linux<kernel>_<commit>[_quick]/``
(``--out`` chooses the parent folder): ``report.md``, ``lateness.png``,
``launch.png``, ``results.json`` (every raw sample) and ``launch.txt`` (the
output of ``bench/launch.py``). ``bench/README.md`` explains every number.

Every timing is repeated and reported as the median and its spread (min-max
over the repetitions); every ratio is against a baseline measured in the same
run. Measurements that time this process's own work run in a fresh
interpreter (``run.py --call NAME``), so one does not inherit another's
memory or threads.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import daemon_bench  # noqa: E402  (stdlib only at import time)

PYTHON = sys.executable
SCHEDD_SCRIPT = Path(PYTHON).with_name("schedd")
SCHEDD = [str(SCHEDD_SCRIPT)] if SCHEDD_SCRIPT.exists() else [PYTHON, "-m", "scheduler.cli"]
EXAMPLE = ROOT / "config" / "example.yaml"
RESULT_MARK = "@@bench-result "

#: Targets, exactly as set for the project (never loosened here).
TARGET_RUNS_S = 150.0
TARGET_FORK_SHARE = 0.50
TARGET_P50_MS = 5.0
TARGET_P99_MS = 25.0
TARGET_LOAD_S = 5.0
TARGET_RSS_MB = 300.0
TARGET_IDLE_PCT = 1.0
TARGET_CLI_X = 4.0
TARGET_VALIDATE_X = 15.0
TARGET_LEDGER = 1000.0


@dataclass(frozen=True)
class Profile:
    """Sizes, repetitions and windows of one run of the whole suite."""

    name: str
    launch_reps: int
    launch_runs: int
    launch_python_runs: int
    lat_sizes: tuple[int, ...]
    lat_reps: int
    lat_seconds: float
    hog_size: int
    scale_sizes: tuple[int, ...]
    idle_seconds: float
    idle_windows: int
    settle: float
    aps_reps: int
    aps_seconds: float
    aps_interval: float
    validate_reps: dict[int, int]
    load_reps: dict[int, int]
    cli_reps: int
    ledger_runs: int
    ledger_reps: int
    crash_iterations: int
    crash_wait: tuple[float, float]
    probes: int = 2
    big_lat_seconds: float = 0.0  # lateness window at sizes above 10k (0: none)
    big_reps: int = 1  # daemons started at sizes above 10k (start-up and RSS each)
    cli_size: int = 1000  # filler jobs of the daemon `schedd status` talks to
    #: Time `schedd validate` and load_config while the daemon of that size idles (they
    #: share the clock, not the daemon's CPU time, which is counted per process).
    load_during_idle: bool = False
    #: One untimed round of the CLI commands first (page cache, .pyc files).
    cli_warmup: bool = True
    #: The hostile-plugin soak (bench/hostile_bench.py): quiet baseline and hostile-mix
    #: seconds, then warm-up runs and the runs the daemon's fds/threads/RSS are compared over.
    hostile_quiet: float = 20.0
    hostile_seconds: float = 60.0
    hostile_warm_up: int = 200
    hostile_runs: int = 5000


FULL = Profile(
    name="full",
    launch_reps=5,
    launch_runs=300,
    launch_python_runs=8,
    lat_sizes=(0, 1000, 10_000),
    lat_reps=3,
    lat_seconds=15.0,
    hog_size=10_000,
    scale_sizes=(1000, 10_000, 100_000),
    idle_seconds=30.0,
    idle_windows=6,
    settle=3.0,
    aps_reps=3,
    aps_seconds=6.0,
    aps_interval=0.25,
    validate_reps={1000: 11, 10_000: 11, 100_000: 3},
    load_reps={1000: 5, 10_000: 5, 100_000: 3},
    cli_reps=15,
    ledger_runs=20_000,
    ledger_reps=5,
    crash_iterations=50,
    crash_wait=(0.3, 2.0),
    big_lat_seconds=15.0,
    big_reps=3,
)

QUICK = Profile(
    name="quick",
    launch_reps=3,
    launch_runs=25,
    launch_python_runs=2,
    lat_sizes=(0, 1000, 10_000),
    lat_reps=1,
    lat_seconds=2.2,
    hog_size=10_000,
    scale_sizes=(1000, 10_000),
    idle_seconds=5.0,
    idle_windows=5,
    settle=0.5,
    aps_reps=1,
    aps_seconds=1.0,
    aps_interval=0.1,
    validate_reps={1000: 3, 10_000: 2},
    load_reps={1000: 2, 10_000: 1},
    cli_reps=5,
    ledger_runs=2000,
    ledger_reps=3,
    crash_iterations=3,
    crash_wait=(0.1, 0.4),
    load_during_idle=True,
    cli_warmup=False,
    hostile_quiet=3.0,
    hostile_seconds=6.0,
    hostile_warm_up=20,
    hostile_runs=200,
)

#: Seconds, not minutes: for a smoke test of the harness; the numbers mean nothing.
TINY = Profile(
    name="tiny",
    launch_reps=2,
    launch_runs=5,
    launch_python_runs=1,
    lat_sizes=(0, 10),
    lat_reps=1,
    lat_seconds=1.5,
    hog_size=10,
    scale_sizes=(10,),
    idle_seconds=0.5,
    idle_windows=2,
    settle=0.2,
    aps_reps=1,
    aps_seconds=0.5,
    aps_interval=0.25,
    validate_reps={10: 1},
    load_reps={10: 1},
    cli_reps=2,
    ledger_runs=100,
    ledger_reps=2,
    crash_iterations=1,
    crash_wait=(0.1, 0.2),
    cli_size=10,
    hostile_quiet=1.0,
    hostile_seconds=2.0,
    hostile_warm_up=5,
    hostile_runs=20,
)

PROFILES = {p.name: p for p in (FULL, QUICK, TINY)}


# ---- small helpers ----------------------------------------------------------------------
def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1) by nearest rank; ``nan`` for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and count of repeated measurements."""
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def dist(values: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max and count of a latency sample."""
    return {
        "n": len(values),
        "p50": pct(values, 0.5),
        "p90": pct(values, 0.9),
        "p99": pct(values, 0.99),
        "max": max(values) if values else float("nan"),
    }


def size_label(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def timed_cmd(cmd: list[str], timeout: float = 600) -> float:
    """Wall seconds of one run of ``cmd`` (output discarded); raises if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=timeout)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {' / '.join(err)}")
    return elapsed


def isolated(name: str, timeout: float = 1800, **kwargs: Any) -> Any:
    """Call ``CALLS[name](**kwargs)`` in a fresh interpreter; return its JSON result."""
    proc = subprocess.run(
        [PYTHON, str(Path(__file__).resolve()), "--call", name, "--kwargs", json.dumps(kwargs)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
    raise RuntimeError(f"{name} (exit {proc.returncode}) returned nothing:\n{tail}")


# ---- measurements run in a fresh interpreter (run.py --call NAME) --------------------------
def load_config_times(path: str, reps: int) -> dict[str, Any]:
    """In-process ``load_plugins()`` once, then ``load_config(path)`` ``reps`` times (seconds).

    The example config is loaded first, untimed in the result's ``times``, so
    the lazy imports (pydantic models, APScheduler triggers) are paid before
    the clock runs; ``first_s`` is that warm-up.
    """
    import gc
    import resource

    t0 = time.perf_counter()
    from scheduler.config import load_config
    from scheduler.plugins import load_plugins

    _, registry = load_plugins()
    plugins_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_config(EXAMPLE, registry)
    first_s = time.perf_counter() - t0
    times: list[float] = []
    jobs = 0
    for _ in range(reps):
        gc.collect()
        t0 = time.perf_counter()
        config = load_config(path, registry)
        times.append(time.perf_counter() - t0)
        jobs = len(config.jobs)
        del config
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "times": times,
        "jobs": jobs,
        "imports_plugins_s": plugins_s,
        "first_s": first_s,
        "peak_rss_mb": peak,
    }


def crash_audit(iterations: int, wait: list[float]) -> dict[str, Any]:
    from bench import crash_stress

    audit = crash_stress.run(iterations, wait=(wait[0], wait[1]))
    return {**dataclasses.asdict(audit), "ok": audit.ok}


def ledger_rates(runs: int, reps: int) -> list[float]:
    from loguru import logger

    logger.remove()  # the ledger logs its schema migration at INFO
    from bench import ledger_bench

    return ledger_bench.throughput(runs, reps)


def peers_rates(runs: int, reps: int) -> dict[str, list[float]]:
    from bench import peers

    return peers.measure(runs, reps)


def aps_reference(phases: list[list[Any]], seconds: float, interval: float) -> list[list[float]]:
    return daemon_bench.aps_reference_phases(
        [(int(j), bool(h)) for j, h in phases], seconds, 2, interval
    )


def hostile_soak(quiet: float, seconds: float, warm_up: int, runs: int) -> dict[str, Any]:
    from bench import hostile_bench

    with tempfile.TemporaryDirectory(prefix="schedd-hostile-") as tmp:
        return hostile_bench.run(Path(tmp), quiet, seconds, warm_up, runs)


CALLS: dict[str, Callable[..., Any]] = {
    "load_config": load_config_times,
    "hostile": hostile_soak,
    "crash": crash_audit,
    "ledger": ledger_rates,
    "peers": peers_rates,
    "aps_reference": aps_reference,
}


# ---- the machine and the code under test ------------------------------------------------
def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.rstrip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def busy_tests() -> int:
    """How many pytest processes are running on this machine (other people's test runs)."""
    n = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"pytest" in cmd:
            n += 1
    return n


def machine() -> dict[str, Any]:
    dirty = [line for line in _git("status", "--porcelain").splitlines() if line.strip()]
    return {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "system": platform.system(),
        "commit": _git("rev-parse", "HEAD") or "unknown",
        "commit_short": _git("rev-parse", "--short", "HEAD") or "unknown",
        "dirty_files": dirty,
        "load_start": os.getloadavg(),
    }


def source_mtimes() -> dict[str, float]:
    """Modification time of every Python file of the code under test."""
    out: dict[str, float] = {}
    for folder in ("scheduler", "plugins"):
        for path in (ROOT / folder).rglob("*.py"):
            with contextlib.suppress(OSError):
                out[str(path.relative_to(ROOT))] = path.stat().st_mtime
    return out


def changed_sources(before: dict[str, float]) -> list[str]:
    after = source_mtimes()
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def result_dir(parent: Path, info: dict[str, Any], profile: Profile) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    commit = info["commit_short"] + ("-dirty" if info["dirty_files"] else "")
    kernel = re.sub(r"[^A-Za-z0-9.]+", "-", info["kernel"])
    name = f"{stamp}_{info['cores']}cpu_py{info['python']}_linux{kernel}_{commit}"
    if profile.name != "full":
        name += f"_{profile.name}"
    path = parent / name
    path.mkdir(parents=True, exist_ok=False)
    return path


# ---- sections ---------------------------------------------------------------------------
TABLE_ROW = re.compile(r"^\|(.+)\|\s*$")


def parse_tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table in ``text``: a list of rows (header first), cells stripped."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in text.splitlines():
        m = TABLE_ROW.match(line.strip())
        if m:
            cells = [c.strip() for c in m.group(1).split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def parse_launch(text: str) -> dict[str, Any]:
    """The throughput rows and the lateness rows of ``bench/launch.py``'s output."""
    rows: list[dict[str, Any]] = []
    lateness: list[dict[str, Any]] = []
    for table in parse_tables(text):
        header = [h.lower() for h in table[0]]
        if any("runs/s" in h for h in header):
            for cells in table[1:]:
                lo, _, hi = cells[2].partition("-")
                rows.append(
                    {
                        "name": cells[0],
                        "median": float(cells[1].replace(",", "")),
                        "min": float(lo.replace(",", "")),
                        "max": float((hi or lo).replace(",", "")),
                    }
                )
        elif any("p50" in h for h in header):
            for cells in table[1:]:
                lateness.append(dict(zip(header, cells, strict=False)))
    if not rows:
        raise RuntimeError("no throughput table found in bench/launch.py's output")
    return {"rows": rows, "lateness": lateness}


def classify_launch_row(name: str) -> tuple[str, int]:
    """(kind, runs in flight) of a ``bench/launch.py`` row: floor, schedd or peer."""
    low = name.lower()
    width = 2 if "2 in flight" in low else 1
    if "fork" in low or "posix_spawn" in low:
        return "floor", width
    if "schedd" in low or "runner" in low:
        return "schedd", width
    return "peer", width


def section_launch(p: Profile, out: Path) -> dict[str, Any]:
    peers = isolated("peers", runs=p.launch_runs, reps=p.launch_reps)
    cmd = [
        PYTHON,
        str(BENCH / "launch.py"),
        "--reps",
        str(p.launch_reps),
        "--runs",
        str(p.launch_runs),
        "--python-runs",
        str(p.launch_python_runs),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    (out / "launch.txt").write_text(f"$ {' '.join(cmd)}\n\n{proc.stdout}\n{proc.stderr}")
    if proc.returncode != 0:
        raise RuntimeError(f"bench/launch.py exited {proc.returncode}: {proc.stderr[-500:]}")
    parsed = parse_launch(proc.stdout)
    rows: list[dict[str, Any]] = []
    for r in parsed["rows"]:
        kind, width = classify_launch_row(r["name"])
        rows.append({**r, "kind": kind, "width": width, "source": "launch.py"})
    names = {
        "fork": "raw os.fork()+_exit+wait",
        "spawn": "posix_spawn /bin/true + wait",
        "aps-pool": "APScheduler 3 BackgroundScheduler + ProcessPoolExecutor, no-op job",
    }
    for key, rates in peers.items():
        what, _, width = key.partition("/")
        rows.append(
            {
                "name": names[what],
                **{k: v for k, v in spread(rates).items() if k != "n"},
                "kind": "peer" if what == "aps-pool" else "floor",
                "width": int(width),
                "source": "peers.py",
            }
        )
    # The raw-fork baseline per width, from the same process as the rows it divides where
    # possible: launch.py's own sequential fork for its rows, peers.py's for the rest.
    base: dict[tuple[str, int], float] = {}
    for r in rows:
        if r["kind"] == "floor" and "fork" in r["name"].lower():
            base.setdefault((r["source"], r["width"]), r["median"])
    for r in rows:
        fork = base.get((r["source"], r["width"])) or base.get(("peers.py", r["width"]))
        r["vs_fork"] = r["median"] / fork if fork else float("nan")
    shown = ["bench/launch.py", *cmd[2:]]
    return {"rows": rows, "runner_lateness": parsed["lateness"], "command": " ".join(shown)}


def _cli_timings(p: Profile, state: Path) -> dict[str, list[float]]:
    """Wall seconds of each CLI command, interleaved round-robin, ``p.cli_reps`` runs each."""
    cmds = {
        "python -c pass": [PYTHON, "-c", "pass"],
        "schedd --help": [*SCHEDD, "--help"],
        "schedd validate (example config)": [*SCHEDD, "validate", "-c", str(EXAMPLE)],
        "schedd status --json": [*SCHEDD, "status", "--json", "--state-dir", str(state)],
    }
    if p.cli_warmup:
        for cmd in cmds.values():
            timed_cmd(cmd)
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(p.cli_reps):
        for name, cmd in cmds.items():
            times[name].append(timed_cmd(cmd))
    return times


def section_daemon(p: Profile, tmp: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Daemon sessions: start-up, lateness (and with a CPU hog), idle CPU, RSS; the CLI timings."""
    sizes = sorted(set(p.lat_sizes) | set(p.scale_sizes))
    result: dict[str, Any] = {"sizes": {}, "cli": None, "load": {}, "errors": {}}
    for size in sizes:
        lat = size in p.lat_sizes
        reps = p.lat_reps if lat else p.big_reps
        per: list[dict[str, Any]] = []
        for rep in range(reps):
            first = rep == 0
            # Above the lateness sizes only the first daemon has a lateness window; the
            # others measure start-up and RSS.
            seconds = p.lat_seconds if lat else (p.big_lat_seconds if first else 0.0)
            log(f"daemon: {size_label(size)} jobs, repetition {rep + 1}/{reps}")
            cli = first and size == p.cli_size
            after = functools.partial(_cli_timings, p) if cli else None
            idle = p.idle_seconds if first and size in p.scale_sizes else 0.0
            during = None
            if idle and p.load_during_idle:
                during = functools.partial(measure_load, p, tmp, size)
            try:
                res = daemon_bench.session(
                    tmp / f"d{size}-{rep}",
                    size,
                    probes=p.probes if seconds > 0 else 0,
                    seconds=seconds,
                    hog_seconds=p.lat_seconds if size == p.hog_size else 0.0,
                    idle=idle,
                    idle_windows=p.idle_windows,
                    settle=p.settle,
                    after=after,
                    during_idle=during,
                )
                if "after" in res:
                    result["cli"] = res.pop("after")
                if "during_idle" in res:
                    result["load"][str(size)] = res.pop("during_idle")
                if "during_idle_error" in res:  # measured again in the load section
                    err = res.pop("during_idle_error")
                    result["errors"][f"load {size_label(size)} jobs, during idle"] = err
                per.append(res)
            except Exception:
                result["errors"][f"daemon {size_label(size)} jobs, repetition {rep + 1}"] = (
                    traceback.format_exc()
                )
        result["sizes"][str(size)] = per
    return result


def section_aps(p: Profile) -> list[list[list[float]]]:
    """APScheduler reference lateness: ``[rep][phase]`` samples, phases as :func:`aps_phases`."""
    return [
        isolated(
            "aps_reference",
            phases=aps_phases(p),
            seconds=p.aps_seconds,
            interval=p.aps_interval,
        )
        for _ in range(p.aps_reps)
    ]


def aps_phases(p: Profile) -> list[list[Any]]:
    phases: list[list[Any]] = [[n, False] for n in sorted(p.lat_sizes)]
    phases.append([p.hog_size, True])
    return phases


def measure_load(p: Profile, tmp: Path, size: int) -> dict[str, Any]:
    """``schedd validate`` wall times and in-process ``load_config`` times for ``size`` jobs."""
    config = tmp / f"validate-{size}.yaml"
    daemon_bench.write_config(config, size, 0)
    cmd = [*SCHEDD, "validate", "-c", str(config)]
    walls = [timed_cmd(cmd) for _ in range(p.validate_reps.get(size, 3))]
    inproc = isolated("load_config", path=str(config), reps=p.load_reps.get(size, 1))
    return {"validate_s": walls, "load_config": inproc}


def section_load(
    p: Profile,
    tmp: Path,
    log: Callable[[str], None],
    done: dict[str, Any],
    errors: dict[str, str],
) -> dict[str, Any]:
    """:func:`measure_load` for every scale size not measured yet (``done``)."""
    out: dict[str, Any] = dict(done)
    for size in p.scale_sizes:
        if str(size) not in out:
            log(f"load: {size_label(size)} jobs, schedd validate x{p.validate_reps.get(size, 3)}")
            try:
                out[str(size)] = measure_load(p, tmp, size)
            except Exception:
                errors[f"load {size_label(size)} jobs"] = traceback.format_exc()
    return out


def section_ledger(p: Profile) -> dict[str, Any]:
    rates = isolated("ledger", runs=p.ledger_runs, reps=p.ledger_reps)
    return {"runs": p.ledger_runs, "rates": rates}


def section_crash(p: Profile) -> dict[str, Any]:
    return isolated("crash", iterations=p.crash_iterations, wait=list(p.crash_wait))


def section_hostile(p: Profile) -> dict[str, Any]:
    result: dict[str, Any] = isolated(
        "hostile",
        quiet=p.hostile_quiet,
        seconds=p.hostile_seconds,
        warm_up=p.hostile_warm_up,
        runs=p.hostile_runs,
    )
    return result


# ---- the report -------------------------------------------------------------------------
def f0(x: float) -> str:
    return "-" if x != x else f"{x:,.0f}"


def f1(x: float) -> str:
    return "-" if x != x else f"{x:,.1f}"


def f2(x: float) -> str:
    return "-" if x != x else f"{x:,.2f}"


def rng(s: dict[str, float], fmt: Callable[[float], str] = f1) -> str:
    if not s.get("n", 2) or s["min"] != s["min"]:
        return "-"
    if s.get("n") == 1:
        return "(1 run)"
    return f"{fmt(s['min'])}-{fmt(s['max'])}"


def paren(text: str) -> str:
    return text if text.startswith("(") else f"({text})"


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("**met**" if ok else "**NOT met**")


def lateness_sets(data: dict[str, Any], p: Profile) -> list[dict[str, Any]]:
    """One entry per lateness configuration: label, schedd reps, APScheduler reps."""
    daemon = data.get("daemon") or {}
    aps = data.get("aps") or []
    sets: list[dict[str, Any]] = []
    phases = aps_phases(p)
    for size in sorted(set(p.lat_sizes) | set(p.scale_sizes)):
        per = daemon.get("sizes", {}).get(str(size), [])
        reps = [r.get("late", []) for r in per if "late" in r]
        if not reps:
            continue
        ref = [rep[phases.index([size, False])] for rep in aps] if [size, False] in phases else []
        sets.append({"label": f"{size_label(size)} jobs", "size": size, "schedd": reps, "ref": ref})
        hog = [r.get("late_hog", []) for r in per if "late_hog" in r]
        if hog:
            ref_hog = [rep[phases.index([size, True])] for rep in aps]
            sets.append(
                {
                    "label": f"{size_label(size)} jobs + CPU hog",
                    "size": size,
                    "hog": True,
                    "schedd": hog,
                    "ref": ref_hog,
                }
            )
    return sets


def _flat(reps: list[list[float]]) -> list[float]:
    return [x for rep in reps for x in rep]


def targets(data: dict[str, Any], p: Profile) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    launch = data.get("launch")
    if launch:
        for r in launch["rows"]:
            if r["kind"] != "schedd" or "no-op" not in r["name"].lower():
                continue
            ok = r["median"] >= TARGET_RUNS_S and r["vs_fork"] >= TARGET_FORK_SHARE
            rows.append(
                (
                    f"launch >= {TARGET_RUNS_S:.0f} runs/s and >= {TARGET_FORK_SHARE:.0%} of raw "
                    f"fork: {r['name']}",
                    f"{f0(r['median'])} runs/s, {r['vs_fork']:.0%} of raw fork "
                    f"({'2' if r['width'] == 2 else '1'} in flight)",
                    verdict(ok),
                )
            )
    else:
        rows.append(("launch >= 150 runs/s and >= 50% of raw fork", "-", verdict(None)))
    ten = [s for s in lateness_sets(data, p) if s["size"] == 10_000 and not s.get("hog")]
    if ten:
        d = dist(_flat(ten[0]["schedd"]))
        rows.append(
            (
                f"lateness at 10k jobs: p50 <= {TARGET_P50_MS:.0f} ms",
                f"p50 {f2(d['p50'])} ms (n={d['n']})",
                verdict(d["p50"] <= TARGET_P50_MS),
            )
        )
        rows.append(
            (
                f"lateness at 10k jobs: p99 <= {TARGET_P99_MS:.0f} ms",
                f"p99 {f2(d['p99'])} ms (n={d['n']})",
                verdict(d["p99"] <= TARGET_P99_MS),
            )
        )
    else:
        rows.append(("lateness at 10k jobs: p50 <= 5 ms, p99 <= 25 ms", "-", verdict(None)))
    hostile = (data.get("hostile") or {}).get("hostile_ms")
    if hostile:
        d = dist(hostile)
        for q, target in (("p50", TARGET_P50_MS), ("p99", TARGET_P99_MS)):
            rows.append(
                (
                    f"lateness during the hostile-plugin mix: {q} <= {target:.0f} ms",
                    f"{q} {f2(d[q])} ms (n={d['n']}; quiet baseline "
                    f"{f2(dist(data['hostile']['quiet_ms'])[q])} ms)",
                    verdict(d[q] <= target),
                )
            )
    else:
        rows.append(("lateness during the hostile-plugin mix", "-", verdict(None)))
    big = 100_000
    load = (data.get("load") or {}).get(str(big))
    per = ((data.get("daemon") or {}).get("sizes") or {}).get(str(big))
    if load:
        v = spread(load["validate_s"])["median"]
        lc = spread(load["load_config"]["times"])["median"]
        rows.append(
            (
                f"100k jobs load <= {TARGET_LOAD_S:.0f} s: `schedd validate` wall",
                f"{f2(v)} s",
                verdict(v <= TARGET_LOAD_S),
            )
        )
        rows.append(
            (
                f"100k jobs load <= {TARGET_LOAD_S:.0f} s: in-process load_config",
                f"{f2(lc)} s",
                verdict(lc <= TARGET_LOAD_S),
            )
        )
    else:
        rows.append(("100k jobs load <= 5 s", "-", verdict(None)))
    if per:
        st = spread([r["startup_s"] for r in per])["median"]
        rss = max(r.get("rss_idle_mb", r["rss_busy_mb"]) for r in per)
        idle = [r["idle_cpu_pct"] for r in per if "idle_cpu_pct" in r]
        rows.append(
            (
                f"100k jobs load <= {TARGET_LOAD_S:.0f} s: daemon start to 'started'",
                f"{f2(st)} s",
                verdict(st <= TARGET_LOAD_S),
            )
        )
        peak = max(r.get("rss_peak_mb", float("nan")) for r in per)
        rows.append(
            (
                f"100k jobs RSS <= {TARGET_RSS_MB:.0f} MB (daemon process, after start-up)",
                f"{f0(rss)} MB (peak during start-up: {f0(peak)} MB)",
                verdict(rss <= TARGET_RSS_MB),
            )
        )
        if idle:
            rows.append(
                (
                    f"100k jobs idle CPU < {TARGET_IDLE_PCT:.0f}% of one core",
                    f"{f2(idle[0])}%",
                    verdict(idle[0] < TARGET_IDLE_PCT),
                )
            )
    else:
        rows.append(("100k jobs: daemon start, RSS <= 300 MB, idle < 1% CPU", "-", verdict(None)))
    cli = data.get("cli_summary")
    if cli:
        for name, c in cli.items():
            if name == "python -c pass" or c.get("target") is None:
                continue
            rows.append(
                (
                    f"CLI `{name}` <= {c['target']:.0f}x bare python",
                    f"{f0(c['median_ms'])} ms = {c['ratio']:.1f}x",
                    verdict(c["ratio"] <= c["target"]),
                )
            )
    else:
        rows.append(("CLI <= 4x bare python (validate of the example <= 15x)", "-", verdict(None)))
    ledger = data.get("ledger")
    if ledger:
        med = spread(ledger["rates"])["median"]
        rows.append(
            (
                f"ledger >= {TARGET_LEDGER:,.0f} runs/s",
                f"{f0(med)} runs/s",
                verdict(med >= TARGET_LEDGER),
            )
        )
    else:
        rows.append(("ledger >= 1,000 runs/s", "-", verdict(None)))
    return rows


def cli_summary(data: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    daemon = data.get("daemon") or {}
    cli = daemon.get("cli")
    if not cli:
        return None
    bare = statistics.median(cli["python -c pass"])
    out: dict[str, dict[str, Any]] = {}
    goals = {
        "schedd --help": TARGET_CLI_X,
        "schedd status --json": TARGET_CLI_X,
        "schedd validate (example config)": TARGET_VALIDATE_X,
    }
    for name, times in cli.items():
        s = spread(times)
        out[name] = {
            "median_ms": s["median"] * 1000,
            "min_ms": s["min"] * 1000,
            "max_ms": s["max"] * 1000,
            "n": s["n"],
            "ratio": s["median"] / bare,
            "target": goals.get(name),
        }
    for size, load in (data.get("load") or {}).items():
        s = spread(load["validate_s"])
        out[f"schedd validate ({size_label(int(size))} jobs)"] = {
            "median_ms": s["median"] * 1000,
            "min_ms": s["min"] * 1000,
            "max_ms": s["max"] * 1000,
            "n": s["n"],
            "ratio": s["median"] / bare,
            "target": None,
        }
    return out


def write_report(out: Path, data: dict[str, Any], p: Profile) -> str:
    info = data["machine"]
    lines: list[str] = []
    add = lines.append
    add(f"# schedd benchmark report ({p.name})\n")
    add(f"- date: {info['date']}, wall time of the whole run: {data['seconds']:.0f} s")
    add(f"- machine: {info['cores']} cores ({info['cpu']}), {info['system']} {info['kernel']}")
    add(f"- Python {info['python']} ({PYTHON})")
    dirty = info["dirty_files"]
    tested = [f for f in dirty if not f[3:].startswith("bench/")]
    if tested:
        dirty_note = (
            f" + **uncommitted changes in {len(tested)} files outside bench/** (the work tree "
            "was measured, not the commit alone)"
        )
    elif dirty:
        dirty_note = f" (uncommitted changes only in bench/: {len(dirty)} files)"
    else:
        dirty_note = " (clean work tree)"
    add(f"- commit: `{info['commit']}`{dirty_note}")
    loads = data.get("loads", [])
    add(
        "- load average (1 min) before the run: "
        f"{info['load_start'][0]:.2f}; per section: "
        + ", ".join(f"{name} {load:.2f}" for name, load, _ in loads)
    )
    tests = max((n for *_, n in loads), default=0)
    busy = busy_note(info, loads)
    add(f"- other test runs seen: up to {tests} pytest processes during the run. {busy}".rstrip())
    changed = data.get("changed_during_run") or []
    if changed:
        add(
            f"- **WARNING: {len(changed)} source file(s) of the code under test changed during "
            f"the run** (sections after the change measured different code): {', '.join(changed)}"
        )
    add(f"- command: `{data['command']}`\n")

    add("## Targets\n")
    add("| target | measured | verdict |\n|---|---|---|")
    for t in targets(data, p):
        add(f"| {t[0]} | {t[1]} | {t[2]} |")
    add("")

    add("## 1. Launch throughput (no-op task)\n")
    launch = data.get("launch")
    if launch:
        add(
            "Runs/s, median of the repetitions and min-max; `vs raw fork` divides by the raw-fork "
            "floor with the same number in flight, measured in the same run "
            "(launch.py's own for its sequential rows, bench/peers.py's otherwise). "
            f"Command: `{launch['command']}` (raw output: launch.txt) and bench/peers.py.\n"
        )
        add("| method | in flight | runs/s | min-max | vs raw fork | measured by |")
        add("|---|---:|---:|---:|---:|---|")
        for r in sorted(launch["rows"], key=launch_order):
            add(
                f"| {r['name']} | {r['width']} | {f0(r['median'])} "
                f"| {f0(r['min'])}-{f0(r['max'])} | {r['vs_fork']:.0%} | {r['source']} |"
            )
        if launch["runner_lateness"]:
            add("\nschedd Runner, `launch()` -> task's started marker (from launch.py):\n")
            keys = list(launch["runner_lateness"][0])
            add("| " + " | ".join(keys) + " |")
            add("|" + "---|" * len(keys))
            for row in launch["runner_lateness"]:
                add("| " + " | ".join(row[k] for k in keys) + " |")
        add("\n![launch throughput](launch.png)\n")
    else:
        add(section_error(data, "launch"))

    add("## 2. Fire lateness (scheduled slot -> task code running)\n")
    sets = lateness_sets(data, p)
    if sets:
        add(
            f"schedd: `schedd run` with N filler jobs plus {p.probes} probe jobs firing every "
            "second (`every: 1s`, a `python` task printing `time.time()` first thing in the "
            f"isolated child); {p.lat_reps} daemon(s) per size, {p.lat_seconds:g} s window each. "
            "APScheduler reference: a BackgroundScheduler in a fresh interpreter with as many "
            f"cron jobs, {p.probes} in-process date jobs per slot, a slot every "
            f"{p.aps_interval:g} s, {p.aps_seconds:g} s per phase, {p.aps_reps} repetition(s). "
            "CPU hog: a busy loop pinned to core 0. Percentiles over all samples pooled; "
            "`p50 range` and `p99 range` are the spread of the per-repetition values.\n"
        )
        add(
            "| jobs loaded | who | n | p50 ms | p90 ms | p99 ms | max ms | p50 range "
            "| p99 range | p50 vs reference | early (< 0 ms) |"
        )
        add("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for s in sets:
            ref_p50 = dist(_flat(s["ref"]))["p50"] if s["ref"] else float("nan")
            for who, reps in (("schedd", s["schedd"]), ("APScheduler ref.", s["ref"])):
                if not reps:
                    continue
                d = dist(_flat(reps))
                p50s = spread([pct(r, 0.5) for r in reps if r])
                p99s = spread([pct(r, 0.99) for r in reps if r])
                ratio = f"{d['p50'] / ref_p50:.1f}x" if who == "schedd" and ref_p50 > 0 else ""
                add(
                    f"| {s['label']} | {who} | {d['n']} | {f2(d['p50'])} | {f2(d['p90'])} "
                    f"| {f2(d['p99'])} | {f2(d['max'])} | {rng(p50s, f2)} | {rng(p99s, f2)} "
                    f"| {ratio} | {sum(1 for x in _flat(reps) if x < 0)} |"
                )
        add("\n![lateness](lateness.png)\n")
    else:
        add(section_error(data, "daemon"))

    add("## 3. Scale: load, start-up, memory, idle CPU\n")
    add(scale_table(data, p))

    add("## 4. CLI start-up\n")
    cli = data.get("cli_summary")
    if cli:
        add(
            f"Wall time of one command, {p.cli_reps} runs each interleaved round-robin "
            "(validate of N jobs: the scale section's runs); `status` asks a running daemon with "
            f"{size_label(p.cli_size)} jobs over its control socket.\n"
        )
        add("| command | runs | median ms | min-max | vs `python -c pass` | target |")
        add("|---|---:|---:|---:|---:|---|")
        for name, c in cli.items():
            goal = f"<= {c['target']:.0f}x" if c["target"] else ""
            add(
                f"| `{name}` | {c['n']} | {f1(c['median_ms'])} | {f1(c['min_ms'])}-"
                f"{f1(c['max_ms'])} | {c['ratio']:.1f}x | {goal} |"
            )
        add("")
    else:
        add(section_error(data, "daemon"))

    add("## 5. Ledger and crash safety\n")
    ledger = data.get("ledger")
    if ledger:
        s = spread(ledger["rates"])
        add(
            f"Runs recorded per second (started + finished row per run, default durability: "
            f"WAL, synchronous=NORMAL, group commit), {ledger['runs']:,} runs x {s['n']} "
            f"repetitions: median **{f0(s['median'])}**, min-max {f0(s['min'])}-{f0(s['max'])}, "
            f"{s['median'] / TARGET_LEDGER:.1f}x the target.\n"
        )
    else:
        add(section_error(data, "ledger"))
    crash = data.get("crash")
    if crash:
        add("Daemon SIGKILL loop (bench/crash_stress.py):\n")
        add("| measure | value |\n|---|---:|")
        add(f"| SIGKILL iterations | {crash['iterations']} |")
        add(f"| ledger opened clean (integrity_check ok) | {crash['opened_clean']} |")
        add(f"| runs recorded | {crash['rows']} |")
        for status, n in sorted(crash["statuses"].items()):
            add(f"| status {status} | {n} |")
        add(f"| slots with two runs | {crash['duplicates']} |")
        add(f"| rows left running | {crash['left_running']} |")
        add(f"| run processes alive afterwards | {crash['surviving_processes']} |")
        add(f"| wall time (s) | {crash['seconds']:.1f} |")
        add(f"\nresult: **{'PASS' if crash['ok'] else 'FAIL'}**\n")
    else:
        add(section_error(data, "crash"))

    add("## 6. Hostile plugins (bench/hostile_bench.py)\n")
    hostile = data.get("hostile")
    if hostile:
        from bench import hostile_bench

        add("\n".join(hostile_bench.report_lines(hostile)) + "\n")
    else:
        add(section_error(data, "hostile"))

    add("## Run log\n")
    add("| section | seconds | 1-min load before | pytest processes before |")
    add("|---|---:|---:|---:|")
    for name, load, tests_n in loads:
        add(f"| {name} | {data['durations'].get(name, 0):.1f} | {load:.2f} | {tests_n} |")
    if data["errors"]:
        add("\n### Errors\n")
        for name, err in data["errors"].items():
            add(f"**{name}**:\n\n```\n{err.strip()}\n```\n")
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def busy_note(info: dict[str, Any], loads: list[tuple[str, float, int]]) -> str:
    cores = info["cores"] or 1
    first = info["load_start"][0]
    if first > 0.5 * cores:
        return (
            f"The machine was not quiet when the run began (load {first:.2f} on {cores} "
            "cores): treat absolute numbers with care, ratios less so."
        )
    return ""


def section_error(data: dict[str, Any], name: str) -> str:
    if name in data["errors"]:
        return f"Not measured: section `{name}` failed (see Errors below).\n"
    return "Not measured in this profile.\n"


def launch_order(r: dict[str, Any]) -> tuple[int, int, str]:
    return ({"floor": 0, "schedd": 1, "peer": 2}[r["kind"]], r["width"], r["name"])


def scale_table(data: dict[str, Any], p: Profile) -> str:
    daemon = (data.get("daemon") or {}).get("sizes") or {}
    load = data.get("load") or {}
    if not daemon and not load:
        return section_error(data, "daemon")
    cli = data.get("cli_summary") or {}
    example_ms = (cli.get("schedd validate (example config)") or {}).get("median_ms")
    zero = daemon.get("0") or []
    start0 = spread([r["startup_s"] for r in zero])["median"]
    rss00 = statistics.median([r["rss_start_mb"] for r in zero]) if zero else float("nan")
    lines = [
        "`validate`: wall time of `schedd validate -c FILE` (a fresh interpreter). `load_config`: "
        "in-process `load_config()` after the plugins and lazy imports are loaded (its own fresh "
        "interpreter; `peak RSS` is that process's peak). `start`: `schedd run` from spawn until "
        "its log says `started`. `marginal per 1k jobs`: (value - the same run's baseline) / "
        "thousands of jobs, baselines: `validate` of the example config, the daemon with 0 "
        "filler jobs.\n",
        "| jobs | validate s | min-max | load_config s | min-max | load peak RSS MB "
        "| start s | min-max | marginal per 1k jobs: validate / start |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    mem = [
        f"\nMemory and idle: RSS of the daemon process after start-up (median over the daemons "
        "of that size), after the idle window (first daemon) and its peak (`VmHWM`, the highest "
        "of the daemons: start-up included) "
        "(`+launcher`: the fork-server process tree it starts, shared pages counted again). "
        f"Idle CPU: the daemon's CPU time over {p.idle_seconds:g} s with nothing firing (probes "
        f"paused, {p.settle:g} s settle), % of one core: the mean, and the min-max of "
        f"{p.idle_windows} equal sub-windows (10 ms tick resolution). A sub-window far above the "
        "rest is usually the ledger's history-pruning sweep (10 s after start, then every "
        "300 s, one transaction per job), which a window may or may not catch.\n",
        "| jobs | RSS start MB | min-max | RSS idle MB | peak RSS MB | +launcher MB "
        "| marginal RSS per 1k jobs MB | idle CPU % | sub-window min-max |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    sizes = sorted({int(s) for s in (*daemon, *load)} & set(p.scale_sizes))
    for size in sizes:
        ld = load.get(str(size))
        per = daemon.get(str(size), [])
        v = spread(ld["validate_s"]) if ld else spread([])
        lc = spread(ld["load_config"]["times"]) if ld else spread([])
        peak = ld["load_config"]["peak_rss_mb"] if ld else float("nan")
        st = spread([r["startup_s"] for r in per])
        rss0 = statistics.median([r["rss_start_mb"] for r in per]) if per else float("nan")
        rss_s = spread([r["rss_start_mb"] for r in per])
        peak_rss = max((r.get("rss_peak_mb", float("nan")) for r in per), default=float("nan"))
        idle_runs = [r for r in per if "idle_cpu_pct" in r]
        first = idle_runs[0] if idle_runs else {}
        rss_idle = first.get("rss_idle_mb", float("nan"))
        tree = first.get("tree_rss_idle_mb", float("nan")) - rss_idle
        idle = first.get("idle_cpu_pct", float("nan"))
        windows = spread(first.get("idle_cpu_windows", []))
        k = size / 1000
        big = size >= 1000  # below that the baseline's noise swamps the difference
        v_k = (v["median"] * 1000 - example_ms) / k if example_ms and big else float("nan")
        st_k = (st["median"] - start0) * 1000 / k if big else float("nan")
        lines.append(
            f"| {size:,} | {f2(v['median'])} | {rng(v, f2)} | {f2(lc['median'])} | {rng(lc, f2)} "
            f"| {f0(peak)} | {f2(st['median'])} | {rng(st, f2)} | {f0(v_k)} ms / {f0(st_k)} ms |"
        )
        mem.append(
            f"| {size:,} | {f1(rss0)} | {rng(rss_s)} | {f1(rss_idle)} | {f1(peak_rss)} "
            f"| {f1(tree)} "
            f"| {f2((rss0 - rss00) / k) if big else '-'} "
            f"| {f2(idle)} | {rng(windows, f2)} |"
        )
    if zero:
        st = spread([r["startup_s"] for r in zero])
        mem.append(
            f"\nBaselines, same run: the daemon with 0 filler jobs starts in {f2(st['median'])} s "
            f"{paren(rng(st, f2))} with RSS {f1(rss00)} MB."
        )
    return "\n".join(lines + mem) + "\n"


# ---- plots ------------------------------------------------------------------------------
def plot_lateness(out: Path, data: dict[str, Any], p: Profile) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    sets = lateness_sets(data, p)
    if not sets:
        return
    fig, (box_ax, cdf_ax) = plt.subplots(1, 2, figsize=(13, 5), width_ratios=[3, 2])
    positions: list[float] = []
    values: list[list[float]] = []
    colors: list[str] = []
    ticks: list[float] = []
    for i, s in enumerate(sets):
        base = i * 3.0
        ticks.append(base + 0.5)
        for j, (reps, color) in enumerate(((s["schedd"], "tab:blue"), (s["ref"], "tab:orange"))):
            flat = [max(v, 0.01) for v in _flat(reps)]
            if flat:
                positions.append(base + j)
                values.append(flat)
                colors.append(color)
    parts = box_ax.boxplot(values, positions=positions, widths=0.8, patch_artist=True, whis=(1, 99))
    for patch, color in zip(parts["boxes"], colors, strict=True):
        patch.set_facecolor(color)
        patch.set_alpha(0.6)
    box_ax.set_xticks(ticks, [s["label"] for s in sets])
    box_ax.set_yscale("log")
    box_ax.set_ylabel("lateness, ms (log)")
    box_ax.axhline(TARGET_P50_MS, color="green", ls="--", lw=1, label="target p50 5 ms")
    box_ax.axhline(TARGET_P99_MS, color="red", ls=":", lw=1, label="target p99 25 ms")
    box_ax.plot([], [], color="tab:blue", lw=8, alpha=0.6, label="schedd (isolated child)")
    box_ax.plot([], [], color="tab:orange", lw=8, alpha=0.6, label="APScheduler in-process")
    box_ax.legend(fontsize=8, loc="upper left")
    box_ax.set_title("slot -> task code running (whiskers p1-p99; <= 0 drawn at 0.01)")
    styles = {"schedd": "-", "ref": "--"}
    for s in sets:
        if s["size"] not in (0, 10_000):
            continue
        for who, label in (("schedd", "schedd"), ("ref", "APScheduler")):
            flat = sorted(_flat(s[who]))
            if not flat:
                continue
            ys = [(k + 1) / len(flat) for k in range(len(flat))]
            cdf_ax.step(
                [max(v, 0.01) for v in flat],
                ys,
                where="post",
                ls=styles[who],
                label=f"{label}, {s['label']}",
            )
    cdf_ax.set_xscale("log")
    for axis in (box_ax.yaxis, cdf_ax.xaxis):
        axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())
    cdf_ax.set_xlabel("lateness, ms (log)")
    cdf_ax.set_ylabel("fraction of fires")
    cdf_ax.axvline(TARGET_P50_MS, color="green", ls="--", lw=1)
    cdf_ax.axvline(TARGET_P99_MS, color="red", ls=":", lw=1)
    cdf_ax.legend(fontsize=7, loc="lower right")
    cdf_ax.set_title("CDF, 0 and 10k jobs")
    fig.suptitle(f"schedd fire lateness ({p.name}, {data['machine']['commit_short']})")
    fig.tight_layout()
    fig.savefig(out / "lateness.png", dpi=110)
    plt.close(fig)


def plot_launch(out: Path, data: dict[str, Any], p: Profile) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    launch = data.get("launch")
    if not launch:
        return
    rows = sorted(launch["rows"], key=launch_order)
    colors = {"floor": "tab:gray", "schedd": "tab:blue", "peer": "tab:orange"}
    fig, ax = plt.subplots(figsize=(12, 0.42 * len(rows) + 1.5))
    ys = list(range(len(rows)))[::-1]
    med = [r["median"] for r in rows]
    err = [
        [r["median"] - r["min"] for r in rows],
        [r["max"] - r["median"] for r in rows],
    ]
    ax.barh(ys, med, xerr=err, color=[colors[r["kind"]] for r in rows], alpha=0.8, capsize=3)
    labels = [f"{r['name']} [{r['width']} in flight]" for r in rows]
    ax.set_yticks(ys, labels, fontsize=8)
    for y, r in zip(ys, rows, strict=True):
        ax.text(r["max"] * 1.05, y, f"{r['median']:,.0f}/s", va="center", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("runs/s (log; bar = median, whisker = min-max)")
    ax.axvline(TARGET_RUNS_S, color="red", ls=":", lw=1)
    ax.set_xlim(right=max(r["max"] for r in rows) * 3)
    handles = [Patch(color=color, alpha=0.8, label=kind) for kind, color in colors.items()]
    handles.append(Line2D([], [], color="red", ls=":", lw=1, label="target 150 runs/s"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"launch throughput, no-op task ({p.name}, {data['machine']['commit_short']})")
    fig.tight_layout()
    fig.savefig(out / "launch.png", dpi=110)
    plt.close(fig)


# ---- driver -----------------------------------------------------------------------------
def run_all(
    profile: Profile,
    parent: Path,
    command: str = "",
    log: Callable[[str], None] | None = None,
) -> Path:
    """Run every section of ``profile``, write the report into a new folder under ``parent``."""
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t_start = time.monotonic()
    mtimes = source_mtimes()
    info = machine()
    out = result_dir(parent, info, profile)
    data: dict[str, Any] = {
        "machine": info,
        "profile": dataclasses.asdict(profile),
        "command": command,
        "errors": {},
        "durations": {},
        "loads": [],
    }

    def section(name: str, fn: Callable[[], Any]) -> None:
        data["loads"].append((name, os.getloadavg()[0], busy_tests()))
        say(f"[{time.monotonic() - t_start:6.1f} s] {name}")
        t0 = time.monotonic()
        try:
            data[name] = fn()
        except Exception:
            data[name] = None
            data["errors"][name] = traceback.format_exc()
            say(f"  {name} FAILED:\n{traceback.format_exc()}")
        data["durations"][name] = time.monotonic() - t0

    def progress(msg: str) -> None:
        say(f"[{time.monotonic() - t_start:6.1f} s]   {msg}")

    with tempfile.TemporaryDirectory(prefix="schedd-bench-") as tmp_name:
        tmp = Path(tmp_name)
        section("launch", lambda: section_launch(profile, out))
        section("daemon", lambda: section_daemon(profile, tmp, progress))
        section("aps", lambda: section_aps(profile))
        daemon = data.get("daemon") or {}
        data["errors"].update(daemon.get("errors") or {})
        done = daemon.get("load") or {}
        section("load", lambda: section_load(profile, tmp, progress, done, data["errors"]))
        section("ledger", lambda: section_ledger(profile))
        section("crash", lambda: section_crash(profile))
        section("hostile", lambda: section_hostile(profile))
    data["changed_during_run"] = changed_sources(mtimes)
    data["cli_summary"] = cli_summary(data)
    data["seconds"] = time.monotonic() - t_start
    data["machine"]["load_end"] = os.getloadavg()
    for name, fn in (("plot lateness", plot_lateness), ("plot launch", plot_launch)):
        try:
            fn(out, data, profile)
        except Exception:
            data["errors"][name] = traceback.format_exc()
    data["seconds"] = time.monotonic() - t_start
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str))
    write_report(out, data, profile)
    say(f"[{data['seconds']:6.1f} s] wrote {out}/report.md")
    return out


def profile_from(raw: dict[str, Any]) -> Profile:
    fields = {f.name: f for f in dataclasses.fields(Profile)}
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in fields:
            continue
        if isinstance(value, list):
            value = tuple(value)
        elif isinstance(value, dict):
            value = {int(k): v for k, v in value.items()}
        values[name] = value
    return Profile(**values)


def render(out: Path) -> None:
    """Rewrite ``report.md`` and the plots in ``out`` from its ``results.json``."""
    data = json.loads((out / "results.json").read_text())
    profile = profile_from(data["profile"])
    data["loads"] = [tuple(x) for x in data["loads"]]
    for fn in (plot_lateness, plot_launch):
        fn(out, data, profile)
    write_report(out, data, profile)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Run every schedd benchmark; write report.md, PNG plots and results.json.",
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small sizes, short windows (< 60 s)")
    mode.add_argument(
        "--tiny", action="store_true", help="seconds; for smoke tests only (numbers meaningless)"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=BENCH / "results",
        help="parent folder of the stamped results folder (default: bench/results)",
    )
    ap.add_argument(
        "--render",
        type=Path,
        metavar="DIR",
        help="only rewrite report.md and the plots of a results folder from its results.json",
    )
    ap.add_argument("--call", help=argparse.SUPPRESS)
    ap.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.call:
        result = CALLS[args.call](**json.loads(args.kwargs))
        print(RESULT_MARK + json.dumps(result), flush=True)
        return
    if args.render:
        render(args.render)
        print(args.render / "report.md")
        return
    profile = TINY if args.tiny else QUICK if args.quick else FULL
    command = " ".join([".venv/bin/python", "bench/run.py", *(argv or sys.argv[1:])])
    out = run_all(profile, args.out.resolve(), command)
    print(out / "report.md")


if __name__ == "__main__":
    main()
