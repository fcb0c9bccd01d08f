"""Secrets: the run's environment allow-list, ``env_file:``, redaction, and who may
use the control socket; with real daemons, CLI processes and files."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler import envfile, redact
from scheduler.envfile import EnvFileError
from scheduler.statedir import base_env
from tests.helpers import ROOT, Daemon, alive, daemon, schedd, wait_for

__all__ = ["daemon"]  # the fixture

ENV_SECRET = "tok-env-1234567"  # API_TOKEN in the job's env
FILE_SECRET = "pw-from-file-98765"  # DB_PASSWORD in the env file
FILE_PLAIN = "file-only-value"  # FILE_ONLY in the env file: every env_file value is secret
DAEMON_ONLY = "daemon-only-4242"  # FOO_TOKEN in the daemon's own environment
SECRETS = (ENV_SECRET, FILE_SECRET, FILE_PLAIN, DAEMON_ONLY)

#: Dumps the run's environment to a file (not stdout), then prints its secrets.
DUMP = """\
import json, os, sys
with open(sys.argv[1], "w") as f:
    json.dump(dict(os.environ), f)
print("token", os.environ.get("API_TOKEN"), "color", os.environ.get("COLOR"))
print("pw", os.environ.get("DB_PASSWORD"), "file", os.environ.get("FILE_ONLY"), file=sys.stderr)
print("daemon", os.environ.get("FOO_TOKEN"))
"""

ENV_FILE = f"""\
# secrets for the show job
export DB_PASSWORD='{FILE_SECRET}'
FILE_ONLY="{FILE_PLAIN}"
OTHER=from-the-file
SCHEDD_JOB_ID=not-allowed-to-win
"""


def cli(state: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*schedd(*args), "--state-dir", str(state)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


def history(d: Daemon, job: str) -> list[dict[str, Any]]:
    res = cli(d.state, "history", job, "--json")
    assert res.returncode == 0, res.stderr
    rows: list[dict[str, Any]] = json.loads(res.stdout)
    return rows


def trigger_and_wait(d: Daemon, job: str, runs: int) -> dict[str, Any]:
    """Trigger ``job`` and return its record once the ledger holds ``runs`` ended runs."""
    res = cli(d.state, "trigger", job)
    assert res.returncode == 0, res.stderr

    def ended() -> bool:
        return len([r for r in history(d, job) if r["status"] != "running"]) >= runs

    wait_for(ended, what=f"run {runs} of {job} recorded")
    return history(d, job)[0]


def write_private(path: Path, text: str, mode: int = 0o600) -> None:
    path.write_text(text)
    path.chmod(mode)


# ---- the env file format ---------------------------------------------------------------
def test_env_file_format() -> None:
    text = textwrap.dedent(
        """\

        # a comment
           # an indented comment
        PLAIN=a b  c#not-a-comment $HOME `id`
        export EXPORTED=yes
        SPACED = around the equals sign
        EMPTY=
        SINGLE='it is $HOME \\n' # a comment after the quote
        DOUBLE="say \\"hi\\"\\tthen\\nnext \\\\ \\q $HOME"
        HASH="#1"
        """
    )
    assert envfile.parse(text, "x.env") == {
        "PLAIN": "a b  c#not-a-comment $HOME `id`",
        "EXPORTED": "yes",
        "SPACED": "around the equals sign",
        "EMPTY": "",
        "SINGLE": "it is $HOME \\n",
        "DOUBLE": 'say "hi"\tthen\nnext \\ \\q $HOME',
        "HASH": "#1",
    }


def test_env_file_quotes_are_exact() -> None:
    env = envfile.parse("A='x # y'\nB=\"\"\nC='  padded  '\n", "x.env")
    assert env == {"A": "x # y", "B": "", "C": "  padded  "}


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("A=1\nsecret-in-a-line-without-equals\n", 2, "expected KEY=VALUE"),
        ("A=1\n\n9LIVES=secretvalue\n", 3, "invalid variable name"),
        ("my-key=secretvalue\n", 1, "invalid variable name"),
        ("A='secretvalue\n", 1, "A: unterminated single quote"),
        ('A="secretvalue\n', 1, "A: unterminated double quote"),
        ("A='secret' value\n", 1, "A: unexpected text after the closing quote"),
        ("A=1\nB=2\nA=secretvalue\n", 3, "A is set twice (first on line 1)"),
    ],
)
def test_env_file_errors_are_located_and_never_quote_the_line(
    text: str, line: int, message: str
) -> None:
    with pytest.raises(EnvFileError) as info:
        envfile.parse(text, "/etc/x.env")
    assert info.value.line == line
    assert str(info.value).startswith(f"/etc/x.env:{line}: {message}")
    assert "secret" not in str(info.value).replace("/etc/x.env", "")


def test_env_file_read_errors(tmp_path: Path) -> None:
    with pytest.raises(EnvFileError, match=r"cannot read env_file .*missing\.env: No such file"):
        envfile.read(str(tmp_path / "missing.env"))
    binary = tmp_path / "bin.env"
    binary.write_bytes(b"A=1\nB=\xff\xfe\n")
    with pytest.raises(EnvFileError, match=r"bin\.env:2: not UTF-8 text"):
        envfile.read(str(binary))
    nul = tmp_path / "nul.env"
    nul.write_bytes(b'A="x\\0"\nB=a\x00b\n')
    with pytest.raises(EnvFileError, match=r"nul\.env:2: B: the value contains a NUL"):
        envfile.read(str(nul))
    big = tmp_path / "big.env"
    big.write_text("A=" + "x" * envfile.MAX_SIZE)
    with pytest.raises(EnvFileError, match="larger than"):
        envfile.read(str(big))


def test_loose_permissions_warning(tmp_path: Path) -> None:
    path = tmp_path / "s.env"
    write_private(path, "A=1\n")
    assert envfile.loose_permissions(str(path)) is None
    for mode, who in ((0o640, "its group"), (0o604, "other users"), (0o644, "group and others")):
        path.chmod(mode)
        assert f"readable by {who} (mode {mode:04o})" in str(envfile.loose_permissions(str(path)))


# ---- what counts as secret -----------------------------------------------------------
def test_secret_names_values_and_masking() -> None:
    secret = ["GITHUB_TOKEN", "db_password", "X-Api-Key", "Authorization", "SESSION_ID", "Cookie"]
    secret += ["AWS_SECRET_ACCESS_KEY", "PGPASSWD", "PRIVATE_PEM", "SMTP_PASS", "credentials"]
    assert all(redact.is_secret_key(n) for n in secret)
    assert not any(redact.is_secret_key(n) for n in ("HOME", "COLOR", "URL", "LANG", 3))
    env = {"API_TOKEN": "abcd", "COLOR": "blue", "PORT_KEY": 8080, "AUTH_OFF": True}
    assert redact.env_secrets(env) == ["abcd", "8080"]
    assert redact.redact_env({"API_TOKEN": "abcd", "COLOR": "blue", "X": "y"}, ["X"]) == {
        "API_TOKEN": "***",
        "COLOR": "blue",
        "X": "***",
    }
    params = {
        "url": "https://user:url-password@example.com/x",
        "headers": {"Authorization": "Bearer abcdef", "Accept": "text/plain"},
        "kwargs": {"api": {"private": ["nested-1", "nested-2"]}, "n": 5},
        "env": {"MY_SECRET": "shell-env"},
    }
    assert sorted(redact.params_secrets(params)) == sorted(
        ["url-password", "Bearer abcdef", "nested-1", "nested-2", "shell-env"]
    )
    masker = redact.Masker(["abc", "secret", "secret-longer"])  # "abc": too short to mask
    assert masker.mask("abc secret secret-longer") == "abc *** ***"
    assert not redact.Masker(["no"]) and redact.Masker(["no"]).mask("no") == "no"
    pem = "-----BEGIN KEY-----\nMIIEvQIBADANBg\n-----END KEY-----"  # output is masked per line
    assert redact.Masker([pem]).mask("got MIIEvQIBADANBg here") == "got *** here"


# ---- config: env_file at load --------------------------------------------------------
def validate(config: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "validate", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=30,
    )


def test_validate_reads_env_files_relative_to_the_config(tmp_path: Path) -> None:
    conf_dir = tmp_path / "conf"
    (conf_dir / "secrets").mkdir(parents=True)
    write_private(conf_dir / "secrets" / "ok.env", f"DB_PASSWORD={FILE_SECRET}\n")
    (conf_dir / "secrets" / "open.env").write_text("A=1\n")
    (conf_dir / "secrets" / "open.env").chmod(0o644)
    write_private(conf_dir / "secrets" / "bad.env", f"A=1\n{FILE_SECRET}\n")
    config = conf_dir / "schedd.yaml"
    config.write_text(
        textwrap.dedent(
            """\
            defaults:
              env_file: secrets/ok.env
            jobs:
              uses-defaults:
                task: shell
                every: 1h
                params: {command: 'true'}
              opts-out:
                task: shell
                every: 1h
                env_file: null
                params: {command: 'true'}
              open:
                task: shell
                every: 1h
                env_file: secrets/open.env
                params: {command: 'true'}
            """
        )
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ok = validate(config, elsewhere)
    assert ok.returncode == 0, ok.stderr
    assert (
        f"{config}:16:15: warning: env_file {conf_dir}/secrets/open.env is readable by "
        "group and others (mode 0644); it holds secrets: chmod 600 it"
    ) in ok.stderr
    assert "ok.env" not in ok.stderr  # a private file: no warning

    from scheduler.config import load_config
    from scheduler.plugins import load_plugins

    jobs = load_config(config, load_plugins()[1]).jobs
    assert jobs["uses-defaults"].env_file == str(conf_dir / "secrets" / "ok.env")
    assert jobs["opts-out"].env_file is None
    assert FILE_SECRET not in repr(jobs["uses-defaults"])

    text = config.read_text()
    config.write_text(text.replace("secrets/open.env", "secrets/bad.env"))
    bad = validate(config, elsewhere)
    assert bad.returncode == 1
    assert bad.stderr.splitlines()[0] == (
        f"{conf_dir}/secrets/bad.env:2: expected KEY=VALUE (env_file at {config}:16:15)"
    )
    config.write_text(text.replace("secrets/open.env", "secrets/none.env"))
    missing = validate(config, elsewhere)
    assert missing.returncode == 1
    assert missing.stderr.splitlines()[0] == (
        f"{config}:16:15: cannot read env_file {conf_dir}/secrets/none.env: "
        "No such file or directory"
    )
    for res in (ok, bad, missing):
        assert FILE_SECRET not in res.stdout + res.stderr


def test_config_errors_never_show_secret_values(tmp_path: Path) -> None:
    long_secret = "9" * 75  # messages shorten long values: hide that form too
    config = tmp_path / "schedd.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            jobs:
              call:
                task: http
                every: 1h
                params:
                  url: https://example.com/
                  headers: {{Authorization: 987654321, X-Auth-Token: {long_secret}}}
                  timeout: 0
              run:
                task: shell
                every: 1h
                env: {{DB_PASSWORD: 2031-01-01, COLOR: [1]}}
                params: {{command: 'true', env: {{API_KEY: 12345}}, cwd: 5}}
              py:
                task: python
                every: 1h
                params: {{target: 'a:b', kwargs: {{token: {{x: 1}}}}, args: 7}}
            """
        )
    )
    res = validate(config, tmp_path)
    assert res.returncode == 1
    out = res.stdout + res.stderr
    for value in ("987654321", "2031-01-01", "12345", long_secret[:20]):
        assert value not in out
    assert "params.headers.Authorization must be a string (got ***)" in out
    assert "env.DB_PASSWORD must be a string, number or true/false (got ***)" in out
    assert "params.env.API_KEY must be a string (got ***)" in out
    assert "params.headers.X-Auth-Token must be a string (got ***...)" in out
    # values that are not secret are still shown, to help
    assert "params.timeout must be greater than 0 (got 0)" in out
    assert "params.cwd must be a string (got 5)" in out


# ---- a real daemon and run-once --------------------------------------------------------
@pytest.fixture
def secret_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    monkeypatch.setenv("FOO_TOKEN", DAEMON_ONLY)  # the daemon's own: must not reach runs
    write_private(tmp_path / "secrets.env", ENV_FILE)
    (tmp_path / "dump.py").write_text(DUMP)
    out = tmp_path / "env.json"
    config = f"""
        defaults:
          env_file: secrets.env
        jobs:
          show:
            task: shell
            every: 1d
            env: {{API_TOKEN: {ENV_SECRET}, COLOR: blue, OTHER: from-the-job}}
            params: {{command: ['{sys.executable}', '{tmp_path / "dump.py"}', '{out}']}}
          boom:
            task: python
            every: 1d
            env_file: null
            env: {{API_TOKEN: {ENV_SECRET}}}
            params: {{target: 'builtins:int', args: ['{ENV_SECRET}']}}
    """
    yield {"config": config, "out": out}


def test_runs_get_real_secrets_and_nothing_shows_them(
    daemon: Callable[..., Daemon], secret_setup: dict[str, Any], tmp_path: Path
) -> None:
    d = daemon(secret_setup["config"]).start()
    out: Path = secret_setup["out"]
    record = trigger_and_wait(d, "show", 1)
    assert record["status"] == "success", record

    # The run got the real values, and exactly the documented environment.
    got = json.loads(out.read_text())
    assert got["API_TOKEN"] == ENV_SECRET
    assert got["DB_PASSWORD"] == FILE_SECRET and got["FILE_ONLY"] == FILE_PLAIN
    assert got["OTHER"] == "from-the-job"  # job env beats the env file
    assert got["SCHEDD_JOB_ID"] == "show"  # SCHEDD_* beat both
    assert "FOO_TOKEN" not in got
    run_vars = {"SCHEDD_JOB_ID", "SCHEDD_RUN_ID", "SCHEDD_SCHEDULED_FOR", "SCHEDD_ATTEMPT"}
    expected = (
        set(base_env(os.environ))
        | set(envfile.parse(ENV_FILE, "x"))
        | {"API_TOKEN", "COLOR", "OTHER"}
        | run_vars
        | {"SCHEDD_TASK"}  # the shell task's own
    )
    assert set(got) - {"LC_CTYPE"} == expected  # (Python may coerce a C locale)
    assert {k: got[k] for k in base_env(os.environ)} == base_env(os.environ)

    # The task printed its secrets: the job log has *** instead.
    log = d.job_log("show")
    assert "stdout: token *** color blue" in log
    assert "stderr: pw *** file ***" in log
    assert "stdout: daemon None" in log

    # An exception quoting a secret: its traceback is masked too.
    boom = trigger_and_wait(d, "boom", 1)
    assert boom["status"] == "failed" and boom["error"] == "ValueError"
    assert "invalid literal for int() with base 10: '***'" in d.job_log("boom")

    # run-once: the same environment and the same masking, on the terminal.
    out.unlink()
    once = subprocess.run(
        schedd("run-once", "show", "--config", str(d.config)),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert once.returncode == 0, once.stderr
    assert "token *** color blue" in once.stdout and "pw *** file ***" in once.stderr
    assert json.loads(out.read_text())["DB_PASSWORD"] == FILE_SECRET

    # Nothing schedd prints or stores shows a secret.
    shown = [once.stdout, once.stderr, d.output()]
    for args in (
        ("status",),
        ("status", "--json"),
        ("jobs",),
        ("jobs", "--json"),
        ("history", "--json"),
        ("logs", "show"),
        ("logs", "boom"),
    ):
        res = cli(d.state, *args)
        assert res.returncode == 0, (args, res.stderr)
        shown += [res.stdout, res.stderr]
    offline = subprocess.run(
        schedd("jobs", "--config", str(d.config), "--json"),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    checked = validate(d.config, tmp_path)
    assert checked.returncode == 0, checked.stderr
    shown += [offline.stdout, offline.stderr, checked.stdout, checked.stderr]
    stored = [p for p in d.state.rglob("*") if p.is_file()]  # logs, ledger, its WAL
    assert any(p.name == "ledger.db" for p in stored) and len(stored) >= 4
    for secret in SECRETS:
        for text in shown:
            assert secret not in text
        for path in stored:
            assert secret.encode() not in path.read_bytes(), path


def test_env_file_is_reread_per_run_and_a_broken_one_fails_the_run(
    daemon: Callable[..., Daemon], secret_setup: dict[str, Any], tmp_path: Path
) -> None:
    secrets = tmp_path / "secrets.env"
    secrets.chmod(0o640)
    d = daemon(secret_setup["config"]).start()
    out: Path = secret_setup["out"]
    assert f"warning: env_file {secrets} is readable by its group (mode 0640)" in d.daemon_log()
    assert trigger_and_wait(d, "show", 1)["status"] == "success"
    assert json.loads(out.read_text())["DB_PASSWORD"] == FILE_SECRET

    # A rotated secret is used by the next run, without a reload.
    rotated = "rotated-secret-5555"
    write_private(secrets, ENV_FILE.replace(FILE_SECRET, rotated))
    assert trigger_and_wait(d, "show", 2)["status"] == "success"
    assert json.loads(out.read_text())["DB_PASSWORD"] == rotated
    assert "reload" not in d.daemon_log()

    # Gone or broken at run time: the run is recorded failed, saying why; the daemon goes on.
    secrets.unlink()
    gone = trigger_and_wait(d, "show", 3)
    assert gone["status"] == "failed"
    assert gone["reason"] == (
        f"not started: cannot read env_file {secrets}: No such file or directory"
    )
    assert f"failed in 0.000s: not started: cannot read env_file {secrets}" in d.daemon_log()
    write_private(secrets, f"A=1\n{rotated}\n")
    broken = trigger_and_wait(d, "show", 4)
    assert broken["status"] == "failed"
    assert broken["reason"] == f"not started: {secrets}:2: expected KEY=VALUE"
    assert f"not started: {secrets}:2: expected KEY=VALUE" in d.job_log("show")
    assert d.proc is not None and alive(d.proc.pid)

    # A reload rejected for a secret-looking value does not echo it (reload, status, log).
    write_private(secrets, ENV_FILE)
    params = "{url: 'https://x/', headers: {X-Api-Key: 31415926}}"
    job = f"  headers_job: {{task: http, every: 1h, params: {params}}}"
    d.config.write_text(f"{d.config.read_text()}{job}\n")
    res = cli(d.state, "reload")
    assert res.returncode == 1
    assert "params.headers.X-Api-Key must be a string (got ***)" in res.stderr
    status = cli(d.state, "status")
    assert "(got ***)" in status.stdout
    for text in (res.stdout, res.stderr, status.stdout, d.daemon_log(), d.output()):
        assert "31415926" not in text
        assert rotated not in text and FILE_SECRET not in text


# ---- the control socket against a client of another user ---------------------------
NOBODY = 65534


def _python_for_nobody() -> tuple[str, dict[str, str]] | None:
    """An interpreter user ``nobody`` can run the CLI with (this venv may live in a
    0700 home): ours, else the system's with our packages on PYTHONPATH."""
    import click

    site = str(Path(click.__file__).parent.parent)
    for exe, path in ((sys.executable, str(ROOT)), ("/usr/bin/python3", f"{ROOT}:{site}")):
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": path, "HOME": "/", "LANG": "C.UTF-8"}
        try:
            probe = subprocess.run(
                [exe, "-c", "import click, scheduler.cli_control"],
                user=NOBODY,
                group=NOBODY,
                extra_groups=[],
                env=env,
                cwd="/",
                capture_output=True,
                timeout=30,
            )
        except OSError:
            continue
        if probe.returncode == 0:
            return exe, env
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as nobody")
def test_status_as_another_user_is_refused_and_the_daemon_lives_on() -> None:
    found = _python_for_nobody()
    if found is None:
        pytest.skip("no Python interpreter that user nobody can run with schedd importable")
    exe, env = found
    # pytest's tmp dirs are 0700: this one is traversable, so only schedd's own fences count.
    base = Path(tempfile.mkdtemp(prefix="schedd-nobody-"))
    try:
        base.chmod(0o755)
        d = Daemon(
            base, "jobs:\n  a:\n    task: shell\n    every: 1d\n    params: {command: 'true'}\n"
        )
        d.start()
        sock = d.state / "control.sock"
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert stat.S_IMODE(d.state.stat().st_mode) == 0o700

        def status_as_nobody() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [exe, "-m", "scheduler.cli", "status", "--state-dir", str(d.state)],
                user=NOBODY,
                group=NOBODY,
                extra_groups=[],
                env=env,
                cwd="/",
                capture_output=True,
                text=True,
                timeout=30,
            )

        # The 0700 state dir already stops another user.
        fenced = status_as_nobody()
        assert fenced.returncode == 1
        assert fenced.stderr.strip() == (
            f"schedd: permission denied on {sock}: the daemon belongs to another user"
        )
        # With the modes loosened, the kernel-checked peer credentials still refuse.
        d.state.chmod(0o755)
        sock.chmod(0o666)
        refused = status_as_nobody()
        assert refused.returncode == 1
        assert refused.stderr.strip() == (
            f"schedd: permission denied: uid {NOBODY} may not control this daemon"
        )
        assert "refused a connection from pid" in d.daemon_log()
        assert f"uid {NOBODY} gid {NOBODY}" in d.daemon_log()
        # The daemon is unharmed and still answers its own user.
        ok = cli(d.state, "status", "--json")
        assert ok.returncode == 0, ok.stderr
        assert d.proc is not None and json.loads(ok.stdout)["pid"] == d.proc.pid
        d.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
