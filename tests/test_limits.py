"""``limits:``: config (merge, located errors), and each limit hit by a real task.

Runs go through the real runner (launcher, supervisor, task) with the cgroup
mechanism this machine offers (see ``test_the_machine_s_cgroups_are_used``),
and once with rlimits only; one goes through a real daemon, its ledger and
``schedd history``. After every run its cgroup directories must be gone.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler import cgroups, confine
from scheduler.config import load_config
from scheduler.confine import Limits
from scheduler.errors import ConfigError
from scheduler.plugins import load_plugins
from scheduler.runner import Runner, RunRequest, cgroups_in_use
from scheduler.types import RunContext, RunResult
from tests.helpers import ROOT, Daemon, daemon, schedd, wait_for
from tests.runner_tasks import Collector

__all__ = ["daemon"]  # the fixture

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="cgroups and run_as need root")
REGISTRY = load_plugins()[1]
CGROUPS = cgroups_in_use()[0]
needs_memory_cgroup = pytest.mark.skipif(
    CGROUPS is None or CGROUPS.memory is None, reason="no usable memory cgroup here"
)
needs_pids_cgroup = pytest.mark.skipif(
    CGROUPS is None or CGROUPS.pids is None, reason="no usable pids cgroup here"
)


# -- config -----------------------------------------------------------------------------


def load(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "schedd.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(path, REGISTRY)


def errors(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return [str(p).removeprefix(str(tmp_path) + "/") for p in info.value.problems]


def test_limits_merge_key_by_key_with_defaults(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        defaults:
          limits: {memory: 256M, cpu: 30s, open_files: 256}
        jobs:
          plain: {task: shell, every: 1h, params: {command: "true"}}
          own:
            task: shell
            every: 1h
            params: {command: "true"}
            limits: {cpu: 1m30s, processes: 64, memory: 1G}
          bytes:
            task: shell
            every: 1h
            params: {command: "true"}
            limits: {memory: 1048576, open_files: 8}
          units:
            task: shell
            every: 1h
            params: {command: "true"}
            limits: {memory: 512MiB}
        """,
    )
    jobs = config.jobs
    assert jobs["plain"].limits == Limits(memory=256 << 20, cpu=30.0, open_files=256)
    assert jobs["own"].limits == Limits(memory=1 << 30, cpu=90.0, open_files=256, processes=64)
    assert jobs["bytes"].limits == Limits(memory=1 << 20, cpu=30.0, open_files=8)
    assert jobs["units"].limits == Limits(memory=512 << 20, cpu=30.0, open_files=256)
    none = load(tmp_path, "jobs:\n  a: {task: shell, every: 1h, params: {command: 'true'}}\n")
    assert none.jobs["a"].limits is None and none.jobs["a"].run_as is None


def test_limits_on_the_fast_path_of_a_big_file(tmp_path: Path) -> None:
    """Over 200 jobs take the bulk validator; limits must come out the same."""
    job = "{task: shell, every: 1h, params: {command: 'true'}, limits: {cpu: %d}}"
    jobs = "".join(f"  j{i}: {job % (i + 1)}\n" for i in range(250))
    config = load(tmp_path, f"defaults:\n  limits: {{memory: 64M}}\njobs:\n{jobs}")
    assert len(config.jobs) == 250
    assert config.jobs["j7"].limits == Limits(memory=64 << 20, cpu=8.0)


def test_bad_limits_are_located_errors(tmp_path: Path) -> None:
    assert errors(
        tmp_path,
        """
        defaults:
          limits: {memroy: 1G}
        jobs:
          a:
            task: shell
            every: 1h
            params: {command: "true"}
            limits: {memory: 12MB, cpu: 0, open_files: 0, processes: many}
          b:
            task: shell
            every: 1h
            params: {command: "true"}
            limits: {memory: 100K, cpu: soon, swap: 1G}
          c:
            task: shell
            every: 1h
            params: {command: "true"}
            limits: 5
        """,
    ) == [
        "schedd.yaml:3:12: unknown key 'memroy' in limits (did you mean 'memory'?)",
        "schedd.yaml:9:22: limits.memory must be bytes or an amount with K, M, G or T"
        " (binary units: 256M is 256 MiB) (got '12MB')",
        "schedd.yaml:9:33: limits.cpu must be greater than 0 (got 0)",
        "schedd.yaml:9:48: limits.open_files must be a whole number >= 1 (got 0)",
        "schedd.yaml:9:62: limits.processes must be a whole number >= 1 (got 'many')",
        "schedd.yaml:14:22: limits.memory must be at least 1M (got '100K')",
        "schedd.yaml:14:33: limits.cpu must be a duration (got 'soon');"
        " use seconds (90, 1.5) or amounts with units ms, s, m, h, d, w (250ms, 5m, 1h30m, 2d)",
        "schedd.yaml:14:39: unknown key 'swap' in limits;"
        " known keys: memory, cpu, open_files, processes, nice",
        "schedd.yaml:19:13: limits must be a mapping (got 5)",
    ]


def test_nice_merges_and_bad_values_are_located_errors(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        defaults:
          limits: {nice: 10}
        jobs:
          plain: {task: shell, every: 1h, params: {command: "true"}}
          own: {task: shell, every: 1h, params: {command: "true"}, limits: {nice: 19}}
        """,
    )
    assert config.jobs["plain"].limits == Limits(nice=10)
    assert config.jobs["own"].limits == Limits(nice=19)
    bad = "{task: shell, every: 1h, params: {command: 'true'}, limits: {nice: %s}}"
    assert errors(
        tmp_path, "jobs:\n" + "".join(f"  j{v}: {bad % v}\n" for v in ("20", "-21", "1.5", "x"))
    ) == [
        f"schedd.yaml:{i}:{len(f'  j{v}: ') + bad.index('%s') + 1}: limits.nice must be"
        f" a whole number from -20 to 19 (below 0 needs root; got {shown})"
        for i, (v, shown) in enumerate(
            [("20", "20"), ("-21", "-21"), ("1.5", "1.5"), ("x", "'x'")], start=2
        )
    ]


def test_a_negative_nice_needs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without root: an error where the nice that applies is written (each place once)
    when the file is loaded to run, a warning for ``validate``; 0..19 is fine."""
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    text = """
        defaults:
          limits: {nice: -5}
        jobs:
          a: {task: shell, every: 1h, params: {command: "true"}}
          b: {task: shell, every: 1h, params: {command: "true"}, limits: {nice: -1}}
          c: {task: shell, every: 1h, params: {command: "true"}, limits: {nice: 3}}
        """
    got = errors(tmp_path, text)
    assert len(got) == 2, got
    assert got[0].startswith("schedd.yaml:3:18: nice -5 (a higher priority) needs schedd")
    assert got[1].startswith("schedd.yaml:6:73: nice -1 (a higher priority) needs schedd")
    path = tmp_path / "schedd.yaml"
    config = load_config(path, REGISTRY, to_run=False)
    assert config.jobs["a"].limits == Limits(nice=-5)
    assert config.jobs["c"].limits == Limits(nice=3)
    assert any("nice -5 takes effect only when" in str(w) for w in config.warnings)
    jobs = "".join(
        f"  j{i}: {{task: shell, every: 1h, params: {{command: x}}}}\n" for i in range(250)
    )
    with pytest.raises(ConfigError):  # the fast path of a big file says it too
        load(tmp_path, f"defaults:\n  limits: {{nice: -2}}\njobs:\n{jobs}")


# -- runs that hit their limits ---------------------------------------------------------


@pytest.fixture(scope="module")
def confined(col: Collector) -> Iterator[Runner]:
    """A runner with this machine's cgroups (the daemon's choice)."""
    r = Runner(on_line=col.on_line, on_event=col.on_event, cgroups="auto")
    r.start()
    yield r
    r.close(grace=1.0)


@pytest.fixture(scope="module")
def bare(col: Collector) -> Iterator[Runner]:
    """A runner without cgroups: rlimits only."""
    r = Runner(on_line=col.on_line, on_event=col.on_event, cgroups=None)
    r.start()
    yield r
    r.close(grace=1.0)


_ids = iter(range(1, 1 << 30))


def run(
    runner: Runner,
    target: str,
    limits: Limits | None,
    params: dict[str, Any] | None = None,
    run_as: str | None = None,
) -> tuple[RunResult, str]:
    run_id = f"{target}-{os.getpid()}-{next(_ids)}"
    ctx = RunContext(job_id="job", run_id=run_id, task="test", params=params or {})
    req = RunRequest(
        run_id=run_id,
        job_id="job",
        target=f"tests.limit_tasks:{target}",
        ctx=ctx,
        timeout=60,
        kill_grace=1.0,
        limits=limits,
        run_as=confine.resolve_run_as(run_as) if run_as else None,
    )
    res = runner.launch(req).wait(90)
    assert res is not None
    return res, run_id


def groups_of(run_id: str) -> list[Path]:
    """Where the run's cgroups were (or would have been) created."""
    bases = CGROUPS.bases() if CGROUPS is not None else []
    return [Path(b) / run_id for b in bases]


def assert_no_group_left(run_id: str) -> None:
    left = [g for g in groups_of(run_id) if g.exists()]
    assert not left, f"cgroups left behind: {left}"


@ROOT_ONLY
def test_the_machine_s_cgroups_are_used(confined: Runner, col: Collector) -> None:
    res, run_id = run(confined, "status", Limits(memory=256 << 20, processes=50))
    assert res.status == "success" and res.reason is None
    info = json.loads(col.out(run_id)[0])
    if CGROUPS is None:
        pytest.skip("no usable cgroup on this machine: rlimits only")
    inside = [line for line in info["cgroup"] if line.endswith(f"/{run_id}")]
    assert inside, info["cgroup"]  # the task joined its own group ...
    assert not any(run_id in line for line in info["parent_cgroup"])  # ... its supervisor did not
    assert_no_group_left(run_id)
    print(f"cgroups exercised: {CGROUPS.describe()}: {inside}")


def test_memory_limit_memory_error(confined: Runner, col: Collector) -> None:
    res, run_id = run(confined, "hog_memory", Limits(memory=256 << 20))
    assert (res.status, res.error) == ("failed", "MemoryError")
    assert res.reason == "memory limit 256M reached"
    assert_no_group_left(run_id)


@ROOT_ONLY
@needs_memory_cgroup
def test_memory_limit_of_the_whole_run_through_the_cgroup(confined: Runner, col: Collector) -> None:
    """Four children of 64 MiB each fit the per-process RLIMIT_AS of 192M, not the group."""
    res, run_id = run(confined, "oom_tree", Limits(memory=192 << 20), {"mib": 64, "children": 4})
    assert res.status == "failed" and res.exit_code == 1
    assert res.reason == "memory limit 192M reached"
    killed = int(col.out(run_id)[0].split(": ")[1])
    assert killed >= 1  # the OOM killer picked children, never the supervisor
    assert_no_group_left(run_id)


def test_cpu_limit_sigxcpu(confined: Runner) -> None:
    res, run_id = run(confined, "spin", Limits(cpu=1))
    assert (res.status, res.signal) == ("killed", "SIGXCPU")
    assert res.reason == "cpu limit 1s exceeded (SIGXCPU)"
    assert 1 <= res.duration < 30
    assert_no_group_left(run_id)  # a cpu limit alone needs no cgroup: none was made


def test_cpu_limit_sigkill_when_sigxcpu_is_ignored(confined: Runner) -> None:
    res, _ = run(confined, "spin_past_sigxcpu", Limits(cpu=1))
    assert (res.status, res.signal) == ("killed", "SIGKILL")
    assert res.reason == "cpu limit 1s exceeded (SIGKILL)"


def test_open_files_limit(confined: Runner, col: Collector) -> None:
    res, run_id = run(confined, "open_files", Limits(open_files=64))
    assert (res.status, res.error) == ("failed", "OSError")
    assert res.reason == "open files limit 64 reached"
    assert any("Too many open files" in line for line in col.out(run_id, "stderr"))


@ROOT_ONLY
@needs_pids_cgroup
def test_process_limit_through_the_pids_cgroup(confined: Runner, col: Collector) -> None:
    res, run_id = run(confined, "fork_bomb", Limits(processes=20))
    assert (res.status, res.error) == ("failed", "BlockingIOError")
    assert res.reason == "process limit 20 reached"
    assert_no_group_left(run_id)


def test_process_limit_without_a_cgroup_is_rlimit_nproc(bare: Runner, col: Collector) -> None:
    """RLIMIT_NPROC counts the user's processes; root is exempt, so run as nobody."""
    res, run_id = run_as_nobody(bare, "fork_bomb", Limits(processes=20))
    assert (res.status, res.error) == ("failed", "BlockingIOError")
    assert res.reason == "process limit 20 reached"
    assert not [g for g in groups_of(run_id) if g.exists()]


def run_as_nobody(runner: Runner, target: str, limits: Limits) -> tuple[RunResult, str]:
    if os.geteuid() != 0:
        pytest.skip("needs root to run as nobody")
    return run(runner, target, limits, run_as="nobody")


def _priority(res: RunResult, run_id: str, col: Collector) -> dict[str, int]:
    assert res.status == "success", (res, col.out(run_id, "stderr"))
    (line,) = col.out(run_id)
    info: dict[str, int] = json.loads(line)
    return info


def test_nice_lowers_the_task_and_its_children(confined: Runner, col: Collector) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)  # the runner's, as the daemon's
    res, run_id = run(confined, "priority", None)
    assert _priority(res, run_id, col) == {"getpriority": base, "stat": base, "child": base}
    res, run_id = run(confined, "priority", Limits(nice=7))
    want = min(19, base + 7)
    assert _priority(res, run_id, col) == {"getpriority": want, "stat": want, "child": want}
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # only the task changed


@ROOT_ONLY
def test_a_negative_nice_as_root_also_with_run_as(confined: Runner, col: Collector) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    want = max(-20, base - 3)
    res, run_id = run(confined, "priority", Limits(nice=-3))
    assert _priority(res, run_id, col) == {"getpriority": want, "stat": want, "child": want}
    res, run_id = run_as_nobody(confined, "priority", Limits(nice=-3))  # set before the drop
    assert _priority(res, run_id, col) == {"getpriority": want, "stat": want, "child": want}


def test_a_run_within_its_limits_has_no_reason(confined: Runner) -> None:
    res, run_id = run(confined, "status", Limits(memory=512 << 20, cpu=30, open_files=128))
    assert (res.status, res.reason) == ("success", None)
    assert_no_group_left(run_id)


# -- through a real daemon --------------------------------------------------------------


def test_daemon_records_the_limit_in_the_ledger_and_history(
    daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    stale = None
    if CGROUPS is not None and os.geteuid() == 0:
        stale = Path(CGROUPS.bases()[0]) / "stale-run-from-a-crash"
        stale.mkdir(exist_ok=True)
    d = daemon(
        """
        defaults:
          limits: {open_files: 32}
        jobs:
          files:
            task: python
            every: 1d
            params: {target: "tests.limit_tasks:open_files"}
            limits: {memory: 256M}
        """
    ).start()
    log = d.daemon_log()
    assert "resource limits: " in log
    if CGROUPS is not None:
        assert f"limits use {CGROUPS.describe()} and rlimits" in log
    if stale is not None:
        assert not stale.exists()
        assert "removed 1 stale run cgroup(s)" in log

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*schedd(*args), "--state-dir", str(d.state)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
        )

    run_id = json.loads(cli("trigger", "files", "--json").stdout)["run_id"]

    def recorded() -> bool:
        rows = json.loads(cli("history", "files", "--json").stdout)
        return bool(rows) and rows[0]["status"] != "running"

    wait_for(recorded, what="the run's ledger row")
    (row,) = json.loads(cli("history", "files", "--json").stdout)
    assert (row["run_id"], row["status"]) == (run_id, "failed")
    assert row["reason"] == "open files limit 32 reached"
    table = cli("history", "files").stdout
    assert "open files limit 32 reached" in table
    assert_no_group_left(run_id)  # removed before the result was reported


def test_daemon_runs_a_job_with_its_nice(daemon: Callable[..., Daemon]) -> None:
    d = daemon(
        """
        jobs:
          low:
            task: python
            every: 1d
            params: {target: "tests.limit_tasks:priority"}
            limits: {nice: 6}
        """
    ).start()
    out = subprocess.run(
        [*schedd("trigger", "low", "--json"), "--state-dir", str(d.state)],
        capture_output=True, text=True, cwd=ROOT, timeout=30, check=True,
    )  # fmt: skip
    run_id = json.loads(out.stdout)["run_id"]
    wait_for(lambda: f"{run_id} stdout: {{" in d.job_log("low"), what="the task's line")
    line = next(ln for ln in d.job_log("low").splitlines() if f"{run_id} stdout: {{" in ln)
    info = json.loads(line.split(" stdout: ", 1)[1])
    want = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 6)  # the daemon inherits ours
    assert info == {"getpriority": want, "stat": want, "child": want}


@ROOT_ONLY
def test_a_process_limit_root_cannot_be_held_to_is_said(bare: Runner, col: Collector) -> None:
    res, run_id = run(bare, "status", Limits(processes=20))
    assert res.status == "success"
    assert any("process limit 20 not enforced" in e for e in col.events.get(run_id, []))


# -- detection, on a made-up /proc and cgroup tree ------------------------------------


def fake_proc(tmp_path: Path, mounts: list[str], groups: list[str]) -> str:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mountinfo").write_text("".join(f"{n} 23 0:{n} {m}\n" for n, m in enumerate(mounts)))
    (proc / "cgroup").write_text("".join(g + "\n" for g in groups))
    return str(proc)


def test_detect_prefers_cgroup_v2_with_controllers(tmp_path: Path) -> None:
    fs = tmp_path / "cg"
    own = fs / "system.slice" / "schedd.service"
    (own / "schedd").mkdir(parents=True)
    (own / "cgroup.controllers").write_text("cpu io memory pids\n")
    (own / "cgroup.subtree_control").write_text("\n")
    (own / "schedd" / "cgroup.subtree_control").write_text("")  # as the kernel makes it
    proc = fake_proc(
        tmp_path,
        [f"/ {fs} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate"],
        ["0::/system.slice/schedd.service"],
    )
    found, how = cgroups.detect(proc)
    assert found == cgroups.Cgroups("v2", str(own / "schedd"), str(own / "schedd"))
    assert how == f"limits use cgroup v2 at {own / 'schedd'} and rlimits"
    assert (own / "cgroup.subtree_control").read_text() == "+memory +pids"
    assert (own / "schedd" / "cgroup.subtree_control").read_text() == "+memory +pids"


def test_detect_falls_back_to_v1_memory_and_pids(tmp_path: Path) -> None:
    fs = tmp_path / "cg"
    (fs / "unified").mkdir(parents=True)
    (fs / "unified" / "cgroup.controllers").write_text("\n")  # v2 without controllers
    proc = fake_proc(
        tmp_path,
        [
            f"/ {fs}/unified rw - cgroup2 cgroup2 rw",
            f"/ {fs}/memory rw - cgroup cgroup rw,memory",
            f"/ {fs}/pids rw - cgroup cgroup rw,pids",
            f"/ {fs}/cpu rw - cgroup cgroup rw,cpu",
        ],
        ["9:pids:/", "4:memory:/api/abc", "1:cpu:/", "0::/"],
    )
    found, how = cgroups.detect(proc)
    assert found == cgroups.Cgroups("v1", f"{fs}/memory/api/abc/schedd", f"{fs}/pids/schedd")
    assert how.startswith("limits use cgroup v1 (memory at ")
    assert Path(f"{fs}/memory/api/abc/schedd").is_dir()


def test_detect_without_cgroups_says_rlimits_only(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, [f"/ {tmp_path} rw - ext4 /dev/sda1 rw"], ["0::/"])
    found, how = cgroups.detect(proc)
    assert found is None
    assert how.endswith("limits use rlimits only")


@ROOT_ONLY  # run_as in a file loaded to run needs root
def test_null_in_a_job_drops_defaults_limits_and_run_as(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        defaults:
          limits: {memory: 256M}
          run_as: root
        jobs:
          free: {task: shell, every: 1h, params: {command: "true"}, limits: null, run_as: null}
          held: {task: shell, every: 1h, params: {command: "true"}}
        """,
    )
    assert (config.jobs["free"].limits, config.jobs["free"].run_as) == (None, None)
    held = config.jobs["held"]
    assert held.limits == Limits(memory=256 << 20) and held.run_as is not None
    assert (held.run_as.user, held.run_as.uid) == ("root", 0)


@ROOT_ONLY
@needs_pids_cgroup
def test_run_once_of_a_shell_job_names_the_cgroup_limit(tmp_path: Path) -> None:
    """A shell cannot say why its fork failed; the pids cgroup's events can."""
    (tmp_path / "schedd.yaml").write_text(
        textwrap.dedent(
            """
            jobs:
              forks:
                task: shell
                every: 1h
                limits: {processes: 5}
                params: {command: "for i in 1 2 3 4 5 6 7 8; do sleep 2 & done; wait"}
            """
        )
    )
    res = subprocess.run(
        schedd("run-once", "forks", "--config", str(tmp_path / "schedd.yaml")),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("schedd: run ") and last.endswith(": process limit 5 reached"), last


def test_limits_too_large_for_setrlimit_are_located_errors(tmp_path: Path) -> None:
    """Found in review: these raised OverflowError out of the loader, or failed every run."""
    nines = "9" * 400
    found = errors(
        tmp_path,
        f"""
        jobs:
          a:
            task: shell
            every: 1h
            params: {{command: "true"}}
            limits: {{memory: "{nines}M", open_files: {10**30}, processes: {2**31}}}
          b:
            task: shell
            every: 1h
            params: {{command: "true"}}
            limits: {{memory: {2**63}}}
        """,
    )
    assert len(found) == 4
    assert found[0].startswith(
        f"schedd.yaml:7:22: limits.memory must be at most 8E, {2**63 - 1} bytes (got '999"
    )
    assert found[1:] == [
        f"schedd.yaml:7:439: limits.open_files must be at most 2147483647 (got {10**30})",
        "schedd.yaml:7:483: limits.processes must be at most 2147483647 (got 2147483648)",
        f"schedd.yaml:12:22: limits.memory must be at most 8E, {2**63 - 1} bytes (got {2**63})",
    ]
