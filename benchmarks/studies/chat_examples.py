#!/usr/bin/env python
"""The unedited model's chat answers to a few records' questions (the base column of the example
tables in benchmarks/results-pages/; lifelong runs now record it themselves).

    python benchmarks/studies/chat_examples.py --model gemma3-270m --data ../shared/data/zsre-train-1k.json --records 0,2,4
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from grace_hooks import EditableModel, read_requests
from grace_hooks.eval.chat import chat_answers
from grace_hooks.eval.runinfo import run_record

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/zsre-train-1k.json")
    ap.add_argument("--records", default="0,2,4", help="record indices, comma-separated")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = run_record(REPO, args.threads)
    rows = [int(i) for i in args.records.split(",")]
    records = read_requests(args.data, limit=max(rows) + 1)
    reqs = [records[i] for i in rows]
    em = EditableModel.from_pretrained(args.model)
    questions = [r.text for r in reqs] + [r.rephrase_prompt for r in reqs if r.rephrase_prompt]
    answers = chat_answers(em, questions)
    print(json.dumps({"run": run, "model": args.model, "targets": [r.target_new for r in reqs],
                      "answers": [[q, a] for q, a in zip(questions, answers)]}, indent=1))


if __name__ == "__main__":
    main()
