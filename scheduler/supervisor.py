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
and each page either writes is copied (~3.5 us each here, ~1 us when the page
is no longer shared): a no-op run took ~940 page faults across launcher,
supervisor and task (~75% of their CPU time in the kernel) before this was
tuned, ~670 after a first pass, ~510 now. Every Python object a fresh fork
touches costs a page (its reference count is written), every function it
calls two more (the function and its code object), and bytecode that first
runs there is specialised there, writing to the code and type caches. So:
signal dispositions arrive as defaults (the launcher installs no handler: it
blocks what it waits for), hence nothing to reset and no wakeup pipe;
``_signal`` is called rather than ``signal``, whose wrappers build enum
members; the request is parsed, the target resolved and each process's
settings packed into one tuple in the launcher (:func:`prepare`); the whole
path, the supervisor's loop included, runs in the launcher before it serves
(:func:`warm_up`); no ``contextlib`` and no exceptions on the usual path; the
task's pid rides on its "started" message, its report is one constant line
when it has nothing to say, the usual result is one preformatted line, and
the supervisor releases all its pipes with one ``close_range``. What it says on the status pipe, and
how: :mod:`scheduler.runstatus`.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Any

from scheduler import confine, procs
from scheduler.child import ctx_from_json, preloaded_target, run_task
from scheduler.runstatus import (
    DONE,
    PLAIN_RESULT,
    STARTED,
    STATUS,
    apply_report,
    read_report,
    report_done,
    send,
)

#: What the supervisor waits for with ``sigtimedwait``; all blocked from the fork on.
WAITED = frozenset({signal.SIGTERM, signal.SIGUSR1, signal.SIGCHLD, signal.SIGHUP})
#: Blocked in the launcher for good: it has no terminal, so SIGINT is never its
#: own, and SIGUSR1 is only for supervisors. The task unblocks everything and so
#: gets Python's usual KeyboardInterrupt on SIGINT.
ALWAYS_BLOCKED = frozenset({signal.SIGINT, signal.SIGUSR1})
#: The task could not even be set up (bad cwd, bad context): like the shell's 126.
EXIT_SETUP = 126
#: How often the SIGKILL phase re-scans for processes that appeared meanwhile.
KILL_POLL = 0.02
#: Longest wait between two looks at the clock when nothing happens.
IDLE_WAIT = 3600.0
#: How often :func:`warm_up` runs each path: CPython 3.11 quickens a function
#: after 8 calls, and specialised instructions settle a few runs later.
WARM_UP_ROUNDS = 20
_SIGTERM = int(signal.SIGTERM)
#: Targets :func:`prepare` remembers resolving (see :func:`~scheduler.child.preloaded_target`).
MAX_TARGETS = 1024
_funcs: dict[str, Any] = {}

#: Highest fd + 1 to close in a new supervisor; looked up once, in the launcher.
_MAXFD = os.sysconf("SC_OPEN_MAX")


def prepare(req: dict[str, Any]) -> None:
    """Parse a run request in the launcher, before forking: warm code there, no page copies.

    The context becomes a :class:`~scheduler.types.RunContext`, the
    environment a list of encoded ``(name, value)`` pairs, ready for ``putenv``,
    and a target whose module the launcher has preloaded its function.
    Raises ``ValueError`` or ``TypeError`` for a malformed request.
    """
    req["ctx"] = ctx_from_json(req["ctx"])
    req["env"] = [(os.fsencode(k), os.fsencode(v)) for k, v in req["env"].items()]
    target = req["target"]
    func = _funcs.get(target, _funcs)
    if func is _funcs:
        func = preloaded_target(target)
        if len(_funcs) < MAX_TARGETS:  # the launcher imports nothing later: stays true
            _funcs[target] = func
    req["func"] = func
    # What the supervisor and the task read, each as one tuple: every constant and
    # method a fresh fork touches costs a page copy.
    timeout, not_before = req.get("timeout"), req.get("not_before")
    if timeout is not None:
        timeout = float(timeout)
    if not_before is not None:
        not_before = float(not_before)
    req["sup"] = (timeout, not_before, float(req.get("kill_grace", 10.0)))
    req["task"] = (req.get("cwd"), req["env"], target, req["ctx"], not_before, func)


def warm_up() -> None:
    """Run the supervisor's and the task's code paths in the launcher, before forking.

    CPython 3.11 rewrites a function's bytecode in place the first times it runs
    (quickening, specialisation) and fills lazy caches; done here, every child
    inherits the result instead of copying the pages to redo it. So the
    supervisor's own loop runs here for real, on a no-op task it forks (the
    launcher has no other child yet, and :data:`WAITED` is blocked meanwhile),
    and the task's code runs here ``dry``. Also clears the launcher's own
    environment: a task gets exactly its run's, and one without variables has
    nothing to set.
    """
    _set_environ([])
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_mask = procs.csignal.pthread_sigmask(signal.SIG_BLOCK, WAITED)
    try:
        req: dict[str, Any] = {
            "op": "run",
            "run_id": "warm-up",
            "target": f"{__name__}:_noop",
            "ctx": {"job_id": "warm-up", "run_id": "warm-up", "task": "warm-up"},
            "env": {},
        }
        prepare(req)
        # A preloaded module that started a process would have it reaped (or waited for) here.
        forks = not procs.children(os.getpid())
        for _ in range(WARM_UP_ROUNDS):
            _task(req, w, w, 0, dry=True)
            if forks:
                run(req, w, w, w, os.getppid(), dry=True)
            run_task(req["target"], req["ctx"])  # the path of a target the child imports
            with contextlib.suppress(BlockingIOError):
                while os.read(r, 65536):
                    pass
        sup = _Supervisor(req, w, os.getppid())
        sup.task_status = 0
        send(w, ev="result", pid=1, ended=time.time(), **sup._result())
    finally:
        procs.csignal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
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


#: The cgroups this supervisor made for its run, so an error after making them removes them.
_MADE: list[Mapping[str, str]] = []


def run(
    req: Mapping[str, Any], out_w: int, err_w: int, status: int, parent: int, dry: bool = False
) -> None:
    """Supervise one run; called in the launcher's freshly forked child, never returns.

    The launcher forks with :data:`WAITED` blocked and their dispositions at
    SIG_DFL, and its fd 0 is already /dev/null. ``dry`` (:func:`warm_up`, in
    the launcher) skips what would change the calling process, and returns.
    """
    try:
        if not dry:
            os.setsid()
            procs.become_subreaper(signal.SIGTERM)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.closerange(3, status)
            os.closerange(status + 1, _MAXFD)
        _Supervisor(req, status, parent).main()
        if dry:
            return
        # Release every pipe in one call: the daemon sees the run end in one wakeup, and
        # before this process's address space is torn down (exit closes fds last).
        os.closerange(1, _MAXFD)
    except BaseException as exc:
        if dry:
            raise
        try:
            traceback.print_exc()
            for _ in range(50):
                if procs.kill_tree(procs.descendants(os.getpid()), signal.SIGKILL) == 0:
                    break
                time.sleep(KILL_POLL)
            for groups in _MADE:
                confine.remove(groups)
            why = f"supervisor error: {type(exc).__name__}: {exc}"
            send(status, ev="result", status="killed", reason=why, ended=time.time())
        finally:
            os._exit(70)
    os._exit(0)


class _Supervisor:
    """One run's supervision state: the task, the deadline, how the run is being ended."""

    __slots__ = (
        "cancelled",
        "grace",
        "hurry",
        "kill_at",
        "killing",
        "last_signal",
        "not_before",
        "parent",
        "reason",
        "req",
        "status",
        "task",
        "task_status",
        "timeout",
    )

    def __init__(self, req: Mapping[str, Any], status: int, parent: int) -> None:
        self.req = req
        self.status = status
        self.parent = parent
        self.timeout: float | None
        self.not_before: float | None
        self.timeout, self.not_before, self.grace = req["sup"]
        self.cancelled = os.getppid() != parent  # the launcher died before PDEATHSIG was set
        self.hurry = False
        self.task = 0
        self.task_status: int | None = None
        self.reason: str | None = None  # "timeout" | "cancel" | "leftovers"
        self.kill_at: float | None = None
        self.killing = False
        self.last_signal: int = _SIGTERM

    def main(self) -> None:
        me = os.getpid()
        limits = self.req.get("limits")
        groups = confine.create(self.req, self._event) if limits else {}  # never joined here
        if groups:
            _MADE.append(groups)  # removed on the error path of run() too
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
        deadline = None
        if self.timeout is not None:
            # A run launched ahead of its slot waits for it; its timeout starts then.
            ahead = max(0.0, self.not_before - time.time()) if self.not_before else 0.0
            deadline = time.monotonic() + ahead + self.timeout
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
        report = read_report(report_r)
        code = os.waitstatus_to_exitcode(self.task_status or 0)
        if report == DONE and self.reason is None and code >= 0 and not limits:
            # The usual end, a task that exited by itself and had nothing to add: one
            # preformatted line (the general path below costs ~40 page copies).
            line = PLAIN_RESULT % (STATUS[code == 0], code, self.task, time.time_ns())
            os.write(self.status, line)
        else:
            result = self._result()
            note = apply_report(report, result)
            if note:
                self._event(note)
            if limits:
                confine.finish(self.req, groups, result)  # names the limit hit; removes the groups
            send(self.status, ev="result", pid=self.task, ended=time.time(), **result)
        os.close(report_r)

    def _reap(self) -> bool:
        """Reap what has exited; True once the task is reaped and nothing else is left."""
        while True:
            pid, st = procs.wait_any()
            if pid <= 0:
                return pid < 0
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


def _task(
    req: Mapping[str, Any],
    status: int,
    report: int,
    supervisor: int,
    groups: Mapping[str, str] | None = None,
    dry: bool = False,
) -> int:
    """The task process: own process group, limits and identity, exact environment, the target.

    Signal dispositions are already the defaults (see the module doc); only
    the mask is cleared, after the parent-death signal is armed. ``dry``
    (:func:`warm_up`, in the launcher) skips what would change the calling
    process and returns the exit status instead of exiting.
    """
    code = EXIT_SETUP
    error = note = limit = None
    try:
        cwd, env, target, ctx, not_before, func = req["task"]
        if not dry:
            os.setpgid(0, 0)
            procs.set_pdeathsig(signal.SIGKILL)
            if os.getppid() != supervisor:
                os._exit(EXIT_SETUP)
            if req.get("run_as"):
                confine.exec_confined(req, groups or {}, status, report, supervisor)
            if groups or req.get("limits"):
                confine.enter(req, groups or {}, supervisor)  # cgroup, then rlimits
            procs.csignal.pthread_sigmask(signal.SIG_SETMASK, ())
            if cwd:
                os.chdir(cwd)
        if env:  # else nothing to do: the launcher's environment is empty (warm_up)
            _set_environ(env)
        os.write(status, STARTED % (os.getpid(), time.time_ns()))
        if not dry:
            os.close(status)
        outcome = run_task(target, ctx, own_process=not dry, not_before=not_before, func=func)
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
    report_done(report, error, note, limit)
    if dry:
        return code
    os._exit(code)


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
