"""Replaying a forward from decoder block L: the logits again, without re-running blocks 0..L-1.

Nothing below block L depends on what happens at or after it, so an optimisation of something in
block L (GRACE's values) needs the blocks below only once. :class:`LayerReplay` runs the model once,
records how each block from L on is called (hidden states, position embeddings, attention masks,
...), and then recomputes blocks L..N-1, the final norm and the output embedding with those
recorded arguments. Blocks are called as modules, so every hook on them or inside them fires.

Architecture facts come from :data:`~grace_hooks.architectures.ARCHITECTURES` (``layers``,
``final_norm``); nothing here knows a model by name. Hooks on the model itself do not fire in a
replay: the edit runtime's record of the real positions is set with ``EditRuntime.attention_mask``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .architectures import arch_spec
from .hooks import HookOwner

try:
    from transformers.cache_utils import Cache
except ImportError:  # pragma: no cover - every supported transformers has it
    Cache = ()

_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


class _Captured(Exception):
    """Stops the capture forward after the last block: the final norm and the head are not needed."""


def _no_cache(value: Any) -> Any:
    return None if isinstance(value, Cache) else value


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
    return value, value is None or isinstance(value, (bool, int, float, str))


class LayerReplay:
    """The logits of ``model(input_ids, attention_mask)``, recomputed from decoder block ``layer`` on.

    ``logits()`` equals the model's own logits as long as nothing below block ``layer`` changes.
    Caches are off (``use_cache=False``); the model should be in eval mode (dropout would differ).
    """

    def __init__(self, model: nn.Module, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 _calls: list | None = None, _hidden: torch.Tensor | None = None) -> None:
        spec = arch_spec(model)
        self.model, self.layer = model, layer
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.final_norm = model.get_submodule(spec.final_norm)
        self.head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        if _calls is None:
            _calls, _hidden = self._capture(model.get_submodule(spec.layers))
        self.calls: list[tuple[nn.Module, tuple, dict, bool]] = _calls  # (block, args, kwargs, hidden positional)
        self.hidden_in: torch.Tensor = _hidden  # input of block ``layer``

    def _capture(self, blocks: nn.ModuleList):
        if not 0 <= self.layer < len(blocks):
            raise ValueError(f"layer {self.layer} is out of range: the model has {len(blocks)} blocks")
        calls, hidden = [], []

        def record(block: nn.Module):
            def hook(module, args, kwargs):
                kwargs = {k: _no_cache(v) for k, v in kwargs.items()}
                if args:
                    h, args, positional = args[0], tuple(_no_cache(a) for a in args[1:]), True
                else:
                    h, positional = kwargs.pop("hidden_states"), False
                for name in _CACHE_KWARGS:
                    if name in kwargs:
                        kwargs[name] = None
                if "use_cache" in kwargs:
                    kwargs["use_cache"] = False
                if not calls:
                    hidden.append(h.detach())
                calls.append((block, args, kwargs, positional))

            return hook

        def stop(module, args, output):
            raise _Captured

        with HookOwner().scoped() as scope, torch.no_grad():
            for i in range(self.layer, len(blocks)):  # prepend: the arguments as the parent passed them
                scope.pre_forward(blocks[i], record(blocks[i]), with_kwargs=True, prepend=True)
            scope.forward(blocks[-1], stop)  # after the last block, so hooks inside every block see this forward
            try:
                self.model(input_ids=self.input_ids, attention_mask=self.attention_mask, use_cache=False)
            except _Captured:
                pass
        if not calls:
            raise RuntimeError(f"block {self.layer} was not called by the model's forward")
        return calls, hidden[0]

    def hidden_states(self, offset: torch.Tensor | None = None) -> torch.Tensor:
        """The output of the final norm; ``offset`` is added to the input of block ``layer`` first."""
        h = self.hidden_in if offset is None else self.hidden_in + offset.to(self.hidden_in.dtype)
        for block, args, kwargs, positional in self.calls:
            out = block(h, *args, **kwargs) if positional else block(*args, hidden_states=h, **kwargs)
            h = out[0] if isinstance(out, (tuple, list)) else out
        return self.final_norm(h)

    def logits(self, index: tuple[torch.Tensor, torch.Tensor] | None = None,
               offset: torch.Tensor | None = None) -> torch.Tensor:
        """The logits, shape (batch, width, vocab); with ``index = (rows, cols)`` (two long tensors
        of one shape) only those positions', shape ``rows.shape + (vocab,)`` (the head is the
        costliest layer of a small model). ``offset``: see :meth:`hidden_states`."""
        h = self.hidden_states(offset)
        if index is not None:
            h = h[index[0].to(h.device), index[1].to(h.device)]
        logits = self.head(h)
        if self.softcap is not None:  # as the causal-LM heads do it (Gemma 2)
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def select(self, rows: torch.Tensor) -> "LayerReplay":
        """The replay of batch rows ``rows`` only (same width). Slices the recorded arguments where
        they are all understood, else captures the sub-batch afresh."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        batch = self.hidden_in.shape[0]
        mask = self.attention_mask[rows.to(self.attention_mask.device)] if self.attention_mask is not None else None
        ids = self.input_ids[rows.to(self.input_ids.device)]
        calls, understood, memo = [], True, {}
        for block, args, kwargs, positional in self.calls:
            (args, kwargs), ok = _take((args, kwargs), rows, batch, memo)
            understood &= ok
            calls.append((block, args, kwargs, positional))
        if not understood:
            return LayerReplay(self.model, self.layer, ids, mask)
        return LayerReplay(self.model, self.layer, ids, mask, _calls=calls, _hidden=_take(self.hidden_in, rows, batch, memo)[0])
