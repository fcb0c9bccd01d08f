"""The child side of one run: import the task's target, call it, map the outcome to an exit status.

This runs inside the isolated process (``python -m scheduler.child SPEC_JSON``, or a
fork-server child that calls :func:`run_task` right after ``fork``). It imports only
the standard library and :mod:`scheduler.types`, so launching a run costs an
interpreter plus the task's own module, and the fork server can preload it for free.

Exit status mapping (the one place it is decided):

* ``None`` or ``0`` -> 0.
* an ``int`` in 1..255 -> that status. Any other non-zero ``int`` (negative, > 255)
  -> 255: a failure must never wrap around to success the way ``exit(256)`` would.
* ``True`` -> 0 and ``False`` -> 1: ``return check()`` reads as success/failure,
  and ``bool`` being an ``int`` would otherwise make ``True`` a failure.
* any other value -> 0; the value is ignored (the outcome carries a note).
* an exception -> 1, traceback on stderr, ``ChildOutcome.error`` = its type name.
* ``SystemExit(n)`` behaves like ``sys.exit`` in a script: ``None`` -> 0, ``int`` as
  above, anything else is printed to stderr and gives 1.
* ``KeyboardInterrupt`` (SIGINT) -> 130, the shell's 128 + SIGINT.
* the target cannot be loaded (malformed, ``ImportError`` while importing its module,
  missing attribute, not callable) -> 127, the shell's "command not found", so a
  deployment problem is told apart from the task failing. An ``ImportError`` raised
  later, while the task runs, is the task failing: 1.
* a bad spec given to :func:`main` -> 2 (usage error).

stdout belongs to the task: nothing here ever writes to it.
"""

from __future__ import annotations

import contextvars
import importlib
import io
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from scheduler.types import RunContext

#: ``pkg.module:function`` (the attribute part may be dotted: ``mod:Class.method``).
TARGET_PATTERN = r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$"
TARGET_RE = re.compile(TARGET_PATTERN)

#: Environment variable :func:`main` reads the spec from when no argument is given.
#: Prefer it over argv: argv is world-readable in ``ps``, and params may hold secrets.
SPEC_ENV = "SCHEDD_RUN_SPEC"

EXIT_TARGET_NOT_FOUND = 127
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_own_process: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "schedd_own_process", default=False
)


@dataclass(frozen=True, slots=True)
class ChildOutcome:
    """How one call of a task function ended, before the process exits.

    ``error`` is the exception type name when the task raised (or its target could
    not be loaded); ``note`` explains a non-obvious mapping, e.g. an ignored return
    value or an out-of-range status.
    """

    exit_code: int
    error: str | None = None
    note: str | None = None
    #: The exception itself, for the supervisor to tell a limit being hit (not compared).
    exception: BaseException | None = field(default=None, repr=False, compare=False)


#: The usual outcome, made once: a frozen dataclass costs ~20 page copies to build in a fresh fork.
_SUCCESS = ChildOutcome(0)


class TargetError(ImportError):
    """The task's ``pkg.mod:func`` target cannot be loaded; maps to exit status 127.

    A task (e.g. the built-in ``python`` task) may raise it for a target it loads
    itself, and still get 127 rather than a generic failure.
    """


def in_own_process() -> bool:
    """True while a task runs in a process that exists only for this run.

    Then the task may replace the process (``os.exec*``), which keeps the process
    tree flat and the exit status exact; in-process test runs must not.
    """
    return _own_process.get()


def load_target(target: str) -> Callable[..., Any]:
    """Import ``pkg.mod:func`` and return the callable, or raise :class:`TargetError`."""
    if not isinstance(target, str) or not TARGET_RE.fullmatch(target):
        raise TargetError(f"malformed task target {target!r}: expected 'pkg.module:function'")
    module_name, _, attr_path = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise TargetError(
            f"cannot import module {module_name!r} of task target {target!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError as exc:
            raise TargetError(f"task target {target!r}: {exc}") from exc
    if not callable(obj):
        kind = type(obj).__name__
        raise TargetError(f"task target {target!r} is not callable (a {kind} object)")
    return cast("Callable[..., Any]", obj)


def preloaded_target(target: str) -> Callable[..., Any] | None:
    """The callable ``module:function`` names if its module is already imported, else None.

    The fork server resolves a run's target with this before forking, so the
    task process does not run the import machinery and the target checks
    again (~70 page copies in a fresh fork). Only a plain function attribute of
    an imported module qualifies: nothing here may run a module's code (a
    module ``__getattr__``, a property) in the fork server, and anything else
    (dotted paths, modules still initialising, missing or uncallable
    attributes) is left to :func:`load_target` in the child, which reports it.
    """
    if not isinstance(target, str) or not TARGET_RE.fullmatch(target):
        return None
    module_name, _, attr = target.partition(":")
    module = sys.modules.get(module_name)
    if type(module) is not type(sys) or "." in attr:  # only a plain module object
        return None
    names = vars(module)
    spec = names.get("__spec__")
    if spec is None or getattr(spec, "_initializing", False):
        return None
    func = names.get(attr)
    return func if callable(func) else None


def exit_status(value: object) -> tuple[int, str | None]:
    """Map a task function's return value to ``(exit status, note)``; see the module doc."""
    if value is None:
        return 0, None
    if isinstance(value, bool):
        return (0, None) if value else (1, "task returned False")
    if isinstance(value, int):
        if 0 <= value <= 255:
            return value, None
        return 255, f"task returned {value}, outside 0..255; exit status 255"
    return 0, f"task returned a {type(value).__name__}; ignored (return an int or None)"


def run_task(
    target: str,
    ctx: RunContext,
    *,
    own_process: bool = False,
    not_before: float | None = None,
    func: Callable[..., Any] | None = None,
) -> ChildOutcome:
    """Load ``target``, call it with ``ctx``, and map the result; never raises.

    ``func`` is ``target`` already resolved (:func:`preloaded_target`); it
    spares loading the target again.

    A run launched ahead of its slot calls the task at ``not_before``; before
    waiting, a task function's optional ``prepare(ctx)`` attribute is called,
    so imports and set-up happen ahead of the slot too.

    ``own_process=True`` says the caller will exit with the returned code right
    after, so the task may ``exec`` (see :func:`in_own_process`). Streams are
    flushed before returning because fork-server children leave via ``os._exit``.
    """
    token = _own_process.set(own_process)
    try:
        return _run(target, ctx, not_before, func)
    finally:
        _own_process.reset(token)
        _flush()


def _run(
    target: str,
    ctx: RunContext,
    not_before: float | None = None,
    func: Callable[..., Any] | None = None,
) -> ChildOutcome:
    try:
        # Inside the try: an exception other than ImportError while importing the
        # target module is the task's own code failing, and maps like one.
        if func is None:
            func = load_target(target)
        prepare = getattr(func, "prepare", None)
        if callable(prepare):
            prepare(ctx)  # work a task can do ahead of its slot (e.g. imports)
        if not_before is not None:
            # Launched ahead of its slot: everything is ready, start on the dot.
            delay = not_before - time.time()
            if delay > 0:
                time.sleep(delay)
        result = func(ctx)
        if result is None:
            return _SUCCESS
    except TargetError as exc:
        return _target_failed(exc)
    except SystemExit as exc:
        return _system_exit(exc)
    except KeyboardInterrupt:
        traceback.print_exc()
        return ChildOutcome(EXIT_INTERRUPTED, error="KeyboardInterrupt")
    except BaseException as exc:
        traceback.print_exc()
        return ChildOutcome(1, error=type(exc).__name__, exception=exc)
    code, note = exit_status(result)
    return ChildOutcome(code, note=note)


def _target_failed(exc: TargetError) -> ChildOutcome:
    cause = exc.__cause__
    if cause is not None and not isinstance(cause, (ModuleNotFoundError, AttributeError)):
        # An ImportError deep inside the target's own imports: show where.
        traceback.print_exception(cause)
    print(f"schedd: {exc}", file=sys.stderr)
    name = type(cause).__name__ if cause is not None else type(exc).__name__
    return ChildOutcome(EXIT_TARGET_NOT_FOUND, error=name)


def _system_exit(exc: SystemExit) -> ChildOutcome:
    code = exc.code
    if code is None or isinstance(code, int):
        status, note = exit_status(code)
        return ChildOutcome(status, note=note)
    print(code, file=sys.stderr)
    return ChildOutcome(1, note="SystemExit with a message")


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken pipe: nothing left to save


# -- the spec that crosses from the runner to the child ---------------------------------

_CTX_FIELDS = frozenset(
    {"job_id", "run_id", "task", "params", "scheduled_for", "attempt", "timeout"}
)


def ctx_to_json(ctx: RunContext) -> dict[str, Any]:
    """A JSON-ready dict of ``ctx``; datetimes become ISO 8601 strings (offset kept)."""
    return {
        "job_id": ctx.job_id,
        "run_id": ctx.run_id,
        "task": ctx.task,
        "params": dict(ctx.params),
        "scheduled_for": ctx.scheduled_for.isoformat() if ctx.scheduled_for else None,
        "attempt": ctx.attempt,
        "timeout": ctx.timeout,
    }


def ctx_from_json(data: Mapping[str, Any] | str) -> RunContext:
    """Rebuild a :class:`RunContext` from :func:`ctx_to_json` output (``ValueError`` if bad)."""
    obj = json.loads(data) if isinstance(data, str) else data
    if not isinstance(obj, Mapping):
        raise ValueError("run context must be a JSON object")
    unknown = set(obj) - _CTX_FIELDS
    if unknown:
        raise ValueError(f"unknown run context keys: {', '.join(sorted(unknown))}")
    for key in ("job_id", "run_id", "task"):
        if not isinstance(obj.get(key), str):
            raise ValueError(f"run context {key!r} must be a string")
    params = obj.get("params", {})
    if not isinstance(params, Mapping):
        raise ValueError("run context 'params' must be an object")
    attempt = obj.get("attempt", 1)
    if isinstance(attempt, bool) or not isinstance(attempt, int):
        raise ValueError("run context 'attempt' must be an integer")
    timeout = obj.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)):
        raise ValueError("run context 'timeout' must be a number or null")
    raw_when = obj.get("scheduled_for")
    if raw_when is not None and not isinstance(raw_when, str):
        raise ValueError("run context 'scheduled_for' must be an ISO 8601 string or null")
    return RunContext(
        job_id=obj["job_id"],
        run_id=obj["run_id"],
        task=obj["task"],
        params=dict(params),
        scheduled_for=datetime.fromisoformat(raw_when) if raw_when else None,
        attempt=attempt,
        timeout=float(timeout) if timeout is not None else None,
    )


def spec_to_json(target: str, ctx: RunContext) -> str:
    """The ``SPEC_JSON`` :func:`main` expects: ``{"target": ..., "ctx": {...}}``."""
    return json.dumps({"target": target, "ctx": ctx_to_json(ctx)}, separators=(",", ":"))


def spec_from_json(text: str) -> tuple[str, RunContext]:
    """Parse ``SPEC_JSON``; ``ValueError`` with a one-line reason if it is malformed."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"spec is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict) or set(obj) != {"target", "ctx"}:
        raise ValueError('spec must be a JSON object with exactly "target" and "ctx"')
    if not isinstance(obj["target"], str):
        raise ValueError("spec 'target' must be a string")
    return obj["target"], ctx_from_json(obj["ctx"])


def main(argv: list[str] | None = None) -> int:
    """``python -m scheduler.child [SPEC_JSON]``: run one task, return its exit status.

    Without an argument the spec is read from ``$SCHEDD_RUN_SPEC``, which is then
    removed so the task's own subprocesses do not inherit it.
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "--confined" and args[1].isdigit():
        return _confined(int(args[1]))
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print(f"usage: python -m scheduler.child [SPEC_JSON]  (or ${SPEC_ENV})", file=sys.stderr)
        return EXIT_USAGE
    text = args[0] if args else os.environ.pop(SPEC_ENV, None)
    if text is None:
        print(f"schedd.child: no spec given (argument or ${SPEC_ENV})", file=sys.stderr)
        return EXIT_USAGE
    try:
        target, ctx = spec_from_json(text)
    except ValueError as exc:
        print(f"schedd.child: bad spec: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run_task(target, ctx, own_process=True).exit_code


def _confined(fd: int) -> int:
    """A ``run_as`` run, exec'd by its supervisor as root (see ``confine.exec_confined``):
    read the spec from ``fd``, join the cgroup, set limits, drop privileges, run the task,
    report on the supervisor's pipe like a forked task does."""
    from scheduler import confine
    from scheduler.runstatus import report_done

    with os.fdopen(fd, "rb") as spec_file:
        spec = json.loads(spec_file.read())
    for stream in (sys.stdout, sys.stderr):  # pipes: lines must reach the job log as written
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True, errors="backslashreplace")
    report = int(spec["report"])
    os.set_inheritable(report, False)
    error = note = limit = None
    code = 126
    try:
        confine.enter(spec, spec["groups"], int(spec["supervisor"]))
        target, ctx = spec["target"], ctx_from_json(spec["ctx"])
        outcome = run_task(target, ctx, own_process=True, not_before=spec["not_before"])
        code, error, note = outcome.exit_code, outcome.error, outcome.note
        if outcome.exception is not None and spec.get("limits"):
            limit = confine.explain(outcome.exception, spec["limits"])
    except BaseException as exc:  # as in the forked task (supervisor._task)
        traceback.print_exc()
        error = type(exc).__name__
        limit = confine.explain(exc, spec.get("limits"))
    report_done(report, error, note, limit)
    _flush()
    return code


if __name__ == "__main__":
    # Run the canonical module, not this ``__main__`` copy, so tasks that import
    # scheduler.child (for in_own_process) see the state main() sets.
    from scheduler.child import main as _main

    sys.exit(_main())
