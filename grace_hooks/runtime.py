"""Composing loaded packs at their sites through forward hooks.

A pack contributes a :class:`SiteContribution` to each of its sites. The runtime composes
contributions by what they carry (keys + replacement values today), never by method name.
Out-of-scope positions are never touched, so on unrelated text the outputs are bit-identical
to the base model's.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch import nn

from .architectures import Site
from .hook_layer import HookIncrement, HookLayer
from .hooks import HookOwner
from .router import NO_KEY, KeyRouter

STAGED_RANK = 2**62  # above any loaded pack's rank
ZSCORE_GATE = "<z-score gate>"  # the 'pack' of a traced hit where the z-score gate, not a key, fired
_ZSCORE_ID = -2  # its router id in raw traces


@dataclass
class LowRankDelta:
    """A weight update dW = U V^T at a site: the site output gains dW x."""

    U: torch.Tensor  # (d_out, r)
    V: torch.Tensor  # (d_in, r)
    routed: bool = False  # False: at every position; True: only where the router puts x in scope of the pack's keys
    keys: torch.Tensor | None = None  # (n, d_in) the edit keys it was solved for (later solves may build on them)


@dataclass
class SiteContribution:
    """What one pack places at one site: router keys with replacement values (GRACE), a low-rank
    weight delta (applied everywhere, or where the pack's keys route it), or an increment to the
    site's hook layer (COMEBA-HK: used where the z-score gate fires, or where the pack's keys route it)."""

    keys: torch.Tensor | None = None  # (n, d_in) router keys
    radii: torch.Tensor | None = None  # (n,) Euclidean radius of each key
    values: torch.Tensor | None = None  # (n, d_out) site output in scope of key i; None: the keys route ``delta``
    delta: LowRankDelta | None = None
    hook: HookIncrement | None = None
    labels: list[str] = field(default_factory=list)  # what each key stands for (GRACE's conflict rule)
    last_only: bool = False  # keys match only the last real position of a forward call
    shrink: list[tuple[str, int, float]] = field(default_factory=list)  # (earlier pack id, key index, radius)


def _stored(t: torch.Tensor | None) -> torch.Tensor | None:
    """A pack tensor as the runtime keeps it: detached float32 on the CPU."""
    return None if t is None else t.detach().float().cpu()


class SiteRuntime:
    """The router, value table and deltas of one site, and its forward hook."""

    def __init__(self, site: Site, module: nn.Module, d_in: int, d_out: int) -> None:
        self.site, self.module = site, module
        self.router = KeyRouter(d_in)
        self._values = [torch.zeros(0, d_out)]  # chunks, joined on first use: adding 1,000 packs stays linear
        self._replaces = [torch.zeros(0, dtype=torch.bool)]
        self.labels: list[str] = []  # by router id
        self.owner: list[str] = []  # by router id: the pack
        self.ids: dict[str, np.ndarray] = {}  # pack id -> router ids
        self.deltas: dict[str, LowRankDelta] = {}  # pack id -> its delta here
        self.hook_layer = HookLayer(d_in, d_out)
        self.handle = None  # its forward hook, owned by the EditRuntime's HookOwner

    @property
    def values(self) -> torch.Tensor:
        """(n_ids, d_out) replacement value of each router id (zeros for keys that route a delta)."""
        if len(self._values) > 1:
            self._values = [torch.cat(self._values)]
        return self._values[0]

    @property
    def replaces(self) -> torch.Tensor:
        """(n_ids,) whether each router id replaces the output (else it routes its pack's delta)."""
        if len(self._replaces) > 1:
            self._replaces = [torch.cat(self._replaces)]
        return self._replaces[0]

    @property
    def packs(self) -> set[str]:
        return set(self.ids) | set(self.deltas) | set(self.hook_layer.increments)

    def add(self, pack_id: str, rank: int, c: SiteContribution) -> None:
        if c.keys is not None:
            n = len(c.keys)
            ids = self.router.add(c.keys.detach().float().cpu().numpy(), c.radii.detach().float().cpu().numpy(), rank, c.last_only)
            rows = c.values.detach().float().cpu() if c.values is not None else torch.zeros(n, self._values[0].shape[1])
            self._values.append(rows)
            self._replaces.append(torch.full((n,), c.values is not None))
            self.labels += list(c.labels) or [""] * n
            self.owner += [pack_id] * n
            self.ids[pack_id] = ids
        if c.delta is not None:
            d = c.delta
            self.deltas[pack_id] = LowRankDelta(_stored(d.U), _stored(d.V), d.routed, _stored(d.keys))
        if c.hook is not None:
            h = c.hook
            self.hook_layer.add(pack_id, HookIncrement(_stored(h.keys), _stored(h.U), _stored(h.V), _stored(h.dense), h.alpha))
        for target_pack, key_index, radius in c.shrink:
            if target_pack in self.ids:
                self.router.shrink(int(self.ids[target_pack][key_index]), radius, owner=pack_id)

    def remove(self, pack_id: str) -> None:
        if pack_id in self.ids:
            self.router.remove(self.ids.pop(pack_id))
            self.router.drop_overrides(pack_id)
        self.deltas.pop(pack_id, None)
        self.hook_layer.remove(pack_id)

    def key_pack(self, key_id: int) -> tuple[str, int] | None:
        """Which pack (and index within it) a router id belongs to."""
        if not 0 <= key_id < len(self.owner) or self.owner[key_id] not in self.ids:
            return None
        pack_id = self.owner[key_id]
        return pack_id, int(key_id - self.ids[pack_id][0])

    def apply(self, x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, is_last: torch.Tensor, past: int = 0,
              hook_everywhere: bool = False, trace: list | None = None) -> torch.Tensor | None:
        """The site output with every loaded pack applied (None: unchanged). In order: global
        deltas; the hook layer where its gate fires; routed deltas; replacement values."""
        out = None
        for d in self.deltas.values():  # global deltas act on every position
            if not d.routed:
                out = (y if out is None else out) + (x @ d.V.to(x)) @ d.U.to(x).T
        width = x.shape[-2] if x.dim() > 1 else 1
        flat_x = x.reshape(-1, x.shape[-1])
        fire, change = self._hook_gate(x, valid, past, hook_everywhere)
        if trace is not None and change is not None and bool(fire.any()):  # z-score fires (no key behind them)
            fired_rows = fire.nonzero().squeeze(1).cpu().numpy()
            trace.append((self.site.name, fired_rows, width, np.full(len(fired_rows), _ZSCORE_ID)))
        replace_rows, replace_ids, delta_rows, owners = None, None, None, None
        rows = valid.reshape(-1).nonzero().squeeze(1)
        if len(self.router) and len(rows):
            ids = self.router.assign(flat_x[rows].detach().float().cpu().numpy(), is_last.reshape(-1)[rows].cpu().numpy())
            hit = ids != NO_KEY
            if hit.any():
                hit_rows, hit_ids = rows[torch.from_numpy(hit).to(rows.device)], torch.from_numpy(ids[hit])
                if trace is not None:  # (site, flat positions of the hits, width, router id of each hit)
                    trace.append((self.site.name, hit_rows.cpu().numpy(), width, ids[hit].copy()))
                replace = self.replaces[hit_ids]
                replace_rows, replace_ids = hit_rows[replace.to(hit_rows.device)], hit_ids[replace]
                routed_rows = hit_rows[~replace.to(hit_rows.device)]
                owners = np.array([self.owner[i] for i in hit_ids[~replace].tolist()], dtype=object)
                to_hook = torch.from_numpy(np.array([o in self.hook_layer.increments for o in owners], dtype=bool))
                fire = fire.clone() if fire is not None else torch.zeros(len(flat_x), dtype=torch.bool, device=x.device)
                fire[routed_rows[to_hook.to(routed_rows.device)]] = True
                delta_rows, owners = routed_rows[~to_hook.to(routed_rows.device)], owners[~to_hook.numpy()]
        fired = fire is not None and bool(fire.any())
        routed_hits = delta_rows is not None and (len(delta_rows) > 0 or len(replace_rows) > 0)
        if not fired and not routed_hits:
            return out
        base = y if out is None else out
        flat = base.reshape(-1, base.shape[-1]).clone()
        if fired:  # the hook layer's output W_h x = W0 x + its increments at x
            sel = fire.nonzero().squeeze(1)
            flat[sel] = flat[sel] + (change.reshape(-1, flat.shape[-1])[sel] if change is not None
                                     else self.hook_layer.change(flat_x[sel]))
        if routed_hits:
            for pack_id in set(owners.tolist()):  # routed deltas, then replacements
                sel = delta_rows[torch.from_numpy(owners == pack_id).to(delta_rows.device)]
                d = self.deltas[pack_id]
                flat[sel] = flat[sel] + (flat_x[sel] @ d.V.to(x)) @ d.U.to(x).T
            flat[replace_rows] = self.values[replace_ids].to(flat)
        return flat.reshape(y.shape)

    def _hook_gate(self, x: torch.Tensor, valid: torch.Tensor, past: int, everywhere: bool):
        """(flat positions where the hook layer's z-score gate fires or None, its change at every
        position when the gate needed it or None). ``everywhere``: at every real position."""
        hl = self.hook_layer
        if not hl:
            return None, None
        if everywhere:
            return valid.reshape(-1), None
        if hl.alpha is None:
            return None, None
        width = x.shape[-2] if x.dim() > 1 else 1
        change = hl.change(x)
        fire = hl.zscore_gate(change.reshape(-1, width, change.shape[-1]), valid.reshape(-1, width), past)
        return fire.reshape(-1), change


def _cache_length(kwargs: dict) -> int:
    """How many positions the KV cache handed to a forward already holds (0 without one)."""
    cache = kwargs.get("past_key_values")
    if cache is not None and hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    start = kwargs.get("cache_position")
    return int(start.reshape(-1)[0]) if isinstance(start, torch.Tensor) and start.numel() else 0


class EditRuntime:
    """Every site runtime of one model, plus the per-forward context (which positions are real)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.hooks = HookOwner()
        self.sites: dict[str, SiteRuntime] = {}
        self.enabled = True
        self._mask: torch.Tensor | None = None
        self._cache_start = 0  # positions already in the forward's KV cache, when no attention mask says so
        self.hook_everywhere = False  # hook layers act at every real position (set while an edit is solved)
        self._context_handles: list = []
        self._trace: list | None = None
        self.memo: dict = {}  # per-model results that methods reuse across edits (context prefixes, C0, ...)

    # --- per-forward context ---
    def _capture_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._cache_start = _cache_length(kwargs)

    def _clear_mask(self, module, args, output):
        self._mask, self._cache_start = None, 0

    @contextlib.contextmanager
    def attention_mask(self, mask: torch.Tensor | None) -> Iterator[None]:
        """Which positions are real, for blocks run directly rather than through the model's forward
        (whose own call would record its ``attention_mask``), e.g. by :class:`~grace_hooks.replay.LayerReplay`."""
        previous, self._mask = self._mask, mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        try:
            yield
        finally:
            self._mask = previous

    def _positions(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(valid, is_last, past): masks of shape x.shape[:-1] (padding is not valid; is_last marks the
        last real position of each row in this call, with a KV cache: of the new positions) and how
        many positions of these sequences earlier calls processed (the KV cache's length)."""
        lead = x.shape[:-1]
        batch, width = (1, lead[0]) if len(lead) == 1 else lead
        mask = self._mask
        if mask is not None and mask.shape[0] == batch and mask.shape[1] >= width:
            valid, past = mask[:, -width:].to(x.device).bool(), mask.shape[1] - width
        else:
            valid, past = torch.ones(batch, width, dtype=torch.bool, device=x.device), self._cache_start
        pos = torch.arange(width, device=x.device).expand(batch, width)
        last = torch.where(valid, pos, -1).max(dim=1, keepdim=True).values
        return valid.reshape(lead), (pos == last).reshape(lead), past

    # --- packs ---
    def site(self, site: Site) -> SiteRuntime:
        if site.name not in self.sites:
            module = site.module(self.model)
            d_in, d_out = site.dims(self.model)
            rt = SiteRuntime(site, module, d_in, d_out)
            if not self.sites:  # first site: start capturing the attention mask of each forward
                self._context_handles = [
                    self.hooks.pre_forward(self.model, self._capture_mask, with_kwargs=True),
                    self.hooks.forward(self.model, self._clear_mask, always_call=True),
                ]
            self.sites[site.name] = rt
            rt.handle = self.hooks.forward(module, self._site_hook(rt))
        return self.sites[site.name]

    def _site_hook(self, rt: SiteRuntime):
        def hook(module, args, output):
            if not self.enabled:
                return None
            x = args[0]
            valid, is_last, past = self._positions(x)
            return rt.apply(x, output, valid, is_last, past, self.hook_everywhere, self._trace)

        return hook

    def add_pack(self, pack_id: str, rank: int, contributions: dict[str, SiteContribution]) -> None:
        for name, c in contributions.items():
            self.site(Site.parse(name)).add(pack_id, rank, c)

    def remove_pack(self, pack_id: str) -> None:
        for name, rt in list(self.sites.items()):
            if pack_id in rt.packs:
                rt.remove(pack_id)
            if not rt.packs:  # no pack left here: the site's hook goes too
                self.hooks.remove(rt.handle)
                del self.sites[name]
        if not self.sites:
            for handle in self._context_handles:
                self.hooks.remove(handle)
            self._context_handles = []

    @contextlib.contextmanager
    def staged(self, contributions: dict[str, SiteContribution], pack_id: str = "__being_computed__") -> Iterator[None]:
        """An edit being computed, active inside the block above every loaded pack, then gone
        (methods that edit several layers measure each layer with the earlier ones applied)."""
        if not contributions:
            yield
            return
        self.add_pack(pack_id, STAGED_RANK, contributions)
        try:
            yield
        finally:
            self.remove_pack(pack_id)

    @contextlib.contextmanager
    def hook_layers_everywhere(self) -> Iterator[None]:
        """Hook layers act at every real position inside the block, whatever their gate (COMEBA-HK
        measures keys and residuals through the hook layers this way while it solves a batch)."""
        previous, self.hook_everywhere = self.hook_everywhere, True
        try:
            yield
        finally:
            self.hook_everywhere = previous

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    @contextlib.contextmanager
    def tracing(self) -> Iterator[list[tuple[str, int, int, str, int]]]:
        """Record which keys fire inside the block: a list of (site, batch row, position, pack id,
        key index), one per in-scope position (evaluation: router recall and false-fire rate). Where
        the z-score gate let a hook layer through, the pack is ZSCORE_GATE and the key index -1."""
        raw: list = []
        resolved: list[tuple[str, int, int, str, int]] = []
        previous, self._trace = self._trace, raw
        try:
            yield resolved
        finally:
            self._trace = previous
            for site, flat, width, ids in raw:
                rt = self.sites.get(site)
                for f, key_id in zip(flat.tolist(), ids.tolist()):
                    owner = (ZSCORE_GATE, -1) if key_id == _ZSCORE_ID else rt.key_pack(key_id) if rt is not None else None
                    if owner is not None:
                        resolved.append((site, f // width, f % width, owner[0], owner[1]))

    def close(self) -> None:
        self.hooks.remove_all()
        self.sites.clear()
        self._context_handles = []
