"""Composing loaded packs at their sites through forward hooks.

A pack contributes a :class:`SiteContribution` to each of its sites. The runtime composes
contributions by what they carry (keys + replacement values today), never by method name.
Out-of-scope positions are never touched, so on unrelated text the outputs are bit-identical
to the base model's.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch import nn

from .architectures import Site
from .errors import PackError
from .forward_context import ForwardContext, ThreadContexts, cache_length, forward_ids, forward_mask, positions, track_tokens
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
    spans: list[list[list[int]]] | None = None  # per key, its subject's token spans (None: the key alone decides)
    anchor: str = "end"  # where a span must end: at the position ('end') or at or before it ('seen')
    closers: list[list[list[int]]] | None = None  # per 'seen' key, its answer's spans: the key stops where they end
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
        for target_pack, key_index, _ in c.shrink:  # checked before anything is added
            if target_pack in self.ids and not 0 <= key_index < len(self.ids[target_pack]):
                raise PackError(f"a pack shrinks key {key_index} of an earlier pack at {self.site.name}, which has "
                                f"{len(self.ids[target_pack])} keys there; the pack is corrupt or made on another stack")
        if c.keys is not None:
            n = len(c.keys)
            ids = self.router.add(c.keys.detach().float().cpu().numpy(), c.radii.detach().float().cpu().numpy(), rank,
                                  c.last_only, c.spans, c.anchor, c.closers)
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

    def apply(self, x: torch.Tensor, y: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        """The site output with every loaded pack applied (None: unchanged), for the forward that
        ``ctx`` describes. In order: global deltas; the hook layer where its gate fires; routed
        deltas; replacement values."""
        valid, is_last, past = positions(ctx, x)
        trace = ctx.trace
        out = None
        for d in self.deltas.values():  # global deltas act on every position
            if not d.routed:
                out = (y if out is None else out) + (x @ d.V.to(x)) @ d.U.to(x).T
        width = x.shape[-2] if x.dim() > 1 else 1
        flat_x = x.reshape(-1, x.shape[-1])
        fire, change = self._hook_gate(x, valid, past, ctx)
        if trace is not None and change is not None and bool(fire.any()):  # z-score fires (no key behind them)
            fired_rows = fire.nonzero().squeeze(1).cpu().numpy()
            trace.append((self.site.name, fired_rows, width, np.full(len(fired_rows), _ZSCORE_ID)))
        replace_rows, replace_ids, delta_rows, owners = None, None, None, None
        rows = valid.reshape(-1).nonzero().squeeze(1)
        if len(self.router) and len(rows):
            ids, pair_q, pair_k = self.router.assign_all(
                flat_x[rows].detach().float().cpu().numpy(), is_last.reshape(-1)[rows].cpu().numpy(),
                self._span_candidates(ctx, rows, len(flat_x), width))
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
                q, owners = self._routed_deltas(ids, pair_q, pair_k)
                delta_rows = rows[torch.from_numpy(q).to(rows.device)]
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

    def _routed_deltas(self, winners: np.ndarray, pair_q: np.ndarray, pair_k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query index, pack id) of each routed delta to add: every pack with a key in scope of a
        position adds its delta there once (two packs that edit one subject both act), except where
        the winning key replaces the output."""
        replaces = self.replaces.numpy()
        replaced = np.zeros(len(winners), dtype=bool)
        won = winners != NO_KEY
        replaced[won] = replaces[winners[won]]
        keep = ~replaces[pair_k] & ~replaced[pair_q]
        pairs = {(int(q), self.owner[k]) for q, k in zip(pair_q[keep].tolist(), pair_k[keep].tolist())
                 if self.owner[k] in self.deltas}
        ordered = sorted(pairs)
        return np.array([q for q, _ in ordered], dtype=np.int64), np.array([o for _, o in ordered], dtype=object)

    def _span_candidates(self, ctx: ForwardContext, rows: torch.Tensor, n_flat: int, width: int):
        """(index into ``rows``, key id) pairs that subject spans allow in this forward, or None (no
        key has spans, or the forward's tokens are unknown: then keys with spans cannot fire)."""
        tokens = ctx.tokens
        if not len(self.router.spans) or tokens is None or tokens.shape[0] * width != n_flat or tokens.shape[1] < width:
            return None
        seen = ctx.seen.setdefault(self.site.name, [set() for _ in range(len(tokens))])
        flat, key_ids = self.router.spans.candidates(tokens, width, seen)
        index = np.full(n_flat, -1, dtype=np.int64)
        index[rows.cpu().numpy()] = np.arange(len(rows))
        q = index[flat]
        return q[q >= 0], key_ids[q >= 0]

    def _hook_gate(self, x: torch.Tensor, valid: torch.Tensor, past: int, ctx: ForwardContext):
        """(flat positions where the hook layer's z-score gate fires or None, its change at every
        position when the gate needed it or None). With ``ctx.hook_everywhere``: every real position."""
        hl = self.hook_layer
        if not hl:
            return None, None
        if ctx.hook_everywhere:
            return valid.reshape(-1), None
        if hl.alpha is None:
            return None, None
        width = x.shape[-2] if x.dim() > 1 else 1
        change = hl.change(x)
        name = self.site.name
        fire, ctx.running[name] = hl.zscore_gate(change.reshape(-1, width, change.shape[-1]), valid.reshape(-1, width),
                                                 past, ctx.running.get(name))
        return fire.reshape(-1), change


class EditRuntime:
    """Every site runtime of one model, plus the per-forward context (which positions are real).

    Thread safety: each thread has its own :class:`~grace_hooks.forward_context.ForwardContext`, and
    one re-entrant lock is held by every model forward while packs are loaded and by every change to
    the loaded packs, so a forward never sees a pack half added or half removed, and forwards from
    several threads run one at a time (their KV-cached generations interleave step by step, each
    with its own statistics)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.hooks = HookOwner()
        self.sites: dict[str, SiteRuntime] = {}
        self.lock = threading.RLock()
        self._contexts = ThreadContexts()
        self._context_handles: list = []
        self.memo: dict = {}  # per-model results that methods reuse across edits (context prefixes, C0, ...)

    # --- per-forward context ---
    @property
    def context(self) -> ForwardContext:
        """The calling thread's forward context."""
        return self._contexts.get()

    def _enter_forward(self, module, args, kwargs):
        self.lock.acquire()
        ctx = self.context
        ctx.depth += 1
        ctx.mask, ctx.cache_start = forward_mask(args, kwargs), cache_length(args, kwargs)
        ids = forward_ids(args, kwargs)
        past = ctx.mask.shape[1] - ids.shape[1] if ctx.mask is not None and ids is not None else ctx.cache_start
        track_tokens(ctx, ids, ctx.mask, past)

    def _leave_forward(self, module, args, output):
        ctx = self.context
        if ctx.depth == 0:  # a hook registered before ours failed, so ours never entered
            return
        ctx.depth -= 1
        ctx.mask, ctx.cache_start = None, 0
        self.lock.release()

    @contextlib.contextmanager
    def _setting(self, attr: str, value) -> Iterator[None]:
        """The calling thread's context has ``attr = value`` inside the block (restored after)."""
        ctx = self.context
        previous = getattr(ctx, attr)
        setattr(ctx, attr, value)
        try:
            yield
        finally:
            setattr(ctx, attr, previous)

    @contextlib.contextmanager
    def attention_mask(self, mask: torch.Tensor | None, input_ids: torch.Tensor | None = None) -> Iterator[None]:
        """Which positions are real (and, given ``input_ids``, which tokens they hold, for subject
        spans), for blocks run directly rather than through the model's forward (whose own call
        would record them), e.g. by :class:`~grace_hooks.replay.LayerReplay`."""
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        ctx = self.context
        tokens, seen = ctx.tokens, ctx.seen
        track_tokens(ctx, input_ids, mask, 0)
        try:
            with self._setting("mask", mask):
                yield
        finally:
            ctx.tokens, ctx.seen = tokens, seen

    # --- packs ---
    def site(self, site: Site) -> SiteRuntime:
        if site.name not in self.sites:
            module = site.module(self.model)
            d_in, d_out = site.dims(self.model)
            rt = SiteRuntime(site, module, d_in, d_out)
            if not self.sites:  # first site: record the context of each forward (and hold the lock through it)
                self._context_handles = [
                    self.hooks.pre_forward(self.model, self._enter_forward, with_kwargs=True),
                    self.hooks.forward(self.model, self._leave_forward, always_call=True),
                ]
            self.sites[site.name] = rt
            rt.handle = self.hooks.forward(module, self._site_hook(rt))
        return self.sites[site.name]

    def _site_hook(self, rt: SiteRuntime):
        def hook(module, args, output):
            ctx = self.context
            return rt.apply(args[0], output, ctx) if ctx.enabled else None

        return hook

    def add_pack(self, pack_id: str, rank: int, contributions: dict[str, SiteContribution]) -> None:
        """Apply a pack at all its sites, or at none: if any site fails, the ones done are undone
        and the runtime is exactly as before (no site, hook or router key of the pack is left)."""
        with self.lock:
            if any(pack_id in rt.packs for rt in self.sites.values()):
                raise ValueError(f"pack id {pack_id} is already applied")
            try:
                for name, c in contributions.items():
                    self.site(Site.parse(name)).add(pack_id, rank, c)
            except BaseException:
                self.remove_pack(pack_id)
                raise

    def remove_pack(self, pack_id: str) -> None:
        with self.lock:
            self._remove(pack_id)

    def _remove(self, pack_id: str) -> None:
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

    @property
    def causal(self) -> bool:
        """Whether what the loaded packs do at a position depends only on it and the positions before
        it (so a cached prefix gives the same activations as a whole forward). A z-score gate is not:
        it scores a position against every position of its row in the same call; nor a key that
        matches only a call's last position."""
        return not any((rt.hook_layer and rt.hook_layer.alpha is not None) or rt.router.call_dependent
                       for rt in self.sites.values())

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

    def hook_layers_everywhere(self) -> contextlib.AbstractContextManager:
        """Hook layers act at every real position inside the block, whatever their gate (COMEBA-HK
        measures keys and residuals through the hook layers this way while it solves a batch)."""
        return self._setting("hook_everywhere", True)

    def disabled(self) -> contextlib.AbstractContextManager:
        """The pure base model inside the block (for the calling thread)."""
        return self._setting("enabled", False)

    @contextlib.contextmanager
    def tracing(self) -> Iterator[list[tuple[str, int, int, str, int]]]:
        """Record which keys fire inside the block: a list of (site, batch row, position, pack id,
        key index), one per in-scope position (evaluation: router recall and false-fire rate). Where
        the z-score gate let a hook layer through, the pack is ZSCORE_GATE and the key index -1."""
        raw: list = []
        resolved: list[tuple[str, int, int, str, int]] = []
        try:
            with self._setting("trace", raw):
                yield resolved
        finally:
            for site, flat, width, ids in raw:
                rt = self.sites.get(site)
                for f, key_id in zip(flat.tolist(), ids.tolist()):
                    owner = (ZSCORE_GATE, -1) if key_id == _ZSCORE_ID else rt.key_pack(key_id) if rt is not None else None
                    if owner is not None:
                        resolved.append((site, f // width, f % width, owner[0], owner[1]))

    def close(self) -> None:
        with self.lock:
            self.hooks.remove_all()
            self.sites.clear()
            self._context_handles = []
