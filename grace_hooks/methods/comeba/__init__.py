"""COMEBA-HK (Li et al. 2024): consecutive batch edits absorbed by hook layers beside frozen sites,
used where a scope gate (the paper's z-score, or the router) says an input is in scope."""
from .config import ComebaConfig
from .method import ComebaHK
from .squash import squash_packs

__all__ = ["ComebaConfig", "ComebaHK", "squash_packs"]
