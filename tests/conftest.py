"""Shared fixtures: one real runner (and its output collector) per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from scheduler.runner import Runner
from tests.runner_tasks import Collector


@pytest.fixture(scope="module")
def col() -> Collector:
    return Collector()


@pytest.fixture(scope="module")
def runner(col: Collector) -> Iterator[Runner]:
    r = Runner(on_line=col.on_line, on_event=col.on_event)
    r.start()
    yield r
    r.close(grace=1.0)
