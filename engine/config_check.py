"""Type checks for config values from a file or `--section.field` overrides, before the
dataclass sees them: its range checks then compare numbers, never strings, and a wrong
type is a one-line ValueError naming the field instead of a TypeError traceback (or a
silent coercion: `--train.steps 2.5` must not run 3 steps).

Rules, from the dataclass's annotations:
  int    an integer (not a bool, not 2.5)
  float  an int or float (not a bool)
  bool   true or false only (not 1, not "yes")
  str    a string; a number given on the command line (`--data.dir 2024`) is its text
  Optional[X] / X | None   None or an X;  Literal[...]  one of the listed values
  list[X] / tuple[X, ...]  that container, each element an X; on the command line a
                           comma-separated string (`--check.archs 80,90`; "" is empty)
                           or a JSON list (`'[80, 90]'`), one value a list of one
  dict                     a mapping (values unchecked)
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing


def _kind(t) -> str:
    return getattr(t, "__name__", str(t)).replace("typing.", "")


def _check(value, t, field: str):
    """value if it fits type t (possibly converted), else raise ValueError."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(t)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(value, a, field)
            except ValueError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ValueError(
            f"{field}={value!r} must be one of: {', '.join(_kind(a) for a in args)}")
    if origin is typing.Literal:
        choices = typing.get_args(t)
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            raise ValueError(f"{field}={value!r} must be one of "
                             f"{', '.join(repr(c) for c in choices)}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{field}={value!r} must be a dict")
        return value
    if origin in (list, tuple) or t in (list, tuple):
        value = _as_list(value)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{field}={value!r} must be a list (comma-separated or JSON)")
        args = [a for a in typing.get_args(t) if a is not Ellipsis]
        if len(args) == 1:
            value = [_check(v, args[0], f"{field}[{i}]") for i, v in enumerate(value)]
        return (origin or t)(value)
    if t is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{field}={value!r} must be true or false")
        return value
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{field}={value!r} must be an integer")
        return value
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{field}={value!r} must be a number")
        return float(value)     # `--translate.top_p 1` is 1.0, as a file's 1.0 would be
    if t is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)   # e.g. a directory named 2024 on the command line
        if not isinstance(value, str):
            raise ValueError(f"{field}={value!r} must be a string")
        return value
    return value   # an annotation these rules do not cover: the dataclass decides


def _as_list(value):
    """A command-line list: "80,90" -> [80, 90], "a" -> ["a"], 80 -> [80], "" -> []."""
    if isinstance(value, str):
        return [_word(w) for w in value.split(",") if w.strip()]
    if isinstance(value, (int, float)):     # one number, already parsed (bools too)
        return [value]
    return value


def _word(text: str):
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def check_fields(cls, values: dict, section: str) -> dict:
    """values (field -> value) checked and converted against dataclass `cls`'s
    annotations; an unknown name is an error too."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    bad = sorted(set(values) - names)
    if bad:
        raise ValueError(f"unknown {section} field(s): {', '.join(bad)}; known: "
                         f"{', '.join(sorted(names))}")
    return {name: _check(value, hints[name], f"{section}.{name}")
            for name, value in values.items()}
