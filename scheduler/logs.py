"""Log files, written by the daemon process alone.

Children never open log files: their stdout/stderr come back over pipes and
the daemon forwards each line through a loguru sink of its own per job
(``logs/<job_id>.log``), with rotation and retention. Several processes
rotating one loguru file lose and duplicate lines (loguru #365, #916), so a
single writer is the rule.

A job's sink exists only while the job has output to write: routing a line
costs one filter call per open sink, so keeping 10,000 idle sinks open would
make every line slow. Sinks close after being idle for a while.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from loguru import logger

if TYPE_CHECKING:
    from loguru import Record

DAEMON_LOG = "schedd.log"
DAEMON_ROTATION = "10 MB"
DAEMON_RETENTION = 5
JOB_LINE_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSSZ} {extra[run_id]} {extra[stream]}: {message}"
DAEMON_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSSZ} {level: <7} {message}"
STDERR_FORMAT = "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> {message}"
#: Close a job's sink after this long without a line (seconds).
IDLE_CLOSE = 60.0


def _is_daemon_record(record: Record) -> bool:
    return "job_line" not in record["extra"]


class _ToLoguru(logging.Handler):
    """Forward stdlib logging (APScheduler's, the runner's) into the daemon log."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.log(level, f"{record.name}: {record.getMessage()}")


def _route_stdlib_logging() -> None:
    for name, level in (("apscheduler", logging.WARNING), ("schedd", logging.INFO)):
        stdlib = logging.getLogger(name)
        stdlib.setLevel(level)
        stdlib.handlers[:] = [_ToLoguru()]
        stdlib.propagate = False


def setup_daemon_logging(state_dir: Path, *, echo: bool = True, level: str = "INFO") -> None:
    """Route the daemon's own messages to ``schedd.log`` (rotating) and stderr.

    ``diagnose=False`` keeps tracebacks from printing local variable values,
    which may hold secrets.
    """
    logger.remove()
    _route_stdlib_logging()
    logger.add(
        state_dir / DAEMON_LOG,
        level=level,
        format=DAEMON_FORMAT,
        filter=_is_daemon_record,
        rotation=DAEMON_ROTATION,
        retention=DAEMON_RETENTION,
        backtrace=False,
        diagnose=False,
        encoding="utf-8",
    )
    if echo:
        logger.add(
            sys.stderr,
            level=level,
            format=STDERR_FORMAT,
            filter=_is_daemon_record,
            backtrace=False,
            diagnose=False,
            colorize=None,
        )


@dataclass(frozen=True, slots=True)
class JobLogPolicy:
    rotation: str = "10 MB"
    retention: int = 5
    compression: str | None = None


_DEFAULT_POLICY: Final = JobLogPolicy()


class JobLogs:
    """Per-job log files with loguru rotation, opened on demand."""

    def __init__(self, logs_dir: Path) -> None:
        self.logs_dir = logs_dir
        logs_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._sinks: dict[str, int] = {}
        self._last_used: dict[str, float] = {}
        self._policies: dict[str, JobLogPolicy] = {}  # jobs with non-default settings
        self._shared: dict[JobLogPolicy, JobLogPolicy] = {}

    def path(self, job_id: str) -> Path:
        """The job's current log file. Job ids are validated by the config, so
        they are safe file names; this check guards against a caller that skipped it."""
        if "/" in job_id or job_id.startswith(".") or not job_id:
            raise ValueError(f"unsafe job id for a file name: {job_id!r}")
        return self.logs_dir / f"{job_id}.log"

    def set_policy(self, job_id: str, policy: JobLogPolicy) -> None:
        """Remember rotation settings; an open sink picks them up when reopened.

        Called for every job at start-up and reload, so it is kept cheap: only
        settings that differ from the default are stored, one object per
        distinct setting, and a sink is closed only when its setting changed.
        """
        with self._lock:
            if self._policies.get(job_id, _DEFAULT_POLICY) == policy:
                return
            if policy == _DEFAULT_POLICY:
                del self._policies[job_id]
            else:
                self._policies[job_id] = self._shared.setdefault(policy, policy)
            self._close_locked(job_id)

    def write(self, job_id: str, run_id: str, stream: str, line: str) -> None:
        """Append one output line. The text is passed as loguru's message with
        no format arguments, so ``{}`` in it is written literally."""
        self._ensure_sink(job_id)
        logger.bind(job_line=job_id, run_id=run_id, stream=stream).opt(
            raw=False, colors=False
        ).info(line)

    def note(self, job_id: str, run_id: str, message: str) -> None:
        """A line from schedd itself about a run (start, timeout steps, outcome)."""
        self.write(job_id, run_id, "schedd", message)

    def _ensure_sink(self, job_id: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._last_used[job_id] = now
            if job_id in self._sinks:
                return
            policy = self._policies.get(job_id, _DEFAULT_POLICY)
            self._sinks[job_id] = logger.add(
                self.path(job_id),
                format=JOB_LINE_FORMAT,
                filter=_job_filter(job_id),
                rotation=policy.rotation,
                retention=policy.retention,
                compression=policy.compression,
                backtrace=False,
                diagnose=False,
                encoding="utf-8",
                catch=True,
            )

    def close_idle(self, idle: float = IDLE_CLOSE) -> int:
        """Close sinks unused for ``idle`` seconds; returns how many closed."""
        cutoff = time.monotonic() - idle
        with self._lock:
            stale = [j for j, t in self._last_used.items() if t < cutoff]
            for job_id in stale:
                self._close_locked(job_id)
            return len(stale)

    def close(self, job_id: str | None = None) -> None:
        with self._lock:
            for j in [job_id] if job_id else list(self._sinks):
                self._close_locked(j)

    def _close_locked(self, job_id: str) -> None:
        self._last_used.pop(job_id, None)
        sink = self._sinks.pop(job_id, None)
        if sink is not None:
            logger.remove(sink)


def _job_filter(job_id: str) -> Any:
    def _filter(record: Record) -> bool:
        return record["extra"].get("job_line") == job_id

    return _filter
