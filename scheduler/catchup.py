"""Which of a job's due slots run now, run later, or are recorded missed.

A pure function of (slots, now, policy, window) so every catch-up decision
can be tested exactly, and so the restart path (slots missed while the
daemon was down) and the stall path (slots that arrive late while it runs)
share one rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

#: A slot whose fire arrives later than this is "late": the catch-up policy decides it.
LATE_AFTER = 5.0
#: At most this many missed slots of one job are run by ``catchup: all``.
MAX_CATCHUP_RUNS = 100


@dataclass
class Decision:
    run: list[tuple[datetime, str]] = field(default_factory=list)  # (slot, why)
    backlog: list[datetime] = field(default_factory=list)  # run one after another
    missed: list[tuple[datetime, str]] = field(default_factory=list)  # (slot, why)


def decide(slots: list[datetime], now: datetime, policy: str, window: float) -> Decision:
    out = Decision()
    late = [s for s in slots if (now - s).total_seconds() > LATE_AFTER]
    on_time = [s for s in slots if (now - s).total_seconds() <= LATE_AFTER]
    limit = timedelta(seconds=window)
    catchable = []
    for slot in late:
        if now - slot > limit:
            out.missed.append((slot, f"older than catchup_window when fired at {now:%T}"))
        else:
            catchable.append(slot)
    if catchable:
        if policy == "none":
            out.missed += [(s, "fired late and catchup is none") for s in catchable]
        elif policy == "latest":
            keep = None if on_time else catchable[-1]
            why = "superseded by a later slot (catchup: latest)"
            out.missed += [(s, why) for s in catchable if s is not keep]
            if keep is not None:
                out.run.append((keep, "late fire (catchup: latest)"))
        else:  # all
            overflow = catchable[:-MAX_CATCHUP_RUNS] if len(catchable) > MAX_CATCHUP_RUNS else []
            why = f"more than {MAX_CATCHUP_RUNS} slots to catch up"
            out.missed += [(s, why) for s in overflow]
            out.backlog = catchable[-MAX_CATCHUP_RUNS:]
    out.run += [(s, "scheduled") for s in on_time]
    return out
