"""Health of an edited model against its base (the norm-growth finding of the editing literature:
sequential locate-then-edit updates inflate the edited matrices and drift the activations).

For each site that carries loaded weight deltas or a hook layer:
- ``weight_norm_ratio``: |W0 + sum dW|_F / |W0|_F over the global deltas (what the papers' merged
  weights would be); ``weight_norm_ratio_all``: the same with the routed deltas added as if global
  and the hook layer's increments too (|W_h|_F / |W0|_F for COMEBA-HK);
- ``activation_norm_ratio``: mean |y| with the edits over mean |y| of the base, at the site's output
  on a reference text; ``activation_drift``: mean |y_edited - y_base| / mean |y_base| there.
"""
from __future__ import annotations

from importlib import resources
from typing import Sequence

import torch

from .architectures import Site
from .hooks import HookOwner
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
    """The figures above for every site with loaded deltas (an empty dict when there are none)."""
    sites = {name: rt for name, rt in runtime.sites.items() if rt.deltas or rt.hook_layer}
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
        dense = [(d.routed, d.U.to(torch.float64) @ d.V.to(torch.float64).T) for d in rt.deltas.values()]
        hook = [i.matrix() for i in rt.hook_layer.increments.values()]
        y, y0 = edited[name], base[name]
        base_norm = float(y0.norm(dim=1).mean())
        report[name] = {
            "weight_norm_ratio": weight_norm_ratio(weight, [m for routed, m in dense if not routed]),
            "weight_norm_ratio_all": weight_norm_ratio(weight, [m for _, m in dense] + hook),
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
