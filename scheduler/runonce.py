"""``schedd run-once``: one run through the same isolated runner, in the foreground.

Plugin authors debug with this, so it must behave exactly like a scheduled
run (same launcher, environment, timeout and tree kill) while streaming the
output to the terminal instead of the job log.
"""

from __future__ import annotations

import signal
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scheduler.config import JobSpec
    from scheduler.types import RunResult, TaskType

#: Exit statuses of ``schedd run-once``, after timeout(1) and the shell.
EXIT_TIMEOUT = 124
EXIT_SIGNAL_BASE = 128


def exit_status(result: RunResult) -> int:
    if result.status == "success":
        return 0
    if result.status == "timeout":
        return EXIT_TIMEOUT
    if result.status == "killed":
        signum = getattr(signal.Signals, result.signal or "", signal.SIGKILL)
        return EXIT_SIGNAL_BASE + int(signum)
    return result.exit_code if result.exit_code else 1


def run_once(spec: JobSpec, task: TaskType, *, timeout: float | None = None) -> int:
    from scheduler.records import new_run_id
    from scheduler.runner import Runner
    from scheduler.runspec import Start, build_request
    from scheduler.statedir import base_env

    def on_line(_job: str, _run: str, stream: str, line: str) -> None:
        out = sys.stderr if stream == "stderr" else sys.stdout
        out.write(line + "\n")
        out.flush()

    def on_event(_job: str, _run: str, message: str) -> None:
        sys.stderr.write(f"schedd: {message}\n")
        sys.stderr.flush()

    runner = Runner(on_line=on_line, on_event=on_event)
    runner.start()
    run_id = new_run_id()
    start = Start(datetime.now(UTC).replace(microsecond=0), reason="run-once")
    request = build_request(spec, task, run_id, start, base_env(), timeout=timeout)
    handle = runner.launch(request)

    def on_interrupt(_signum: int, _frame: Any) -> None:
        handle.cancel("interrupted")

    previous = signal.signal(signal.SIGINT, on_interrupt)
    signal.signal(signal.SIGTERM, on_interrupt)
    try:
        result = None
        while result is None:
            result = handle.wait(0.5)
    finally:
        signal.signal(signal.SIGINT, previous)
        runner.close(spec.kill_grace)
    detail = f"exit code {result.exit_code}" if result.exit_code is not None else ""
    if result.signal:
        detail = f"signal {result.signal}"
    if result.error:
        detail += f" ({result.error})"
    sys.stderr.write(
        f"schedd: run {run_id} of {spec.id!r}: {result.status}"
        f"{', ' + detail if detail else ''} in {result.duration:.3f}s"
        f"{': ' + result.reason if result.reason else ''}\n"
    )
    return exit_status(result)
