"""Keys at the last subject token, averaged over short context prefixes the model writes itself
(MEMIT, Meng et al. 2023, sec. 4.3: k = mean over prefixes x_j of the site input at the subject).

The prefixes depend only on the model, so they are made once per model and kept in the caller's
per-model memo (the edit runtime's), never in a module global.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .architectures import Site
from .hooks import HookOwner
from .requests import EditRequest
from .tokens import subject_last_index

PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")


def context_prefixes(model, tokenizer, n_tokens: int = 10, seed: int = 0, memo: dict | None = None) -> list[str]:
    """``""`` (the bare prompt) plus one short sampled text per start word, each ending in ". "."""
    key = ("context_prefixes", n_tokens, seed)
    if memo is not None and key in memo:
        return memo[key]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    out = [""]
    for start in PREFIX_STARTS:
        enc = tokenizer(start, return_tensors="pt").to(device)
        with torch.inference_mode():
            seq = model.generate(**enc, do_sample=True, top_k=5, max_new_tokens=n_tokens, pad_token_id=pad)
        text = tokenizer.decode(seq[0], skip_special_tokens=True).replace("{", " ").replace("}", " ").strip()
        out.append(text + ". ")
    if memo is not None:
        memo[key] = out
    return out


def lookup_positions(tokenizer, requests: Sequence[EditRequest], prefix: str) -> list[int]:
    """Index of the last subject token in ``prefix + request.text`` for each request."""
    out = []
    for r in requests:
        start, end = r.subject_span()
        out.append(subject_last_index(tokenizer, prefix + r.text, (start + len(prefix), end + len(prefix))))
    return out


def subject_keys(model, tokenizer, site: Site, requests: Sequence[EditRequest], prefixes: Sequence[str]) -> torch.Tensor:
    """(n_requests, d_in): the site input at the last subject token, averaged over ``prefixes``."""
    side, tokenizer.padding_side = tokenizer.padding_side, "right"  # positions must not shift
    total = None
    try:
        for prefix in prefixes:
            texts = [prefix + r.text for r in requests]
            idx = torch.tensor(lookup_positions(tokenizer, requests, prefix))
            enc = tokenizer(texts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
            grabbed: list[torch.Tensor] = []
            with HookOwner().scoped() as scope, torch.inference_mode():
                scope.forward(site.module(model), lambda m, a, o: grabbed.append(a[0].detach()))
                model(**enc)
            keys = grabbed[0][torch.arange(len(requests)), idx.to(grabbed[0].device)].float().cpu()
            total = keys if total is None else total + keys
    finally:
        tokenizer.padding_side = side
    return total / len(prefixes)
