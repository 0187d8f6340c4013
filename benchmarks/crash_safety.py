#!/usr/bin/env python
"""Crash and concurrency loops on an adapters folder (issue: reliability).

1. kill -9: a writer process overwrites pack ``facts`` with pack A or B in a loop and is killed
   with SIGKILL at a random moment (a second loop widens the moment between the two renames of an
   overwrite to 50 ms, so that kills land there too); the next reader (``list_packs``: under the folder's lock it
   finishes or undoes the interrupted save) must find ``facts`` whole, equal to A or B, and no
   ``.tmp-*`` / ``.old-*`` leftover after it.
2. concurrent writers: two processes save ``facts`` at the same moment, 20 times each; neither may
   fail, and the pack must be whole at the end (writers take the folder's lock in turn).
Prints the counts and writes JSON.

    python benchmarks/crash_safety.py --kills 50 --writer-rounds 20 --json benchmarks/results/reliability/crash_safety.json
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]


def make_sources(folder: Path) -> None:
    from grace_hooks import EditableModel
    from grace_hooks.testing import TINY_REQUESTS, tiny_model, tiny_tokenizer

    em = EditableModel(tiny_model("llama"), tiny_tokenizer(), name="tiny")
    for name, reqs in (("A", TINY_REQUESTS[:1]), ("B", TINY_REQUESTS)):
        em.edit(reqs, method="grace", pack=name, n_iter=5)
        em.save_pack(name, folder)


def child(sources: Path, adapters: Path, rounds: int, overwrite: bool, widen_gap: bool = False) -> None:
    """Save A and B in turn as ``facts`` (``rounds`` < 0: until killed); says 'ready' first.
    ``widen_gap``: wait 50 ms after moving the old pack aside, so kills land between the two renames."""
    import os

    from grace_hooks.errors import PackError

    if widen_gap:
        rename = os.replace

        def slow_replace(src, dst):
            rename(src, dst)
            if ".old-" in str(dst):
                time.sleep(0.05)

        os.replace = slow_replace
    from grace_hooks.store.packs import load_pack, save_pack

    packs = [load_pack(sources / "A"), load_pack(sources / "B")]
    print("ready", flush=True)
    i, refused = 0, 0
    while rounds < 0 or i < rounds:
        try:
            save_pack(packs[i % 2], adapters, name="facts", overwrite=overwrite)
        except PackError:
            refused += 1
        i += 1
    print(f"refused {refused}", flush=True)


def spawn(sources: Path, adapters: Path, rounds: int, overwrite: bool = True, widen_gap: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--child", str(sources), str(adapters), str(rounds), str(int(overwrite)),
                             str(int(widen_gap))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def leftovers(adapters: Path) -> list[str]:
    return [p.name for p in adapters.iterdir() if p.name.startswith(".") and p.name != ".grace_hooks.lock"]


def kill_loop(sources: Path, root: Path, rounds: int, rng: random.Random, widen_gap: bool = False) -> dict:
    from grace_hooks.store.packs import list_packs, load_pack

    ids = {load_pack(sources / n).pack_id: n for n in ("A", "B")}
    counts = {"rounds": rounds, "left_leftovers_at_kill": 0, "no_pack_at_kill": 0, "finished_overwrite": 0,
              "restored_old": 0, "removed_leftovers": 0, "whole_after_recovery": 0, "leftovers_after_recovery": 0,
              "missing_or_broken": 0}
    adapters = root / f"kill-{int(widen_gap)}"
    for r in tqdm(range(rounds), desc=f"kill -9 loop{' (gap widened)' if widen_gap else ''}"):
        proc = spawn(sources, adapters, -1, widen_gap=widen_gap)
        proc.stdout.readline()  # 'ready': imports done, saving starts now
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        counts["left_leftovers_at_kill"] += bool(leftovers(adapters))
        counts["no_pack_at_kill"] += not (adapters / "facts").exists()
        try:
            from grace_hooks.store.adapters_dir import recover
            from grace_hooks.store.packs import is_complete_pack  # what list_packs runs first, counted here

            for line in recover(adapters, is_complete_pack):
                kind = "finished_overwrite" if "finished" in line else "restored_old" if "restored" in line else "removed_leftovers"
                counts[kind] += 1
            names = [p.name for p in list_packs(adapters)]
            pack = load_pack(adapters / "facts")
            ok = names == ["facts"] and pack.pack_id in ids
        except Exception as exc:  # noqa: BLE001 - counted, the point of the loop
            print(f"round {r}: {type(exc).__name__}: {exc}")
            ok = False
        counts["whole_after_recovery" if ok else "missing_or_broken"] += 1
        counts["leftovers_after_recovery"] += bool(leftovers(adapters))
    return counts


def writer_rounds(sources: Path, root: Path, rounds: int, overwrite: bool) -> dict:
    from grace_hooks.store.packs import list_packs, load_pack

    counts = {"rounds": rounds, "saves_per_writer": 20, "writer_failures": 0, "refused_cleanly": 0, "whole_at_end": 0}
    for r in tqdm(range(rounds), desc=f"two writers, overwrite={overwrite}"):
        adapters = root / f"writers-{int(overwrite)}-{r}"
        procs = [spawn(sources, adapters, 20, overwrite) for _ in range(2)]
        outs = [p.communicate() for p in procs]
        for p, (out, err) in zip(procs, outs):
            if p.returncode != 0:
                counts["writer_failures"] += 1
                print(f"round {r}: writer failed: {err.strip().splitlines()[-1] if err.strip() else p.returncode}")
            else:
                counts["refused_cleanly"] += int(out.split()[-1])
        try:
            counts["whole_at_end"] += [p.name for p in list_packs(adapters)] == ["facts"] and bool(load_pack(adapters / "facts"))
        except Exception as exc:  # noqa: BLE001
            print(f"round {r}: {type(exc).__name__}: {exc}")
    return counts


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), bool(int(sys.argv[5])), bool(int(sys.argv[6])))
        return
    logging.basicConfig(level=logging.ERROR)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--writer-rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import torch

    from grace_hooks.eval.runinfo import run_record  # here, not at the top: the --child writers never need it

    torch.set_num_threads(1)  # the sources' edits are the only compute here; one thread on a shared machine
    run = run_record(REPO, 1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_sources(root / "sources")
        result = {"run": run, "kill_loop": kill_loop(root / "sources", root, args.kills, random.Random(args.seed)),
                  "kill_loop_gap_widened": kill_loop(root / "sources", root, args.kills, random.Random(args.seed), True),
                  "writers_overwrite": writer_rounds(root / "sources", root, args.writer_rounds, True),
                  "writers_no_overwrite": writer_rounds(root / "sources", root, args.writer_rounds, False)}
    result["seconds"] = round(time.perf_counter() - start, 1)  # wall time, as pack_fuzz and soak record it
    print(json.dumps({k: v for k, v in result.items() if k != "run"}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
