#!/usr/bin/env python
"""Locality prompts that name an edited subject, apart from those that do not.

    python benchmarks/studies/locality_overlap.py --adapters DIR --n 5000 --stride 20 --json OUT.json

In a long CounterFact stream a record's locality (neighbourhood) prompt often names the subject of
another record of the stream: "John Lennon performs on the" is unrelated to record 0's edit, but not
to an edit of John Lennon. The router is right to fire there. This script loads the packs of ``DIR``
(the first ``n`` records of ``--data`` edited), takes the locality prompt of every ``stride``-th record
(the lifelong harness's sample), and reports router fires at the prompt's positions and bit-identical
logits (against the base, every position) for the prompts that name the subject of any of the ``n``
edited records and for the rest.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from grace_hooks import EditableModel
from grace_hooks.eval.metrics import names_edited_subject
from grace_hooks.eval.runinfo import run_record
from grace_hooks.requests import read_requests

REPO = Path(__file__).resolve().parents[2]


def _rates(flags: list[tuple[bool, bool]]) -> dict:
    n = len(flags)
    return {"prompts": n, "fire": sum(f for f, _ in flags) / n if n else None,
            "bit_identical": sum(b for _, b in flags) / n if n else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/counterfact-train.json")
    ap.add_argument("--adapters", type=Path, required=True, help="packs of the first --n records (read only)")
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--stride", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = run_record(REPO, args.threads)
    records = read_requests(args.data, limit=args.n)
    subjects = {r.subject for r in records}
    em = EditableModel.from_pretrained(args.model, adapters=args.adapters)
    groups: dict[str, list[tuple[bool, bool]]] = {"names_an_edited_subject": [], "names_none": []}
    try:
        for r in tqdm(records[::args.stride], desc="locality prompts", unit="prompt"):
            if not r.locality_prompt:
                continue
            ids = em.tokenizer(r.locality_prompt, return_tensors="pt").input_ids  # the prompt, as the harness counts fires
            with torch.no_grad():
                with em.routes() as hits:
                    edited = em(input_ids=ids).logits
                with em.disabled():
                    base = em(input_ids=ids).logits
            named = names_edited_subject(r.locality_prompt, r.subject, subjects)  # as the harness splits them
            groups["names_an_edited_subject" if named else "names_none"].append((bool(hits), torch.equal(edited, base)))
    finally:
        em.close()
    out = {"run": run, "model": args.model, "data": args.data, "adapters": str(args.adapters), "n": args.n, "stride": args.stride,
           **{k: _rates(v) for k, v in groups.items()}, "all": _rates([x for v in groups.values() for x in v])}
    print(json.dumps(out, indent=1))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
