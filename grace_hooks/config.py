"""Typed method configs: dataclasses with defaults and ``help`` metadata; overrides checked."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, TypeVar

from .errors import ConfigError

C = TypeVar("C")

# What a user gets without naming a method: edits that reach paraphrases and questions (routed, so
# unrelated text stays bit-identical), chosen from the measurements in benchmarks/results-pages/speed.md (issue 17).
DEFAULT_METHOD = "encore"


def option(default: Any, help: str, choices: tuple | None = None) -> Any:  # noqa: A002 - mirrors argparse
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def _typed(name: str, value: Any, args: tuple) -> Any:
    """A non-string value checked against the field's types (an int is a float; a bool is no number)."""
    for t in args:
        if (t is type(None) and value is None) or (t is bool and isinstance(value, bool)) \
                or (t is int and type(value) is int):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    raise ConfigError(f"config option {name!r}: {value!r} is a {type(value).__name__}, expected "
                      f"{' or '.join(getattr(t, '__name__', str(t)) for t in args)}")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Turn CLI strings into the field's type (``int | None`` accepts 'none'); check other values' types."""
    args = typing.get_args(hint) or (hint,)
    if not isinstance(value, str):
        return _typed(name, value, args)
    if type(None) in args and value.lower() in ("none", "null", ""):
        return None
    for t in args:
        if t is bool:
            if value.lower() in ("1", "true", "yes"):
                return True
            if value.lower() in ("0", "false", "no"):
                return False
        elif t in (int, float):
            try:
                return t(value)
            except ValueError:
                continue
        elif t is str:
            return value
    raise ConfigError(f"config option {name!r}: cannot read {value!r} as {hint}")


def make_config(cls: type[C], overrides: dict[str, Any] | None = None, base: dict[str, Any] | None = None) -> C:
    """Build ``cls`` from ``base`` (e.g. a stored pack config) then ``overrides``, with checks."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    retired = getattr(cls, "retired", {})  # option -> (the value whose behaviour is what runs now, why it went)
    for source in (base or {}, overrides or {}):
        for key, value in source.items():
            if key in retired and key not in fields:
                kept, why = retired[key]
                if source is base and value == kept:  # a pack stored before it went asked for what runs now
                    continue
                raise ConfigError(f"option {key!r} was removed: {why}")
            if key not in fields:
                raise ConfigError(unknown_option(key, cls))
            value = _coerce(key, value, hints[key])
            choices = fields[key].metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"option {key!r} must be one of {choices}, got {value!r}")
            values[key] = value
    return cls(**values)


def unknown_option(key: str, cls: type) -> str:
    """A short message: the closest option names (a typo is the usual cause), else the names if few; the
    help of each lives in ``grace-hooks methods`` rather than on one long line here."""
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.75)
    if close:
        hint = f"did you mean {' or '.join(map(repr, close))}?"
    else:  # a short list helps; two dozen names on one line do not
        hint = f"options: {', '.join(names)}" if len(names) <= 12 else f"{cls.__name__} has {len(names)} options"
    return f"unknown option {key!r} for {cls.__name__}; {hint} (`grace-hooks methods` lists each option with its help)"


def option_lines(cls: type) -> list[str]:
    """One ``name=default (help)`` line per option."""
    return [f"{f.name}={f.default!r} ({f.metadata.get('help', '')})" for f in dataclasses.fields(cls)]

