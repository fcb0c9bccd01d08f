"""YAML text -> plain Python values, with the file position of every key and value.

``yaml.safe_load`` throws positions away and silently keeps the last of two
equal keys, so a config checker built on it cannot say *where* a mistake is,
and cannot see a duplicated job at all. Here the text is only *composed*
(``yaml.SafeLoader``: scanning, parsing, anchors) and we construct the values
ourselves from the nodes:

* scalars get exactly ``SafeConstructor``'s meaning (YAML 1.1: ``yes`` is
  true, ``2025-01-01`` a date, ``1:30`` the integer 90 ...);
* any tag outside the JSON-like core (str, int, float, bool, null, timestamp,
  seq, map) is a located error and its node is never constructed, so
  ``!!python/object/apply:...`` runs nothing; ``!!binary``/``!!set``/``!!omap``
  are refused too, because no config key wants bytes, sets or pairs;
* a duplicate key is an error at the second key (the first one is kept);
* merge keys (``<<: *base`` or ``<<: [*a, *b]``) follow ``SafeConstructor``:
  keys written in the mapping win, then earlier merge sources; a key that
  comes from a merge or alias is located where it is written, in the anchor;
* a recursive alias, or aliases that expand to far more values than the file
  holds (the "billion laughs"), is an error instead of a hang.

Paths are tuples of keys and list indexes from the document root, e.g.
``("jobs", "backup", "params", "url")``. Lines and columns are 1-based.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import Reader, ReaderError

from scheduler.errors import Problem

__all__ = ["INVALID", "MAX_DEPTH", "Loc", "PathT", "Source", "kind", "parse_bytes", "parse_text"]

PathT = tuple[Any, ...]

#: Nesting deeper than this is refused (a config needs a handful of levels).
MAX_DEPTH: Final = 100
#: Values produced by aliases beyond the ones written in the file; see _Builder.
MIN_ALIAS_BUDGET: Final = 100_000

_CORE = "tag:yaml.org,2002:"
_MERGE_TAG = _CORE + "merge"
_SCALAR_TAGS: Final = {
    _CORE + name: getattr(SafeConstructor, f"construct_yaml_{name}")
    for name in ("null", "bool", "int", "float", "str", "timestamp")
}

_TAG_WORDS: Final = {
    _CORE + "int": "integer",
    _CORE + "float": "number",
    _CORE + "bool": "boolean",
    _CORE + "timestamp": "date/time",
}


class _Invalid:
    """Stands where a value could not be constructed (its problem is already
    reported), so later checks skip it instead of piling errors on top."""

    _instance: _Invalid | None = None

    def __new__(cls) -> _Invalid:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "INVALID"


INVALID: Final = _Invalid()


class Loc(NamedTuple):
    """Where a key or value starts. ``raw`` is a scalar's text (after quote
    processing); ``text_col`` is the column of the scalar's first character
    when the scalar is written verbatim on one line (plain, or quoted without
    escapes), so an offset into the value can be turned into a column."""

    line: int
    col: int
    raw: str | None = None
    text_col: int | None = None


@dataclass
class Source:
    """A parsed file. ``fatal`` means ``data`` is unusable (a syntax error)."""

    name: str
    data: Any = None
    keys: dict[PathT, Loc] = field(default_factory=dict)
    values: dict[PathT, Loc] = field(default_factory=dict)
    invalid: set[PathT] = field(default_factory=set)
    problems: list[Problem] = field(default_factory=list)
    fatal: bool = False

    def key_loc(self, path: PathT) -> Loc:
        """The key at ``path``, else the nearest enclosing key, else the file start."""
        for n in range(len(path), 0, -1):
            loc = self.keys.get(path[:n])
            if loc is not None:
                return loc
        return self.values.get((), Loc(1, 1))

    def value_loc(self, path: PathT) -> Loc:
        loc = self.values.get(path)
        return loc if loc is not None else self.key_loc(path)

    def is_invalid(self, path: PathT) -> bool:
        """True if ``path`` is at or under a value whose problem is already reported."""
        return bool(self.invalid) and any(path[:n] in self.invalid for n in range(len(path) + 1))

    def problem(
        self, loc: Loc, message: str, *, offset: int | None = None, warning: bool = False
    ) -> Problem:
        col = loc.col
        if offset is not None and loc.text_col is not None:
            col = loc.text_col + offset
        return Problem(self.name, loc.line, col, message, "warning" if warning else "error")


def kind(value: object) -> str:
    """``value`` for a message: short scalars quoted, containers by their kind."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is INVALID:
        return "an invalid value"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _show_tag(tag: str) -> str:
    return "!!" + tag[len(_CORE) :] if tag.startswith(_CORE) else tag


class _Abort(Exception):
    def __init__(self, problem: Problem) -> None:
        self.problem = problem


def _mark(m: yaml.Mark | None) -> tuple[int, int]:
    return (m.line + 1, m.column + 1) if m is not None else (0, 0)


def _syntax_problem(name: str, exc: yaml.YAMLError) -> Problem:
    if isinstance(exc, yaml.MarkedYAMLError):
        line, col = _mark(exc.problem_mark or exc.context_mark)
        context, problem = exc.context or "", exc.problem or ""
        if context.startswith("while") and problem:
            message = f"YAML syntax error: {problem}"
            cm = exc.context_mark
            if cm is not None and exc.problem_mark is not None and cm.line != exc.problem_mark.line:
                message += f" ({context} at line {cm.line + 1}, column {cm.column + 1})"
            elif context != "while scanning for the next token":
                message += f" ({context})"
        else:
            message = f"YAML syntax error: {', '.join(t for t in (context, problem) if t)}"
        if exc.context == "while scanning an alias":
            message += "; quote values that start with '*', e.g. cron: '*/5 * * * *'"
        elif "'@'" in problem:
            message += "; quote values that start with '@', e.g. cron: '@daily'"
        elif "'\\t'" in problem:
            message += "; indent with spaces, not tabs"
        return Problem(name, line, col, message)
    return Problem(name, 0, 0, f"YAML error: {exc}")


def parse_bytes(data: bytes, name: str) -> Source:
    """Decode (UTF-8, or UTF-16 with a byte-order mark) and parse."""
    try:
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            text = data.decode("utf-16")
        else:
            text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        col = len(before) - (before.rfind(b"\n") + 1) + 1
        problem = Problem(name, line, col, f"the file is not valid UTF-8 text ({exc.reason})")
        return Source(name, problems=[problem], fatal=True)
    return parse_text(text, name)


def _compose(text: str) -> Node | None:
    """The document's node graph, or a YAMLError.

    libyaml (``CSafeLoader``) composes about three times faster than the pure
    Python parser, which matters for configs with thousands of jobs; it shares
    PyYAML's resolver, so tags mean the same. Any error is reproduced with the
    pure Python parser, whose messages the tests and users see, and PyYAML's
    check for control characters always runs first, so libyaml accepts nothing
    that ``safe_load`` refuses.
    """
    Reader(text)  # raises ReaderError for control characters, as safe_load does
    fast = getattr(yaml, "CSafeLoader", None)
    if fast is not None:
        loader = fast(text)
        try:
            node: Node | None = loader.get_single_node()
            return node
        except yaml.YAMLError:
            pass
        finally:
            loader.dispose()
    slow = yaml.SafeLoader(text)
    try:
        return slow.get_single_node()
    finally:
        slow.dispose()


def parse_text(text: str, name: str) -> Source:
    """Parse one YAML document. Problems are collected, never raised."""
    src = Source(name)
    try:
        root = _compose(text)
    except ReaderError as exc:
        before = text[: exc.position]
        line = before.count("\n") + 1
        col = exc.position - (before.rfind("\n") + 1) + 1
        char = f"U+{exc.character:04X}" if isinstance(exc.character, int) else repr(exc.character)
        message = f"the file contains a control character {char}"
        return Source(name, problems=[Problem(name, line, col, message)], fatal=True)
    except yaml.YAMLError as exc:
        return Source(name, problems=[_syntax_problem(name, exc)], fatal=True)
    except RecursionError:
        message = f"the document nests deeper than {MAX_DEPTH} levels"
        return Source(name, problems=[Problem(name, 1, 1, message)], fatal=True)
    if root is None:
        return src
    builder = _Builder(src, text)
    try:
        src.data = builder.node(root, (), 0)
    except _Abort as abort:
        src.problems.append(abort.problem)
        src.data, src.fatal = None, True
    src.problems = list(dict.fromkeys(src.problems))
    return src


class _Builder:
    """Constructs values from nodes, recording positions as it goes.

    Aliases make the node graph a DAG, so one node may be built at several
    paths; that is what aliases are for, but it can also be exponential. Every
    build beyond the first of a node counts against a budget proportional to
    the file (at least :data:`MIN_ALIAS_BUDGET`), which no real config nears.
    """

    def __init__(self, src: Source, text: str) -> None:
        self.src = src
        self.text = text
        self.ctor = SafeConstructor()
        self.built: set[int] = set()
        self.visits = 0
        self.active: set[int] = set()

    def loc(self, node: Node) -> Loc:
        m = node.start_mark
        line, col = m.line + 1, m.column + 1
        if not isinstance(node, ScalarNode):
            return Loc(line, col)
        value, style = node.value, node.style
        written = self.text[m.index : node.end_mark.index]
        if written == value and "\n" not in value:
            return Loc(line, col, value, col)
        if style in ("'", '"') and written == f"{style}{value}{style}" and "\n" not in value:
            return Loc(line, col, value, col + 1)
        return Loc(line, col, value, None)

    def fail(self, node: Node, path: PathT | None, message: str) -> _Invalid:
        self.src.problems.append(self.src.problem(self.loc(node), message))
        if path is not None:
            self.src.invalid.add(path)
        return INVALID

    def node(self, node: Node, path: PathT, depth: int, at: Loc | None = None) -> Any:
        self.visits += 1
        self.built.add(id(node))
        if self.visits - len(self.built) > max(MIN_ALIAS_BUDGET, 10 * len(self.built)):
            raise _Abort(
                self.src.problem(self.loc(node), "aliases expand to too many values; simplify them")
            )
        if depth > MAX_DEPTH:
            raise _Abort(
                self.src.problem(
                    self.loc(node), f"the document nests deeper than {MAX_DEPTH} levels"
                )
            )
        self.src.values[path] = at or self.loc(node)
        if isinstance(node, ScalarNode):
            return self.scalar(node, path)
        if id(node) in self.active:
            return self.fail(node, path, "an alias refers to a value that contains it (a cycle)")
        self.active.add(id(node))
        try:
            if isinstance(node, SequenceNode) and node.tag == _CORE + "seq":
                return [self.node(n, (*path, i), depth + 1) for i, n in enumerate(node.value)]
            if isinstance(node, MappingNode) and node.tag == _CORE + "map":
                return self.mapping(node, path, depth)
        finally:
            self.active.discard(id(node))
        return self.fail(node, path, f"unsupported YAML tag '{_show_tag(node.tag)}'")

    def scalar(self, node: ScalarNode, path: PathT | None) -> Any:
        construct = _SCALAR_TAGS.get(node.tag)
        if construct is None:
            return self.fail(node, path, f"unsupported YAML tag '{_show_tag(node.tag)}'")
        try:
            return construct(self.ctor, node)
        except Exception as exc:  # SafeConstructor raises whatever it hits on bad text
            detail = f": {exc}" if isinstance(exc, ValueError) else ""
            what = _TAG_WORDS.get(node.tag, _show_tag(node.tag))
            return self.fail(node, path, f"{node.value!r} is not a valid {what}{detail}")

    def key(self, node: Node) -> Any:
        if not isinstance(node, ScalarNode):
            return self.fail(
                node, None, "a mapping key must be a plain value, not a list or mapping"
            )
        return self.scalar(node, None)

    def mapping(self, node: MappingNode, path: PathT, depth: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        first: dict[Any, Loc] = {}
        merges: list[MappingNode] = []
        merge_loc: Loc | None = None
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                if merge_loc is not None:
                    self.fail(
                        key_node, None, f"duplicate key '<<' (first at line {merge_loc.line})"
                    )
                    continue
                merge_loc = self.loc(key_node)
                merges = self.merge_sources(value_node)
                continue
            key = self.key(key_node)
            if key is INVALID:
                continue
            kloc = self.loc(key_node)
            if key in first:
                self.fail(
                    key_node, None, f"duplicate key {kind(key)} (first at line {first[key].line})"
                )
                continue
            first[key] = kloc
            out[key] = self.entry(path, key, kloc, value_node, depth)
        for source in merges:
            for key_node, value_node in self.flatten(source):
                key = self.key(key_node)
                if key is INVALID or key in out:
                    continue
                out[key] = self.entry(path, key, self.loc(key_node), value_node, depth)
        return out

    def entry(self, path: PathT, key: Any, kloc: Loc, value: Node, depth: int) -> Any:
        sub = (*path, key)
        self.src.keys[sub] = kloc
        # An empty value (``key:``) has no text of its own: point at its key.
        empty = isinstance(value, ScalarNode) and value.value == "" and not value.style
        return self.node(value, sub, depth + 1, Loc(kloc.line, kloc.col, "") if empty else None)

    def merge_sources(self, value: Node) -> list[MappingNode]:
        if isinstance(value, MappingNode):
            return [value]
        if isinstance(value, SequenceNode) and all(isinstance(n, MappingNode) for n in value.value):
            return [n for n in value.value if isinstance(n, MappingNode)]
        self.fail(value, None, "a merge key '<<' needs a mapping or a list of mappings (<<: *base)")
        return []

    def flatten(
        self, node: MappingNode, seen: frozenset[int] = frozenset()
    ) -> Iterator[tuple[Node, Node]]:
        """A merge source's entries, highest priority first: its own keys, then its merges."""
        if id(node) in seen:
            self.fail(node, None, "a merge key refers to a mapping that contains it (a cycle)")
            return
        nested: list[MappingNode] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                if not nested:
                    nested = self.merge_sources(value_node)
            else:
                yield key_node, value_node
        for source in nested:
            yield from self.flatten(source, seen | {id(node)})
