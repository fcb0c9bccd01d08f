"""Build the plugin manager and load plugins from the ``schedd`` entry-point group.

Every plugin, built-in or third-party, takes the same guarded path: load the
entry point, register it, check its hooks against the contract, read its task
types. A failure at any step marks that one plugin broken (reported with its
name, distribution and error) and removes it from the manager; the others
still load, so one bad distribution cannot stop every job. Strict mode turns any
problem into a :class:`~scheduler.errors.PluginError` instead.

Nothing happens at import time: :func:`load_plugins` builds a fresh manager on
each call, so tests and reloads never share state.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib.metadata import EntryPoint, entry_points
from types import MappingProxyType, ModuleType
from typing import Any

import pluggy

from scheduler import hookspecs
from scheduler.child import TARGET_RE
from scheduler.errors import PluginError
from scheduler.params import TaskParams
from scheduler.types import TaskType

ENTRY_POINT_GROUP = "schedd"
DISABLE_ENV = "SCHEDD_DISABLE_PLUGINS"
STRICT_ENV = "SCHEDD_STRICT_PLUGINS"

#: What a job's ``task:`` key may say; lower case so names never differ only by case.
TASK_NAME_RE = re.compile(r"[a-z][a-z0-9_.-]*")

_TRUE = frozenset({"1", "true", "yes"})
_HOOK_NAMES = tuple(sorted(n for n in dir(hookspecs) if n.startswith("schedd_")))


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """One entry point as loaded (or not). ``error`` is set when it failed."""

    name: str
    distribution: str
    version: str
    module: str
    task_types: tuple[str, ...] = ()
    error: str | None = None
    blocked: bool = False


@dataclass(frozen=True, slots=True)
class Registry:
    """What the loaded plugins provide: task types by name, and what went wrong.

    ``problems`` are conflicts *between* plugins (a task name two plugins claim);
    a plugin that failed on its own carries its ``error`` and is listed in ``broken``.
    """

    task_types: Mapping[str, TaskType] = field(default_factory=dict)
    plugins: tuple[PluginInfo, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def broken(self) -> tuple[PluginInfo, ...]:
        return tuple(p for p in self.plugins if p.error)


@dataclass(slots=True)
class _Entry:
    """A plugin while it loads; frozen into a :class:`PluginInfo` at the end."""

    name: str
    distribution: str = ""
    version: str = ""
    module: str = ""
    obj: object = None
    error: str | None = None
    blocked: bool = False
    task_types: list[TaskType] = field(default_factory=list)

    @property
    def label(self) -> str:
        return _label(self)

    def info(self) -> PluginInfo:
        return PluginInfo(
            name=self.name,
            distribution=self.distribution,
            version=self.version,
            module=self.module,
            task_types=tuple(t.name for t in self.task_types),
            error=self.error,
            blocked=self.blocked,
        )


def _label(p: _Entry | PluginInfo) -> str:
    """``'name' (distribution version)``, or just ``'name'`` for in-process plugins."""
    if not p.distribution:
        return repr(p.name)
    return f"{p.name!r} ({f'{p.distribution} {p.version}'.strip()})"


def parse_plugin_names(text: str) -> frozenset[str]:
    """Split a comma- and/or space-separated list of entry-point names."""
    return frozenset(n for n in re.split(r"[\s,]+", text) if n)


def load_plugins(
    *,
    strict: bool | None = None,
    blocked: Iterable[str] | None = None,
    extra: Iterable[object] = (),
) -> tuple[pluggy.PluginManager, Registry]:
    """Load every ``schedd`` entry point (plus ``extra`` objects) into a new manager.

    ``strict`` defaults to ``$SCHEDD_STRICT_PLUGINS`` (``1``/``true``/``yes``) and
    raises :class:`PluginError` listing every problem. ``blocked`` defaults to
    ``$SCHEDD_DISABLE_PLUGINS``; a blocked plugin is never imported, which is how an
    operator gets past one that hangs or crashes at import. ``extra`` plugin objects
    (tests, the daemon's own) are named by ``__name__`` and checked like the rest.

    Broken plugins are unregistered, so none of their hooks run.

    Duplicate task names: when two plugins provide the same task name, *neither*
    keeps it. Picking a winner would depend on install order, and a job would run
    code its author never chose; with neither, every job naming the task fails
    validation with a message naming both plugins, until one is removed or blocked.
    """
    if strict is None:
        strict = os.environ.get(STRICT_ENV, "").strip().lower() in _TRUE
    block = (
        parse_plugin_names(os.environ.get(DISABLE_ENV, ""))
        if blocked is None
        else frozenset(blocked)
    )
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    entries: list[_Entry] = []

    by_name: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        by_name.setdefault(ep.name, []).append(ep)
    for name in sorted(by_name):
        eps = by_name[name]
        entry = _entry_for(eps[0])
        entries.append(entry)
        if name in block:
            entry.blocked = True
        elif len(eps) > 1:
            dists = " and ".join(_entry_for(ep).label for ep in eps)
            entry.error = f"entry point name {name!r} is declared by {dists}; none is loaded"
        else:
            _load_entry_point(eps[0], entry)
            if entry.error is None:
                _register(pm, entry)

    for obj in extra:
        entry = _entry_for_object(obj)
        entries.append(entry)
        if entry.name in block:
            entry.blocked = True
        elif any(e.name == entry.name for e in entries[:-1]):
            entry.error = f"a plugin named {entry.name!r} is already loaded"
        else:
            entry.obj = obj
            _register(pm, entry)

    live = {e.name: e for e in entries if e.obj is not None and e.error is None}
    _collect_task_types(pm, live)
    _check_pending(pm, live)

    registry = _build_registry(entries)
    failures = [f"plugin {e.label}: {e.error}" for e in entries if e.error]
    if strict and (failures or registry.problems):
        raise PluginError(
            f"plugin loading failed ({STRICT_ENV} / strict mode):\n  "
            + "\n  ".join([*failures, *registry.problems])
        )
    return pm, registry


def _entry_for(ep: EntryPoint) -> _Entry:
    dist = ep.dist
    return _Entry(
        name=ep.name,
        distribution=dist.name if dist is not None else "",
        version=dist.version if dist is not None else "",
        module=ep.module,
    )


def _entry_for_object(obj: object) -> _Entry:
    name = getattr(obj, "__name__", None)
    if not isinstance(name, str):
        name = type(obj).__name__
    if isinstance(obj, ModuleType):
        module = name
    else:
        module = obj.__module__ if isinstance(obj, type) else type(obj).__module__
    return _Entry(name=name, module=module)


def _describe_exception(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"SystemExit: the plugin called sys.exit({exc.code!r}) while loading"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _load_entry_point(ep: EntryPoint, entry: _Entry) -> None:
    try:
        entry.obj = ep.load()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit too: a plugin must not end the daemon
        entry.error = _describe_exception(exc)


def _register(pm: pluggy.PluginManager, entry: _Entry) -> None:
    obj = entry.obj
    undecorated = sorted(
        attr
        for attr in dir(obj)
        if attr.startswith("schedd_")
        and callable(getattr(obj, attr, None))
        and pm.parse_hookimpl_opts(obj, attr) is None
    )
    if undecorated:
        entry.obj = None
        entry.error = (
            f"{', '.join(undecorated)} not decorated with @scheduler.hookspecs.hookimpl, "
            "so it would never be called"
        )
        return
    try:
        pm.register(obj, name=entry.name)
    except Exception as exc:  # pluggy's validation errors and name clashes
        entry.obj = None
        entry.error = _describe_exception(exc)


def _check_pending(pm: pluggy.PluginManager, live: dict[str, _Entry]) -> None:
    """``check_pending`` stops at the first unknown hook; loop so each plugin is named."""
    while True:
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            plugin = exc.plugin
            name = pm.get_name(plugin) or ""
            unknown = sorted(
                hc.name for hc in pm.get_hookcallers(plugin) or () if not hc.has_spec()
            )
            hints = []
            for hook in unknown:
                close = difflib.get_close_matches(hook, _HOOK_NAMES, n=1)
                hints.append(f"{hook} (did you mean {close[0]}?)" if close else hook)
            pm.unregister(plugin)
            entry = live.get(name)
            if entry is None:  # not ours; cannot happen, but never loop forever
                raise
            entry.error = (
                f"unknown hook {', '.join(hints)}: not part of the schedd plugin "
                "contract (scheduler.hookspecs)"
            )
        else:
            return


def _collect_task_types(pm: pluggy.PluginManager, live: dict[str, _Entry]) -> None:
    """Call each plugin's hook on its own, so one bad answer breaks only that plugin."""
    for impl in pm.hook.schedd_task_types.get_hookimpls():
        entry = live[impl.plugin_name]
        if impl.hookwrapper or impl.wrapper:
            entry.error = "schedd_task_types must not be a hook wrapper"
        else:
            try:
                result = impl.function()
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                entry.error = f"schedd_task_types raised {_describe_exception(exc)}"
            else:
                entry.task_types, problems = _check_task_types(result, entry.name)
                if problems:
                    entry.error = "schedd_task_types returned " + "; ".join(problems)
        if entry.error:
            pm.unregister(name=entry.name)


def _check_task_types(result: object, plugin: str) -> tuple[list[TaskType], list[str]]:
    if isinstance(result, str | bytes) or not isinstance(result, Sequence):
        return [], [f"a {type(result).__name__}, not a list of TaskType"]
    good: list[TaskType] = []
    problems: list[str] = []
    for i, item in enumerate(result):
        if not isinstance(item, TaskType):
            problems.append(f"item {i}: a {type(item).__name__}, not a TaskType")
            continue
        bad = _task_type_problems(item)
        if any(t.name == item.name for t in good):
            bad.append("listed twice")
        if bad:
            problems.append(f"task type {item.name!r}: " + ", ".join(bad))
        else:
            good.append(replace(item, plugin=plugin))
    return good, problems


def _task_type_problems(t: TaskType) -> list[str]:
    bad = []
    if not isinstance(t.name, str) or not TASK_NAME_RE.fullmatch(t.name):
        bad.append(f"name must match ^{TASK_NAME_RE.pattern}$")
    if not isinstance(t.target, str) or not TARGET_RE.fullmatch(t.target):
        bad.append(f"target {t.target!r} is not 'pkg.module:function'")
    if not isinstance(t.summary, str):
        bad.append("summary must be a string")
    if not (isinstance(t.params, type) and issubclass(t.params, TaskParams)):
        bad.append(f"params {t.params!r} is not a subclass of scheduler.params.TaskParams")
    return bad


def _build_registry(entries: list[_Entry]) -> Registry:
    problems: list[str] = []  # conflicts only; each broken plugin carries its own error
    providers: dict[str, list[tuple[_Entry, TaskType]]] = {}
    for e in entries:
        if e.error is None:
            for t in e.task_types:
                providers.setdefault(t.name, []).append((e, t))
    task_types: dict[str, TaskType] = {}
    for name in sorted(providers):
        found = providers[name]
        if len(found) == 1:
            task_types[name] = found[0][1]
        else:
            problems.append(_duplicate_message(name, [e for e, _ in found]))
    return Registry(
        task_types=MappingProxyType(task_types),
        plugins=tuple(e.info() for e in entries),
        problems=tuple(problems),
    )


def _duplicate_message(task: str, plugins: Sequence[_Entry | PluginInfo]) -> str:
    labels = " and ".join(_label(p) for p in plugins)
    return (
        f"task type {task!r} is provided by plugins {labels}; neither is "
        f"used until one is removed or blocked with {DISABLE_ENV}"
    )


def explain_unknown_task(registry: Registry, task: str) -> str:
    """Why ``task`` is not in ``registry.task_types``, for a job's validation error."""
    providers = [p for p in registry.plugins if task in p.task_types]
    broken = [p for p in providers if p.error]
    if broken:
        p = broken[0]
        return f"task {task!r} comes from plugin {p.name!r}, which failed to load: {p.error}"
    if len(providers) > 1:
        return _duplicate_message(task, providers)
    message = f"unknown task {task!r}"
    close = difflib.get_close_matches(task, list(registry.task_types), n=1)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    unread = [p.name for p in registry.plugins if p.error and not p.task_types]
    if unread:
        message += f"; it may come from broken plugin(s) {', '.join(unread)}"
    blocked = [p.name for p in registry.plugins if p.blocked]
    if blocked:
        message += f"; blocked plugin(s): {', '.join(blocked)}"
    return message


def describe_plugins(registry: Registry) -> list[dict[str, Any]]:
    """JSON-ready report for ``schedd plugins --json``; ``available`` is false for a
    task type that a broken plugin or a duplicate name keeps out of the registry."""
    out: list[dict[str, Any]] = []
    for p in registry.plugins:
        types = []
        for name in p.task_types:
            t = registry.task_types.get(name)
            available = t is not None and t.plugin == p.name
            types.append(
                {
                    "name": name,
                    "summary": t.summary if t is not None and available else "",
                    "target": t.target if t is not None and available else "",
                    "available": available,
                }
            )
        out.append(
            {
                "name": p.name,
                "distribution": p.distribution,
                "version": p.version,
                "module": p.module,
                "task_types": types,
                "error": p.error,
                "blocked": p.blocked,
            }
        )
    return out
