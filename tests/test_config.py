"""The config loader: exact JobSpecs from a valid file, exact located messages
from an invalid one, every problem at once, and never a traceback.

Tests that load a valid job call the real scheduler.triggers parsers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import Field, field_validator

from scheduler.config import (
    JOB_ID_PATTERN,
    Config,
    JobSpec,
    config_json_schema,
    find_config,
    load_config,
)
from scheduler.errors import ConfigError, Problem, ScheddError
from scheduler.params import TaskParams
from scheduler.plugins import PluginInfo, Registry
from scheduler.triggers import Schedule, TriggerError, parse_cron, parse_every
from scheduler.types import TaskType


class ShellParams(TaskParams):
    cmd: str
    shell: str = "/bin/sh"


class HttpParams(TaskParams):
    url: str
    method: Literal["GET", "POST"] = "GET"
    headers: dict[str, str] = Field(default_factory=dict)


class PythonParams(TaskParams):
    target: str
    args: list[int] = Field(default_factory=list)

    @field_validator("target")
    @classmethod
    def _looks_like_a_target(cls, value: str) -> str:
        if ":" not in value:
            raise ValueError("must look like 'package.module:function'")
        return value


def task(name: str, params: type[TaskParams]) -> TaskType:
    return TaskType(name, f"tests.fake:{name}", f"{name} task", params, "builtin")


TASKS = {
    t.name: t
    for t in (task("shell", ShellParams), task("http", HttpParams), task("python", PythonParams))
}
REG = Registry(task_types=TASKS)
BROKEN = PluginInfo(
    "extras",
    "schedd-extras",
    "1.0",
    "extras.plugin",
    error="ModuleNotFoundError: No module named 'requests'",
)
KNOWN = "known tasks: http, python, shell"
SIZES = "use bytes (1048576) or an amount with a unit B, KB, MB, GB, KiB, MiB, GiB (10 MB, 512KiB)"
FORMS = "use seconds (90, 1.5) or amounts with units ms, s, m, h, d, w (250ms, 5m, 1h30m, 2d)"
T0 = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test writes ./schedd.yaml, so messages read "schedd.yaml:LINE:COL: ..."."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SCHEDD_CONFIG", raising=False)


def load(text: str, registry: Registry = REG, name: str = "schedd.yaml") -> Config:
    Path(name).write_text(textwrap.dedent(text), encoding="utf-8")
    return load_config(name, registry)


def errors(text: str, registry: Registry = REG) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(text, registry)
    return [str(p) for p in info.value.problems]


# -- a valid file ---------------------------------------------------------------

FULL = """\
timezone: Europe/Berlin
state_dir: state
defaults:
  retries: 1
  timeout: 10m
  env: {LANG: C.UTF-8, DEBUG: true}
jobs:
  backup:
    task: shell
    params:
      cmd: tar czf /tmp/b.tgz /srv
    cron: "30 2 * * *"
    timezone: America/New_York
    jitter: 30s
    timeout: 1h30m
    kill_grace: 5s
    overlap: queue
    catchup: all
    catchup_window: 2d
    retries: 3
    retry_delay: 1m
    env: {DEBUG: false, COUNT: 3, RATIO: 0.5}
    log_rotation: 5mb
    log_retention: 2
    enabled: false
    description: Nightly backup
  ping:
    task: http
    params: {url: "https://example.com/health"}
    every: 90
    timeout: null
  launch:
    task: python
    params: {target: "app.jobs:launch", args: [1, 2]}
    at: 2099-01-01 09:30:00
"""


def test_a_full_config_gives_exact_job_specs(tmp_path: Path) -> None:
    config = load(FULL)
    assert config.path == tmp_path / "schedd.yaml"
    assert config.timezone == "Europe/Berlin"
    assert config.state_dir == tmp_path / "state"
    assert config.warnings == []
    assert list(config.jobs) == ["backup", "ping", "launch"]
    backup, ping, launch = config.jobs.values()
    assert backup == JobSpec(
        id="backup",
        task="shell",
        params={"cmd": "tar czf /tmp/b.tgz /srv", "shell": "/bin/sh"},
        trigger_kind="cron",
        trigger_expr="30 2 * * *",
        schedule=backup.schedule,
        timezone="America/New_York",
        jitter=30.0,
        timeout=5400.0,
        kill_grace=5.0,
        overlap="queue",
        catchup="all",
        catchup_window=172800.0,
        retries=3,
        retry_delay=60.0,
        env={"LANG": "C.UTF-8", "DEBUG": "false", "COUNT": "3", "RATIO": "0.5"},
        log_rotation="5 MB",
        log_retention=2,
        enabled=False,
        description="Nightly backup",
        line=8,
    )
    assert ping == JobSpec(
        id="ping",
        task="http",
        params={"url": "https://example.com/health", "method": "GET", "headers": {}},
        trigger_kind="every",
        trigger_expr="90",
        schedule=ping.schedule,
        timezone="Europe/Berlin",
        jitter=0.0,
        timeout=None,
        kill_grace=10.0,
        overlap="skip",
        catchup="latest",
        catchup_window=86400.0,
        retries=1,
        retry_delay=10.0,
        env={"LANG": "C.UTF-8", "DEBUG": "true"},
        log_rotation="10 MB",
        log_retention=5,
        enabled=True,
        description="",
        line=27,
    )
    assert launch.params == {"target": "app.jobs:launch", "args": [1, 2]}
    assert (launch.trigger_kind, launch.trigger_expr, launch.timeout) == (
        "at",
        "2099-01-01 09:30:00",
        600.0,
    )
    assert launch.line == 32
    # the schedules are the real ones, in each job's zone
    assert all(isinstance(j.schedule, Schedule) for j in config.jobs.values())
    new_york = ZoneInfo("America/New_York")
    assert backup.schedule.next_after(T0) == datetime(2030, 1, 1, 2, 30, tzinfo=new_york)
    step = ping.schedule.next_after(T0)
    assert step is not None and timedelta(0) < step - T0 <= timedelta(seconds=90)
    assert launch.schedule.next_after(T0) == datetime(
        2099, 1, 1, 9, 30, tzinfo=ZoneInfo("Europe/Berlin")
    )


def test_job_spec_and_config_load_without_pydantic_or_yaml() -> None:
    code = (
        "import sys, scheduler.config\n"
        "heavy = {'pydantic', 'yaml', 'apscheduler', 'loguru', 'sqlalchemy'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- every error class, with its exact place ----------------------------------


def test_unknown_keys_everywhere_with_did_you_mean() -> None:
    assert errors(
        """\
        timezone: UTC
        timezon: UTC
        defaults:
          retrys: 1
        jobs:
          backup:
            task: shell
            params: {cmd: x, shel: /bin/bash, colour: red}
            every: 5m
            cronn: "* * * * *"
            1: one
        """
    ) == [
        "schedd.yaml:2:1: unknown key 'timezon' at the top level (did you mean 'timezone'?)",
        "schedd.yaml:4:3: unknown key 'retrys' in defaults (did you mean 'retries'?)",
        "schedd.yaml:8:22: unknown key 'shel' in params of task 'shell' (did you mean 'shell'?)",
        "schedd.yaml:8:39: unknown key 'colour' in params of task 'shell'; known keys: cmd, shell",
        "schedd.yaml:10:5: unknown key 'cronn' in job 'backup' (did you mean 'cron'?)",
        "schedd.yaml:11:5: unknown key 1 in job 'backup'",
    ]


def test_unknown_task_lists_the_known_ones() -> None:
    text = """\
        jobs:
          a:
            task: shel
            every: 5m
        """
    assert errors(text) == [
        f"schedd.yaml:3:11: unknown task 'shel' (did you mean 'shell'?); {KNOWN}"
    ]
    broken = Registry(task_types=TASKS, plugins=(BROKEN,))
    assert errors(text, broken) == [
        "schedd.yaml:3:11: unknown task 'shel' (did you mean 'shell'?); known tasks: http, python,"
        " shell; plugin that failed to load: 'extras'"
        " (ModuleNotFoundError: No module named 'requests')"
    ]


def test_unknown_task_names_the_broken_or_blocked_plugin_of_that_name() -> None:
    other = PluginInfo("other", "d", "1", "m", error="SyntaxError: bad")
    report = PluginInfo("report", "d", "1", "report.plugin", error="ImportError: no lxml")
    blocked = PluginInfo("mail", "d", "1", "mail.plugin", blocked=True)
    registry = Registry(task_types=TASKS, plugins=(other, report, blocked))
    assert errors(
        """\
        jobs:
          a: {task: report, every: 5m}
          b: {task: mail, every: 5m}
        """,
        registry,
    ) == [
        "schedd.yaml:2:13: unknown task 'report'; known tasks: http, python, shell;"
        " plugin that failed to load: 'report' (ImportError: no lxml)",
        "schedd.yaml:3:13: unknown task 'mail'; known tasks: http, python, shell; plugins that"
        " failed to load: 'other' (SyntaxError: bad), 'report' (ImportError: no lxml);"
        " plugin 'mail' is disabled by $SCHEDD_DISABLE_PLUGINS",
    ]


def test_a_missing_task_points_at_the_job_key() -> None:
    assert errors(
        """\
        jobs:
          nightly:
            every: 1h
        """
    ) == [f"schedd.yaml:2:3: job 'nightly' is missing required key 'task' ({KNOWN})"]


def test_exactly_one_schedule() -> None:
    assert errors(
        """\
        jobs:
          none:
            task: shell
            params: {cmd: x}
          both:
            task: shell
            params: {cmd: x}
            cron: "0 * * * *"
            every: 5m
          three: {task: shell, params: {cmd: x}, at: 2099-01-01, every: 5m, cron: "* * * * *"}
        """
    ) == [
        "schedd.yaml:2:3: job 'none' needs exactly one of cron, every, at (found: none)",
        "schedd.yaml:9:5: job 'both' needs exactly one of cron, every, at (found: cron, every)",
        "schedd.yaml:10:58: job 'three' needs exactly one of cron, every, at"
        " (found: cron, every, at)",
    ]


def test_job_id_rule() -> None:
    long_ok, too_long = "a" * 128, "a" * 129
    assert errors(
        f"""\
        jobs:
          "bad id": {{task: shell, params: {{cmd: x}}, every: 5m}}
          -dash: {{task: shell, params: {{cmd: x}}, every: 5m}}
          123: {{task: shell, params: {{cmd: x}}, every: 5m}}
          {long_ok}: {{task: shell, params: {{cmd: x}}, every: 5m}}
          {too_long}: {{task: shell, params: {{cmd: x}}, every: 5m}}
          ok.v1_x-y: {{task: shell, params: {{cmd: x}}, every: 5m}}
          "nl\\n": {{task: shell, params: {{cmd: x}}, every: 5m}}
        """
    ) == [
        "schedd.yaml:2:3: invalid job id 'bad id': use 1-128 letters, digits, '.', '_' or '-',"
        " starting with a letter or digit",
        "schedd.yaml:3:3: invalid job id '-dash': use 1-128 letters, digits, '.', '_' or '-',"
        " starting with a letter or digit",
        "schedd.yaml:4:3: job id 123 must be a string; quote it: '123'",
        f"schedd.yaml:6:3: invalid job id '{too_long}': use 1-128 letters, digits, '.', '_' or '-',"
        " starting with a letter or digit",
        "schedd.yaml:8:3: invalid job id 'nl\\n': use 1-128 letters, digits, '.', '_' or '-',"
        " starting with a letter or digit",
    ]


def test_params_errors_point_into_params() -> None:
    assert errors(
        """\
        jobs:
          a:
            task: http
            params:
              url: 5
              methd: GET
              headers:
                X-Token: 7
            every: 5m
          b:
            task: http
            every: 5m
          c:
            task: python
            params: {target: nocolon, args: [1, two]}
            every: 5m
          d:
            task: http
            params: {method: PUT}
            every: 5m
          e:
            task: http
            params: [url]
            every: 5m
        """
    ) == [
        "schedd.yaml:5:12: params.url must be a string (got 5)",
        "schedd.yaml:6:7: unknown key 'methd' in params of task 'http' (did you mean 'method'?)",
        "schedd.yaml:8:18: params.headers.X-Token must be a string (got 7)",
        "schedd.yaml:10:3: missing required key 'url' in params of task 'http'",
        "schedd.yaml:15:22: params.target must look like 'package.module:function'",
        "schedd.yaml:15:41: params.args[1] must be a whole number (got 'two')",
        "schedd.yaml:19:5: missing required key 'url' in params of task 'http'",
        "schedd.yaml:19:22: params.method must be 'GET' or 'POST' (got 'PUT')",
        "schedd.yaml:23:13: params must be a mapping (got a list)",
    ]


def test_time_zone_did_you_mean() -> None:
    assert errors(
        """\
        timezone: Europe/Berln
        jobs:
          a:
            task: shell
            params: {cmd: x}
            every: 5m
            timezone: america/new_york
          b: {task: shell, params: {cmd: x}, every: 5m, timezone: Nowhere/Atall}
          c: {task: shell, params: {cmd: x}, every: 5m, timezone: 5}
        """
    ) == [
        "schedd.yaml:1:11: invalid time zone 'Europe/Berln' (did you mean 'Europe/Berlin'?)",
        "schedd.yaml:7:15: invalid time zone 'america/new_york' (did you mean 'America/New_York'?)",
        "schedd.yaml:8:59: invalid time zone 'Nowhere/Atall'",
        "schedd.yaml:9:59: timezone must be an IANA time zone name such as 'Europe/Berlin' (got 5)",
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("jitter: abc", f"jitter must be a duration (got 'abc'); {FORMS}"),
        ("jitter: 5M", f"jitter must be a duration (got '5M'); {FORMS}"),
        ("kill_grace: [1]", f"kill_grace must be a duration (got a list); {FORMS}"),
        ("retry_delay: -5s", "retry_delay must not be negative (got '-5s')"),
        (
            "catchup_window: 30m1h",
            "catchup_window must list each unit once, largest first (e.g. 1h30m, not 30m1h)"
            " (got '30m1h')",
        ),
        ("timeout: 0", "timeout must be greater than 0, or null for no timeout (got 0)"),
        (
            "overlap: skp",
            "overlap must be one of skip, queue, replace, allow (got 'skp'; did you mean 'skip'?)",
        ),
        ("catchup: everything", "catchup must be one of none, latest, all (got 'everything')"),
        ("retries: -1", "retries must be a whole number >= 0 (got -1)"),
        ("retries: '3'", "retries must be a whole number >= 0 (got '3')"),
        ("retries: true", "retries must be a whole number >= 0 (got true)"),
        ("log_retention: 1.5", "log_retention must be a whole number >= 0 (got 1.5)"),
        ("enabled: 'yes'", "enabled must be true or false (got 'yes')"),
        ("enabled: 1", "enabled must be true or false (got 1)"),
        ("description: 5", "description must be a string (got 5)"),
        (
            "log_rotation: 10 XB",
            f"log_rotation must be a size (got '10 XB'); {SIZES}",
        ),
        ("log_rotation: 0", "log_rotation must be at least 1 byte (got 0)"),
        ("env: [A]", "env must be a mapping (got a list)"),
        ("timezone: ''", "invalid time zone ''"),
    ],
)
def test_bad_values_are_located_at_the_value(line: str, message: str) -> None:
    col = 5 + len(line.split(":")[0]) + 2
    assert errors(
        f"""\
        jobs:
          a:
            task: shell
            params: {{cmd: x}}
            every: 5m
            {line}
        """
    ) == [f"schedd.yaml:6:{col}: {message}"]


def test_bad_schedule_values() -> None:
    assert errors(
        """\
        jobs:
          a: {task: shell, params: {cmd: x}, every: 0}
          b: {task: shell, params: {cmd: x}, at: soon}
          c: {task: shell, params: {cmd: x}, cron: 5}
          d: {task: shell, params: {cmd: x}, cron: ""}
          e: {task: '', params: {cmd: x}, every: 1h}
        """
    ) == [
        "schedd.yaml:2:45: every must be greater than 0 (got 0)",
        "schedd.yaml:3:42: at must be an ISO 8601 date-time such as 2025-06-01T09:30:00"
        " or 2025-06-01 09:30:00+02:00 (got 'soon')",
        "schedd.yaml:4:44: cron must be a string (got 5)",
        "schedd.yaml:5:44: cron must not be empty",
        "schedd.yaml:6:13: task must not be empty",
    ]


@pytest.mark.parametrize(
    ("written", "value_col", "text_col"),
    [
        ("0 25 * * *", 11, 11),
        ("'0 25 * * *'", 11, 12),
        ('"0 25 * * *"', 11, 12),
        ('"0 25\\t* * *"', 11, None),  # an escape: the text no longer lines up
        ("'0 25 * * ''x'''", 11, None),
        ("|-\n              0 25 * * *", 11, None),
    ],
)
def test_cron_errors_point_inside_the_expression(
    written: str, value_col: int, text_col: int | None
) -> None:
    import yaml

    expr = yaml.safe_load(f"v: {written}")["v"]
    with pytest.raises(TriggerError) as info:
        parse_cron(expr, ZoneInfo("UTC"), "a")
    offset = info.value.offset
    col = text_col + offset if text_col is not None and offset is not None else value_col
    assert errors(
        f"""\
        jobs:
          a:
            task: shell
            params: {{cmd: x}}
            cron: {written}
        """
    ) == [f"schedd.yaml:5:{col}: invalid cron expression: {info.value.message}"]


def test_every_below_the_trigger_minimum_is_reported_by_triggers() -> None:
    with pytest.raises(TriggerError) as info:
        parse_every(0.5, ZoneInfo("UTC"))
    assert errors("jobs:\n  a: {task: shell, params: {cmd: x}, every: 500ms}\n") == [
        f"schedd.yaml:2:45: {info.value.message}"
    ]


def test_env_values_become_strings_and_names_are_checked() -> None:
    config = load(
        """\
        jobs:
          a:
            task: shell
            params: {cmd: x}
            every: 5m
            env: {A: 1, B: 1.5, C: true, D: false, E: text, F: '', G: 007}
        """
    )
    assert config.jobs["a"].env == {
        "A": "1",
        "B": "1.5",
        "C": "true",
        "D": "false",
        "E": "text",
        "F": "",
        "G": "7",
    }
    assert errors(
        """\
        jobs:
          a:
            task: shell
            params: {cmd: x}
            every: 5m
            env:
              1X: a
              A-B: b
              _ok: c
              "NL\\n": d
              EMPTY:
              null: x
              LIST: [1]
        """
    ) == [
        "schedd.yaml:7:7: invalid environment variable name '1X': use letters, digits and '_',"
        " not starting with a digit",
        "schedd.yaml:8:7: invalid environment variable name 'A-B': use letters, digits and '_',"
        " not starting with a digit",
        "schedd.yaml:10:7: invalid environment variable name 'NL\\n': use letters, digits and '_',"
        " not starting with a digit",
        "schedd.yaml:11:7: env.EMPTY must be a string, number or true/false (got null)",
        "schedd.yaml:12:7: invalid environment variable name null: use letters, digits and '_',"
        " not starting with a digit",
        "schedd.yaml:13:13: env.LIST must be a string, number or true/false (got a list)",
    ]


def test_defaults_apply_key_by_key_and_env_merges() -> None:
    config = load(
        """\
        defaults:
          task: shell
          params: {cmd: default}
          every: 1h
          retries: 2
          timeout: 5m
          env: {A: from-defaults, B: from-defaults}
        jobs:
          inherits: {}
          overrides:
            params: {cmd: own}
            cron: "0 4 * * *"
            retries: 0
            timeout: null
            env: {B: from-job, C: from-job}
        """
    )
    inherits, overrides = config.jobs.values()
    assert (
        inherits.task,
        inherits.params["cmd"],
        inherits.trigger_kind,
        inherits.trigger_expr,
    ) == (
        "shell",
        "default",
        "every",
        "1h",
    )
    assert (inherits.retries, inherits.timeout) == (2, 300.0)
    assert inherits.env == {"A": "from-defaults", "B": "from-defaults"}
    # cron in the job replaces every from defaults: the schedule keys count as one
    assert (overrides.trigger_kind, overrides.trigger_expr) == ("cron", "0 4 * * *")
    assert (overrides.params["cmd"], overrides.retries, overrides.timeout) == ("own", 0, None)
    assert overrides.env == {"A": "from-defaults", "B": "from-job", "C": "from-job"}


def test_defaults_errors_are_located_at_defaults_and_reported_once() -> None:
    assert errors(
        """\
        defaults:
          timeout: forever
          task: shel
          overlap: sometimes
          every: 1h
          cron: "0 * * * *"
        jobs:
          a: {params: {cmd: x}}
          b: {params: {cmd: x}}
          c: {task: shell, params: {cmd: x}, every: 5m, overlap: skip}
        """
    ) == [
        f"schedd.yaml:2:12: timeout must be a duration (got 'forever'); {FORMS}",
        f"schedd.yaml:3:9: unknown task 'shel' (did you mean 'shell'?); {KNOWN}",
        "schedd.yaml:4:12: overlap must be one of skip, queue, replace, allow (got 'sometimes')",
        "schedd.yaml:6:3: defaults may set only one of cron, every, at (found: cron, every)",
    ]


def test_params_from_defaults_are_checked_against_each_task_and_reported_once() -> None:
    assert errors(
        """\
        defaults:
          task: http
          params: {url: 5}
          every: 1h
        jobs:
          a: {}
          b: {}
          c: {task: shell}
        """
    ) == [
        "schedd.yaml:3:3: missing required key 'cmd' in params of task 'shell'",
        "schedd.yaml:3:12: unknown key 'url' in params of task 'shell'; known keys: cmd, shell",
        "schedd.yaml:3:17: params.url must be a string (got 5)",
    ]


def test_duplicate_keys_at_every_level() -> None:
    assert errors(
        """\
        timezone: UTC
        timezone: UTC
        defaults:
          retries: 1
          retries: 2
        jobs:
          a:
            task: shell
            params:
              cmd: x
              cmd: y
            env:
              A: 1
              A: 2
            every: 5m
            every: 6m
          a:
            task: http
        """
    ) == [
        "schedd.yaml:2:1: duplicate key 'timezone' (first at line 1)",
        "schedd.yaml:5:3: duplicate key 'retries' (first at line 4)",
        "schedd.yaml:11:7: duplicate key 'cmd' (first at line 10)",
        "schedd.yaml:14:7: duplicate key 'A' (first at line 13)",
        "schedd.yaml:16:5: duplicate key 'every' (first at line 15)",
        "schedd.yaml:17:3: duplicate key 'a' (first at line 7)",
    ]


def test_every_problem_in_the_file_comes_in_one_error() -> None:
    with pytest.raises(ConfigError) as info:
        load(
            """\
            timezone: Mars/Base
            jobs:
              a: {task: shel, every: 5m}
              b: {task: shell, params: {cmd: 1}, cron: "61 * * * *"}
              c: {task: http, params: {url: x}, every: 5m, retries: many}
              ok: {task: shell, params: {cmd: x}, every: 5m}
            """
        )
    problems = info.value.problems
    assert [(p.line, p.col) for p in problems] == [(1, 11), (3, 13), (4, 34), (4, 45), (5, 57)]
    assert str(info.value) == "\n".join(str(p) for p in problems)
    assert all(p.severity == "error" and p.path == "schedd.yaml" for p in problems)


def test_python_tags_run_nothing_and_are_located(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    assert errors(
        f"""\
        jobs:
          a:
            task: shell
            params: {{cmd: !!python/object/apply:os.system ['touch {marker}']}}
            every: 5m
          b: !!python/object/apply:os.system ['touch {marker}']
        """
    ) == [
        "schedd.yaml:4:19: unsupported YAML tag '!!python/object/apply:os.system'",
        "schedd.yaml:6:6: unsupported YAML tag '!!python/object/apply:os.system'",
    ]
    assert not marker.exists()
    assert errors(f"jobs: !!python/object/apply:os.system ['touch {marker}']\n") == [
        "schedd.yaml:1:7: unsupported YAML tag '!!python/object/apply:os.system'"
    ]
    assert not marker.exists()


def test_anchors_and_merge_keys_work_and_locate_errors_in_the_anchor() -> None:
    config = load(
        """\
        jobs:
          a: &base
            task: shell
            params: {cmd: x}
            every: 5m
            retries: 2
          b:
            <<: *base
            every: 10m
        """
    )
    assert (config.jobs["b"].retries, config.jobs["b"].trigger_expr) == (2, "10m")
    assert errors(
        """\
        x-common: &common
          retries: lots
        jobs:
          a:
            <<: *common
            task: shell
            params: {cmd: x}
            every: 5m
        """
    ) == [
        "schedd.yaml:1:1: unknown key 'x-common' at the top level",
        "schedd.yaml:2:12: retries must be a whole number >= 0 (got 'lots')",
    ]


def test_at_accepts_yaml_timestamps_and_strings() -> None:
    config = load(
        """\
        timezone: Europe/Berlin
        jobs:
          ts: {task: shell, params: {cmd: x}, at: 2099-06-01 09:30:00}
          text: {task: shell, params: {cmd: x}, at: "2099-06-01T09:30:00"}
          aware: {task: shell, params: {cmd: x}, at: 2099-06-01T09:30:00+00:00}
          day: {task: shell, params: {cmd: x}, at: 2099-06-01}
          nyc: {task: shell, params: {cmd: x}, at: "2099-06-01 09:30", timezone: America/New_York}
        """
    )
    berlin, new_york = ZoneInfo("Europe/Berlin"), ZoneInfo("America/New_York")
    expected = {
        "ts": ("2099-06-01 09:30:00", datetime(2099, 6, 1, 9, 30, tzinfo=berlin)),
        "text": ("2099-06-01T09:30:00", datetime(2099, 6, 1, 9, 30, tzinfo=berlin)),
        "aware": ("2099-06-01T09:30:00+00:00", datetime(2099, 6, 1, 9, 30, tzinfo=UTC)),
        "day": ("2099-06-01", datetime(2099, 6, 1, tzinfo=berlin)),
        "nyc": ("2099-06-01 09:30", datetime(2099, 6, 1, 9, 30, tzinfo=new_york)),
    }
    for job_id, (text, when) in expected.items():
        job = config.jobs[job_id]
        assert (job.trigger_kind, job.trigger_expr) == ("at", text)
        assert job.schedule.next_after(T0) == when


def test_at_in_the_past_is_a_warning() -> None:
    config = load(
        """\
        jobs:
          old: {task: shell, params: {cmd: x}, at: 2001-01-01 00:00:00}
        """
    )
    assert list(config.jobs) == ["old"]
    assert config.warnings == [
        Problem(
            "schedd.yaml",
            2,
            44,
            "at '2001-01-01 00:00:00' is in the past; job 'old' will not run",
            "warning",
        )
    ]
    assert str(config.warnings[0]).startswith("schedd.yaml:2:44: warning: at ")


def test_file_shape_problems() -> None:
    assert errors("") == ["schedd.yaml: the file is empty; it needs a 'jobs:' mapping"]
    assert errors("# nothing yet\n") == [
        "schedd.yaml: the file is empty; it needs a 'jobs:' mapping"
    ]
    assert errors("- a\n- b\n") == [
        "schedd.yaml:1:1: the top level must be a mapping of timezone, state_dir, defaults, jobs"
        " (got a list)"
    ]
    assert errors("jobs: [a]\n") == [
        "schedd.yaml:1:7: jobs must be a mapping of job id to job (got a list)"
    ]
    assert errors("jobs:\n  a: echo hi\n") == [
        "schedd.yaml:2:6: job 'a' must be a mapping of job keys (got 'echo hi')"
    ]
    assert errors("jobs:\n  a:\n") == [
        "schedd.yaml:2:3: job 'a' is empty; it needs a task and one of cron, every, at"
    ]
    assert errors("defaults: 5\njobs: {}\n") == [
        "schedd.yaml:1:11: defaults must be a mapping of job keys (got 5)",
        "schedd.yaml:2:1: warning: no jobs defined",
    ]
    assert errors("jobs:\n  a: [\n") == [
        "schedd.yaml:3:1: YAML syntax error: expected the node content, but found '<stream end>'"
        " (while parsing a flow node)"
    ]
    assert errors("jobs:\n  a: {task: shell, cron: @daily}\n") == [
        "schedd.yaml:2:26: YAML syntax error: found character '@' that cannot start any token;"
        " quote values that start with '@', e.g. cron: '@daily'"
    ]


def test_no_jobs_is_a_warning() -> None:
    assert load("jobs:\n").warnings == [Problem("schedd.yaml", 1, 1, "no jobs defined", "warning")]
    assert load("timezone: UTC\n").warnings == [
        Problem("schedd.yaml", 0, 0, "no jobs defined", "warning")
    ]


def test_a_missing_or_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("nope.yaml", REG)
    assert str(info.value) == "nope.yaml: cannot read config file: No such file or directory"
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, REG)
    assert str(info.value) == f"{tmp_path}: cannot read config file: Is a directory"


def test_state_dir_is_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    jobs = "jobs:\n  a: {task: shell, params: {cmd: x}, every: 5m}\n"
    assert (
        load(f"state_dir: state\n{jobs}", name="etc/s.yaml").state_dir == tmp_path / "etc" / "state"
    )
    assert (
        load(f"state_dir: ../var/schedd\n{jobs}", name="etc/s.yaml").state_dir
        == tmp_path / "var" / "schedd"
    )
    assert load(f"state_dir: /srv/schedd\n{jobs}").state_dir == Path("/srv/schedd")
    assert load(jobs).state_dir is None
    assert load(f"state_dir:\n{jobs}").state_dir is None
    assert load(jobs, name="etc/s.yaml").path == tmp_path / "etc" / "s.yaml"
    assert errors(f"state_dir: ''\n{jobs}") == ["schedd.yaml:1:12: state_dir must not be empty"]
    assert errors(f"state_dir: [a]\n{jobs}") == [
        "schedd.yaml:1:12: state_dir must be a string (got a list)"
    ]


def test_find_config_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("schedd.yaml", "env.yaml", "explicit.yaml"):
        (tmp_path / name).write_text("jobs: {}\n")
    assert find_config(None) == tmp_path / "schedd.yaml"
    monkeypatch.setenv("SCHEDD_CONFIG", "env.yaml")
    assert find_config(None) == tmp_path / "env.yaml"
    assert find_config("explicit.yaml") == tmp_path / "explicit.yaml"
    with pytest.raises(
        ScheddError, match=r"^config file not found: nope.yaml \(given with --config\)$"
    ):
        find_config("nope.yaml")
    monkeypatch.setenv("SCHEDD_CONFIG", "gone.yaml")
    with pytest.raises(
        ScheddError, match=r"^config file not found: gone.yaml \(from \$SCHEDD_CONFIG\)$"
    ):
        find_config(None)
    monkeypatch.setenv("SCHEDD_CONFIG", "")
    assert find_config(None) == tmp_path / "schedd.yaml"
    (tmp_path / "schedd.yaml").unlink()
    with pytest.raises(ScheddError) as info:
        find_config(None)
    assert str(info.value) == (
        "no config file: --config not given, $SCHEDD_CONFIG not set,"
        f" and no ./schedd.yaml in {tmp_path}"
    )


# -- JSON Schema -----------------------------------------------------------------

JOB_KEYS = {
    "task",
    "params",
    "cron",
    "every",
    "at",
    "timezone",
    "jitter",
    "timeout",
    "kill_grace",
    "overlap",
    "catchup",
    "catchup_window",
    "retries",
    "retry_delay",
    "env",
    "env_file",
    "log_rotation",
    "log_retention",
    "enabled",
    "description",
    "rerun_lost",
    "history_limit",
    "history_max_age",
    "limits",
    "run_as",
}


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node["$ref"]
    assert ref.startswith("#/$defs/")
    resolved: dict[str, Any] = schema["$defs"][ref.removeprefix("#/$defs/")]
    return resolved


def test_json_schema_covers_the_file_and_each_task() -> None:
    schema = config_json_schema(REG)
    assert schema == json.loads(json.dumps(schema))
    assert schema == config_json_schema(REG)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert set(schema["properties"]) == {"timezone", "state_dir", "defaults", "jobs"}
    assert schema["additionalProperties"] is False
    jobs = schema["properties"]["jobs"]
    assert jobs["propertyNames"] == {"pattern": JOB_ID_PATTERN}
    job = _resolve(schema, jobs["additionalProperties"])
    assert _resolve(schema, schema["properties"]["defaults"]) is job
    assert set(job["properties"]) == JOB_KEYS
    assert job["additionalProperties"] is False
    assert "required" not in job  # defaults may supply any key
    assert job["properties"]["overlap"]["enum"] == ["skip", "queue", "replace", "allow"]
    assert job["properties"]["retries"] == {
        "default": 0,
        "description": "Extra attempts after a failed run.",
        "maximum": 2**31 - 1,
        "minimum": 0,
        "title": "Retries",
        "type": "integer",
    }
    assert _resolve(schema, job["properties"]["jitter"])["anyOf"][0] == {
        "type": "number",
        "minimum": 0,
    }
    wired = {}
    for rule in job["allOf"]:
        name = rule["if"]["properties"]["task"]["const"]
        assert rule["if"]["required"] == ["task"]
        wired[name] = _resolve(schema, rule["then"]["properties"]["params"])
    assert set(wired) == {"http", "python", "shell"}
    assert wired["http"]["required"] == ["url"]
    assert set(wired["http"]["properties"]) == {"url", "method", "headers"}
    assert set(wired["shell"]["properties"]) == {"cmd", "shell"}
    assert wired["python"]["properties"]["args"]["items"] == {"type": "integer"}


# -- never a traceback -------------------------------------------------------------

_YAMLISH = st.sampled_from([*":-[]{}#&*!|>'\"%@`,?~<=\n\t ", "\n  ", ": ", "- ", "<<: *a", "&a "])
_WORDS = st.sampled_from(
    ["task", "shell", "every", "cron", "5m", "0", "-1", "null", "yes", "2025-01-01", "jobs", "x"]
)


@st.composite
def _mutated(draw: st.DrawFn) -> str:
    text = FULL
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 12)))
        insert = draw(st.lists(_YAMLISH | _WORDS | st.characters(), max_size=4).map("".join))
        text = text[:i] + insert + text[j:]
    return text


@settings(max_examples=300, deadline=None)
@given(_mutated() | st.text(max_size=200))
def test_any_text_loads_or_raises_config_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "schedd.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        try:
            config = load_config(path, REG)
        except ConfigError as exc:
            assert exc.problems
            assert all(p.line >= 0 and p.col >= 0 and p.message for p in exc.problems)
        else:
            assert all(isinstance(j, JobSpec) for j in config.jobs.values())
