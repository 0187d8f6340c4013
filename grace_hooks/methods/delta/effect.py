"""The effect of a weight-delta pack at a site: dW = U V^T adds dW x to the site output, at every
position (global) or where the router puts x in scope of the pack's keys (routed)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

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
        at = hits.in_scope_of(self.effects)
        if not at:
            return None

        def add(flat: torch.Tensor) -> None:
            for pack_id, sel in at:
                d = self.effects[pack_id]
                flat[sel] = add_to(flat[sel], lowrank_change(flat_x[sel], d.U, d.V))  # as in everywhere()

        return add

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

    layer: ClassVar[type[EffectLayer]] = DeltaLayer

    def stored(self) -> "LowRankDelta":
        return LowRankDelta(stored(self.U), stored(self.V), self.routed, stored(self.keys))

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
