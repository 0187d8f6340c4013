#!/usr/bin/env python
"""C0 at the default sites after several token counts, measured in one pass and written to the cache.

A study of how many corpus tokens C0 needs on a model where the whole corpus costs minutes (Qwen's
MLP input has 8,960 dimensions): this writes C0 after each ``--tokens`` count exactly as an edit
with ``max_tokens=N`` would measure it, so the harness then compares
``--method encore:max_tokens=N`` variants without measuring C0 again:

    python benchmarks/studies/c0_snapshots.py --model qwen2.5-coder-1.5b --tokens 1024,2048,4096,8192 --threads 2
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--tokens", default="1024,2048,4096,8192", help="comma-separated token counts below the full C0")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "c0_snapshots.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logging.getLogger("grace_hooks").setLevel(logging.INFO)
    import torch

    from grace_hooks import EditableModel
    from grace_hooks.config import DEFAULT_METHOD
    from grace_hooks.eval.runinfo import loadavg, run_record
    from grace_hooks.locate.covariance import second_moments
    from grace_hooks.methods import get_method

    torch.set_num_threads(args.threads)
    record = {"run": run_record(REPO, args.threads)}
    em = EditableModel.from_pretrained(args.model)
    method = get_method(DEFAULT_METHOD)
    cfg = em.method_config(method.config_class)
    sites = method.sites(em.base_model, cfg)
    with em.edit_context() as ctx:
        stats = method.statistics(ctx)
        corpus = stats.corpus(cfg.corpus_spec())
        start = time.perf_counter()
        moments = second_moments(em.base_model, em.tokenizer, sites, corpus, cfg.max_tokens, model_hash=stats.digest(),
                                 also_at=tuple(int(t) for t in args.tokens.split(",")))
    record.update({"model": args.model, "sites": [s.name for s in sites], "seconds": round(time.perf_counter() - start, 1),
                   "full_tokens": next(iter(moments.values())).count, "snapshots": args.tokens,
                   "loadavg_end": loadavg()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"C0 at {record['sites']}: {record['full_tokens']} tokens in {record['seconds']} s; snapshots at {args.tokens}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
