#!/usr/bin/env python
"""Soak: load / edit / remove on a tiny model for many cycles; memory must stay flat and no hook may
be left (issue: reliability). Each cycle loads a saved GRACE pack and a saved routed MEMIT pack from
disk, makes a new GRACE edit, checks the outputs, then removes all three and checks that the
outputs are the base's again. Prints peak RSS (ru_maxrss) and current RSS at the start and end.

    python benchmarks/soak.py --cycles 10000 --json benchmarks/results/reliability/soak.json
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import tempfile
import time
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from grace_hooks import EditableModel
from grace_hooks.bases.hooks import count_hooks
from grace_hooks.eval.runinfo import run_record
from grace_hooks.testing import DELTA_REQUESTS, DELTA_TINY, TINY_REQUESTS, tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


def rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS so far) in MiB."""
    return psutil.Process().memory_info().rss / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=10_000)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = run_record(REPO, 1)
    tok = tiny_tokenizer()
    em = EditableModel(tiny_model("llama"), tok, name="tiny")
    probe = tok([r.text for r in TINY_REQUESTS], return_tensors="pt", padding=True)
    with torch.no_grad():
        base = em(**probe).logits
    marks, problems = [], []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        em.edit(TINY_REQUESTS[:2], method="grace", pack="saved-grace")
        em.edit(DELTA_REQUESTS[:2], method="memit", pack="saved-memit", mode="routed", **DELTA_TINY)
        for name in ("saved-grace", "saved-memit"):
            em.save_pack(name, tmp)
            em.remove_pack(name)
        for cycle in tqdm(range(args.cycles), desc="load / edit / remove"):
            em.load_adapters(tmp)
            em.edit(TINY_REQUESTS[cycle % 3: cycle % 3 + 1], method="grace", pack="fresh", n_iter=5)
            with torch.no_grad():
                edited = em(**probe).logits
            if not bool(torch.isfinite(edited).all()):
                problems.append(f"cycle {cycle}: non-finite outputs")
            for name in ("fresh", "saved-memit", "saved-grace"):
                em.remove_pack(name)
            with torch.no_grad():
                if not torch.equal(em(**probe).logits, base):
                    problems.append(f"cycle {cycle}: outputs differ from the base after removal")
            if count_hooks(em.base_model):
                problems.append(f"cycle {cycle}: {count_hooks(em.base_model)} hooks left")
            if cycle in (0, 99, args.cycles // 2, args.cycles - 1):
                marks.append({"cycle": cycle + 1, "rss_mib": round(rss_mib()[0], 1), "peak_rss_mib": round(rss_mib()[1], 1)})
    result = {"run": run, "cycles": args.cycles, "seconds": round(time.perf_counter() - start, 1), "marks": marks,
              "hooks_left": count_hooks(em.base_model), "problems": problems[:20], "n_problems": len(problems)}
    for m in marks:
        print(f"after cycle {m['cycle']:>6}: RSS {m['rss_mib']:.1f} MiB, peak RSS {m['peak_rss_mib']:.1f} MiB")
    print(f"{args.cycles} cycles in {result['seconds']} s; hooks left: {result['hooks_left']}; problems: {len(problems)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
