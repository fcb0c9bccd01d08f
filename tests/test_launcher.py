"""The fork server spoken to directly: batches, cancels and signals, with real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from scheduler.launcher import default_env, pack, spawn
from tests.runner_tasks import wait_gone


class Conn:
    """A launcher started the way the runner starts it, and its end of the socket."""

    def __init__(self) -> None:
        self.proc, self.sock = spawn(["tests.runner_tasks"], default_env())
        ready = self.sock.makefile("rb").readline()
        assert json.loads(ready)["ready"] == self.proc.pid

    def run_frame(self, run_id: Any, target: str, **extra: Any) -> tuple[bytes, list[int], int]:
        """A run request frame, its three write ends, and the read end of its status pipe."""
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(3)]
        for r, _ in pipes[:2]:
            os.close(r)  # stdout/stderr unread: the no-op tasks print nothing
        ctx = {"job_id": "job", "run_id": run_id, "task": "t", "params": extra.pop("params", {})}
        msg = {"op": "run", "nfds": 3, "run_id": run_id, "target": target, "ctx": ctx}
        msg |= {"env": {}, "cwd": None, "timeout": None, "kill_grace": 0.5, **extra}
        return pack(msg), [w for _, w in pipes], pipes[2][0]

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(10)


@pytest.fixture
def conn() -> Iterator[Conn]:
    c = Conn()
    try:
        yield c
    finally:
        if c.proc.poll() is None:
            c.proc.kill()
        c.close()


def status_lines(fd: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Everything on a status pipe until end of file (the supervisor is gone)."""
    os.set_blocking(fd, False)
    data, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        if not chunk:
            os.close(fd)
            return [json.loads(line) for line in data.splitlines()]
        data += chunk
    raise AssertionError(f"status pipe still open after {timeout}s: {data!r}")


def test_a_cancel_in_the_same_read_as_its_run_still_ends_it(conn: Conn) -> None:
    """The launcher forks after a whole batch is read; a cancel in that batch must not be lost."""
    frame, fds, status = conn.run_frame("r1", "tests.runner_tasks:sleep", params={"seconds": 30})
    socket.send_fds(conn.sock, [frame + pack({"op": "cancel", "run_id": "r1"})], fds)
    for fd in fds:
        os.close(fd)
    t0 = time.monotonic()
    result = status_lines(status)[-1]
    assert result["ev"] == "result" and result["status"] == "killed", result
    assert result["signal"] == "SIGTERM" and time.monotonic() - t0 < 10


def test_sigterm_to_the_launcher_ends_its_runs_and_it_exits(conn: Conn) -> None:
    """The launcher blocks SIGTERM and takes it on its next wakeup (at most a tick away)."""
    frame, fds, status = conn.run_frame("r2", "tests.runner_tasks:sleep", params={"seconds": 30})
    socket.send_fds(conn.sock, [frame], fds)
    for fd in fds:
        os.close(fd)
    os.set_blocking(status, False)
    deadline = time.monotonic() + 10
    started = b""
    while b"started" not in started and time.monotonic() < deadline:
        try:
            started += os.read(status, 4096)
        except BlockingIOError:
            time.sleep(0.01)
    task = json.loads(started.splitlines()[0])["pid"]
    os.kill(conn.proc.pid, signal.SIGTERM)
    result = status_lines(status)[-1]
    assert result["status"] == "killed" and result["reason"] == "cancelled", result
    assert conn.proc.wait(10) == 0
    assert wait_gone([task]) == []


def test_an_exited_supervisor_is_reaped_without_any_new_request(conn: Conn) -> None:
    """No SIGCHLD handler: the launcher's tick reaps a finished run's supervisor."""
    frame, fds, status = conn.run_frame("r3", "tests.runner_tasks:noop")
    socket.send_fds(conn.sock, [frame], fds)
    for fd in fds:
        os.close(fd)
    result = status_lines(status)[-1]
    assert result["status"] == "success" and result["exit_code"] == 0
    from scheduler import procs

    deadline = time.monotonic() + 3
    while procs.children(conn.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert procs.children(conn.proc.pid) == []


def test_a_malformed_run_is_refused_and_the_launcher_carries_on(conn: Conn) -> None:
    frame, fds, status = conn.run_frame(["not", "a", "str"], "tests.runner_tasks:noop")
    socket.send_fds(conn.sock, [frame], fds)
    for fd in fds:
        os.close(fd)
    result = status_lines(status)[-1]
    assert result["status"] == "killed" and "bad run request" in result["reason"]
    frame, fds, status = conn.run_frame("r5", "tests.runner_tasks:exit3")
    socket.send_fds(conn.sock, [frame], fds)
    for fd in fds:
        os.close(fd)
    result = status_lines(status)[-1]
    assert result["status"] == "failed" and result["exit_code"] == 3
