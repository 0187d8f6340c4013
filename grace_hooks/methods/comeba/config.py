from __future__ import annotations

from dataclasses import dataclass

from ...config import option
from ..delta.config import SolveConfig

GATES = ("router", "zscore")
ALPHA_RULES = ("prompt_max", "subject")


@dataclass
class ComebaConfig(SolveConfig):
    """COMEBA-HK (Li et al. 2024): MEMIT's solve, accumulated in a hook layer per edited block."""

    gate: str = option("router", "scope gate: 'router' (the edits' keys in the FAISS router, as routed deltas: "
                                 "unrelated text stays bit-identical) or 'zscore' (the paper: the hook output where "
                                 "the z-score of |W_h x - W0 x| within the sequence is >= alpha)", GATES)
    alpha: float = option(2.2, "zscore gate: the first pack's threshold; each pack may only lower it (alpha_from)")
    alpha_from: str = option("prompt_max", "zscore gate: after a batch alpha falls to the smallest, over its edit "
                                           "prompts, of 'prompt_max': the prompt's largest z-score (the reference "
                                           "code: every prompt fires somewhere) or 'subject': the z-score at its last "
                                           "subject token (the key's position fires, but one odd prompt can pull alpha "
                                           "below 0)", ALPHA_RULES)
