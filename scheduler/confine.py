"""Per-run resource limits (``limits:``) and least privilege (``run_as:``).

The mechanics live here so that the supervisor only makes a few calls; the
cgroup files themselves (finding the hierarchy at daemon start, sweeping
stale groups, a group's limit, events and removal) are
:mod:`scheduler.cgroups`' job, which this module calls for one run:

* supervisor, before forking the task: :func:`create` makes the run's group(s)
  (``<base>/<run_id>``) and writes their limits. The supervisor itself never
  joins them, so an OOM kill in the group can never hit it;
* the task, first thing after the fork: :func:`enter` joins the group(s), sets
  the rlimits, then drops privileges for good (``initgroups``, gid before uid,
  real, effective and saved ids, then checks that root cannot be regained);
* task, on an exception: :func:`explain` names a limit the exception shows
  was hit (``MemoryError``, ``EMFILE``, ``EAGAIN`` from fork);
* supervisor, after the run: :func:`finish` reads the group's events (OOM
  kills, pids refusals), names the limit that ended the run, removes the group.

Only the standard library, and little of it at import: the launcher preloads
this module for every run, with or without limits, and every module it holds
makes each fork a little dearer (what only the daemon or a rare path needs is
imported where it is used). Everything a task needs is
imported here, before privileges are dropped (a task running as ``nobody`` may
not be able to read the interpreter's own library directory).
"""

from __future__ import annotations

import errno
import json
import math
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from scheduler import cgroups, procs
from scheduler.child import ctx_to_json
from scheduler.runstatus import STARTED

# -- records ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """A job's ``limits:``; None means no limit. ``memory`` in bytes, ``cpu`` in seconds."""

    memory: int | None = None
    cpu: float | None = None
    open_files: int | None = None
    processes: int | None = None
    nice: int | None = None  # added to the daemon's nice value

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__ if getattr(self, k) is not None}


@dataclass(frozen=True, slots=True)
class RunAs:
    """A resolved ``run_as:``: the user's name (for ``initgroups``), ids and home."""

    user: str
    uid: int
    gid: int
    home: str
    spec: str = ""  # as written, for messages

    def to_json(self) -> dict[str, Any]:
        return {"user": self.user, "uid": self.uid, "gid": self.gid}

    def env(self) -> dict[str, str]:
        """The identity variables a run gets (the job's own ``env`` still wins)."""
        return {"HOME": self.home, "USER": self.user, "LOGNAME": self.user}


class RunAsError(ValueError):
    """``run_as`` names a user or group that does not exist."""


def resolve_run_as(spec: str) -> RunAs:
    """``"user"`` (its primary group) or ``"user:group"`` -> :class:`RunAs` (daemon side)."""
    import grp
    import pwd

    user, _, group = spec.partition(":")
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise RunAsError(f"run_as: no user {user!r} on this machine") from None
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise RunAsError(f"run_as: no group {group!r} on this machine") from None
    return RunAs(pw.pw_name, pw.pw_uid, gid, pw.pw_dir or "/", spec)


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def format_memory(size: int) -> str:
    """``268435456`` -> ``256M``: the largest binary unit that divides it exactly."""
    for unit in ("T", "G", "M", "K"):
        if size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return str(size)


def format_cpu(seconds: float) -> str:
    from scheduler.durations import format_duration  # only once a cpu limit was hit

    return format_duration(seconds)


# -- one run: its groups, rlimits and identity (supervisor and task) -------------------


def create(req: Mapping[str, Any], event: Callable[[str], None]) -> dict[str, str]:
    """Make the run's groups (supervisor, before the fork): controller -> group path.

    A failure is reported as an event and the run goes on with rlimits only.
    """
    cg, limits = req.get("cgroups") or {}, req.get("limits") or {}
    groups: dict[str, str] = {}
    for controller, key in (("memory", "memory"), ("pids", "processes")):
        base = cg.get(controller)
        if base and key in limits:
            try:
                groups[controller] = cgroups.make_group(
                    cg["kind"], controller, base, req["run_id"], limits
                )
            except OSError as exc:
                event(f"cgroup {controller} limit not set ({exc}); rlimits only")
    as_root = os.geteuid() == 0 and not req.get("run_as")  # RLIMIT_NPROC does not bind root
    if as_root and "processes" in limits and "pids" not in groups:
        event(
            f"process limit {limits['processes']} not enforced: no pids cgroup, and"
            " RLIMIT_NPROC does not apply to root (give the job a run_as user)"
        )
    return groups


def enter(req: Mapping[str, Any], groups: Mapping[str, str], supervisor: int) -> None:
    """In the task process, before anything else: cgroup, rlimits, then identity.

    Raises on any failure: a run that asked for limits or another user must
    never run without them.
    """
    limits = req.get("limits")
    for controller, group in groups.items():  # remade if a daemon starting just now swept it
        cgroups.join_group(controller, group, req["cgroups"]["kind"], limits or {})
    if limits:
        set_rlimits(limits, pids_cgroup="pids" in groups)
        if limits.get("nice"):
            set_nice(int(limits["nice"]))  # before run_as: below 0 needs root
    run_as = req.get("run_as")
    if run_as:
        drop_privileges(run_as["user"], run_as["uid"], run_as["gid"])
        # A change of credentials clears the parent-death signal: arm it again.
        procs.set_pdeathsig(signal.SIGKILL)
        if os.getppid() != supervisor:
            os._exit(126)


def exec_confined(
    req: Mapping[str, Any], groups: Mapping[str, str], status: int, report: int, supervisor: int
) -> None:
    """A ``run_as`` task: exec a fresh interpreter (still root) that drops privileges itself.

    Why not drop privileges here: this process is a copy of the launcher, whose
    memory holds other runs' requests (their environments and params: their
    secrets), also in freed blocks that are never zeroed. A task running as
    another user could read them from its own heap. A fresh interpreter holds
    only this run's spec, which reaches it on a memfd, not in its environment.
    The task's exception type and a limit it hit still come back on ``report``.
    """
    cwd, env, target, ctx, not_before, _func = req["task"]
    spec = {
        "target": target,
        "ctx": ctx_to_json(ctx),
        "not_before": not_before,
        "limits": req.get("limits"),
        "run_as": req["run_as"],
        "cgroups": req.get("cgroups"),
        "groups": dict(groups),
        "supervisor": supervisor,
        "report": report,
    }
    fd = os.memfd_create("schedd-run-spec", 0)
    os.set_inheritable(fd, True)
    os.write(fd, json.dumps(spec).encode())
    os.lseek(fd, 0, os.SEEK_SET)
    os.set_inheritable(report, True)
    procs.csignal.pthread_sigmask(signal.SIG_SETMASK, ())
    if cwd:
        os.chdir(cwd)
    os.write(status, STARTED % (os.getpid(), time.time_ns()))
    os.close(status)
    argv = [sys.executable, "-m", "scheduler.child", "--confined", str(fd)]
    os.execve(sys.executable, argv, dict(env))


def _set(which: int, value: int) -> None:
    _soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY and os.geteuid() != 0:
        value = min(value, hard)  # only root may raise a hard limit
    resource.setrlimit(which, (value, value))


def set_rlimits(limits: Mapping[str, Any], *, pids_cgroup: bool) -> None:
    """The task's rlimits. CPU: SIGXCPU at the limit, SIGKILL one second later."""
    if "memory" in limits:
        _set(resource.RLIMIT_AS, int(limits["memory"]))
    if "cpu" in limits:
        soft = max(1, math.ceil(limits["cpu"]))
        hard, ceiling = soft + 1, resource.getrlimit(resource.RLIMIT_CPU)[1]
        if ceiling != resource.RLIM_INFINITY and os.geteuid() != 0:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    if "open_files" in limits:
        _set(resource.RLIMIT_NOFILE, int(limits["open_files"]))
    if "processes" in limits and not pids_cgroup:
        _set(resource.RLIMIT_NPROC, int(limits["processes"]))


def set_nice(increment: int) -> None:
    """Add ``increment`` to the task's nice value (inherited from the daemon).

    Every process the task starts inherits it, so a CPU-bound job yields the
    CPU to the others, whose wake-ups then preempt it. The kernel clamps the
    result to -20..19; a negative increment without root raises PermissionError.
    """
    os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + increment)


def drop_privileges(user: str, uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` with ``user``'s supplementary groups, with no way back."""
    os.initgroups(user, gid)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise PermissionError(f"run_as {user}: ids did not change as asked")
    if uid != 0:
        for regain in (os.setuid, os.setgid, os.seteuid):
            try:
                regain(0)
            except PermissionError:
                continue
            raise PermissionError(f"run_as {user}: {regain.__name__}(0) succeeded after dropping")


# -- naming the limit a run hit ---------------------------------------------------------


def explain(exc: BaseException | None, limits: Mapping[str, Any] | None) -> str | None:
    """The limit an exception in the task shows was reached, if any."""
    seen = 0
    while exc is not None and limits and seen < 10:
        if isinstance(exc, MemoryError) and "memory" in limits:
            return memory_reason(limits)
        if isinstance(exc, OSError):
            if exc.errno == errno.EMFILE and "open_files" in limits:
                return f"open files limit {limits['open_files']} reached"
            if exc.errno == errno.EAGAIN and "processes" in limits and _from_fork(exc):
                return process_reason(limits)
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _from_fork(exc: BaseException) -> bool:
    """EAGAIN from starting a process, not from a non-blocking read or write.

    Told by the code the error came through: ``subprocess``/``multiprocessing``
    frames, or an innermost function that calls ``fork``/``posix_spawn``.
    """
    tb = exc.__traceback__
    inner = None
    while tb is not None:
        if tb.tb_frame.f_code.co_name in _STARTER_FRAMES:
            return True
        inner, tb = tb, tb.tb_next
    return inner is not None and not _STARTER_NAMES.isdisjoint(inner.tb_frame.f_code.co_names)


_STARTER_FRAMES = frozenset({"_execute_child", "_launch", "_fork_exec"})
_STARTER_NAMES = frozenset({"fork", "forkpty", "posix_spawn", "posix_spawnp", "Popen", "spawnv"})


def memory_reason(limits: Mapping[str, Any]) -> str:
    return f"memory limit {format_memory(int(limits['memory']))} reached"


def process_reason(limits: Mapping[str, Any]) -> str:
    return f"process limit {limits['processes']} reached"


def finish(req: Mapping[str, Any], groups: Mapping[str, str], result: dict[str, Any]) -> None:
    """After the run (supervisor): name the limit that ended it, remove its groups.

    Only a run that did not succeed and that schedd did not end itself
    (timeout, cancel) gets a limit as its ``reason``. The evidence, first
    found wins: an OOM kill in the group; what the task's exception showed
    (:func:`explain`); forks the pids group refused; SIGXCPU, or SIGKILL once
    the run's processes used the CPU limit (the hard limit, one second on).
    """
    limits = req.get("limits") or {}
    kind = (req.get("cgroups") or {}).get("kind", "")
    oom, forks = cgroups.group_events(kind, groups) if groups else (0, 0)
    remove(groups)
    told = result.pop("limit", None)  # what the task's exception showed
    status = result.get("status")
    if status in ("success", "timeout") or (status == "killed" and _ended_by_schedd(result)):
        return
    sig = result.get("signal")
    if oom:
        result["reason"] = memory_reason(limits)
    elif told:
        result["reason"] = told
    elif forks:
        result["reason"] = process_reason(limits)
    elif "cpu" in limits and (sig == "SIGXCPU" or (sig == "SIGKILL" and _used_cpu(limits))):
        result["reason"] = f"cpu limit {format_cpu(limits['cpu'])} exceeded ({sig})"


def remove(groups: Mapping[str, str]) -> None:
    """Remove a run's groups (each once: v1 controllers may share one path)."""
    for group in dict.fromkeys(groups.values()):
        cgroups.remove_group(group)


def _ended_by_schedd(result: Mapping[str, Any]) -> bool:
    reason = result.get("reason") or ""
    return not reason.startswith("task died by ")


def _used_cpu(limits: Mapping[str, Any]) -> bool:
    """The run's reaped processes used at least the CPU limit (a SIGKILL at the hard limit)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return bool(usage.ru_utime + usage.ru_stime >= max(1, math.ceil(limits["cpu"])))
