#!/usr/bin/env python
"""Squashing a chain of packs (comeba_hk, or routed weight deltas): bytes on disk and in memory, load
time, and whether the squashed pack gives the chain's logits, on the packs a lifelong run saved.

    python benchmarks/squash.py benchmarks/results/comeba/cf150-b30-zscore/<run>/adapters

Loads the base with the chain, scores every edit prompt, its rephrase and locality prompt and the
shipped unrelated paragraphs, squashes the chain in memory, scores again, saves the squashed pack
and loads it on a fresh copy. Writes ``--out`` (default ``squash.json`` beside the adapters folder)
and prints it.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from grace_hooks import EditableModel, EditRequest
from grace_hooks.engine.health import reference_texts
from grace_hooks.eval.runinfo import run_record
from grace_hooks.store.packs import pack_dirs

REPO = Path(__file__).resolve().parents[1]


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@torch.inference_mode()
def last_logits(model: EditableModel, texts: list[str]) -> list[torch.Tensor]:
    tok = model.tokenizer
    return [model(**tok(t, return_tensors="pt", truncation=True, max_length=256)).logits[0, -1].clone() for t in texts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("adapters", type=Path, help="a folder holding one chain of packs of one method")
    ap.add_argument("--out", type=Path, help="results file (default: squash.json beside the adapters folder)")
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = run_record(REPO, 1)

    t0 = time.perf_counter()
    em = EditableModel.from_pretrained(args.model, adapters=args.adapters)
    load_chain = time.perf_counter() - t0
    names = [p.name for p in em.packs]
    texts = []
    for name in names:
        for r in (EditRequest(**d) for d in em.pack(name).requests):
            texts += [t for t in (r.text, r.rephrase_prompt, r.locality_prompt) if t]
    texts += reference_texts()
    chain = last_logits(em, texts)
    chain_memory = sum(p.nbytes for p in em.packs)
    em.squash_packs(names, into="squashed")
    squashed = last_logits(em, texts)
    with tempfile.TemporaryDirectory() as tmp:
        em.save_pack("squashed", tmp)
        squashed_disk = folder_bytes(Path(tmp))
        t0 = time.perf_counter()
        fresh = EditableModel.from_pretrained(args.model, adapters=tmp)
        load_squashed = time.perf_counter() - t0
        reloaded = last_logits(fresh, texts)
    diffs = torch.stack([(a - b).abs().max() for a, b in zip(chain, squashed)])
    out = {
        "run": run, "adapters": str(args.adapters), "packs": len(names), "edits": em.packs[0].n_edits, "texts": len(texts),
        "chain_bytes_disk": sum(folder_bytes(p) for p in pack_dirs(args.adapters)),
        "squashed_bytes_disk": squashed_disk,
        "chain_bytes_memory": chain_memory, "squashed_bytes_memory": em.packs[0].nbytes,
        "load_seconds_chain": load_chain, "load_seconds_squashed": load_squashed,
        "logits_bit_identical_share": float(sum(torch.equal(a, b) for a, b in zip(chain, squashed)) / len(texts)),
        "logits_max_abs_diff": float(diffs.max()),
        "argmax_agreement": float(sum(int(a.argmax() == b.argmax()) for a, b in zip(chain, squashed)) / len(texts)),
        "reload_bit_identical_share": float(sum(torch.equal(a, b) for a, b in zip(squashed, reloaded)) / len(texts)),
    }
    dest = args.out or args.adapters.parent / "squash.json"
    dest.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
