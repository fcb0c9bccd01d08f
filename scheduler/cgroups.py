# Plain string paths here: this runs in freshly forked supervisors and tasks, where every
# object built costs page copies, and each cgroup file is written with one os.write.
# ruff: noqa: PTH102, PTH103, PTH106, PTH112, PTH118, PTH119, PTH120, PTH123, PTH208
"""Per-run cgroups: finding the hierarchy, making, reading and removing a run's group.

Split from :mod:`scheduler.confine` because it is a different job with a
different reader: this module knows the kernel's cgroup files (v2 and v1
layouts, controller delegation, the "no internal processes" rule, event
counters), while :mod:`scheduler.confine` decides what a run's limits are,
applies rlimits and identity, and names the limit a run hit. Confine calls in
here for the group of one run; the daemon and runner use :func:`detect` and
:func:`sweep` directly.

* daemon side, once: :func:`detect` finds the cgroup mechanism the runs can use
  (cgroup v2 where its memory/pids controllers are available, else the v1
  memory and pids hierarchies, else none: rlimits only), and :func:`sweep`
  removes the empty groups a crashed daemon left behind;
* supervisor, before forking the task: :func:`make_group` (``<base>/<run_id>``,
  with its limit written); the supervisor itself never joins it, so an OOM
  kill in the group can never hit it;
* the task: :func:`join_group`, remaking a group a starting daemon swept;
* supervisor, after the run: :func:`group_events` (OOM kills, pids
  refusals), then :func:`remove_group`.

Only the standard library, and little of it: the launcher preloads
:mod:`scheduler.confine` (and so this module) for every run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Where cgroup v2 / v1 hierarchies are looked for (overridable for tests).
PROC_SELF = "/proc/self"
#: Name of the directory under the daemon's own cgroup that holds the per-run groups.
GROUP_DIR = "schedd"
#: How long :func:`remove_group` retries removing a group its last process has just left.
RMDIR_TRIES = 50
RMDIR_PAUSE = 0.005


# -- detection (daemon side) ----------------------------------------------------------


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
    recreates it (see :func:`join_group`).
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


# -- one run's group (supervisor and task) -------------------------------------------


def needs_cgroup(limits: Mapping[str, Any] | None) -> bool:
    """Whether a run with these ``limits`` wants a group (memory or process limit)."""
    return bool(limits) and ("memory" in limits or "processes" in limits)  # type: ignore[operator]


def make_group(
    kind: str, controller: str, base: str, run_id: str, limits: Mapping[str, Any]
) -> str:
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


def join_group(controller: str, group: str, kind: str, limits: Mapping[str, Any]) -> None:
    """Move this process (the task) into ``group``; make it again if it was swept.

    A daemon starting just now may have removed the fresh, still empty group
    (see :func:`sweep`): it is made again, with its limit, and joined.
    """
    me = str(os.getpid())
    try:
        _write(os.path.join(group, "cgroup.procs"), me)
    except FileNotFoundError:
        make_group(kind, controller, os.path.dirname(group), os.path.basename(group), limits)
        _write(os.path.join(group, "cgroup.procs"), me)


def _counter(path: str, key: str) -> int:
    try:
        for line in _read(path).splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def group_events(kind: str, groups: Mapping[str, str]) -> tuple[int, int]:
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


def remove_group(group: str) -> None:
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
