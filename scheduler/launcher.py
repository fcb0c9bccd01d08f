"""The fork server: ``python -m scheduler.launcher --fd N [--preload MOD]...``.

The daemon has threads, so it must never ``fork()``. It execs this small,
single-threaded process once; the launcher preloads :mod:`scheduler.child`,
:mod:`scheduler.types` (and any ``--preload`` modules), then forks one
supervisor (:mod:`scheduler.supervisor`) per request. Forking a warm
interpreter costs about a millisecond; a fresh interpreter costs 20 ms bare and
~200 ms with the daemon's imports.

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

End of file on the socket means the daemon is gone (or closing): every
supervisor gets SIGTERM and ends its run's tree with the run's grace; the
launcher exits once all are reaped, escalating to SIGKILL if one hangs. The
launcher is a child subreaper too, so anything orphaned by a supervisor that
was itself SIGKILLed lands here and is killed at once.
"""

from __future__ import annotations

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
#: After the longest grace of the remaining runs, how long before SIGUSR1 / SIGKILL.
CLOSE_HURRY_AFTER = 2.0
CLOSE_KILL_AFTER = 3.0


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
            env=dict(env),
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
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pid = os.getpid()
        self.buf = bytearray()
        self.fds: deque[int] = deque()
        self.sups: dict[int, tuple[str, float]] = {}  # supervisor pid -> (run_id, grace)
        self.by_run: dict[str, int] = {}
        self.childless = True
        self.closing = False
        self.hurry_at = self.kill_at = 0.0
        self.hurried = False
        self.poller = select.poll()

    def serve(self) -> int:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        supervisor.install_handlers()
        self.poller.register(wake_r, select.POLLIN)
        self.poller.register(self.sock.fileno(), select.POLLIN)
        while True:
            for fd, _ in self.poller.poll(100 if self.closing else None):
                if fd == wake_r:
                    data = os.read(wake_r, 512)
                    if signal.SIGTERM in data or signal.SIGHUP in data:
                        self._close()
                else:
                    self._receive()
            self._reap()
            if self.closing:
                if self.childless:
                    return 0
                self._escalate()

    def _receive(self) -> None:
        try:
            data, fds, flags, _ = socket.recv_fds(self.sock, 1 << 16, MAX_FDS)
        except OSError:
            data, fds, flags = b"", [], 0
        self.fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            print("schedd launcher: file descriptors lost (MSG_CTRUNC)", file=sys.stderr)
        if not data:
            self.poller.unregister(self.sock.fileno())
            self._close()
            return
        self.buf += data
        while len(self.buf) >= 4:
            size = int.from_bytes(self.buf[:4], "big")
            if len(self.buf) < 4 + size:
                break
            msg = json.loads(self.buf[4 : 4 + size])
            del self.buf[: 4 + size]
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
        try:
            supervisor.prepare(msg)
            why = ""
        except (KeyError, ValueError) as exc:
            why = f"bad run request: {exc}"
        if self.closing:
            why = "launcher is shutting down"
        if why:
            pid = -1
        else:
            signal.pthread_sigmask(signal.SIG_BLOCK, supervisor.HANDLED)
            try:
                pid = os.fork()
            except OSError as exc:
                pid = -1
                why = f"fork failed: {exc}"
            if pid == 0:
                signal.set_wakeup_fd(-1)
                self.sock.detach()  # the child closes the fd; its copy of this object must not
                supervisor.run(msg, out_w, err_w, status, self.pid)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, supervisor.HANDLED)
        if pid > 0:
            self.sups[pid] = (msg["run_id"], float(msg.get("kill_grace", 10.0)))
            self.by_run[msg["run_id"]] = pid
            self.childless = False
        else:
            supervisor.send(status, ev="result", status="killed", reason=why, ended=time.time())
        for fd in fds:
            os.close(fd)

    def _reap(self) -> None:
        sweep = False
        while True:
            try:
                pid, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.childless = True
                break
            if pid == 0:
                break
            sup = self.sups.pop(pid, None)
            if sup is None or st != 0:
                sweep = True  # an orphan, or a supervisor that died before its tree did
            if sup is not None and self.by_run.get(sup[0]) == pid:
                del self.by_run[sup[0]]
        if sweep:
            for kid in procs.children(self.pid):
                if kid not in self.sups:
                    procs.kill_tree([kid, *procs.descendants(kid)], signal.SIGKILL)

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
    for std in (0, 1, 2):  # so that received fds never land on 0-2
        try:
            os.fstat(std)
        except OSError:
            os.dup2(os.open(os.devnull, os.O_RDWR), std)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    warnings = []
    for name in preload:
        try:
            importlib.import_module(name)
        except BaseException as exc:  # a broken module must not stop every other run
            warnings.append(f"preload {name!r} failed: {type(exc).__name__}: {exc}")
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        warnings.append("a preloaded module started a thread; forking it is unsafe")
    supervisor.setup_stdio()
    gc.freeze()  # children then never touch the preloaded objects' GC headers: fewer page copies
    procs.set_child_subreaper()
    sock = socket.socket(fileno=fd)
    try:
        sock.sendall(json.dumps({"ready": os.getpid(), "warnings": warnings}).encode() + b"\n")
    except OSError:
        return 1
    return Launcher(sock).serve()


if __name__ == "__main__":
    sys.exit(main())
