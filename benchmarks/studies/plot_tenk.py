#!/usr/bin/env python
"""The 10,000-edit runs of GRACE and of the default method in one set of plots.

    python benchmarks/studies/plot_tenk.py

The default's checkpoints come from two runs with the same method settings: 1,000 and 2,000 edits
from the run whose packs were lost between sessions (its state), 5,000 and 10,000 from the run made
in one session. Writes metrics.png, seconds_per_edit.png and tokens_per_s.png (the harness's own
plots, ``grace_hooks.eval.report.plots``) into ``benchmarks/results/tenk/combined``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from grace_hooks.eval.report import plots

RESULTS = Path("benchmarks/results")


def _checkpoints(path: Path, run: str | None = None) -> list[dict]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return data["runs"][run]["checkpoints"] if run else data["checkpoints"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS / "tenk" / "combined")
    args = ap.parse_args()
    grace = _checkpoints(RESULTS / "tenk/cf10k-b100-grace/results.json", "grace")
    default = (_checkpoints(RESULTS / "tenk_partial/encore-passes2-state-3700.json")
               + _checkpoints(RESULTS / "tenk/cf10k-b100-encore-one-session/results.json", "encore"))
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"runs": {"grace": {"checkpoints": grace},
                        "encore (default; 1,000-2,000 from the earlier run)": {"checkpoints": default}}}
    for path in plots(results, args.out):
        print(path)


if __name__ == "__main__":
    main()
