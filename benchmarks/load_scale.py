#!/usr/bin/env python
"""What loading an adapters folder costs as it grows (issue 37): seconds to load 10,000 and 100,000
edits onto the base, resident memory per loaded edit against its bytes on disk.

The folder is made of copies of one real pack (``--template``, e.g. a 100-edit pack a lifelong run
saved), each under its own name and pack id, so the sizes and the checks are those of real packs
without editing 100,000 facts first (their keys repeat, so this measures loading, not routing).

    python benchmarks/load_scale.py --template benchmarks/results/questions/val200-levers/encore/adapters/e00000 \\
        --edits 10000,100000 --out benchmarks/results/load_scale.json [--profile]
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import gc
import json
import pstats
import shutil
import sys
import time
import uuid
from pathlib import Path

import psutil
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def folder_of_copies(template: Path, n_packs: int, dest: Path) -> int:
    """``dest`` holding ``n_packs`` copies of the pack at ``template`` (names c00000, ...); returns its bytes."""
    from grace_hooks.store.packs import load_pack, save_pack

    pack = load_pack(template)
    have = len([p for p in dest.iterdir() if p.is_dir()]) if dest.is_dir() else 0
    for i in tqdm(range(have, n_packs), desc="pack copies", unit="pack"):
        save_pack(dataclasses.replace(pack, name=f"c{i:05d}", pack_id=uuid.uuid4().hex), dest)
    return sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())


def top_functions(profiler: cProfile.Profile, n: int) -> dict[str, float]:
    """The ``n`` functions with the most internal time, as 'file:line(name)' -> seconds."""
    stats = pstats.Stats(profiler).stats
    rows = sorted(((tt, f"{Path(f).name}:{line}({name})") for (f, line, name), (_, _, tt, _, _) in stats.items()),
                  reverse=True)[:n]
    return {where: round(tt, 3) for tt, where in rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--template", type=Path, required=True, help="a pack folder to copy")
    ap.add_argument("--edits", default="10000,100000", help="loaded edits to measure at (multiples of the pack's)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--work", type=Path, default=Path("/tmp/load_scale"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="also record where each load's time went (cProfile, "
                                                             "the library's functions by internal time)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "load_scale.json")
    args = ap.parse_args(argv)
    import torch

    from grace_hooks import EditableModel
    from grace_hooks.eval.runinfo import run_record
    from grace_hooks.store.packs import load_pack

    torch.set_num_threads(args.threads)
    result = {"run": run_record(REPO, args.threads), "template": str(args.template), "rows": []}
    per_pack = load_pack(args.template).n_edits
    folder = args.work / "adapters"
    shutil.rmtree(folder, ignore_errors=True)
    proc = psutil.Process()
    for edits in sorted(int(x) for x in args.edits.split(",")):
        n_packs = max(1, edits // per_pack)
        disk = folder_of_copies(args.template, n_packs, folder)
        gc.collect()
        base = EditableModel.from_pretrained(args.model)
        rss_base = proc.memory_info().rss
        profiler = cProfile.Profile() if args.profile else None
        t0 = time.perf_counter()
        with profiler or contextlib.nullcontext():
            base.load_adapters(folder)
        seconds = time.perf_counter() - t0
        rss = proc.memory_info().rss
        row = {"edits": n_packs * per_pack, "packs": n_packs, "load_seconds": seconds,
               "bytes_on_disk_per_edit": disk / (n_packs * per_pack),
               "rss_growth_per_edit": (rss - rss_base) / (n_packs * per_pack), "rss_after_gib": rss / 2**30}
        if profiler is not None:  # profiled seconds run slower than the plain load_seconds above
            row["profile_seconds_by_function"] = top_functions(profiler, 12)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        base.close()
        del base
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
