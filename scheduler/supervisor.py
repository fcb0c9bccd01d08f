"""The per-run supervisor: one process per run, forked by the launcher.

It exists so that ending a run is never best-effort. As a session leader and
child subreaper it inherits every process the task leaves behind (``setsid``
escapees, double forks), so it can find the whole tree under itself in
``/proc``, end it (SIGTERM, grace, SIGKILL) and reap it before reporting.
``PR_SET_PDEATHSIG`` turns the launcher's death into a cancel. It is
single-threaded, waits with ``sigtimedwait`` for SIGCHLD, SIGTERM (cancel),
SIGUSR1 (hurry: SIGKILL now) and SIGHUP (ignored), and always leaves through
``os._exit``: it is a copy of the launcher and must never run its cleanup.

Cost shapes the code. Supervisor and task are fresh copies of the launcher,
and each page either writes is copied: a no-op run took ~940 page faults
across launcher, supervisor and task (~75% of their CPU time in the kernel)
before this was tuned, ~670 after. So: signal dispositions arrive as defaults
(the launcher swaps its handlers out around ``fork``), hence nothing to reset
and no wakeup pipe; ``_signal`` is called rather than ``signal``, whose
wrappers build enum members; code paths are warmed up and the request is
parsed in the launcher (:func:`warm_up`, :func:`prepare`); no ``contextlib``
on the usual path; the task's pid rides on its "started" message, its report
is one constant line when it has nothing to say, and the supervisor releases
all its pipes with one ``close_range``.

Status pipe to the daemon: newline-terminated JSON objects, each written with
one ``os.write`` (shorter than ``PIPE_BUF``, so never interleaved):
``{"ev":"started","pid":N,"t":wall}`` (from the task process, which then
closes the pipe so that nothing it forks holds it), ``{"ev":"event","msg":...}``,
and last ``{"ev":"result","status":...,"exit_code":...,"signal":...,
"error":...,"pid":N,"ended":wall}``. End of file on it therefore means the
supervisor is gone. The task reports its exception type (or a note about its
return value) on a private pipe, read once the task has been reaped.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Any, NoReturn

from scheduler import confine, procs
from scheduler.child import ctx_from_json, run_task

#: What the supervisor waits for with ``sigtimedwait``; all blocked from the fork on.
WAITED = frozenset({signal.SIGTERM, signal.SIGUSR1, signal.SIGCHLD, signal.SIGHUP})
#: Blocked in the launcher for good: it has no terminal, so SIGINT is never its
#: own, and SIGUSR1 is only for supervisors. The task unblocks everything and so
#: gets Python's usual KeyboardInterrupt on SIGINT.
ALWAYS_BLOCKED = frozenset({signal.SIGINT, signal.SIGUSR1})
#: The launcher's own handlers, swapped for SIG_DFL (and blocked) around ``fork``.
LAUNCHER_HANDLED = (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD)
#: The task could not even be set up (bad cwd, bad context): like the shell's 126.
EXIT_SETUP = 126
#: How often the SIGKILL phase re-scans for processes that appeared meanwhile.
KILL_POLL = 0.02
#: Longest wait between two looks at the clock when nothing happens.
IDLE_WAIT = 3600.0
#: How often :func:`warm_up` runs each path: CPython 3.11 quickens a function
#: after 8 calls, and specialised instructions settle a few runs later.
WARM_UP_ROUNDS = 20
#: What the task reports when it has nothing to say; compared, never parsed.
DONE = b'{"ev":"done"}\n'

#: Highest fd + 1 to close in a new supervisor; looked up once, in the launcher.
_MAXFD = os.sysconf("SC_OPEN_MAX")


def send(fd: int, **msg: Any) -> None:
    """Write one status message; a vanished reader must not stop a run from being ended."""
    try:  # noqa: SIM105  (contextlib.suppress costs page copies in a fresh fork)
        os.write(fd, encode(msg))
    except OSError:
        pass


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
        elif isinstance(value, str) and _plain(value):
            text = f'"{value}"'
        else:
            text = json.dumps(value)
        parts.append(f'"{key}":{text}')
    return ("{" + ",".join(parts) + "}\n").encode()


def _plain(text: str) -> bool:
    """True when ``text`` needs no JSON escaping."""
    return text.isprintable() and '"' not in text and "\\" not in text


def prepare(req: dict[str, Any]) -> None:
    """Parse a run request in the launcher, before forking: warm code there, no page copies.

    The context becomes a :class:`~scheduler.types.RunContext` and the
    environment a list of encoded ``(name, value)`` pairs, ready for ``putenv``.
    Raises ``ValueError`` or ``TypeError`` for a malformed request.
    """
    req["ctx"] = ctx_from_json(req["ctx"])
    req["env"] = [(os.fsencode(k), os.fsencode(v)) for k, v in req["env"].items()]


def warm_up() -> None:
    """Run the supervisor's and the task's code paths once in the launcher, before forking.

    CPython 3.11 rewrites a function's bytecode in place the first times it runs
    (quickening, specialisation) and fills lazy caches; done here, every child
    inherits the result instead of copying the pages to redo it (~50 pages a
    run). Also clears the launcher's own environment: a task gets exactly its
    run's, and nothing is left to unset in each one.
    """
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ctx = ctx_from_json({"job_id": "warm-up", "run_id": "warm-up", "task": "warm-up"})
        for _ in range(WARM_UP_ROUNDS):
            _set_environ([])
            run_task(f"{__name__}:_noop", ctx)
            sup = _Supervisor({"timeout": None}, w, os.getpid())
            sup.task_status = 0
            result = sup._result()
            send(w, ev="started", pid=1, t=time.time())
            send(w, ev="result", pid=1, ended=time.time(), **result)
            os.write(w, DONE)
            _read_report(r, result)
    finally:
        os.close(r)
        os.close(w)


def _noop(ctx: object) -> None:
    """The target :func:`warm_up` runs."""


def setup_stdio() -> None:
    """Give the launcher the task's ``sys.std*`` objects, so no child has to build them.

    They are bound to fds 0-2: the launcher's fd 0 is /dev/null, and each
    supervisor points 1 and 2 at the run's pipes; line-buffered so output
    reaches the job log as it happens.
    """
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout, sys.stderr = _writer(1), _writer(2)


def run(req: Mapping[str, Any], out_w: int, err_w: int, status: int, parent: int) -> NoReturn:
    """Supervise one run; called in the launcher's freshly forked child, never returns.

    The launcher forks with :data:`WAITED` blocked and their dispositions at
    SIG_DFL, and its fd 0 is already /dev/null.
    """
    try:
        os.setsid()
        procs.set_child_subreaper()
        procs.set_pdeathsig(signal.SIGTERM)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.closerange(3, status)
        os.closerange(status + 1, _MAXFD)
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
    """One run's supervision state: the task, the deadline, how the run is being ended."""

    def __init__(self, req: Mapping[str, Any], status: int, parent: int) -> None:
        self.req = req
        self.status = status
        self.parent = parent
        self.timeout: float | None = req.get("timeout")
        self.not_before: float | None = req.get("not_before")
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
        me = os.getpid()
        limits = self.req.get("limits")
        groups = confine.create(self.req, self._event) if limits else {}  # never joined here
        report_r, report_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.task = os.fork()
        if self.task == 0:
            os.close(report_r)
            _task(self.req, self.status, report_w, me, groups)
        os.close(report_w)
        try:  # noqa: SIM105  (no contextlib.suppress here: see send())
            os.setpgid(self.task, self.task)
        except OSError:
            pass  # already done by the child, or it has exited
        # A run launched ahead of its slot waits for it; its timeout starts then.
        ahead = max(0.0, (self.not_before or 0.0) - time.time())
        deadline = None if self.timeout is None else time.monotonic() + ahead + self.timeout
        while not self._reap():
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
            if self.killing:
                wait = KILL_POLL
            else:
                wake = self.kill_at if self.reason is not None else deadline
                wait = IDLE_WAIT if wake is None else max(0.0, wake - now)
            info = signal.sigtimedwait(WAITED, wait)
            if info is not None:
                if info.si_signo == signal.SIGTERM:
                    self.cancelled = True
                elif info.si_signo == signal.SIGUSR1:
                    self.cancelled = self.hurry = True
        result = self._result()
        note = _read_report(report_r, result)
        if note:
            self._event(note)
        if limits:
            confine.finish(self.req, groups, result)  # names the limit hit; removes the groups
        send(self.status, ev="result", pid=self.task, ended=time.time(), **result)
        # Release every pipe in one call: the daemon sees the run end in one wakeup, and
        # before this process's address space is torn down (exit closes fds last).
        os.closerange(1, _MAXFD)

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

    def _signal_all(self, sig: int) -> int:
        n = procs.kill_tree(procs.descendants(os.getpid()), sig)
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


def _read_report(fd: int, result: dict[str, Any]) -> str | None:
    """Apply what the (reaped) task reported; return its note, if any.

    The task's last act is one write, so this is one read and, the task
    being gone, end of file. A task that ``exec``'d closed its end on exec and
    reports nothing; one that died abruptly may have left strays holding the
    pipe, hence non-blocking reads.
    """
    data = b""
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
    except OSError:
        pass
    if data == DONE:
        return None
    note = None
    for line in data.splitlines():
        try:
            msg = json.loads(line)
            if msg.get("error"):
                result["error"] = msg["error"]
            if msg.get("note"):
                note = msg["note"]
            if msg.get("limit"):
                result["limit"] = msg["limit"]
        except (ValueError, AttributeError):
            continue
    return note


def _task(
    req: Mapping[str, Any], status: int, report: int, supervisor: int, groups: Mapping[str, str]
) -> NoReturn:
    """The task process: own process group, limits and identity, exact environment, the target.

    Signal dispositions are already the defaults (see the module doc); only
    the mask is cleared, after the parent-death signal is armed.
    """
    code = EXIT_SETUP
    error = note = limit = None
    try:
        os.setpgid(0, 0)
        procs.set_pdeathsig(signal.SIGKILL)
        if os.getppid() != supervisor:
            os._exit(EXIT_SETUP)
        if groups or req.get("limits") or req.get("run_as"):
            confine.enter(req, groups, supervisor)  # cgroup, rlimits, then drop privileges
        procs.csignal.pthread_sigmask(signal.SIG_SETMASK, ())
        cwd = req.get("cwd")
        if cwd:
            os.chdir(cwd)
        _set_environ(req["env"])
        os.write(status, b'{"ev":"started","pid":%d,"t":%r}\n' % (os.getpid(), time.time()))
        os.close(status)
        outcome = run_task(
            req["target"], req["ctx"], own_process=True, not_before=req.get("not_before")
        )
        code, error, note = outcome.exit_code, outcome.error, outcome.note
        if outcome.exception is not None and req.get("limits"):
            limit = confine.explain(outcome.exception, req["limits"])
    except BaseException as exc:
        try:
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            error = type(exc).__name__
            limit = confine.explain(exc, req.get("limits"))
    try:
        plain = error is None and note is None and limit is None
        os.write(report, DONE if plain else _done(error, note, limit))
    except OSError:
        pass
    os._exit(code)


def _done(error: str | None, note: str | None, limit: str | None = None) -> bytes:
    msg = {"ev": "done"}
    if error is not None:
        msg["error"] = error
    if note is not None:
        msg["note"] = note
    if limit is not None:
        msg["limit"] = limit
    return (json.dumps(msg) + "\n").encode()


def _set_environ(pairs: list[tuple[bytes, bytes]]) -> None:
    """Make the environment exactly ``pairs``: ``os.environ`` and the C ``environ`` both.

    ``os.environ.clear()`` + ``update()`` cost ~0.4 ms in a fresh fork (page
    copies of all the mapping machinery they run); CPython's ``_Environ`` keeps
    its data in ``_data`` (encoded keys and values), so set that directly when
    it is there and fall back to the public API otherwise.
    """
    data = getattr(os.environ, "_data", None)
    if not isinstance(data, dict):
        os.environ.clear()
        os.environ.update({os.fsdecode(k): os.fsdecode(v) for k, v in pairs})
        return
    for key in list(data):
        os.unsetenv(key)
    data.clear()
    for key, value in pairs:
        os.putenv(key, value)
        data[key] = value


def _writer(fd: int) -> io.TextIOWrapper:
    raw = io.FileIO(fd, "w", closefd=False)
    return io.TextIOWrapper(
        io.BufferedWriter(raw), encoding="utf-8", errors="backslashreplace", line_buffering=True
    )
