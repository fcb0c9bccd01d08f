"""Every control command against a real daemon, plus the ledger it keeps."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers import ROOT, Daemon, alive, daemon, schedd, wait_for

__all__ = ["daemon"]  # the fixture

CONFIG = """
jobs:
  tick:
    task: shell
    every: 1s
    params: {command: 'echo tick $SCHEDD_RUN_ID'}
  manual:
    task: shell
    every: 1d
    params: {command: 'echo manual run; sleep 0.2'}
  tree:
    task: shell
    every: 1d
    kill_grace: 1s
    params:
      command: "setsid sleep 120 & echo $! > {pids}; trap '' TERM; sleep 120"
"""


def cli(d: Daemon, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*schedd(*args), "--state-dir", str(d.state)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


def cli_json(d: Daemon, *args: str) -> Any:
    res = cli(d, *args, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def start(daemon: Callable[..., Daemon], tmp_path: Path) -> Daemon:
    return daemon(CONFIG.replace("{pids}", str(tmp_path / "pids"))).start()


def test_status_jobs_trigger_history(daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = start(daemon, tmp_path)
    status = cli_json(d, "status")
    assert status["pid"] == d.proc.pid  # type: ignore[union-attr]
    assert status["jobs"] == 3 and status["config_path"] == str(d.config)
    answer = cli_json(d, "trigger", "manual")
    run_id = answer["run_id"]
    assert run_id and answer["message"].startswith("started")
    wait_for(lambda: "manual run" in d.job_log("manual"), what="manual run output")

    def finished() -> bool:
        rows = cli_json(d, "history", "manual")
        return bool(rows) and rows[0]["status"] == "success"

    wait_for(finished, what="manual run recorded")
    (row,) = cli_json(d, "history", "manual")
    for key in ("run_id", "job", "scheduled_for", "started_at", "ended_at", "status",
                "exit_code", "attempt", "pid", "node", "log_path"):  # fmt: skip
        assert key in row, key
    assert row["run_id"] == run_id and row["exit_code"] == 0 and row["scheduled_for"] is None
    jobs = {j["id"]: j for j in cli_json(d, "jobs")}
    assert jobs["manual"]["last"]["status"] == "success"
    assert jobs["tick"]["paused"] is False and jobs["tick"]["next_fire"]
    text = cli(d, "jobs").stdout
    assert "LAST" in text.splitlines()[0]
    hist = cli(d, "history", "-n", "3")
    assert hist.returncode == 0 and hist.stdout.startswith("RUN")
    unknown = cli(d, "trigger", "nope")
    assert unknown.returncode == 1 and "no job 'nope'" in unknown.stderr


def test_pause_survives_a_restart(daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = start(daemon, tmp_path)
    assert cli_json(d, "pause", "tick")["changed"] == ["tick"]
    stop = cli(d, "stop")
    assert stop.returncode == 0, stop.stderr
    assert d.proc.poll() == 0  # type: ignore[union-attr]
    count = d.job_log("tick").count("tick ")
    d.start()
    jobs = {j["id"]: j for j in cli_json(d, "jobs")}
    assert jobs["tick"]["paused"] is True
    time.sleep(2.5)
    assert d.job_log("tick").count("tick ") == count  # paused: no fires
    assert cli_json(d, "resume", "--all")["changed"] == ["tick"]
    wait_for(lambda: d.job_log("tick").count("tick ") > count, what="resumed job fires")


def test_rejected_reload_returns_located_errors(
    daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    d = start(daemon, tmp_path)
    good = d.config.read_text()
    d.config.write_text(good.replace("every: 1s", "every: often"))
    res = cli(d, "reload")
    assert res.returncode == 1
    assert "schedd.yaml:5:12:" in res.stderr and "the old schedule keeps running" in res.stderr
    count = d.job_log("tick").count("tick ")
    wait_for(lambda: d.job_log("tick").count("tick ") > count, what="old schedule runs")
    extra = "  extra:\n    task: shell\n    every: 1h\n    params: {command: x}\n"
    d.config.write_text(good + extra)
    applied = cli_json(d, "reload")
    assert applied["ok"] is True and applied["added"] == ["extra"]
    assert cli_json(d, "status")["last_reload"]["ok"] is True


def test_logs_follow_receives_new_lines(daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = start(daemon, tmp_path)
    wait_for(lambda: "tick " in d.job_log("tick"), what="first tick")
    follow = subprocess.Popen(
        [*schedd("logs", "tick", "--follow", "--lines", "1"), "--state-dir", str(d.state)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert follow.stdout is not None
    seen = [follow.stdout.readline() for _ in range(6)]
    follow.send_signal(signal.SIGINT)
    assert follow.wait(10) == 0
    run_ids = {line.split()[2] for line in seen if " stdout: tick " in line}
    assert len(run_ids) >= 2  # lines of later runs arrived while following


def test_cancel_ends_the_whole_tree(daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = start(daemon, tmp_path)
    run_id = cli_json(d, "trigger", "tree")["run_id"]
    pids = tmp_path / "pids"
    wait_for(lambda: pids.exists() and pids.read_text().strip() != "", what="escapee pid")
    escapee = int(pids.read_text())
    assert alive(escapee)
    running = [r["run_id"] for r in cli_json(d, "status")["running"]]
    assert run_id in running
    assert cli_json(d, "cancel", run_id)["job"] == "tree"
    wait_for(lambda: not alive(escapee), timeout=10, what="escapee ended")

    def recorded() -> bool:
        rows = cli_json(d, "history", "tree")
        return bool(rows) and rows[0]["status"] == "killed"

    wait_for(recorded, what="killed recorded")
    assert "cancel" in cli_json(d, "history", "tree")[0]["reason"]


def test_socket_is_private_and_survives_garbage(daemon: Callable[..., Daemon]) -> None:
    # pytest's tmp dirs are 0700: use a traversable one so only the daemon's own
    # fences (socket mode, then the peer-credential check) stand in the way.
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="schedd-peer-"))
    base.chmod(0o755)
    d = Daemon(base, CONFIG.replace("{pids}", str(base / "pids"))).start()
    sock_path = d.state / "control.sock"
    assert oct(sock_path.stat().st_mode & 0o777) == "0o600"
    assert oct(d.state.stat().st_mode & 0o777) == "0o700"
    for payload in (b"not json\n", b'{"v": 9, "cmd": "status"}\n', b"x" * 200_000):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(sock_path))
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                reply = json.loads(s.makefile().readline())
            except (BrokenPipeError, ConnectionResetError):
                continue  # refused mid-send: also fine, as long as the daemon serves on
            assert reply["ok"] is False
    # A client that is neither the daemon's user nor root is refused.
    d.state.chmod(0o755)
    sock_path.chmod(0o666)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock_path))
                # the refusal may come (and the server close) before we send
                with contextlib.suppress(BrokenPipeError):
                    s.sendall(b'{"v": 1, "cmd": "status", "args": {}}\n')
                os.write(w, s.makefile("rb").readline())
        except OSError as exc:
            os.write(w, f"oserror {exc.errno}".encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    answer = os.read(r, 65536)
    os.close(r)
    assert json.loads(answer)["code"] == "forbidden"
    assert cli_json(d, "status")["pid"] == d.proc.pid  # type: ignore[union-attr]
    d.stop()
    shutil.rmtree(base)


def test_daemon_only_commands_without_a_daemon(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for args in (("status",), ("trigger", "x"), ("pause", "--all"), ("reload",), ("stop",)):
        res = subprocess.run(
            [*schedd(*args), "--state-dir", str(state)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
        )
        assert res.returncode == 1
        assert res.stderr.strip() == (
            f"schedd: no schedd daemon on {state}; start one with `schedd run`"
        )
