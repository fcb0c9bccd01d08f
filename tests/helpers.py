"""A real `schedd run` process for end-to-end tests, and small waiting helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def schedd(*args: str) -> list[str]:
    return [sys.executable, "-m", "scheduler.cli", *args]


def wait_for(cond: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); treat it as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


class Daemon:
    def __init__(
        self, tmp: Path, config: str, *extra: str, env: Mapping[str, str] | None = None
    ) -> None:
        self.tmp = tmp
        self.env = None if env is None else dict(env)
        self.config = tmp / "schedd.yaml"
        self.config.write_text(textwrap.dedent(config))
        self.state = tmp / "state"
        self.extra = extra
        self.out = tmp / "daemon.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        self.proc = subprocess.Popen(
            schedd(
                "run", "--config", str(self.config), "--state-dir", str(self.state), *self.extra
            ),
            stdout=self.out.open("ab"),  # a file: a full pipe would block the daemon
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=self.env,
        )
        wait_for(
            lambda: (
                f"schedd {self.proc.pid} started" in self.daemon_log()
                or self.proc.poll() is not None
            ),
            what="daemon start",
        )
        assert self.proc.poll() is None, self.output()
        return self

    def daemon_log(self) -> str:
        return read(self.state / "schedd.log")

    def job_log(self, job: str) -> str:
        return read(self.state / "logs" / f"{job}.log")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def output(self) -> str:
        return read(self.out)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    made: list[Daemon] = []

    def make(config: str, *extra: str) -> Daemon:
        d = Daemon(tmp_path, config, *extra)
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop()
