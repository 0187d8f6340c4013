"""Composing loaded packs at their sites through forward hooks.

A pack contributes a :class:`SiteContribution` to each of its sites: an effect (what its method
family does there, :mod:`grace_hooks.engine.effects`) and, optionally, router keys. The runtime composes
the effects through the shared router without knowing their kinds, never by method name.
Out-of-scope positions are never touched, so on unrelated text the outputs are bit-identical
to the base model's.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from ..bases.architectures import Site
from ..bases.hooks import HookOwner
from ..errors import PackError
from .effects import Effect, EffectLayer, Gate, GateContext, Hits
from .forward_context import ForwardContext, ThreadContexts, cache_length, forward_ids, forward_mask, positions, track_tokens
from .router import NO_KEY, SUPPRESSED, KeyRouter

STAGED_RANK = 2**62  # above any loaded pack's rank


@dataclass
class SiteContribution:
    """What one pack places at one site: its effect, and the router keys that say where it acts
    (none: the effect decides alone, e.g. a global delta or a gate of its own)."""

    effect: Effect
    keys: torch.Tensor | None = None  # (n, d_in) router keys
    radii: torch.Tensor | None = None  # (n,) Euclidean radius of each key
    labels: list[str] = field(default_factory=list)  # what each key stands for (GRACE's conflict rule)
    last_only: bool = False  # keys match only the last real position of a forward call
    spans: list[list[list[int]]] | None = None  # per key, its subject's token spans (None: the key alone decides)
    anchor: str = "end"  # where a span must end: at the position ('end') or at or before it ('seen')
    closers: list[list[list[int]]] | None = None  # per 'seen' key, its answer's spans: the key stops where they end
    shrink: list[tuple[str, int, float]] = field(default_factory=list)  # (earlier pack id, key index, radius)


class SiteRuntime:
    """The router and the effect layers of one site, and its forward hook."""

    def __init__(self, site: Site, module: nn.Module, d_in: int, d_out: int) -> None:
        self.site, self.module = site, module
        self.d_in, self.d_out = d_in, d_out
        self.router = KeyRouter(d_in)
        self._exclusive = [np.zeros(0, dtype=bool)]  # chunks, joined on first use: adding 1,000 packs stays linear
        self.labels: list[str] = []  # by router id
        self.owner: list[str] = []  # by router id: the pack
        self.ids: dict[str, np.ndarray] = {}  # pack id -> router ids
        self._layers: dict[type, EffectLayer] = {}  # effect layer class -> its layer here
        self._ordered: list[EffectLayer] = []  # the layers in the order their changes apply
        self.handles: list = []  # its forward hooks, owned by the EditRuntime's HookOwner

    @property
    def exclusive(self) -> np.ndarray:
        """(n_ids,) whether each router id claims its position whole (its layer is exclusive)."""
        if len(self._exclusive) > 1:
            self._exclusive = [np.concatenate(self._exclusive)]
        return self._exclusive[0]

    @property
    def packs(self) -> set[str]:
        return set(self.ids).union(*(layer.effects for layer in self._ordered))

    def layer(self, cls: type[EffectLayer]) -> Any:
        """The layer of that class here (what a family reads of its own loaded effects), or None."""
        return self._layers.get(cls)

    def effects(self) -> Iterator[tuple[str, Effect]]:
        """(pack id, effect) of every loaded effect here, layer by layer in order, oldest first."""
        for layer in self._ordered:
            yield from layer.effects.items()

    def add(self, pack_id: str, rank: int, c: SiteContribution) -> None:
        for target_pack, key_index, _ in c.shrink:  # checked before anything is added
            if target_pack in self.ids and not 0 <= key_index < len(self.ids[target_pack]):
                raise PackError(f"a pack shrinks key {key_index} of an earlier pack at {self.site.name}, which has "
                                f"{len(self.ids[target_pack])} keys there; the pack is corrupt or made on another stack")
        cls = c.effect.layer
        ids = None
        if c.keys is not None:
            n = len(c.keys)
            ids = self.router.add(c.keys.detach().float().cpu().numpy(), c.radii.detach().float().cpu().numpy(), rank,
                                  c.last_only, c.spans, c.anchor, c.closers)
            self._exclusive.append(np.full(n, cls.exclusive))
            self.labels += list(c.labels) or [""] * n
            self.owner += [pack_id] * n
            self.ids[pack_id] = ids
        if cls not in self._layers:
            self._layers[cls] = cls(self.d_in, self.d_out, self.site.name)
            self._ordered = sorted(self._layers.values(), key=lambda layer: layer.order)
        self._layers[cls].add(pack_id, c.effect.stored(), ids)
        for target_pack, key_index, radius in c.shrink:
            if target_pack in self.ids:
                self.router.shrink(int(self.ids[target_pack][key_index]), radius, owner=pack_id)

    def remove(self, pack_id: str) -> None:
        if pack_id in self.ids:
            self.router.remove(self.ids.pop(pack_id))
            self.router.drop_overrides(pack_id)
        for layer in self._ordered:
            layer.remove(pack_id)

    def key_pack(self, key_id: int) -> tuple[str, int] | None:
        """Which pack (and index within it) a router id belongs to."""
        if not 0 <= key_id < len(self.owner) or self.owner[key_id] not in self.ids:
            return None
        pack_id = self.owner[key_id]
        return pack_id, int(key_id - self.ids[pack_id][0])

    @property
    def causal(self) -> bool:
        return all(layer.causal for layer in self._ordered) and not self.router.call_dependent

    def apply(self, x: torch.Tensor, y: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        """The site output with every loaded pack applied (None: unchanged), for the forward that
        ``ctx`` describes: each layer's changes at every position, then its gate, the router, and
        each layer's plan at the positions in scope, in layer order (see :mod:`grace_hooks.engine.effects`)."""
        valid, is_last, past = positions(ctx, x)
        trace = ctx.trace
        layers = self._ordered
        out = None
        for layer in layers:
            changed = layer.everywhere(x, y if out is None else out)
            if changed is not None:
                out = changed
        width = x.shape[-2] if x.dim() > 1 else 1
        flat_x = x.reshape(-1, x.shape[-1])
        gates: dict[int, Gate] = {}
        options = MappingProxyType(ctx.options)
        for i, layer in enumerate(layers):
            gate = layer.gate(x, valid, past, GateContext(options, ctx.state.setdefault((self.site.name, type(layer)), {})))
            if gate is None:
                continue
            gates[i] = gate
            if trace is not None and gate.label is not None and bool(gate.fire.any()):  # no key behind these fires
                fired_rows = gate.fire.nonzero().squeeze(1).cpu().numpy()
                trace.append((self.site.name, fired_rows, width, np.full(len(fired_rows), NO_KEY), gate.label))
        hits = None
        rows = valid.reshape(-1).nonzero().squeeze(1)
        if len(self.router) and len(rows):
            ids, pair_q, pair_k = self.router.assign_all(
                flat_x[rows].detach().float().cpu().numpy(), is_last.reshape(-1)[rows].cpu().numpy(),
                self._span_candidates(ctx, rows, len(flat_x), width))
            hit = ids != NO_KEY
            if hit.any():
                hits = Hits(rows, ids, pair_q, pair_k, self.owner, self.exclusive)
                if trace is not None and ctx.trace_every:  # every key that acts (explain)
                    acting_rows, acting_ids = hits.acting()
                    trace.append((self.site.name, acting_rows, width, acting_ids, None))
                elif trace is not None:  # (site, flat positions of the hits, width, router id of each hit, None)
                    trace.append((self.site.name, hits.hit_rows.cpu().numpy(), width, ids[hit].copy(), None))
        plans = [plan for i, layer in enumerate(layers) if (plan := layer.plan(flat_x, hits, gates.get(i))) is not None]
        if not plans:
            return out
        base = y if out is None else out
        flat = base.reshape(-1, base.shape[-1]).clone()
        for plan in plans:
            plan(flat)
        return flat.reshape(y.shape)

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


class EditRuntime:
    """Every site runtime of one model, plus the per-forward context (which positions are real).

    Thread safety: each thread has its own :class:`~grace_hooks.engine.forward_context.ForwardContext`, and
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
        would record them), e.g. by :class:`~grace_hooks.locate.replay.LayerReplay`."""
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
            module = site.written(self.model)  # the output its effects change
            d_in, d_out = site.dims(self.model)
            rt = SiteRuntime(site, module, d_in, d_out)
            if not self.sites:  # first site: record the context of each forward (and hold the lock through it)
                self._context_handles = [
                    self.hooks.pre_forward(self.model, self._enter_forward, with_kwargs=True),
                    self.hooks.forward(self.model, self._leave_forward, always_call=True),
                ]
            self.sites[site.name] = rt
            rt.handles = site.hook(self.hooks, self.model, self._site_hook(rt), lambda: self.context.site_inputs)
        return self.sites[site.name]

    def _site_hook(self, rt: SiteRuntime):
        def hook(x, output):
            ctx = self.context
            return rt.apply(x, output, ctx) if ctx.enabled else None

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

    def suppress(self, owner: str, keys: list[tuple[str, str, int]]) -> None:
        """While pack ``owner`` is loaded, the keys (site, earlier pack id, key index in that pack) never
        fire (a superseded edit); keys of packs not loaded are skipped. Removing ``owner`` restores them."""
        with self.lock:
            for site, target, index in keys:
                rt = self.sites.get(site)
                ids = rt.ids.get(target) if rt is not None else None
                if ids is None:
                    continue
                if not 0 <= index < len(ids):
                    raise PackError(f"a pack supersedes key {index} of an earlier pack at {site}, which has {len(ids)} "
                                    "keys there; the pack is corrupt or made on another stack")
                rt.router.shrink(int(ids[index]), SUPPRESSED, owner=owner)

    def overriders(self, pack_id: str) -> set[str]:
        """The packs that hold keys of pack ``pack_id`` shrunk or suppressed."""
        with self.lock:
            return {str(o) for rt in self.sites.values() for i in rt.ids.get(pack_id, ())
                    for o in rt.router.override_owners(int(i))}

    def _remove(self, pack_id: str) -> None:
        for name, rt in list(self.sites.items()):
            rt.router.drop_overrides(pack_id)  # what it suppressed or shrank, wherever that is
            if pack_id in rt.packs:
                rt.remove(pack_id)
            if not rt.packs:  # no pack left here: the site's hook goes too
                for handle in rt.handles:
                    self.hooks.remove(handle)
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
        return all(rt.causal for rt in self.sites.values())

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
    def option(self, name: str, value: Any) -> Iterator[None]:
        """The calling thread's forwards see ``ctx.options[name] == value`` inside the block (an
        effect layer's switch, e.g. COMEBA-HK's hook layers acting everywhere while it solves)."""
        options = self.context.options
        missing = object()
        previous = options.get(name, missing)
        options[name] = value
        try:
            yield
        finally:
            if previous is missing:
                options.pop(name, None)
            else:
                options[name] = previous

    def disabled(self) -> contextlib.AbstractContextManager:
        """The pure base model inside the block (for the calling thread)."""
        return self._setting("enabled", False)

    @contextlib.contextmanager
    def tracing(self, every: bool = False) -> Iterator[list[tuple[str, int, int, str, int]]]:
        """Record which keys fire inside the block: a list of (site, batch row, position, pack id,
        key index), one per in-scope position (evaluation: router recall and false-fire rate), or with
        ``every`` one per key that acts there (routed deltas in scope beside the winner add too). Where
        a family's own gate fired (no key behind it, e.g. the z-score gate), the pack is the gate's
        label (``effects.gate_label``) and the key index -1."""
        raw: list = []
        resolved: list[tuple[str, int, int, str, int]] = []
        try:
            with self._setting("trace", raw), self._setting("trace_every", every):
                yield resolved
        finally:
            for site, flat, width, ids, label in raw:
                rt = self.sites.get(site)
                for f, key_id in zip(flat.tolist(), ids.tolist()):
                    owner = (label, -1) if label is not None else rt.key_pack(key_id) if rt is not None else None
                    if owner is not None:
                        resolved.append((site, f // width, f % width, owner[0], owner[1]))

    def close(self) -> None:
        with self.lock:
            self.hooks.remove_all()
            self.sites.clear()
            self._context_handles = []
