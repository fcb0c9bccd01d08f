"""The fork server: ``python -m scheduler.launcher --fd N [--preload MOD]...``.

The daemon has threads, so it must never ``fork()``. It execs this small,
single-threaded process once; the launcher preloads :mod:`scheduler.child`,
:mod:`scheduler.types` (and any ``--preload`` modules), then forks one
supervisor (:mod:`scheduler.supervisor`) per request, which forks the task.

What a run costs is mostly memory management, not Python: each ``fork``
copies the launcher's page tables (~0.2 ms for its ~8 MB of heap), and every
page the launcher, the supervisor or the task then writes is copied
(``perf``: ~75% of their CPU time is in the kernel, page faults first). So:
everything a child needs is prepared and warmed up here, before the fork
(:func:`scheduler.supervisor.prepare`, :func:`scheduler.supervisor.warm_up`,
:func:`scheduler.procs.warm`, ``LD_BIND_NOW``, ``gc.freeze()``); children
inherit default signal dispositions, so they have none to reset; and the
per-request path here touches as little as it can.

Protocol on the control socket (``AF_UNIX``/``SOCK_STREAM``, the other end in
the daemon):

* daemon -> launcher: 4-byte big-endian length + a JSON object. ``{"op":
  "run", "nfds": 3, "run_id", "target", "ctx", "env", "cwd", "timeout",
  "kill_grace"}`` carries the write ends of the run's stdout, stderr and status
  pipes as ``SCM_RIGHTS`` in the same ``sendmsg``; ``{"op": "cancel",
  "run_id"}`` and ``{"op": "hurry", "run_id"}`` (``run_id`` null: every run).
  Received fds are queued in arrival order and each message takes ``nfds`` of
  them, which stays correct however the stream is split across reads.
* launcher -> daemon: newline-terminated JSON, ``{"ready": pid, "warnings":
  [...]}`` once after start-up. Everything about a run goes over its own
  status pipe instead, so a run's outcome never depends on this socket.

Signals: SIGTERM, SIGHUP and SIGCHLD reach the loop through a wakeup pipe;
around each ``fork`` they are blocked and set back to SIG_DFL, so the
supervisor starts with exactly what it waits for blocked and the task with
clean dispositions. SIGINT and SIGUSR1 stay blocked here.

End of file on the socket, SIGTERM or SIGHUP means the daemon is gone (or
closing): every supervisor gets SIGTERM and ends its run's tree with the run's
grace; the launcher exits once all are reaped, escalating to SIGKILL if one
hangs. The launcher is a child subreaper too, so anything orphaned by a
supervisor that was itself SIGKILLed lands here and is killed at once.
"""

from __future__ import annotations

import array
import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import scheduler.types  # noqa: F401  (preloaded so that children get it for free)
from scheduler import procs, supervisor

if TYPE_CHECKING:
    import subprocess

#: Most fds one ``recvmsg`` may carry; a run request has 3.
MAX_FDS = 64
#: Bytes read from the control socket at once.
RECV_SIZE = 1 << 16
_ANC_SIZE = socket.CMSG_LEN(MAX_FDS * array.array("i").itemsize)
_decode = json.JSONDecoder().decode
#: After the longest grace of the remaining runs, how long before SIGUSR1 / SIGKILL.
CLOSE_HURRY_AFTER = 2.0
CLOSE_KILL_AFTER = 3.0
#: After killing strays, when to look for more (one may have forked meanwhile).
SWEEP_AGAIN = 0.02


_LOCALE_VARS = ("LANG", "LC_ALL", "LC_CTYPE")


def default_env() -> dict[str, str]:
    """The launcher's environment: it can import what the daemon can, and nothing else.

    Minimal on purpose: a forked task inherits the launcher's memory, including
    the environment block ``/proc/self/environ`` shows, so the daemon's own
    variables (secrets included) must never be in it.
    """
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    paths = [
        os.path.abspath(p)  # noqa: PTH100  (strings in, strings out)
        for p in sys.path
        if p and not any(p == r or p.startswith(r + os.sep) for r in roots)
    ]
    env = {k: os.environ[k] for k in _LOCALE_VARS if k in os.environ}
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def spawn(
    preload: Sequence[str], env: Mapping[str, str]
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Exec a launcher (daemon side); returns it and the daemon's end of its socket.

    No ``preexec_fn`` (unsafe with threads): only ``pass_fds`` and
    ``start_new_session``, which ``subprocess`` does safely between fork and exec.
    The daemon's end of the socket is close-on-exec, so only the daemon holds it:
    its death is the launcher's end of file. (``PR_SET_PDEATHSIG`` is not used
    for this: it fires when the daemon *thread* that spawned the launcher exits.)

    ``LD_BIND_NOW=1`` makes the dynamic loader resolve every symbol at start-up:
    otherwise each supervisor and task resolves the C functions it is first to
    call, writing to (and so copying) the launcher's symbol tables, ~35 pages
    a run. It costs tasks nothing later: CPython already loads extension
    modules with ``RTLD_NOW``. The launcher clears its environment once it is
    up, so no task inherits the variable.
    """
    import subprocess  # here, not at the top: the fork server itself must not import it

    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    args = [sys.executable, "-m", "scheduler.launcher", "--fd", str(child.fileno())]
    for name in preload:
        args += ["--preload", name]
    try:
        proc = subprocess.Popen(
            args,
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
            env={"LD_BIND_NOW": "1", **env},
            start_new_session=True,  # the terminal's ^C is for the daemon, not its runs
        )
    finally:
        child.close()
    return proc, parent


def pack(msg: Mapping[str, Any]) -> bytes:
    """Frame one daemon -> launcher message."""
    body = json.dumps(msg, separators=(",", ":")).encode()
    return len(body).to_bytes(4, "big") + body


def _on_signal(signum: int, frame: object) -> None:
    """Python-level handler so the C handler writes the signal number to the wakeup fd."""


class Launcher:
    """The fork server's single-threaded event loop: control socket and signal wakeup pipe."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pid = os.getpid()
        self.buf = bytearray()
        self.fds: deque[int] = deque()
        self.sups: dict[int, tuple[str, float]] = {}  # supervisor pid -> (run_id, grace)
        self.by_run: dict[str, int] = {}
        self.reap = False
        self.sweep_at: float | None = None  # strays were killed: look again by then
        self.closing = False
        self.hurry_at = self.kill_at = 0.0
        self.hurried = False
        self.poller = select.poll()
        self.wake_r = self.wake_w = -1

    def serve(self) -> int:
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._handlers(on=True)
        self.poller.register(self.wake_r, select.POLLIN)
        self.poller.register(self.sock.fileno(), select.POLLIN)
        while True:
            for fd, _ in self.poller.poll(self._poll_ms()):
                if fd == self.wake_r:
                    data = os.read(self.wake_r, 512)
                    self.reap = self.reap or signal.SIGCHLD in data
                    if signal.SIGTERM in data or signal.SIGHUP in data:
                        self._close()
                else:
                    self._receive()
            swept = self.sweep_at is not None and time.monotonic() >= self.sweep_at
            if self.reap or swept or self.closing:
                self.reap = False
                if self._reap_all() and self.closing:
                    return 0
            if self.closing:
                self._escalate()

    def _poll_ms(self) -> int | None:
        """Block until an event, unless something must be looked at on a clock."""
        if self.closing:
            return 20
        if self.sweep_at is not None:
            return max(0, round((self.sweep_at - time.monotonic()) * 1000))
        return None

    def _handlers(self, *, on: bool) -> None:
        """Install, or around ``fork`` set to SIG_DFL, the launcher's handlers and wakeup fd.

        Swapping them out in the parent, with the signals blocked, costs a few
        microseconds of warm code; resetting them in every supervisor and task
        ran a cold interpreter path in each (~50 page copies per process). A
        SIGTERM or SIGHUP that arrives meanwhile stays pending and reaches the
        restored handler; a pending SIGCHLD is discarded by SIG_DFL, so
        :meth:`fork_supervisor` reaps right after.
        """
        handler = _on_signal if on else procs.csignal.SIG_DFL
        for sig in supervisor.LAUNCHER_HANDLED:
            procs.csignal.signal(sig, handler)
        signal.set_wakeup_fd(self.wake_w if on else -1, warn_on_full_buffer=False)

    def _receive(self) -> None:
        """Read what the daemon sent: frames, and the fds that came with them.

        ``recvmsg`` and the ``json`` decoder are called directly, not through
        ``socket.recv_fds`` and ``json.loads``: every page this loop touches was
        write-protected by the last ``fork`` and costs a fault, so fewer Python
        frames per request is measurably cheaper.
        """
        try:
            data, ancillary, flags, _ = self.sock.recvmsg(RECV_SIZE, _ANC_SIZE)
        except OSError:
            data, ancillary, flags = b"", [], 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
                self.fds.extend(received)
        if flags & socket.MSG_CTRUNC:
            print("schedd launcher: file descriptors lost (MSG_CTRUNC)", file=sys.stderr)
        if not data:
            self.poller.unregister(self.sock.fileno())
            self._close()
            return
        buf = self.buf
        buf += data
        while len(buf) >= 4:
            size = int.from_bytes(buf[:4], "big")
            if len(buf) < 4 + size:
                break
            msg = _decode(buf[4 : 4 + size].decode())
            del buf[: 4 + size]
            fds = [self.fds.popleft() for _ in range(min(msg.get("nfds", 0), len(self.fds)))]
            self._handle(msg, fds)

    def _handle(self, msg: dict[str, Any], fds: list[int]) -> None:
        op = msg.get("op")
        if op == "run" and len(fds) == 3:
            self._spawn(msg, fds)
            return
        if op in ("cancel", "hurry"):
            sig = signal.SIGTERM if op == "cancel" else signal.SIGUSR1
            run_id = msg.get("run_id")
            pids = list(self.sups) if run_id is None else [self.by_run.get(run_id, 0)]
            procs.kill_tree([p for p in pids if p], sig)
        for fd in fds:
            os.close(fd)

    def _spawn(self, msg: dict[str, Any], fds: list[int]) -> None:
        out_w, err_w, status = fds
        pid = -1
        try:
            supervisor.prepare(msg)
            why = "launcher is shutting down" if self.closing else ""
        except (KeyError, ValueError, TypeError) as exc:
            why = f"bad run request: {exc}"
        if not why:
            try:
                pid = self.fork_supervisor(msg, out_w, err_w, status)
            except OSError as exc:
                why = f"fork failed: {exc}"
        if pid > 0:
            self.sups[pid] = (msg["run_id"], float(msg.get("kill_grace", 10.0)))
            self.by_run[msg["run_id"]] = pid
        else:
            supervisor.send(status, ev="result", status="killed", reason=why, ended=time.time())
        for fd in fds:
            os.close(fd)

    def fork_supervisor(self, msg: dict[str, Any], out_w: int, err_w: int, status: int) -> int:
        """Fork one run's supervisor; in the child this never returns.

        The child starts with :data:`~scheduler.supervisor.WAITED` blocked and
        every disposition at its default, so it needs no signal set-up at all.
        """
        csig = procs.csignal
        csig.pthread_sigmask(signal.SIG_BLOCK, supervisor.LAUNCHER_HANDLED)
        self._handlers(on=False)
        try:
            pid = os.fork()
            if pid == 0:
                supervisor.run(msg, out_w, err_w, status, self.pid)
        finally:
            self._handlers(on=True)
            csig.pthread_sigmask(signal.SIG_UNBLOCK, supervisor.LAUNCHER_HANDLED)
            self.reap = True  # a SIGCHLD pending while its handler was SIG_DFL was dropped
        return pid

    def _reap_all(self) -> bool:
        """Reap every exited child; True once the launcher has no child at all.

        A supervisor that exits 0 has reaped its whole tree (it is a subreaper
        and leaves only once ``waitpid`` finds no child), so the usual run costs
        one ``waitpid`` here. One that was killed left its tree to us: those
        processes were reparented to the launcher (a subreaper too). One that
        was stopped (a task may SIGSTOP its parent: same uid) is continued at
        once, or its run's timeout would never be enforced.
        """
        sweep = self.sweep_at is not None
        while True:
            try:
                pid, st = os.waitpid(-1, os.WNOHANG | os.WUNTRACED)
            except ChildProcessError:
                self.sweep_at = None
                return True
            if pid == 0:
                break
            if os.WIFSTOPPED(st):
                try:  # noqa: SIM105  (the fork server does not import contextlib)
                    os.kill(pid, signal.SIGCONT)
                except OSError:
                    pass
                sweep = sweep or pid not in self.sups  # a stopped stray: killed below
                continue
            sup = self.sups.pop(pid, None)
            if sup is None or st != 0:
                sweep = True  # an orphan, or a supervisor that died before its tree did
            if sup is not None and self.by_run.get(sup[0]) == pid:
                del self.by_run[sup[0]]
        if sweep:
            self._sweep()
        return False

    def _sweep(self) -> None:
        """SIGKILL every child that is not a live supervisor, with its descendants.

        Looks again shortly after: a stray may have forked while being killed.
        """
        strays = [kid for kid in procs.children(self.pid) if kid not in self.sups]
        for kid in strays:
            procs.kill_tree([kid, *procs.descendants(kid)], signal.SIGKILL)
        self.sweep_at = time.monotonic() + SWEEP_AGAIN if strays else None

    def _close(self) -> None:
        if self.closing:
            return
        self.closing = True
        procs.kill_tree(self.sups, signal.SIGTERM)
        longest = max((grace for _, grace in self.sups.values()), default=0.0)
        self.hurry_at = time.monotonic() + longest + CLOSE_HURRY_AFTER
        self.kill_at = self.hurry_at + CLOSE_KILL_AFTER

    def _escalate(self) -> None:
        now = time.monotonic()
        if now >= self.hurry_at and not self.hurried:
            self.hurried = True
            procs.kill_tree(self.sups, signal.SIGUSR1)
        if now >= self.kill_at:
            procs.kill_tree(procs.descendants(self.pid), signal.SIGKILL)


def _parse(argv: Sequence[str]) -> tuple[int, list[str]]:
    fd, preload = -1, []
    it = iter(argv)
    for arg in it:
        if arg == "--fd":
            fd = int(next(it))
        elif arg == "--preload":
            preload.append(next(it))
        else:
            raise SystemExit(f"schedd launcher: unknown argument {arg!r}")
    if fd < 0:
        raise SystemExit("usage: python -m scheduler.launcher --fd N [--preload MODULE]...")
    return fd, preload


def main(argv: Sequence[str] | None = None) -> int:
    fd, preload = _parse(sys.argv[1:] if argv is None else argv)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)  # every run's stdin, so supervisors need not open it
    for std in (1, 2):  # so that received fds never land on 0-2
        try:
            os.fstat(std)
        except OSError:
            os.dup2(null, std)
    if null > 2:
        os.close(null)
    procs.csignal.pthread_sigmask(signal.SIG_SETMASK, supervisor.ALWAYS_BLOCKED)
    warnings = []
    for name in preload:
        try:
            importlib.import_module(name)
        except BaseException as exc:  # a broken module must not stop every other run
            warnings.append(f"preload {name!r} failed: {type(exc).__name__}: {exc}")
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        warnings.append("a preloaded module started a thread; forking it is unsafe")
    # What every task inherits: default dispositions, Python's KeyboardInterrupt on SIGINT
    # (SIGTERM, SIGHUP and SIGCHLD get the launcher's own handlers, swapped out around fork).
    procs.csignal.signal(signal.SIGUSR1, procs.csignal.SIG_DFL)
    procs.csignal.signal(signal.SIGINT, signal.default_int_handler)
    supervisor.setup_stdio()
    procs.warm()
    supervisor.warm_up()
    procs.set_child_subreaper()
    sock = socket.socket(fileno=fd)
    launcher = Launcher(sock)
    gc.collect()
    gc.freeze()  # children then never touch the preloaded objects' GC headers: fewer page copies
    try:
        sock.sendall(json.dumps({"ready": os.getpid(), "warnings": warnings}).encode() + b"\n")
    except OSError:
        return 1
    return launcher.serve()


if __name__ == "__main__":
    sys.exit(main())
