"""The daemon end to end: a real `schedd run` process, real runs, real signals."""

from __future__ import annotations

import signal
import subprocess
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import ROOT, Daemon, alive, daemon, schedd, wait_for

__all__ = ["daemon"]  # the fixture


def test_fires_runs_logs_literally_and_drains_on_sigterm(daemon: Callable[..., Daemon]) -> None:
    d = daemon(
        """
        jobs:
          echo:
            task: shell
            every: 1s
            params:
              command: 'echo "braces {} {name} stay"; echo "to stderr" >&2'
        """
    ).start()
    wait_for(lambda: d.job_log("echo").count("braces {} {name} stay") >= 2, what="two runs")
    log = d.job_log("echo")
    assert " stdout: braces {} {name} stay" in log
    assert " stderr: to stderr" in log
    assert "ended: success" in log
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
    assert "schedd stopped" in d.daemon_log()
    assert "success" in d.daemon_log()


def test_timeout_ends_the_whole_tree(daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    d = daemon(
        f"""
        jobs:
          slow:
            task: shell
            every: 2s
            timeout: 1s
            kill_grace: 0.5s
            params:
              command: >-
                sleep 60 & echo $! >> {pids};
                setsid sleep 60 & echo $! >> {pids};
                trap '' TERM; sleep 60
        """
    ).start()
    wait_for(lambda: "ended: timeout" in d.job_log("slow"), what="a timed-out run")
    log = d.job_log("slow")
    assert "sent SIGTERM" in log and "sent SIGKILL" in log
    recorded = [int(p) for p in pids.read_text().split()]
    assert len(recorded) >= 2
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
    wait_for(lambda: not any(alive(p) for p in recorded), timeout=5, what="tree ended")


def test_run_once_exit_statuses(tmp_path: Path) -> None:
    config = tmp_path / "schedd.yaml"
    config.write_text(
        textwrap.dedent(
            """
            jobs:
              ok:
                task: shell
                every: 1h
                params: {command: 'echo hi there'}
              bad:
                task: shell
                every: 1h
                params: {command: 'echo oops >&2; exit 3'}
              slow:
                task: shell
                every: 1h
                timeout: 0.5s
                kill_grace: 0.5s
                params: {command: 'sleep 30'}
              boom:
                task: python
                every: 1h
                params: {target: 'json:loads', args: ['not json']}
            """
        )
    )

    def run(job: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            schedd("run-once", job, "--config", str(config)),
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
        )

    ok = run("ok")
    assert ok.returncode == 0 and ok.stdout == "hi there\n"
    bad = run("bad")
    assert bad.returncode == 3 and "oops" in bad.stderr and "failed" in bad.stderr
    slow = run("slow")
    assert slow.returncode == 124 and "timeout" in slow.stderr
    boom = run("boom")
    assert boom.returncode == 1 and "JSONDecodeError" in boom.stderr
    missing = run("okk")
    assert missing.returncode == 1 and "did you mean 'ok'" in missing.stderr


def test_reload_rejects_a_broken_file_and_applies_a_good_one(
    daemon: Callable[..., Daemon],
) -> None:
    d = daemon(
        """
        jobs:
          a:
            task: shell
            every: 1s
            params: {command: 'echo from-a'}
        """
    ).start()
    wait_for(lambda: "from-a" in d.job_log("a"), what="job a runs")
    d.config.write_text("jobs:\n  a:\n    task: shell\n    evry: 1s\n")
    d.signal(signal.SIGHUP)
    wait_for(lambda: "reload rejected" in d.daemon_log(), what="rejected reload")
    assert "schedd.yaml:4:5: unknown key 'evry'" in d.daemon_log()
    count = d.job_log("a").count("from-a")
    wait_for(lambda: d.job_log("a").count("from-a") > count + 1, what="old schedule continues")
    d.config.write_text(
        "jobs:\n  b:\n    task: shell\n    every: 1s\n    params: {command: 'echo from-b'}\n"
    )
    d.signal(signal.SIGHUP)
    wait_for(lambda: "reload applied" in d.daemon_log(), what="applied reload")
    wait_for(lambda: "from-b" in d.job_log("b"), what="job b runs")
    time.sleep(1.5)
    count = d.job_log("a").count("from-a")
    time.sleep(2.5)
    assert d.job_log("a").count("from-a") == count  # a no longer fires
    d.signal(signal.SIGTERM)
    assert d.wait() == 0


def test_sigterm_lets_a_running_run_finish(daemon: Callable[..., Daemon]) -> None:
    d = daemon(
        """
        jobs:
          work:
            task: shell
            every: 1s
            params: {command: 'echo begin; sleep 1.5; echo finished'}
        """,
        "--shutdown-grace",
        "10s",
    ).start()
    wait_for(lambda: "begin" in d.job_log("work"), what="run began")
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
    assert "finished" in d.job_log("work")


def test_second_daemon_on_same_state_dir_is_refused(daemon: Callable[..., Daemon]) -> None:
    config = """
        jobs:
          idle:
            task: shell
            every: 1h
            params: {command: 'true'}
        """
    first = daemon(config).start()
    second = subprocess.run(
        schedd("run", "--config", str(first.config), "--state-dir", str(first.state)),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert second.returncode == 1
    assert f"another schedd daemon (pid {first.proc.pid})" in second.stderr  # type: ignore[union-attr]
    first.signal(signal.SIGTERM)
    assert first.wait() == 0


def test_kill_9_of_the_daemon_ends_its_runs(daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    d = daemon(
        f"""
        jobs:
          long:
            task: shell
            every: 1s
            kill_grace: 1s
            params:
              command: "setsid sleep 120 & echo $! >> {pids}; echo $$ >> {pids}; sleep 120"
        """
    ).start()
    wait_for(lambda: pids.exists() and len(pids.read_text().split()) >= 2, what="run started")
    recorded = [int(p) for p in pids.read_text().split()]
    assert all(alive(p) for p in recorded)
    d.signal(signal.SIGKILL)
    d.wait()
    wait_for(lambda: not any(alive(p) for p in recorded), timeout=10, what="runs ended")


def test_invalid_config_starts_nothing(tmp_path: Path) -> None:
    config = tmp_path / "schedd.yaml"
    config.write_text("jobs:\n  x:\n    task: shel\n    every: 1s\n")
    state = tmp_path / "state"
    res = subprocess.run(
        schedd("run", "--config", str(config), "--state-dir", str(state)),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert res.returncode == 1
    assert "did you mean 'shell'" in res.stderr
    assert "Traceback" not in res.stderr
    assert not state.exists()


def test_a_loader_bug_on_reload_keeps_the_old_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not bad input but a bug in schedd itself: the reload is rejected, nothing is applied."""
    import scheduler.config
    from scheduler.config import load_config
    from scheduler.daemon import Daemon as InProcess
    from scheduler.plugins import load_plugins

    path = tmp_path / "schedd.yaml"
    path.write_text("jobs:\n  a:\n    task: shell\n    every: 1h\n    params: {command: 'true'}\n")
    _, registry = load_plugins()
    before = load_config(path, registry)
    d = InProcess(before, registry, tmp_path / "state", echo=False)

    def boom(*_a: object, **_k: object) -> None:
        raise RuntimeError("loader bug")

    monkeypatch.setattr(scheduler.config, "load_config", boom)
    result = d.reload()
    assert not result.ok
    assert result.errors == [f"{path}: internal error while loading: RuntimeError"]
    assert d.config is before
