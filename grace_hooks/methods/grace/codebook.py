"""GRACE's codebook rules for a new pack, taking the keys of already loaded packs into account.

Faithful to the paper (Hartvigsen et al. 2023, Alg. 1 and the official code) inside a pack:
with d the distance to the nearest key,
- d > eps_init + eps_nearest: add a key with radius eps_init;
- else, labels differ: add a key, and both radii become d/2 (split);
- else, labels match: the nearest radius grows to d (coverage expansion) and its value is trained on
  this prompt too.
Across packs the earlier pack is immutable: a split stores a radius *shrink* of the earlier key in
the new pack (undone when the new pack is removed), and a label match adds a new key whose value
starts from the earlier key's value. One departure: a new label for an earlier pack's key itself (the
same prompt edited again, d within DUPLICATE of the key's norm) is an update of that fact, not a split,
whose radii d/2 would be about 0 and fire only on bit-equal activations: the new key takes the earlier
key's radius and the newer pack wins where both are in scope; removing it brings the earlier fact back.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ...engine.loaded import LoadedSite
from ...engine.router import NO_KEY
from .effect import ReplacementsView

SPLIT_MARGIN = 1e-5  # the paper's code keeps the nearest key just inside d/2
DUPLICATE = 1e-3  # a new key this close to an earlier pack's key, relative to its norm, is that key again


def _value(loaded: LoadedSite, key_id: int) -> torch.Tensor:
    """The replacement value of a loaded key (zeros for a key of another family)."""
    layer = loaded.view(ReplacementsView)
    where = loaded.key_pack(key_id)
    if layer is None or where is None:
        return torch.zeros(loaded.dims[1], dtype=torch.float32)  # as the stored values
    return layer.value(key_id, where[0])


@dataclass
class Entry:
    key: torch.Tensor
    radius: float
    label: str
    requests: list[int]
    init_value: torch.Tensor | None = None  # warm start from an earlier pack's value


@dataclass
class Codebook:
    eps_init: float
    entries: list[Entry] = field(default_factory=list)
    shrinks: dict[tuple[str, int], float] = field(default_factory=dict)  # (earlier pack id, key index) -> radius
    splits: int = 0
    expansions: int = 0
    updates: int = 0  # earlier keys given a new answer (see DUPLICATE)

    def _nearest_own(self, q: torch.Tensor) -> tuple[float, int]:
        if not self.entries:
            return float("inf"), -1
        # float32 keys and query (Grace.compute upcasts the site input), so distances and radii are
        # float32 whatever the model's dtype, as the router measures them
        d = torch.stack([e.key for e in self.entries]).sub(q).norm(dim=1)
        j = int(d.argmin())
        return float(d[j]), j

    def add(self, q: torch.Tensor, label: str, request: int, loaded: LoadedSite | None) -> None:
        d_own, j_own = self._nearest_own(q)
        d_old, id_old = (float("inf"), NO_KEY)
        if loaded is not None:
            dist, ids = loaded.nearest(q[None].float().cpu().numpy())
            d_old, id_old = float(dist[0]), int(ids[0])
        if d_own <= d_old:
            if j_own < 0:
                self.entries.append(Entry(q, self.eps_init, label, [request]))
                return
            near = self.entries[j_own]
            self._rule(q, label, request, d_own, near.radius, near.label, own=near)
        else:
            radius = float(loaded.radius(np.array([id_old]))[0])
            self._rule(q, label, request, d_old, radius, loaded.label(id_old), old=(loaded, id_old))

    def _rule(self, q, label, request, d, radius, near_label, own: Entry | None = None, old=None) -> None:
        if d > self.eps_init + radius:
            self.entries.append(Entry(q, self.eps_init, label, [request]))
        elif near_label != label and old is not None and d <= DUPLICATE * float(q.norm()):
            self.updates += 1  # the same key with a new answer: the newer pack wins where both fire
            self.entries.append(Entry(q, max(self.eps_init, radius), label, [request]))
        elif near_label != label:
            self.splits += 1
            self.entries.append(Entry(q, d / 2, label, [request]))
            shrunk = d / 2 - SPLIT_MARGIN
            if own is not None:
                own.radius = min(own.radius, shrunk)
            else:
                loaded, key_id = old
                where = loaded.key_pack(key_id)
                if where is not None:
                    self.shrinks[where] = min(self.shrinks.get(where, radius), shrunk)
        elif own is not None:
            self.expansions += int(d > own.radius)
            own.radius = max(own.radius, d)
            own.requests.append(request)
        else:
            loaded, key_id = old
            self.entries.append(Entry(q, self.eps_init, label, [request], init_value=_value(loaded, key_id)))
