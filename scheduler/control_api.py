"""The daemon's side of the control socket: each command mapped onto the daemon.

Calls arrive on the control server's connection threads. Anything that
changes scheduling goes through the dispatcher thread (``Dispatcher.ask``) or
the main thread (reload, stop), so a control command never races a fire.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from scheduler.errors import ScheddError

if TYPE_CHECKING:
    from scheduler.daemon import Daemon


class DaemonControl:
    """Implements :class:`scheduler.control.ControlHandler` for a running :class:`Daemon`."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    def status(self) -> dict[str, Any]:
        d = self.d
        reload = d.last_reload
        return {
            "pid": os.getpid(),
            "started_at": d.started_at,
            "uptime_s": round((datetime.now(UTC) - d.started_at).total_seconds(), 3),
            "config_path": str(d.config.path),
            "state_dir": str(d.state_dir),
            "jobs": len(d.config.jobs),
            "running": [
                {"run_id": r.run_id, "job": r.job_id, "started_at": r.started_at, "pid": r.pid}
                for r in d.dispatcher.running()
            ],
            "last_reload": None
            if reload is None
            else {"at": reload.at, "ok": reload.ok, "errors": reload.errors},
        }

    def jobs(self) -> list[dict[str, Any]]:
        d = self.d
        last = d.ledger.last_outcomes() if d.ledger is not None else {}
        paused = d.paused
        out = []
        for spec in d.config.jobs.values():
            nxt = d.clock.next_fire(spec.id)
            row = last.get(spec.id)
            out.append(
                {
                    "id": spec.id,
                    "task": spec.task,
                    "trigger": spec.schedule.describe(),
                    "timezone": spec.timezone,
                    "enabled": spec.enabled,
                    "paused": spec.id in paused,
                    "next_fire": nxt.astimezone(spec.schedule.tz) if nxt else None,
                    "last": None
                    if row is None
                    else {k: row.get(k) for k in ("status", "ended_at", "run_id")},
                }
            )
        return out

    def trigger(self, job: str, force: bool) -> dict[str, Any]:
        return self.d.dispatcher.trigger_now(job, force=force)

    def pause(self, jobs: list[str] | None) -> dict[str, Any]:
        return self.d.set_paused(jobs, True)

    def resume(self, jobs: list[str] | None) -> dict[str, Any]:
        return self.d.set_paused(jobs, False)

    def history(self, job: str | None, limit: int, status: str | None) -> list[dict[str, Any]]:
        if self.d.ledger is None:
            raise ScheddError("this daemon keeps no ledger")
        self.d.ledger.flush(1.0)
        return self.d.ledger.history(job, limit=limit, status=status)

    def reload(self) -> dict[str, Any]:
        result = self.d.ask_main("reload")
        return {
            "ok": result.ok,
            "errors": result.errors,
            "added": result.added,
            "removed": result.removed,
            "changed": result.changed,
        }

    def cancel(self, run_id: str) -> dict[str, Any]:
        return self.d.dispatcher.cancel_run(run_id)

    def stop(self, grace: float | None) -> dict[str, Any]:
        if grace is not None:
            self.d.shutdown_grace = grace
        self.d.request("stop")
        return {"pid": os.getpid(), "grace": self.d.shutdown_grace}
