"""The control socket and the daemon-control CLI, over real Unix sockets.

A small in-test handler stands in for the daemon (the daemon's own end-to-end
tests drive the real one). CLI round trips run ``python -m
scheduler.cli_control`` as a subprocess, the way users run ``schedd``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import queue
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import pytest

from scheduler import cli_control, cli_logs
from scheduler.control import SOCKET_NAME, ControlClient, ControlError, ControlServer, NoDaemon
from scheduler.errors import ScheddError

NOBODY = 65534
CLI = (sys.executable, "-m", "scheduler.cli_control")


class FakeDaemon:
    """Implements the ControlHandler protocol and records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.started = datetime.now(UTC) - timedelta(hours=3, minutes=2)
        self.reload_ok = True
        self.fail_with: Exception | None = None
        self.result_override: Any = None

    def _call(self, name: str, **args: Any) -> None:
        self.calls.append((name, args))
        if self.fail_with is not None:
            raise self.fail_with

    def status(self) -> dict[str, Any]:
        self._call("status")
        if self.result_override is not None:
            return {"bad": self.result_override}
        now = datetime.now(UTC)
        return {
            "pid": os.getpid(),
            "started_at": self.started,  # a datetime: the server converts it
            "uptime_s": 10925.0,
            "config_path": "/etc/schedd/schedd.yaml",
            "state_dir": "/var/lib/schedd",
            "jobs": 3,
            "running": [
                {
                    "run_id": "0193abc",
                    "job": "backup",
                    "started_at": (now - timedelta(minutes=3, seconds=5)).isoformat(),
                    "pid": 4242,
                }
            ],
            "last_reload": {
                "at": (now - timedelta(seconds=40)).isoformat(),
                "ok": False,
                "errors": ["/etc/schedd/schedd.yaml:7:12: unknown task 'shel'"],
            },
        }

    def jobs(self) -> list[dict[str, Any]]:
        self._call("jobs")
        return [{"id": "from-daemon", "task": "shell", "paused": False}]

    def trigger(self, job: str, force: bool) -> dict[str, Any]:
        self._call("trigger", job=job, force=force)
        if job != "backup":
            raise ScheddError(f"no job {job!r}")
        return {"job": job, "run_id": "r-1", "message": ""}

    def pause(self, jobs: list[str] | None) -> dict[str, Any]:
        self._call("pause", jobs=jobs)
        return {"changed": jobs or ["a", "b"], "unchanged": []}

    def resume(self, jobs: list[str] | None) -> dict[str, Any]:
        self._call("resume", jobs=jobs)
        return {"changed": [], "unchanged": jobs or []}

    def history(self, job: str | None, limit: int, status: str | None) -> list[dict[str, Any]]:
        self._call("history", job=job, limit=limit, status=status)
        return [{"run_id": "r-1", "job": job, "status": status or "success"}]

    def reload(self) -> dict[str, Any]:
        self._call("reload")
        if self.reload_ok:
            return {"ok": True, "errors": [], "added": ["new"], "removed": [], "changed": ["x"]}
        errors = ["schedd.yaml:3:5: unknown key 'cronn' in job 'a' (did you mean 'cron'?)"]
        return {"ok": False, "errors": errors, "added": [], "removed": [], "changed": []}

    def cancel(self, run_id: str) -> dict[str, Any]:
        self._call("cancel", run_id=run_id)
        return {"run_id": run_id, "job": "backup", "message": f"cancelling run {run_id}"}

    def stop(self, grace: float | None) -> dict[str, Any]:
        self._call("stop", grace=grace)
        return {"pid": os.getpid(), "grace": 0.0 if grace is None else grace}


@pytest.fixture
def state(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def daemon(state: Path) -> Iterator[FakeDaemon]:
    handler = FakeDaemon()
    server = ControlServer(state / SOCKET_NAME, handler, read_timeout=1.0)
    server.start()
    yield handler
    server.close()


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> Any:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SCHEDD_", "_SCHEDD"))}
    full_env.update(env or {})
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        cwd=cwd or Path(tempfile.gettempdir()),
        env=full_env,
        timeout=30,
    )


def raw(path: Path, payload: bytes, *, shut: bool = True) -> dict[str, Any]:
    """Send bytes as they are and read the one-line answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        try:
            s.sendall(payload)
            if shut:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    answer: dict[str, Any] = json.loads(data)
    return answer


# ---- socket privacy -----------------------------------------------------------------
def test_socket_is_private_from_the_moment_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "fresh"  # the server creates it
    seen: list[int] = []
    real_chmod = Path.chmod

    def spy(self: Path, mode: int, **kw: Any) -> None:
        seen.append(stat.S_IMODE(self.lstat().st_mode))  # the mode bind() gave it
        real_chmod(self, mode, **kw)

    monkeypatch.setattr(Path, "chmod", spy)
    server = ControlServer(state / SOCKET_NAME, FakeDaemon())
    server.start()
    try:
        assert seen and not seen[0] & 0o077
        sock = state / SOCKET_NAME
        assert stat.S_ISSOCK(sock.lstat().st_mode)
        assert stat.S_IMODE(sock.lstat().st_mode) == 0o600
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
    finally:
        server.close()
    assert not (state / SOCKET_NAME).exists()


def _as_nobody(path: Path) -> str:
    """Connect as uid/gid 65534 from a forked child; its answer, or the connect errno."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only syscalls, no imports, then _exit
        out = b""
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(str(path))
            except OSError as exc:
                out = f"connect: {errno.errorcode.get(exc.errno or 0, exc)}".encode()
            else:
                with contextlib.suppress(OSError):  # a refusal may come before we send
                    s.sendall(b'{"v": 1, "cmd": "status", "args": {}}\n')
                while chunk := s.recv(65536):
                    out += chunk
        except BaseException as exc:
            out = repr(exc).encode()
        finally:
            os.write(w, out)
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


@pytest.fixture
def shared_state() -> Iterator[Path]:
    """A state dir every user can reach (pytest's tmp dirs are 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix="schedd-ctl-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to nobody")
def test_foreign_uid_is_refused_by_modes_then_by_credentials(shared_state: Path) -> None:
    handler = FakeDaemon()
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    collect = Collect()
    log = logging.getLogger("schedd.control")
    log.addHandler(collect)
    server = ControlServer(shared_state / SOCKET_NAME, handler)
    server.start()
    try:
        sock = shared_state / SOCKET_NAME
        # 1. the 0700 state dir: nobody cannot even reach the socket
        shared_state.chmod(0o700)
        assert _as_nobody(sock) == "connect: EACCES"
        # 2. a reachable dir, but the socket itself is 0600 root
        shared_state.chmod(0o755)
        assert _as_nobody(sock) == "connect: EACCES"
        # 3. modes loosened: the peer credential check still refuses
        sock.chmod(0o666)
        answer = json.loads(_as_nobody(sock))
        assert answer["ok"] is False and answer["code"] == "forbidden"
        assert "uid 65534" in answer["error"]
        assert handler.calls == []  # never reached the handler
        assert any("uid 65534" in r.getMessage() for r in records)
        # ... and our own uid is still served
        assert ControlClient(shared_state).status()["pid"] == os.getpid()
    finally:
        log.removeHandler(collect)
        server.close()


# ---- protocol robustness -----------------------------------------------------------
@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"{not json\n", "bad_json"),
        (b"\xff\xfe\n", "bad_json"),
        (b"[" * 60000 + b"\n", "bad_json"),
        (b"\n", "bad_json"),
        (b"[1, 2]\n", "bad_request"),
        (b'{"cmd": "status"}\n', "bad_version"),
        (b'{"v": 2, "cmd": "status"}\n', "bad_version"),
        (b'{"v": true, "cmd": "status"}\n', "bad_version"),
        (b'{"v": 1, "cmd": "rm -rf"}\n', "unknown_command"),
        (b'{"v": 1, "cmd": 5}\n', "unknown_command"),
        (b'{"v": 1, "cmd": "status", "args": []}\n', "bad_args"),
        (b'{"v": 1, "cmd": "status", "args": {"x": 1}}\n', "bad_args"),
        (b'{"v": 1, "cmd": "trigger", "args": {}}\n', "bad_args"),
        (b'{"v": 1, "cmd": "trigger", "args": {"job": 3}}\n', "bad_args"),
        (b'{"v": 1, "cmd": "trigger", "args": {"job": "a", "force": "yes"}}\n', "bad_args"),
        (b'{"v": 1, "cmd": "pause", "args": {"jobs": "a"}}\n', "bad_args"),
        (b'{"v": 1, "cmd": "history", "args": {"limit": 0}}\n', "bad_args"),
        (b'{"v": 1, "cmd": "history", "args": {"limit": true}}\n', "bad_args"),
        (b'{"v": 1, "cmd": "stop", "args": {"grace": -1}}\n', "bad_args"),
        (b'{"v": 1, "cmd": "stop", "args": {"grace": NaN}}\n', "bad_args"),
        (b'{"v": 1, "cmd": "cancel", "args": {"run_id": ""}}\n', "bad_args"),
    ],
)
def test_bad_requests_get_error_responses(
    state: Path, daemon: FakeDaemon, payload: bytes, code: str
) -> None:
    answer = raw(state / SOCKET_NAME, payload)
    assert answer["v"] == 1 and answer["ok"] is False and answer["code"] == code
    assert "Traceback" not in answer["error"]
    assert daemon.calls == []
    assert ControlClient(state).status()["jobs"] == 3  # still serving


def test_request_without_newline_ends_at_eof(state: Path, daemon: FakeDaemon) -> None:
    answer = raw(state / SOCKET_NAME, b'{"v": 1, "cmd": "ping"}')
    assert answer == {"v": 1, "ok": True, "result": {"pid": os.getpid()}}


def test_huge_request_is_refused(state: Path, daemon: FakeDaemon) -> None:
    big = b'{"v": 1, "cmd": "status", "args": {"x": "' + b"a" * 1_000_000 + b'"}}\n'
    answer = raw(state / SOCKET_NAME, big)
    assert answer["code"] == "too_large" and "65536" in answer["error"]
    assert ControlClient(state).ping()["pid"] == os.getpid()


def test_idle_connection_times_out(state: Path, daemon: FakeDaemon) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(state / SOCKET_NAME))
        s.sendall(b'{"v": 1, "cmd"')  # and then nothing
        start = time.monotonic()
        answer = json.loads(s.makefile("rb").readline())
        assert 0.5 < time.monotonic() - start < 5
    assert answer["code"] == "timeout"
    assert ControlClient(state).status()["pid"] == os.getpid()


def test_concurrent_connections_are_capped(state: Path) -> None:
    handler = FakeDaemon()
    server = ControlServer(state / SOCKET_NAME, handler, read_timeout=5, max_connections=2)
    server.start()
    idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    try:
        for s in idle:
            s.connect(str(state / SOCKET_NAME))
        time.sleep(0.2)
        start = time.monotonic()
        with pytest.raises(ControlError, match="serving 2 connections") as info:
            ControlClient(state).status()
        assert info.value.code == "busy"
        assert time.monotonic() - start < 0.3  # refused at once, not after a timeout
        for s in idle:
            s.close()
        deadline = time.monotonic() + 5
        while True:  # the slots free as soon as the server sees the closes
            try:
                assert ControlClient(state).status()["jobs"] == 3
                break
            except ControlError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        for s in idle:
            s.close()
        server.close()


def test_a_burst_of_clients_is_served_or_told_busy(state: Path) -> None:
    server = ControlServer(state / SOCKET_NAME, FakeDaemon(), max_connections=4)
    server.start()
    outcomes: list[str] = []

    def call() -> None:
        try:
            outcomes.append("ok" if ControlClient(state).status()["jobs"] == 3 else "wrong")
        except ControlError as exc:
            outcomes.append(exc.code)

    try:
        threads = [threading.Thread(target=call) for _ in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(outcomes) == 40 and set(outcomes) <= {"ok", "busy"} and "ok" in outcomes
        assert ControlClient(state).status()["jobs"] == 3
    finally:
        server.close()


def test_handler_errors_become_responses(state: Path, daemon: FakeDaemon) -> None:
    client = ControlClient(state)
    with pytest.raises(ControlError, match=r"^no job 'nope'$") as info:
        client.trigger("nope")
    assert info.value.code == "error"
    coded = ScheddError("run r-9 is not running")
    coded.code = "not_found"  # type: ignore[attr-defined]
    daemon.fail_with = coded
    with pytest.raises(ControlError) as info:
        client.cancel("r-9")
    assert info.value.code == "not_found"
    daemon.fail_with = RuntimeError("secret internals")
    with pytest.raises(ControlError) as info:
        client.status()
    assert info.value.code == "internal" and "secret" not in str(info.value)
    daemon.fail_with = None
    daemon.result_override = object()  # not JSON
    with pytest.raises(ControlError) as info:
        client.status()
    assert info.value.code == "internal"
    daemon.result_override = None
    assert client.status()["jobs"] == 3


def test_client_helpers_pass_arguments(state: Path, daemon: FakeDaemon) -> None:
    client = ControlClient(state)
    assert client.history("backup", limit=5, status="failed")[0]["status"] == "failed"
    assert client.jobs()[0]["id"] == "from-daemon"
    client.stop(2.5)
    assert daemon.calls == [
        ("history", {"job": "backup", "limit": 5, "status": "failed"}),
        ("jobs", {}),
        ("stop", {"grace": 2.5}),
    ]


def test_no_daemon_message_is_exact(state: Path) -> None:
    expected = f"no schedd daemon on {state}; start one with `schedd run`"
    with pytest.raises(NoDaemon) as info:
        ControlClient(state).status()
    assert str(info.value) == expected
    # a stale socket file: bound once, nobody listening any more
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(state / SOCKET_NAME))
    with pytest.raises(NoDaemon) as info:
        ControlClient(state).status()
    assert str(info.value) == expected
    res = cli("status", "--state-dir", str(state))
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr == f"schedd: {expected}\n"


def test_server_start_replaces_stale_socket_and_refuses_a_live_one(state: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(state / SOCKET_NAME))
    first = ControlServer(state / SOCKET_NAME, FakeDaemon())
    first.start()
    try:
        with pytest.raises(ScheddError, match="another schedd daemon answers"):
            ControlServer(state / SOCKET_NAME, FakeDaemon()).start()
        assert ControlClient(state).ping()["pid"] == os.getpid()
    finally:
        first.close()
    (state / SOCKET_NAME).write_text("not a socket")
    with pytest.raises(ScheddError, match="is not a socket"):
        ControlServer(state / SOCKET_NAME, FakeDaemon()).start()


def test_close_removes_only_its_own_socket(state: Path) -> None:
    old = ControlServer(state / SOCKET_NAME, FakeDaemon())
    old.start()
    (state / SOCKET_NAME).unlink()  # e.g. a successor cleared it and bound its own
    new = ControlServer(state / SOCKET_NAME, FakeDaemon())
    new.start()
    try:
        old.close()
        assert ControlClient(state).ping()["pid"] == os.getpid()
    finally:
        new.close()
    assert not (state / SOCKET_NAME).exists()


def test_long_state_dir_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    server = ControlServer(deep / SOCKET_NAME, FakeDaemon())
    server.start()
    try:
        assert len(str(deep / SOCKET_NAME)) > 108
        assert ControlClient(deep).status()["jobs"] == 3
    finally:
        server.close()
    with pytest.raises(NoDaemon):
        ControlClient(deep).status()


# ---- CLI round trips (subprocesses) ---------------------------------------------------
def test_status_round_trip(state: Path, daemon: FakeDaemon) -> None:
    res = cli("status", "--json", "--state-dir", str(state))
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["pid"] == os.getpid() and info["jobs"] == 3
    assert info["started_at"] == daemon.started.isoformat()
    res = cli("status", "--state-dir", str(state))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert f"pid          {os.getpid()}\n" in out
    assert "up           3h2m (since " in out and "config       /etc/schedd/schedd.yaml" in out
    assert "REJECTED, the old schedule keeps running" in out
    assert "  /etc/schedd/schedd.yaml:7:12: unknown task 'shel'" in out
    run_row = next(line for line in out.splitlines() if line.startswith("0193abc"))
    assert "backup" in run_row and "(3m ago)" in run_row and run_row.endswith("4242")


def test_trigger_pause_resume_cancel(state: Path, daemon: FakeDaemon) -> None:
    sd = ("--state-dir", str(state))
    res = cli("trigger", "backup", *sd)
    assert (res.returncode, res.stdout) == (0, "triggered backup: run r-1\n"), res.stderr
    res = cli("trigger", "backup", "--force", "--json", *sd)
    assert json.loads(res.stdout)["run_id"] == "r-1"
    res = cli("trigger", "nope", *sd)
    assert (res.returncode, res.stderr) == (1, "schedd: no job 'nope'\n")
    assert cli("pause", "a", "b", *sd).stdout == "paused: a, b\n"
    assert cli("pause", "--all", *sd).stdout == "paused: a, b\n"
    assert cli("resume", "a", *sd).stdout == "already active: a\n"
    assert json.loads(cli("resume", "--all", "--json", *sd).stdout) == {
        "changed": [],
        "unchanged": [],
    }
    for bad in (("pause",), ("resume", "a", "--all")):
        res = cli(*bad, *sd)
        assert res.returncode == 2 and "pass --all" in res.stderr
    res = cli("cancel", "r-7", *sd)
    assert (res.returncode, res.stdout) == (0, "cancelling run r-7\n")
    assert daemon.calls == [
        ("trigger", {"job": "backup", "force": False}),
        ("trigger", {"job": "backup", "force": True}),
        ("trigger", {"job": "nope", "force": False}),
        ("pause", {"jobs": ["a", "b"]}),
        ("pause", {"jobs": None}),
        ("resume", {"jobs": ["a"]}),
        ("resume", {"jobs": None}),
        ("cancel", {"run_id": "r-7"}),
    ]


def test_reload_applied_and_rejected(state: Path, daemon: FakeDaemon) -> None:
    res = cli("reload", "--state-dir", str(state))
    assert res.returncode == 0
    assert res.stdout == "reload applied: 1 added (new), 1 changed (x)\n"
    daemon.reload_ok = False
    res = cli("reload", "--state-dir", str(state))
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.splitlines() == [
        "schedd.yaml:3:5: unknown key 'cronn' in job 'a' (did you mean 'cron'?)",
        "reload rejected (1 error): the old schedule keeps running",
    ]
    res = cli("reload", "--json", "--state-dir", str(state))
    assert res.returncode == 1 and json.loads(res.stdout)["ok"] is False


def test_daemon_commands_without_daemon(state: Path) -> None:
    for args in (("trigger", "x"), ("pause", "--all"), ("reload",), ("cancel", "r"), ("stop",)):
        res = cli(*args, "--state-dir", str(state))
        assert res.returncode == 1, args
        assert res.stderr == f"schedd: no schedd daemon on {state}; start one with `schedd run`\n"


def test_stop_waits_for_the_daemon_to_exit(tmp_path: Path) -> None:
    state = tmp_path / "state"
    script = tmp_path / "fake_daemon.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys, threading, time
            from pathlib import Path
            from scheduler.control import ControlServer

            class Handler:
                def status(self):
                    return {"pid": os.getpid()}

                def stop(self, grace):
                    # exit a moment after answering, as a draining daemon does
                    threading.Timer(0.5, os._exit, (0,)).start()
                    return {"pid": os.getpid(), "grace": grace}

            ControlServer(Path(sys.argv[1]) / "control.sock", Handler()).start()
            print("ready", flush=True)
            time.sleep(60)
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script), str(state)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        start = time.monotonic()
        res = cli("stop", "--grace", "1s", "--state-dir", str(state))
        assert res.returncode == 0, res.stderr
        assert time.monotonic() - start >= 0.5
        assert res.stdout == f"schedd stopped (pid {proc.pid})\n"
        assert "runs get 1s to finish" in res.stderr
        assert proc.wait(5) == 0
    finally:
        proc.kill()
        proc.wait()


def test_stop_times_out_with_a_message(state: Path, daemon: FakeDaemon) -> None:
    res = cli("stop", "--wait", "300ms", "--state-dir", str(state))
    assert res.returncode == 1
    assert f"the daemon (pid {os.getpid()}) has not exited after 300ms;" in res.stderr
    assert daemon.calls == [("stop", {"grace": None})]
    res = cli("stop", "--grace", "soon", "--state-dir", str(state))
    assert res.returncode == 2 and "--grace" in res.stderr


# ---- finding the state dir ------------------------------------------------------------
def test_state_dir_from_config_matches_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scheduler.config import load_config
    from scheduler.plugins import load_plugins
    from scheduler.statedir import resolve_state_dir

    _, registry = load_plugins()
    job = "jobs:\n  a: {task: shell, every: 1m, params: {command: 'true'}}\n"
    for line in ("state_dir: state\n", "state_dir: ~/elsewhere\n", "state_dir: /abs/dir\n", ""):
        path = tmp_path / "conf" / "schedd.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(line + job)
        expected = resolve_state_dir(None, load_config(path, registry).state_dir)
        assert cli_control.resolve_state_dir(None, str(path)) == expected, line
        monkeypatch.chdir(path.parent)
        assert cli_control.resolve_state_dir(None, None) == expected, line
        monkeypatch.setenv("SCHEDD_CONFIG", str(path))
        monkeypatch.chdir(tmp_path)
        assert cli_control.resolve_state_dir(None, None) == expected, line
        monkeypatch.delenv("SCHEDD_CONFIG")
    assert cli_control.resolve_state_dir(str(tmp_path / "x" / ".."), None) == tmp_path
    # an invalid config (unknown task) still tells where the daemon is
    path.write_text("state_dir: st\njobs: {a: {task: nope}}\n")
    assert cli_control.resolve_state_dir(None, str(path)) == path.parent / "st"
    path.write_text("state_dir: [oops\n")
    with pytest.raises(ScheddError, match="pass --state-dir"):
        cli_control.resolve_state_dir(None, str(path))
    with pytest.raises(ScheddError, match="config file not found"):
        cli_control.resolve_state_dir(None, str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize(
    ("euid", "xdg", "expected"),
    [
        (0, None, "/var/lib/schedd"),
        (0, "/x", "/var/lib/schedd"),
        (1000, "/x", "/x/schedd"),
    ],
)
def test_default_state_dir_without_a_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, euid: int, xdg: str | None, expected: str
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    if xdg:
        monkeypatch.setenv("XDG_STATE_HOME", xdg)
    else:
        monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./schedd.yaml
    monkeypatch.delenv("SCHEDD_CONFIG", raising=False)
    assert cli_control.resolve_state_dir(None, None) == Path(expected)


def test_times_are_absolute_and_relative(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        now = datetime(2026, 11, 28, 12, 7, 2, tzinfo=UTC)
        assert cli_control.when("2026-11-28T12:04:02+00:00", now) == "2026-11-28 12:04:02 (3m ago)"
        assert cli_control.when("2026-11-28T13:04:02+01:00", now) == "2026-11-28 12:04:02 (3m ago)"
        assert cli_control.when("2026-11-28T14:07:02Z", now).endswith("(in 2h)")
        assert cli_control.when("2026-11-28T12:07:02.3+00:00", now).endswith("(just now)")
        assert cli_control.when("2026-11-25T10:00:00+00:00", now).endswith("(3d ago)")
        assert cli_control.when(None, now) == "-"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


# ---- logs ---------------------------------------------------------------------------
def _log_line(n: int, run: str, stream: str = "stdout") -> str:
    return f"2026-11-28 12:00:{n % 60:02d}.000+0000 {run} {stream}: line {n} {{}}"


@pytest.fixture
def job_log(state: Path) -> Path:
    logs = state / "logs"
    logs.mkdir()
    path = logs / "backup.log"
    lines = [_log_line(n, "r1" if n % 3 else "r2") for n in range(1, 201)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_logs_tail_and_run_filter(state: Path, job_log: Path) -> None:
    lines = job_log.read_text().splitlines()
    res = cli("logs", "backup", "--lines", "3", "--state-dir", str(state))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == lines[-3:]
    res = cli("logs", "backup", "--state-dir", str(state))
    assert res.stdout.splitlines() == lines[-50:]
    res = cli("logs", "backup", "--run", "r2", "-n", "4", "--state-dir", str(state))
    assert res.stdout.splitlines() == [line for line in lines if " r2 " in line][-4:]
    res = cli("logs", "backup", "--run", "r2", "-n", "1", "--json", "--state-dir", str(state))
    assert json.loads(res.stdout) == {
        "time": "2026-11-28 12:00:18.000+0000",
        "run_id": "r2",
        "stream": "stdout",
        "text": "line 198 {}",
    }
    res = cli("logs", "backup", "--run", "nope", "--state-dir", str(state))
    assert (res.returncode, res.stdout) == (0, "")


def test_logs_rejects_bad_job_ids_and_missing_logs(state: Path) -> None:
    for bad in ("../etc/passwd", ".hidden", "a/b", "x" * 129):
        res = cli("logs", bad, "--state-dir", str(state))
        assert res.returncode == 2 and "is not a job id" in res.stderr, bad
    res = cli("logs", "backup", "--state-dir", str(state))
    assert res.returncode == 1 and "no log for job 'backup' yet" in res.stderr


@pytest.mark.parametrize("block", [1, 2, 7, 64, 65536])
def test_tail_reads_backwards_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    monkeypatch.setattr(cli_logs, "_BLOCK", block)
    cases = [b"", b"\n", b"\n\n", b"a", b"a\n", b"a\nb", b"a\n\nb\nc\n", b"x 1 r1 out: a\nq\n" * 9]
    for data in cases:
        path = tmp_path / "f.log"
        path.write_bytes(data)
        complete = data[: data.rfind(b"\n") + 1]
        all_lines = complete.split(b"\n")[:-1] if complete else []
        for count in (0, 1, 2, 5, 100):
            for keep in (lambda _: True, lambda line: line.startswith(b"x")):
                with path.open("rb") as f:
                    found, pos = cli_logs.tail(f, count, keep)
                want = [line for line in all_lines if keep(line)]
                assert found == (want[-count:] if count else []), (data, count)
                assert pos == len(complete)


def test_logs_follow_new_lines_rotation_and_truncation(state: Path, job_log: Path) -> None:
    proc = subprocess.Popen(
        [*CLI, "logs", "backup", "-f", "-n", "2", "--run", "r1", "--state-dir", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout

    def pump() -> None:
        for line in stdout:
            out.put(line)

    threading.Thread(target=pump, daemon=True).start()

    def expect(*lines: str) -> None:
        for line in lines:
            assert out.get(timeout=10) == line + "\n"

    try:
        old = job_log.read_text().splitlines()
        expect(*[line for line in old if " r1 " in line][-2:])
        with job_log.open("a") as f:  # appended, one line split across two writes
            f.write(_log_line(1, "r1") + "\n" + _log_line(2, "r2") + "\n" + "2026 partial")
            f.flush()
            time.sleep(0.5)
            f.write(" r1 stdout: rest\n")
        expect(_log_line(1, "r1"), "2026 partial r1 stdout: rest")
        rotated = job_log.with_name("backup.2026-11-28_12-00-00_000000.log")
        job_log.rename(rotated)  # loguru's rotation: rename, then a new file
        with rotated.open("a") as f:
            f.write(_log_line(3, "r1") + "\n")  # the last line of the old file
        time.sleep(0.5)
        job_log.write_text(_log_line(4, "r1") + "\n")
        expect(_log_line(3, "r1"), _log_line(4, "r1"))
        with job_log.open("a") as f:
            f.write(_log_line(5, "r1") + "\n" + _log_line(6, "r1") + "\n")
        expect(_log_line(5, "r1"), _log_line(6, "r1"))
        job_log.write_text(_log_line(7, "r1") + "\n")  # truncated in place, shorter
        expect(_log_line(7, "r1"))
        assert out.empty()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_logs_follow_waits_for_the_file(state: Path) -> None:
    proc = subprocess.Popen(
        [*CLI, "logs", "late", "-f", "--state-dir", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None and "waiting for" in proc.stderr.readline()
        (state / "logs").mkdir()
        (state / "logs" / "late.log").write_text(_log_line(1, "r9") + "\n")
        assert proc.stdout is not None and proc.stdout.readline() == _log_line(1, "r9") + "\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()


# ---- shell completion -----------------------------------------------------------------
def _complete(words: str, cwd: Path, shell: str = "bash") -> list[str]:
    env = {"_SCHEDD_COMPLETE": f"{shell}_complete", "COMP_WORDS": words}
    env["COMP_CWORD"] = str(len(words.split(" ")) - 1)
    res = cli(cwd=cwd, env=env)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    return [line for line in res.stdout.splitlines() if line]


def test_completion_offers_job_ids(tmp_path: Path, state: Path, daemon: FakeDaemon) -> None:
    (tmp_path / "schedd.yaml").write_text(
        "jobs:\n  backup: {task: shell, description: Nightly}\n  beat: {}\n  other: {}\n"
    )
    assert _complete("schedd trigger ", tmp_path) == ["plain,backup", "plain,beat", "plain,other"]
    assert _complete("schedd pause other ba", tmp_path) == ["plain,backup"]
    assert _complete("schedd logs b", tmp_path) == ["plain,backup", "plain,beat"]
    zsh = _complete("schedd trigger ba", tmp_path, "zsh")
    assert zsh == ["plain", "backup", "Nightly"]
    conf = tmp_path / "sub" / "x.yaml"
    conf.parent.mkdir()
    conf.write_text("jobs: {only: {}}\n")
    assert _complete(f"schedd resume --config {conf} ", state) == ["plain,only"]
    # no config anywhere: ask the daemon
    assert _complete(f"schedd trigger --state-dir {state} ", state) == ["plain,from-daemon"]
    assert _complete(f"schedd cancel --state-dir {state} ", state) == ["plain,0193abc"]
    # broken inputs: no suggestions, no traceback
    (tmp_path / "schedd.yaml").write_text("jobs: [unclosed\n")
    assert _complete("schedd trigger ", tmp_path) == []
    assert _complete(f"schedd trigger --config {tmp_path}/none.yaml ", tmp_path) == []


def test_completion_scripts_are_click_s(tmp_path: Path) -> None:
    for shell in ("bash", "zsh", "fish"):
        res = cli(cwd=tmp_path, env={"_SCHEDD_COMPLETE": f"{shell}_source"})
        assert res.returncode == 0 and "_SCHEDD_COMPLETE" in res.stdout, shell


def test_register_adds_the_commands() -> None:
    group = click.Group("schedd")
    cli_control.register(group)
    assert sorted(group.commands) == [
        "cancel",
        "logs",
        "pause",
        "reload",
        "resume",
        "status",
        "stop",
        "trigger",
    ]
