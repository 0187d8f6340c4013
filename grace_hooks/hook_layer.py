"""COMEBA-HK hook layers (Li et al. 2024): beside a frozen site W0, a hook layer W_h = W0 + the
increments of every loaded ``comeba_hk`` pack, whose output replaces the base's where a scope gate
lets it through.

The z-score gate (the paper, sec. 3.3): per position, M_i = |W_h x_i - W0 x_i|, standardised over
the positions of its sequence; the hook output is used where z_i >= alpha. The paper scores a whole
sequence at once. A KV cache processes a sequence over several calls, so here a position's z-score
is taken, once, over every real position of its sequence processed so far, the other positions of
the same call included: on a single forward that is exactly the paper's; a token generated one at a
time is standardised against the prompt and the tokens generated before it. Padding never counts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HookIncrement:
    """One pack's increment to a site's hook layer, low-rank (U V^T) or dense, and its gate."""

    keys: torch.Tensor  # (n, d_in) the keys it absorbed: later packs add K K^T to their covariance
    U: torch.Tensor | None = None  # (d_out, r)
    V: torch.Tensor | None = None  # (d_in, r)
    dense: torch.Tensor | None = None  # (d_out, d_in)
    alpha: float | None = None  # the z-score gate's threshold after this pack; None: the router gate

    @property
    def rank(self) -> int:
        return self.U.shape[1] if self.dense is None else min(self.dense.shape)

    def matrix(self) -> torch.Tensor:
        """The increment as a dense float64 matrix (d_out, d_in)."""
        if self.dense is not None:
            return self.dense.to(torch.float64)
        return self.U.to(torch.float64) @ self.V.to(torch.float64).T


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


class HookLayer:
    """The hook layer of one site: its increments (oldest first) and their sum. The running z-score
    statistics of the sequences being decoded belong to the caller (one set per thread)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        self.d_in, self.d_out = d_in, d_out
        self.increments: dict[str, HookIncrement] = {}
        self._combined: tuple[torch.Tensor, ...] | None = None
        self.version = 0  # changes with every add / remove: running statistics from before no longer apply

    def __bool__(self) -> bool:
        return bool(self.increments)

    def add(self, pack_id: str, inc: HookIncrement) -> None:
        self.increments[pack_id] = inc
        self._combined = None
        self.version += 1

    def remove(self, pack_id: str) -> None:
        if self.increments.pop(pack_id, None) is not None:
            self._combined = None
            self.version += 1

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
        """W_h x - W0 x at every row of ``x`` (..., d_in)."""
        parts = self._parts()
        if len(parts) == 2:
            return (x @ parts[1].to(x)) @ parts[0].to(x).T
        return x @ parts[0].to(x).T

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

__all__ = ["HookIncrement", "HookLayer", "lowrank_is_smaller", "zscores"]
