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
per-request path here touches as little as it can, almost nothing between a
``fork`` and that supervisor's exit (:meth:`Launcher.serve`).

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

Signals: the launcher runs with SIGTERM, SIGHUP, SIGCHLD, SIGINT and SIGUSR1
blocked and every disposition at its default, and takes pending ones with
``sigtimedwait(..., 0)`` each time it wakes up (at least every :data:`TICK`
seconds). So a supervisor starts with exactly what it waits for blocked and
the task with clean dispositions, and a run costs no signal set-up around
``fork``, no SIGCHLD wakeup and no page copies for either: a supervisor that
exited is reaped at the next wakeup (the next request, or the tick).

End of file on the socket, SIGTERM or SIGHUP means the daemon is gone (or
closing): every supervisor gets SIGTERM and ends its run's tree with the run's
grace; the launcher exits once all are reaped, escalating to SIGKILL if one
hangs. The launcher is a child subreaper too, so anything orphaned by a
supervisor that was itself SIGKILLed lands here and is killed when the
launcher reaps that supervisor (its next wakeup, within :data:`TICK`).
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
from scheduler import procs, runstatus, supervisor

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
#: Longest sleep: how soon a SIGTERM or SIGHUP is seen and exited supervisors are reaped.
TICK = 0.25
#: Blocked for good in the launcher, and taken with ``sigtimedwait`` (see the module doc).
LAUNCHER_SIGNALS = frozenset({signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD})


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


class Launcher:
    """The fork server's single-threaded event loop: control socket and signal wakeup pipe."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pid = os.getpid()
        self.buf = bytearray()
        self.fds: deque[int] = deque()
        # Each run's booking (see _book), by supervisor pid and by run id.
        self.sups: dict[int, list[Any]] = {}
        self.by_run: dict[str, list[Any]] = {}
        self.reap = False
        self.sweep_at: float | None = None  # strays were killed: look again by then
        self.closing = False
        self.hurry_at = self.kill_at = 0.0
        self.hurried = False
        self.poller = select.poll()
        self.held: list[object] | None = None  # see _receive

    def serve(self) -> int:
        """The loop. Supervisors are forked here, in this frame, after everything else.

        Whatever the launcher writes to memory between a ``fork`` and that
        supervisor's exit is copied page by page, and returning through frames
        writes to every function, code and local object they hold: so requests
        are parsed and booked first (:meth:`_receive`), and after each ``fork``
        this loop only records the pid, closes the run's fds and sleeps again.
        The child never returns from :func:`~scheduler.supervisor.run`; it
        starts with :data:`~scheduler.supervisor.WAITED` blocked and every
        disposition at its default, as the launcher runs, so it needs no signal
        set-up at all.
        """
        self.poller.register(self.sock.fileno(), select.POLLIN)
        poll, wait, fork, close = self.poller.poll, procs.csignal.sigtimedwait, os.fork, os.close
        run, me, sups, tick = supervisor.run, self.pid, self.sups, round(TICK * 1000)
        while True:
            closing_or_sweep = self.closing or self.sweep_at is not None
            ready = poll(self._poll_ms() if closing_or_sweep else tick)
            # Signals and reaping first: that work, like parsing, is cheaper before a fork.
            while (info := wait(LAUNCHER_SIGNALS, 0)) is not None:
                if info.si_signo == signal.SIGCHLD:
                    self.reap = True
                else:
                    self._close()
            swept = self.sweep_at is not None and time.monotonic() >= self.sweep_at
            if self.reap or swept or self.closing:
                self.reap = False
                if self._reap_all() and self.closing:
                    return 0
            if self.closing:
                self._escalate()
            if ready:
                for msg, fds, booked in self._receive():
                    try:
                        pid = fork()
                    except OSError as exc:
                        del self.by_run[booked[1]]
                        self._refuse(fds, f"fork failed: {exc}")
                        continue
                    if pid == 0:
                        run(msg, fds[0], fds[1], fds[2], me)
                    booked[0] = pid
                    sups[pid] = booked
                    close(fds[0])
                    close(fds[1])
                    close(fds[2])
                    if booked[3]:  # cancelled in the same batch, before its fork
                        procs.kill_tree([pid], booked[3])

    def _poll_ms(self) -> int:
        """Sleep until a request, or until something must be looked at on a clock."""
        if self.closing:
            return 20
        if self.sweep_at is not None:
            return min(round(TICK * 1000), max(0, round((self.sweep_at - time.monotonic()) * 1000)))
        return round(TICK * 1000)

    def _receive(self) -> list[tuple[dict[str, Any], list[int], list[Any]]]:
        """Read what the daemon sent: handle it, and return the runs to fork.

        Each run comes as ``(request, fds, booking)``; the booking
        ``[pid, run_id, kill_grace]`` is already filed under the run id, and
        :meth:`serve` fills in the pid. ``recvmsg`` and the ``json`` decoder
        are called directly, not through ``socket.recv_fds`` and
        ``json.loads``: every page this loop touches was write-protected by the
        last ``fork`` and costs a fault, so fewer Python frames per request is
        measurably cheaper.

        What a batch allocated is released only when the next one arrives: freed
        right after the ``fork``, each object would cost a page copy while the
        supervisor still shares its page (~40 per run).
        """
        self.held = None
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
            return []
        buf = self.buf
        buf += data
        runs: list[tuple[dict[str, Any], list[int], list[Any]]] = []
        self.held = [data, ancillary, runs]
        while len(buf) >= 4:
            size = int.from_bytes(buf[:4], "big")
            if len(buf) < 4 + size:
                break
            msg = _decode(buf[4 : 4 + size].decode())
            del buf[: 4 + size]
            fds = [self.fds.popleft() for _ in range(min(msg.get("nfds", 0), len(self.fds)))]
            self.held.append(msg)
            op = msg.get("op")
            if op == "run" and len(fds) == 3:
                booked = self._book(msg, fds)
                if booked is not None:
                    runs.append((msg, fds, booked))
                continue
            if op in ("cancel", "hurry"):
                sig = signal.SIGTERM if op == "cancel" else signal.SIGUSR1
                self._signal_runs(msg.get("run_id"), sig)
            for fd in fds:
                os.close(fd)
        return runs

    def _signal_runs(self, run_id: object, sig: int) -> None:
        """Cancel (SIGTERM) or hurry (SIGUSR1) one run, or every run if ``run_id`` is None.

        A run of this same batch, not forked yet, gets the signal right after
        its ``fork`` (:meth:`serve`), so a cancel is never lost to the order.
        """
        if run_id is None:
            targets = list(self.by_run.values())
        else:
            booked = self.by_run.get(run_id) if isinstance(run_id, str) else None
            targets = [] if booked is None else [booked]
        for booked in targets:
            if booked[0]:
                procs.kill_tree([booked[0]], sig)
            elif sig == signal.SIGUSR1 or not booked[3]:
                booked[3] = sig

    def _book(self, msg: dict[str, Any], fds: list[int]) -> list[Any] | None:
        """Prepare a run request and file it under its run id; None if it was refused.

        The booking is ``[supervisor pid (0 until forked), run_id, kill_grace,
        signal to send once forked (0: none)]``.
        """
        run_id = msg.get("run_id")
        try:
            if not isinstance(run_id, str):
                raise ValueError(f"run_id {run_id!r} is not a string")
            supervisor.prepare(msg)
        except (KeyError, ValueError, TypeError) as exc:
            self._refuse(fds, f"bad run request: {exc}")
            return None
        if self.closing:
            self._refuse(fds, "launcher is shutting down")
            return None
        booked = [0, run_id, msg["sup"][2], 0]
        self.by_run[run_id] = booked
        return booked

    def _refuse(self, fds: list[int], why: str) -> None:
        """Report a run that gets no supervisor as ``killed``, and let go of its fds."""
        runstatus.send(fds[2], ev="result", status="killed", reason=why, ended=time.time())
        for fd in fds:
            os.close(fd)

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
            pid, st = procs.wait_any(os.WNOHANG | os.WUNTRACED)
            if pid < 0:
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
            if sup is not None and self.by_run.get(sup[1]) is sup:
                del self.by_run[sup[1]]
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
        longest = max((booked[2] for booked in self.sups.values()), default=0.0)
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
    procs.csignal.pthread_sigmask(signal.SIG_SETMASK, supervisor.ALWAYS_BLOCKED | LAUNCHER_SIGNALS)
    warnings = []
    for name in preload:
        try:
            importlib.import_module(name)
        except BaseException as exc:  # a broken module must not stop every other run
            warnings.append(f"preload {name!r} failed: {type(exc).__name__}: {exc}")
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        warnings.append("a preloaded module started a thread; forking it is unsafe")
    # What every task inherits: default dispositions, Python's KeyboardInterrupt on SIGINT.
    procs.csignal.signal(signal.SIGUSR1, procs.csignal.SIG_DFL)
    procs.csignal.signal(signal.SIGINT, signal.default_int_handler)
    supervisor.setup_stdio()
    procs.warm()
    supervisor.warm_up()
    procs.become_subreaper(0)  # no parent-death signal: see spawn()
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
