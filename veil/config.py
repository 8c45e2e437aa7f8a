"""YAML files into frozen, validated pydantic models, with Veil's error format.

Scenarios, site policies and site configs all enter here: one reader, one way of saying
what is wrong (each bad field by its path, what it got, and for an unknown key, the keys
allowed at that level).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from veil.errors import VeilError

M = TypeVar("M", bound=BaseModel)


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model = root
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def describe_errors(err: ValidationError, root: type[BaseModel], *, prefix: str = "") -> list[str]:
    """One line per bad field: ``  field: message (got value)``; unknown keys list the allowed ones."""
    lines = []
    for item in err.errors():
        field = prefix + (".".join(str(p) for p in item["loc"]) or "(top level)")
        if item["type"] == "extra_forbidden":
            parent = _model_at(root, tuple(item["loc"][:-1]))
            allowed = ", ".join(sorted(parent.model_fields)) if parent else "?"
            lines.append(f"  {field}: unknown key; allowed keys here: {allowed}")
            continue
        msg = item["msg"].removeprefix("Value error, ")
        got = item.get("input")
        shown = "" if isinstance(got, dict) or item["type"] == "value_error" else f" (got {got!r})"
        lines.append(f"  {field}: {msg}{shown}")
    return lines


def validate(model: type[M], raw: Any, *, what: str, source: str, error: type[VeilError],
             prefix: str = "") -> M:
    """``raw`` (a parsed mapping, or None for empty) as ``model``, or ``error`` naming each bad field."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise error(f"invalid {what} ({source}): the top level must be a mapping of keys, "
                    f"got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise error("\n".join([f"invalid {what} ({source}):", *describe_errors(err, model, prefix=prefix)])
                    ) from None


def read_yaml(path: Path, *, what: str, error: type[VeilError]) -> Any:
    """The parsed YAML document at ``path`` (None when empty), or ``error`` in one line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} file not found: {path}") from None
    except OSError as err:
        raise error(f"cannot read {what} file {path}: {err.strerror or err}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise error(f"{what} file {path} is not valid YAML: {err}") from None
