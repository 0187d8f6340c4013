"""Squashing a chain of comeba_hk packs into one: the same hook layers, the same gate, one pack.

A chain's hook layer at a site is W0 + the sum of its packs' increments, so one pack holding that
sum (factors side by side while that is smaller than the dense matrix, else the dense sum), the
keys the chain absorbed (later batches build on their K^T K: beyond d_in keys, the d_in x d_in
factor R of K = QR stands for them), the union of its router keys and its lowest alpha gives the
same outputs. With the z-score gate memory then stays bounded by two square matrices per site; the
router gate keeps every router key.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ...engine.spans import KeyRouting
from ...errors import PackError
from ...store.packs import EditPack
from ...store.schema import named
from .hook_layer import HookIncrement, lowrank_is_smaller


def hook_increment(t: dict[str, torch.Tensor]) -> HookIncrement:
    """A site's pack tensors (keys; U and V, or dense; alpha for the z-score gate) as an increment."""
    alpha = float(t["alpha"].reshape(-1)[0]) if "alpha" in t else None
    return HookIncrement(t["keys"], t.get("U"), t.get("V"), t.get("dense"), alpha)


def _check_chain(packs: list[EditPack]) -> None:
    if len(packs) < 2:
        raise PackError(f"squash needs at least two packs, got {len(packs)}")
    first = packs[0]
    for p in packs[1:]:
        if p.sites != first.sites:
            raise PackError(f"pack {p.name!r} edits {p.sites} but {first.name!r} edits {first.sites}: "
                            "only packs of one chain (same blocks) can be squashed")
        if p.base.fingerprint != first.base.fingerprint:
            raise PackError(f"pack {p.name!r} was made for another base ({p.base.name}) than {first.name!r} "
                            f"({first.base.name})")


def squash_site(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One site's tensors of a chain of packs (``parts``, oldest first) as one hook increment with the
    same outputs: the keys joined (reduced to d_in rows by QR when there are more: only K^T K enters
    later solves), the factors side by side where every part has them and they are smaller than the
    dense sum (else that sum), the smallest alpha, and the router keys and radii joined when every
    part has them."""
    incs = [hook_increment(t) for t in parts]
    d_out, d_in = incs[0].dense.shape if incs[0].dense is not None else (incs[0].U.shape[0], incs[0].V.shape[0])
    keys = torch.cat([i.keys for i in incs])
    if len(keys) > d_in:  # only K^T K enters later solves: R of K = QR has the same, in d_in rows
        keys = torch.linalg.qr(keys.double(), mode="r").R.float()
    out = {"keys": keys.contiguous()}
    if all(i.dense is None for i in incs) and lowrank_is_smaller(sum(i.rank for i in incs), d_out, d_in):
        out["U"] = torch.cat([i.U for i in incs], 1).contiguous()
        out["V"] = torch.cat([i.V for i in incs], 1).contiguous()
    else:  # summed in float64 as the runtime sums a chain, so the outputs are the same
        out["dense"] = sum(i.matrix() for i in incs).float().contiguous()
    alphas = [i.alpha for i in incs if i.alpha is not None]
    if alphas:
        out["alpha"] = torch.tensor([min(alphas)], dtype=torch.float32)
    if all("route_keys" in t for t in parts):
        out["route_keys"] = torch.cat([t["route_keys"] for t in parts]).contiguous()
        out["route_radii"] = torch.cat([t["route_radii"] for t in parts]).contiguous()
    return out


def squash_packs(packs: list[EditPack], name: str) -> EditPack:
    """One pack with the outputs of the chain ``packs`` (oldest first)."""
    _check_chain(packs)
    last = packs[-1]
    tensors = named({site: squash_site([p.site_tensors(site) for p in packs]) for site in last.sites})
    routing = KeyRouting()
    if last.routing.key_requests is not None:  # router key -> request, renumbered into the joined request list
        joined: dict[str, list] = {}
        offset = 0
        for p in packs:
            for site, owners in (p.routing.key_requests or {}).items():
                joined.setdefault(site, []).extend([[i + offset for i in o] for o in owners])
            offset += p.n_edits
        routing.key_requests = joined
    if all(p.routing.subject_spans is not None for p in packs):  # one list per request, in the joined order
        routing.subject_spans = [s for p in packs for s in p.routing.subject_spans]  # (a chain mixing scopes: none)
    return EditPack(
        name=name, method=last.method, config=replace(last.config), sites=list(last.sites), base=last.base,
        requests=[r for p in packs for r in p.requests], tensors=tensors, state=replace(last.state), routing=routing,
        metrics={"squashed": [p.name for p in packs], "pack_metrics": [p.metrics for p in packs]},
        created_at=last.created_at, library_version=last.library_version,
    )
