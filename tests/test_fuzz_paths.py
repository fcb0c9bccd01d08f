"""Every path derived from a job id stays inside the state dir (issue 7, item 4).

A job id becomes file names: ``STATE_DIR/logs/<id>.log`` (and its rotated
siblings), the ledger's ``log_path``, and the file ``schedd logs`` opens. Any
id the config accepts must name a plain file in ``logs/``: no separator, no
``..``, not absolute, no leading dot; any other id is refused with an error
located at the id.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.cli import main
from scheduler.config import JOB_ID_PATTERN, load_config
from scheduler.errors import ConfigError
from scheduler.logs import JobLogs
from scheduler.plugins import load_plugins

_, REGISTRY = load_plugins()

TRICKY = [
    "..", ".", "../x", "../../etc/passwd", "/etc/passwd", "a/../../b", "a/b", "~root", "~",
    ".hidden", "a\\..\\b", "a\0b", "a\nb", "a b", " a", "a.", "a..b", "a.log", "-rf", "_x",
    "con", "NUL", "x" * 128, "x" * 129, "ä", "a\u202eb", "a\u200b", "\udcff", "1", "0x1",
    "a:b", "a*", "${HOME}", "$(id)", "%2e%2e", "..\u2215x", "a\x7f",
]  # fmt: skip
ids = (
    st.sampled_from(TRICKY)
    | st.from_regex(JOB_ID_PATTERN, fullmatch=True)
    | st.text(st.characters(codec="utf-8"), min_size=1, max_size=20)
    | st.text(st.sampled_from("./\\~a-_0 \0"), min_size=1, max_size=8)
)


def config_for(job_id: str) -> str:
    """A one-job config with ``job_id`` written as a JSON (hence YAML) string."""
    key = json.dumps(job_id)  # escapes \\0, \\n, surrogates: YAML reads them back
    return f"jobs:\n  {key}:\n    task: shell\n    every: 1h\n    params: {{command: 'true'}}\n"


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ids)
def test_accepted_ids_name_files_inside_the_logs_dir(tmp_path: Path, job_id: str) -> None:
    path = tmp_path / "schedd.yaml"
    path.write_text(config_for(job_id), encoding="utf-8", errors="surrogatepass")
    try:
        config = load_config(path, REGISTRY)
    except ConfigError as exc:
        assert not re.fullmatch(JOB_ID_PATTERN, job_id), exc
        located = [p for p in exc.problems if p.line == 2 and p.col == 3]
        assert located, exc.problems  # at the id itself
        assert any("job id" in p.message for p in located), exc.problems
        return
    assert list(config.jobs) == [job_id]
    assert re.fullmatch(JOB_ID_PATTERN, job_id)
    logs_dir = tmp_path / "state" / "logs"
    log = JobLogs(logs_dir).path(job_id)
    assert log.parent == logs_dir and log.name == f"{job_id}.log"
    relative = PurePosixPath(f"logs/{job_id}.log")  # the ledger's log_path
    assert not relative.is_absolute() and ".." not in relative.parts
    assert relative.parts == ("logs", f"{job_id}.log")
    assert not log.name.startswith(".")


@pytest.mark.parametrize("job_id", ["a..b", "A.-_", "x" * 128, "a.log", "1"])
def test_log_files_of_odd_but_valid_ids_stay_in_logs(tmp_path: Path, job_id: str) -> None:
    """The real writer with ids that look like paths: the one file it creates is
    ``logs/<id>.log``, and ``schedd logs`` reads exactly that file back."""
    state = tmp_path / "state"
    logs = JobLogs(state / "logs")
    logs.write(job_id, "1a2b3c4d5e6f70809", "stdout", "hello")
    logs.close()
    files = [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()]
    assert files == [Path("state", "logs", f"{job_id}.log")]
    out = CliRunner().invoke(main, ["logs", job_id, "--state-dir", str(state)])
    assert out.exit_code == 0 and out.output.rstrip().endswith("hello"), out.output


@pytest.mark.parametrize("job_id", ["..", "../x", "/etc/passwd", ".hidden", "a/b", "-x", "a\\b"])
def test_schedd_logs_refuses_ids_that_would_escape(tmp_path: Path, job_id: str) -> None:
    (tmp_path / "state" / "logs").mkdir(parents=True)
    argv = ["logs", "--state-dir", str(tmp_path / "state"), "--", job_id]
    out = CliRunner().invoke(main, argv)
    assert out.exit_code in (1, 2) and "is not a job id" in out.output, out.output
    assert "Traceback" not in out.output
