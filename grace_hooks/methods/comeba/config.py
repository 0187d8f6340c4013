from __future__ import annotations

from dataclasses import dataclass

from ...config import option
from ..delta.config import SolveConfig

GATES = ("router", "zscore")


@dataclass
class ComebaConfig(SolveConfig):
    """COMEBA-HK (Li et al. 2024): MEMIT's solve, accumulated in a hook layer per edited block."""

    gate: str = option("router", "scope gate: 'router' (the edits' keys in the FAISS router, as routed deltas: "
                                 "unrelated text stays bit-identical) or 'zscore' (the paper: the hook output where "
                                 "the z-score of |W_h x - W0 x| within the sequence is >= alpha)", GATES)
    alpha: float = option(2.2, "zscore gate: the first pack's threshold; each pack lowers it to the smallest "
                               "per-prompt maximum z-score of its edit prompts, so that every edited prompt fires")
