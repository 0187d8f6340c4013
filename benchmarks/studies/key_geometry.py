#!/usr/bin/env python
"""Where routed-delta keys sit among other activations (calibrates the routed radius).

For the first N CounterFact records, at each edited site of the weight-delta methods: the key (the
site input at the last subject token, averaged over the bare prompt and the model-written
prefixes), its spread (largest distance to its own prefixed samples), how far the rephrase
prompt's subject token is, how far the nearest token of unrelated text (the shipped paragraphs and
the records' locality prompts) is, and how far the nearest other key is. Prints a markdown table
and writes it to benchmarks/results/weight_deltas/key_geometry.md.

    python benchmarks/studies/key_geometry.py --n 40
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from grace_hooks import EditableModel, EditRequest
from grace_hooks.bases.architectures import Site
from grace_hooks.bases.hooks import HookOwner
from grace_hooks.engine.health import reference_texts
from grace_hooks.locate.subject_keys import activations_at_subject, context_prefixes
from grace_hooks.methods.delta import DeltaConfig
from grace_hooks.requests import read_requests

REPO = Path(__file__).resolve().parents[2]


def site_inputs(model, tok, module, texts):
    xs = []
    with HookOwner().scoped() as scope, torch.inference_mode():
        scope.forward(module, lambda m, a, o: xs.append(a[0][0].float()))
        for t in texts:
            model(**tok(t, return_tensors="pt", truncation=True, max_length=256))
    return torch.cat(xs)


def quartiles(v) -> str:
    q = torch.quantile(torch.as_tensor(v, dtype=torch.float), torch.tensor([0.1, 0.5, 0.9]))
    return " / ".join(f"{float(x):.1f}" for x in q)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "counterfact-train.json")
    p.add_argument("--model", default="smollm2-135m")
    args = p.parse_args()
    torch.set_num_threads(1)
    em = EditableModel.from_pretrained(args.model)
    model, tok = em.base_model, em.tokenizer
    reqs = [r for r in read_requests(args.data, limit=args.n) if r.rephrase_prompt and r.subject in r.rephrase_prompt]
    prefixes = context_prefixes(model, tok, 10)
    rephrased = [EditRequest(prompt=r.rephrase_prompt.replace(r.subject, "{}", 1), subject=r.subject, target_new=r.target_new)
                 for r in reqs]
    rows = ["| site | key norm | spread | rephrase to key | nearest unrelated token | nearest other key |",
            "|---|---:|---:|---:|---:|---:|"]
    for layer in DeltaConfig().layer_list(model):
        module = Site(layer).module(model)
        samples = activations_at_subject(model, tok, module, reqs, prefixes)
        keys = samples.mean(0)
        spread = (samples - keys).norm(dim=-1).amax(0)
        reph = (activations_at_subject(model, tok, module, rephrased, [""])[0] - keys).norm(dim=-1)
        unrelated = site_inputs(model, tok, module, reference_texts() + [r.locality_prompt for r in reqs])
        other = torch.cdist(keys, keys).fill_diagonal_(float("inf")).min(1).values
        rows.append(f"| L{layer} | {quartiles(keys.norm(dim=1))} | {quartiles(spread)} | {quartiles(reph)} | "
                    f"{quartiles(torch.cdist(keys, unrelated).min(1).values)} | {quartiles(other)} |")
    text = (f"Key geometry on {em.name}, {len(reqs)} CounterFact records, 10th / 50th / 90th percentiles of "
            f"Euclidean distances:\n\n" + "\n".join(rows) + "\n")
    out = REPO / "benchmarks" / "results" / "weight_deltas" / "key_geometry.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
