"""What a method may read of the packs loaded on a model: a narrow, read-only view of the runtime.

A method computing an edit needs to know what is already loaded where it edits: the router keys
(where they lie, their radii, what each stands for, which pack holds it) and the earlier updates of
its own family (its effect layer at the site). It gets that through :class:`LoadedView` and
:class:`LoadedSite`, never the runtime itself, so the runtime can change without touching a method.
The view is live: inside ``EditContext.staged`` it shows the staged edit too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    from .effects import EffectLayer
    from .runtime import EditRuntime, SiteRuntime

L = TypeVar("L", bound="EffectLayer")


@dataclass(frozen=True)
class LoadedSite:
    """What is loaded at one site: its router keys, and each family's effect layer (to read)."""

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
        ``router.NO_KEY`` when there is none)."""
        return self._rt.router.nearest(queries)

    def radius(self, ids: np.ndarray) -> np.ndarray:
        """The radius in force of each router id (after any shrink by a later pack)."""
        return self._rt.router.radius(ids)

    def label(self, key_id: int) -> str:
        """What a router key stands for (GRACE's labels; '' where its pack gave none)."""
        return self._rt.labels[key_id]

    def key_pack(self, key_id: int) -> tuple[str, int] | None:
        """(pack id, index of the key within the pack at this site), or None for a key no longer loaded."""
        return self._rt.key_pack(key_id)

    def layer(self, cls: type[L]) -> L | None:
        """The family's effect layer of class ``cls`` here (its loaded effects, oldest first), or None.
        Read it; never change it (the runtime owns it)."""
        return self._rt.layer(cls)


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


__all__ = ["LoadedSite", "LoadedView"]
