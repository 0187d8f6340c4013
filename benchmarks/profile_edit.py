#!/usr/bin/env python
"""Time one batch of edits, and split a py-spy profile of it into the phases of an edit.

    py-spy record -r 20 -f raw -o edit.txt -- python benchmarks/profile_edit.py --method SPEC
    python benchmarks/profile_edit.py --phases edit.txt

The first form edits 2 records (warm-up: C0, context prefixes), then a batch of ``--batch``
records from ``--offset`` on with one method spec, and prints the seconds per edit of the batch. The second
reads py-spy's raw (collapsed-stack) output and prints each phase's share of the samples: the
first pattern of PHASES found in a stack names its phase.
"""
from __future__ import annotations

import argparse
import collections
import time

# (phase, a function or file:function that only that phase runs), first match wins
PHASES = [
    ("C0 (second moments)", "second_moments"), ("corpus sampling", "sample_corpus"),
    ("context prefixes", "context_prefixes"), ("target vectors: backward", "backward"),
    ("target vectors: replay set-up", "__init__ (grace_hooks/locate/target_vectors.py"),
    ("target vectors: forward", "_optimise"), ("keys and residuals", "activations_at_subject_of"),
    ("solve", "closed_form_update"), ("router calibration", "route_keys_and_radii"), ("landing check", "_landed"),
]


def phases(path: str) -> None:
    totals: collections.Counter = collections.Counter()
    for line in open(path, encoding="utf-8"):
        stack, _, count = line.rstrip().rpartition(" ")
        name = next((phase for phase, pattern in PHASES if pattern in stack), "other")
        totals[name] += int(count)
    n = sum(totals.values())
    for name, count in totals.most_common():
        print(f"{name:32s} {100 * count / n:5.1f}%")


def timed_batch(args) -> None:
    import torch

    from grace_hooks import EditableModel
    from grace_hooks.eval.editors import MethodSpec
    from grace_hooks.requests import read_requests

    torch.set_num_threads(args.threads)
    spec = MethodSpec.parse(args.method)
    em = EditableModel.from_pretrained(args.model)
    records = read_requests(args.data, limit=args.offset + args.batch)
    em.edit(records[:2], method=spec.method, **dict(spec.overrides))
    t0 = time.perf_counter()
    em.edit(records[args.offset:], method=spec.method, **dict(spec.overrides))
    print(f"{spec.label}: {(time.perf_counter() - t0) / args.batch:.2f} s per edit (batch {args.batch})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="encore", help="method spec NAME[:KEY=VALUE,...]")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/counterfact-train.json")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--offset", type=int, default=2, help="first record of the timed batch (at least 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--phases", metavar="RAW", help="summarise this py-spy raw profile instead of editing")
    args = ap.parse_args()
    phases(args.phases) if args.phases else timed_batch(args)


if __name__ == "__main__":
    main()
