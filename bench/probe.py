"""Task targets for the daemon benchmark: the first thing they do is say when they ran."""

from __future__ import annotations

import time


def mark() -> None:
    """Print the wall time at which task code first ran (for fire lateness)."""
    print(f"ran-at {time.time():.6f}", flush=True)


def noop() -> None:
    """A job function that does nothing (the APScheduler process-pool peer's job)."""
