"""YAML files into frozen, validated pydantic models, with Veil's error format.

Scenarios, site policies and site configs all enter here: one reader, one way of saying
what is wrong (each bad field by its path, what it got, and for an unknown key, the keys
allowed at that level).

The reader treats every file as hostile. It refuses, each in one line naming the file (and the
line where the problem is): a path that is not a regular file (a FIFO, a device, a directory, a
symlink loop: checked before it is opened, so nothing blocks), a file over ``MAX_FILE_BYTES``,
bytes that are not UTF-8, an empty document, a key given twice at any depth, a key that is not a
plain name, YAML aliases (``*x``: the "billion laughs" bomb needs them), nesting deeper than
``MAX_DEPTH``, more than ``MAX_NODES`` values, and any value longer than ``MAX_SCALAR_CHARS``.
Numbers and booleans are read as YAML 1.2's core schema reads them: ``1e-5`` is a float, while
``1:20``, ``1_0``, ``0x10``, ``0b11`` and ``yes`` stay text (YAML 1.1 would quietly make them 80,
10, 16, 3 and true), which the strict models then refuse by name.

Whatever an error message echoes from a file is cut to ``SHOWN_CHARS`` with an ellipsis and
has its control characters (ESC, newlines, bidi overrides) written as ``\\x1b``-style escapes,
so a hostile file can neither flood nor repaint a terminal or a log.
"""

from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, Field, Strict, ValidationError

from veil.errors import VeilError
from veil.files import regular_file_problem

M = TypeVar("M", bound=BaseModel)

MAX_FILE_BYTES = 1_000_000
MAX_DEPTH = 20
MAX_NODES = 10_000  # keys, values, lists and mappings together (a scenario has ~60)
MAX_SCALAR_CHARS = 4096
SHOWN_CHARS = 80  # of a value echoed in an error
MAX_LINE_CHARS = 300  # of any one line of an error
MAX_ERROR_LINES = 10  # bad fields listed; the rest are counted

_STR_TAG = "tag:yaml.org,2002:str"

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxdict, _repr.maxlist, _repr.maxtuple = 2, 4, 4, 4
_repr.maxset = _repr.maxfrozenset = _repr.maxdeque = _repr.maxarray = 4
_repr.maxstring = _repr.maxother = SHOWN_CHARS
_repr.maxlong = 40


def clean(text: str, limit: int = MAX_LINE_CHARS) -> str:
    """``text`` safe for one line of a terminal or log: characters that do not print (ESC, newline,
    other C0/C1 controls, bidi overrides) as ``\\x1b``-style escapes, cut to ``limit`` with "…"."""
    head = text[: limit + 1]
    out = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in head)
    if len(out) > limit or len(text) > len(head):
        return out[: limit - 1] + "…"
    return out


def show(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``value`` for an error message: a repr that never expands more than a few levels or items,
    cleaned and cut to ``limit`` characters."""
    return clean(_repr.repr(value), limit)


def printable(value: str) -> str:
    """``value`` if every character prints; a ``ValueError`` naming the first one that does not.

    For names and paths that end up in logs, the store or a terminal."""
    bad = next((ch for ch in value if not ch.isprintable()), None)
    if bad is not None:
        raise ValueError(f"must not contain control or other non-printing characters (found {bad!a})")
    return value


def _printable_path(value: Path) -> Path:
    printable(str(value))
    return value


Text = Annotated[str, Strict(), AfterValidator(printable)]
"""A string (strictly: not bytes, not a number) that prints as itself: no ESC, newline, tab or other
control character."""
CleanPath = Annotated[Path, Field(strict=False), AfterValidator(_printable_path)]
"""A path, written as a string in a file, that prints as itself."""


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: Any = root
    parts = list(loc)
    while parts:
        field = model.model_fields.get(str(parts.pop(0)))
        ann = field.annotation if field else None
        if get_origin(ann) is dict and parts:  # a mapping of models: skip its key
            ann = get_args(ann)[1]
            parts.pop(0)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def describe_errors(err: ValidationError, root: type[BaseModel], *, prefix: str = "") -> list[str]:
    """One line per bad field: ``  field: message (got value)``; unknown keys list the allowed ones.

    At most ``MAX_ERROR_LINES`` fields are listed; every echoed value is bounded and cleaned."""
    items = err.errors(include_url=False)
    lines = []
    listed: set[tuple[Any, ...]] = set()  # parents whose allowed keys were shown already
    for item in items[:MAX_ERROR_LINES]:
        field = prefix + (".".join(clean(str(p), 60) for p in item["loc"]) or "(top level)")
        if item["type"] == "extra_forbidden":
            where = tuple(item["loc"][:-1])
            if where in listed:
                lines.append(clean(f"  {field}: unknown key"))
                continue
            listed.add(where)
            parent = _model_at(root, where)
            allowed = ", ".join(sorted(parent.model_fields)) if parent else "?"
            lines.append(clean(f"  {field}: unknown key; allowed keys here: {allowed}"))
            continue
        msg = item["msg"].removeprefix("Value error, ")
        got = item.get("input")
        shown = "" if isinstance(got, dict) or item["type"] == "value_error" else f" (got {show(got)})"
        lines.append(clean(f"  {field}: {msg}{shown}"))
    if len(items) > MAX_ERROR_LINES:
        lines.append(f"  ... and {len(items) - MAX_ERROR_LINES} more")
    return lines


def validate(model: type[M], raw: Any, *, what: str, source: str, error: type[VeilError],
             prefix: str = "") -> M:
    """``raw`` (a parsed mapping) as ``model``, or ``error`` naming each bad field.

    None (an empty document) is an error too: an empty file never silently means "all defaults"."""
    where = clean(source)
    if raw is None:
        raise error(f"{what} {where} is empty; write the keys you set (an empty file is never taken to "
                    "mean all defaults)")
    if not isinstance(raw, dict):
        raise error(f"invalid {what} ({where}): the top level must be a mapping of keys, "
                    f"got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise error("\n".join([f"invalid {what} ({where}):", *describe_errors(err, model, prefix=prefix)])
                    ) from None


class _Refused(yaml.MarkedYAMLError):
    """A document the reader will not build: the problem and where it is."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem=problem, problem_mark=mark)


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` for files from anyone: no aliases, no duplicate or non-name keys, and
    bounded depth, node count and value length (see the module docstring); numbers and booleans
    as YAML 1.2's core schema reads them."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        """One node, refused if it is an alias, too deep, or one too many."""
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(f"YAML aliases ({clean('*' + str(event.anchor), 40)}) are not allowed: write the "
                           "value out in full", event.start_mark)
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _Refused(f"more than {MAX_NODES:,} values; a Veil file is far smaller", event.start_mark)
        if self._depth >= MAX_DEPTH:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        return node

    def compose_scalar_node(self, anchor: Any) -> yaml.ScalarNode:
        """A scalar, refused if longer than ``MAX_SCALAR_CHARS``."""
        node: yaml.ScalarNode = super().compose_scalar_node(anchor)
        if len(node.value) > MAX_SCALAR_CHARS:
            raise _Refused(f"a value of {len(node.value):,} characters; at most {MAX_SCALAR_CHARS:,} are "
                           "allowed", node.start_mark)
        return node

    def compose_mapping_node(self, anchor: Any) -> yaml.MappingNode:
        """A mapping whose keys are plain names, each given once."""
        node: yaml.MappingNode = super().compose_mapping_node(anchor)
        first: dict[str, int] = {}
        for key, _ in node.value:
            line = key.start_mark.line + 1
            if not (isinstance(key, yaml.ScalarNode) and key.tag == _STR_TAG):
                text = key.value if isinstance(key, yaml.ScalarNode) else f"a {key.id}"
                raise _Refused(f"the key {show(text, 40)} is not a name (keys are plain words such as "
                               "'rounds'; quote it if it is meant as one)", key.start_mark)
            if key.value in first:
                raise _Refused(f"duplicate key {show(key.value, 60)} (first given at line {first[key.value]})",
                               key.start_mark)
            first[key.value] = line
        return node

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """The Python value of ``node``; a value YAML itself cannot build (a date like 2024-13-45)
        is a ``yaml.YAMLError`` with its line, not a crash."""
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError, TypeError) as err:
            value = show(getattr(node, "value", "?"), 40)
            raise _Refused(f"cannot read the value {value} ({clean(str(err), 80)})", node.start_mark) from None


# Numbers and booleans as YAML 1.2's core schema reads them, not YAML 1.1's: PyYAML would read
# ``1:20`` as 80 (sexagesimal), ``1_0`` as 10, ``0x10`` as 16, ``0b11`` as 3 and ``yes``/``on`` as
# true, and ``1e-5`` as a string. Here an int is plain decimal digits, a float is decimal (with an
# optional exponent) or .inf/.nan, a bool is true/false; anything else is a string, which the
# strict models then refuse by name.
_CORE = {
    "tag:yaml.org,2002:bool": (re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")),
    "tag:yaml.org,2002:int": (re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789")),
    "tag:yaml.org,2002:float": (
        re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                   r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
        list("-+0123456789.")),
}
StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _CORE]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _tag, (_regexp, _first) in _CORE.items():
    StrictLoader.add_implicit_resolver(_tag, _regexp, _first)


def _core_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    return int(str(loader.construct_scalar(node)))  # type: ignore[arg-type]


StrictLoader.add_constructor("tag:yaml.org,2002:int", _core_int)


def _yaml_problem(err: yaml.YAMLError, text: str) -> str:
    if isinstance(err, yaml.reader.ReaderError):
        line = text.count("\n", 0, max(err.position, 0)) + 1
        char = chr(err.character) if isinstance(err.character, int) else str(err.character)
        return f"line {line}: the character {char!a} is not allowed (YAML files hold printable text only)"
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        return where + " ".join(p for p in (err.context, err.problem) if p)
    return str(err)


def read_yaml(path: Path, *, what: str, error: type[VeilError]) -> Any:
    """The parsed YAML document at ``path``, or ``error`` in one line (see the module docstring).

    An empty document (nothing, only comments, or ``null``) is an error: ``{what} file X is empty``."""
    where = clean(str(path))
    problem = regular_file_problem(path)  # before open(): a FIFO would block, /dev/zero never ends
    if problem:
        raise error(f"{what} file {where} {problem}")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise error(f"{what} file not found: {where}") from None
    except OSError as err:
        raise error(f"cannot read {what} file {where}: {clean(err.strerror or str(err), 120)}") from None
    if len(data) > MAX_FILE_BYTES:
        raise error(f"{what} file {where} is larger than {MAX_FILE_BYTES:,} bytes; a Veil file is a few "
                    "kilobytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise error(f"{what} file {where} is not UTF-8 text (byte 0x{data[err.start]:02x} at line {line}); "
                    "save it as UTF-8") from None
    try:
        raw = yaml.load(text, Loader=StrictLoader)  # a SafeLoader, only stricter
    except yaml.YAMLError as err:
        raise error(f"{what} file {where} is not valid YAML: {clean(_yaml_problem(err, text))}") from None
    except RecursionError:  # pragma: no cover - MAX_DEPTH stops nesting long before this
        raise error(f"{what} file {where} is nested too deeply") from None
    if raw is None:
        raise error(f"{what} file {where} is empty; write the keys you set (a file with nothing but comments "
                    "or null is never read as all defaults)")
    return raw
