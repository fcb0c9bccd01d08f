"""The per-run supervisor: one process per run, forked by the launcher.

It exists so that ending a run is never best-effort. As a session leader and
child subreaper it inherits every process the task leaves behind (``setsid``
escapees, double forks), so it can find the whole tree under itself in
``/proc``, end it (SIGTERM, grace, SIGKILL) and reap it before reporting.
``PR_SET_PDEATHSIG`` turns the launcher's death into a cancel.

The supervisor is single-threaded and waits on one signal wakeup pipe
(SIGCHLD, SIGTERM = cancel, SIGUSR1 = hurry: SIGKILL now), so there are no
threads or locks to inherit across its own ``fork``. It always leaves through
``os._exit``: it is a copy of the launcher and must never run the launcher's
cleanup code.

Status pipe to the daemon: newline-terminated JSON objects, each written with
one ``os.write`` (shorter than ``PIPE_BUF``, so never interleaved):
``{"ev":"spawned","pid":N,"t":wall}``, ``{"ev":"started","t":wall}`` (from the
task process, which then closes the pipe so that nothing it forks holds it),
``{"ev":"event","msg":...}``, and last ``{"ev":"result","status":...,
"exit_code":...,"signal":...,"error":...,"ended":wall}``. End of file on it
therefore means the supervisor is gone. The task reports its exception type
to the supervisor on a private pipe, read once the task has been reaped.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Any, NoReturn

from scheduler import procs
from scheduler.child import ctx_from_json, run_task

#: Signals the supervisor handles through its wakeup pipe; blocked around fork.
HANDLED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGCHLD, signal.SIGHUP)
#: The task could not even be set up (bad cwd, bad context): like the shell's 126.
EXIT_SETUP = 126
#: How often the SIGKILL phase re-scans for processes that appeared meanwhile.
KILL_POLL = 0.02


def send(fd: int, **msg: Any) -> None:
    """Write one status message; a vanished reader must not stop a run from being ended."""
    with contextlib.suppress(OSError):
        os.write(fd, encode(msg))


def encode(msg: Mapping[str, Any]) -> bytes:
    """JSON for flat messages of plain values, without touching the ``json`` encoder.

    Every page a forked child writes to is copied; ``json.dumps`` alone touches
    ~100 of them on first use (about 0.2 ms per process here).
    """
    parts = []
    for key, value in msg.items():
        if value is None:
            text = "null"
        elif isinstance(value, int | float) and not isinstance(value, bool):
            text = repr(value)
        elif isinstance(value, str) and value.isprintable() and not set(value) & {'"', "\\"}:
            text = f'"{value}"'
        else:
            text = json.dumps(value)
        parts.append(f'"{key}":{text}')
    return ("{" + ",".join(parts) + "}\n").encode()


def prepare(req: dict[str, Any]) -> None:
    """Parse a run request in the launcher, before forking: warm code there, no page copies.

    Raises ``ValueError`` for a malformed context.
    """
    req["ctx"] = ctx_from_json(req["ctx"])


def setup_stdio() -> None:
    """Give the launcher the task's ``sys.std*`` objects, so no child has to build them.

    They are bound to fds 0-2, which each supervisor points at /dev/null and the
    run's pipes; line-buffered so output reaches the job log as it happens.
    """
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout, sys.stderr = _writer(1), _writer(2)


def _noop(signum: int, frame: object) -> None:
    """Python-level handler so the C handler writes the signal number to the wakeup fd."""


def install_handlers() -> None:
    """The handlers of the launcher, which every supervisor inherits as they are.

    Each process then only points ``signal.set_wakeup_fd`` at its own pipe and
    reads which signals came; SIGINT (a terminal's ^C) is not theirs to act on.
    """
    for sig in HANDLED:
        signal.signal(sig, _noop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _close_all_but(keep: set[int]) -> None:
    low = 0
    for fd in sorted(keep):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def run(req: Mapping[str, Any], out_w: int, err_w: int, status: int, parent: int) -> NoReturn:
    """Supervise one run; called in the launcher's freshly forked child, never returns.

    The launcher forks with :data:`HANDLED` blocked and its handlers installed
    (:func:`install_handlers`), so nothing is delivered before our own wakeup
    pipe is in place.
    """
    try:
        os.setsid()
        procs.set_child_subreaper()
        procs.set_pdeathsig(signal.SIGTERM)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        _close_all_but({0, 1, 2, status})
        _Supervisor(req, status, parent).main()
    except BaseException as exc:
        try:
            traceback.print_exc()
            for _ in range(50):
                if procs.kill_tree(procs.descendants(os.getpid()), signal.SIGKILL) == 0:
                    break
                time.sleep(KILL_POLL)
            why = f"supervisor error: {type(exc).__name__}: {exc}"
            send(status, ev="result", status="killed", reason=why, ended=time.time())
        finally:
            os._exit(70)
    os._exit(0)


class _Supervisor:
    def __init__(self, req: Mapping[str, Any], status: int, parent: int) -> None:
        self.req = req
        self.status = status
        self.parent = parent
        self.timeout: float | None = req.get("timeout")
        self.grace = float(req.get("kill_grace", 10.0))
        self.cancelled = os.getppid() != parent  # the launcher died before PDEATHSIG was set
        self.hurry = False
        self.task = 0
        self.task_status: int | None = None
        self.reason: str | None = None  # "timeout" | "cancel" | "leftovers"
        self.kill_at: float | None = None
        self.killing = False
        self.last_signal = signal.SIGTERM

    def main(self) -> None:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        me = os.getpid()
        report_r, report_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.task = os.fork()
        if self.task == 0:
            for fd in (wake_r, wake_w, report_r):
                os.close(fd)
            _task(self.req, self.status, report_w, me)
        os.close(report_w)
        with contextlib.suppress(OSError):  # already done by the child, or it has exited
            os.setpgid(self.task, self.task)
        start = time.monotonic()
        send(self.status, ev="spawned", pid=self.task, t=time.time())
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        deadline = start + self.timeout if self.timeout is not None else None
        poller = select.poll()
        poller.register(wake_r, select.POLLIN)
        while True:
            if self._reap():
                break
            now = time.monotonic()
            if self.reason is None:
                if self.cancelled:
                    self._begin("cancel", "cancelled")
                elif self.task_status is not None:
                    self._begin("leftovers", "task exited, processes left behind")
                elif deadline is not None and now >= deadline:
                    self._begin("timeout", f"timeout after {self.timeout:g}s")
            if self.hurry or (self.kill_at is not None and now >= self.kill_at):
                self._kill()
            wakes = [t for t in (deadline if self.reason is None else None, self.kill_at) if t]
            wait = min(wakes, default=now + 3600) - now
            if self.killing:
                wait = KILL_POLL
            if poller.poll(max(0.0, wait) * 1000 + 1):
                self._drain(wake_r)
        os.dup2(0, 1)  # release the output pipes: the reader's EOF must come before our result
        os.dup2(0, 2)
        result = self._result()
        for msg in _read_report(report_r):
            if msg.get("ev") == "error":
                result["error"] = msg["type"]
            elif msg.get("ev") == "event":
                self._event(msg["msg"])
        send(self.status, ev="result", ended=time.time(), **result)

    def _drain(self, wake_r: int) -> None:
        try:
            data = os.read(wake_r, 512)
        except BlockingIOError:
            return
        if signal.SIGTERM in data:
            self.cancelled = True
        if signal.SIGUSR1 in data:
            self.cancelled = self.hurry = True

    def _reap(self) -> bool:
        """Reap what has exited; True once the task is reaped and nothing else is left."""
        while True:
            try:
                pid, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return True
            if pid == 0:
                return False
            if pid == self.task:
                self.task_status = st

    def _tree(self) -> list[int]:
        return procs.descendants(os.getpid())

    def _signal_all(self, sig: int) -> int:
        n = procs.kill_tree(self._tree(), sig)
        if self.task_status is None:  # the unreaped task keeps its pgid from being reused
            with contextlib.suppress(OSError):
                os.killpg(self.task, sig)
        return n

    def _begin(self, reason: str, what: str) -> None:
        self.reason = reason
        n = self._signal_all(signal.SIGTERM)
        self._signal_all(signal.SIGCONT)  # a stopped process would never see the SIGTERM
        self._event(f"{what}: sent SIGTERM to {procs.processes(n)}")
        self.kill_at = time.monotonic() + self.grace

    def _kill(self) -> None:
        n = self._signal_all(signal.SIGKILL)
        if not self.killing:
            self.killing = True
            self.last_signal = signal.SIGKILL
            if n:
                why = "hurried" if self.hurry else f"grace {self.grace:g}s expired"
                self._event(f"{why}: sent SIGKILL to {procs.processes(n)}")

    def _event(self, msg: str) -> None:
        send(self.status, ev="event", msg=msg)

    def _result(self) -> dict[str, Any]:
        st = self.task_status if self.task_status is not None else 0
        code = os.WEXITSTATUS(st) if os.WIFEXITED(st) else None
        sig = procs.signal_name(os.WTERMSIG(st)) if os.WIFSIGNALED(st) else None
        if self.reason == "timeout":
            return {"status": "timeout", "exit_code": code, "signal": sig}
        if self.reason == "cancel":
            sent = sig or procs.signal_name(self.last_signal)
            why = "cancelled" if os.getppid() == self.parent else "the schedd launcher died"
            return {"status": "killed", "exit_code": code, "signal": sent, "reason": why}
        if sig is not None:
            return {"status": "killed", "signal": sig, "reason": f"task died by {sig}"}
        return {"status": "success" if code == 0 else "failed", "exit_code": code}


def _read_report(fd: int) -> list[dict[str, Any]]:
    """What the (reaped) task wrote on its private pipe; strays may hold it, so no EOF wait."""
    data = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(fd, 65536):
            data += chunk
    msgs: list[dict[str, Any]] = []
    for line in data.splitlines():
        with contextlib.suppress(ValueError):
            msgs.append(json.loads(line))
    return msgs


def _task(req: Mapping[str, Any], status: int, report: int, supervisor: int) -> NoReturn:
    """The task process: reset what the supervisor set up, then run the target."""
    code = EXIT_SETUP
    try:
        signal.set_wakeup_fd(-1)
        for sig in HANDLED:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.setpgid(0, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        procs.set_pdeathsig(signal.SIGKILL)
        if os.getppid() != supervisor:
            os._exit(EXIT_SETUP)
        cwd = req.get("cwd")
        if cwd:
            os.chdir(cwd)
        _replace_environ(req["env"])
        send(status, ev="started", t=time.time())
        os.close(status)
        outcome = run_task(req["target"], req["ctx"], own_process=True)
        code = outcome.exit_code
        if outcome.error:
            send(report, ev="error", type=outcome.error)
        if outcome.note:
            send(report, ev="event", msg=outcome.note)
    except BaseException as exc:
        try:
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            send(report, ev="error", type=type(exc).__name__)
    os._exit(code)


def _replace_environ(env: Mapping[str, str]) -> None:
    """Make the environment exactly ``env``: ``os.environ`` and the C ``environ`` both.

    ``os.environ.clear()`` + ``update()`` cost ~0.4 ms in a fresh fork (page
    copies of all the mapping machinery they run); CPython's ``_Environ`` keeps
    its data in ``_data`` (encoded keys and values), so set that directly when
    it is there and fall back to the public API otherwise.
    """
    data = getattr(os.environ, "_data", None)
    if not isinstance(data, dict):
        os.environ.clear()
        os.environ.update(env)
        return
    for key in list(data):
        os.unsetenv(key)
    data.clear()
    for key, value in env.items():
        k, v = os.fsencode(key), os.fsencode(value)
        os.putenv(k, v)
        data[k] = v


def _writer(fd: int) -> io.TextIOWrapper:
    raw = io.FileIO(fd, "w", closefd=False)
    return io.TextIOWrapper(
        io.BufferedWriter(raw), encoding="utf-8", errors="backslashreplace", line_buffering=True
    )
