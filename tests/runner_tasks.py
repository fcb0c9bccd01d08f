"""Tasks the runner tests launch as ``tests.runner_tasks:<name>``, in real child processes."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from scheduler.types import RunContext


def noop(ctx: RunContext) -> None:
    return None


def echo(ctx: RunContext) -> None:
    print(json.dumps({"params": dict(ctx.params), "job_id": ctx.job_id, "run_id": ctx.run_id}))


def echo_env(ctx: RunContext) -> None:
    """Print ``os.environ``, the C-level environment (what a subprocess gets) and the cwd."""
    import subprocess  # here: the bench's no-op imports this module in every child

    out = subprocess.run(["/usr/bin/env", "-0"], capture_output=True, check=True).stdout
    c_env = dict(item.split("=", 1) for item in out.decode().split("\0") if item)
    print(json.dumps({"env": dict(os.environ), "c_env": c_env, "cwd": str(Path.cwd())}))


def stamp(ctx: RunContext) -> None:
    """Print the wall time at which the task function began."""
    print(repr(time.time()), flush=True)


def say(ctx: RunContext) -> None:
    """Print ``params["text"]`` verbatim to stdout and ``params.get("err")`` to stderr."""
    sys.stdout.write(ctx.params["text"])
    if "err" in ctx.params:
        sys.stderr.write(ctx.params["err"])


def fail(ctx: RunContext) -> None:
    raise ValueError("boom")


def exit3(ctx: RunContext) -> int:
    return 3


def sigkill_self(ctx: RunContext) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def read_stdin(ctx: RunContext) -> None:
    print(repr(sys.stdin.read()))


def _write_pid(ctx: RunContext, label: str, pid: int) -> None:
    with Path(ctx.params["pidfile"]).open("a") as f:
        f.write(f"{label} {pid}\n")


def stubborn(ctx: RunContext) -> None:
    """Ignore SIGTERM and sleep forever: only SIGKILL ends this one."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "pidfile" in ctx.params:
        _write_pid(ctx, "task", os.getpid())
    print("ready", flush=True)
    while True:
        time.sleep(1)


def _sleeper(ignore_term: bool) -> None:
    """Body of a spawned descendant: never returns, never runs the parent's cleanup."""
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        while True:
            time.sleep(1)
    finally:
        os._exit(0)


def escapees(ctx: RunContext) -> Any:
    """Spawn a ``setsid`` escapee and a double-forked grandchild, record pids, then sleep.

    ``params["exit"]`` true: return at once, leaving both behind.
    ``params["ignore_term"]`` true: the escapees ignore SIGTERM too.
    """
    ignore = bool(ctx.params.get("ignore_term"))
    _write_pid(ctx, "task", os.getpid())
    pid = os.fork()
    if pid == 0:
        os.setsid()
        _write_pid(ctx, "setsid", os.getpid())
        _sleeper(ignore)
    mid = os.fork()
    if mid == 0:
        grand = os.fork()
        if grand == 0:
            _write_pid(ctx, "grandchild", os.getpid())
            _sleeper(ignore)
        os._exit(0)  # the grandchild is now an orphan: reparented to the supervisor
    os.waitpid(mid, 0)
    deadline = time.monotonic() + 5
    while len(Path(ctx.params["pidfile"]).read_text().splitlines()) < 3:
        if time.monotonic() > deadline:
            raise RuntimeError("escapees did not start")
        time.sleep(0.005)
    print("spawned", flush=True)
    if ctx.params.get("exit"):
        return 0
    while True:
        time.sleep(1)


def flood(ctx: RunContext) -> None:
    """Write ``params["mb"]`` MiB to stdout in 1 KiB lines (1023 chars + newline)."""
    line = "x" * 1023 + "\n"
    block = line * 64
    for _ in range(ctx.params.get("mb", 100) * 16):
        sys.stdout.write(block)
    sys.stdout.flush()


def endless_line(ctx: RunContext) -> None:
    """One line that never ends: no newline, ever."""
    chunk = "y" * 4096
    while True:
        sys.stdout.write(chunk)
        sys.stdout.flush()


def sleep(ctx: RunContext) -> None:
    time.sleep(float(ctx.params.get("seconds", 60)))


def list_fds(ctx: RunContext) -> None:
    """Print the open fds and the session/process group, to check the child's hygiene."""
    fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))  # noqa: PTH208
    environ = Path("/proc/self/environ").read_bytes().split(b"\0")
    print(
        json.dumps(
            {
                "fds": fds,
                "targets": {fd: _readlink(fd) for fd in fds},
                "pid": os.getpid(),
                "sid": os.getsid(0),
                "pgid": os.getpgid(0),
                "environ": [v.decode(errors="replace") for v in environ if v],
            }
        )
    )


def signal_state(ctx: RunContext) -> None:
    """Print the dispositions of the signals schedd uses, and the blocked mask."""
    names = ("SIGTERM", "SIGHUP", "SIGCHLD", "SIGUSR1", "SIGINT")
    handlers = {}
    for name in names:
        handler = signal.getsignal(getattr(signal, name))
        handlers[name] = (
            "default_int_handler" if handler is signal.default_int_handler else str(handler)
        )
    blocked = sorted(signal.Signals(s).name for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    print(json.dumps({"handlers": handlers, "blocked": blocked}))


def _readlink(fd: int) -> str:
    try:
        return str(Path(f"/proc/self/fd/{fd}").readlink())
    except OSError:
        return "?"


# -- daemon-side helpers shared by test_runner.py and test_isolation.py --------------------
# (imports of scheduler.runner stay inside functions: children import this module too)


class Collector:
    """Collects ``on_line`` / ``on_event`` calls per run id."""

    def __init__(self) -> None:
        self.lines: dict[str, list[tuple[str, str]]] = {}
        self.events: dict[str, list[str]] = {}

    def on_line(self, job_id: str, run_id: str, stream: str, text: str) -> None:
        self.lines.setdefault(run_id, []).append((stream, text))

    def on_event(self, job_id: str, run_id: str, message: str) -> None:
        self.events.setdefault(run_id, []).append(message)

    def out(self, run_id: str, stream: str = "stdout") -> list[str]:
        return [text for s, text in self.lines.get(run_id, []) if s == stream]


_counter = iter(range(1, 1 << 30))


def request(target: str, params: dict[str, Any] | None = None, **kw: Any) -> Any:
    """A RunRequest for ``tests.runner_tasks:<target>`` with a fresh run id."""
    from scheduler.runner import RunRequest

    run_id = kw.pop("run_id", f"{target}-{next(_counter)}")
    ctx = RunContext(job_id="job", run_id=run_id, task="test", params=params or {})
    kw.setdefault("env", {"SCHEDD_TEST": "1"})
    return RunRequest(
        run_id=run_id, job_id="job", target=f"tests.runner_tasks:{target}", ctx=ctx, **kw
    )


def read_pids(pidfile: Path, count: int = 3, timeout: float = 5.0) -> dict[str, int]:
    """Wait until ``count`` pids are recorded in ``pidfile`` and return label -> pid."""
    deadline = time.monotonic() + timeout
    while True:
        lines = pidfile.read_text().splitlines() if pidfile.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return {label: int(pid) for label, pid in (line.split() for line in lines)}
        time.sleep(0.01)


def wait_gone(pids: Any, timeout: float = 5.0, *, zombies_ok: bool = False) -> list[int]:
    """Pids still alive after ``timeout``; [] once every one is gone (ProcessLookupError)."""
    from scheduler import procs

    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if (procs.alive(p) if zombies_ok else _exists(p))]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def prepared(ctx: RunContext) -> None:
    """Print when prepare ran and when the task itself began."""
    print(f"prepared {_prepared_at!r} began {time.time()!r}", flush=True)


_prepared_at = 0.0


def _prepare(ctx: RunContext) -> None:
    global _prepared_at
    _prepared_at = time.time()


prepared.prepare = _prepare  # type: ignore[attr-defined]
