"""YAML with positions: safe_load's values, every key and value located, nothing run."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.yamlsrc import INVALID, MAX_DEPTH, Loc, parse_bytes, parse_text


def problems(text: str) -> list[str]:
    return [str(p) for p in parse_text(text, "f.yaml").problems]


def test_values_and_positions_by_path() -> None:
    src = parse_text(
        "jobs:\n  backup:\n    params:\n      url: http://x\n    list: [a, 'b']\n",
        "f.yaml",
    )
    assert src.problems == []
    assert src.data == {"jobs": {"backup": {"params": {"url": "http://x"}, "list": ["a", "b"]}}}
    assert src.keys[("jobs",)] == Loc(1, 1, "jobs", 1)
    assert src.keys[("jobs", "backup")] == Loc(2, 3, "backup", 3)
    assert src.keys[("jobs", "backup", "params", "url")] == Loc(4, 7, "url", 7)
    assert src.values[("jobs", "backup", "params", "url")] == Loc(4, 12, "http://x", 12)
    assert src.values[("jobs", "backup", "list", 0)] == Loc(5, 12, "a", 12)
    # quoted: the value starts at the quote, its text one column later
    assert src.values[("jobs", "backup", "list", 1)] == Loc(5, 15, "b", 16)
    assert src.values[("jobs", "backup", "params")] == Loc(4, 7)


def test_text_column_only_when_the_value_is_written_verbatim() -> None:
    src = parse_text(
        "plain: 0 5 * * *\n"
        "single: '0 5 * * *'\n"
        'double: "0 5 * * *"\n'
        "escaped: 'it''s'\n"
        'escaped2: "a\\tb"\n'
        "block: |\n  text\n"
        "folded: >-\n  text\n",
        "f.yaml",
    )
    v = src.values
    assert (v[("plain",)].col, v[("plain",)].text_col) == (8, 8)
    assert (v[("single",)].col, v[("single",)].text_col) == (9, 10)
    assert (v[("double",)].col, v[("double",)].text_col) == (9, 10)
    assert v[("escaped",)].text_col is None
    assert v[("escaped2",)].text_col is None
    assert v[("block",)].text_col is None
    assert v[("folded",)].text_col is None
    assert src.problem(v[("single",)], "m", offset=2).col == 12
    assert src.problem(v[("escaped",)], "m", offset=2).col == 10


def test_an_empty_value_is_located_at_its_key() -> None:
    src = parse_text("a:\n  b:\n", "f.yaml")
    assert src.data == {"a": {"b": None}}
    assert src.values[("a", "b")] == Loc(2, 3, "")


SAFE_LOAD_CASES = [
    "a: yes\nb: No\nc: on\nd: ~\ne: null\nf:\n",
    "a: 1:30\nb: 0o17\nc: 017\nd: 0x1F\ne: 1_000\nf: -7\n",
    "a: 1.5\nb: 1e3\nc: 1.0e+3\nd: .inf\ne: -.Inf\n",
    "a: 2025-01-02\nb: 2025-01-02 03:04:05\n",
    "c: 2025-01-02T03:04:05+02:00\nd: 2025-01-02T03:04:05Z\n",
    "a: '123'\nb: !!str 123\nc: ! 123\nd: !!int '7'\ne: !!float '1'\n",
    "? a\n: b\n1: one\n1.5: x\n~: n\n",
    "true: t\nfalse: f\n",
    "a: [1, [2, {b: c}]]\nb:\n  - x\n  - y: z\n",
    "s: >\n  folded\n  text\nl: |\n  literal\n  text\n",
    "base: &b {x: 1, y: 2}\nother: *b\nlist: [*b, *b]\n",
    "[1, 2, 3]\n",
    "just a string\n",
]


@pytest.mark.parametrize("text", SAFE_LOAD_CASES)
def test_values_equal_safe_load(text: str) -> None:
    src = parse_text(text, "f.yaml")
    assert src.problems == []
    assert src.data == yaml.safe_load(text)


json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.dates()
    | st.datetimes(timezones=st.just(UTC)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(json_like, st.sampled_from([True, False]))
def test_safe_dump_round_trips_like_safe_load(value: object, flow: bool) -> None:
    text = yaml.safe_dump(value, default_flow_style=flow, allow_unicode=True)
    src = parse_text(text, "f.yaml")
    assert src.problems == []
    assert src.data == yaml.safe_load(text)


def test_merge_keys_follow_safe_constructor() -> None:
    text = (
        "a: &a {x: 1, y: 1, z: 1}\nb: &b {y: 2, w: 2}\nc:\n  <<: [*b, *a]\n  z: 3\nd:\n  <<: *a\n"
    )
    src = parse_text(text, "f.yaml")
    assert src.problems == []
    assert src.data == yaml.safe_load(text)
    assert src.data["c"] == {"x": 1, "y": 2, "z": 3, "w": 2}
    # merged keys are located where they are written: in the anchor
    assert src.keys[("c", "x")] == Loc(1, 8, "x", 8)
    assert src.values[("c", "w")] == Loc(2, 17, "2", 17)
    assert src.keys[("c", "z")] == Loc(5, 3, "z", 3)


def test_merge_of_a_scalar_is_located() -> None:
    assert problems("a: 1\nb:\n  <<: 5\n  c: 1\n") == [
        "f.yaml:3:7: a merge key '<<' needs a mapping or a list of mappings (<<: *base)"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: 1\nb: 2\na: 3\n", ["f.yaml:3:1: duplicate key 'a' (first at line 1)"]),
        ("x:\n  y:\n    k: 1\n    k: 2\n", ["f.yaml:4:5: duplicate key 'k' (first at line 3)"]),
        ("x: {k: 1, k: 2}\n", ["f.yaml:1:11: duplicate key 'k' (first at line 1)"]),
        ("- {k: 1}\n- {k: 1, 'k': 2}\n", ["f.yaml:2:10: duplicate key 'k' (first at line 2)"]),
        ("1: a\n1: b\n", ["f.yaml:2:1: duplicate key 1 (first at line 1)"]),
        (
            "a: &a {x: 1}\nb:\n  <<: *a\n  <<: *a\n",
            ["f.yaml:4:3: duplicate key '<<' (first at line 3)"],
        ),
    ],
)
def test_duplicate_keys_are_errors_at_the_second_key(text: str, expected: list[str]) -> None:
    assert problems(text) == expected


def test_the_first_of_two_duplicate_keys_is_kept() -> None:
    assert parse_text("a: 1\na: 2\n", "f.yaml").data == {"a": 1}


def test_a_key_written_next_to_a_merge_is_not_a_duplicate() -> None:
    assert problems("a: &a {x: 1}\nb:\n  <<: *a\n  x: 2\n") == []


def test_python_tags_construct_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = (
        f"a: !!python/object/apply:os.system ['touch {marker}']\n"
        f"b: !!python/object/new:os.system ['touch {marker}']\n"
        "c: !!python/name:os.system\n"
    )
    src = parse_text(text, "f.yaml")
    assert not marker.exists()
    assert [str(p) for p in src.problems] == [
        "f.yaml:1:4: unsupported YAML tag '!!python/object/apply:os.system'",
        "f.yaml:2:4: unsupported YAML tag '!!python/object/new:os.system'",
        "f.yaml:3:4: unsupported YAML tag '!!python/name:os.system'",
    ]
    assert src.data == {"a": INVALID, "b": INVALID, "c": INVALID}
    assert src.invalid == {("a",), ("b",), ("c",)}
    assert src.is_invalid(("a", "deeper")) and not src.is_invalid(("d",))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: !custom x\n", "f.yaml:1:4: unsupported YAML tag '!custom'"),
        ("a: !!set {x}\n", "f.yaml:1:4: unsupported YAML tag '!!set'"),
        ("a: !!binary aGk=\n", "f.yaml:1:4: unsupported YAML tag '!!binary'"),
        ("a: !!omap [x: 1]\n", "f.yaml:1:4: unsupported YAML tag '!!omap'"),
        ("a: !!str [1]\n", "f.yaml:1:4: unsupported YAML tag '!!str'"),
        (
            "a: !!int x\n",
            "f.yaml:1:4: 'x' is not a valid integer: invalid literal for int() with base 10: 'x'",
        ),
        (
            "a: 2025-02-30\n",
            "f.yaml:1:4: '2025-02-30' is not a valid date/time: day is out of range for month",
        ),
        ("!foo k: 1\n", "f.yaml:1:1: unsupported YAML tag '!foo'"),
        ("[1]: x\n", "f.yaml:1:1: a mapping key must be a plain value, not a list or mapping"),
    ],
)
def test_unsupported_or_broken_values_are_located(text: str, message: str) -> None:
    assert problems(text) == [message]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "a: [1\n",
            "f.yaml:2:1: YAML syntax error: expected ',' or ']', but got '<stream end>'"
            " (while parsing a flow sequence at line 1, column 4)",
        ),
        ("a: 1\n b: 2\n", "f.yaml:2:3: YAML syntax error: mapping values are not allowed here"),
        (
            "a:\n\tb: 1\n",
            "f.yaml:2:1: YAML syntax error: found character '\\t' that cannot start any token;"
            " indent with spaces, not tabs",
        ),
        (
            "cron: @daily\n",
            "f.yaml:1:7: YAML syntax error: found character '@' that cannot start any token;"
            " quote values that start with '@', e.g. cron: '@daily'",
        ),
        (
            "cron: */5 * * * *\n",
            "f.yaml:1:8: YAML syntax error: expected alphabetic or numeric character, but found"
            " '/' (while scanning an alias); quote values that start with '*',"
            " e.g. cron: '*/5 * * * *'",
        ),
        ("a: *nope\n", "f.yaml:1:4: YAML syntax error: found undefined alias 'nope'"),
        (
            "a: 1\n---\nb: 2\n",
            "f.yaml:2:1: YAML syntax error: expected a single document in the stream,"
            " but found another document",
        ),
        ("a: \x07\n", "f.yaml:1:4: the file contains a control character U+0007"),
    ],
)
def test_syntax_errors_are_located_and_fatal(text: str, message: str) -> None:
    src = parse_text(text, "f.yaml")
    assert [str(p) for p in src.problems] == [message]
    assert src.fatal and src.data is None


def test_encodings() -> None:
    assert parse_bytes(b"\xef\xbb\xbfa: 1\n", "f.yaml").data == {"a": 1}
    assert parse_bytes("a: ü\n".encode("utf-16"), "f.yaml").data == {"a": "ü"}
    src = parse_bytes(b"a: 1\nb: \xff\xfe\n", "f.yaml")
    assert [str(p) for p in src.problems] == [
        "f.yaml:2:4: the file is not valid UTF-8 text (invalid start byte)"
    ]
    assert src.fatal


@pytest.mark.parametrize("text", ["", "# just a comment\n", "---\n", "\n\n"])
def test_empty_documents_have_no_data_and_no_problem(text: str) -> None:
    src = parse_text(text, "f.yaml")
    assert (src.data, src.problems, src.fatal) == (None, [], False)


def test_a_recursive_alias_is_an_error_not_a_hang() -> None:
    assert problems("a: &a [1, *a]\n") == [
        "f.yaml:1:4: an alias refers to a value that contains it (a cycle)"
    ]
    assert problems("a: &a\n  b: 1\n  <<: *a\n") == [
        "f.yaml:1:4: a merge key refers to a mapping that contains it (a cycle)"
    ]


def test_alias_bombs_are_refused_quickly() -> None:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    start = time.perf_counter()
    src = parse_text("\n".join(lines) + "\n", "f.yaml")
    assert time.perf_counter() - start < 5
    assert src.fatal and src.data is None
    assert [p.message for p in src.problems] == ["aliases expand to too many values; simplify them"]


def test_legitimate_alias_reuse_is_fine() -> None:
    text = "base: &b {retries: 2, env: {A: '1'}}\njobs:\n" + "".join(
        f"  j{i}:\n    <<: *b\n    every: {i + 1}m\n" for i in range(2000)
    )
    src = parse_text(text, "f.yaml")
    assert src.problems == []
    assert src.data["jobs"]["j1999"] == {"retries": 2, "env": {"A": "1"}, "every": "2000m"}


def test_deep_nesting_is_refused() -> None:
    too_deep = "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5)
    assert problems(too_deep) == [
        f"f.yaml:1:{MAX_DEPTH + 2}: the document nests deeper than {MAX_DEPTH} levels"
    ]
    very_deep = "[" * 5000 + "]" * 5000
    assert [p.message for p in parse_text(very_deep, "f.yaml").problems] == [
        f"the document nests deeper than {MAX_DEPTH} levels"
    ]


def test_timestamps_keep_safe_load_types() -> None:
    data = parse_text(
        "a: 2025-06-01\nb: 2025-06-01 10:00:00\nc: 2025-06-01T10:00:00+02:00\n", "f"
    ).data
    assert data["a"] == date(2025, 6, 1)
    assert data["b"] == datetime(2025, 6, 1, 10, 0)
    assert data["c"] == datetime(2025, 6, 1, 10, 0, tzinfo=timezone(timedelta(hours=2)))
