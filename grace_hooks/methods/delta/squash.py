"""A chain of routed weight-delta packs as one pack: U, V, the edit keys, the router keys and radii
concatenated, each pack's columns kept as a segment that acts where that pack's keys are in scope
(``LowRankDelta.segments``), so the squashed pack gives the chain's outputs.

A routed pack's update acts whole wherever one of its keys fires: joined without segments, every
pack's columns would act where any one pack's key fires. The segments keep them apart.
"""
from __future__ import annotations

import bisect
import dataclasses
from itertools import accumulate

import numpy as np
import torch

from ...engine.spans import KeyRouting
from ...errors import PackError
from ...store.packs import EditPack
from ...store.schema import named

COLUMN_PARTS = ("U", "V")  # joined along dimension 1; the others along dimension 0


def segments_of(pack: EditPack) -> list[int]:
    """The requests of each pack a pack was squashed from ([n] for a pack never squashed)."""
    return list(pack.state.segments) if pack.state.segments else [pack.n_edits]


def key_segments(pack: EditPack, site: str) -> np.ndarray | None:
    """The segment of each router key of a squashed pack at ``site`` (that of the first request it
    serves), or None for a pack never squashed."""
    if not pack.state.segments:
        return None
    ends = list(accumulate(pack.state.segments))
    owners = (pack.routing.key_requests or {}).get(site, [])
    return np.array([bisect.bisect_right(ends, serves[0]) for serves in owners], dtype=np.int64)


def check_chain(packs: list[EditPack], routes) -> None:
    """Refuse what cannot be joined with the chain's outputs kept (the message says why and what to do)."""
    first = packs[0]
    if len(packs) < 2:
        raise PackError("squash joins two or more packs; name the chain's packs, oldest first")
    for p in packs:
        if p.method != first.method:
            raise PackError(f"squash joins packs of one method: {first.name!r} is {first.method}, {p.name!r} {p.method}")
        if not routes(p.config):
            raise PackError(f"pack {p.name!r} is a global delta: global deltas of a chain were solved on top of each "
                            "other and act everywhere; squash routed packs (mode=routed) only")
        if list(p.sites) != list(first.sites):
            raise PackError(f"pack {p.name!r} edits sites {list(p.sites)}, {first.name!r} {list(first.sites)}; "
                            "squash packs that edit the same sites")
        if (p.routing.subject_spans is None) != (first.routing.subject_spans is None):
            raise PackError(f"packs {first.name!r} and {p.name!r} route differently (scope 'span' and 'key'); "
                            "squash packs of one scope")
        for site in p.sites:
            t = p.site_tensors(site)
            if t["U"].shape[1] != p.n_edits:
                raise PackError(f"pack {p.name!r} at {site} has {t['U'].shape[1]} columns for {p.n_edits} requests: "
                                "only one column per request can be kept apart per pack")


def squash_chain(packs: list[EditPack], name: str, routes) -> EditPack:
    """One pack with the outputs of the routed chain ``packs`` (oldest first)."""
    check_chain(packs, routes)
    last = packs[-1]
    tensors = {site: _joined_site([p.site_tensors(site) for p in packs]) for site in last.sites}
    offsets = list(accumulate([0] + [p.n_edits for p in packs]))
    key_requests = {site: [[i + off for i in serves] for p, off in zip(packs, offsets)
                           for serves in (p.routing.key_requests or {}).get(site, [])] for site in last.sites}
    spans = [s for p in packs for s in p.routing.subject_spans] if last.routing.subject_spans is not None else None
    answers = ([s for p in packs for s in p.routing.answer_spans]
               if all(p.routing.answer_spans is not None for p in packs) else None)
    state = dataclasses.replace(last.state, segments=[n for p in packs for n in segments_of(p)])
    return EditPack(
        name=name, method=last.method, config=dataclasses.replace(last.config), sites=list(last.sites), base=last.base,
        requests=[r for p in packs for r in p.requests], tensors=named(tensors), state=state,
        routing=KeyRouting(key_requests=key_requests, subject_spans=spans, answer_spans=answers),
        metrics={"squashed": [p.name for p in packs], "pack_metrics": [p.metrics for p in packs]},
        created_at=last.created_at, library_version=last.library_version,
    )


def segments_without(segments: list[int] | None, index: int) -> list[int] | None:
    """A squashed pack's segments once request ``index`` is gone (an emptied segment goes too)."""
    if not segments:
        return segments
    ends = list(accumulate(segments))
    at = bisect.bisect_right(ends, index)
    left = [n - (i == at) for i, n in enumerate(segments)]
    return [n for n in left if n]


def _joined_site(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One site's tensors of the chain joined; router keys are kept apart from the edit keys only
    where some pack kept them apart (scope 'span' stores the edit keys once)."""
    out = {part: torch.cat([t[part] for t in parts], dim=1 if part in COLUMN_PARTS else 0).contiguous()
           for part in ("U", "V", "keys", "route_radii")}
    if any("route_keys" in t for t in parts):
        out["route_keys"] = torch.cat([t.get("route_keys", t["keys"]) for t in parts]).contiguous()
    return out


__all__ = ["check_chain", "key_segments", "segments_of", "segments_without", "squash_chain"]
