"""Where a daemon keeps its state, and who may use it.

Standard library only: the CLI's control commands resolve the state dir on
every call and must not pay for loguru or pydantic to do it.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Mapping
from pathlib import Path

from scheduler.errors import ScheddError

LOCK_FILE = "schedd.lock"
#: Variables a run inherits from the daemon's environment; everything else is
#: dropped so the daemon's own secrets never reach a job it did not name them for.
BASE_ENV_KEYS = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "PYTHONPATH",
    "VIRTUAL_ENV",
)
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def default_state_dir() -> Path:
    """``/var/lib/schedd`` for root, else ``$XDG_STATE_HOME/schedd`` (``~/.local/state/schedd``)."""
    if os.geteuid() == 0:
        return Path("/var/lib/schedd")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "schedd"


def resolve_state_dir(explicit: str | None, config_state_dir: Path | None) -> Path:
    """``--state-dir``, else the config's ``state_dir``, else :func:`default_state_dir`."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    if config_state_dir is not None:
        return config_state_dir
    return default_state_dir()


def make_private_dir(path: Path) -> None:
    old = os.umask(0o077)
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    finally:
        os.umask(old)


def base_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    env = {k: v for k, v in environ.items() if k in BASE_ENV_KEYS or k.startswith("LC_")}
    env.setdefault("PATH", DEFAULT_PATH)
    return env


class StateDirLock:
    """An exclusive flock on the state dir; the kernel drops it when we die,
    so a stale lock file never blocks a restart and is never used to signal anyone."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ScheddError(
                f"another schedd daemon (pid {holder}) is using {self.path.parent}; "
                "stop it first or pass a different --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
