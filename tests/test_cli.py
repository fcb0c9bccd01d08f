"""The offline `schedd` CLI, run as a real subprocess the way users run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "example.yaml"


def schedd(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDD_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "scheduler.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=60,
    )


def write(tmp_path: Path, text: str, name: str = "schedd.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def test_validate_example_is_ok() -> None:
    res = schedd("validate", "--config", str(EXAMPLE))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("config/example.yaml: OK, 9 jobs (8 enabled)")
    assert res.stderr == ""


def test_validate_reports_every_error_located(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        timezone: Europe/Berln
        jobs:
          a:
            task: shel
            every: 5m
          b:
            task: shell
            cronn: "* * * * *"
            params: {command: 'true'}
          c:
            task: shell
            cron: "0 0 30 2 *"
            params: {command: 'true', cwdd: /tmp}
        """,
    )
    res = schedd("validate", "--config", str(path))
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    text = res.stderr
    assert (
        "schedd.yaml:1:11: invalid time zone 'Europe/Berln' (did you mean 'Europe/Berlin'?)"
        in (lines[0])
    )
    assert "schedd.yaml:4:11: unknown task 'shel' (did you mean 'shell'?)" in text
    assert "schedd.yaml:8:5: unknown key 'cronn' in job 'b' (did you mean 'cron'?)" in text
    assert "schedd.yaml:12:16: invalid cron expression: never fires" in text
    assert "schedd.yaml:13:31: unknown key 'cwdd' in params of task 'shell'" in text
    assert "Traceback" not in text
    assert lines[-1].endswith("nothing was changed.")


def test_python_tags_run_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = write(
        tmp_path,
        f"""
        jobs: !!python/object/apply:os.system ["touch {marker}"]
        """,
    )
    res = schedd("validate", "--config", str(path))
    assert res.returncode == 1
    assert "schedd.yaml:1:" in res.stderr
    assert not marker.exists()


def test_debug_shows_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "jobs: {a: {task: nope, every: 1m}}\n")
    res = schedd("--debug", "validate", "--config", str(path))
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_config_lookup_env_then_cwd(tmp_path: Path) -> None:
    write(tmp_path, "jobs:\n  here:\n    task: shell\n    every: 1m\n    params: {command: x}\n")
    res = schedd("jobs", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert [j["id"] for j in json.loads(res.stdout)] == ["here"]
    res = schedd("jobs", "--json", cwd=tmp_path, env={"SCHEDD_CONFIG": str(EXAMPLE)})
    assert "heartbeat" in [j["id"] for j in json.loads(res.stdout)]
    empty = tmp_path / "empty"
    empty.mkdir()
    res = schedd("validate", cwd=empty)
    assert res.returncode == 1
    assert "schedd.yaml" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_jobs_lists_trigger_in_words_and_next_fire() -> None:
    res = schedd("jobs", "--config", str(EXAMPLE))
    assert res.returncode == 0, res.stderr
    header, *rows = res.stdout.splitlines()
    assert header.split() == ["JOB", "TASK", "TRIGGER", "TZ", "NEXT", "FIRE"]
    backup = next(r for r in rows if r.startswith("nightly-backup"))
    assert "30 2 * * *" in backup and "Europe/Berlin" in backup
    health = next(r for r in rows if r.startswith("healthcheck"))
    assert health.rstrip().endswith("disabled")
    data = json.loads(schedd("jobs", "--config", str(EXAMPLE), "--json").stdout)
    job = next(j for j in data if j["id"] == "nightly-backup")
    assert job["next_fire"].endswith(("+01:00", "+02:00")) and "T02:30:00" in job["next_fire"]


@pytest.mark.parametrize(
    ("expr", "start", "expected"),
    [
        # spring forward in Berlin: 02:30 does not exist -> first instant after the gap
        (
            "30 2 * * *",
            "2027-03-27T12:00:00",
            ["2027-03-28T03:00:00+02:00", "2027-03-29T02:30:00+02:00"],
        ),
        # fall back: 02:30 happens twice -> only the first
        (
            "30 2 * * *",
            "2027-10-30T12:00:00",
            ["2027-10-31T02:30:00+02:00", "2027-11-01T02:30:00+01:00"],
        ),
        # wall-clock job: both copies of the repeated hour
        (
            "30 * * * *",
            "2027-10-31T01:45:00+02:00",
            ["2027-10-31T02:30:00+02:00", "2027-10-31T02:30:00+01:00"],
        ),
    ],
)
def test_next_follows_the_dst_rule(
    tmp_path: Path, expr: str, start: str, expected: list[str]
) -> None:
    path = write(
        tmp_path,
        f"""
        timezone: Europe/Berlin
        jobs:
          j:
            task: shell
            cron: "{expr}"
            params: {{command: 'true'}}
        """,
    )
    res = schedd("next", "j", "--config", str(path), "--count", "2", "--from", start)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == expected
    res = schedd("next", "j", "--config", str(path), "-n", "2", "--from", start, "--json")
    assert json.loads(res.stdout) == expected


def test_next_errors_are_one_line(tmp_path: Path) -> None:
    res = schedd("next", "nightly-backupp", "--config", str(EXAMPLE))
    assert res.returncode == 1
    assert res.stderr.strip() == (
        "schedd: no job 'nightly-backupp' in config/example.yaml (did you mean 'nightly-backup'?)"
    )
    res = schedd("next", "heartbeat", "--config", str(EXAMPLE), "--from", "yesterday")
    assert res.returncode == 1 and "ISO-8601" in res.stderr and "Traceback" not in res.stderr


def test_next_one_shot_stops_after_its_time() -> None:
    res = schedd("next", "new-year", "--config", str(EXAMPLE), "--count", "3", "--json")
    assert json.loads(res.stdout) == ["2030-01-01T00:00:00+01:00"]


def test_plugins_lists_builtins() -> None:
    res = schedd("plugins", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    by_name = {p["name"]: p for p in data["plugins"]}
    assert {"shell", "python", "http"} <= set(by_name)
    assert by_name["shell"]["distribution"] == "schedd"
    assert [t["name"] for t in by_name["http"]["task_types"]] == ["http"]
    text = schedd("plugins").stdout
    assert "shell" in text and "schedd 0.1.0" in text


def test_disabled_plugin_makes_its_jobs_fail_clearly() -> None:
    res = schedd("validate", "--config", str(EXAMPLE), env={"SCHEDD_DISABLE_PLUGINS": "http"})
    assert res.returncode == 1
    assert "config/example.yaml:" in res.stderr and "unknown task 'http'" in res.stderr
    listing = json.loads(schedd("plugins", "--json", env={"SCHEDD_DISABLE_PLUGINS": "http"}).stdout)
    assert next(p for p in listing["plugins"] if p["name"] == "http")["blocked"] is True


def test_schema_file_is_in_sync() -> None:
    res = schedd("schema")
    assert res.returncode == 0, res.stderr
    committed = (ROOT / "config" / "schedd.schema.json").read_text()
    assert json.loads(res.stdout) == json.loads(committed), (
        "config/schedd.schema.json is stale: run `schedd schema > config/schedd.schema.json`"
    )


def test_help_lists_every_command() -> None:
    res = schedd("--help")
    assert res.returncode == 0
    for command in ("validate", "jobs", "next", "plugins", "schema", "run", "run-once"):
        assert f"  {command} " in res.stdout


def test_every_hook_is_documented_in_readme() -> None:
    import scheduler.hookspecs as specs

    readme = (ROOT / "README.md").read_text()
    hooks = [name for name in dir(specs) if name.startswith("schedd_")]
    assert hooks
    for name in hooks:
        assert f"`{name}(" in readme, f"hook {name} is not documented in README.md"
        assert getattr(specs, name).__doc__, f"hook {name} has no docstring"
