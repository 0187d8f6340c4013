#!/usr/bin/env python
"""Issue 36's check: the same small lifelong run per method with the code before the house moved and
with this checkout, compared tensor by tensor and figure by figure.

For each method, ``benchmarks/lifelong.py`` edits the first ``--n-records`` CounterFact train records
in batches of ``--batch`` on SmolLM2, once from a git worktree of ``--before`` (its own cache folder,
the converted model shared) and once from this checkout. Then every tensor of every saved pack is
compared (bit-equal, largest absolute difference) and every figure of the last checkpoint that does
not measure time, memory or speed.

    python benchmarks/studies/layout_equivalence.py --out benchmarks/results/layout_equivalence.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
METHODS = ("grace", "encore", "memit", "oedit", "comeba_hk")
# figures that measure the machine, not the edits: they differ between any two runs
MACHINE_FIGURES = ("seconds", "time_ratio", "tokens_per_s", "bytes_per_edit", "rss", "load", "eval_seconds")


def run_side(code: Path, out: Path, method: str, args, cache: Path | None) -> None:
    env = {**os.environ, "PYTHONPATH": str(code)}
    if cache is not None:
        env["GRACE_HOOKS_CACHE"] = str(cache)
    cmd = [sys.executable, str(code / "benchmarks" / "lifelong.py"), "--data", str(args.data), "--method", method,
           "--n-records", str(args.n_records), "--batch", str(args.batch), "--checkpoints", str(args.n_records),
           "--eval-sample", str(args.n_records), "--chat-sample", str(args.chat_sample), "--no-cloze-answers",
           "--gen-rounds", "1", "--threads", str(args.threads), "--out", str(out)]
    subprocess.run(cmd, cwd=code, env=env, check=True, stdout=subprocess.DEVNULL)


def tensors_of(out: Path, method: str) -> dict[str, "object"]:
    from safetensors.torch import load_file

    found = {}
    for f in sorted((out / method / "adapters").rglob("*.safetensors")):
        for name, t in load_file(f).items():
            found[f"{f.parent.name}/{name}"] = t
    return found


def last_checkpoint(out: Path, method: str) -> dict:
    runs = json.loads((out / "results.json").read_text(encoding="utf-8"))["runs"]
    return runs[method]["checkpoints"][-1]


def compare(before: Path, after: Path, method: str) -> dict:
    old, new = tensors_of(before, method), tensors_of(after, method)
    # since the move a routed delta pack of scope 'span' stores its router keys once, as its edit keys
    stored_once = [n for n in old.keys() - new.keys() if n.endswith("/route_keys") and n[:-len("route_keys")] + "keys" in new]
    for n in stored_once:
        new[n] = new[n[:-len("route_keys")] + "keys"]
    diffs = {name: float((old[name].double() - new[name].double()).abs().max()) if old[name].shape == new[name].shape
             else math.inf for name in old.keys() & new.keys()}
    equal = sum(bool((old[n] == new[n]).all()) for n in diffs if old[n].shape == new[n].shape)
    a, b = last_checkpoint(before, method), last_checkpoint(after, method)
    figures = {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
               if not any(m in k for m in MACHINE_FIGURES) and isinstance(a.get(k, b.get(k)), (int, float, type(None)))}
    differing = {k: v for k, v in figures.items() if v[0] != v[1]}
    return {"tensors": len(diffs), "router_keys_stored_once": len(stored_once), "only_before": sorted(old.keys() - new.keys()),
            "only_after": sorted(new.keys() - old.keys()), "bit_equal": equal,
            "max_abs_difference": max(diffs.values(), default=0.0),
            "largest": sorted(diffs.items(), key=lambda kv: -kv[1])[:3],
            "figures_compared": len(figures), "figures_differing": differing}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default="ffaef4d", help="the commit before the move (the 1,000-edit val run's)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--n-records", type=int, default=20)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--chat-sample", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "counterfact-train.json")
    p.add_argument("--work", type=Path, default=Path("/tmp/layout_equivalence"))
    p.add_argument("--compare-only", action="store_true", help="compare the runs already in --work")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "layout_equivalence.json")
    args = p.parse_args(argv)
    import torch

    from grace_hooks.bases.embedded import cache_dir
    from grace_hooks.eval.runinfo import git_info, run_record

    torch.set_num_threads(args.threads)
    record = run_record(REPO, args.threads)
    tree, cache = args.work / "before-tree", args.work / "before-cache"
    if not tree.is_dir() and not args.compare_only:
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.before], cwd=REPO, check=True)
    cache.mkdir(parents=True, exist_ok=True)

    if not (cache / "models").exists():  # the converted model is the same file on both sides
        (cache / "models").symlink_to(cache_dir() / "models")
    result = {"run": record, "before": args.before, "settings": {k: str(v) for k, v in vars(args).items()},
              "methods": {}}
    if args.compare_only and args.out.is_file():  # the runs are the earlier invocation's: keep its record
        earlier = json.loads(args.out.read_text(encoding="utf-8"))
        result.update(run=earlier["run"], compared_by=record, after_commits=earlier.get("after_commits", {}))
    for method in args.methods.split(","):
        if not args.compare_only:
            run_side(tree, args.work / "before", method, args, cache)
            run_side(REPO, args.work / "after", method, args, None)
            result.setdefault("after_commits", {})[method] = git_info(REPO)["commit"]
        result["methods"][method] = compare(args.work / "before", args.work / "after", method)
        print(method, json.dumps(result["methods"][method]), flush=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if tree.is_dir():
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
