"""``env_file:``: a job's secrets in a dotenv-style file kept out of the config.

The format, line by line (UTF-8):

* blank lines and lines starting with ``#`` are ignored;
* ``KEY=VALUE``, optionally prefixed with ``export ``; spaces around the key
  and the ``=`` are ignored; ``KEY`` is a valid environment variable name;
* an unquoted value is taken literally up to the end of the line (trailing
  spaces dropped): ``#``, ``$``, quotes and backslashes inside it are plain
  characters, so a password needs no escaping;
* ``'single quotes'`` keep everything between them literally;
  ``"double quotes"`` also understand ``\\"``, ``\\\\``, ``\\n``, ``\\t`` and
  ``\\r``; after the closing quote only spaces and a ``# comment`` may follow;
* no variable expansion and no command substitution, ever; no multi-line
  values (write ``\\n`` in double quotes); a key set twice is an error.

Errors say ``FILE:LINE: message`` and never quote the line: it may hold a
secret. Every value read from the file is treated as secret (see
:mod:`scheduler.redact`).

Standard library only (the daemon re-reads the file at each run's start, so
a rotated secret is picked up without a reload).
"""

from __future__ import annotations

import os
import re
import stat
from typing import Final

from scheduler.errors import ScheddError

#: A bigger file is a mistake (a wrong path), not an environment.
MAX_SIZE: Final = 1024 * 1024
_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ESCAPES: Final = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "r": "\r"}


class EnvFileError(ScheddError):
    """An env_file could not be read or parsed. With a ``line``, the message is
    ``PATH:LINE: reason``; without, ``reason`` names the file itself."""

    def __init__(self, path: str, message: str, line: int = 0) -> None:
        self.path = path
        self.line = line
        self.reason = message
        super().__init__(f"{path}:{line}: {message}" if line else message)


class _LineError(ValueError):
    pass


def _double_quoted(text: str) -> tuple[str, str]:
    """The value of a ``"..."`` string starting at ``text[0]``, and what follows it."""
    out: list[str] = []
    i = 1
    while i < len(text):
        ch = text[i]
        if ch == '"':
            return "".join(out), text[i + 1 :]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPES:
            out.append(_ESCAPES[text[i + 1]])
            i += 2
            continue
        out.append(ch)
        i += 1
    raise _LineError("unterminated double quote (values cannot span lines; write \\n)")


def _value(text: str) -> str:
    """The value after ``=`` (leading spaces already removed)."""
    if not text or text[0] not in "'\"":
        return text.rstrip()
    if text[0] == "'":
        end = text.find("'", 1)
        if end < 0:
            raise _LineError("unterminated single quote (values cannot span lines)")
        value, rest = text[1:end], text[end + 1 :]
    else:
        value, rest = _double_quoted(text)
    rest = rest.strip()
    if rest and not rest.startswith("#"):
        raise _LineError("unexpected text after the closing quote")
    return value


def parse(text: str, path: str) -> dict[str, str]:
    """The variables in ``text`` (the content of ``path``); raises EnvFileError."""
    env: dict[str, str] = {}
    first: dict[str, int] = {}
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("export ", "export\t")):
            line = line[len("export") :].lstrip()
        key, eq, rest = line.partition("=")
        key = key.strip()
        if not eq:
            raise EnvFileError(path, "expected KEY=VALUE", number)
        if not _NAME.fullmatch(key):
            raise EnvFileError(
                path,
                "invalid variable name: use letters, digits and '_', not starting with a digit",
                number,
            )
        if key in first:
            raise EnvFileError(path, f"{key} is set twice (first on line {first[key]})", number)
        try:
            value = _value(rest.lstrip())
        except _LineError as exc:
            raise EnvFileError(path, f"{key}: {exc}", number) from None
        if "\0" in value:
            raise EnvFileError(path, f"{key}: the value contains a NUL character", number)
        first[key] = number
        env[key] = value
    return env


def read(path: str) -> dict[str, str]:
    """Read and parse the env file at ``path`` (absolute); raises EnvFileError."""
    try:
        with open(path, "rb") as f:  # noqa: PTH123  (no pathlib to import on the run path)
            data = f.read(MAX_SIZE + 1)
    except OSError as exc:
        raise EnvFileError(path, f"cannot read env_file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_SIZE:
        raise EnvFileError(path, f"env_file {path} is larger than {MAX_SIZE // 1024} KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise EnvFileError(path, "not UTF-8 text", line) from None
    return parse(text.removeprefix("\ufeff"), path)


def loose_permissions(path: str) -> str | None:
    """A warning if other users may read the file (it holds secrets), else None."""
    try:
        mode = os.stat(path).st_mode  # noqa: PTH116  (no pathlib on the run path)
    except OSError:
        return None
    bits = stat.S_IMODE(mode)
    who = {0o044: "group and others", 0o040: "its group", 0o004: "other users"}.get(bits & 0o044)
    if who is None:
        return None
    return f"env_file {path} is readable by {who} (mode {bits:04o}); it holds secrets: chmod 600 it"
