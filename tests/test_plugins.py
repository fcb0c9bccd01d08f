"""Plugin loading: entry points, guarded loading, contract checks, duplicates, blocking.

In-process plugin objects (``extra=``) exercise every check quickly; the real
pip-installed distributions are in ``test_plugin_distribution.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from importlib.metadata import EntryPoint, version
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import scheduler.plugins as plugins_mod
from scheduler.errors import PluginError
from scheduler.hookspecs import hookimpl
from scheduler.params import TaskParams
from scheduler.plugins import (
    DISABLE_ENV,
    STRICT_ENV,
    PluginInfo,
    Registry,
    describe_plugins,
    explain_unknown_task,
    load_plugins,
)
from scheduler.types import RunInfo, RunResult, TaskType

BUILTINS = {"shell", "python", "http"}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    monkeypatch.delenv(STRICT_ENV, raising=False)


class Params(TaskParams):
    n: int = 1


def task(name: str, **kw: Any) -> TaskType:
    fields: dict[str, Any] = {"target": "mymod.tasks:run", "summary": f"{name} task"}
    fields.update(kw)
    return TaskType(name=name, params=fields.pop("params", Params), **fields)


def provider(name: str, result: Callable[[], Any]) -> object:
    """An in-process plugin called ``name`` whose schedd_task_types returns ``result()``."""

    class Plugin:
        __name__ = name

        @hookimpl
        def schedd_task_types(self) -> Any:
            return result()

    return Plugin()


def info(registry: Registry, name: str) -> PluginInfo:
    return next(p for p in registry.plugins if p.name == name)


# -- built-ins through the entry-point group --------------------------------------------


def test_builtins_load_through_entry_points() -> None:
    pm, reg = load_plugins()
    assert reg.problems == ()
    assert set(reg.task_types) >= BUILTINS
    for name in BUILTINS:
        p = info(reg, name)
        assert (p.distribution, p.version) == ("schedd", version("schedd"))
        assert p.module == f"schedd_plugins.{name}" and p.task_types == (name,)
        assert p.error is None and not p.blocked
        t = reg.task_types[name]
        assert t.plugin == name and t.target == f"schedd_plugins.run_{name}:run"
        assert issubclass(t.params, TaskParams)
        assert pm.get_plugin(name) is not None


def test_each_call_builds_a_fresh_manager() -> None:
    pm1, _ = load_plugins()
    pm2, _ = load_plugins(blocked=["shell"])
    assert pm1 is not pm2
    assert pm1.get_plugin("shell") is not None and pm2.get_plugin("shell") is None


def test_importing_the_module_loads_nothing() -> None:
    code = (
        "import sys, scheduler.plugins\n"
        "print(sorted(m for m in sys.modules if m.startswith('schedd_plugins')))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert proc.stdout.strip() == "[]"


def test_a_plugin_implementing_every_hook_is_accepted() -> None:
    class Full:
        __name__ = "full"

        @hookimpl
        def schedd_task_types(self) -> list[TaskType]:
            return [task("full-task")]

        @hookimpl
        def schedd_run_started(self, run: RunInfo) -> None:
            pass

        @hookimpl
        def schedd_run_finished(self, run: RunInfo, result: RunResult) -> None:
            pass

    pm, reg = load_plugins(extra=[Full()], strict=True)
    t = reg.task_types["full-task"]
    assert t.plugin == "full" and t.summary == "full-task task"
    assert info(reg, "full") == PluginInfo("full", "", "", __name__, ("full-task",))
    assert len(pm.hook.schedd_run_finished.get_hookimpls()) == 1


# -- the contract is enforced ------------------------------------------------------------


def test_misspelt_hook_is_reported_and_the_plugin_unregistered() -> None:
    class Typo:
        __name__ = "typo"

        @hookimpl
        def schedd_task_type(self) -> list[TaskType]:
            return [task("typo-task")]

    pm, reg = load_plugins(extra=[Typo()])
    error = info(reg, "typo").error
    assert error is not None
    assert "unknown hook schedd_task_type (did you mean schedd_task_types?)" in error
    assert pm.get_plugin("typo") is None
    assert set(reg.task_types) == BUILTINS
    assert reg.problems == ()  # problems are conflicts; a broken plugin carries its error
    assert [p.name for p in reg.broken] == ["typo"]
    with pytest.raises(PluginError, match="typo"):
        load_plugins(extra=[Typo()], strict=True)


def test_undecorated_hook_function_is_an_error() -> None:
    class Forgot:
        __name__ = "forgot"

        def schedd_task_types(self) -> list[TaskType]:
            return [task("forgot-task")]

    _, reg = load_plugins(extra=[Forgot()])
    assert "schedd_task_types not decorated with @scheduler.hookspecs.hookimpl" in str(
        info(reg, "forgot").error
    )
    assert "forgot-task" not in reg.task_types


def test_hookimpl_with_wrong_arguments_is_an_error() -> None:
    class WrongArgs:
        __name__ = "wrongargs"

        @hookimpl
        def schedd_run_started(self, runinfo: RunInfo) -> None:
            pass

    _, reg = load_plugins(extra=[WrongArgs()])
    error = str(info(reg, "wrongargs").error)
    assert error.startswith("PluginValidationError:") and "runinfo" in error


def _raise() -> Any:
    raise RuntimeError("metadata exploded")


def _exit() -> Any:
    raise SystemExit(3)


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (_raise, "schedd_task_types raised RuntimeError: metadata exploded"),
        (_exit, "schedd_task_types raised SystemExit: the plugin called sys.exit(3)"),
        (lambda: None, "returned a NoneType, not a list of TaskType"),
        (lambda: "shell", "returned a str, not a list of TaskType"),
        (lambda: {"name": "x"}, "returned a dict, not a list of TaskType"),
        (lambda: [{"name": "x"}], "item 0: a dict, not a TaskType"),
        (lambda: [task("Bad_Name")], "task type 'Bad_Name': name must match"),
        (lambda: [task("-x")], "task type '-x': name must match"),
        (
            lambda: [task("ok", target="mymod.run")],
            "target 'mymod.run' is not 'pkg.module:function'",
        ),
        (lambda: [task("ok", target="my mod:run")], "target 'my mod:run' is not"),
        (
            lambda: [task("ok", params=BaseModel)],
            "is not a subclass of scheduler.params.TaskParams",
        ),
        (lambda: [task("ok", params=dict)], "is not a subclass of scheduler.params.TaskParams"),
        (lambda: [task("ok", params=Params())], "is not a subclass of scheduler.params.TaskParams"),
        (lambda: [task("ok", summary=None)], "summary must be a string"),
        (lambda: [task("ok"), task("ok")], "task type 'ok': listed twice"),
    ],
)
def test_garbage_from_the_hook_breaks_only_that_plugin(
    result: Callable[[], Any], message: str
) -> None:
    pm, reg = load_plugins(extra=[provider("junk", result)])
    error = info(reg, "junk").error
    assert error is not None and message in error, error
    assert set(reg.task_types) == BUILTINS
    assert pm.get_plugin("junk") is None
    assert info(reg, "shell").error is None
    with pytest.raises(PluginError, match="'junk'"):
        load_plugins(extra=[provider("junk", result)], strict=True)


def test_partly_valid_answer_provides_nothing_and_explains_why() -> None:
    _, reg = load_plugins(extra=[provider("half", lambda: [task("good"), task("BAD")])])
    assert "good" not in reg.task_types
    assert info(reg, "half").task_types == ("good",)
    why = explain_unknown_task(reg, "good")
    assert why.startswith("task 'good' comes from plugin 'half', which failed to load:")
    assert "'BAD'" in why


# -- duplicates ---------------------------------------------------------------------------


def test_duplicate_task_name_keeps_neither_and_names_both() -> None:
    a = provider("alpha", lambda: [task("same"), task("only-a")])
    b = provider("beta", lambda: [task("same")])
    _, reg = load_plugins(extra=[a, b])
    assert "same" not in reg.task_types
    assert reg.task_types["only-a"].plugin == "alpha"
    (problem,) = reg.problems
    assert "task type 'same' is provided by plugins 'alpha' and 'beta'" in problem
    assert DISABLE_ENV in problem
    assert info(reg, "alpha").error is None  # not broken: its other task still works
    assert "'alpha' and 'beta'" in explain_unknown_task(reg, "same")
    with pytest.raises(PluginError, match="'same' is provided by plugins 'alpha' and 'beta'"):
        load_plugins(extra=[a, b], strict=True)


def test_duplicate_of_a_builtin_names_its_distribution() -> None:
    _, reg = load_plugins(extra=[provider("myshell", lambda: [task("shell")])])
    assert "shell" not in reg.task_types
    assert any(f"'shell' (schedd {version('schedd')}) and 'myshell'" in p for p in reg.problems)


def test_a_broken_duplicate_does_not_block_the_good_one() -> None:
    bad = provider("bad", lambda: [task("shell"), task("BAD")])
    _, reg = load_plugins(extra=[bad])
    assert reg.task_types["shell"].plugin == "shell"


# -- blocking and strictness ---------------------------------------------------------------


def test_blocked_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, "http")  # the argument wins over the environment
    pm, reg = load_plugins(blocked=["shell"], extra=[provider("extra1", lambda: [task("e")])])
    assert info(reg, "shell").blocked and info(reg, "shell").error is None
    assert "shell" not in reg.task_types and "http" in reg.task_types
    assert pm.get_plugin("shell") is None
    _, reg2 = load_plugins(blocked=["extra1"], extra=[provider("extra1", lambda: [task("e")])])
    assert info(reg2, "extra1").blocked and "e" not in reg2.task_types


def test_blocked_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, " shell,http  python,")
    _, reg = load_plugins()
    assert [p.name for p in reg.plugins if p.blocked] == ["http", "python", "shell"]
    assert dict(reg.task_types) == {}
    assert reg.problems == ()
    assert "blocked plugin(s): http, python, shell" in explain_unknown_task(reg, "shell")


@pytest.mark.parametrize(
    ("value", "raises"), [("1", True), ("YES", True), ("true", True), ("0", False), ("", False)]
)
def test_strict_from_environment(monkeypatch: pytest.MonkeyPatch, value: str, raises: bool) -> None:
    monkeypatch.setenv(STRICT_ENV, value)
    broken = provider("broken1", _raise)
    if raises:
        with pytest.raises(PluginError, match="plugin 'broken1': schedd_task_types raised"):
            load_plugins(extra=[broken])
    else:
        assert info(load_plugins(extra=[broken])[1], "broken1").error
    assert load_plugins(extra=[broken], strict=False)[1].broken  # argument wins


# -- entry points that fail to load -----------------------------------------------------------


@pytest.fixture
def fake_entry_points(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[list[EntryPoint]]:
    """Add entry points (without a distribution) to the real ones."""
    added: list[EntryPoint] = []
    real = plugins_mod.entry_points

    def fake(*, group: str) -> list[EntryPoint]:
        return [*real(group=group), *added]

    monkeypatch.setattr(plugins_mod, "entry_points", fake)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield added
    for name in ("schedd_exiting_plugin", "schedd_syntax_plugin"):
        sys.modules.pop(name, None)


def test_entry_point_failures_are_caught(
    fake_entry_points: list[EntryPoint], tmp_path: Path
) -> None:
    (tmp_path / "schedd_exiting_plugin.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "schedd_syntax_plugin.py").write_text("def broken(:\n")
    fake_entry_points += [
        EntryPoint("exiting", "schedd_exiting_plugin", "schedd"),
        EntryPoint("missing", "schedd_not_installed_xyz", "schedd"),
        EntryPoint("syntax", "schedd_syntax_plugin", "schedd"),
        EntryPoint("noattr", "schedd_plugins.shell:nothing_here", "schedd"),
    ]
    pm, reg = load_plugins()
    errors = {p.name: p.error for p in reg.broken}
    assert [name for name, _ in pm.list_name_plugin()] == ["http", "python", "shell"]
    assert errors["exiting"] == "SystemExit: the plugin called sys.exit(3) while loading"
    assert errors["missing"] == "ModuleNotFoundError: No module named 'schedd_not_installed_xyz'"
    assert str(errors["syntax"]).startswith("SyntaxError:")
    assert str(errors["noattr"]).startswith("AttributeError:")
    assert set(reg.task_types) == BUILTINS
    with pytest.raises(PluginError) as raised:
        load_plugins(strict=True)
    for name in ("exiting", "missing", "syntax", "noattr"):
        assert f"plugin '{name}':" in str(raised.value)


def test_same_entry_point_name_twice_loads_neither(fake_entry_points: list[EntryPoint]) -> None:
    fake_entry_points.append(EntryPoint("shell", "schedd_plugins.python", "schedd"))
    _, reg = load_plugins()
    error = str(info(reg, "shell").error)
    assert "entry point name 'shell' is declared by 'shell' (schedd" in error
    assert "shell" not in reg.task_types and "python" in reg.task_types


# -- reporting -----------------------------------------------------------------------------------


def test_describe_plugins_is_json_ready() -> None:
    dup = provider("dup", lambda: [task("python")])
    _, reg = load_plugins(blocked=["http"], extra=[dup, provider("junk", _raise)])
    described = json.loads(json.dumps(describe_plugins(reg)))
    by_name = {d["name"]: d for d in described}
    assert set(by_name) == {"shell", "python", "http", "dup", "junk"}
    assert by_name["shell"]["task_types"] == [
        {
            "name": "shell",
            "summary": reg.task_types["shell"].summary,
            "target": "schedd_plugins.run_shell:run",
            "available": True,
        }
    ]
    assert by_name["shell"]["distribution"] == "schedd" and by_name["shell"]["error"] is None
    assert by_name["http"]["blocked"] is True and by_name["http"]["task_types"] == []
    assert by_name["junk"]["error"].startswith("schedd_task_types raised RuntimeError")
    assert by_name["dup"]["task_types"][0]["available"] is False
    assert by_name["python"]["task_types"][0]["available"] is False


def test_unknown_task_suggests_a_close_name() -> None:
    _, reg = load_plugins(extra=[provider("junk", _raise)])
    why = explain_unknown_task(reg, "shel")
    assert why.startswith("unknown task 'shel' (did you mean 'shell'?)")
    assert "it may come from broken plugin(s) junk" in why
