"""Durations and sizes: the accepted forms, the refusals, and the round trips."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.durations import (
    DURATION_FORMS,
    DURATION_PATTERN,
    SIZE_FORMS,
    SIZE_PATTERN,
    DurationError,
    format_duration,
    normalize_size,
    parse_duration,
    parse_size,
)

ORDER = "must list each unit once, largest first (e.g. 1h30m, not 30m1h)"

GOOD_DURATIONS = [
    (90, 90.0),
    (1.5, 1.5),
    (0, 0.0),
    ("90", 90.0),
    ("1.5", 1.5),
    ("90s", 90.0),
    ("5m", 300.0),
    ("1h30m", 5400.0),
    ("1h 30m", 5400.0),
    ("1.5h", 5400.0),
    ("2d", 172800.0),
    ("1w", 604800.0),
    ("250ms", 0.25),
    ("1m30s500ms", 90.5),
    ("1d2h3m4s", 93784.0),
    (" 10 s ", 10.0),
    ("3 minutes", 180.0),
    ("1 hour", 3600.0),
    ("2 days", 172800.0),
    ("45sec", 45.0),
    ("0s", 0.0),
    (".5s", 0.5),
]


@pytest.mark.parametrize(("value", "seconds"), GOOD_DURATIONS)
def test_accepted_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "_seconds"), [g for g in GOOD_DURATIONS if isinstance(g[0], str)]
)
def test_schema_pattern_accepts_what_the_parser_accepts(value: str, _seconds: float) -> None:
    assert re.fullmatch(DURATION_PATTERN, value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", f"invalid duration 'abc'; use {DURATION_FORMS}"),
        ("", f"invalid duration ''; use {DURATION_FORMS}"),
        ("5M", f"invalid duration '5M'; use {DURATION_FORMS}"),
        ("1h30", f"invalid duration '1h30'; use {DURATION_FORMS}"),
        ("1e3", f"invalid duration '1e3'; use {DURATION_FORMS}"),
        ("5 parsecs", f"invalid duration '5 parsecs'; use {DURATION_FORMS}"),
        (None, f"invalid duration null; use {DURATION_FORMS}"),
        (True, f"invalid duration true; use {DURATION_FORMS}"),
        ([1], f"invalid duration [1]; use {DURATION_FORMS}"),
        (-1, "invalid duration -1: must not be negative"),
        ("-5s", "invalid duration '-5s': must not be negative"),
        ("-5", "invalid duration '-5': must not be negative"),
        (
            "30m1h",
            f"invalid duration '30m1h': {ORDER}",
        ),
        (
            "1h1h",
            f"invalid duration '1h1h': {ORDER}",
        ),
        (float("inf"), "invalid duration inf: must be a finite duration"),
        (float("nan"), "invalid duration nan: must be a finite duration"),
        ("9" * 400, f"invalid duration '{'9' * 400}': must be a finite duration"),
    ],
)
def test_rejected_durations(value: object, message: str) -> None:
    with pytest.raises(DurationError) as info:
        parse_duration(value)
    assert str(info.value) == message


def test_the_forms_messages_list_every_unit() -> None:
    assert DURATION_FORMS == (
        "seconds (90, 1.5) or amounts with units ms, s, m, h, d, w (250ms, 5m, 1h30m, 2d)"
    )
    assert SIZE_FORMS == (
        "bytes (1048576) or an amount with a unit B, KB, MB, GB, KiB, MiB, GiB (10 MB, 512KiB)"
    )


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.25, "250ms"),
        (1, "1s"),
        (90, "1m30s"),
        (5400, "1h30m"),
        (86400, "1d"),
        (604800, "7d"),
        (93784.5, "1d2h3m4s500ms"),
        (0.0001, "0.0001s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("seconds", [-1, float("nan"), float("inf")])
def test_format_duration_refuses_non_durations(seconds: float) -> None:
    with pytest.raises(ValueError):
        format_duration(seconds)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=10**12))
def test_format_then_parse_is_exact_to_the_millisecond(millis: int) -> None:
    assert parse_duration(format_duration(millis / 1000)) == pytest.approx(millis / 1000, abs=1e-9)


@pytest.mark.parametrize(
    ("value", "size", "normal"),
    [
        ("10 MB", 10_000_000, "10 MB"),
        ("10MB", 10_000_000, "10 MB"),
        ("10mb", 10_000_000, "10 MB"),  # loguru would read "mb" as megabits: normalised
        ("1 KB", 1000, "1 KB"),
        ("1KiB", 1024, "1 KiB"),
        ("512 kib", 524288, "512 KiB"),
        ("2 MiB", 2 * 1024**2, "2 MiB"),
        ("1.5 GB", 1_500_000_000, "1.5 GB"),
        ("1 gib", 1024**3, "1 GiB"),
        ("100 B", 100, "100 B"),
        ("100", 100, "100 B"),
        (2048, 2048, "2048 B"),
        (" 7 b ", 7, "7 B"),
    ],
)
def test_sizes(value: object, size: int, normal: str) -> None:
    assert parse_size(value) == size
    assert normalize_size(value) == normal
    assert parse_size(normal) == size
    if isinstance(value, str):
        assert re.fullmatch(SIZE_PATTERN, value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "10 XB",
            f"invalid size '10 XB'; use {SIZE_FORMS}",
        ),
        (
            "MB",
            f"invalid size 'MB'; use {SIZE_FORMS}",
        ),
        (
            True,
            f"invalid size true; use {SIZE_FORMS}",
        ),
        ("-1 MB", "invalid size '-1 MB': must not be negative"),
        (-5, "invalid size -5: must not be negative"),
        ("0 MB", "invalid size '0 MB': must be at least 1 byte"),
        (0, "invalid size 0: must be at least 1 byte"),
    ],
)
def test_rejected_sizes(value: object, message: str) -> None:
    with pytest.raises(DurationError) as info:
        parse_size(value)
    assert str(info.value) == message
