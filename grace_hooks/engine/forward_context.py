"""What the site hooks need to know about the forward they run in, kept per thread.

A site hook sees only its module's input. Which positions are real (padding is not), which one is
the last, and how many positions of the same sequences earlier calls already fed (a KV cache) come
from the model's own forward call, recorded by a pre-forward hook on the model. That record lives
in a :class:`ForwardContext` per thread, so two threads running forwards through one model (a
server answering two requests) never read each other's mask, cache length, trace or what effect
layers keep between forwards (the z-score gate's statistics).

Release-independence: transformers renamed the forward's ``past_key_values`` to ``cache`` (5.24)
and stopped passing ``cache_position`` from ``generate``, so the cache length is read from
whichever argument holds a cache object (anything with ``get_seq_length``), whatever its name.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .spans import MAX_SPAN, NO_TOKEN


@dataclass
class ForwardContext:
    """The per-thread state of the edit runtime's hooks."""

    mask: torch.Tensor | None = None  # (batch, past + width) attention mask of the running forward, if 2-D
    cache_start: int = 0  # positions already in the forward's KV cache, when no attention mask says so
    enabled: bool = True  # False inside ``EditRuntime.disabled()``: the pure base model
    options: dict[str, Any] = field(default_factory=dict)  # effect layers' switches (``EditRuntime.option``)
    trace: list | None = None  # router hits are recorded here inside ``EditRuntime.tracing()``
    trace_every: bool = False  # record every key that acts, not only each position's winner
    state: dict[tuple[str, type], dict[str, Any]] = field(default_factory=dict)  # (site, layer class) -> what
    # that effect layer keeps between this thread's forwards (its gate's ``GateContext.kept``)
    tokens: np.ndarray | None = None  # (batch, history + width) token ids for subject spans; None: not known
    seen: dict[str, list[set]] = field(default_factory=dict)  # site -> per row, 'seen'-anchored keys already met
    site_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # a site's input, kept for the module it writes
    depth: int = 0  # model forwards entered by this thread and not yet left (each holds the runtime's lock once)


class ThreadContexts:
    """One :class:`ForwardContext` per thread, made on first use."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self) -> ForwardContext:
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = self._local.ctx = ForwardContext()
        return ctx


def _is_cache(value: Any) -> bool:
    return hasattr(value, "get_seq_length") and callable(value.get_seq_length)


def cache_length(args: tuple, kwargs: dict) -> int:
    """How many positions the KV cache handed to a forward already holds (0 without one). The cache
    is found by what it is, not by the argument's name, which moved between transformers releases."""
    for value in (kwargs.get("cache"), kwargs.get("past_key_values"), *kwargs.values(), *args):
        if _is_cache(value):
            return int(value.get_seq_length())
    start = kwargs.get("cache_position")
    return int(start.reshape(-1)[0]) if isinstance(start, torch.Tensor) and start.numel() else 0


def forward_mask(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The 2-D attention mask of a model forward (keyword, or second positional argument), else None."""
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def forward_ids(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The token ids of a model forward (keyword, or first positional argument), else None
    (a forward on ``inputs_embeds`` gives the span anchors nothing to read)."""
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        ids = args[0]
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dim() not in (1, 2):
        return None
    return ids if ids.dim() == 2 else ids[None]


def track_tokens(ctx: ForwardContext, ids: torch.Tensor | None, mask: torch.Tensor | None, past: int) -> None:
    """Record the token ids a forward feeds (padding as NO_TOKEN), after the last MAX_SPAN - 1 tokens
    of the same sequences when a cache continues them, so a span may cross forwards. A cache of one
    row continued by several (a shared prefix) counts as that row repeated."""
    if ids is None:
        ctx.tokens = None
        return
    t = ids.detach().cpu().numpy().astype(np.int64)
    if mask is not None and mask.shape[0] == t.shape[0] and mask.shape[1] >= t.shape[1]:
        t = np.where(mask[:, -t.shape[1]:].detach().cpu().numpy().astype(bool), t, NO_TOKEN)
    previous = ctx.tokens
    if past > 0 and previous is not None and len(previous) == 1 < len(t):  # one cached row continued by many
        previous = np.repeat(previous, len(t), axis=0)
        ctx.seen = {site: [set(rows[0]) for _ in range(len(t))] for site, rows in ctx.seen.items()}
    if past > 0 and previous is not None and len(previous) == len(t):
        t = np.concatenate([previous[:, -(MAX_SPAN - 1):], t], axis=1)
    else:
        ctx.seen = {}
    ctx.tokens = t


def positions(ctx: ForwardContext, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(valid, is_last, past) for a site input ``x``: masks of shape x.shape[:-1] (padding is not
    valid; is_last marks the last real position of each row in this call, with a KV cache: of the
    new positions) and how many positions of these sequences earlier calls processed."""
    lead = x.shape[:-1]
    batch, width = (1, lead[0]) if len(lead) == 1 else lead
    mask = ctx.mask
    if mask is not None and mask.shape[0] == batch and mask.shape[1] >= width:
        valid, past = mask[:, -width:].to(x.device).bool(), mask.shape[1] - width
    else:
        valid, past = torch.ones(batch, width, dtype=torch.bool, device=x.device), ctx.cache_start
    pos = torch.arange(width, device=x.device).expand(batch, width)
    last = torch.where(valid, pos, -1).max(dim=1, keepdim=True).values
    return valid.reshape(lead), (pos == last).reshape(lead), past


__all__ = ["ForwardContext", "ThreadContexts", "cache_length", "forward_ids", "forward_mask", "positions", "track_tokens"]
