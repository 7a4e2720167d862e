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
  list[X] / tuple[X, ...]  that container, each element an X (the command line's
                           comma-separated form is split before this: config_cli.py)
  dict                     a mapping (values unchecked)
"""
from __future__ import annotations

import dataclasses
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
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{field}={value!r} must be a {(origin or t).__name__}")
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
        return value
    if t is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)   # e.g. a directory named 2024 on the command line
        if not isinstance(value, str):
            raise ValueError(f"{field}={value!r} must be a string")
        return value
    return value   # an annotation these rules do not cover: the dataclass decides


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
