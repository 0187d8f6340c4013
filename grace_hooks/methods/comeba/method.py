"""COMEBA-HK (Li et al. 2024, sec. 3): MEMIT's locate-then-edit solve, with every batch's update
absorbed by a hook layer W_h beside each edited block instead of by the block's weights.

- The normal matrix accumulates: lambda C0 + the K K^T of every earlier batch at the site (the
  keys each loaded pack stores), plus this batch's (the paper's eq. for C_accu).
- Keys and residuals are measured through the current hook layers acting at every position (the
  reference code's temporary hooks), with this batch's lower blocks already staged.
- z-score gate: after the batch, alpha falls so that every edit prompt fires (see
  ``_lowered_alphas``); each pack stores the alpha reached after it.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import replace

import torch

from ...bases.architectures import Site
from ...bases.hooks import forward_until
from ...engine.loaded import LoadedSite
from ...engine.runtime import SiteContribution
from ...errors import PackError
from ...locate.linalg import PreservationTerms
from ...requests import EditRequest
from ...store.packs import EditPack
from ...store.schema import TensorSpec
from ..base import EditContext, EditMethod
from ..delta.method import DeltaMethod
from ..registry import register
from .config import ComebaConfig
from .hook_layer import HookLayerView, hook_layers_everywhere, lowrank_is_smaller, zscores
from .squash import hook_increment, squash_packs

log = logging.getLogger(__name__)

ALPHA_MARGIN = 1e-3  # a padded batch and a single prompt round the z-score differently


@register
class ComebaHK(DeltaMethod):
    name = "comeba_hk"
    config_class = ComebaConfig
    capabilities = frozenset({"hook_layer", "routed", "squash"})
    router_keys_are_edit_keys = False  # its squash folds the edit keys into K^T K; the router keys stay per key

    def preservation(self, d_in: int, loaded: LoadedSite | None, cfg: ComebaConfig) -> PreservationTerms:
        layer = loaded.view(HookLayerView) if loaded is not None else None
        earlier = layer.absorbed_keys() if layer is not None else None
        return PreservationTerms(cfg.c0_weight(d_in), previous_keys=earlier.T if earlier is not None else None)

    without_request = EditMethod.without_request  # hook layers solved together: no request comes out alone

    def routes(self, cfg: ComebaConfig) -> bool:
        return cfg.gate == "router"

    def solving(self, ctx: EditContext, cfg: ComebaConfig):
        """Router gate: the hook layers act where they will act, at router hits. z-score gate: at every
        position (the reference code's temporary hooks; the gate's alpha is only known afterwards)."""
        return hook_layers_everywhere(ctx) if cfg.gate == "zscore" else contextlib.nullcontext()

    def finish(self, ctx: EditContext, requests: list[EditRequest], sites: list[Site],
               staged: dict[str, SiteContribution], parts: dict[str, dict[str, torch.Tensor]], cfg: ComebaConfig) -> dict:
        for site in sites:  # a batch wider than the break-even rank is stored dense
            t = parts[site.name]
            d_in, d_out = site.dims(ctx.model)
            if not lowrank_is_smaller(t["U"].shape[1], d_out, d_in):
                t["dense"] = (t.pop("U").double() @ t.pop("V").double().T).float()
        if cfg.gate != "zscore":
            return {}
        alphas = self._lowered_alphas(ctx, sites, staged, requests, cfg)
        for name, alpha in alphas.items():
            parts[name]["alpha"] = torch.tensor([alpha], dtype=torch.float32)
        return {"alpha": alphas}

    @staticmethod
    def _lowered_alphas(ctx: EditContext, sites: list[Site], staged: dict[str, SiteContribution],
                        requests: list[EditRequest], cfg: ComebaConfig) -> dict[str, float]:
        """Each site's alpha after this batch: the smallest, over the edit prompts, of the prompt's
        largest z-score (``alpha_from="prompt_max"``, the reference code) or of the z-score at its last
        subject token, where its key is (``"subject"``), never above the alpha before. The z-scores
        are taken as the deployed model will see them: the batch absorbed and the blocks below
        gated with their new alpha (the reference code uses the base model's site inputs)."""
        enc = ctx.tokens.padded([r.text for r in requests], ctx.device)  # right-padded: positions stay
        rows, cols = torch.arange(len(requests)), torch.tensor(ctx.tokens.key_positions(requests))
        pending = {n: replace(c, effect=replace(c.effect, alpha=math.inf)) for n, c in staged.items()}
        alphas: dict[str, float] = {}
        for site in sites:
            loaded = ctx.loaded.site(site.name)
            layer = loaded.view(HookLayerView) if loaded is not None else None
            before = layer.alpha if layer is not None and layer.alpha is not None else cfg.alpha
            captured = []
            with ctx.staged(pending), ctx.hooks.scoped() as scope, torch.no_grad():
                scope.forward(site.module(ctx.model), lambda m, a, o: captured.append(a[0].detach()))
                forward_until(ctx.model, site.module(ctx.model), **enc)
                change = ctx.loaded.site(site.name).view(HookLayerView).change(captured[0])
            z = zscores(change.norm(dim=-1), enc["attention_mask"].bool().to(change.device))[0]  # a split model: the site's device
            z = z.max(dim=1).values if cfg.alpha_from == "prompt_max" else z[rows, cols.to(z.device)]
            finite = z[torch.isfinite(z)]
            if len(finite) < len(z):
                log.warning("comeba_hk: %d edit prompts are too short for a z-score at %s (under 2 tokens); "
                            "their hook cannot fire there", len(z) - len(finite), site.name)
            lowest = float(finite.min()) - ALPHA_MARGIN if len(finite) else math.inf
            alphas[site.name] = float(torch.tensor(min(before, lowest), dtype=torch.float32))  # as the pack stores it
            pending[site.name] = replace(pending[site.name], effect=replace(pending[site.name].effect, alpha=alphas[site.name]))
        return alphas

    def site_layouts(self, config: ComebaConfig) -> list[dict[str, TensorSpec]]:
        """The absorbed keys, the increment low-rank (U, V) or dense, and the gate's own tensors."""
        gate = self.route_layout() if config.gate == "router" else {"alpha": TensorSpec((1,))}
        keys = {"keys": TensorSpec(("m", "d_in"))}
        return [keys | {"U": TensorSpec(("d_out", "r")), "V": TensorSpec(("d_in", "r"))} | gate,
                keys | {"dense": TensorSpec(("d_out", "d_in"))} | gate]

    @staticmethod
    def _contribution(t: dict[str, torch.Tensor], routed: bool, spans=None) -> SiteContribution:
        """A site's tensors as a hook-layer increment, routed by its router keys (and their subject
        spans) when it has them."""
        if routed:
            return SiteContribution(hook_increment(t), keys=t["route_keys"], radii=t["route_radii"], spans=spans)
        return SiteContribution(hook_increment(t))

    def squash(self, packs: list[EditPack], name: str) -> EditPack:
        if any(p.method != self.name for p in packs):
            raise PackError(f"squash merges {self.name} packs only; got {[p.method for p in packs]}")
        gates = [self.config_of(p).gate for p in packs]
        for p, gate in zip(packs[1:], gates[1:]):
            if gate != gates[0]:
                raise PackError(f"pack {p.name!r} uses the {gate!r} gate but {packs[0].name!r} the {gates[0]!r} gate; "
                                "squash packs of one chain only")
        return squash_packs(packs, name)
