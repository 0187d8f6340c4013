#!/usr/bin/env python
"""Target vectors alone under different settings: seconds per request, steps, final P(target).

    python benchmarks/studies/target_vector_levers.py --n-requests 32 --set lr=0.5,stop_prob=0 --set lr=1.0

Each ``--set`` is a list of ENCORE config overrides (the target-vector options and
``target_prefixes``); the vectors are optimised at the top edited block for the first CounterFact
records, on the bare prompt plus ``target_prefixes`` context prefixes, one setting after another.
Prints one JSON line per setting and writes them to ``benchmarks/results/target_vector_levers.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from grace_hooks import EditableModel
from grace_hooks.config import make_config
from grace_hooks.eval.editors import MethodSpec
from grace_hooks.eval.runinfo import run_record
from grace_hooks.methods.delta.config import EncoreConfig
from grace_hooks.requests import read_requests
from grace_hooks.locate.subject_keys import context_prefixes
from grace_hooks.locate.target_vectors import target_vectors

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/counterfact-train.json")
    ap.add_argument("--n-requests", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", dest="settings", action="append", default=[], help="KEY=VALUE,... (repeatable)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/target_vector_levers.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = run_record(REPO, args.threads)
    em = EditableModel.from_pretrained(args.model)
    model, tok = em.base_model, em.tokenizer
    requests = read_requests(args.data, limit=args.n_requests)
    rows = []
    for setting in args.settings or [""]:
        cfg = make_config(EncoreConfig, dict(MethodSpec.parse(f"encore:{setting}").overrides))
        prefixes = context_prefixes(model, tok, cfg.prefix_tokens, memo=em.memo)[: 1 + cfg.target_prefix_count()]
        layer = cfg.layer_list(model)[-1]
        t0 = time.perf_counter()
        found = target_vectors(model, tok, layer, requests, prefixes, cfg.target_config())
        seconds = time.perf_counter() - t0
        rows.append({"set": setting, "seconds_per_request": round(seconds / len(requests), 3),
                     "steps_mean": statistics.mean(tv.steps for tv in found),
                     "target_prob_mean": round(statistics.mean(tv.target_prob for tv in found), 3)})
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"run": run, "model": em.name, "n_requests": len(requests), "threads": args.threads, "rows": rows},
                                   indent=2))


if __name__ == "__main__":
    main()
