"""COMEBA-HK hook layers (Li et al. 2024): beside a frozen site W0, a hook layer W_h = W0 + the
increments of every loaded ``comeba_hk`` pack, whose output replaces the base's where a scope gate
lets it through: where one of its packs' router keys wins the position (the router gate), or where
its z-score gate fires. This is COMEBA-HK's effect (:mod:`grace_hooks.engine.effects`).

The z-score gate (the paper, sec. 3.3): per position, M_i = |W_h x_i - W0 x_i|, standardised over
the positions of its sequence; the hook output is used where z_i >= alpha. The paper scores a whole
sequence at once. A KV cache processes a sequence over several calls, so here a position's z-score
is taken, once, over every real position of its sequence processed so far, the other positions of
the same call included: on a single forward that is exactly the paper's; a token generated one at a
time is standardised against the prompt and the tokens generated before it. Padding never counts.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ...engine.effects import Effect, EffectLayer, Gate, GateContext, Hits, Plan, gate_label, stored
from ...engine.loaded import LayerView
from ...locate.precision import add_to, dense_change, lowrank_change

ZSCORE_GATE = gate_label("z-score")  # the 'pack' of a traced hit where the z-score gate, not a key, fired
EVERYWHERE = "comeba_hk.everywhere"  # the option under which hook layers act at every real position


def lowrank_is_smaller(rank: int, d_out: int, d_in: int) -> bool:
    """Whether rank-r factors take fewer numbers than the dense d_out x d_in matrix."""
    return rank * (d_out + d_in) < d_out * d_in


def zscores(m: torch.Tensor, valid: torch.Tensor, prior: tuple[torch.Tensor, ...] | None = None):
    """z-score of each position's M within its row (float64), over the row's valid positions plus
    ``prior`` = (count, sum, sum of squares) of the positions an earlier call processed. Positions
    whose row has fewer than two values, or no spread, get -inf (they never fire).
    Returns (z, (count, sum, sum of squares) including this call)."""
    m = torch.where(valid, m.to(torch.float64), 0.0)
    count, total, squares = valid.sum(-1).to(torch.float64), m.sum(-1), (m * m).sum(-1)
    if prior is not None:
        count, total, squares = count + prior[0], total + prior[1], squares + prior[2]
    mean = total / count.clamp(min=1)
    var = (squares - count * mean * mean) / (count - 1).clamp(min=1)  # unbiased, as the paper's torch.std
    std = var.clamp(min=0).sqrt()
    ok = (count >= 2) & (std > 0)
    z = (m - mean.unsqueeze(-1)) / torch.where(ok, std, 1.0).unsqueeze(-1)
    z = torch.where(ok.unsqueeze(-1) & valid, z, float("-inf"))
    return z, (count, total, squares)


class HookLayer(EffectLayer):
    """The hook layer of one site: its increments (oldest first) and their sum. The running z-score
    statistics of the sequences being decoded belong to the caller (one set per thread, kept in
    its forward context)."""

    order = 10  # first of the changes at the positions in scope

    def __init__(self, d_in: int, d_out: int, site: str = "") -> None:
        super().__init__(d_in, d_out, site)
        self._combined: tuple[torch.Tensor, ...] | None = None
        self.version = 0  # changes with every add / remove: running statistics from before no longer apply

    @property
    def increments(self) -> dict[str, "HookIncrement"]:
        return self.effects

    def add(self, pack_id: str, inc: "HookIncrement", key_ids: np.ndarray | None = None) -> None:
        super().add(pack_id, inc, key_ids)
        self._combined = None
        self.version += 1

    def remove(self, pack_id: str) -> None:
        if pack_id in self.effects:
            super().remove(pack_id)
            self._combined = None
            self.version += 1

    @property
    def causal(self) -> bool:
        """The z-score gate scores a position against every position of its row in the same call."""
        return not self or self.alpha is None

    @property
    def alpha(self) -> float | None:
        """The z-score threshold: the lowest of the loaded packs' (alpha only falls along a chain)."""
        alphas = [i.alpha for i in self.increments.values() if i.alpha is not None]
        return min(alphas) if alphas else None

    def _parts(self) -> tuple[torch.Tensor, ...]:
        """(U, V) with every increment's factors side by side, or (D,) their dense sum when that is smaller.
        Rebuilt from the increments in load order, so removing a pack gives back the exact earlier sum."""
        if self._combined is None:
            incs = list(self.increments.values())
            rank = sum(i.rank for i in incs)
            if all(i.dense is None for i in incs) and lowrank_is_smaller(rank, self.d_out, self.d_in):
                self._combined = (torch.cat([i.U for i in incs], 1), torch.cat([i.V for i in incs], 1))
            else:
                self._combined = (sum(i.matrix() for i in incs).float(),)
        return self._combined

    def change(self, x: torch.Tensor) -> torch.Tensor:
        """W_h x - W0 x at every row of ``x`` (..., d_in), in float32 at least (the z-score gate
        scores its norm; the plan adds it rounded once to the activation's dtype)."""
        parts = self._parts()
        if len(parts) == 2:
            return lowrank_change(x, parts[0], parts[1])
        return dense_change(x, parts[0])

    def zscore_gate(self, change: torch.Tensor, valid: torch.Tensor, past: int,
                    running: tuple | None = None) -> tuple[torch.Tensor, tuple]:
        """Where the z-score gate lets the hook output through, for ``change`` (batch, width, d_out).
        ``past``: positions of these sequences processed by earlier calls (KV cache); ``running``: the
        statistics the previous call returned, used when it was the same batch and ended there.
        Returns (fire, the statistics including this call)."""
        batch, width = valid.shape
        fits = running is not None and past > 0 and running[:3] == (self.version, batch, past)
        z, stats = zscores(change.norm(dim=-1), valid, running[3:] if fits else None)
        return z >= self.alpha, (self.version, batch, past + width, *stats)

    # --- a forward
    def gate(self, x: torch.Tensor, valid: torch.Tensor, past: int, context: GateContext) -> Gate | None:
        """Where the z-score gate fires (with its change at every position), or every real position
        under the EVERYWHERE option; None for the router gate alone. The running statistics are
        kept in ``context.kept["zscore"]``."""
        if not self:
            return None
        if context.options.get(EVERYWHERE):
            return Gate(valid.reshape(-1))
        if self.alpha is None:
            return None
        width = x.shape[-2] if x.dim() > 1 else 1
        change = self.change(x)
        fire, context.kept["zscore"] = self.zscore_gate(change.reshape(-1, width, change.shape[-1]),
                                                        valid.reshape(-1, width), past, context.kept.get("zscore"))
        return Gate(fire.reshape(-1), ZSCORE_GATE, change)

    def plan(self, flat_x: torch.Tensor, hits: Hits | None, gate: Gate | None) -> Plan | None:
        """The hook layer's output W_h x = W0 x + its increments at x, where its gate fired or one of
        its packs' keys won the position."""
        if not self:
            return None
        fire = gate.fire if gate is not None else None
        if hits is not None:
            rows, _ = hits.won_by(self.effects)
            fire = fire.clone() if fire is not None else torch.zeros(len(flat_x), dtype=torch.bool, device=flat_x.device)
            fire[rows] = True
        if fire is None or not bool(fire.any()):
            return None
        sel = fire.nonzero().squeeze(1)
        change = gate.data if gate is not None else None
        add = change.reshape(-1, change.shape[-1])[sel] if change is not None else self.change(flat_x[sel])

        def hook(flat: torch.Tensor) -> None:
            flat[sel] = add_to(flat[sel], add)

        return hook


class HookLayerView(LayerView):
    """What COMEBA-HK reads of the hook layer loaded at a site (``LoadedSite.view(HookLayerView)``)."""

    of = HookLayer
    _layer: HookLayer

    @property
    def alpha(self) -> float | None:
        """The z-score threshold in force (the lowest of the loaded packs'), None for the router gate."""
        return self._layer.alpha

    def absorbed_keys(self) -> torch.Tensor | None:
        """The keys every loaded increment absorbed, oldest first, as rows (total, d_in): a new
        tensor; None when there are none."""
        earlier = [i.keys for i in self._layer.increments.values()]
        return torch.cat(earlier) if earlier else None

    def change(self, x: torch.Tensor) -> torch.Tensor:
        """W_h x - W0 x at every row of ``x`` (..., d_in), as the gate scores it: a new tensor."""
        return self._layer.change(x)


@dataclass
class HookIncrement(Effect):
    """One pack's increment to a site's hook layer, low-rank (U V^T) or dense, and its gate."""

    keys: torch.Tensor  # (n, d_in) the keys it absorbed: later packs add K K^T to their covariance
    U: torch.Tensor | None = None  # (d_out, r)
    V: torch.Tensor | None = None  # (d_in, r)
    dense: torch.Tensor | None = None  # (d_out, d_in)
    alpha: float | None = None  # the z-score gate's threshold after this pack; None: the router gate

    layer: ClassVar[type[EffectLayer]] = HookLayer

    @property
    def rank(self) -> int:
        return self.U.shape[1] if self.dense is None else min(self.dense.shape)

    def matrix(self) -> torch.Tensor:
        """The increment as a dense float64 matrix (d_out, d_in)."""
        if self.dense is not None:
            return self.dense.to(torch.float64)
        return self.U.to(torch.float64) @ self.V.to(torch.float64).T

    def stored(self) -> "HookIncrement":
        return HookIncrement(stored(self.keys), stored(self.U), stored(self.V), stored(self.dense), self.alpha)

    def dense_update(self) -> torch.Tensor:
        return self.matrix()


def hook_layers_everywhere(ctx) -> contextlib.AbstractContextManager:
    """Hook layers act at every real position inside the block, whatever their gate (COMEBA-HK
    measures keys and residuals through the hook layers this way while it solves a batch);
    ``ctx``: the method's EditContext."""
    return ctx.option(EVERYWHERE, True)


__all__ = ["EVERYWHERE", "HookIncrement", "HookLayer", "HookLayerView", "ZSCORE_GATE", "hook_layers_everywhere", "lowrank_is_smaller",
           "zscores"]
