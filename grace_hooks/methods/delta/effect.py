"""The effect of a weight-delta pack at a site: dW = U V^T adds dW x to the site output, at every
position (global) or where the router puts x in scope of the pack's keys (routed). A squashed chain
of routed packs keeps each pack's columns as a segment that acts where that pack's keys are in scope."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from ...engine.effects import Effect, EffectLayer, Gate, Hits, NoLoraForm, Plan, stored
from ...engine.loaded import LayerView
from ...locate.precision import add_to, lowrank_change


class DeltaLayer(EffectLayer):
    """The weight deltas loaded at a site: global ones at every position, in load order; then each
    routed one once at every position where one of its keys is in scope (two packs that edit one
    subject both act), except where a winning key claims the position whole."""

    order = 20  # after the hook layer's change, before replacements

    def everywhere(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        # each delta's change in float32, added in load order and rounded once to the activation's dtype
        changes = [lowrank_change(x, d.U, d.V) for d in self.effects.values() if not d.routed]
        return add_to(y, *changes) if changes else None

    def plan(self, flat_x: torch.Tensor, hits: Hits | None, gate: Gate | None) -> Plan | None:
        if hits is None:
            return None
        whole = [p for p, d in self.effects.items() if d.segments is None]
        at = {pack_id: [(None, sel)] for pack_id, sel in hits.in_scope_of(whole)}
        for pack_id, d in self.effects.items():
            if d.segments is not None and pack_id in self.key_ids:
                if found := self._segments_in_scope(pack_id, d, hits):
                    at[pack_id] = found
        if not at:
            return None
        in_order = [(pack_id, part, sel) for pack_id in self.effects for part, sel in at.get(pack_id, ())]

        def add(flat: torch.Tensor) -> None:
            for pack_id, part, sel in in_order:
                U, V = self.effects[pack_id].factors_of(part)
                flat[sel] = add_to(flat[sel], lowrank_change(flat_x[sel], U, V))  # as in everywhere()

        return add

    def _segments_in_scope(self, pack_id: str, d: "LowRankDelta", hits: Hits) -> list[tuple[int, torch.Tensor]]:
        """(segment, flat positions) of a squashed pack, in segment order: where a key of that segment
        (one pack of the chain) is in scope, once per position, as the chain's packs acted."""
        rows, local = hits.pairs_of(self.key_ids[pack_id])
        if not len(local):
            return []
        segment = torch.from_numpy(d.key_segments[local]).to(rows.device)
        out = []
        for part in sorted(set(segment.tolist())):
            out.append((part, torch.unique(rows[segment == part])))
        return out

    def factors(self, part: str) -> torch.Tensor | None:
        """The ``part`` ('V' or 'keys') of every loaded delta, as columns (d_in, total), float64."""
        cols = [d.V if part == "V" else d.keys.T for d in self.effects.values() if part == "V" or d.keys is not None]
        return torch.cat(cols, dim=1).to(torch.float64) if cols else None


class DeltaLayerView(LayerView):
    """What the weight-delta methods read of the deltas loaded at a site (``LoadedSite.view(DeltaLayerView)``)."""

    of = DeltaLayer
    _layer: DeltaLayer

    def factors(self, part: str) -> torch.Tensor | None:
        """The ``part`` ('V' or 'keys') of every loaded delta, as columns (d_in, total), float64: a
        new tensor; None when there are none."""
        return self._layer.factors(part)


@dataclass
class LowRankDelta(Effect):
    """A weight update dW = U V^T at a site: the site output gains dW x."""

    U: torch.Tensor  # (d_out, r)
    V: torch.Tensor  # (d_in, r)
    routed: bool = False  # False: at every position; True: only where the router puts x in scope of the pack's keys
    keys: torch.Tensor | None = None  # (n, d_in) the edit keys it was solved for (later solves may build on them)
    # a squashed chain (routed): columns of U and V per pack of the chain, and the pack of each router key
    segments: tuple[int, ...] | None = None
    key_segments: np.ndarray | None = field(default=None, compare=False)

    layer: ClassVar[type[EffectLayer]] = DeltaLayer

    def __post_init__(self) -> None:
        if self.segments is not None:
            ends = np.cumsum((0, *self.segments))
            # each pack's factors apart and contiguous: its change is computed as the chain computed it
            self._parts = [(self.U[:, a:b].contiguous(), self.V[:, a:b].contiguous()) for a, b in zip(ends[:-1], ends[1:])]

    def factors_of(self, segment: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) of the whole delta (``None``) or of one segment of a squashed chain."""
        return (self.U, self.V) if segment is None else self._parts[segment]

    def stored(self) -> "LowRankDelta":
        return LowRankDelta(stored(self.U), stored(self.V), self.routed, stored(self.keys), self.segments,
                            self.key_segments)

    @property
    def everywhere(self) -> bool:
        return not self.routed

    def dense_update(self) -> torch.Tensor:
        return self.U.to(torch.float64) @ self.V.to(torch.float64).T

    def lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.routed:
            raise NoLoraForm("it is routed: its delta acts only where its keys fire, which a LoRA adapter cannot "
                             "express; compute the edit with mode=global to export it")
        return self.V.T.float().contiguous(), self.U.float().contiguous()


__all__ = ["DeltaLayer", "DeltaLayerView", "LowRankDelta"]
