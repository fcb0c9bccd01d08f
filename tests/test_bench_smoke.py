"""The benchmark harness starts (benchmarks themselves never run in the test suite)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_harness_starts() -> None:
    res = subprocess.run(
        [sys.executable, "bench/run.py", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert "--quick" in res.stdout and "report.md" in res.stdout
