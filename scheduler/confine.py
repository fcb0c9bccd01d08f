# Plain string paths here: this runs in freshly forked supervisors and tasks, where every
# object built costs page copies, and each cgroup file is written with one os.write.
# ruff: noqa: PTH102, PTH103, PTH106, PTH112, PTH118, PTH119, PTH120, PTH123, PTH208
"""Per-run resource limits (``limits:``) and least privilege (``run_as:``).

The mechanics live here so that the supervisor only makes a few calls:

* daemon side, once: :func:`detect` finds the cgroup mechanism the runs can use
  (cgroup v2 where its memory/pids controllers are available, else the v1
  memory and pids hierarchies, else none: rlimits only), and :func:`sweep`
  removes the empty groups a crashed daemon left behind;
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

import contextlib
import errno
import math
import os
import resource
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from scheduler import procs

#: Where cgroup v2 / v1 hierarchies are looked for (overridable for tests).
PROC_SELF = "/proc/self"
#: Name of the directory under the daemon's own cgroup that holds the per-run groups.
GROUP_DIR = "schedd"
#: How long :func:`finish` retries removing a group its last process has just left.
RMDIR_TRIES = 50
RMDIR_PAUSE = 0.005


# -- records ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """A job's ``limits:``; None means no limit. ``memory`` in bytes, ``cpu`` in seconds."""

    memory: int | None = None
    cpu: float | None = None
    open_files: int | None = None
    processes: int | None = None

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


# -- cgroups: detection (daemon side) -----------------------------------------------


@dataclass(frozen=True, slots=True)
class Cgroups:
    """Where per-run groups go: one base per controller (v2: the same directory)."""

    kind: str  # "v2" | "v1"
    memory: str | None
    pids: str | None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "memory": self.memory, "pids": self.pids}

    def bases(self) -> list[str]:
        return list(dict.fromkeys(b for b in (self.memory, self.pids) if b))

    def describe(self) -> str:
        if self.kind == "v2":
            return f"cgroup v2 at {self.memory or self.pids}"
        parts = [f"{c} at {b}" for c, b in (("memory", self.memory), ("pids", self.pids)) if b]
        return "cgroup v1 (" + ", ".join(parts) + ")"


def _mounts(proc: str) -> list[tuple[str, str, str, set[str]]]:
    """(fstype, mount root, mount point, super options) of every cgroup mount."""
    found = []
    with open(f"{proc}/mountinfo") as f:
        for line in f:
            head, _, tail = line.partition(" - ")
            fields, rest = head.split(), tail.split()
            if len(fields) >= 5 and len(rest) >= 3 and rest[0] in ("cgroup", "cgroup2"):
                opts = set(rest[2].split(","))
                found.append((rest[0], _unescape(fields[3]), _unescape(fields[4]), opts))
    return found


def _unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")


def _own_groups(proc: str) -> dict[str, str]:
    """Controller (``""`` for the v2 hierarchy) -> this process's cgroup path."""
    own: dict[str, str] = {}
    with open(f"{proc}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                own[c] = path
    return own


def _join(mount: str, root: str, path: str) -> str:
    if root != "/" and (path == root or path.startswith(root + "/")):
        path = path[len(root) :]
    return os.path.normpath(mount + "/" + path.lstrip("/"))


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def detect(proc: str = PROC_SELF) -> tuple[Cgroups | None, str]:
    """The cgroup mechanism runs can use, and a sentence for the daemon log.

    cgroup v2 is used when the daemon's own v2 group offers the ``memory`` or
    ``pids`` controller and they can be enabled for a ``schedd`` subgroup; a
    v2 group that holds processes cannot delegate controllers ("no internal
    processes"), so the daemon then moves itself into a ``schedd.daemon``
    leaf next to it first (what systemd's ``Delegate=yes`` expects). Else
    the v1 ``memory`` and ``pids`` hierarchies under the daemon's own groups.
    Creates the ``schedd`` directories; needs write access (root, or a
    delegated subtree).
    """
    try:
        mounts, own = _mounts(proc), _own_groups(proc)
    except OSError as exc:
        return None, f"no cgroups ({exc.strerror}); limits use rlimits only"
    why: list[str] = []
    v2 = next((m for m in mounts if m[0] == "cgroup2"), None)
    if v2 is not None and "" in own:
        found = _setup_v2(_join(v2[2], v2[1], own[""]), why)
        if found is not None:
            return found, f"limits use {found.describe()} and rlimits"
    bases: dict[str, str | None] = {"memory": None, "pids": None}
    for controller in bases:
        mount = next((m for m in mounts if m[0] == "cgroup" and controller in m[3]), None)
        if mount is None or controller not in own:
            continue
        base = os.path.join(_join(mount[2], mount[1], own[controller]), GROUP_DIR)
        try:
            os.makedirs(base, exist_ok=True)
            if not os.access(base, os.W_OK):
                raise PermissionError(errno.EACCES, "not writable")
            bases[controller] = base
        except OSError as exc:
            why.append(f"v1 {controller}: {base}: {exc.strerror or exc}")
    if bases["memory"] or bases["pids"]:
        found = Cgroups("v1", bases["memory"], bases["pids"])
        return found, f"limits use {found.describe()} and rlimits"
    detail = "; ".join(why) or "no cgroup v2 controllers and no v1 memory/pids hierarchy"
    return None, f"no usable cgroup ({detail}); limits use rlimits only"


def _setup_v2(own: str, why: list[str]) -> Cgroups | None:
    try:
        available = set(_read(os.path.join(own, "cgroup.controllers")).split())
    except OSError as exc:
        why.append(f"v2: {own}: {exc.strerror}")
        return None
    wanted = sorted({"memory", "pids"} & available)
    if not wanted:
        why.append(f"v2: {own} offers neither the memory nor the pids controller")
        return None
    enable = " ".join(f"+{c}" for c in wanted)
    base = os.path.join(own, GROUP_DIR)
    try:
        _enable(own, enable)
        os.makedirs(base, exist_ok=True)
        _write(os.path.join(base, "cgroup.subtree_control"), enable)
    except OSError as exc:
        why.append(f"v2: {own}: cannot delegate {', '.join(wanted)}: {exc.strerror or exc}")
        return None
    memory = base if "memory" in wanted else None
    return Cgroups("v2", memory, base if "pids" in wanted else None)


def _enable(own: str, enable: str) -> None:
    """Enable controllers for ``own``'s children; move out of ``own`` first if it must."""
    control = os.path.join(own, "cgroup.subtree_control")
    if set(enable.replace("+", "").split()) <= set(_read(control).split()):
        return
    try:
        _write(control, enable)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        leaf = os.path.join(own, "schedd.daemon")
        os.makedirs(leaf, exist_ok=True)
        _write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
        _write(control, enable)


def sweep(cgroups: Cgroups) -> int:
    """Remove every empty per-run group (a crashed daemon's); return how many.

    A group that still holds a process is left alone (another daemon's live
    run, say); a live run whose fresh group is removed before its task joined
    recreates it (see :func:`enter`).
    """
    removed = 0
    for base in cgroups.bases():
        with contextlib.suppress(OSError):
            for name in os.listdir(base):
                group = os.path.join(base, name)
                if not os.path.isdir(group):
                    continue
                try:
                    if _read(os.path.join(group, "cgroup.procs")).strip():
                        continue
                    os.rmdir(group)
                    removed += 1
                except OSError:
                    continue
    return removed


# -- cgroups: one run (supervisor and task) -------------------------------------------


def needs_cgroup(limits: Mapping[str, Any] | None) -> bool:
    return bool(limits) and ("memory" in limits or "processes" in limits)  # type: ignore[operator]


def _make(kind: str, controller: str, base: str, run_id: str, limits: Mapping[str, Any]) -> str:
    """Create one run's group under ``base`` and write its limit; return its path."""
    group = os.path.join(base, run_id)
    with contextlib.suppress(FileExistsError):
        os.mkdir(group)
    if controller == "memory":
        size = str(limits["memory"])
        if kind == "v2":
            _write(os.path.join(group, "memory.max"), size)
            with contextlib.suppress(OSError):  # no swap accounting: nothing to close
                _write(os.path.join(group, "memory.swap.max"), "0")
        else:
            _write(os.path.join(group, "memory.limit_in_bytes"), size)
            with contextlib.suppress(OSError):  # memsw exists only with swap accounting
                _write(os.path.join(group, "memory.memsw.limit_in_bytes"), size)
    else:
        _write(os.path.join(group, "pids.max"), str(limits["processes"]))
    return group


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
                groups[controller] = _make(cg["kind"], controller, base, req["run_id"], limits)
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
    me = str(os.getpid())
    for controller, group in groups.items():
        try:
            _write(os.path.join(group, "cgroup.procs"), me)
        except FileNotFoundError:  # swept by a daemon starting just now: make it again
            cg = req["cgroups"]
            base = os.path.dirname(group)
            _make(cg["kind"], controller, base, os.path.basename(group), limits or {})
            _write(os.path.join(group, "cgroup.procs"), me)
    if limits:
        set_rlimits(limits, pids_cgroup="pids" in groups)
    run_as = req.get("run_as")
    if run_as:
        drop_privileges(run_as["user"], run_as["uid"], run_as["gid"])
        # A change of credentials clears the parent-death signal: arm it again.
        procs.set_pdeathsig(signal.SIGKILL)
        if os.getppid() != supervisor:
            os._exit(126)


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


def _counter(path: str, key: str) -> int:
    try:
        for line in _read(path).splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _events(kind: str, groups: Mapping[str, str]) -> tuple[int, int]:
    """(OOM kills, refused forks) recorded in the run's groups."""
    oom = forks = 0
    if "memory" in groups:
        mem = groups["memory"]
        if kind == "v2":
            oom = _counter(os.path.join(mem, "memory.events"), "oom_kill")
        else:
            oom = _counter(os.path.join(mem, "memory.oom_control"), "oom_kill")
    if "pids" in groups:
        forks = _counter(os.path.join(groups["pids"], "pids.events"), "max")
    return oom, forks


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
    oom, forks = _events(kind, groups) if groups else (0, 0)
    for group in dict.fromkeys(groups.values()):
        _remove(group)
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


def _ended_by_schedd(result: Mapping[str, Any]) -> bool:
    reason = result.get("reason") or ""
    return not reason.startswith("task died by ")


def _used_cpu(limits: Mapping[str, Any]) -> bool:
    """The run's reaped processes used at least the CPU limit (a SIGKILL at the hard limit)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return bool(usage.ru_utime + usage.ru_stime >= max(1, math.ceil(limits["cpu"])))


def _remove(group: str) -> None:
    """rmdir a group its last process has just left (the kernel may lag a moment)."""
    for _ in range(RMDIR_TRIES):
        try:
            os.rmdir(group)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                return
        time.sleep(RMDIR_PAUSE)
