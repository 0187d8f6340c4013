"""Typed dataclasses to and from JSON: the one validator behind everything a pack's header holds
(the header itself, each method's state, the router's fields).

A schema is a dataclass whose fields have JSON types: ``str``, ``int``, ``float`` (an int is read as
a float), ``bool``, ``Any`` (any JSON value), ``X | None``, ``list[X]``, ``dict[str, X]`` and other
such dataclasses. A field made with :func:`must` says in words what it must be and may check more
than its type. :func:`from_json` builds the dataclass or raises :class:`Invalid` naming the first
wrong field by its path (``state.shrink[0].key``); keys a schema does not name are ignored, as
an older reader ignores what a newer writer added. :func:`to_json` is its inverse.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import types
import typing
from typing import Any, Callable, TypeVar

T = TypeVar("T")
Check = Callable[[Any], "str | None"]  # a value of the right type -> what else is wrong with it, or None

_LIST = {list}
_WORDS = {str: ("a string", "strings"), int: ("an integer", "integers"), float: ("a number", "numbers"),
          bool: ("true or false", "booleans"), type(None): ("null", "nulls")}


class Invalid(ValueError):
    """A JSON value that does not fit its schema: ``path`` says where, ``problem`` what is wrong."""

    def __init__(self, path: str, problem: str) -> None:
        self.path, self.problem = path, problem
        super().__init__(f"'{path}' {problem}" if path else problem)

    def under(self, segment: str) -> "Invalid":
        """The same problem, seen from the object or list that holds the value at ``segment``."""
        joint = "" if not self.path or self.path.startswith("[") else "."
        return Invalid(segment + joint + self.path if segment else self.path, self.problem)


def must(words: str, check: Check | None = None, **field_kwargs) -> Any:
    """A schema field that must be ``words`` (the error says so), and pass ``check`` when given.
    ``field_kwargs``: ``default`` or ``default_factory``, as for ``dataclasses.field``."""
    return dataclasses.field(metadata={"must": words, "check": check}, **field_kwargs)


def _args(hint: Any) -> tuple:
    return typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else ()


def describe(hint: Any) -> str:
    """What a value of type ``hint`` is, in words ('a list of strings')."""
    if hint in _WORDS:
        return _WORDS[hint][0]
    if _args(hint):
        return " or ".join(describe(a) for a in _args(hint))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        plural = (_WORDS[item][1] if item in _WORDS else "lists" if typing.get_origin(item) is list
                  else "objects" if typing.get_origin(item) is dict or dataclasses.is_dataclass(item) else "")
        return f"a list of {plural}" if plural else "a list"
    if typing.get_origin(hint) is dict or dataclasses.is_dataclass(hint):
        return "an object"
    return "a JSON value"


def from_json(hint: type[T], value: Any, path: str = "") -> T:
    """``value`` (parsed JSON) as type ``hint``; :class:`Invalid` at the first thing that does not
    fit, its path starting at ``path``."""
    try:
        return _reader(hint)(value)
    except Invalid as exc:
        raise exc.under(path) from None


@functools.lru_cache(maxsize=None)
def _reader(hint: Any) -> Callable[[Any], Any]:
    """A function that reads a JSON value as ``hint`` (made once per type; paths are built only on errors)."""
    if hint is Any:
        return lambda value: value
    if dataclasses.is_dataclass(hint):
        return functools.partial(_dataclass, hint)
    if _args(hint):
        return _union(hint)
    origin, words = typing.get_origin(hint), f"must be {describe(hint)}"
    if origin is list:
        return _list(hint, words)
    if origin is dict:
        item = typing.get_args(hint)[1]
        read = _reader(item)

        def read_dict(value):
            if not isinstance(value, dict):
                raise Invalid("", words)
            return value if item is Any else dict(zip(value, _each(read, value.items())))
        return read_dict
    if hint is float:
        def read_number(value):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise Invalid("", words)
            return float(value)
        return read_number
    if hint in _WORDS:
        def read_scalar(value):
            if type(value) is not hint:
                raise Invalid("", words)
            return value
        return read_scalar
    raise TypeError(f"{hint!r} is no JSON type a schema may use")


def _each(read: Callable[[Any], Any], items) -> list:
    """``read`` of each value of (key or index, value) ``items``; an error names the key or index."""
    out, key = [], None
    try:
        for key, v in items:
            out.append(read(v))
    except Invalid as exc:
        raise exc.under(f"[{key!r}]") from None
    return out


def _union(hint: Any) -> Callable[[Any], Any]:
    nullable = type(None) in _args(hint)
    readers = [_reader(a) for a in _args(hint) if a is not type(None)]
    words = f"must be {describe(hint)}"

    def read(value):
        if value is None and nullable:
            return None
        for r in readers:
            try:
                return r(value)
            except Invalid as exc:
                if len(readers) == 1 and exc.path:  # X | None, wrong inside X: X's error says where
                    raise
        raise Invalid("", words)
    return read


def _nesting(hint: Any) -> tuple[int, type | None]:
    """(depth, scalar) of nested lists of a scalar (list[list[int]]: 2, int); (0, None) for others."""
    depth = 0
    while typing.get_origin(hint) is list:
        depth, (hint,) = depth + 1, typing.get_args(hint)
    return (depth, hint) if hint in (str, int, bool) else (0, None)


def _list(hint: Any, words: str) -> Callable[[Any], Any]:
    (item,) = typing.get_args(hint)
    read = _reader(item)
    depth, scalar = _nesting(hint)

    def plain(value: list) -> bool:
        """Nested lists of ``scalar``, checked a level at a time at C speed (token ids, request indices)."""
        level = value
        for _ in range(depth - 1):
            if not _LIST.issuperset(map(type, level)):
                return False
            level = list(itertools.chain.from_iterable(level))
        return {scalar}.issuperset(map(type, level))

    def read_list(value):
        if not isinstance(value, list):
            raise Invalid("", words)
        if depth and plain(value):  # nothing to convert: the parsed lists are the values
            return value
        return _each(read, enumerate(value))  # converts, or finds where it is wrong
    return read_list


@functools.lru_cache(maxsize=None)
def _fields(cls: type) -> list[tuple[str, Callable, str | None, Check | None, bool]]:
    """(name, reader, words, check, required) of each field of the schema ``cls``."""
    hints = typing.get_type_hints(cls)
    return [(f.name, _reader(hints[f.name]), f.metadata.get("must"), f.metadata.get("check"),
             f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            for f in dataclasses.fields(cls) if f.init]


def _dataclass(cls: type[T], value: Any) -> T:
    if not isinstance(value, dict):
        raise Invalid("", "must be an object")
    fields = _fields(cls)
    missing = [name for name, *_, required in fields if required and name not in value]
    if missing:
        raise Invalid("", f"lacks required fields {missing}")
    kwargs = {}
    for name, read, words, check, _ in fields:
        if name not in value:
            continue
        try:
            kwargs[name] = read(value[name])
            problem = check(kwargs[name]) if check else None
        except Invalid as exc:  # the field's own words, where the value itself is of the wrong type
            typed = words and not exc.path and exc.problem.startswith("must be")
            raise (Invalid(name, f"must be {words}") if typed else exc.under(name)) from None
        if problem:
            raise Invalid(name, problem)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # the class's own checks (__post_init__)
        raise Invalid("", f"is not valid: {exc}") from None


def to_json(value: Any, drop_none: bool = False) -> Any:
    """``value`` as plain JSON values: a dataclass as an object of its fields (with ``drop_none``,
    without the fields that hold None where None is their default: they read back the same)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name), drop_none) for f in dataclasses.fields(value)
                if not (drop_none and getattr(value, f.name) is None and f.default is None)}
    if isinstance(value, (list, tuple)):
        return [to_json(v, drop_none) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v, drop_none) for k, v in value.items()}
    return value


def field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))


__all__ = ["Invalid", "describe", "field_names", "from_json", "must", "to_json"]
