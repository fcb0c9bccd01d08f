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

Speed and memory (a config may hold 100,000 jobs, over a million values):
nearly every file is valid, and only a problem needs a position, so three
passes share the work and each gives up where the next one must take over:

1. :class:`_Events` builds the values straight from libyaml's parse events,
   with no node graph (a graph for 100,000 jobs is about 500 MB, and the
   fragmented heap it leaves is never returned to the system). It records the
   few positions a valid file's loader needs; any other position is found by
   composing the file when first asked (:attr:`Source.locator`).
2. If the file has anchors, aliases, merge keys, explicit tags or anything
   to report, it is composed and :class:`_Fast` builds the values from the
   nodes, still without bookkeeping.
3. If that meets anything to report, :class:`_Builder` builds them again and
   reports every problem. Positions come from :class:`_Locator`, which walks
   the nodes by the rules the builds follow.

The cyclic garbage collector is paused meanwhile (see :func:`gc_paused`).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, NamedTuple, overload

import yaml
from yaml.constructor import SafeConstructor
from yaml.events import (
    DocumentEndEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
    StreamStartEvent,
)
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
_STR: Final = _CORE + "str"
_SEQ: Final = _CORE + "seq"
_MAP: Final = _CORE + "map"
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
    """A parsed file. ``fatal`` means ``data`` is unusable (a syntax error).

    ``keys[path]`` / ``values[path]`` locate a key or value. They are worked
    out on demand from the composed nodes (see :class:`_Locator`); a file read
    by the event pass is composed only when something asks, which a valid
    file never needs: the event pass records the lines of the keys of each
    mapping under the top level (each job's line) and the text of each scalar
    whose value does not print as it is written (``every: 1e3``).
    """

    name: str
    data: Any = None
    invalid: set[PathT] = field(default_factory=set)
    problems: list[Problem] = field(default_factory=list)
    fatal: bool = False
    _locator: _Locator | None = field(default=None, repr=False, compare=False)
    _text: str | None = field(default=None, repr=False, compare=False)  # composed on demand
    _lines: dict[Any, dict[Any, int]] = field(default_factory=dict, repr=False, compare=False)
    _texts: dict[tuple[int, Any], str] = field(default_factory=dict, repr=False, compare=False)
    _from_events: bool = field(default=False, repr=False, compare=False)

    @property
    def locator(self) -> _Locator | None:
        if self._locator is None and self._text is not None:
            text, self._text = self._text, None
            with gc_paused():
                try:
                    root = _compose(text)
                except (yaml.YAMLError, RecursionError):  # pragma: no cover - parsed before
                    root = None
            if root is not None:
                self._locator = _Locator(root, text)
        return self._locator

    @property
    def keys(self) -> _Locations:
        return _Locations(self.locator, keys=True)

    @property
    def values(self) -> _Locations:
        return _Locations(self.locator, keys=False)

    def key_loc(self, path: PathT) -> Loc:
        """The key at ``path``, else the nearest enclosing key, else the file start."""
        locator = self.locator
        if locator is not None:
            loc = locator.nearest_key(path)
            if loc is not None:
                return loc
        return self.values.get((), Loc(1, 1))

    def key_line(self, path: PathT) -> int:
        """``key_loc(path).line``, without working out the column and text."""
        if len(path) == 2:
            line = self._lines.get(path[0], {}).get(path[1])
            if line is not None:
                return line
        locator = self.locator
        if locator is not None:
            for key_node, _node in reversed(locator.steps(path)):
                if key_node is not None:
                    found: int = key_node.start_mark.line + 1
                    return found
        return self.key_loc(path).line

    def key_lines(self, path: PathT) -> dict[Any, int]:
        """``key_line`` of every key of the mapping at ``path``, in one pass (a
        loader that wants the line of each of 100,000 jobs asks this once)."""
        if len(path) == 1 and path[0] in self._lines:
            return self._lines[path[0]]
        locator = self.locator
        if locator is None:
            return {}
        steps = locator.steps(path)
        if len(steps) < len(path):
            return {}
        node = steps[-1][1] if path else locator.root
        if not (isinstance(node, MappingNode) and node.tag == _MAP):
            return {}
        if path and id(node) in {id(n) for _k, n in steps[:-1]} | {id(locator.root)}:
            return {}  # an alias cycle: the build did not go into this mapping again
        return {k: key.start_mark.line + 1 for k, (key, _v) in locator.table(node).items()}

    def written(self, container: Any, key: Any, path: PathT) -> str:
        """The text of the scalar ``container[key]`` (found at ``path``) as written,
        after quote processing: ``value_loc(path).raw``, without composing."""
        value = container[key]
        if isinstance(value, str):
            return value
        if self._from_events:  # it recorded every scalar that prints otherwise
            text = self._texts.get((id(container), key))
            return text if text is not None else str(value)
        loc = self.value_loc(path)
        return loc.raw if loc.raw is not None else str(value)

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


class _Locations:
    """``src.keys`` / ``src.values``: the location of a path, looked up on demand."""

    __slots__ = ("_keys", "_locator")

    def __init__(self, locator: _Locator | None, *, keys: bool) -> None:
        self._locator = locator
        self._keys = keys

    @overload
    def get(self, path: PathT) -> Loc | None: ...
    @overload
    def get(self, path: PathT, default: Loc) -> Loc: ...
    def get(self, path: PathT, default: Loc | None = None) -> Loc | None:
        if self._locator is None:
            return default
        found = self._locator.key(path) if self._keys else self._locator.value(path)
        return default if found is None else found

    def __getitem__(self, path: PathT) -> Loc:
        found = self.get(path)
        if found is None:
            raise KeyError(path)
        return found

    def __contains__(self, path: object) -> bool:
        return isinstance(path, tuple) and self.get(path) is not None


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


#: Objects left young by a paused build beyond which resuming freezes them (see gc_paused).
FREEZE_ABOVE: Final = 200_000


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building large acyclic structures.

    Building a config allocates millions of objects that all stay alive; every
    few hundred allocations the collector would walk the young ones, and
    every so often all of them, finding nothing to free (measured: more than
    half of the load time). Reference counting still frees everything
    unreachable; cycles made meanwhile wait for the next collection.

    Resuming has a cost too: every object allocated during the pause is
    still in the youngest generation, and the next collection walks them all,
    then again on each promotion (seconds for 100,000 jobs). So when more than
    :data:`FREEZE_ABOVE` of them survive, the outermost pause ends with
    ``gc.freeze()``, which moves every live object to the permanent
    generation the collector never walks (what CPython's docs advise for
    long-lived start-up state); they are still freed by reference counting.
    Small loads (tests, small configs) never freeze anything.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            if gc.get_count()[0] > FREEZE_ABOVE:
                gc.freeze()
            gc.enable()


try:
    from yaml import CSafeLoader as _CSafeLoader
except ImportError:  # PyYAML built without libyaml
    _CLoader: type[Any] | None = None
else:
    _base_resolve: Callable[..., str] = _CSafeLoader.resolve

    class _CachingCLoader(_CSafeLoader):
        """libyaml's safe loader, resolving each distinct plain scalar once.

        Resolving a plain scalar's implicit tag is a Python call (regexes per
        first character) for every scalar libyaml composes; a config repeats
        the same keys and many values, so the answer is cached per text. Path
        resolvers are the only other input to ``resolve``: this class has none
        of its own (``yaml_path_resolvers``), so the cache is exact.
        """

        def __init__(self, stream: str) -> None:
            super().__init__(stream)
            self.yaml_path_resolvers = {}
            self.resolved: dict[str, str] = {}

        def resolve(self, kind: type[Node], value: Any, implicit: Any) -> str:
            if kind is ScalarNode:
                if not implicit[0]:  # quoted, or a plain scalar with an explicit "!" tag
                    return _STR
                tag = self.resolved.get(value)
                if tag is None:
                    tag = self.resolved[value] = _base_resolve(self, kind, value, implicit)
                return tag
            return _SEQ if kind is SequenceNode else _MAP

        def descend_resolver(self, current_node: Any, current_index: Any) -> None:
            return None  # only path resolvers use it, and there are none

        def ascend_resolver(self) -> None:
            return None

    _CLoader = _CachingCLoader


def _compose(text: str) -> Node | None:
    """The document's node graph, or a YAMLError.

    libyaml (``CSafeLoader``) composes about three times faster than the pure
    Python parser, which matters for configs with thousands of jobs; it shares
    PyYAML's resolver, so tags mean the same. Any error is reproduced with the
    pure Python parser, whose messages the tests and users see. The caller
    runs PyYAML's check for control characters first, so libyaml accepts
    nothing that ``safe_load`` refuses.
    """
    if _CLoader is not None:
        loader = _CLoader(text)
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
    """Parse one YAML document. Problems are collected, never raised.

    The event pass (:class:`_Events`) reads nearly every real config: no
    node graph is built, which saves a third of the time and most of the
    peak memory (the graph of a 100,000-job file is about 500 MB, and what it
    leaves fragmented is never returned to the system). Anything it does not
    handle (anchors and aliases, merge keys, explicit tags, problems to
    report) sends the file through composition and the node builds.
    """
    src = Source(name)
    with gc_paused():
        try:
            Reader(text)  # raises ReaderError for control characters, as safe_load does
            if _CLoader is not None:
                try:
                    return _Events(_CLoader(text), text, name).source()
                except (_Bail, yaml.YAMLError):
                    pass  # composition below reports it, or handles what needs nodes
            root = _compose(text)
        except ReaderError as exc:
            before = text[: exc.position]
            line = before.count("\n") + 1
            col = exc.position - (before.rfind("\n") + 1) + 1
            char = (
                f"U+{exc.character:04X}" if isinstance(exc.character, int) else repr(exc.character)
            )
            message = f"the file contains a control character {char}"
            return Source(name, problems=[Problem(name, line, col, message)], fatal=True)
        except yaml.YAMLError as exc:
            return Source(name, problems=[_syntax_problem(name, exc)], fatal=True)
        except RecursionError:
            message = f"the document nests deeper than {MAX_DEPTH} levels"
            return Source(name, problems=[Problem(name, 1, 1, message)], fatal=True)
        if root is None:
            return src
        src._locator = _Locator(root, text)
        try:
            src.data = _Fast(text).build(root, 0)
            return src
        except _Bail:
            pass
        builder = _Builder(src, text)
        try:
            src.data = builder.node(root, (), 0)
        except _Abort as abort:
            src.problems.append(abort.problem)
            src.data, src.fatal = None, True
    src.problems = list(dict.fromkeys(src.problems))
    return src


class _Events:
    """The event pass: values straight from libyaml's parse events, no nodes.

    The same values as the node builds for any file it finishes; it raises
    :class:`_Bail` at an anchor or alias, a tag it would have to check, a merge
    key, a duplicate key, a key that is not a scalar, a scalar that does not
    construct, or deep nesting, and :class:`yaml.YAMLError` at a syntax error.
    Along the way it records what a valid file's loader asks about (see
    :class:`Source`). Resolving scalars goes through the loader's cached
    ``resolve``, exactly as composition does.
    """

    __slots__ = ("ctor", "get", "lines", "name", "resolve", "resolved", "text", "texts")

    def __init__(self, loader: Any, text: str, name: str) -> None:
        self.get = loader.get_event
        self.resolve = loader.resolve
        self.resolved: dict[str, str] = loader.resolved
        self.ctor = SafeConstructor()
        self.text = text
        self.name = name
        self.lines: dict[Any, dict[Any, int]] = {}
        self.texts: dict[tuple[int, Any], str] = {}

    def source(self) -> Source:
        get = self.get
        if get().__class__ is not StreamStartEvent:  # pragma: no cover - libyaml always sends it
            raise _Bail
        event = get()
        if event.__class__ is StreamEndEvent:
            return Source(self.name, _text=self.text, _from_events=True)  # no document at all
        if event.__class__ is not DocumentStartEvent:  # pragma: no cover
            raise _Bail
        event = get()
        if event.__class__ is ScalarEvent:
            data = self.scalar(event, None, None)
        else:
            data = self.container(event, 0, None, top=True)
        if get().__class__ is not DocumentEndEvent or get().__class__ is not StreamEndEvent:
            raise _Bail  # another document: composition reports it
        return Source(
            self.name, data, _text=self.text, _lines=self.lines, _texts=self.texts,
            _from_events=True,
        )  # fmt: skip

    def scalar(self, event: Any, container: Any, key: Any) -> Any:
        """The value of a ScalarEvent; its text is recorded if the value prints otherwise."""
        if event.anchor is not None:
            raise _Bail
        tag, value = event.tag, event.value
        if tag is None or tag == "!":
            tag = self.resolve(ScalarNode, value, event.implicit)
        if tag == _STR:
            return value
        construct = _SCALAR_TAGS.get(tag)
        if construct is None:
            raise _Bail
        node = ScalarNode(tag, value, event.start_mark, event.end_mark, event.style)
        try:
            out = construct(self.ctor, node)
        except Exception:  # reported, with its reason, by the careful build
            raise _Bail from None
        if container is not None and str(out) != value:
            self.texts[id(container), key] = value
        return out

    def plain(self, event: Any) -> Any:
        """A scalar event's value when it is a plain or quoted string (most are),
        else :data:`_NOT_STR`; inlined where it counts, as the resolver cache is."""
        if event.anchor is not None or event.tag is not None:
            return _NOT_STR
        value = event.value
        if not event.implicit[0]:  # quoted: a string
            return value
        tag = self.resolved.get(value) or self.resolve(ScalarNode, value, event.implicit)
        return value if tag == _STR else _NOT_STR

    def container(self, event: Any, depth: int, lines: dict[Any, int] | None, top: bool) -> Any:
        """The mapping or list that ``event`` starts. ``lines`` collects the line of
        each key (mappings under the top level); ``top``: this is the top level."""
        cls = event.__class__
        if depth >= MAX_DEPTH - 1 or event.anchor is not None:
            raise _Bail
        get, plain = self.get, self.plain
        if cls is MappingStartEvent:
            if event.tag not in (None, "!", _MAP):
                raise _Bail
            out: dict[Any, Any] = {}
            while True:
                event = get()
                cls = event.__class__
                if cls is ScalarEvent:
                    key = plain(event)
                    if key is _NOT_STR:
                        key = self.scalar(event, None, None)  # "<<" (a merge) does not construct
                    if key in out:
                        raise _Bail
                    if lines is not None:
                        lines[key] = event.start_mark.line + 1
                elif cls is MappingEndEvent:
                    return out
                else:
                    raise _Bail  # a key that is a list or mapping, or an alias
                event = get()
                if event.__class__ is ScalarEvent:
                    value = plain(event)
                    out[key] = self.scalar(event, out, key) if value is _NOT_STR else value
                else:
                    under = None
                    if top and event.__class__ is MappingStartEvent:
                        under = self.lines[key] = {}
                    out[key] = self.container(event, depth + 1, under, False)
        if cls is SequenceStartEvent:
            if event.tag not in (None, "!", _SEQ):
                raise _Bail
            items: list[Any] = []
            while True:
                event = get()
                cls = event.__class__
                if cls is ScalarEvent:
                    value = plain(event)
                    if value is _NOT_STR:
                        value = self.scalar(event, items, len(items))
                    items.append(value)
                elif cls is SequenceEndEvent:
                    return items
                else:
                    items.append(self.container(event, depth + 1, None, False))
        raise _Bail  # an alias


_NOT_STR: Final = object()


def _loc(node: Node, text: str) -> Loc:
    m = node.start_mark
    line, col = m.line + 1, m.column + 1
    if not isinstance(node, ScalarNode):
        return Loc(line, col)
    value, style = node.value, node.style
    written = text[m.index : node.end_mark.index]
    if written == value and "\n" not in value:
        return Loc(line, col, value, col)
    if style in ("'", '"') and written == f"{style}{value}{style}" and "\n" not in value:
        return Loc(line, col, value, col + 1)
    return Loc(line, col, value, None)


def _is_empty(node: Node) -> bool:
    """``key:`` with nothing after it: the value has no text of its own."""
    return isinstance(node, ScalarNode) and node.value == "" and not node.style


class _Bail(Exception):
    """The lean build met something to report; the careful build takes over."""


MergeError = Callable[[Node, str], None]


def merge_sources(value: Node, on_error: MergeError | None = None) -> list[MappingNode]:
    """The mappings a merge key (``<<``) names; ``on_error`` hears about anything else.

    One walk for all three readers of a file (fast path, builder, locator), which
    differ only in what a bad merge means to them: bail out, report, or ignore.
    """
    if isinstance(value, MappingNode):
        return [value]
    if isinstance(value, SequenceNode) and all(isinstance(n, MappingNode) for n in value.value):
        return list(value.value)
    if on_error is not None:
        on_error(value, "a merge key '<<' needs a mapping or a list of mappings (<<: *base)")
    return []


def flatten(
    node: MappingNode, on_error: MergeError | None = None, seen: frozenset[int] = frozenset()
) -> Iterator[tuple[Node, Node]]:
    """A merge source's entries, highest priority first: its own keys, then its merges."""
    if id(node) in seen:
        if on_error is not None:
            on_error(node, "a merge key refers to a mapping that contains it (a cycle)")
        return
    nested: list[MappingNode] = []
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE_TAG:
            if not nested:
                nested = merge_sources(value_node, on_error)
        else:
            yield key_node, value_node
    for source in nested:
        yield from flatten(source, on_error, seen | {id(node)})


def _bail(_node: Node, _message: str) -> None:
    raise _Bail


class _Fast:
    """The lean build: the same values as :class:`_Builder` for any file it
    finishes, and no bookkeeping (paths, problems, alias accounting).

    It raises :class:`_Bail` wherever the careful build would report a
    problem, and also when it has built far more values than the text could
    hold without aliases (``limit``), which bounds an alias bomb's cost here
    before the careful build refuses it. Cycles end at the depth limit.
    """

    __slots__ = ("ctor", "limit", "visits")

    def __init__(self, text: str) -> None:
        self.ctor = SafeConstructor()
        self.visits = 0
        # Each node needs at least one character (or a separator) of its own.
        self.limit = 2 * len(text) + 1000

    def scalar(self, node: Any) -> Any:  # a ScalarNode
        tag = node.tag
        if tag == _STR:
            return node.value
        construct = _SCALAR_TAGS.get(tag)
        if construct is None:
            raise _Bail
        try:
            return construct(self.ctor, node)
        except Exception:  # reported, with its reason, by the careful build
            raise _Bail from None

    def build(self, node: Node, depth: int) -> Any:
        # The careful build refuses any node deeper than MAX_DEPTH, scalars included.
        if depth >= MAX_DEPTH:
            raise _Bail
        cls = node.__class__
        if cls is ScalarNode:
            return self.scalar(node)
        items = node.value
        self.visits += len(items) + 1
        if self.visits > self.limit:
            raise _Bail
        if cls is MappingNode and node.tag == _MAP:
            return self.mapping(items, depth)
        if cls is SequenceNode and node.tag == _SEQ:
            out: list[Any] = []
            append = out.append
            for item in items:
                if item.__class__ is ScalarNode:
                    append(item.value if item.tag == _STR else self.scalar(item))
                else:
                    append(self.build(item, depth + 1))
            return out
        raise _Bail

    def mapping(self, items: list[tuple[Node, Node]], depth: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        merge: Node | None = None
        for key_node, value_node in items:
            if key_node.__class__ is not ScalarNode:
                raise _Bail
            tag = key_node.tag
            if tag == _STR:
                key = key_node.value
            elif tag == _MERGE_TAG:
                if merge is not None:
                    raise _Bail
                merge = value_node
                continue
            else:
                key = self.scalar(key_node)
            if key in out:
                raise _Bail
            if value_node.__class__ is ScalarNode:
                out[key] = value_node.value if value_node.tag == _STR else self.scalar(value_node)
            else:
                out[key] = self.build(value_node, depth + 1)
        if merge is not None:
            for source in merge_sources(merge, _bail):
                for key_node, value_node in flatten(source, _bail):
                    if key_node.__class__ is not ScalarNode:
                        raise _Bail
                    key = self.scalar(key_node)
                    if key not in out:
                        out[key] = self.build(value_node, depth + 1)
        return out


class _Builder:
    """The careful build: constructs values from nodes and reports every problem.

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
        return _loc(node, self.text)

    def fail(self, node: Node, path: PathT | None, message: str) -> _Invalid:
        self.src.problems.append(self.src.problem(self.loc(node), message))
        if path is not None:
            self.src.invalid.add(path)
        return INVALID

    def node(self, node: Node, path: PathT, depth: int) -> Any:
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
        if isinstance(node, ScalarNode):
            return self.scalar(node, path)
        if id(node) in self.active:
            return self.fail(node, path, "an alias refers to a value that contains it (a cycle)")
        self.active.add(id(node))
        try:
            if isinstance(node, SequenceNode) and node.tag == _SEQ:
                return [self.node(n, (*path, i), depth + 1) for i, n in enumerate(node.value)]
            if isinstance(node, MappingNode) and node.tag == _MAP:
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
        first: dict[Any, Node] = {}
        merges: list[MappingNode] = []
        merge_at: Node | None = None
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                if merge_at is not None:
                    line = merge_at.start_mark.line + 1
                    self.fail(key_node, None, f"duplicate key '<<' (first at line {line})")
                    continue
                merge_at = key_node
                merges = merge_sources(value_node, self._merge_error)
                continue
            key = self.key(key_node)
            if key is INVALID:
                continue
            if key in first:
                line = first[key].start_mark.line + 1
                self.fail(key_node, None, f"duplicate key {kind(key)} (first at line {line})")
                continue
            first[key] = key_node
            out[key] = self.node(value_node, (*path, key), depth + 1)
        for source in merges:
            for key_node, value_node in flatten(source, self._merge_error):
                key = self.key(key_node)
                if key is INVALID or key in out:
                    continue
                out[key] = self.node(value_node, (*path, key), depth + 1)
        return out

    def _merge_error(self, node: Node, message: str) -> None:
        self.fail(node, None, message)


_NO_KEY: Final = object()
_Entry = tuple[Node | None, Node]


class _Locator:
    """Finds the key and value nodes behind a path, by the rules the build followed.

    A mapping's entries are its own keys (the first of duplicates; keys that
    could not be built are skipped), then keys from its merge sources that it
    does not write itself, located in the anchor where they are written. A
    path does not continue into a container it already passed through (an
    alias cycle), nor into a node with an unsupported tag. Entry tables of
    large mappings are kept, since a loader asks about many of their keys.
    """

    #: Mappings with more entries than this keep their entry table.
    CACHE_ABOVE: ClassVar[int] = 8

    def __init__(self, root: Node, text: str) -> None:
        self.root = root
        self.text = text
        self.ctor = SafeConstructor()
        self.tables: dict[int, dict[Any, tuple[Node, Node]]] = {}

    def key(self, path: PathT) -> Loc | None:
        steps = self.steps(path)
        if not path or len(steps) < len(path):
            return None
        key_node = steps[-1][0]
        return None if key_node is None else _loc(key_node, self.text)

    def value(self, path: PathT) -> Loc | None:
        steps = self.steps(path)
        if len(steps) < len(path):
            return None
        if not path:
            return _loc(self.root, self.text)
        key_node, node = steps[-1]
        if key_node is not None and _is_empty(node):
            kloc = _loc(key_node, self.text)
            return Loc(kloc.line, kloc.col, "")
        return _loc(node, self.text)

    def nearest_key(self, path: PathT) -> Loc | None:
        for key_node, _node in reversed(self.steps(path)):
            if key_node is not None:
                return _loc(key_node, self.text)
        return None

    def steps(self, path: PathT) -> list[_Entry]:
        """(key node or None for a list item, value node) for each element of the
        longest prefix of ``path`` that exists."""
        out: list[_Entry] = []
        node = self.root
        passed: set[int] = set()
        for el in path:
            if id(node) in passed:
                break
            passed.add(id(node))
            entry: _Entry | None
            if isinstance(node, MappingNode) and node.tag == _MAP:
                try:
                    entry = self.table(node).get(el)
                except TypeError:  # an unhashable path element names nothing
                    entry = None
            elif isinstance(node, SequenceNode) and node.tag == _SEQ:
                ok = isinstance(el, int) and 0 <= el < len(node.value)
                entry = (None, node.value[el]) if ok else None
            else:
                entry = None
            if entry is None:
                break
            out.append(entry)
            node = entry[1]
        return out

    def table(self, node: MappingNode) -> dict[Any, tuple[Node, Node]]:
        found = self.tables.get(id(node))
        if found is not None:
            return found
        out: dict[Any, tuple[Node, Node]] = {}
        merges: list[MappingNode] | None = None
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                if merges is None:
                    merges = merge_sources(value_node)
                continue
            key = self.key_value(key_node)
            if key is not _NO_KEY and key not in out:
                out[key] = (key_node, value_node)
        for source in merges or ():
            for key_node, value_node in flatten(source):
                key = self.key_value(key_node)
                if key is not _NO_KEY and key not in out:
                    out[key] = (key_node, value_node)
        if len(node.value) > self.CACHE_ABOVE or node is self.root:
            self.tables[id(node)] = out
        return out

    def key_value(self, node: Node) -> Any:
        if not isinstance(node, ScalarNode):
            return _NO_KEY
        construct = _SCALAR_TAGS.get(node.tag)
        if construct is None:
            return _NO_KEY
        try:
            return construct(self.ctor, node)
        except Exception:
            return _NO_KEY
