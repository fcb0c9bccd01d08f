"""Which config values are secret, and hiding them wherever schedd prints text.

Logs get shared (pasted into tickets, shipped to aggregators), so a secret
must never reach one. A value is secret when:

* its environment variable name (job ``env``, ``shell`` params ``env``) or any
  key above it in ``params`` (``headers.Authorization``, ``kwargs.api_key``)
  contains one of :data:`SECRET_WORDS`, case-insensitively;
* it comes from an ``env_file`` (every value there is secret, whatever its name);
* it is the password of a URL (``https://user:PASSWORD@host``) in ``params``.

Such values are printed as :data:`MASK` in config errors, and masked in every
output line a run writes to its job log (as CI systems mask secrets) and in
its recorded error, so a task that echoes its token leaves ``***`` behind.
Only values of at least :data:`MIN_MASKED` characters are masked in free
text: masking ``1`` or ``no`` in every line would destroy the log and hide
nothing. The run itself always receives the real values.

Standard library only: the daemon's reader thread and the CLI both use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

#: Substrings that make a name secret (matched case-insensitively anywhere in
#: the name: ``GITHUB_TOKEN``, ``db_password``, ``X-Api-Key``, ``SESSION_ID``).
SECRET_WORDS: Final = (
    "TOKEN",
    "SECRET",
    "PASSWORD",
    "PASSWD",
    "PASS",
    "KEY",
    "CREDENTIAL",
    "AUTH",
    "PRIVATE",
    "COOKIE",
    "SESSION",
    "SIGNATURE",
)
MASK: Final = "***"
#: Shorter values are not masked in free text (they would match everywhere).
MIN_MASKED: Final = 4

_SECRET_NAME: Final = re.compile("|".join(SECRET_WORDS), re.IGNORECASE)
_URL_PASSWORD: Final = re.compile(r"://[^/?#@\s:]*:([^/?#@\s]+)@")


def is_secret_key(name: object) -> bool:
    """True if ``name`` (an env variable, a header, a params key) looks secret."""
    return isinstance(name, str) and _SECRET_NAME.search(name) is not None


def _text(value: object) -> str | None:
    """The text a scalar leaf becomes (env values are strings; YAML gives numbers too)."""
    if isinstance(value, bool) or value is None or isinstance(value, Mapping | list | tuple):
        return None
    return str(value)  # str, numbers, and the dates YAML makes of 2024-01-01


def env_secrets(env: Mapping[Any, Any]) -> list[str]:
    """The values of ``env`` whose names look secret."""
    out = []
    for key, value in env.items():
        text = _text(value)
        if text and is_secret_key(key):
            out.append(text)
    return out


def params_secrets(params: object, under_secret: bool = False) -> list[str]:
    """Secret values anywhere in a task's params: leaves under a secret-looking
    key (at any depth) and passwords in URLs."""
    out: list[str] = []
    if isinstance(params, Mapping):
        for key, value in params.items():
            out += params_secrets(value, under_secret or is_secret_key(key))
    elif isinstance(params, list | tuple):
        for value in params:
            out += params_secrets(value, under_secret)
    else:
        text = _text(params)
        if text:
            if under_secret:
                out.append(text)
            elif isinstance(params, str) and "@" in params:
                out += _URL_PASSWORD.findall(params)
    return out


class Masker:
    """Replaces every occurrence of the given secret values in a text with :data:`MASK`.

    Longer values first, so a secret that contains another is masked whole.
    Output is masked line by line, so each line of a multi-line secret (a PEM
    key) is masked on its own too.
    Built once per run; a run without secrets gets a masker whose
    :meth:`mask` returns the text untouched at the cost of one attribute test.
    """

    __slots__ = ("_pattern",)

    def __init__(self, values: Iterable[str]) -> None:
        parts = {part for v in values for part in (v, *v.splitlines())}
        kept = sorted({p for p in parts if len(p) >= MIN_MASKED}, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, kept))) if kept else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def mask(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(MASK, text)


def redact_env(env: Mapping[str, str], secret_names: Iterable[str] = ()) -> dict[str, str]:
    """``env`` for display: values of secret-looking names (and of ``secret_names``,
    e.g. the keys read from an env_file) replaced by :data:`MASK`."""
    forced = set(secret_names)
    return {k: MASK if k in forced or is_secret_key(k) else v for k, v in env.items()}
