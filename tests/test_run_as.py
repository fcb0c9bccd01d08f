"""``run_as:``: the task really becomes the user, for good; a non-root schedd refuses it.

The run tests need root (they run tasks as ``nobody``). The refusal tests run
``schedd`` itself as ``nobody``: with an interpreter ``nobody`` can execute
(this machine's venv interpreter lives under a private ``/root``), the project
and the venv's packages on ``PYTHONPATH``.
"""

from __future__ import annotations

import dataclasses
import grp
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler.config import load_config
from scheduler.errors import ConfigError
from scheduler.params import TaskParams
from scheduler.plugins import load_plugins
from scheduler.runner import Runner
from scheduler.runspec import Start, build_request
from scheduler.types import RunResult, TaskType
from tests.helpers import ROOT, wait_for
from tests.runner_tasks import Collector

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="run_as needs root")

REGISTRY = load_plugins()[1]
NOBODY = pwd.getpwnam("nobody")
STATUS = TaskType("status", "tests.limit_tasks:status", "who am I", TaskParams)
_ids = iter(range(1, 1 << 30))


def load(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "schedd.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(path, REGISTRY)


def job_yaml(run_as: str) -> str:
    return f"""
    jobs:
      who:
        task: shell
        every: 1h
        params: {{command: "true"}}
        run_as: "{run_as}"
    """


@pytest.fixture(scope="module")
def with_groups() -> Iterator[tuple[Runner, Collector]]:
    """A runner whose launcher has root's supplementary groups 4 and 5, to see them dropped."""
    col = Collector()
    before = os.getgroups()
    os.setgroups([4, 5])
    try:
        r = Runner(on_line=col.on_line, on_event=col.on_event)
        r.start()
    finally:
        os.setgroups(before)
    yield r, col
    r.close(grace=1.0)


def status(runner: Runner, col: Collector, spec: Any) -> tuple[RunResult, dict[str, Any]]:
    run_id = f"who-{os.getpid()}-{next(_ids)}"
    req = build_request(spec, STATUS, run_id, Start(None), {"PATH": "/usr/bin:/bin"})
    res = runner.launch(req).wait(30)
    assert res is not None
    out = col.out(run_id)
    assert res.status == "success", (res, col.out(run_id, "stderr"))
    return res, json.loads(out[0])


def test_the_task_becomes_the_user_for_good(
    with_groups: tuple[Runner, Collector], tmp_path: Path
) -> None:
    spec = load(tmp_path, job_yaml("nobody")).jobs["who"]
    assert (spec.run_as.user, spec.run_as.uid, spec.run_as.gid) == (
        "nobody",
        NOBODY.pw_uid,
        NOBODY.pw_gid,
    )
    _, info = status(*with_groups, spec)
    uid, gid = NOBODY.pw_uid, NOBODY.pw_gid
    assert info["resuid"] == [uid, uid, uid]  # real, effective and saved
    assert info["resgid"] == [gid, gid, gid]
    assert info["groups"] == sorted(os.getgrouplist("nobody", gid))  # initgroups, not 4 and 5
    assert info["regained"] == []  # setuid(0), setgid(0), seteuid(0), setegid(0) all refused
    assert info["env"] == {"HOME": NOBODY.pw_dir, "USER": "nobody", "LOGNAME": "nobody"}
    assert info["pdeathsig"] == signal.SIGKILL  # cleared by the id change, armed again


def test_user_and_group(with_groups: tuple[Runner, Collector], tmp_path: Path) -> None:
    group = grp.getgrgid(1).gr_name  # "daemon" on Debian
    spec = load(tmp_path, job_yaml(f"nobody:{group}")).jobs["who"]
    _, info = status(*with_groups, spec)
    assert info["resgid"] == [1, 1, 1]
    assert info["groups"] == sorted(os.getgrouplist("nobody", 1))
    assert info["resuid"][0] == NOBODY.pw_uid


def test_without_run_as_the_task_stays_root(
    with_groups: tuple[Runner, Collector], tmp_path: Path
) -> None:
    spec = load(tmp_path, "jobs:\n  who: {task: shell, every: 1h, params: {command: 'true'}}\n")
    _, info = status(*with_groups, spec.jobs["who"])
    assert info["resuid"] == [0, 0, 0] and info["groups"] == [4, 5]  # the set-up took
    assert info["env"]["USER"] is None  # nothing added


def test_a_job_env_still_wins_over_the_identity(
    with_groups: tuple[Runner, Collector], tmp_path: Path
) -> None:
    text = job_yaml("nobody").rstrip() + "\n        env: {HOME: /tmp}\n"
    _, info = status(*with_groups, load(tmp_path, text).jobs["who"])
    assert info["env"]["HOME"] == "/tmp" and info["env"]["USER"] == "nobody"


def test_unknown_user_or_group_is_a_located_error(tmp_path: Path) -> None:
    text = """
    defaults:
      run_as: no-such-user-here
    jobs:
      a: {task: shell, every: 1h, params: {command: "true"}}
      b: {task: shell, every: 1h, params: {command: "true"}, run_as: "nobody:no-such-group"}
      c: {task: shell, every: 1h, params: {command: "true"}, run_as: "two words"}
    """
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert [str(p).removeprefix(str(tmp_path) + "/") for p in info.value.problems] == [
        "schedd.yaml:3:11: run_as: no user 'no-such-user-here' on this machine",
        "schedd.yaml:6:66: run_as: no group 'no-such-group' on this machine",
        "schedd.yaml:7:66: run_as must be a user name, or USER:GROUP (got 'two words')",
    ]


# -- schedd as nobody: refused --------------------------------------------------------


def _nobody_python() -> str | None:
    """An interpreter of this Python version that ``nobody`` can execute, or None."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, shutil.which(version, path="/usr/bin:/usr/local/bin")):
        if candidate is None:
            continue
        try:
            probe = subprocess.run(
                [candidate, "-c", "import sys; print(sys.version_info[:2])"],
                user="nobody",
                capture_output=True,
                text=True,
                cwd="/",
            )
        except OSError:  # not executable for nobody
            continue
        if probe.returncode == 0 and probe.stdout.strip() == str(sys.version_info[:2]):
            return candidate
    return None


@pytest.fixture
def as_nobody() -> Iterator[tuple[Path, Any]]:
    python = _nobody_python()
    if python is None:
        pytest.skip("no Python interpreter that nobody may execute")
    work = Path(tempfile.mkdtemp(prefix="schedd-nobody-"))
    work.chmod(0o777)
    site = sysconfig.get_paths()["purelib"]
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins"), site]),
        "HOME": str(work),
    }

    def schedd(*args: str, wait: bool = True) -> Any:
        cmd = [python, "-m", "scheduler.cli", *args]
        if not wait:
            out = (work / "daemon.out").open("ab")
            return subprocess.Popen(cmd, user="nobody", env=env, cwd=work, stdout=out, stderr=out)
        return subprocess.run(
            cmd, user="nobody", env=env, cwd=work, capture_output=True, text=True, timeout=60
        )

    yield work, schedd
    shutil.rmtree(work, ignore_errors=True)


def test_validate_as_non_root_only_warns(as_nobody: tuple[Path, Any]) -> None:
    work, schedd = as_nobody
    (work / "schedd.yaml").write_text(textwrap.dedent(job_yaml("nobody")))
    res = schedd("validate", "--config", "schedd.yaml")
    assert res.returncode == 0, res.stderr
    assert "schedd.yaml: OK, 1 job" in res.stdout
    assert (
        f"{work}/schedd.yaml:7:13: warning: run_as 'nobody' takes effect only when schedd runs"
        f" as root; started as uid {NOBODY.pw_uid} (nobody), the daemon would refuse this file"
    ) in res.stderr


def test_run_once_and_the_daemon_refuse_run_as_when_not_root(
    as_nobody: tuple[Path, Any],
) -> None:
    work, schedd = as_nobody
    (work / "schedd.yaml").write_text(textwrap.dedent(job_yaml("nobody")))
    refusal = (
        f"schedd.yaml:7:13: run_as 'nobody' needs schedd to run as root, and it runs as"
        f" uid {NOBODY.pw_uid} (nobody); start it as root or remove run_as"
    )
    once = schedd("run-once", "who", "--config", "schedd.yaml")
    assert once.returncode == 1 and refusal in once.stderr, once.stderr
    run = schedd("run", "--config", "schedd.yaml", "--state-dir", str(work / "state"))
    assert run.returncode == 1 and refusal in run.stderr, run.stderr
    assert not (work / "state" / "schedd.log").exists()  # refused before anything started


def test_a_reload_that_adds_run_as_is_rejected_when_not_root(
    as_nobody: tuple[Path, Any],
) -> None:
    work, schedd = as_nobody
    config = work / "schedd.yaml"
    config.write_text("jobs:\n  who: {task: shell, every: 1h, params: {command: 'true'}}\n")
    config.chmod(0o666)
    state = work / "state"
    proc = schedd("run", "--config", str(config), "--state-dir", str(state), wait=False)
    try:
        log = state / "schedd.log"
        wait_for(
            lambda: (
                proc.poll() is not None
                or (log.exists() and f"schedd {proc.pid} started" in log.read_text())
            ),
            what="daemon start as nobody",
        )
        assert proc.poll() is None, (work / "daemon.out").read_text()
        config.write_text(textwrap.dedent(job_yaml("nobody")))
        res = schedd("reload", "--state-dir", str(state))
        assert res.returncode == 1
        assert "run_as 'nobody' needs schedd to run as root" in res.stdout + res.stderr
        status = schedd("status", "--state-dir", str(state), "--json")
        assert json.loads(status.stdout)["jobs"] == 1  # the old config keeps running
        assert "reload rejected" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_run_as_task_cannot_find_other_runs_secrets_in_its_memory(
    with_groups: tuple[Runner, Collector], tmp_path: Path
) -> None:
    """Found in review: a task forked from the launcher inherits its heap, which holds
    other runs' requests (env_file values included), freed or not. A run_as task is a
    fresh interpreter instead, so the root run's secret launched just before is not there."""
    runner, col = with_groups
    prefix = "SCHEDDSECRET"
    secret = os.urandom(8).hex()
    text = f"""
    jobs:
      root-job:
        task: shell
        every: 1h
        params: {{command: "true"}}
        env: {{DB_PASSWORD: "{prefix}{secret}"}}
      spy:
        task: python
        every: 1h
        params: {{target: "tests.limit_tasks:scan_memory"}}
        run_as: nobody
    """
    jobs = load(tmp_path, text).jobs
    shell = TaskType("shell", "tests.runner_tasks:noop", "a run with a secret", TaskParams)
    first = runner.launch(build_request(jobs["root-job"], shell, "secret-1", Start(None), {}))
    assert (res := first.wait(30)) is not None and res.status == "success"
    spy_task = TaskType("scan", "tests.limit_tasks:scan_memory", "scan memory", TaskParams)
    spy = dataclasses.replace(jobs["spy"], params={"prefix": prefix})
    res = runner.launch(build_request(spy, spy_task, "spy-1", Start(None), {})).wait(30)
    assert res is not None and res.status == "success", (res, col.out("spy-1", "stderr"))
    seen = json.loads(col.out("spy-1")[0])
    assert secret not in seen


def test_a_run_as_task_s_output_is_streamed_line_by_line(
    with_groups: tuple[Runner, Collector], tmp_path: Path
) -> None:
    """Its interpreter is exec'd with stdout on a pipe: block buffering would hold lines back."""
    runner, col = with_groups
    spec = dataclasses.replace(load(tmp_path, job_yaml("nobody")).jobs["who"], params={})
    task = TaskType("say", "tests.limit_tasks:say_then_sleep", "say, then sleep", TaskParams)
    handle = runner.launch(build_request(spec, task, "streamed-1", Start(None), {}))
    wait_for(lambda: col.out("streamed-1") == ["first line"], 10, "the first line")
    assert handle.wait(0) is None  # still running: the line came while it ran
    res = handle.wait(30)
    assert res is not None and res.status == "success"


def test_a_run_as_task_s_exception_and_exit_code_are_reported(
    with_groups: tuple[Runner, Collector], tmp_path: Path
) -> None:
    runner, col = with_groups
    spec = dataclasses.replace(load(tmp_path, job_yaml("nobody")).jobs["who"], params={})
    failing = TaskType("fail", "tests.runner_tasks:fail", "raise", TaskParams)
    res = runner.launch(build_request(spec, failing, "fails-1", Start(None), {})).wait(30)
    assert res is not None and (res.status, res.exit_code, res.error) == ("failed", 1, "ValueError")
    assert any("Traceback" in line for line in col.out("fails-1", "stderr"))
    exiting = TaskType("exit3", "tests.runner_tasks:exit3", "return 3", TaskParams)
    res = runner.launch(build_request(spec, exiting, "exits-1", Start(None), {})).wait(30)
    assert res is not None and (res.status, res.exit_code) == ("failed", 3)
