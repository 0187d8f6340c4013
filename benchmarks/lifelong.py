#!/usr/bin/env python
"""Lifelong-editing benchmark (the same as ``grace-hooks eval``), with the shared CounterFact file
as the default data. Options: ``python benchmarks/lifelong.py --help``; see benchmarks/README.md.

Example (from the repository root)::

    python benchmarks/lifelong.py --method grace --method ft --method none --batch 1
"""
import sys
from pathlib import Path

from grace_hooks.cli import main

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact-train.json"

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--data" not in args and not any(a.startswith("--data=") for a in args) and "--help" not in args:
        args += ["--data", str(DEFAULT_DATA)]
    sys.argv = ["grace-hooks", "eval", *args]  # recorded in results.json as the command that made them
    main(["eval", *args])
