"""The locate-then-edit pipeline that MEMIT, ENCORE and O-Edit share (Meng et al. 2023, sec. 4):

1. keys k at the last subject token of each edited site, averaged over model-written prefixes;
2. a target vector z per request at the output of the last edited block (NLL + KL + decay, clamp);
3. for each edited block in turn, with the earlier blocks' updates already acting: the residual
   R = (z - h_now) / (blocks left) is written by dW = R K^T (P + K K^T)^-1 (eq. 14), where the
   variants differ only in P (the preservation term) and in an optional subspace constraint.

The updates are returned as factors (U = R, V = P'^-1 K): nothing d_out x d_in is stored, and the
model is never written; each block's update acts through the runtime while later blocks are solved.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from abc import abstractmethod

import torch

from ...bases.architectures import Site, arch_spec
from ...bases.hooks import head_only_at
from ...engine.loaded import LoadedSite
from ...engine.runtime import SiteContribution
from ...engine.spans import KeyRouting, request_spans
from ...locate.covariance import SecondMoment
from ...locate.linalg import LowRank, Preservation, PreservationTerms, closed_form_update, fixed_part
from ...locate.statistics import Statistics
from ...locate.subject_keys import activations_at_subject
from ...locate.target_vectors import target_vectors
from ...requests import EditRequest
from ...store.packs import EditPack
from ...store.schema import TensorSpec, named
from ...timing import PhaseClock
from ...tokens import build_edit_batch, score_targets, scored_positions
from ..base import ComputedEdit, EditContext, EditMethod
from .config import DeltaConfig, DeltaState
from .effect import DeltaLayerView, LowRankDelta
from .squash import key_segments, segments_without, squash_chain

log = logging.getLogger(__name__)

MIN_RELATIVE_RADIUS = 0.05
# requests per forward when keys are read, the ones of like length together: 42% fewer token
# columns than one padded forward of 100 CounterFact prompts (benchmarks/results-pages/speed.md, issue 17)
KEY_FORWARD_ROWS = 25


class DeltaMethod(EditMethod):
    """A weight-delta method: subclasses give the preservation term P and the update's constraint."""

    config_class = DeltaConfig
    state_class = DeltaState
    capabilities = frozenset({"weight_delta", "routed", "remove_request", "squash"})
    # scope 'span' routes by the edit keys themselves: a pack keeps them once (a third less on disk than
    # twice); a family whose squash merges its edit keys (comeba_hk) keeps its router keys apart
    router_keys_are_edit_keys: bool = True

    # ------------------------------------------------------------------ what variants change
    @abstractmethod
    def preservation(self, d_in: int, loaded: LoadedSite | None, cfg) -> PreservationTerms:
        """What P, the part of the normal matrix that does not depend on the new keys, is made of."""

    def constraint(self, loaded: LoadedSite | None, cfg) -> torch.Tensor | None:
        """Orthonormal columns the update's row space must avoid, or None."""
        return None

    def routes(self, cfg) -> bool:
        """Whether the pack carries router keys (and acts only where they put a position in scope)."""
        return cfg.mode == "routed"

    def solving(self, ctx: EditContext, cfg) -> contextlib.AbstractContextManager:
        """How the loaded packs act while the blocks' keys and residuals are measured."""
        return contextlib.nullcontext()

    def finish(self, ctx: EditContext, requests: list[EditRequest], sites: list[Site],
               staged: dict[str, SiteContribution], parts: dict[str, dict[str, torch.Tensor]], cfg) -> dict:
        """A last step over the solved update (it may change each site's tensors, ``parts``: site ->
        part name -> tensor); returns extra metrics."""
        return {}

    # ------------------------------------------------------------------ shared parts
    def sites(self, model, cfg: DeltaConfig) -> list[Site]:
        return [Site(layer, cfg.point) for layer in cfg.layer_list(model)]

    def without_request(self, pack: EditPack, index: int) -> EditPack:
        """Request ``index``'s column of U and V, its solve key and the router keys that serve only it go.
        The rest is kept, not solved again: where no key of the pack fires nothing changes; where another
        request's key fires, the pack's update there loses the removed column's share (dW = U V^T acts
        whole wherever the pack fires). A global delta, solved jointly and acting everywhere, refuses."""
        n = len(pack.requests)
        if not self.routes(pack.config):
            super().without_request(pack, index)
        routing, kept = pack.routing.without_request(index)
        columns = torch.tensor([j for j in range(n) if j != index], dtype=torch.long)
        by_site = {}
        for site in pack.sites:
            parts = pack.site_tensors(site)
            if parts["U"].shape[1] != n or parts["V"].shape[1] != n or parts["keys"].shape[0] != n:
                super().without_request(pack, index)  # not one column per request: nothing to take out alone
            rows = torch.tensor(kept.get(site, []), dtype=torch.long)
            by_site[site] = {"U": parts["U"].index_select(1, columns).contiguous(),
                             "V": parts["V"].index_select(1, columns).contiguous(),
                             "keys": parts["keys"].index_select(0, columns).contiguous(),
                             **{part: parts[part].index_select(0, rows).contiguous()
                                for part in ("route_keys", "route_radii") if part in parts}}
        state = dataclasses.replace(pack.state, segments=segments_without(pack.state.segments, index))
        return self.rebuilt_without(pack, index, named(by_site), routing, state)

    def squash(self, packs: list[EditPack], name: str) -> EditPack:
        """One routed pack with the chain's outputs: factors and keys joined, each pack's columns acting
        where its own keys are in scope (:mod:`.squash`)."""
        return squash_chain(packs, name, self.routes)

    @staticmethod
    def statistics(ctx: EditContext) -> Statistics:
        """The base model's measurements (prefixes, C0, corpus probe), made once per weight version."""
        return Statistics(ctx.model, ctx.tokenizer, ctx.memo, ctx.disabled)

    def second_moments(self, ctx: EditContext, sites: list[Site], cfg: DeltaConfig) -> dict[str, SecondMoment]:
        """C0 at each site on the base model (loaded packs off), from the disk cache when it is there."""
        return self.statistics(ctx).second_moments(sites, cfg.corpus_spec(), cfg.max_tokens)

    def corpus_probe(self, ctx: EditContext, sites: list[Site], cfg: DeltaConfig) -> dict[str, torch.Tensor]:
        """Site inputs of the base model at the first ``cfg.corpus_probe`` tokens of the corpus."""
        return self.statistics(ctx).probe(sites, cfg.corpus_spec(), cfg.corpus_probe)

    def compute(self, ctx: EditContext, requests: list[EditRequest], cfg: DeltaConfig) -> ComputedEdit:
        model, tok = ctx.model, ctx.tokens  # each text tokenised once, shared by every step below
        sites = self.sites(model, cfg)
        clock = PhaseClock()
        with clock("context prefixes"):  # the base model's own writing, made once per weight version
            prefixes = self.statistics(ctx).prefixes(cfg.prefix_tokens)[: 1 + cfg.n_prefixes]
        with clock("C0"):
            moments = self.second_moments(ctx, sites, cfg)
        z_layer = sites[-1].layer
        with clock("target vectors"):
            tvs = target_vectors(model, tok, z_layer, requests, prefixes[: 1 + cfg.target_prefix_count()],
                                 cfg.target_config(), ctx.attention_mask)
        z = torch.stack([tv.z for tv in tvs]).to(torch.float64)  # float64 from here on: residuals and the solve
        top = model.get_submodule(arch_spec(model).layers)[z_layer]

        staged: dict[str, SiteContribution] = {}
        parts: dict[str, dict[str, torch.Tensor]] = {}  # site -> its tensors by part name
        layer_metrics = {}
        routed = self.routes(cfg)
        routing = self._routing_of(ctx, requests, sites, cfg, 1 + len(prefixes)) if routed else KeyRouting()
        keys_of: dict[str, torch.Tensor] = {}
        for sweep in range(cfg.passes):
            for i, site in enumerate(sites):
                n = site.name
                if sweep == 0:  # later sweeps keep the keys: V = M^-1 K, and so the pack's size, stays
                    with clock("keys and residuals"), ctx.staged(staged), self.solving(ctx, cfg):  # the blocks below carry their share
                        samples = activations_at_subject(model, tok, site.module(model), requests, prefixes,  # (P, n, d_in)
                                                         share_prefix=ctx.loaded.causal, batch_size=KEY_FORWARD_ROWS)
                    keys_of[n] = samples.mean(0)  # float32 samples (activations_at_subject upcasts): a float32 mean
                keys = keys_of[n]
                with ctx.staged(staged), self.solving(ctx, cfg):
                    residual = self._residual(ctx, requests, top, z, len(sites) - i, clock)
                if sweep == 0:
                    loaded = ctx.loaded.site(site.name)
                    with clock("solve"):
                        terms = self.preservation(keys.shape[1], loaded, cfg)
                        fixed = ctx.memo.get(("preservation", n, cfg.corpus_spec(), cfg.max_tokens, terms.c0_weight,
                                              terms.identity_weight),
                                             lambda: fixed_part(terms, None if moments[n].thin else moments[n].matrix,
                                                                moments[n].rows))
                        update = closed_form_update(residual.T, keys.T, Preservation(fixed, terms.previous_keys),
                                                    self.constraint(loaded, cfg))
                    # solved in float64 (closed_form_update), stored in float32 whatever the model's dtype
                    parts[n] = {"U": update.U.float().contiguous(), "V": update.V.float().contiguous(),
                                "keys": keys.float().contiguous()}
                    if routed:  # a global pack needs no router keys
                        route_keys, route_radii = self.route_keys_and_radii(ctx, sites, site, samples, keys, cfg)
                        parts[n]["route_radii"] = route_radii.float().contiguous()
                        if not (self.router_keys_are_edit_keys and torch.equal(route_keys.float(), parts[n]["keys"])):
                            parts[n]["route_keys"] = route_keys.float().contiguous()
                else:  # V = M^-1 K depends on the keys alone: a later sweep's update R' V^T only adds R' to U
                    parts[n]["U"] = (parts[n]["U"].to(torch.float64) + residual.T).float().contiguous()
                staged[n] = self._contribution(parts[n], routed, routing.spans(n) if routed else None)
                sweep_norm = float(residual.norm(dim=1).mean())
                layer_metrics.setdefault(n, {"residual_norm": sweep_norm})  # what the first sweep had to write
                layer_metrics[n]["delta_norm"] = float(torch.linalg.matrix_norm(staged[n].effect.dense_update()))
                if sweep:
                    layer_metrics[n][f"residual_norm_sweep{sweep + 1}"] = sweep_norm
        with clock("check"):
            with ctx.staged(staged), self.solving(ctx, cfg):  # how far the whole update carries the bare prompts towards z
                final = activations_at_subject(model, tok, top, requests, [""], which="output")[0].to(torch.float64)
            start = torch.stack([tv.h for tv in tvs]).to(torch.float64)
            path = (z - start).norm(dim=1)
            moved = path > 1e-6 * start.norm(dim=1)  # a request already right before any step has no way to go
            reached = (1 - (z - final).norm(dim=1) / path.clamp(min=1e-12))[moved] if bool(moved.any()) else torch.ones(1)
            landed = self._landed(ctx, requests, staged, cfg)
        metrics = {
            "target_steps_mean": sum(tv.steps for tv in tvs) / len(tvs),
            "target_prob_mean": sum(tv.target_prob for tv in tvs) / len(tvs),
            "z_reached_mean": float(reached.mean()),
            "landed": landed,  # per request: every target token is the argmax on its own prompt, update applied
            "landed_share": sum(landed) / len(landed),
            "layers": layer_metrics,
            "c0": {s.name: {"count": moments[s.name].count, "corpus": moments[s.name].corpus_source,
                            "from_cache": moments[s.name].from_cache} for s in sites},
        }
        with clock("finish"):
            metrics.update(self.finish(ctx, requests, sites, staged, parts, cfg))
        metrics["seconds"] = clock.report()
        log.info("%s: %d requests over %s, %.1f target steps on average, %.0f%% of the way to z, %d of %d landed",
                 self.name, len(requests), [s.layer for s in sites], metrics["target_steps_mean"],
                 100 * metrics["z_reached_mean"], sum(landed), len(landed))
        state = DeltaState(mode="routed" if routed else "global", corpus={s.name: moments[s.name].corpus_source for s in sites})
        return ComputedEdit(sites=[s.name for s in sites], tensors=named(parts), state=state, routing=routing, metrics=metrics)

    @staticmethod
    def _residual(ctx: EditContext, requests: list[EditRequest], top, z: torch.Tensor, blocks_left: int,
                  clock: PhaseClock) -> torch.Tensor:
        """(n, d_out) float64: what the update at the next site must add to its output, with what acts
        now (call inside the staged block): MEMIT's (z - the top block's output) / blocks left. The
        site's output joins the residual stream as is (``Site.written``)."""
        with clock("keys and residuals"):
            now = activations_at_subject(ctx.model, ctx.tokens, top, requests, [""], which="output",
                                         batch_size=KEY_FORWARD_ROWS)[0]
        return (z - now.to(torch.float64)) / blocks_left  # MEMIT eq. 14's residual spread over the blocks left

    def _landed(self, ctx: EditContext, requests: list[EditRequest], staged: dict[str, SiteContribution], cfg) -> list[bool]:
        """Whether each request's target is the greedy continuation of its own prompt (teacher-forced:
        every target token the argmax) with the whole update acting, as it will once applied."""
        batch = build_edit_batch(ctx.tokens, requests, device=ctx.device)
        index, scored = scored_positions(batch)  # the head runs on the scored positions only
        with ctx.staged(staged), self.solving(ctx, cfg), torch.inference_mode(), \
                head_only_at(ctx.model, index) as narrowed:
            logits = ctx.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        if not narrowed:
            logits = logits[index[0], index[1]]
        return [bool(c) for c in score_targets(logits, scored).correct]

    @staticmethod
    def _routing_of(ctx: EditContext, requests: list[EditRequest], sites: list[Site], cfg, n_samples: int) -> KeyRouting:
        """``key_requests`` (router key -> the request it serves: recall, spans) and, with scope
        'span', ``subject_spans`` (the token spans of each request's subject)."""
        n = len(requests)
        if cfg.scope == "span":
            return KeyRouting(key_requests={s.name: [[i] for i in range(n)] for s in sites},
                              subject_spans=request_spans(ctx.tokenizer, requests))
        return KeyRouting(key_requests={s.name: [[i % n] for i in range(n * n_samples)] for s in sites})

    def route_keys_and_radii(self, ctx: EditContext, sites: list[Site], site: Site, samples: torch.Tensor,
                             keys: torch.Tensor, cfg: DeltaConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Router keys of each request and their radii: scale x the spread, at least 5% of the key's
        norm (the same prompt in another batch differs by rounding). Scope 'span': the mean key alone
        (the subject's tokens already say where it may fire). Scope 'key': the mean key and each
        prefixed sample (the bare prompt among them), each radius also at most corpus_margin x the
        distance to the nearest probed corpus token (generic text stays out of scope)."""
        spread = (samples - keys).norm(dim=-1).amax(0)  # (n,) float32 distances of float32 keys, as the router's
        base = torch.maximum(spread, MIN_RELATIVE_RADIUS * keys.norm(dim=-1))
        if cfg.scope == "span":
            return keys.clone(), cfg.route_radius_scale() * base
        route_keys = torch.cat([keys, samples.reshape(-1, keys.shape[1])])  # mean keys, then prefix-major samples
        radii = cfg.route_radius_scale() * base.repeat(1 + samples.shape[0])
        if cfg.corpus_margin > 0:
            probe = self.corpus_probe(ctx, sites, cfg)[site.name]
            radii = torch.minimum(radii, cfg.corpus_margin * torch.cdist(route_keys, probe).amin(1))
        return route_keys, radii

    def site_layouts(self, config) -> list[dict[str, TensorSpec]]:
        """U (d_out x r), V (d_in x r) and the edit keys; the router keys and radii when routed, or the
        radii alone where the router keys are the edit keys (scope 'span')."""
        layout = {"U": TensorSpec(("d_out", "r")), "V": TensorSpec(("d_in", "r")), "keys": TensorSpec(("m", "d_in"))}
        if not self.routes(config):
            return [layout]
        return [layout | {"route_radii": TensorSpec(("m",))}, layout | self.route_layout()]

    @staticmethod
    def route_layout() -> dict[str, TensorSpec]:
        return {"route_keys": TensorSpec(("k", "d_in")), "route_radii": TensorSpec(("k",))}

    def check_state(self, pack: EditPack, config) -> list[str]:
        segments = pack.state.segments
        if segments is not None and ("weight_delta" not in self.capabilities or not self.routes(config)
                                     or sum(segments) != pack.n_edits or any(n < 1 for n in segments)):
            return [f"state.segments {segments} must split the pack's {pack.n_edits} requests of a routed weight "
                    "delta into runs of at least one; squash the chain again"]
        if not self.routes(config):
            return []
        keys = {site: len(router_keys(pack.site_tensors(site))) for site in pack.sites}
        return pack.routing.problems(pack.n_edits, keys)

    @staticmethod
    def _contribution(t: dict[str, torch.Tensor], routed: bool, spans=None) -> SiteContribution:
        """A site's tensors (U, V, keys; route_keys, route_radii when routed) as a contribution;
        ``spans``: per router key, its subject's token spans (None: the key alone decides)."""
        delta = LowRankDelta(t["U"], t["V"], routed=routed, keys=t["keys"])
        if routed:  # the router keys route the delta
            return SiteContribution(delta, keys=router_keys(t), radii=t["route_radii"], spans=spans)
        return SiteContribution(delta)

    def contributions(self, pack: EditPack) -> dict[str, SiteContribution]:
        routed = self.routes(pack.config)
        out = {}
        for site in pack.sites:
            c = self._contribution(pack.site_tensors(site), routed, pack.routing.spans(site) if routed else None)
            if pack.state.segments:  # a squashed chain: each of its packs' columns where that pack's keys fire
                c = dataclasses.replace(c, effect=dataclasses.replace(c.effect, segments=tuple(pack.state.segments),
                                                                      key_segments=key_segments(pack, site)))
            out[site] = c
        return out


def router_keys(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """A routed delta site's router keys: ``route_keys``, or the edit keys where they are the same."""
    return t["route_keys"] if "route_keys" in t else t["keys"]


def loaded_factors(loaded: LoadedSite | None, part: str) -> torch.Tensor | None:
    """The ``part`` ('V' or 'keys') of every delta loaded at a site, as columns (d_in, total)."""
    layer = loaded.view(DeltaLayerView) if loaded is not None else None
    return layer.factors(part) if layer is not None else None


__all__ = ["DeltaMethod", "LowRank", "loaded_factors"]
