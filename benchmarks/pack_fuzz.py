#!/usr/bin/env python
"""Load thousands of mutated edit packs and count what happened (issue: hostile packs).

Every method and mode (``grace_hooks.testing.pack_mutations.SOURCES``) is saved on a tiny random Llama, then
mutated (header fields, method relabelled, config, state, sites, tensors dropped / renamed /
reshaped / retyped / poisoned, odd safetensors dtypes and ranges, corrupt bytes and JSON) and
loaded through ``load_pack`` or ``load_adapters`` into a model that already holds a pack. Counts:
clean rejection (a grace_hooks error, model unchanged) / accepted and sane (finite outputs, removal
restores them) / anything else (a bug: must be 0). Prints the table and writes JSON.

    python benchmarks/pack_fuzz.py --n 10000 --json benchmarks/results/reliability/pack_fuzz.json
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import random
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from grace_hooks.eval.runinfo import run_record
from grace_hooks.testing import DELTA_REQUESTS, DELTA_TINY, TINY_REQUESTS, tiny_model, tiny_tokenizer
from grace_hooks.testing.pack_mutations import OUTCOMES, SOURCES, build_sources, mutant, outcome

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    logging.basicConfig(level=logging.ERROR)  # each forced load of a mutant warns of its fingerprint
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="mutants to load")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the counts here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = run_record(REPO, 1)  # before the loop: the load average at the start
    rng = random.Random(args.seed)
    tok = tiny_tokenizer()
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    others: list[str] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        em, paths, ctx = build_sources(tiny_model("llama"), tok, Path(tmp) / "sources", TINY_REQUESTS, DELTA_REQUESTS, DELTA_TINY)
        for i in tqdm(range(args.n), desc="loading mutated packs"):
            source = rng.choice(sorted(SOURCES))
            via = rng.choice(["load_pack", "load_adapters"])
            folder, what = mutant(rng, paths[source], Path(tmp) / "m", ctx)
            result, detail = outcome(em, tok, folder, via)
            counts["total"][result] += 1
            counts[what.split("+")[0]][result] += 1
            if result == "other":
                others.append(f"#{i} {source} {what} via {via}: {detail}")
    elapsed = time.perf_counter() - start
    print(f"{args.n} mutants of {len(SOURCES)} packs in {elapsed:.0f} s")
    print("| first mutation | " + " | ".join(OUTCOMES) + " |")
    print("|---|" + "---|" * len(OUTCOMES))
    for kind in sorted(counts, key=lambda k: (k == "total", k)):
        print(f"| {kind} | " + " | ".join(str(counts[kind][o]) for o in OUTCOMES) + " |")
    for line in others[:20]:
        print("OTHER", line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"run": run, "n": args.n, "seed": args.seed, "seconds": round(elapsed, 1),
                                         "counts": {k: dict(v) for k, v in counts.items()}, "other": others[:100]}, indent=1))


if __name__ == "__main__":
    main()
