"""The fast paths behind large configs give exactly what the reporting paths give.

Loading 100,000 jobs goes through shortcuts (bench/scale_bench.py): YAML values
from parse events instead of nodes, positions worked out only when asked, a
lean per-job validation, H expressions filled in from a template, and jobs put
into APScheduler in bulk. Each shortcut must agree with the path it stands in
for, on valid input and invalid input alike.
"""

from __future__ import annotations

import gc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import cron, triggers, yamlsrc
from scheduler.apsched import Clock
from scheduler.config import Config, JobSpec, load_config
from scheduler.config_load import Loader
from scheduler.cron import TriggerError
from scheduler.errors import ConfigError
from scheduler.plugins import load_plugins

json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=6)
    | st.dates()
    | st.datetimes(timezones=st.just(UTC)),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=25,
)


def _node_build(text: str) -> yamlsrc.Source:
    """The reporting path: compose, then the careful build."""
    src = yamlsrc.Source("f.yaml")
    root = yamlsrc._compose(text)
    src._locator = yamlsrc._Locator(root, text) if root is not None else None
    if root is not None:
        src.data = yamlsrc._Builder(src, text).node(root, (), 0)
    return src


@settings(max_examples=300, deadline=None)
@given(json_like, st.booleans())
def test_the_event_pass_builds_what_the_node_builds_do(value: object, flow: bool) -> None:
    text = yaml.safe_dump(value, default_flow_style=flow, allow_unicode=True)
    src = yamlsrc.parse_text(text, "f.yaml")
    assert src._from_events  # nothing here needs nodes
    careful = _node_build(text)
    assert careful.problems == [] and src.problems == []
    assert repr(src.data) == repr(careful.data) == repr(yaml.safe_load(text))
    root = yamlsrc._compose(text)
    if root is not None:
        assert repr(yamlsrc._Fast(text).build(root, 0)) == repr(careful.data)


def test_positions_of_an_event_parsed_file_are_found_when_asked() -> None:
    text = (
        "timezone: UTC\njobs:\n  a:\n    every: 1e3\n    retries: 0x1F\n"
        "  b: {cron: '0 5 * * *', at: 2099-01-01 10:00:00}\n"
    )
    src = yamlsrc.parse_text(text, "f.yaml")
    assert src._from_events and src._locator is None
    assert src.key_lines(("jobs",)) == {"a": 3, "b": 6}
    assert src.key_line(("jobs", "b")) == 6
    assert src._locator is None  # the lines above were recorded by the event pass
    jobs = src.data["jobs"]
    assert src.written(jobs["a"], "every", ("jobs", "a", "every")) == "1e3"
    assert src.written(jobs["a"], "retries", ("jobs", "a", "retries")) == "0x1F"
    assert src.written(jobs["b"], "at", ("jobs", "b", "at")) == "2099-01-01 10:00:00"
    assert src._locator is None
    assert src.values[("jobs", "b", "cron")] == yamlsrc.Loc(6, 13, "0 5 * * *", 14)
    assert src._locator is not None  # composed on demand


@pytest.mark.parametrize(
    "text",
    [
        "base: &b {x: 1}\nc:\n  <<: *b\n",  # anchors and merges need nodes
        "a: !custom 5\n",
        "a: 1\na: 2\n",
        "a: !!python/name:os.system\n",
        "[" * 120 + "]" * 120,
    ],
)
def test_files_the_event_pass_cannot_finish_go_through_nodes(text: str) -> None:
    src = yamlsrc.parse_text(text, "f.yaml")
    assert not src._from_events
    careful = _node_build(text) if not src.fatal else src
    assert repr(src.data) == repr(careful.data)


def test_a_large_load_freezes_what_it_built_and_a_small_one_does_not() -> None:
    if not gc.isenabled():  # pragma: no cover - e.g. under a profiler
        pytest.skip("the collector is off")
    before = gc.get_freeze_count()
    with yamlsrc.gc_paused():
        small: list[list[int]] = [[] for _ in range(1000)]
    assert gc.get_freeze_count() == before
    with yamlsrc.gc_paused():
        large: list[list[int]] = [[] for _ in range(yamlsrc.FREEZE_ABOVE + 1000)]
    assert gc.get_freeze_count() >= before + len(large)
    assert gc.isenabled()
    gc.unfreeze()
    del small, large


# ---- per-job validation: fast_job against job() ----------------------------------------

KINDS = [
    "cron: 'H {h} * * *'",
    "cron: '*/5 {h} * * 1-5'",
    "every: {m}m",
    "every: {s}",
    "every: 1.5e+3",
    "at: 2099-06-01 0{d}:30:00",
    "cron: '@daily'",
]
EXTRAS = [
    "retries: 2",
    "timeout: 5m",
    "overlap: queue",
    "env: {{A: 1, B: true}}",
    "enabled: false",
    "timezone: Europe/Berlin",
    "description: job {i}",
    "catchup_window: 1h",
]
PARAMS = [
    "task: shell\n    params: {{command: 'echo {i}'}}",
    "task: shell\n    params: {{command: [echo, '{i}'], env: {{X: y}}}}",
    "task: http\n    params: {{url: 'http://127.0.0.1/{i}', expect_status: [200, 204]}}",
    "task: http\n    params: {{url: 'ftp://x/{i}'}}",  # invalid: reported by job()
    "task: nope",  # unknown task: reported by job()
]


_SHELL = "task: shell\n    params: {command: x}"


def _config(n: int, with_defaults: bool) -> str:
    lines = ["timezone: America/New_York"]
    if with_defaults:
        lines += ["defaults:", "  retries: 1", "  every: 10m", "  env: {BASE: '1'}"]
    lines.append("jobs:")
    for i in range(n):
        lines.append(f"  job-{i}:")
        lines.append("    " + PARAMS[i % len(PARAMS)].format(i=i))
        if not (with_defaults and i % 4 == 0):
            lines.append(
                "    " + KINDS[i % len(KINDS)].format(h=i % 24, m=i % 50 + 1, s=i + 60, d=i % 10)
            )
        for k in range(i % 3):
            lines.append("    " + EXTRAS[(i + k) % len(EXTRAS)].format(i=i))
    return "\n".join(lines) + "\n"


def _described(config: Config) -> list[tuple[Any, ...]]:
    """Every field of every job; schedules by what they say (intervals are not shared
    between separate loads)."""
    fields = [n for n in JobSpec.__slots__ if n != "schedule"]
    return [(*(getattr(j, n) for n in fields), j.schedule.describe()) for j in config.jobs.values()]


@pytest.mark.parametrize("with_defaults", [False, True])
def test_fast_job_gives_what_job_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_defaults: bool
) -> None:
    _, registry = load_plugins()
    path = tmp_path / "schedd.yaml"
    path.write_text(_config(400, with_defaults))  # more than _MANY_JOBS

    def outcome() -> Any:
        try:
            return _described(load_config(path, registry))
        except ConfigError as exc:
            return [str(p) for p in exc.problems]

    fast = outcome()
    monkeypatch.setattr(Loader, "fast_job", lambda *_args: None)
    assert outcome() == fast
    assert len(fast) > 100  # the invalid jobs are reported, all of them


def test_fast_job_gives_what_job_gives_for_valid_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, registry = load_plugins()
    path = tmp_path / "schedd.yaml"
    text = _config(300, True).replace("ftp://", "http://").replace("task: nope", _SHELL)
    path.write_text(text)
    fast = load_config(path, registry)
    monkeypatch.setattr(Loader, "fast_job", lambda *_args: None)
    slow = load_config(path, registry)
    assert _described(fast) == _described(slow)
    assert [str(w) for w in fast.warnings] == [str(w) for w in slow.warnings]
    assert len(fast.jobs) == 300


# ---- H expressions ------------------------------------------------------------------

PIECES = ["H", "h", "H/5", "H/90", "H(1-5)", "H(3-1)", "H(mon-fri)", "H(0-59)/7", "*", "*/5"]
PIECES += ["1-5", "1,H", "H,2", "mon", "5", "H/0", "H(1-99)", "Hx", "H(jan-mar)/2", "H/30"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PIECES), min_size=4, max_size=7), st.integers(0, 99))
def test_h_expressions_expand_from_a_template_as_parse_does(fields: list[str], job: int) -> None:
    expr = " ".join(fields)
    if not cron.has_hash(expr):
        return
    job_id = f"job-{job}"
    try:
        parsed = cron.parse(expr, job_id)
        expected: tuple[Any, ...] = ("ok", parsed.source, parsed.expanded)
    except TriggerError as exc:
        expected = ("error", str(exc), exc.offset)
    try:
        got = triggers.parse_cron(expr, ZoneInfo("UTC"), job_id)
        assert isinstance(got, triggers.CronSchedule)
        result: tuple[Any, ...] = ("ok", got.source, got.expanded)
    except TriggerError as exc:
        result = ("error", str(exc), exc.offset)
    assert result == expected


# ---- APScheduler in bulk ------------------------------------------------------------


class _Dispatcher:
    def missed(self, job_id: str, slots: list[datetime], more: int) -> None:
        raise AssertionError("nothing is missed here")


def test_clock_load_fills_the_store_as_adding_one_by_one_does(tmp_path: Path) -> None:
    _, registry = load_plugins()
    path = tmp_path / "schedd.yaml"
    text = _config(300, False).replace("ftp://", "http://").replace("task: nope", _SHELL)
    path.write_text(text)
    specs = list(load_config(path, registry).jobs.values())
    now = datetime.now(UTC)
    after = {specs[3].id: now - timedelta(hours=3), specs[5].id: now - timedelta(days=3)}
    d: Any = _Dispatcher()
    one, bulk = Clock(d, d.missed), Clock(d, d.missed)
    for spec in specs:
        one.add(spec, after=after.get(spec.id))
    bulk.load(specs, after)
    one._scheduler.start(paused=True)
    bulk._scheduler.start(paused=True)
    try:
        a, b = one._store._jobs, bulk._store._jobs
        assert [(j.id, t, j.next_run_time) for j, t in a] == [
            (j.id, t, j.next_run_time) for j, t in b
        ]
        names = ["func", "func_ref", "executor", "args", "kwargs", "name"]
        names += ["misfire_grace_time", "coalesce", "max_instances", "_jobstore_alias"]
        for (x, _), (y, _) in zip(a, b, strict=True):
            assert [getattr(x, n) for n in names] == [getattr(y, n) for n in names]
            assert (x.trigger.schedule, x.trigger.lookback) == (
                y.trigger.schedule,
                y.trigger.lookback,
            )
        assert one._store._jobs_index.keys() == bulk._store._jobs_index.keys()
        assert len(a) == sum(1 for s in specs if s.enabled)
    finally:
        one.stop()
        bulk.stop()
