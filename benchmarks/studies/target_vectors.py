#!/usr/bin/env python
"""Target-vector cost: the cached-prefix replay against the full replay, on the same requests.

    python benchmarks/studies/target_vectors.py --n-requests 16 --rounds 2

Optimises MEMIT/ENCORE target vectors (at the default top edited block of the model) for the
first CounterFact records, alternating the two replays round by round. Prints the median seconds
per request of each, their ratio, the steps taken and the largest |z_cached - z_full| / |z - h|.
Writes ``benchmarks/results/target_vectors.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from grace_hooks import EditableModel
from grace_hooks.eval.runinfo import run_record
from grace_hooks.methods.delta.config import DeltaConfig
from grace_hooks.requests import read_requests
from grace_hooks.locate.subject_keys import context_prefixes
from grace_hooks.locate.target_vectors import target_vectors

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/counterfact-train.json")
    ap.add_argument("--n-requests", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--stop", default="most_probable", choices=("loss", "most_probable"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/target_vectors.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = run_record(REPO, args.threads)
    em = EditableModel.from_pretrained(args.model)
    model, tok = em.base_model, em.tokenizer
    cfg = DeltaConfig(stop=args.stop)
    layer = cfg.layer_list(model)[-1]
    requests = read_requests(args.data, limit=args.n_requests)
    prefixes = context_prefixes(model, tok, cfg.prefix_tokens)[: 1 + cfg.n_prefixes]
    seconds: dict[str, list[float]] = {"cached": [], "full": []}
    found = {}
    for _ in range(args.rounds):
        for name in seconds:
            t0 = time.perf_counter()
            found[name] = target_vectors(model, tok, layer, requests, prefixes, cfg.target_config(),
                                         cached_prefix=name == "cached")
            seconds[name].append((time.perf_counter() - t0) / len(requests))
    gap = max(float((a.z - b.z).norm() / (b.z - b.h).norm().clamp(min=1e-12))
              for a, b in zip(found["cached"], found["full"]))
    result = {
        "run": run, "model": em.name, "layer": layer, "n_requests": len(requests), "rounds": args.rounds, "threads": args.threads,
        "stop": args.stop, "n_prefixes": len(prefixes),
        "seconds_per_request_median": {k: statistics.median(v) for k, v in seconds.items()},
        "seconds_per_request": seconds,
        "speedup": statistics.median(seconds["full"]) / statistics.median(seconds["cached"]),
        "steps_equal": [a.steps for a in found["cached"]] == [b.steps for b in found["full"]],
        "max_relative_z_gap": gap,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    med = result["seconds_per_request_median"]
    print(f"target vectors, {len(requests)} requests x {args.rounds} rounds at block {layer}: cached prefix "
          f"{med['cached']:.2f} s/request, full replay {med['full']:.2f} s/request, {result['speedup']:.2f}x; "
          f"same steps: {result['steps_equal']}; max |z gap| / |delta| {gap:.1e}")


if __name__ == "__main__":
    main()
