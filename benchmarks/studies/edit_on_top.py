#!/usr/bin/env python
"""One more batch of edits on top of a folder of earlier packs, once per setting: does it still land,
and do the earlier edits still hold?

    python benchmarks/studies/edit_on_top.py --adapters DIR --offset 5000 --batch 100 --set "" --set previous_edits=false \
        --json benchmarks/results/edit_on_top.json

Loads the packs of ``DIR`` (e.g. the first 5,000 edits of a lifelong run) onto the base. Then, for
each ``--set``, it edits records ``offset .. offset + batch`` of ``--data`` (or the first ``batch`` of
``--new-data``) with the method and those options, reads the new pack's own figures (share of
requests whose target is now the greedy continuation of their prompt, share of the way to z,
seconds), scores ES (new target more likely than the true one) on the new records and on every
``--stride``-th earlier record, and removes the new pack again.
Nothing is written to ``DIR``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from grace_hooks import EditableModel
from grace_hooks.eval.editors import MethodSpec
from grace_hooks.eval.metrics import score_records
from grace_hooks.eval.runinfo import run_record
from grace_hooks.requests import read_requests

REPO = Path(__file__).resolve().parents[2]


def _es(em, reqs) -> float:
    scores = score_records(em, reqs, ("prompt",), 16)
    new, true = scores["prompt/new"].logprob, scores["prompt/true"].logprob
    return float(np.mean(np.asarray(new) > np.asarray(true)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/counterfact-train.json")
    ap.add_argument("--adapters", type=Path, required=True, help="folder of the earlier packs (read only)")
    ap.add_argument("--offset", type=int, required=True, help="first record of the new batch (records before it are the earlier edits)")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--stride", type=int, default=10, help="every stride-th earlier record is scored for retention")
    ap.add_argument("--new-data", default=None, help="take the new batch from the start of this file instead (when --data "
                                                     "has no records after --offset)")
    ap.add_argument("--method", default="encore")
    ap.add_argument("--set", action="append", default=None, help="KEY=VALUE,... options of one run (repeatable; '' = defaults)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/edit_on_top.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = run_record(REPO, args.threads)
    records = read_requests(args.data, limit=args.offset + args.batch)
    new, earlier = records[args.offset:], records[:args.offset:args.stride]
    if args.new_data:
        new = read_requests(args.new_data, limit=args.batch)
    em = EditableModel.from_pretrained(args.model, adapters=args.adapters)
    rows = []
    try:
        retention_before = _es(em, earlier)
        for overrides in args.set or [""]:
            spec = MethodSpec.parse(f"{args.method}:{overrides}" if overrides else args.method)
            t0 = time.perf_counter()
            info = em.edit(new, method=spec.method, pack="on-top", **dict(spec.overrides))
            seconds = time.perf_counter() - t0
            metrics = em.pack(info.name).metrics
            try:
                row = {"set": overrides, "loaded_edits": args.offset, "landed_share": metrics.get("landed_share"),
                       "z_reached_mean": metrics.get("z_reached_mean"), "seconds_per_edit": seconds / len(new),
                       "ES_new": _es(em, new), "ES_earlier_before": retention_before, "ES_earlier_after": _es(em, earlier),
                       "earlier_scored": len(earlier)}
            finally:
                em.remove_pack(info.name)
            rows.append(row)
            print(json.dumps(row))
    finally:
        em.close()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"run": run, "model": args.model, "data": args.data, "adapters": str(args.adapters),
                                     "method": args.method, "rows": rows}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
