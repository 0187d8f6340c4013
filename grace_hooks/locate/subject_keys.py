"""Keys at the last subject token, averaged over short context prefixes the model writes itself
(MEMIT, Meng et al. 2023, sec. 4.3: k = mean over prefixes x_j of the site input at the subject).

The prefixes depend only on the model's weights, so they are made once per weight version and kept
in the model's memo (:class:`~grace_hooks.engine.memo.WeightMemo`), never in a module global.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..bases.architectures import Site
from ..bases.hooks import HookOwner, forward_until
from ..engine.memo import WeightMemo
from ..requests import EditRequest
from ..tokens import text_tokens
from .kept import cache_folder, kept_or_made, read_json
from .replay import continue_shared_prefix

PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")
PREFIXES = "prefixes"  # the cache folder
SHIPPED_PREFIXES = "data/prefixes"  # the package folder of the embedded models' prefixes, named as the cache names them


def context_prefixes(model, tokenizer, n_tokens: int = 10, seed: int = 0, memo: WeightMemo | None = None,
                     model_hash: str | None = None, cache: Path | None | bool = True) -> list[str]:
    """``""`` (the bare prompt) plus one short sampled text per start word, each ending in ". ";
    kept in ``memo`` (the model's, for as long as its weights stay the same) when one is given, and,
    given the weights' digest ``model_hash``, in the cache folder or among the prefixes the package ships
    (each embedded model's own, written with these settings: on Qwen 1.5B writing them took 32 s)."""
    if memo is not None:
        return memo.get(("context_prefixes", n_tokens, seed),
                        lambda: context_prefixes(model, tokenizer, n_tokens, seed, model_hash=model_hash, cache=cache))
    if model_hash is not None:
        return kept_or_made(cache_folder(PREFIXES, cache), prefix_file_name(model_hash, seed, n_tokens), _read_prefixes,
                            shipped_prefixes, lambda: write_prefixes(model, tokenizer, n_tokens, seed),
                            lambda p: {"prefixes": p, "source": f"written by the model: seed {seed}, top-k 5, "
                                                                  f"{n_tokens} tokens after each of {list(PREFIX_STARTS)}"},
                            "context prefixes")
    return write_prefixes(model, tokenizer, n_tokens, seed)


def write_prefixes(model, tokenizer, n_tokens: int, seed: int) -> list[str]:
    """What :func:`context_prefixes` returns, written by the model now."""
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
    return out


def prefix_file_name(model_hash: str, seed: int, n_tokens: int) -> str:
    """How a model's context prefixes are named in the cache and among the shipped ones."""
    return f"{model_hash}-seed{seed}-t{n_tokens}.json"


def shipped_prefixes(name: str) -> list[str] | None:
    """The prefixes the package ships under ``name`` (a :func:`prefix_file_name`), or None."""
    where = resources.files("grace_hooks").joinpath(SHIPPED_PREFIXES).joinpath(name)
    return _read_prefixes(where.read_text(encoding="utf-8")) if where.is_file() else None


def _read_prefixes(text: str) -> list[str] | None:
    stored = read_json(text)
    prefixes = stored.get("prefixes") if isinstance(stored, dict) else None
    if not (isinstance(prefixes, list) and len(prefixes) == 1 + len(PREFIX_STARTS) and prefixes[0] == ""
            and all(isinstance(p, str) for p in prefixes)):
        return None
    return prefixes


def activations_at_subject(model, tokenizer, module, requests: Sequence[EditRequest], prefixes: Sequence[str],
                           which: str = "input", share_prefix: bool = False, batch_size: int | None = None) -> torch.Tensor:
    """(n_prefixes, n_requests, d): ``module``'s input (or output hidden states) at the last subject
    token of ``prefix + request.text``, for every prefix, with whatever hooks are on the model."""
    return activations_at_subject_of({"m": module}, model, tokenizer, requests, prefixes, which, batch_size,
                                     share_prefix)["m"]


def activations_at_subject_of(modules: dict, model, tokenizer, requests: Sequence[EditRequest], prefixes: Sequence[str],
                              which: str = "input", batch_size: int | None = None, share_prefix: bool = False) -> dict:
    """:func:`activations_at_subject` for several modules from the same forwards (each forward stops
    after the deepest of them): name -> (n_prefixes, n_requests, d). ``batch_size``: requests per
    forward (None: all at once), the ones of like length together. ``share_prefix``: the leading tokens that every row of a forward
    shares (a context prefix) run once and the rows continue their cache (the same activations:
    causal attention; a prefix is most of a prefixed prompt's tokens). Only where every hook on the
    model is causal too (``EditRuntime.causal``). ``tokenizer``: a tokenizer or the edit's
    :class:`~grace_hooks.tokens.TextTokens`."""
    tokens = text_tokens(tokenizer)
    device = next(model.parameters()).device
    order = {m: i for i, m in enumerate(model.modules())}
    deepest = max(modules.values(), key=lambda m: order[m])
    out: dict = {name: [] for name in modules}
    step = batch_size or max(1, len(requests))

    def grab(name):
        def hook(m, a, o):
            t = a[0] if which == "input" else (o[0] if isinstance(o, (tuple, list)) else o)
            grabbed[name] = t.detach()
        return hook

    bar = tqdm(total=len(prefixes) * -(-len(requests) // step), desc="subject keys", leave=False, disable=None)
    try:
        for prefix in prefixes:
            positions = torch.tensor(tokens.key_positions(requests, prefix))
            rows_by_length = positions.argsort(stable=True)  # rows of like length share a forward: less padding
            parts: dict = {name: torch.empty(0) for name in modules}
            for lo in range(0, len(requests), step):
                bar.update()
                rows = rows_by_length[lo:lo + step]
                idx = positions[rows]
                enc = tokens.padded([prefix + requests[i].text for i in rows.tolist()], device)  # right-padded: positions stay
                enc = {k: v[:, : int(idx.max()) + 1] for k, v in enc.items()}  # causal: later tokens change nothing here
                grabbed: dict = {}
                with torch.inference_mode():
                    inputs, shift = continue_shared_prefix(model, deepest, enc, int(idx.min())) if share_prefix else (enc, 0)
                    with HookOwner().scoped() as scope:
                        for name, module in modules.items():
                            scope.forward(module, grab(name))
                        forward_until(model, deepest, **inputs)
                for name, t in grabbed.items():
                    # float32 on the CPU whatever the model's dtype: keys, their mean and the residuals are taken from these
                    got = t[torch.arange(len(rows), device=t.device), (idx - shift).to(t.device)].float().cpu()
                    if not len(parts[name]):
                        parts[name] = got.new_empty((len(requests), got.shape[-1]))
                    parts[name][rows] = got
            for name in modules:
                out[name].append(parts[name])
    finally:
        bar.close()
    return {name: torch.stack(v) for name, v in out.items()}


def subject_keys(model, tokenizer, site: Site, requests: Sequence[EditRequest], prefixes: Sequence[str]) -> torch.Tensor:
    """(n_requests, d_in): the site input at the last subject token, averaged over ``prefixes``."""
    return activations_at_subject(model, tokenizer, site.module(model), requests, prefixes).mean(0)
