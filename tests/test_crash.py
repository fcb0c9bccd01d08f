"""SIGKILL the daemon at random moments; the ledger must stay whole (bench/crash_stress.py
runs the same loop for 50+ iterations)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.crash_stress import run


@pytest.mark.timeout(180)
def test_kill_9_loop_leaves_a_consistent_ledger(tmp_path: Path) -> None:
    audit = run(iterations=4, seed=7, workdir=tmp_path)
    assert audit.opened_clean == audit.iterations == 4
    assert audit.duplicates == 0
    assert audit.left_running == 0
    assert audit.surviving_processes == 0
    assert audit.statuses.get("success", 0) > 0
