"""The effect of a GRACE pack at a site: where one of its keys wins a position, the site output
there is replaced by that key's value (the position is claimed whole: nothing else acts there)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...engine.effects import Effect, EffectLayer, Gate, Hits, Plan, stored
from ...engine.loaded import LayerView


class Replacements(EffectLayer):
    """The GRACE codebooks loaded at a site: a winning key's value replaces the output."""

    order = 30  # last: a replacement takes the position whole
    exclusive = True

    def plan(self, flat_x: torch.Tensor, hits: Hits | None, gate: Gate | None) -> Plan | None:
        won = self.winning(hits, "values")
        if won is None:
            return None
        rows, values = won

        def replace(flat: torch.Tensor) -> None:
            flat[rows] = values.to(flat)  # the float32 values, rounded to the output's dtype (and moved to its device)

        return replace

    def value(self, key_id: int, pack_id: str | None) -> torch.Tensor:
        """The value of router key ``key_id`` (of pack ``pack_id``); zeros for a key of another family."""
        if pack_id not in self.effects:
            return torch.zeros(self.d_out, dtype=torch.float32)  # as the stored values
        return self.keyed("values", torch.tensor([key_id]))[0]


class ReplacementsView(LayerView):
    """What GRACE reads of the codebooks loaded at a site (``LoadedSite.view(ReplacementsView)``)."""

    of = Replacements
    _layer: Replacements

    def value(self, key_id: int, pack_id: str | None) -> torch.Tensor:
        """The value of router key ``key_id`` (of pack ``pack_id``), a new tensor; zeros for a key of
        another family (a warm start for a new key that takes over its label)."""
        return self._layer.value(key_id, pack_id).clone()


@dataclass
class Replacement(Effect):
    """One pack's values at a site: row i replaces the output where key i wins."""

    values: torch.Tensor  # (n, d_out)

    layer: ClassVar[type[EffectLayer]] = Replacements

    def stored(self) -> "Replacement":
        return Replacement(stored(self.values))


__all__ = ["Replacement", "Replacements", "ReplacementsView"]
