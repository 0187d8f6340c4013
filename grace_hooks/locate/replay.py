"""Replaying a forward from decoder block L: the logits again, without re-running blocks 0..L-1.

Nothing below block L depends on what happens at or after it, so an optimisation of something in
block L (GRACE's values) needs the blocks below only once. :class:`LayerReplay` runs the model once,
records how each block from L on is called (hidden states, position embeddings, attention masks,
...), and then recomputes blocks L..N-1, the final norm and the output embedding with those
recorded arguments. Blocks are called as modules, so every hook on them or inside them fires.

With ``start`` > 0 only columns ``start:`` are replayed: their attention reads the keys and values
of the earlier columns, kept from one forward over every column (so hooks below block L that look
at the whole sequence see it whole), from a cache (the blocks are called with ``past_key_values``,
as in generation). That is exact when nothing changes before column ``start`` (a target vector is
added at the key token, and every key token sits at column ``start``), and it costs a fraction of
a full replay. Hooks inside the replayed blocks would see only those columns, so a replay with
such hooks always runs in full (``replay.start`` says which was done).

Architecture facts come from :data:`~grace_hooks.bases.architectures.ARCHITECTURES` (``layers``,
``final_norm``); nothing here knows a model by name. Hooks on the model itself do not fire in a
replay: the edit runtime's record of the real positions is set with ``EditRuntime.attention_mask``.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import nn

from ..bases.architectures import arch_spec
from ..bases.hooks import HookOwner, forward_until
from .precision import add_to

try:
    from transformers.cache_utils import Cache, DynamicCache
except ImportError:  # pragma: no cover - every supported transformers has it
    Cache, DynamicCache = (), None
# cached-suffix replays use the per-layer cache of transformers 5 (older ones replay in full)
_LAYERED_CACHE = DynamicCache is not None and hasattr(DynamicCache, "activate_past_recording")

_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


class _PastSlot:
    """Where a recorded block call took the cache: each replay puts a fresh copy of the prefix cache there."""


_PAST = _PastSlot()


def cache_argument(model: nn.Module) -> str:
    """The name under which the model's forward takes a KV cache."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _no_cache(value: Any) -> Any:
    return None if isinstance(value, Cache) else value


def _slot(value: Any) -> Any:
    return _PAST if isinstance(value, Cache) else value


def _fill(value: Any, cache: Any) -> Any:
    return cache if value is _PAST else value


def _fresh_cache(prefix: Any, rows: torch.Tensor | None = None) -> Any:
    """A cache holding ``prefix``'s keys and values (of batch ``rows``) that updates without touching them:
    a layer's update concatenates into new tensors, so sharing the stored ones is safe."""
    cache = copy.copy(prefix)
    cache.layers = [copy.copy(layer) for layer in prefix.layers]
    if rows is not None:
        cache.batch_select_indices(rows)
    return cache


def _has_hooks(modules) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for block in modules for m in block.modules())


def _take(value: Any, rows: torch.Tensor, batch: int, memo: dict) -> tuple[Any, bool]:
    """``value`` with batch rows ``rows`` (tensors of >= 2 dims whose first is the batch), and
    whether every part of it was understood (tensors, containers, scalars, None)."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == batch:
            if id(value) not in memo:  # blocks share their masks and position embeddings
                memo[id(value)] = value[rows.to(value.device)]
            value = memo[id(value)]
        return value, True
    if isinstance(value, (tuple, list)):
        parts = [_take(v, rows, batch, memo) for v in value]
        return type(value)(p for p, _ in parts), all(ok for _, ok in parts)
    if isinstance(value, dict):
        parts = {k: _take(v, rows, batch, memo) for k, v in value.items()}
        return {k: p for k, (p, _) in parts.items()}, all(ok for _, ok in parts.values())
    return value, value is None or isinstance(value, (bool, int, float, str, _PastSlot))


class LayerReplay:
    """The logits of ``model(input_ids, attention_mask)``, recomputed from decoder block ``layer`` on.

    ``logits()`` equals the model's own logits as long as nothing below block ``layer`` changes
    (and, with ``start``, nothing before column ``start``). ``position_ids`` are passed to the model
    when given (left-padded rows). The model should be in eval mode (dropout would differ).
    """

    def __init__(self, model: nn.Module, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 start: int = 0, position_ids: torch.Tensor | None = None, _state: tuple | None = None) -> None:
        spec = arch_spec(model)
        blocks = model.get_submodule(spec.layers)
        self.model, self.layer = model, layer
        self.input_ids, self.attention_mask, self.position_ids = input_ids, attention_mask, position_ids
        self.final_norm = model.get_submodule(spec.final_norm)
        self.head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        if _state is None:
            suffix = (0 < start < input_ids.shape[1] and spec.cached_suffix and _LAYERED_CACHE
                      and not _has_hooks(blocks[layer:]))
            self.start = start if suffix else 0
            _state = self._capture(blocks)
        self.start = _state[0]
        self.calls: list[tuple[nn.Module, tuple, dict, bool]] = _state[1]  # (block, args, kwargs, hidden positional)
        self.hidden_in: torch.Tensor = _state[2]  # input of block ``layer``, columns ``start:``
        self.prefix = _state[3]  # the cache of columns ``:start`` (None for a full replay)

    def _forward(self, columns: slice, cache: Any = None, **kwargs) -> None:
        """The model on ``columns``, continuing ``cache`` when one is given (under the argument name
        this transformers release takes: ``cache`` from 5.24, ``past_key_values`` before)."""
        ids = self.input_ids[:, columns]
        if cache is not None:
            kwargs[cache_argument(self.model)] = cache
        # a forward that continues a cache takes the mask of every column, the cached ones included
        mask = self.attention_mask if self.attention_mask is None or columns.start else self.attention_mask[:, columns]
        if self.position_ids is not None:
            kwargs["position_ids"] = self.position_ids[:, columns]
        forward_until(self.model, self.model.get_submodule(arch_spec(self.model).layers)[-1], input_ids=ids,
                      attention_mask=mask, **kwargs)

    def _capture(self, blocks: nn.ModuleList):
        if not 0 <= self.layer < len(blocks):
            raise ValueError(f"layer {self.layer} is out of range: the model has {len(blocks)} blocks")
        calls, hidden = [], []
        keep = _slot if self.start else _no_cache  # a suffix replay reads the prefix's cache

        def record(block: nn.Module):
            def hook(module, args, kwargs):
                kwargs = {k: keep(v) for k, v in kwargs.items()}
                if args:
                    h, args, positional = args[0], tuple(keep(a) for a in args[1:]), True
                else:
                    h, positional = kwargs.pop("hidden_states"), False
                if not self.start:
                    for name in _CACHE_KWARGS:
                        if name in kwargs:
                            kwargs[name] = None
                    if "use_cache" in kwargs:
                        kwargs["use_cache"] = False
                if not calls:
                    hidden.append(h.detach())
                calls.append((block, args, kwargs, positional))

            return hook

        prefix = None
        with HookOwner().scoped() as scope, torch.no_grad():
            if self.start:  # every column once, as a full replay would see them; keep the first ``start``
                full, grabbed = DynamicCache(config=self.model.config), []
                full.activate_past_recording()  # sliding-window layers keep every column until the crop
                scope.pre_forward(blocks[self.layer], lambda m, a, k: grabbed.append(a[0] if a else k["hidden_states"]),
                                  with_kwargs=True)
                self._forward(slice(0, None), cache=full, use_cache=True)
                full.crop(self.start - self.input_ids.shape[1])  # a negative count: the columns removed
                prefix = full
                scope.remove_all()
            for i in range(self.layer, len(blocks)):  # prepend: the arguments as the parent passed them
                scope.pre_forward(blocks[i], record(blocks[i]), with_kwargs=True, prepend=True)
            if self.start:  # the arguments of the blocks for the columns from ``start`` on, reading the cache
                self._forward(slice(self.start, None), cache=_fresh_cache(prefix), use_cache=True)
                hidden = [grabbed[0][:, self.start:].detach()]
            else:
                self._forward(slice(0, None), use_cache=False)
        if not calls:
            raise RuntimeError(f"block {self.layer} was not called by the model's forward")
        return self.start, calls, hidden[0], prefix

    def hidden_states(self, offset: torch.Tensor | None = None) -> torch.Tensor:
        """The output of the final norm at columns ``start:``; ``offset`` (shaped as ``hidden_in``) is
        added to the input of block ``layer`` first."""
        # the offset (a float32 target-vector delta) is added in float32 and rounded once to the blocks' dtype
        h = self.hidden_in if offset is None else add_to(self.hidden_in, offset)
        cache = None if self.prefix is None else _fresh_cache(self.prefix)
        for block, args, kwargs, positional in self.calls:
            if cache is not None:
                args, kwargs = tuple(_fill(a, cache) for a in args), {k: _fill(v, cache) for k, v in kwargs.items()}
            out = block(h, *args, **kwargs) if positional else block(*args, hidden_states=h, **kwargs)
            h = out[0] if isinstance(out, (tuple, list)) else out
        return self.final_norm(h)

    def logits(self, index: tuple[torch.Tensor, torch.Tensor] | None = None,
               offset: torch.Tensor | None = None) -> torch.Tensor:
        """The logits of columns ``start:``, shape (batch, width - start, vocab); with ``index = (rows,
        cols)`` (two long tensors of one shape, columns counted from 0, each >= ``start``) only those
        positions', shape ``rows.shape + (vocab,)`` (the head is the costliest layer of a small
        model). ``offset``: see :meth:`hidden_states`."""
        h = self.hidden_states(offset)
        if index is not None:
            h = h[index[0].to(h.device), index[1].to(h.device) - self.start]
        logits = self.head(h)
        if self.softcap is not None:  # as the causal-LM heads do it (Gemma 2)
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def select(self, rows: torch.Tensor) -> "LayerReplay":
        """The replay of batch rows ``rows`` only (same width). Slices the recorded arguments where
        they are all understood, else captures the sub-batch afresh."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        batch = self.hidden_in.shape[0]
        pick = lambda t: None if t is None else t[rows.to(t.device)]  # noqa: E731
        mask, ids, pos = pick(self.attention_mask), pick(self.input_ids), pick(self.position_ids)
        calls, understood, memo = [], True, {}
        for block, args, kwargs, positional in self.calls:
            (args, kwargs), ok = _take((args, kwargs), rows, batch, memo)
            understood &= ok
            calls.append((block, args, kwargs, positional))
        if not understood:
            return LayerReplay(self.model, self.layer, ids, mask, self.start, pos)
        prefix = None if self.prefix is None else _fresh_cache(self.prefix, rows.to(self.hidden_in.device))
        return LayerReplay(self.model, self.layer, ids, mask, self.start, pos,
                           _state=(self.start, calls, _take(self.hidden_in, rows, batch, memo)[0], prefix))


def continue_shared_prefix(model, deepest, enc: dict, limit: int) -> tuple[dict, int]:
    """(inputs, columns left out): the inputs of ``enc``'s forward as a continuation of its shared
    leading columns, which run once for one row (as far as ``deepest``); ``enc`` itself, 0 when the
    rows share fewer than two tokens before column ``limit`` or the architecture's cache differs."""
    ids, mask = enc["input_ids"], enc["attention_mask"]
    same = ((ids == ids[:1]) & (mask == 1)).all(0)[:limit]
    shared = int(same.long().cumprod(0).sum())
    if shared < 2 or len(ids) < 2 or not (arch_spec(model).cached_suffix and _LAYERED_CACHE):
        return enc, 0
    cache = DynamicCache(config=model.config)
    forward_until(model, deepest, input_ids=ids[:1, :shared], attention_mask=mask[:1, :shared], use_cache=True,
                  **{cache_argument(model): cache})
    cache = _fresh_cache(cache, torch.zeros(len(ids), dtype=torch.long, device=ids.device))
    return {"input_ids": ids[:, shared:], "attention_mask": mask, "use_cache": True, cache_argument(model): cache}, shared
