"""Durations and sizes as people write them in a config file.

Accepted durations (the README documents the same table):

* a number of seconds: ``90``, ``1.5`` (a YAML int or float, or the same text quoted);
* one or more amounts with units, largest unit first, each unit at most once,
  spaces allowed between them: ``250ms``, ``90s``, ``5m``, ``1h30m``, ``1h 30m``,
  ``1.5h``, ``2d``, ``1w``. Units are lower case (``m`` is minutes, never months):
  ``ms``, ``s``, ``m``, ``h``, ``d``, ``w`` or their words (``sec``, ``secs``,
  ``second(s)``, ``min``, ``mins``, ``minute(s)``, ``hr``, ``hrs``, ``hour(s)``,
  ``day(s)``, ``week(s)``, ``msec``, ``millisecond(s)``).

Negative, infinite and NaN values are rejected; zero is allowed here because
``jitter: 0`` is meaningful; callers that need a positive value check that.

Sizes (``log_rotation``) follow loguru's reading of the same strings, so the
number we compute is the number loguru rotates at: ``KB``/``MB``/``GB``/``TB``
are powers of 1000, ``KiB``/``MiB``/``GiB``/``TiB`` powers of 1024, ``B`` is
bytes. We accept any letter case and optional spaces, and
:func:`normalize_size` writes the canonical spelling back, because loguru reads a
lower-case ``b`` as *bits*.
"""

from __future__ import annotations

import math
import re

__all__ = [
    "DURATION_FORMS",
    "SIZE_FORMS",
    "DurationError",
    "format_duration",
    "normalize_size",
    "parse_duration",
    "parse_size",
]

#: Shown in error messages so the user sees every accepted spelling at once.
DURATION_FORMS = "seconds (90, 1.5) or amounts with units ms, s, m, h, d, w (250ms, 5m, 1h30m, 2d)"
SIZE_FORMS = "bytes (1048576) or an amount with a unit B, KB, MB, GB, KiB, MiB, GiB (10 MB, 512KiB)"

_UNIT_SECONDS: dict[str, float] = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_UNIT_WORDS: dict[str, str] = {
    "milliseconds": "ms", "millisecond": "ms", "msecs": "ms", "msec": "ms", "ms": "ms",
    "seconds": "s", "second": "s", "secs": "s", "sec": "s", "s": "s",
    "minutes": "m", "minute": "m", "mins": "m", "min": "m", "m": "m",
    "hours": "h", "hour": "h", "hrs": "h", "hr": "h", "h": "h",
    "days": "d", "day": "d", "d": "d",
    "weeks": "w", "week": "w", "w": "w",
}  # fmt: skip
_ORDER = ("w", "d", "h", "m", "s", "ms")
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_UNIT = "|".join(sorted(_UNIT_WORDS, key=len, reverse=True))
_PLAIN_RE = re.compile(rf"\s*({_NUMBER})\s*")
_PART_RE = re.compile(rf"\s*({_NUMBER})\s*({_UNIT})(?![A-Za-z])\s*")
#: The same grammar as a JSON Schema pattern (ECMA-262), for editors.
DURATION_PATTERN = rf"^\s*(?:{_NUMBER}|(?:{_NUMBER}\s*(?:{_UNIT})\s*)+)$"

_SIZE_UNITS: dict[str, tuple[str, int]] = {
    "b": ("B", 1),
    "kb": ("KB", 1000), "mb": ("MB", 1000**2), "gb": ("GB", 1000**3), "tb": ("TB", 1000**4),
    "kib": ("KiB", 1024), "mib": ("MiB", 1024**2), "gib": ("GiB", 1024**3), "tib": ("TiB", 1024**4),
}  # fmt: skip
_SIZE_RE = re.compile(rf"\s*({_NUMBER})\s*([kmgt]i?b|b)?\s*", re.IGNORECASE)
SIZE_PATTERN = rf"^\s*{_NUMBER}\s*(?:[kKmMgGtT][iI]?[bB]|[bB])?\s*$"


class DurationError(ValueError):
    """A value is not a duration (or size).

    ``reason`` is empty when the text is simply not one (then ``hint`` lists
    the accepted forms), else a phrase starting with "must"; the config loader
    puts the key's name in front of it."""

    def __init__(self, value: object, reason: str = "", noun: str = "duration") -> None:
        self.value = value
        self.noun = noun
        self.reason = reason
        self.hint = "" if reason else f"use {SIZE_FORMS if noun == 'size' else DURATION_FORMS}"
        message = f"invalid {noun} {_show(value)}"
        super().__init__(f"{message}: {reason}" if reason else f"{message}; {self.hint}")


def _show(value: object) -> str:
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _number(value: object, noun: str) -> float | None:
    """A YAML number as-is; None when ``value`` is not a number at all."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    seconds = float(value)
    if math.isnan(seconds) or math.isinf(seconds):
        raise DurationError(value, f"must be a finite {noun}", noun)
    if seconds < 0:
        raise DurationError(value, "must not be negative", noun)
    return seconds


def parse_duration(value: object) -> float:
    """Seconds in ``value`` (int, float or text, see the module docstring)."""
    seconds = _number(value, "duration")
    if seconds is not None:
        return seconds
    if not isinstance(value, str):
        raise DurationError(value)
    text = value.strip()
    if text.startswith("-"):
        raise DurationError(value, "must not be negative")
    plain = _PLAIN_RE.fullmatch(value)
    if plain:
        return _finite(float(plain.group(1)), value)
    total = 0.0
    seen: list[str] = []
    pos = 0
    while pos < len(value):
        part = _PART_RE.match(value, pos)
        if part is None or part.end() == pos:
            raise DurationError(value)
        unit = _UNIT_WORDS[part.group(2)]
        if seen and _ORDER.index(unit) <= _ORDER.index(seen[-1]):
            raise DurationError(
                value, "must list each unit once, largest first (e.g. 1h30m, not 30m1h)"
            )
        seen.append(unit)
        total += float(part.group(1)) * _UNIT_SECONDS[unit]
        pos = part.end()
    if not seen:
        raise DurationError(value)
    return _finite(total, value)


def _finite(seconds: float, value: object) -> float:
    if math.isinf(seconds):
        raise DurationError(value, "must be a finite duration")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest unit form that :func:`parse_duration` reads back exactly:
    ``5400`` -> ``1h30m``, ``0.25`` -> ``250ms``, ``0`` -> ``0s``. Weeks are
    written as days (``7d``), which people read faster."""
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise ValueError(f"cannot format {seconds!r} as a duration")
    millis = round(seconds * 1000)
    if not math.isclose(millis, seconds * 1000, rel_tol=1e-12, abs_tol=1e-6):
        # Finer than a millisecond: plain seconds keep the precision.
        return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"
    if millis == 0:
        return "0s"
    parts: list[str] = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        count, millis = divmod(millis, size)
        if count:
            parts.append(f"{count}{unit}")
    if millis:
        parts.append(f"{millis}ms")
    return "".join(parts)


def _size(value: object) -> tuple[float, str, str, int]:
    """(amount, amount as text, canonical unit, multiplier) of a size, validated."""
    amount = _number(value, "size")
    if amount is not None:
        text = str(int(amount)) if amount.is_integer() else f"{amount:.12f}".rstrip("0")
        unit, mult = "B", 1
    elif isinstance(value, str) and (m := _SIZE_RE.fullmatch(value)):
        text = m.group(1)
        amount = float(text)
        unit, mult = _SIZE_UNITS[(m.group(2) or "b").lower()]
    elif isinstance(value, str) and value.strip().startswith("-"):
        raise DurationError(value, "must not be negative", "size")
    else:
        raise DurationError(value, noun="size")
    if math.isinf(amount * mult):
        raise DurationError(value, "must be a finite size", "size")
    if round(amount * mult) < 1:
        raise DurationError(value, "must be at least 1 byte", "size")
    return amount, text, unit, mult


def parse_size(value: object) -> int:
    """Bytes in ``value``: ``"10 MB"`` -> 10_000_000, ``"1KiB"`` -> 1024, ``2048`` -> 2048."""
    amount, _text, _unit, mult = _size(value)
    return round(amount * mult)


def normalize_size(value: object) -> str:
    """The canonical spelling of a size, which loguru reads as the same number of
    bytes as :func:`parse_size`: ``"10mb"`` -> ``"10 MB"``, ``2048`` -> ``"2048 B"``."""
    _amount, text, unit, _mult = _size(value)
    return f"{text} {unit}"
