"""What a method gets of the runtime while it computes an edit: views to read what is loaded, and
the few things it may change for a while. Never the runtime, a site runtime or an effect layer.

A method computing an edit needs to know what is already loaded where it edits: the router keys
(where they lie, their radii, what each stands for, which pack holds it) and the earlier updates of
its own family at the site. It reads them through :class:`LoadedView`, :class:`LoadedSite` and its
family's :class:`LayerView`, whose only public members are reads that return copies, read-only
arrays or immutable values: what is loaded cannot be changed through them (their fields cannot be
set either). The views are live: inside ``EditContext.staged`` they show the staged edit too.

What a method may change for a while (an edit staged above the loaded packs, the packs off, the
real positions of a replay, an effect layer's option) it asks through :class:`EditControls`, a
frozen record of those four calls: the ``EditContext`` holds it, not the runtime.
"""
from __future__ import annotations

import contextlib
from dataclasses import FrozenInstanceError, dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

    from .effects import EffectLayer
    from .runtime import EditRuntime, SiteContribution, SiteRuntime

V = TypeVar("V", bound="LayerView")


def read_only(a: np.ndarray) -> np.ndarray:
    """``a`` marked not writeable (a write raises ``ValueError``)."""
    a.setflags(write=False)
    return a


class LayerView:
    """What a method may read of its family's effect layer at one site (its loaded effects, oldest
    first). A family subclasses it beside its :class:`~grace_hooks.engine.effects.EffectLayer`: ``of``
    names the layer class, and each public member is one read the family's method needs, returning a
    new tensor (or a value that cannot be changed), never one the layer keeps. A method gets one
    from :meth:`LoadedSite.view`; the layer itself stays the runtime's. Nothing can be set on a view
    (``FrozenInstanceError``), in a subclass either."""

    of: ClassVar[type["EffectLayer"]]
    __slots__ = ("_layer",)

    def __init__(self, layer: "EffectLayer") -> None:
        object.__setattr__(self, "_layer", layer)

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"a {type(self).__name__} is read-only: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"a {type(self).__name__} is read-only: cannot delete {name!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._layer.site!r})"


@dataclass(frozen=True)
class LoadedSite:
    """What is loaded at one site: its router keys, and each family's layer (through its view)."""

    _rt: "SiteRuntime"

    @property
    def name(self) -> str:
        return self._rt.site.name

    @property
    def dims(self) -> tuple[int, int]:
        """(d_in, d_out) of the site."""
        return self._rt.d_in, self._rt.d_out

    @property
    def n_keys(self) -> int:
        """Live router keys here."""
        return len(self._rt.router)

    def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Euclidean distance to, and router id of, the nearest live key for each query row (inf /
        ``router.NO_KEY`` when there is none); read-only arrays."""
        dist, ids = self._rt.router.nearest(queries)
        return read_only(dist), read_only(ids)

    def radius(self, ids: np.ndarray) -> np.ndarray:
        """The radius in force of each router id (after any shrink by a later pack); a read-only array."""
        return read_only(self._rt.router.radius(ids))

    def label(self, key_id: int) -> str:
        """What a router key stands for (GRACE's labels; '' where its pack gave none)."""
        return self._rt.labels[key_id]

    def key_pack(self, key_id: int) -> tuple[str, int] | None:
        """(pack id, index of the key within the pack at this site), or None for a key no longer loaded."""
        return self._rt.key_pack(key_id)

    def view(self, cls: type[V]) -> V | None:
        """The read-only view ``cls`` of its family's effect layer here (``cls.of``), or None where
        that family has loaded nothing here."""
        layer = self._rt.layer(cls.of)
        return cls(layer) if layer is not None else None


@dataclass(frozen=True)
class LoadedView:
    """The packs loaded on a model, as a method may see them."""

    _runtime: "EditRuntime"

    def site(self, name: str) -> LoadedSite | None:
        """What is loaded at site ``name``, or None where nothing is."""
        rt = self._runtime.sites.get(name)
        return LoadedSite(rt) if rt is not None else None

    @property
    def sites(self) -> list[str]:
        """The sites where something is loaded."""
        return list(self._runtime.sites)

    @property
    def causal(self) -> bool:
        """Whether what the loaded packs do at a position depends only on it and the positions before
        it (so a shared prefix may run once: ``EditRuntime.causal``)."""
        return self._runtime.causal


@dataclass(frozen=True)
class EditControls:
    """What a method may change for a while, each inside a ``with`` block and undone after it (the
    calls of :class:`~grace_hooks.engine.runtime.EditRuntime` of the same names; the ``EditContext``
    documents each)."""

    staged: Callable[[dict[str, "SiteContribution"]], contextlib.AbstractContextManager]
    disabled: Callable[[], contextlib.AbstractContextManager]
    attention_mask: Callable[["torch.Tensor | None", "torch.Tensor | None"], contextlib.AbstractContextManager]
    option: Callable[[str, Any], contextlib.AbstractContextManager]

    @classmethod
    def of(cls, runtime: "EditRuntime") -> "EditControls":
        return cls(runtime.staged, runtime.disabled, runtime.attention_mask, runtime.option)


__all__ = ["EditControls", "LayerView", "LoadedSite", "LoadedView", "read_only"]
