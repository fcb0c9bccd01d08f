"""The built-in ``shell``, ``python`` and ``http`` tasks: params validation and real runs.

"Isolated" runs go through ``python -m scheduler.child`` exactly as the runner
launches them (there ``shell`` execs); "in-process" runs take the subprocess path.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from scheduler.child import SPEC_ENV, spec_to_json
from scheduler.plugins import Registry, load_plugins
from scheduler.testing import make_context, run_task_inprocess, run_task_isolated

TASKMODS = Path(__file__).parent / "fixtures" / "taskmods"


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_plugins(strict=True, blocked=())[1]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != SPEC_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(TASKMODS), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def validate(registry: Registry, task: str, params: dict[str, Any]) -> dict[str, Any]:
    model = registry.task_types[task].params.model_validate(params)
    return model.model_dump(mode="json")


def rejected(registry: Registry, task: str, params: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as raised:
        registry.task_types[task].params.model_validate(params)
    return str(raised.value)


# -- params --------------------------------------------------------------------------------


def test_shell_params(registry: Registry) -> None:
    assert validate(registry, "shell", {"command": "echo hi"}) == {
        "command": "echo hi",
        "cwd": None,
        "env": {},
    }
    assert validate(registry, "shell", {"command": ["ls", "-l"], "cwd": "/", "env": {"A": "1"}})[
        "command"
    ] == ["ls", "-l"]
    assert "command must not be empty" in rejected(registry, "shell", {"command": "  "})
    assert "command must not be empty" in rejected(registry, "shell", {"command": []})
    assert "command" in rejected(registry, "shell", {"command": ["ls", 3]})
    assert "Field required" in rejected(registry, "shell", {})
    assert "Extra inputs are not permitted" in rejected(
        registry, "shell", {"command": "x", "cmd": "y"}
    )
    assert "env" in rejected(registry, "shell", {"command": "x", "env": {"A": 1}})
    assert "invalid environment variable name 'A=B'" in rejected(
        registry, "shell", {"command": "x", "env": {"A=B": "1"}}
    )
    assert "cwd must be a non-empty path" in rejected(
        registry, "shell", {"command": "x", "cwd": ""}
    )


def test_python_params(registry: Registry) -> None:
    good = validate(
        registry, "python", {"target": "pkg.mod:func", "args": [1], "kwargs": {"k": "v"}}
    )
    assert good == {"target": "pkg.mod:func", "args": [1], "kwargs": {"k": "v"}}
    assert validate(registry, "python", {"target": "mod:Cls.method"})["args"] == []
    for bad in ("pkg.mod.func", "pkg mod:func", "pkg.mod:", ":func", "1pkg:func"):
        assert "String should match pattern" in rejected(registry, "python", {"target": bad})
    assert "args" in rejected(registry, "python", {"target": "a:b", "args": {"x": 1}})
    assert "Extra inputs" in rejected(registry, "python", {"target": "a:b", "kw": {}})


def test_http_params(registry: Registry) -> None:
    good = validate(
        registry,
        "http",
        {
            "url": "https://example.org/x",
            "method": "post",
            "body": {"a": 1},
            "expect_status": [200, 204],
        },
    )
    assert good["method"] == "POST" and good["timeout"] == 30.0 and good["body"] == {"a": 1}
    assert (
        validate(registry, "http", {"url": "http://h", "expect_status": 404})["expect_status"]
        == 404
    )
    cases = {
        "URL scheme must be http or https": {"url": "ftp://example.org/"},
        "URL has no host": {"url": "http:///path"},
        "must not contain whitespace": {"url": "http://example.org/a b"},
        "invalid URL": {"url": "http://example.org:99999/"},
        "method must be one of": {"url": "http://h", "method": "FETCH"},
        "999 is not an HTTP status code": {"url": "http://h", "expect_status": [200, 999]},
        "must not be an empty list": {"url": "http://h", "expect_status": []},
        "greater than 0": {"url": "http://h", "timeout": 0},
        "invalid header name 'Bad Header'": {"url": "http://h", "headers": {"Bad Header": "x"}},
        "contains a line break": {"url": "http://h", "headers": {"X-A": "a\r\nX-Injected: 1"}},
    }
    for message, params in cases.items():
        assert message in rejected(registry, "http", params), message


# -- shell ---------------------------------------------------------------------------------------


def test_shell_string_runs_via_sh_with_exit_code(registry: Registry) -> None:
    run = run_task_isolated(
        "shell", {"command": "echo out; echo err >&2; exit 3"}, registry=registry, job_id="nightly"
    )
    assert (run.returncode, run.stdout, run.stderr) == (3, "out\n", "err\n")


def test_shell_list_runs_without_a_shell(registry: Registry) -> None:
    run = run_task_isolated(
        "shell", {"command": ["printf", "[%s]\\n", "a b", "$HOME", "*"]}, registry=registry
    )
    assert run.returncode == 0 and run.stdout == "[a b]\n[$HOME]\n[*]\n"


def test_shell_cwd_env_and_run_identity(registry: Registry, tmp_path: Path) -> None:
    params = {
        "command": 'pwd; echo "$GREETING|$SCHEDD_JOB_ID|$SCHEDD_TASK|$SCHEDD_ATTEMPT|$PATH|$PWD"',
        "cwd": str(tmp_path),
        "env": {"GREETING": "hi there"},
    }
    run = run_task_isolated("shell", params, registry=registry, job_id="backup")
    cwd, rest = run.stdout.splitlines()
    assert Path(cwd).resolve() == tmp_path.resolve()
    greeting, job, task_name, attempt, path, pwd = rest.split("|")
    assert (greeting, job, task_name, attempt) == ("hi there", "backup", "shell", "1")
    assert Path(pwd).resolve() == tmp_path.resolve()
    printenv = run_task_isolated(
        "shell", {"command": ["printenv", "PWD"], "cwd": str(tmp_path)}, registry=registry
    )
    assert printenv.stdout == f"{tmp_path.absolute()}\n"  # not the daemon's stale $PWD
    assert path == os.environ["PATH"]  # added on top of, not instead of, the environment


def test_shell_execs_so_the_tree_stays_flat(registry: Registry) -> None:
    _, ctx = make_context("shell", {"command": "echo $$"}, registry=registry)
    proc = subprocess.Popen(
        [sys.executable, "-m", "scheduler.child"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        env=child_env(**{SPEC_ENV: spec_to_json("schedd_plugins.run_shell:run", ctx)}),
        text=True,
    )
    out, _ = proc.communicate(timeout=30)
    assert int(out) == proc.pid


def test_shell_killed_by_signal(registry: Registry, capfd: pytest.CaptureFixture[str]) -> None:
    params = {"command": ["sh", "-c", "kill -TERM $$"]}
    isolated = run_task_isolated("shell", params, registry=registry)
    assert isolated.returncode == -signal.SIGTERM and isolated.signal == "SIGTERM"
    assert isolated.exit_code == 128 + signal.SIGTERM
    assert run_task_inprocess("shell", params, registry=registry).exit_code == 143


def test_shell_restores_sigpipe_and_keeps_stdin_empty(registry: Registry) -> None:
    run = run_task_isolated("shell", {"command": "yes | head -n 1; cat"}, registry=registry)
    assert (run.returncode, run.stdout, run.stderr) == (0, "y\n", "")


def test_shell_in_process_uses_a_subprocess(
    registry: Registry, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    params = {"command": "pwd; echo $X; exit 7", "cwd": str(tmp_path), "env": {"X": "from env"}}
    outcome = run_task_inprocess("shell", params, registry=registry)
    assert outcome.exit_code == 7
    lines = capfd.readouterr().out.splitlines()
    assert Path(lines[0]).resolve() == tmp_path.resolve() and lines[1] == "from env"
    assert Path.cwd() != tmp_path  # the test process did not move


@pytest.mark.parametrize("isolated", [True, False])
def test_shell_cannot_run(
    registry: Registry, capfd: pytest.CaptureFixture[str], tmp_path: Path, isolated: bool
) -> None:
    missing = {"command": ["schedd-no-such-command-xyz", "arg"]}
    not_exec = tmp_path / "script.sh"
    not_exec.write_text("echo hi\n")
    no_dir = {"command": "true", "cwd": str(tmp_path / "gone")}
    if isolated:
        results = [
            (r.exit_code, r.stderr)
            for r in (
                run_task_isolated("shell", p, registry=registry)
                for p in (missing, {"command": [str(not_exec)]}, no_dir)
            )
        ]
    else:
        results = []
        for p in (missing, {"command": [str(not_exec)]}, no_dir):
            code = run_task_inprocess("shell", p, registry=registry).exit_code
            results.append((code, capfd.readouterr().err))
    (c1, e1), (c2, e2), (c3, e3) = results
    assert c1 == 127 and "cannot run 'schedd-no-such-command-xyz'" in e1
    assert c2 == 126 and "Permission denied" in e2
    assert c3 == 1 and "does not exist" in e3


# -- python ----------------------------------------------------------------------------------------


def test_python_task_calls_target_with_args_isolated(registry: Registry) -> None:
    params = {"target": "schedd_test_tasks:add", "args": [2, 3], "kwargs": {"exit_with": 4}}
    run = run_task_isolated("python", params, registry=registry, env=child_env())
    assert (run.returncode, run.stdout) == (4, "sum=5\n")


@pytest.fixture
def taskmods(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TASKMODS))


@pytest.mark.usefixtures("taskmods")
def test_python_task_outcomes(registry: Registry, capfd: pytest.CaptureFixture[str]) -> None:
    def run(target: str, **kw: Any) -> tuple[int, str | None, str, str]:
        out = run_task_inprocess("python", {"target": target, **kw}, registry=registry)
        captured = capfd.readouterr()
        return out.exit_code, out.error, captured.out, captured.err

    assert run("schedd_test_tasks:add", args=[1, 1]) == (0, None, "sum=2\n", "")
    code, error, _, err = run("schedd_test_tasks:fail_plain", kwargs={"message": "kaput"})
    assert (code, error) == (1, "RuntimeError") and "RuntimeError: kaput" in err
    assert run("schedd_test_tasks:returns_dict")[:2] == (0, None)
    code, error, _, err = run("schedd_test_tasks:nothing_here")
    assert code == 127 and "has no attribute 'nothing_here'" in err
    code, _, _, err = run("schedd_no_such_module_xyz:f")
    assert code == 127 and "No module named 'schedd_no_such_module_xyz'" in err
    assert run("schedd_test_tasks:add", args=[1])[:2] == (1, "TypeError")


# -- http ------------------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    seen: list[dict[str, Any]]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.seen.append(  # type: ignore[attr-defined]
            {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
        )
        if self.path == "/ok":
            self._reply(200, b"hello", Set_Cookie="session=abc123", X_Plain="shown")
        elif self.path == "/missing":
            self._reply(404, b"nope")
        elif self.path == "/big":
            self._reply(200, b"a" * 10_000)
        elif self.path == "/binary":
            self._reply(200, b"\x00\x01\x02")
        elif self.path == "/redirect":
            self._reply(302, b"", Location="/ok")
        elif self.path == "/slow":
            time.sleep(2)
            self._reply(200, b"late")
        elif self.path == "/drip":  # each byte well within the socket timeout
            self.send_response(200)
            self.send_header("Content-Length", "40")
            self.end_headers()
            try:
                for _ in range(40):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass  # the client gave up, as it should
        else:
            self._reply(200, body)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _handle


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadingHTTPServer]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def base(server: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch) -> str:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    server.seen.clear()  # type: ignore[attr-defined]
    return f"http://127.0.0.1:{server.server_address[1]}"


def http(
    registry: Registry, capfd: pytest.CaptureFixture[str], **params: Any
) -> tuple[int, str, str]:
    code = run_task_inprocess("http", params, registry=registry).exit_code
    out, err = capfd.readouterr()
    return code, out, err


def test_http_200(registry: Registry, capfd: pytest.CaptureFixture[str], base: str) -> None:
    code, out, err = http(registry, capfd, url=f"{base}/ok")
    assert code == 0 and err == ""
    first, *rest = out.splitlines()
    assert first.startswith(f"GET {base}/ok -> 200 (5 bytes, ") and first.endswith(" ms)")
    assert "< X-Plain: shown" in rest and "< Set-Cookie: [redacted]" in rest
    assert "abc123" not in out
    assert rest[-1] == "hello"


def test_http_404_and_expect_status(
    registry: Registry, capfd: pytest.CaptureFixture[str], base: str
) -> None:
    code, out, err = http(registry, capfd, url=f"{base}/missing")
    assert code == 1 and f"GET {base}/missing -> 404 (4 bytes" in out
    assert f"GET {base}/missing: unexpected status 404 (expected 2xx)" in err
    assert http(registry, capfd, url=f"{base}/missing", expect_status=404)[0] == 0
    assert http(registry, capfd, url=f"{base}/missing", expect_status=[200, 404])[0] == 0
    code, _, err = http(registry, capfd, url=f"{base}/ok", expect_status=[201, 202])
    assert code == 1 and "unexpected status 200 (expected 201 or 202)" in err


def test_http_connection_refused(registry: Registry, capfd: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = http(registry, capfd, url=f"http://127.0.0.1:{port}/x")
    assert code == 1 and out == ""
    assert f"schedd http: GET http://127.0.0.1:{port}/x failed:" in err and "refused" in err


def test_http_json_body_and_secret_headers(
    registry: Registry, capfd: pytest.CaptureFixture[str], base: str, server: ThreadingHTTPServer
) -> None:
    headers = {
        "Authorization": "Bearer s3cr3t",
        "X-Api-Key": "k3y",
        "X-Auth-Token": "t0k",
        "X-Trace": "visible",
    }
    code, out, err = http(
        registry, capfd, url=f"{base}/echo", method="post", headers=headers, body={"a": [1, 2]}
    )
    assert code == 0
    (req,) = server.seen  # type: ignore[attr-defined]
    assert req["method"] == "POST" and json.loads(req["body"]) == {"a": [1, 2]}
    assert req["headers"]["Content-Type"] == "application/json"
    assert req["headers"]["Authorization"] == "Bearer s3cr3t"
    for secret in ("s3cr3t", "k3y", "t0k"):
        assert secret not in out + err
    assert "> Authorization: [redacted]" in out and "> X-Trace: visible" in out
    assert out.rstrip().endswith('{"a": [1, 2]}')


def test_http_text_body_and_custom_content_type(
    registry: Registry, capfd: pytest.CaptureFixture[str], base: str, server: ThreadingHTTPServer
) -> None:
    http(registry, capfd, url=f"{base}/echo", method="PUT", body="plain text")
    http(
        registry,
        capfd,
        url=f"{base}/echo",
        method="PUT",
        body="a=1",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    first, second = server.seen  # type: ignore[attr-defined]
    assert first["body"] == b"plain text" and first["headers"]["Content-Type"].startswith(
        "text/plain"
    )
    assert second["headers"]["Content-Type"] == "application/x-www-form-urlencoded"


def test_http_url_credentials_become_basic_auth_and_are_hidden(
    registry: Registry, capfd: pytest.CaptureFixture[str], base: str, server: ThreadingHTTPServer
) -> None:
    url = base.replace("http://", "http://robot:pa%40ss@") + "/echo?api_key=abc&page=2"
    code, out, err = http(registry, capfd, url=url)
    assert code == 0
    (req,) = server.seen  # type: ignore[attr-defined]
    assert req["headers"]["Authorization"] == "Basic cm9ib3Q6cGFAc3M="  # robot:pa@ss
    assert req["path"] == "/echo?api_key=abc&page=2"
    assert "pa%40ss" not in out + err and "abc" not in out + err
    assert "robot:[redacted]@127.0.0.1" in out and "page=2" in out


def test_http_large_binary_redirect_and_head(
    registry: Registry, capfd: pytest.CaptureFixture[str], base: str
) -> None:
    code, out, _ = http(registry, capfd, url=f"{base}/big")
    assert code == 0 and "-> 200 (10000 bytes" in out
    assert "a" * 4096 + "\n... (5904 more bytes not shown)" in out and "a" * 4097 not in out
    assert "(binary body, 3 bytes, not shown)" in http(registry, capfd, url=f"{base}/binary")[1]
    code, out, _ = http(registry, capfd, url=f"{base}/redirect")
    assert code == 0 and "-> 200 (5 bytes" in out and f"redirected to {base}/ok" in out
    code, out, _ = http(registry, capfd, url=f"{base}/ok", method="HEAD")
    assert code == 0 and "HEAD" in out and "hello" not in out


def test_http_timeout(registry: Registry, capfd: pytest.CaptureFixture[str], base: str) -> None:
    started = time.monotonic()
    code, _, err = http(registry, capfd, url=f"{base}/slow", timeout=0.3)
    assert code == 1 and "failed: timed out" in err
    assert time.monotonic() - started < 1.5
    started = time.monotonic()
    code, _, err = http(registry, capfd, url=f"{base}/drip", timeout=0.5)
    assert code == 1 and "body still downloading after the timeout" in err
    assert time.monotonic() - started < 1.5  # the whole drip would take 2 s


def test_http_isolated(registry: Registry, base: str) -> None:
    run = run_task_isolated(
        "http", {"url": f"{base}/missing", "expect_status": 404}, registry=registry
    )
    assert run.returncode == 0 and f"GET {base}/missing -> 404 (4 bytes" in run.stdout


def test_plugin_modules_import_cheaply() -> None:
    code = (
        "import sys, schedd_plugins.shell, schedd_plugins.python, schedd_plugins.http\n"
        "import schedd_plugins.run_shell, schedd_plugins.run_python, schedd_plugins.run_http\n"
        "lazy = ('subprocess', 'urllib.request', 'http.client')\n"
        "print(sorted(m for m in lazy if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert proc.stdout.strip() == "[]"


def test_run_modules_import_only_the_standard_library() -> None:
    """A built-in task's target is what a run's fresh fork imports (or the launcher
    preloads): its metadata module's pydantic and pluggy must stay out of it."""
    code = (
        "import sys, schedd_plugins.run_shell, schedd_plugins.run_python, schedd_plugins.run_http\n"
        "heavy = ('pydantic', 'pluggy', 'yaml', 'scheduler.hookspecs', 'scheduler.params',\n"
        "         'schedd_plugins.shell', 'schedd_plugins.python', 'schedd_plugins.http')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert proc.stdout.strip() == "[]"
