"""Tasks that hit resource limits, or report who they run as: ``tests.limit_tasks:<name>``.

They may run as ``nobody``, after privileges are dropped: import only what the
launcher has already loaded (the interpreter's own library may be unreadable).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import time
from pathlib import Path

from scheduler.types import RunContext


def status(ctx: RunContext) -> None:
    """Print the ids, groups, identity variables and VmSize this task runs with."""
    with open("/proc/self/status") as f:  # noqa: PTH123
        vm = next(line.split()[1] for line in f if line.startswith("VmSize:"))
    regained = []
    for name in ("setuid", "setgid", "seteuid", "setegid"):
        try:
            getattr(os, name)(0)
            regained.append(name)
        except PermissionError:
            pass
    sig = ctypes.c_int(-1)
    ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
    info = {
        "resuid": os.getresuid(),
        "resgid": os.getresgid(),
        "groups": sorted(os.getgroups()),
        "env": {k: os.environ.get(k) for k in ("HOME", "USER", "LOGNAME")},
        "regained": regained,
        "vm_kib": int(vm),
        "pdeathsig": sig.value,
        "cgroup": _cgroups("self"),
        "parent_cgroup": _cgroups(str(os.getppid())),  # the supervisor's
    }
    print(json.dumps(info), flush=True)


def _cgroups(pid: str) -> list[str]:
    with open(f"/proc/{pid}/cgroup") as f:  # noqa: PTH123
        return [line.strip() for line in f]


def hog_memory(ctx: RunContext) -> None:
    """Allocate 8 MiB at a time until the memory limit stops it (MemoryError)."""
    hoard = []
    while True:
        hoard.append(bytearray(8 << 20))


def spin(ctx: RunContext) -> None:
    """Burn CPU until RLIMIT_CPU ends the process."""
    while True:
        pass


def spin_past_sigxcpu(ctx: RunContext) -> None:
    """Ignore SIGXCPU and burn CPU: the hard limit's SIGKILL ends it."""
    signal.signal(signal.SIGXCPU, signal.SIG_IGN)
    while True:
        pass


def open_files(ctx: RunContext | None = None) -> None:
    """Open /dev/null until EMFILE (also a ``python`` task's target: no ctx then)."""
    held = []
    while True:
        held.append(os.open("/dev/null", os.O_RDONLY))


def fork_bomb(ctx: RunContext) -> None:
    """Fork sleeping children until fork fails (EAGAIN); they are ended with the run."""
    while True:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)


def oom_tree(ctx: RunContext) -> int:
    """Children that each fit the limit and together exceed it: the cgroup's OOM killer acts."""
    size = int(ctx.params.get("mib", 64)) << 20
    kids = []
    for _ in range(int(ctx.params.get("children", 4))):
        pid = os.fork()
        if pid == 0:
            block = bytearray(size)
            for i in range(0, size, 4096):  # touch every page: resident, charged to the group
                block[i] = 1
            time.sleep(3)
            os._exit(0)
        kids.append(pid)
    killed = 0
    for pid in kids:
        _, st = os.waitpid(pid, 0)
        killed += os.WIFSIGNALED(st)
    print(f"children killed: {killed}", flush=True)
    return 1 if killed else 0


def priority(ctx: RunContext | None = None) -> None:
    """Print this task's nice value as getpriority(2) and /proc/PID/stat see it, and its child's
    (a ``python`` job calls it without a context)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, str(os.getpriority(os.PRIO_PROCESS, 0)).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    child = int(os.read(r, 16))
    with open("/proc/self/stat") as f:  # noqa: PTH123
        stat_nice = int(f.read().rsplit(")", 1)[1].split()[16])  # field 19: nice
    info = {"getpriority": os.getpriority(os.PRIO_PROCESS, 0), "stat": stat_nice, "child": child}
    print(json.dumps(info), flush=True)


def scan_memory(ctx: RunContext) -> None:
    """Print every ``prefix`` + 16 hex characters found in this process's writable memory.

    What a hostile ``run_as`` task would do to steal other runs' secrets from memory
    it inherited (the prefix alone is in this run's params, never a whole secret).
    """
    prefix = str(ctx.params["prefix"]).encode()
    found: set[str] = set()
    with Path("/proc/self/maps").open() as maps:
        regions = [line.split()[:2] for line in maps]
    for addr, perms in regions:
        if not perms.startswith("rw"):
            continue
        start, end = (int(x, 16) for x in addr.split("-"))
        data = ctypes.string_at(start, end - start)  # our own writable memory
        at = data.find(prefix)
        while at >= 0:
            found.add(data[at + len(prefix) : at + len(prefix) + 16].decode("latin-1"))
            at = data.find(prefix, at + 1)
    print(json.dumps(sorted(found)))


def say_then_sleep(ctx: RunContext) -> None:
    """One line without an explicit flush, then a pause: the line must arrive before the end."""
    print("first line")
    time.sleep(float(ctx.params.get("seconds", 3)))
