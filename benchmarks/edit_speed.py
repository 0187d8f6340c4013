#!/usr/bin/env python
"""Seconds per edit of GRACE and of the default generalising method, measured in one process.

    python benchmarks/edit_speed.py --batch 100 --rounds 2 --threads 2

Each round edits a fresh batch of CounterFact records with every method in turn (alternating, so
machine noise hits both alike), then removes the pack again (each edit starts from the base). The
first edit of each method is a warm-up (C0, context prefixes) and is not counted. Prints the median
seconds per edit, the ratio to GRACE and, for methods that report it, the split of one edit's time
by phase (``metrics.seconds``); writes ``benchmarks/results/edit_speed.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from grace_hooks import EditableModel
from grace_hooks.eval.editors import MethodSpec
from grace_hooks.eval.runinfo import run_record
from grace_hooks.methods import DEFAULT_METHOD
from grace_hooks.requests import read_requests

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/counterfact-train.json")
    ap.add_argument("--batch", type=int, default=100, help="records per edit call")
    ap.add_argument("--rounds", type=int, default=2, help="timed edits per method")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--method", action="append", help=f"method spec (repeatable); default grace and {DEFAULT_METHOD}")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/edit_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = run_record(REPO, args.threads)
    specs = [MethodSpec.parse(m) for m in (args.method or ["grace", DEFAULT_METHOD])]
    em = EditableModel.from_pretrained(args.model)
    records = read_requests(args.data, limit=args.batch * (args.rounds + 1))
    batches = [records[i * args.batch:(i + 1) * args.batch] for i in range(args.rounds + 1)]
    seconds = {s.label: [] for s in specs}
    phases: dict[str, list[dict]] = {s.label: [] for s in specs}
    landed: dict[str, list[float]] = {s.label: [] for s in specs}
    for round_, batch in enumerate(batches):
        for spec in specs:
            t0 = time.perf_counter()
            info = em.edit(batch, method=spec.method, pack=f"speed-{round_}", **dict(spec.overrides))
            dt = time.perf_counter() - t0
            metrics = em.pack(info.name).metrics
            em.remove_pack(info.name)
            if round_ == 0:
                continue  # warm-up: C0 and the context prefixes are made once per model
            seconds[spec.label].append(dt / len(batch))
            if "seconds" in metrics:
                phases[spec.label].append(metrics["seconds"])
            if "landed_share" in metrics:
                landed[spec.label].append(metrics["landed_share"])
    median = {k: statistics.median(v) for k, v in seconds.items()}
    first = specs[0].label
    result = {
        "run": run, "model": em.name, "batch": args.batch, "rounds": args.rounds, "threads": args.threads,
        "seconds_per_edit_median": median,
        "ratio_to_first": {k: v / median[first] for k, v in median.items()},
        "seconds_per_edit": seconds,
        "phase_seconds_per_batch": phases,
        "landed_share": landed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for k, v in median.items():
        print(f"{k:60s} {v:6.3f} s/edit  x{v / median[first]:.1f} of {first}")
        for split in phases[k][-1:]:
            total = sum(split.values())
            print("    " + ", ".join(f"{p} {100 * s / total:.0f}%" for p, s in sorted(split.items(), key=lambda x: -x[1])))
        if landed[k]:
            print(f"    landed on their own prompt: {100 * statistics.mean(landed[k]):.1f}%")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
