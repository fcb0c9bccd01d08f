"""Nothing a run starts survives it: timeouts, escapees, grace, daemon and supervisor death."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from scheduler import procs
from scheduler.runner import Runner
from tests.runner_tasks import Collector, read_pids, request, wait_gone

ROOT = Path(__file__).resolve().parent.parent


def _no_zombies(runner: Runner) -> list[int]:
    """The launcher's children after a short settle: its supervisors must all be reaped."""
    pid = runner.launcher_pid
    assert pid is not None
    deadline = time.monotonic() + 2
    while procs.children(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    return procs.children(pid)


def test_timeout_ends_whole_tree_including_escapees_and_term_ignorers(
    runner: Runner, col: Collector, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pids"
    params = {"pidfile": str(pidfile), "ignore_term": True}
    req = request("escapees", params, timeout=0.7, kill_grace=0.4)
    h = runner.launch(req)
    pids = read_pids(pidfile)
    assert set(pids) == {"task", "setsid", "grandchild"}
    assert pids["task"] == h.pid
    assert os.getsid(pids["setsid"]) == pids["setsid"], "the escapee left the run's session"
    res = h.wait(10)
    assert res is not None and res.status == "timeout"
    assert res.signal == "SIGTERM", "the task itself does not ignore SIGTERM"
    events = col.events[req.run_id]
    assert events[0] == "timeout after 0.7s: sent SIGTERM to 3 processes"
    assert events[1] == "grace 0.4s expired: sent SIGKILL to 2 processes"
    assert wait_gone(pids.values(), timeout=0) == []  # gone by the time the result is out
    assert _no_zombies(runner) == []


def test_kill_grace_is_respected(runner: Runner, col: Collector) -> None:
    req = request("stubborn", timeout=0.3, kill_grace=0.8)
    h = runner.launch(req)
    res = h.wait(10)
    assert res is not None and (res.status, res.signal) == ("timeout", "SIGKILL")
    assert h.task_started is not None
    ran = res.ended_at.timestamp() - h.task_started
    assert 1.0 <= ran < 2.5, ran  # 0.3 s timeout + 0.8 s grace
    assert col.events[req.run_id] == [
        "timeout after 0.3s: sent SIGTERM to 1 process",
        "grace 0.8s expired: sent SIGKILL to 1 process",
    ]


def test_timeout_of_a_term_respecting_task_does_not_wait_for_grace(runner: Runner) -> None:
    h = runner.launch(request("sleep", {"seconds": 30}, timeout=0.3, kill_grace=10))
    res = h.wait(10)
    assert res is not None and (res.status, res.signal) == ("timeout", "SIGTERM")
    assert res.duration < 2


def test_background_processes_left_by_a_finished_task_are_ended(
    runner: Runner, col: Collector, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pids"
    req = request("escapees", {"pidfile": str(pidfile), "exit": True}, kill_grace=0.5)
    h = runner.launch(req)
    res = h.wait(10)
    assert res is not None and (res.status, res.exit_code) == ("success", 0)
    assert col.events[req.run_id] == [
        "task exited, processes left behind: sent SIGTERM to 2 processes"
    ]
    assert wait_gone(read_pids(pidfile).values(), timeout=0) == []


def test_cancel_ends_escapees_too(runner: Runner, col: Collector, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    params = {"pidfile": str(pidfile), "ignore_term": True}
    h = runner.launch(request("escapees", params, kill_grace=0.3))
    pids = read_pids(pidfile)
    h.cancel("operator asked")
    res = h.wait(10)
    assert res is not None and (res.status, h.reason) == ("killed", "operator asked")
    assert col.events[h.run_id] == [
        "cancelled: sent SIGTERM to 3 processes",
        "grace 0.3s expired: sent SIGKILL to 2 processes",
    ]
    assert wait_gone(pids.values(), timeout=0) == []


def test_child_hygiene_session_fds_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHEDD_DAEMON_SECRET", "hunter2")
    col = Collector()
    r = Runner(on_line=col.on_line)  # the launcher's env is computed now
    r.start()
    try:
        req = request("list_fds", env={"A": "b"})
        assert r.launch(req).wait(10).status == "success"  # type: ignore[union-attr]
    finally:
        r.close(1)
    got = json.loads(col.out(req.run_id)[0])
    assert got["pgid"] == got["pid"]
    assert got["sid"] not in (os.getsid(0), got["pid"]), "own session, led by the supervisor"
    # 0-2, the status pipe, and the fd listdir itself used: nothing of the daemon or launcher.
    assert len(got["fds"]) == 5, got["targets"]
    assert got["targets"]["0"] == "/dev/null"
    assert all("socket" not in t for t in got["targets"].values())
    assert not any("hunter2" in v for v in got["environ"]), "the daemon's env leaked"


def test_task_starts_with_default_signal_dispositions_and_no_mask(
    runner: Runner, col: Collector
) -> None:
    """The launcher blocks the signals it waits for and installs no handler: nothing leaks."""
    req = request("signal_state")
    assert runner.launch(req).wait(10).status == "success"  # type: ignore[union-attr]
    got = json.loads(col.out(req.run_id)[0])
    dfl = str(signal.SIG_DFL)
    assert got["handlers"] == {
        "SIGTERM": dfl,
        "SIGHUP": dfl,
        "SIGCHLD": dfl,
        "SIGUSR1": dfl,
        "SIGINT": "default_int_handler",
    }
    assert got["blocked"] == []


def test_supervisor_sigkilled_leaves_nothing_behind(runner: Runner, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    h = runner.launch(request("escapees", {"pidfile": str(pidfile), "ignore_term": True}))
    pids = read_pids(pidfile)
    sup = Path(f"/proc/{pids['task']}/stat").read_text().rsplit(")", 1)[1].split()[1]
    os.kill(int(sup), signal.SIGKILL)
    res = h.wait(10)
    assert res is not None and res.status == "killed"
    assert h.reason == "the run's supervisor ended without reporting a result"
    assert wait_gone([*pids.values(), int(sup)]) == []
    assert _no_zombies(runner) == []


DAEMON = textwrap.dedent(
    """
    import json, sys, time
    from scheduler.runner import Runner
    from tests.runner_tasks import read_pids, request

    r = Runner(on_line=lambda *a: None)
    r.start()
    params = {"pidfile": sys.argv[1], "ignore_term": True}
    h = r.launch(request("escapees", params, kill_grace=0.5))
    read_pids(__import__("pathlib").Path(sys.argv[1]))
    print(json.dumps({"launcher": r.launcher_pid}), flush=True)
    time.sleep(600)
    """
)


def test_daemon_sigkill_leaves_nothing_of_its_runs(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    script = tmp_path / "daemon.py"
    script.write_text(DAEMON)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    daemon = subprocess.Popen(
        [sys.executable, str(script), str(pidfile)], cwd=ROOT, env=env, stdout=subprocess.PIPE
    )
    try:
        assert daemon.stdout is not None
        launcher = json.loads(daemon.stdout.readline())["launcher"]
        pids = read_pids(pidfile)
        sup = int(Path(f"/proc/{pids['task']}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert len(pids) == 3 and procs.alive(sup) and procs.alive(launcher)
    finally:
        daemon.kill()
        daemon.wait()
    # Supervisors end their trees (SIGTERM, 0.5 s grace, SIGKILL); the launcher then exits.
    assert wait_gone(pids.values(), timeout=5) == []
    assert wait_gone([sup], timeout=5) == []
    assert wait_gone([launcher], timeout=5, zombies_ok=True) == []  # init reaps it


def test_run_resolves_even_if_strays_keep_its_output_open(tmp_path: Path) -> None:
    """Supervisor SIGKILLed while the launcher is stopped: nobody ends the escapees yet.

    The run must still resolve (after OUTPUT_LINGER), and once the launcher
    runs again it kills the orphans it inherited.
    """
    r = Runner(on_line=lambda *a: None)
    r.start()
    launcher = r.launcher_pid
    assert launcher is not None
    pidfile = tmp_path / "pids"
    try:
        h = r.launch(request("escapees", {"pidfile": str(pidfile), "ignore_term": True}))
        pids = read_pids(pidfile)
        sup = int(Path(f"/proc/{pids['task']}/stat").read_text().rsplit(")", 1)[1].split()[1])
        os.kill(launcher, signal.SIGSTOP)
        try:
            os.kill(sup, signal.SIGKILL)
            res = h.wait(10)
            assert res is not None and res.status == "killed"
            assert procs.alive(pids["setsid"]), "the stray was still alive, holding stdout"
        finally:
            os.kill(launcher, signal.SIGCONT)
        assert wait_gone(pids.values()) == []
    finally:
        r.close(1)
