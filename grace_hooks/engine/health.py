"""Health of an edited model against its base (the norm-growth finding of the editing literature:
sequential locate-then-edit updates inflate the edited matrices and drift the activations).

For each site where a loaded effect is a weight update (its ``dense_update``, see
:mod:`grace_hooks.engine.effects`: weight deltas, COMEBA-HK's hook-layer increments):
- ``weight_norm_ratio``: |W0 + sum dW|_F / |W0|_F over the updates that act at every position (the
  global deltas: what the papers' merged weights would be); ``weight_norm_ratio_all``: the same with
  every update added as if global (routed deltas, and |W_h|_F / |W0|_F for COMEBA-HK);
- ``activation_norm_ratio``: mean |y| with the edits over mean |y| of the base, at the site's output
  on a reference text; ``activation_drift``: mean |y_edited - y_base| / mean |y_base| there.
"""
from __future__ import annotations

from importlib import resources
from typing import Sequence

import torch

from ..bases.architectures import Site
from ..bases.hooks import HookOwner
from .runtime import EditRuntime


def reference_texts() -> list[str]:
    """Shipped paragraphs far from any CounterFact / zsRE fact."""
    text = resources.files("grace_hooks").joinpath("data/unrelated_text.txt").read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def weight_norm_ratio(weight: torch.Tensor, updates: Sequence[torch.Tensor]) -> float:
    """|W0 + sum of updates|_F / |W0|_F, with ``weight`` and each update as (d_out, d_in)."""
    w = weight.detach().to(torch.float64).cpu()
    total = w.clone()
    for u in updates:
        total += u.to(torch.float64)
    return float(torch.linalg.matrix_norm(total) / torch.linalg.matrix_norm(w))


def _site_outputs(model, tokenizer, modules: dict[str, torch.nn.Module], texts: Sequence[str], max_tokens: int):
    out: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    device = next(model.parameters()).device
    with HookOwner().scoped() as scope, torch.inference_mode():
        for name, module in modules.items():  # registered after the runtime's hooks: sees the edited output
            scope.forward(module, lambda m, a, o, name=name: out[name].append(o.detach().float().reshape(-1, o.shape[-1])))
        for text in texts:
            enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_tokens).to(device)
            model(**enc)
    return {name: torch.cat(v) for name, v in out.items()}


def site_health(model, tokenizer, runtime: EditRuntime, texts: Sequence[str] | None = None,
                max_tokens: int = 512) -> dict[str, dict[str, float]]:
    """The figures above for every site with loaded weight updates (an empty dict when there are none)."""
    updates = {name: [(e.everywhere, m) for _, e in rt.effects() if (m := e.dense_update()) is not None]
               for name, rt in runtime.sites.items()}
    sites = {name: rt for name, rt in runtime.sites.items() if updates[name]}
    if not sites:
        return {}
    texts = list(texts) if texts is not None else reference_texts()
    modules = {name: rt.module for name, rt in sites.items()}
    edited = _site_outputs(model, tokenizer, modules, texts, max_tokens)
    with runtime.disabled():
        base = _site_outputs(model, tokenizer, modules, texts, max_tokens)
    report = {}
    for name, rt in sites.items():
        weight = Site.parse(name).weight(model)
        y, y0 = edited[name], base[name]
        base_norm = float(y0.norm(dim=1).mean())
        report[name] = {
            "weight_norm_ratio": weight_norm_ratio(weight, [m for everywhere, m in updates[name] if everywhere]),
            "weight_norm_ratio_all": weight_norm_ratio(weight, [m for _, m in updates[name]]),
            "activation_norm_ratio": float(y.norm(dim=1).mean()) / base_norm,
            "activation_drift": float((y - y0).norm(dim=1).mean()) / base_norm,
        }
    return report


def summarize(report: dict[str, dict[str, float]]) -> dict[str, float]:
    """The largest value of each figure over the sites (one number per checkpoint for a benchmark)."""
    if not report:
        return {}
    keys = next(iter(report.values())).keys()
    return {f"{k}_max": max(r[k] for r in report.values()) for k in keys}
