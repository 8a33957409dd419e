"""Describing pydantic fields for people: type, constraints, choices and default in one short bracket.

Used by `maeframe plugins` (each component's options) and `maeframe recipe-fields` (every recipe field).
Imports neither torch nor the engine.
"""
from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo

_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("multiple_of", "multiple of"))


def type_name(annotation: Any) -> str:
    """A short, readable type: int, float | null, 'epoch' | 'step', list of LossRef, [int, int]."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is Literal:
        return " | ".join(json.dumps(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return " | ".join("null" if arg is type(None) else type_name(arg) for arg in args)
    if origin in (list, tuple, set, frozenset, dict):
        if origin is dict:
            return "mapping"
        if origin is tuple and args and args[-1] is not Ellipsis:
            return "[" + ", ".join(type_name(arg) for arg in args) + "]"
        return f"list of {type_name(args[0])}" if args else "list"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def constraints(info: FieldInfo) -> list[str]:
    """['>= 0', '< 1'], ['at least 1 item'] ... from the field's metadata (pydantic's Field(ge=..) etc.)."""
    out = []
    for item in info.metadata:
        for attr, symbol in _BOUNDS:
            value = getattr(item, attr, None)
            if value is not None:
                out.append(f"{symbol} {value}")
        low, high = getattr(item, "min_length", None), getattr(item, "max_length", None)
        if low is not None:
            out.append(f"at least {low} item{'s' if low != 1 else ''}")
        if high is not None:
            out.append(f"at most {high} item{'s' if high != 1 else ''}")
        if getattr(item, "pattern", None):
            out.append(f"matching {item.pattern}")
    return out


def default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "default: its fields' defaults"
    return f"default {yaml_text(value)}"


def yaml_text(value: Any) -> str:
    """A default as a recipe would write it: true, null, [4, 4], 0.75, runs (JSON, which YAML reads)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.dumps(value, default=str, ensure_ascii=False)


def describe(info: FieldInfo) -> str:
    """'[float >= 0, < 1; default 0.75]': type and constraints, then the default."""
    kind = type_name(info.annotation)
    bounds = ", ".join(constraints(info))
    joint = ", " if " " in kind else " "  # 'float >= 0', but 'int | null, >= 1'
    return f"[{kind}{joint + bounds if bounds else ''}; {default_text(info)}]"


def line(name: str, info: FieldInfo) -> str:
    """'ratio: fraction of tokens hidden from the encoder [float >= 0, < 1; default 0.75]'."""
    return f"{name}: {info.description + ' ' if info.description else ''}{describe(info)}"


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field holds directly, in a list, or as an optional value."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if origin is typing.Annotated:
        return _models_in(args[0])
    if origin in (Union, types.UnionType, list):
        return [model for arg in args for model in _models_in(arg)]
    if origin is dict and args:
        return _models_in(args[1])
    return []


def _item_path(annotation: Any) -> str:
    """'<i>.' for a list of models, '<name>.' for a mapping to models (optional or not), else ''."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _item_path(args[0])
    if origin in (Union, types.UnionType):
        return next((found for arg in args if (found := _item_path(arg))), "")
    return {list: "<i>.", dict: "<name>."}.get(origin, "")


def walk(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """(dotted path, field) for every field of `model` and, below it, of the models it contains; a list of
    models contributes `<path>.<i>.<field>`, a mapping to models `<path>.<name>.<field>`."""
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        yield path, info
        for inner in _models_in(info.annotation):
            yield from walk(inner, f"{path}.{_item_path(info.annotation)}")
