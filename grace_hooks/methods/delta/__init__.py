"""Locate-then-edit weight deltas (MEMIT, ENCORE, O-Edit), stored as low-rank factors and applied
by hooks: globally (as the papers) or only where the pack's keys route them."""
from .config import DeltaConfig, EncoreConfig, OEditConfig
from .method import DeltaMethod
from .variants import Encore, Memit, OEdit

__all__ = ["DeltaConfig", "EncoreConfig", "OEditConfig", "DeltaMethod", "Memit", "Encore", "OEdit"]
