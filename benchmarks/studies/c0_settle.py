#!/usr/bin/env python
"""How many corpus tokens C0 needs before the update it gives stops changing.

    python benchmarks/studies/c0_settle.py --n-requests 100 --threads 2

Samples (or reads from the cache) the model-written corpus the delta methods use, measures the
site inputs of its first ``--max-tokens`` tokens at the default sites, and for growing prefixes of
those tokens solves the default method's update factors V = (lambda C0 + lambda_N I + K K^T)^-1 K
for the keys of real CounterFact requests. Prints, per token count, the relative distance of V
and of C0 to the values from all tokens (the worst site), with the seconds the sampling and the
products took; writes ``benchmarks/results/c0_settle.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from grace_hooks import EditableModel
from grace_hooks.config import DEFAULT_METHOD, make_config
from grace_hooks.locate.covariance import cached_sample_corpus, model_digest, sample_corpus, site_inputs
from grace_hooks.locate.linalg import closed_form_update, preservation_matrix
from grace_hooks.methods import get_method
from grace_hooks.eval.runinfo import run_record
from grace_hooks.requests import read_requests
from grace_hooks.locate.subject_keys import activations_at_subject_of

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/counterfact-train.json")
    ap.add_argument("--n-requests", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-sampling", default="", metavar="B,B,...",
                    help="also time one batch of B model-sampled texts for each B (seconds per text)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/c0_settle.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = run_record(REPO, args.threads)
    em = EditableModel.from_pretrained(args.model)
    model, tok = em.base_model, em.tokenizer
    method = get_method(DEFAULT_METHOD)
    cfg = make_config(method.config_class, {})
    sites = method.sites(model, cfg)
    t0 = time.perf_counter()
    corpus = cached_sample_corpus(model, tok, model_digest(model), cfg.corpus_texts, cfg.corpus_tokens)
    sampled = time.perf_counter() - t0
    t0 = time.perf_counter()
    inputs = site_inputs(model, tok, sites, corpus.texts, args.max_tokens)
    measured = time.perf_counter() - t0
    requests = read_requests(args.data, limit=args.n_requests)
    keys = activations_at_subject_of({s.name: s.module(model) for s in sites}, model, tok, requests, [""])
    total = len(next(iter(inputs.values())))
    counts = [n for n in (1024, 2048, 4096, 8192, 16384) if n < total] + [total]
    rows = []
    full_v, full_c0 = {}, {}
    for n in reversed(counts):  # all tokens first: the reference
        worst_v = worst_c0 = 0.0
        for site in sites:
            x = inputs[site.name][:n].to(torch.float64)
            c0 = x.T @ x / n
            k = keys[site.name][0].T.to(torch.float64)
            p = preservation_matrix(c0.shape[0], c0, cfg.c0_weight(c0.shape[0]), cfg.norm_lambda)
            v = closed_form_update(torch.zeros(1, k.shape[1]), k, p).V
            if site.name not in full_v:
                full_v[site.name], full_c0[site.name] = v, c0
            worst_v = max(worst_v, float((v - full_v[site.name]).norm() / full_v[site.name].norm()))
            worst_c0 = max(worst_c0, float((c0 - full_c0[site.name]).norm() / full_c0[site.name].norm()))
        rows.append({"tokens": n, "V_relative_distance": worst_v, "C0_relative_distance": worst_c0})
    rows.reverse()
    sampling = {}
    for b in [int(x) for x in args.time_sampling.split(",") if x]:
        t0 = time.perf_counter()
        sample_corpus(model, tok, b, cfg.corpus_tokens, batch_size=b)
        sampling[b] = (time.perf_counter() - t0) / b
        print(f"sampling {b} texts of {cfg.corpus_tokens} tokens in one batch: {sampling[b]:.2f} s per text")
    result = {"run": run, "model": em.name, "sampling_seconds_per_text": sampling, "method": DEFAULT_METHOD, "sites": [s.name for s in sites], "corpus": corpus.source,
              "seconds_sampling_or_cache": sampled, "seconds_site_inputs": measured, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"corpus {corpus.source}: {sampled:.1f} s to sample (or read), {measured:.1f} s for the site inputs")
    for r in rows:
        print(f"{r['tokens']:6d} tokens: |V - V_all| / |V_all| = {r['V_relative_distance']:.4f}, "
              f"|C0 - C0_all| / |C0_all| = {r['C0_relative_distance']:.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
