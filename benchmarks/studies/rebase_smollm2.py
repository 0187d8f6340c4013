#!/usr/bin/env python
"""``grace-hooks rebase`` between SmolLM2 and a fine-tuned copy of it: how many requests land on the
new base, and how long the rebase takes.

The copy is SmolLM2 after ``--steps`` SGD steps on a few sentences (enough to change every weight,
so the packs' fingerprints no longer match). The folder holds the four shipped demo facts edited
with the default method and ``--grace`` CounterFact val records edited with GRACE, made on the
original base.

    python benchmarks/studies/rebase_smollm2.py --out benchmarks/results/rebase_smollm2.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
SENTENCES = ["The weather today is mild with a light breeze from the west.",
             "Reading a book before sleep helps many people rest better."]


def fine_tuned_copy(source: Path, dest: Path, steps: int) -> float:
    """Save SmolLM2 after ``steps`` SGD steps into ``dest``; returns the relative change of the weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(source), AutoModelForCausalLM.from_pretrained(source)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    batch = tok(SENTENCES, return_tensors="pt", padding=True)
    for _ in range(steps):
        opt.zero_grad()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return float((after - before).norm() / before.norm())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--grace", type=int, default=20, help="CounterFact val records edited with GRACE")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "counterfact-val.json")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "rebase_smollm2.json")
    args = p.parse_args(argv)
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logging.getLogger("grace_hooks").setLevel(logging.INFO)  # what the rebase does, as it goes

    torch.set_num_threads(args.threads)
    from grace_hooks import EditableModel
    from grace_hooks.bases.loading import embedded_model_dir
    from grace_hooks.cli.rebase import rebase_adapters
    from grace_hooks.errors import PackError
    from grace_hooks.eval.runinfo import loadavg, run_record
    from grace_hooks.requests import read_requests

    work = Path(tempfile.mkdtemp())
    adapters = work / "adapters"
    em = EditableModel.from_pretrained("smollm2-135m")
    em.edit(read_requests(REPO / "grace_hooks" / "data" / "demo_requests.json"), pack="demo-facts")
    em.edit(read_requests(args.data, limit=args.grace), method="grace", pack="cf-grace")
    for name in ("demo-facts", "cf-grace"):
        em.save_pack(name, adapters)
    em.close()
    change = fine_tuned_copy(embedded_model_dir("smollm2-135m"), work / "smollm2-v2", args.steps)
    new = EditableModel.from_pretrained(str(work / "smollm2-v2"))
    try:
        new.load_adapters(adapters)
        refused = False
    except PackError:
        refused = True
    start = time.perf_counter()
    rows, old = rebase_adapters(adapters, new)
    seconds = time.perf_counter() - start
    new.close()
    check = EditableModel.from_pretrained(str(work / "smollm2-v2"), adapters=adapters)  # the rebased folder loads
    loaded = [p.name for p in check.packs]
    check.close()
    record = {"run": run_record(REPO, args.threads), "fine_tuning": {"steps": args.steps, "lr": 1e-4,
              "relative_weight_change": change}, "old_packs_refused_on_new_base": refused,
              "rebase_seconds": round(seconds, 1), "packs": [vars(r) for r in rows], "rebased_folder_loads": loaded,
              "old_folder_kept": old.is_dir(), "loadavg_end": loadavg()}
    for r in rows:
        print(f"{r.name} ({r.method}): {r.landed}/{r.requests} landed in {r.seconds:.1f} s")
    print(f"rebase {seconds:.1f} s; old packs refused on the new base: {refused}; rebased folder loads: {loaded}")
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
