"""The three weight-delta methods: one preservation term or constraint each over the shared pipeline."""
from __future__ import annotations

import logging

import torch

from ...engine.loaded import LoadedSite
from ...locate.linalg import PreservationTerms, orthonormal_basis
from ..registry import register
from .config import DeltaConfig, EncoreConfig, OEditConfig
from .method import DeltaMethod, loaded_factors

log = logging.getLogger(__name__)


@register
class Memit(DeltaMethod):
    """MEMIT (Meng et al. 2023, eq. 14): P = lambda C0."""

    name = "memit"
    config_class = DeltaConfig

    def preservation(self, d_in: int, loaded: LoadedSite | None, cfg: DeltaConfig) -> PreservationTerms:
        return PreservationTerms(cfg.c0_weight(d_in))


@register
class Encore(DeltaMethod):
    """ENCORE (Gupta et al. 2025, the norm-constrained MEMIT update):
    P = lambda_p C0 + lambda_N I + sum over earlier edits of K_p K_p^T (the keys the loaded packs carry;
    by default only in global mode, see EncoreConfig.previous_edits)."""

    name = "encore"
    config_class = EncoreConfig

    def preservation(self, d_in: int, loaded: LoadedSite | None, cfg: EncoreConfig) -> PreservationTerms:
        previous = loaded_factors(loaded, "keys") if cfg.keeps_previous_edits() else None
        return PreservationTerms(cfg.c0_weight(d_in), cfg.norm_lambda, previous)


@register
class OEdit(Memit):
    """O-Edit (Cai & Cao 2024): MEMIT's objective, solved orthogonally to the earlier updates at the site."""

    name = "oedit"
    config_class = OEditConfig

    def constraint(self, loaded: LoadedSite | None, cfg: OEditConfig) -> torch.Tensor | None:
        earlier = loaded_factors(loaded, "V" if cfg.orthogonal_to == "updates" else "keys")
        if earlier is None:
            return None
        basis = orthonormal_basis(earlier)
        if basis.shape[1] >= basis.shape[0]:
            log.warning("oedit: earlier updates span every input direction (%d); the new update must be zero", basis.shape[0])
        return basis
