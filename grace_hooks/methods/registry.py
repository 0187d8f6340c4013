"""Edit methods by name: the built-in ones, those registered in this process, and those that other
installed distributions declare in the entry point group ``grace_hooks.methods``.

A distribution makes its method known to every entry point of the library (``EditableModel``, the
CLI, the server) by declaring, in its ``pyproject.toml``::

    [project.entry-points."grace_hooks.methods"]
    steer = "my_package:Steer"        # an EditMethod subclass, or a module that registers on import

Entry points are read the first time a name is not found (and by :func:`method_names`), so nothing
installed is imported until a pack or a caller asks for it. A name is taken once: registering
another class under a taken name is refused.
"""
from __future__ import annotations

import dataclasses
import logging
from importlib.metadata import entry_points
from types import ModuleType

from ..errors import ConfigError
from ..store.header import ROUTING_FIELDS
from ..store.packs import use_method_types
from .base import EditMethod

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "grace_hooks.methods"


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class MethodRegistry:
    """The methods known by name, and what went wrong with installed ones that could not be loaded."""

    def __init__(self) -> None:
        self._classes: dict[str, type[EditMethod]] = {}
        self._read: set[tuple[str, str]] = set()  # entry points (name, value) already loaded or tried
        self._broken: dict[str, str] = {}  # name -> why its entry point gave no method

    def add(self, cls: type[EditMethod]) -> type[EditMethod]:
        if not (isinstance(cls, type) and issubclass(cls, EditMethod)):
            raise ConfigError(f"{cls!r} is not an EditMethod subclass; a method is a class deriving from "
                              "grace_hooks.method_kit.EditMethod")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"{_where(cls)}.name must be a short identifier (letters, digits, _), got {name!r}")
        if not dataclasses.is_dataclass(getattr(cls, "config_class", None)):
            raise ConfigError(f"{_where(cls)}.config_class must be a dataclass of the method's options")
        state = getattr(cls, "state_class", None)
        if not dataclasses.is_dataclass(state) or ROUTING_FIELDS & {f.name for f in dataclasses.fields(state)}:
            raise ConfigError(f"{_where(cls)}.state_class must be a dataclass of its packs' own data, with no field "
                              f"named {sorted(ROUTING_FIELDS)} (the pack's routing keeps those)")
        taken = self._classes.get(name)
        # the same class imported again (a reloaded module) keeps its name; another class may not take it
        if taken is not None and _where(taken) != _where(cls):
            raise ConfigError(f"edit method name {name!r} is taken by {_where(taken)}; {_where(cls)} needs another "
                              f"name (or unregister({name!r}) first to replace it on purpose)")
        self._classes[name] = cls
        self._broken.pop(name, None)
        return cls

    def remove(self, name: str) -> None:
        self._classes.pop(name, None)
        self._read = {(n, v) for n, v in self._read if n != name}  # an installed one may be read again

    def discover(self) -> None:
        """Load every entry point of the group not read yet; one that fails is logged and remembered."""
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if (ep.name, ep.value) in self._read:
                continue
            self._read.add((ep.name, ep.value))
            source = f"entry point {ep.name} = {ep.value!r}" + (f" of {ep.dist.name}" if ep.dist else "")
            try:
                found = ep.load()
                if not isinstance(found, ModuleType):  # a module registers its methods as it is imported
                    if getattr(found, "name", None) != ep.name:
                        raise ConfigError(f"it names {found!r}, whose name is {getattr(found, 'name', None)!r}: "
                                          "an entry point's name must be its method's name")
                    self.add(found)
            except Exception as exc:  # a broken plugin must not take the built-in methods down with it
                self._broken[ep.name] = f"{source} failed: {type(exc).__name__}: {exc}"
                logger.warning("edit method %s", self._broken[ep.name])
                continue
            if ep.name not in self._classes:
                self._broken[ep.name] = f"{source} loaded but registered no method named {ep.name!r}"
                logger.warning("edit method %s", self._broken[ep.name])

    def cls(self, name: str) -> type[EditMethod]:
        if name not in self._classes:
            self.discover()
        if name not in self._classes:
            why = self._broken.get(name)
            raise ConfigError(f"unknown edit method {name!r}" + (f" ({why})" if why else "")
                              + f"; known methods: {self.names()}. A method from another distribution is found "
                              f"once that distribution is installed and declares it in the entry point group "
                              f"{ENTRY_POINT_GROUP!r}")
        return self._classes[name]

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._classes)


REGISTRY = MethodRegistry()


def register(cls: type[EditMethod]) -> type[EditMethod]:
    """Make a method known by its name (a class decorator; a method from outside the package too).
    :class:`ConfigError` when another class has the name already."""
    return REGISTRY.add(cls)


def unregister(name: str) -> None:
    """Forget a registered method (packs of it can no longer be loaded until it is registered again)."""
    REGISTRY.remove(name)


def method_class(name: str) -> type[EditMethod]:
    """The class of method ``name``, installed ones looked up through their entry points."""
    return REGISTRY.cls(name)


def get_method(name: str) -> EditMethod:
    return method_class(name)()


def pack_types(name: str) -> tuple[type, type]:
    """(config class, state class) of method ``name``: how a pack of it is read from disk."""
    cls = method_class(name)
    return cls.config_class, cls.state_class


use_method_types(pack_types)  # the store names no method: it asks the registry


def method_names() -> list[str]:
    """Every known method: built in, registered, or installed."""
    return REGISTRY.names()
