"""Linux process helpers for the launcher and the per-run supervisor.

Everything here must tolerate races: processes exit, get reaped and vanish
between the moment we list them and the moment we signal them, so ``ESRCH``
and unreadable ``/proc`` entries are normal, never errors.

Descendants are found through ``/proc``. ``/proc/<pid>/task/<tid>/children``
is used when the kernel has it (``CONFIG_PROC_CHILDREN``); otherwise one scan
of ``/proc/*/stat`` builds the parent -> children map. The scan is only paid
when a run must actually be ended (timeout, cancel, leftovers), never on the
normal path, where ``waitpid`` alone proves a supervisor has no children.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
from collections import deque
from collections.abc import Iterable
from typing import Any

#: The C signal module. ``signal.signal`` and ``signal.pthread_sigmask`` wrap it
#: to turn numbers into enum members, and in a freshly forked process that
#: enum machinery alone writes to dozens of pages; the hot paths call this.
csignal: Any = importlib.import_module("_signal")

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

_prctl_fn: Any = None
_waitpid_fn: Any = None
_wstatus: Any = None  # a ctypes.c_int
_wstatus_ptr: Any = None


def warm() -> None:
    """Bind ``prctl`` and probe ``/proc`` once, in the launcher, before any fork.

    Every page a forked child writes is copied, so the supervisor and the task
    must find everything ready: the ``ctypes`` function already looked up
    on the library, and the ``/proc`` layout already known.
    """
    global _prctl_fn, _waitpid_fn, _wstatus, _wstatus_ptr
    if _prctl_fn is None:
        # PyDLL: the calls keep the GIL (they never block), sparing the page copies of
        # releasing and retaking it in a fresh fork.
        libc = ctypes.PyDLL(None, use_errno=True)
        _prctl_fn = libc.prctl
        _waitpid_fn = libc.waitpid
        _wstatus = ctypes.c_int()
        _wstatus_ptr = ctypes.pointer(_wstatus)
    _use_children_files()


def _prctl(option: int, arg: int) -> None:
    """``prctl(option, arg, 0, 0, 0)`` for small non-negative ``arg``.

    Plain ints, no ``argtypes``: measured in a fresh fork, ``argtypes``
    converters (or a ``c_ulong`` per call) write to ~10 more pages per call.
    libffi widens each int to a full register, which for these values is the
    ``unsigned long`` the kernel reads. Callers in a fresh fork call
    ``_prctl_fn`` themselves (each Python call level costs page copies there).
    """
    if _bound()(option, arg, 0, 0, 0) != 0:
        _failed(option)


def _bound() -> Any:
    """The ``prctl`` function, bound now if :func:`warm` has not run."""
    if _prctl_fn is None:
        warm()
    return _prctl_fn


def _failed(option: int) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def set_child_subreaper() -> None:
    """Make orphaned descendants reparent to this process instead of init.

    That is what lets a supervisor find, end and reap a run's ``setsid`` or
    double-forked escapees.
    """
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


def set_pdeathsig(sig: int) -> None:
    """Ask the kernel to send ``sig`` when the thread that forked us dies.

    Callers must re-check ``os.getppid()`` afterwards: a parent that died
    before this call is not reported. Called in every task process: one
    Python call level, no more (see :func:`_prctl`).
    """
    if (_prctl_fn or _bound())(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        _failed(PR_SET_PDEATHSIG)


def become_subreaper(deathsig: int) -> None:
    """:func:`set_child_subreaper` and :func:`set_pdeathsig` in one call, for a supervisor."""
    fn = _prctl_fn or _bound()
    if fn(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        _failed(PR_SET_CHILD_SUBREAPER)
    if fn(PR_SET_PDEATHSIG, deathsig, 0, 0, 0) != 0:
        _failed(PR_SET_PDEATHSIG)


def wait_any(flags: int = os.WNOHANG) -> tuple[int, int]:
    """``waitpid(-1, flags)`` (``flags`` include ``WNOHANG``) that never raises: ``(pid, status)``.

    ``pid`` is 0 while children remain and none has exited, -1 once there is
    no child left (ECHILD: the only error ``WNOHANG`` can give here). Used by
    supervisors, once per run at least: ``os.waitpid`` says "no child left"
    with an exception, and building one in a fresh fork costs ~20 page copies.
    """
    if _waitpid_fn is None:
        warm()
    pid = _waitpid_fn(-1, _wstatus_ptr, flags)
    return pid, (_wstatus.value if pid > 0 else 0)


def signal_name(sig: int) -> str:
    """``9`` -> ``"SIGKILL"``; real-time signals as ``"SIGRTMIN+n"``."""
    try:
        return signal.Signals(sig).name
    except ValueError:
        if signal.SIGRTMIN <= sig <= signal.SIGRTMAX:
            return f"SIGRTMIN+{sig - signal.SIGRTMIN}"
        return f"SIG{sig}"


def _read(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)


def _stat(pid: int | str) -> tuple[int, bytes] | None:
    """``(ppid, state)`` of a process, or None when it is gone."""
    data = _read(f"/proc/{pid}/stat")
    if not data:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split(None, 2)
    if len(fields) < 2:
        return None
    return int(fields[1]), fields[0]


def is_zombie(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[1] in (b"Z", b"X")


def alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie (which only waits to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not is_zombie(pid)


_CHILDREN_FILES: bool | None = None


def _children_map() -> dict[int, list[tuple[int, bool]]]:
    """parent -> [(child, is_zombie)] from one scan of ``/proc/*/stat``."""
    tree: dict[int, list[tuple[int, bool]]] = {}
    for name in os.listdir("/proc"):  # noqa: PTH208  (hot path: plain names, no Path objects)
        if not name.isdigit():
            continue
        st = _stat(name)
        if st is not None:
            tree.setdefault(st[0], []).append((int(name), st[1] in (b"Z", b"X")))
    return tree


def _children_of(pid: int) -> list[tuple[int, bool]]:
    """Children of ``pid`` from ``/proc/<pid>/task/*/children`` (needs CONFIG_PROC_CHILDREN)."""
    kids: list[tuple[int, bool]] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")  # noqa: PTH208
    except OSError:
        return kids
    for tid in tids:
        data = _read(f"/proc/{pid}/task/{tid}/children")
        if data:
            kids.extend((int(x), is_zombie(int(x))) for x in data.split())
    return kids


def _use_children_files() -> bool:
    global _CHILDREN_FILES
    if _CHILDREN_FILES is None:
        pid = os.getpid()
        _CHILDREN_FILES = os.path.exists(f"/proc/{pid}/task/{pid}/children")  # noqa: PTH110
    return _CHILDREN_FILES


def children(pid: int) -> list[int]:
    """Direct children of ``pid``, zombies included (they still need reaping)."""
    kids = _children_of(pid) if _use_children_files() else _children_map().get(pid, [])
    return [kid for kid, _ in kids]


def descendants(pid: int) -> list[int]:
    """Every live (non-zombie) descendant of ``pid``, parents before children.

    A process that called ``setsid`` or double-forked is still found as long
    as it was reparented to a subreaper at or below ``pid``.
    """
    tree = None if _use_children_files() else _children_map()
    found: list[int] = []
    seen = {pid}
    queue = deque([pid])
    while queue:
        parent = queue.popleft()
        kids = _children_of(parent) if tree is None else tree.get(parent, [])
        for kid, zombie in kids:
            if kid not in seen:
                seen.add(kid)
                queue.append(kid)
                if not zombie:
                    found.append(kid)
    return found


def kill_tree(pids: Iterable[int], sig: int) -> int:
    """Send ``sig`` to each pid; returns how many were signalled (vanished ones don't count)."""
    count = 0
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            continue
        count += 1
    return count


def processes(n: int) -> str:
    """``1`` -> ``"1 process"``, ``3`` -> ``"3 processes"`` (for event messages)."""
    return f"{n} process" if n == 1 else f"{n} processes"
