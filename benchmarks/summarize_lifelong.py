#!/usr/bin/env python
"""Gather lifelong-benchmark result folders into benchmarks/results-pages/methods.md and benchmarks/results/lifelong/.

Each row of the table is one method spec of one run, with a note of the command that made it;
runs on the same data and batch size share plots (metric vs edits, seconds per edit, tokens/s).

    python benchmarks/summarize_lifelong.py results/cf1000-b1-grace results/cf1000-b1-baselines ...
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from grace_hooks.eval.report import COLUMNS, fmt, plots
from grace_hooks.eval.runinfo import replace_md_section

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Lifelong editing (issue 3): SmolLM2-135M, sequential edits"
KEEP = ("results.json", "results.md", "metrics.png", "seconds_per_edit.png", "tokens_per_s.png")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="result folders written by grace-hooks eval")
    p.add_argument("--dest", type=Path, default=REPO / "benchmarks" / "results" / "lifelong")
    p.add_argument("--results-md", type=Path, default=REPO / "benchmarks" / "results-pages" / "methods.md")
    p.add_argument("--intro", default="", help="text placed above the tables")
    p.add_argument("--section", default=SECTION, help="the heading (whole line) of --results-md whose section is replaced")
    args = p.parse_args(argv)

    groups: dict[tuple[str, int], dict] = {}
    commands: list[str] = []
    rows = []
    for run in args.runs:
        res = json.loads((run / "results.json").read_text(encoding="utf-8"))
        meta = res["meta"]
        copy = args.dest / run.name
        copy.mkdir(parents=True, exist_ok=True)
        for name in KEEP:
            if (run / name).is_file():
                shutil.copy2(run / name, copy / name)
        commands.append(meta["command"])
        key = (Path(meta["data"]).name, meta["batch"])
        group = groups.setdefault(key, {"runs": {}})
        for label, r in {**_unfinished(run, res), **res["runs"]}.items():
            if not r.get("checkpoints"):
                continue
            if label in group["runs"]:  # the same spec in another run of this data and batch size
                label = f"{label} [{len(commands)}]"
            group["runs"][label] = r
            last = r["checkpoints"][-1]
            partial = "" if last["edits"] == meta["n_records"] else f" (stopped at {last['edits']})"
            rows.append({"data": key[0], "batch": key[1], "label": label + partial, "cmd": len(commands), "last": last,
                         "wall_minutes": _minutes(r), "load": r.get("adapters_load_seconds")})

    lines = [args.intro.strip(), ""] if args.intro.strip() else []
    for key in sorted({(r["data"], r["batch"]) for r in rows}):
        data, batch = key
        slug = f"{Path(data).stem}-b{batch}"
        (args.dest / slug).mkdir(parents=True, exist_ok=True)
        plots(groups[key], args.dest / slug)
        group_rows = [r for r in rows if (r["data"], r["batch"]) == key]
        lines += [f"### {data}, batch {batch}", "",
                  "| method | edits | " + " | ".join(c[0] for c in COLUMNS) + " | run minutes | cmd |",
                  "|---|" + "---:|" * (len(COLUMNS) + 3)]
        for r in group_rows:
            cells = [fmt(r["last"].get(k), kind) for _, k, kind in COLUMNS]
            lines.append(f"| {r['label']} | {r['last']['edits']} | " + " | ".join(cells)
                         + f" | {r['wall_minutes']:.0f} | ({r['cmd']}) |")
        rel = Path(os.path.relpath(args.dest / slug, args.results_md.parent)).as_posix()  # ../results/... from results-pages/
        lines += ["", f"Plots: [metrics vs edits]({rel}/metrics.png), [seconds per edit]({rel}/seconds_per_edit.png), "
                  f"[tokens/s]({rel}/tokens_per_s.png).", ""]
    copies = args.dest.resolve().relative_to(REPO) if args.dest.resolve().is_relative_to(REPO) else args.dest
    lines += ["Commands (run from the repository root; each wrote `results.json`, `results.md` and plots, "
              f"copied under `{copies}/`):", ""]
    lines += [f"{i}. `{c}`" for i, c in enumerate(commands, 1)]
    replace_md_section(args.results_md, args.section, "\n".join(lines))


def _unfinished(run: Path, res: dict) -> dict:
    """Specs of ``run`` that have checkpoints in their state but no result yet (an interrupted run)."""
    out = {}
    for state_path in sorted(run.glob("*/state.json")):
        label = state_path.parent.name
        if label not in res["runs"]:
            state = json.loads(state_path.read_text(encoding="utf-8"))
            out[label] = {"checkpoints": state["checkpoints"], "harness_config": state["signature"]["config"]}
    return out


def _minutes(run: dict) -> float:
    """Edit time plus evaluation time of one spec, from its checkpoints."""
    cks = run["checkpoints"]
    edit_seconds = cks[-1]["seconds_per_edit_mean"] * cks[-1]["edits"]
    return (edit_seconds + sum(c["eval_seconds"] for c in cks)) / 60


if __name__ == "__main__":
    main()
