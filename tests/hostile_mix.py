"""The hostile-plugin mix, shared by ``tests/test_hostile.py`` and ``bench/hostile_bench.py``.

One real daemon runs every hostile scenario of ``tests/fixtures/schedd_hostile``
at once next to probe jobs that fire every second. This module installs that
distribution, writes the config, and reads what happened from outside the
daemon: the ledger, the job logs, and ``/proc`` (survivors, zombies, the
daemon's fds, threads and memory).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from scheduler.recovery import run_processes

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "schedd_hostile"
#: In the argv of escapees that dropped their environment (see the fixture's ``__init__``).
ESCAPEE_MARKER = b"schedd-hostile-escapee"
#: The fixture's evidence folder variable.
DIR_ENV = "SCHEDD_HOSTILE_DIR"
#: Jobs the probes are: ``every: 1s``, printing when their code ran.
PROBES = ("probe-0", "probe-1")
#: Churn jobs for the many-runs phase: never scheduled here, only triggered.
CHURN = ("churn-ok", "churn-fail", "churn-exit", "churn-escape", "churn-segv")
NEVER = '"H H 1 1 *"'  # once a year: these jobs run when a test triggers them

_SLOT_RE = re.compile(r"^\S+ \S+ (\w+) schedd: started: scheduled, slot (\S+),")
_RAN_RE = re.compile(r"^\S+ \S+ (\w+) stdout: ran-at (\d+\.\d+)(.*)")
_PAIR_RE = re.compile(r"(\w+)=(-?\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class Scenario:
    """One hostile job: its task, extra job keys (YAML flow text) and the outcome it must get."""

    task: str
    keys: Mapping[str, str] = field(default_factory=dict)
    status: str = "success"
    exit_code: int | None = None
    signal: str | None = None
    error: str | None = None
    reason: str = "manual trigger"  # the tests trigger each scenario by hand
    log: str | None = None  # a line its job log must hold

    def expected(self) -> dict[str, Any]:
        """The ledger columns its run must end with."""
        return {
            "status": self.status,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "error": self.error,
            "reason": self.reason,
        }


#: Timeouts are short (the suite must be quick) and grace is 0.5 s (see :func:`write_config`).
SCENARIOS: dict[str, Scenario] = {
    "ignore-term": Scenario(
        "hostile-ignore-term", status="timeout", signal="SIGKILL", log="grace 0.5s expired"
    ),
    "escape": Scenario(
        "hostile-escape",
        {"timeout": "10s", "params": "{seconds: 300}"},
        status="success",
        exit_code=0,
        log="task exited, processes left behind",
    ),
    "fork-bomb": Scenario(
        "hostile-fork-bomb",
        {"timeout": "5s", "params": "{processes: 150}"},
        status="timeout",
        signal="SIGTERM",
        log="fork bomb: 150 processes up",
    ),
    "memory-hog": Scenario("hostile-memory-hog", {"timeout": "10s", "limits": "{memory: 256M}"}),
    "flood": Scenario(
        "hostile-flood",
        {"timeout": "90s", "params": "{megabytes: 100}"},
        exit_code=0,
        log="flood done: 100 MiB",
    ),
    "no-newline": Scenario("hostile-no-newline", status="timeout", signal="SIGTERM"),
    "segfault": Scenario(
        "hostile-segfault", status="killed", signal="SIGSEGV", reason="task died by SIGSEGV"
    ),
    "abort": Scenario(
        "hostile-abort", status="killed", signal="SIGABRT", reason="task died by SIGABRT"
    ),
    "exit": Scenario("hostile-exit", status="failed", exit_code=3),
    "spin": Scenario("hostile-spin", status="timeout", signal="SIGTERM"),
    "kill-supervisor": Scenario(
        "hostile-kill-supervisor",
        status="killed",
        reason="the run's supervisor ended without reporting a result",
        log="run lost: the run's supervisor ended without reporting a result",
    ),
    "stop-supervisor": Scenario(
        "hostile-stop-supervisor",
        {"params": "{seconds: 30}"},
        status="timeout",
        signal="SIGTERM",
        log="timeout after 1.5s",
    ),
    "close-stdout": Scenario(
        "hostile-close-stdout", exit_code=0, log="stderr: still working after closing stdout"
    ),
    "stdin": Scenario("hostile-stdin", exit_code=0, log="stdin gave 0 chars and 0 raw bytes"),
    "import-error": Scenario(
        "hostile-import-error", status="failed", exit_code=1, error="RuntimeError"
    ),
    "slow-import": Scenario("hostile-slow-import", status="timeout", signal="SIGTERM"),
    "hook-raise": Scenario("hostile-hook-raise", exit_code=0),
    "hook-hang": Scenario("hostile-hook-hang", exit_code=0),
}


#: The scenarios that keep a CPU busy (spinning, writing, forking, touching pages).
CPU_BURNERS = ("spin", "flood", "no-newline", "fork-bomb", "memory-hog")


def install(workdir: Path) -> Path:
    """pip-install the hostile distribution into ``workdir/site`` (offline); return that folder."""
    src = workdir / "src"
    site = workdir / "site"
    shutil.copytree(FIXTURE, src, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    proc = subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
            "--no-index", "--disable-pip-version-check", "--quiet", "--target", str(site), str(src),
        ],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"pip install schedd-hostile failed:\n{proc.stdout}{proc.stderr}")
    return site


def limits_supported() -> bool:
    """Whether jobs accept ``limits:`` yet (being built in parallel)."""
    from scheduler.config_model import JobFields

    return "limits" in JobFields.model_fields


def write_config(
    path: Path,
    evidence: Path,
    *,
    scenarios: Iterable[str] = SCENARIOS,
    limits: bool = True,
    nice: int | None = None,
    nice_scenarios: Iterable[str] = CPU_BURNERS,
) -> None:
    """The mix's config: probes, the named scenarios (all triggered by hand), churn jobs.

    ``limits=False`` drops the ``limits`` key (for a schedd that does not know
    it yet): the memory hog then holds its 1.5 GiB until its timeout. ``nice``
    gives ``nice_scenarios`` ``limits: {nice: N}`` (on top of their own limits).
    """
    lines = [
        "timezone: UTC",
        "defaults:",
        "  timeout: 1500ms",
        "  kill_grace: 500ms",
        f"  env: {{{DIR_ENV}: '{evidence}'}}",
        "jobs:",
    ]
    for probe in PROBES:
        lines += [f"  {probe}:", "    task: hostile-probe", "    every: 1s", "    timeout: 10s"]
        lines.append("    overlap: allow")  # a probe slowed down by the load never skips a slot
    for name in scenarios:
        sc = SCENARIOS[name]
        lines += [f"  {name}:", f"    task: {sc.task}", f"    cron: {NEVER}"]
        keys = {k: v for k, v in sc.keys.items() if limits or k != "limits"}
        if nice is not None and limits and name in nice_scenarios:
            own = keys.get("limits", "{}").strip("{}")
            keys["limits"] = "{" + ", ".join(x for x in (own, f"nice: {nice}") if x) + "}"
        lines += [f"    {k}: {v}" for k, v in keys.items()]
    churn = {
        "churn-ok": "hostile-noop",
        "churn-fail": "hostile-fail",
        "churn-exit": "hostile-exit",
        "churn-escape": "hostile-escape",
        "churn-segv": "hostile-segfault",
    }
    for name, task in churn.items():
        lines += [
            f"  {name}:",
            f"    task: {task}",
            f"    cron: {NEVER}",
            "    overlap: allow",
            "    kill_grace: 100ms",
            "    history_limit: 100000",
        ]
        if name == "churn-escape":
            lines.append("    params: {clean_env: false, seconds: 60}")
    path.write_text("\n".join(lines) + "\n")


def daemon_env(site: Path, evidence: Path, root: Path) -> dict[str, str]:
    """The daemon's environment: the installed plugin on PYTHONPATH, the evidence folder."""
    import os

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SCHEDD_DISABLE_PLUGINS", "SCHEDD_STRICT_PLUGINS")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(root)])
    env[DIR_ENV] = str(evidence)
    return env


# ---- /proc -------------------------------------------------------------------------------


def survivors(run_id: str) -> list[str]:
    """Every live process of run ``run_id``: by its environment, or by an escapee's argv
    (an escapee that exec'd with an empty environment carries only that)."""
    found = [f"pid {pid} (SCHEDD_RUN_ID)" for pid in run_processes([run_id])]
    marker = run_id.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if ESCAPEE_MARKER in argv and marker in argv and not zombie(int(entry.name)):
            found.append(f"pid {entry.name} (escapee argv)")
    return sorted(set(found))


def kill_leftovers(run_ids: Iterable[str]) -> list[str]:
    """SIGKILL whatever of these runs is still alive (clean-up after a failed check)."""
    import contextlib
    import os
    import signal

    found = []
    for run_id in run_ids:
        for what in survivors(run_id):
            pid = int(what.split()[1])
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            found.append(what)
    return found


def stat_fields(pid: int) -> list[str]:
    """``/proc/PID/stat`` after the command name: [state, ppid, ...]."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def zombie(pid: int) -> bool:
    try:
        return stat_fields(pid)[0] == "Z"
    except OSError:
        return False


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (any thread's), zombies included."""
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            out += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def zombies_under(pid: int) -> list[int]:
    """Zombie processes among ``pid``'s descendants."""
    found, todo = [], [pid]
    while todo:
        for kid in children(todo.pop()):
            if zombie(kid):
                found.append(kid)
            else:
                todo.append(kid)
    return found


def resources(pid: int) -> dict[str, int]:
    """The daemon's open fds, threads, resident memory and its peak so far (KiB)."""
    mem = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            mem[key] = int(value.split()[0])
    return {
        "fds": len(list(Path(f"/proc/{pid}/fd").iterdir())),
        "threads": len(list(Path(f"/proc/{pid}/task").iterdir())),
        "rss_kb": mem.get("VmRSS", 0),
        "peak_rss_kb": mem.get("VmHWM", 0),
    }


# ---- the run's own records ---------------------------------------------------------------


def steady_resources(pid: int) -> dict[str, int]:
    """The daemon's resources once idle: the smallest of a few readings a moment apart."""
    readings = []
    for _ in range(5):
        time.sleep(0.2)
        readings.append(resources(pid))
    return {k: min(r[k] for r in readings) for k in readings[0]}


def ledger_rows(state: Path, job: str | None = None, limit: int = 100_000) -> list[dict[str, Any]]:
    """Committed ledger rows, newest first (read-only, like ``schedd history --json``)."""
    from scheduler.ledger import LEDGER_FILE, Ledger

    path = state / LEDGER_FILE
    if not path.exists():
        return []
    with Ledger.open(path, readonly=True) as ledger:
        return ledger.history(job, limit=limit)


@dataclass(frozen=True)
class ProbeRun:
    """One probe run from its job log: when it was due, launched and ran."""

    job: str
    slot: float  # Unix time
    late_ms: float  # task code ran this long after the slot
    launched_ms: float  # the daemon launched it this long after the slot (< 0: ahead, as usual)
    #: What the probe saw of where the time went (ms; see the fixture's ``probe``),
    #: with ``ready_at`` made relative to the slot.
    stats: Mapping[str, float] = field(default_factory=dict)


def probe_runs(state: Path) -> list[ProbeRun]:
    """Every probe run with a slot, from the job logs, oldest first.

    The launch time is that of the ``started:`` line the daemon writes as it
    hands the run to the launcher (ms resolution), so a late run can be told
    apart: launched late (the daemon stalled) or launched in time and its
    process got the CPU late.
    """
    out = []
    for job in PROBES:
        log = state / "logs" / f"{job}.log"
        if not log.exists():
            continue
        slots: dict[str, tuple[float, float]] = {}
        for line in log.read_text(errors="replace").splitlines():
            m = _SLOT_RE.match(line)
            if m:
                launched = datetime.fromisoformat(" ".join(line.split()[:2])).timestamp()
                slots[m.group(1)] = (datetime.fromisoformat(m.group(2)).timestamp(), launched)
                continue
            m = _RAN_RE.match(line)
            if m and m.group(1) in slots:
                slot, launched = slots[m.group(1)]
                ran = float(m.group(2))
                stats = {k: float(v) for k, v in _PAIR_RE.findall(m.group(3))}
                if "ready_at" in stats:
                    stats["ready_at"] = (stats["ready_at"] - slot) * 1000
                late, at = (ran - slot) * 1000, (launched - slot) * 1000
                out.append(ProbeRun(job, slot, late, at, stats))
    return sorted(out, key=lambda r: r.slot)


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0-1) by nearest rank, as ``bench/run.py`` computes it."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))] if s else float("nan")
