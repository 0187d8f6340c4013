#!/usr/bin/env python
"""What each embedded base model knows, before any edit: on the same CounterFact records, how often

- its greedy continuation of the cloze prompt (``--tokens`` tokens) names the true answer, and
- its answer to the record's direct question (the relation table's wording, grace_hooks.questions),
  asked through the chat template where the tokenizer has one, greedy to the natural stop, names it.

An editor is judged on questions a model can answer: a model that knows few facts gives "chat success"
figures that say little. Run from the repository root::

    python benchmarks/base_knowledge.py --model smollm2-135m --model gemma3-270m --model qwen2.5-coder-1.5b --n 500
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="base model (repeatable)")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "counterfact-val.json")
    p.add_argument("--n", type=int, default=500, help="the first N records of --data")
    p.add_argument("--tokens", type=int, default=8, help="greedy tokens of the cloze continuation")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "base_knowledge.json")
    return p.parse_args(argv)


def knowledge(name: str, records, args) -> dict:
    from grace_hooks import EditableModel
    from grace_hooks.eval.chat import chat_answers, question_form
    from grace_hooks.eval.generation import greedy_batch, mentions
    from grace_hooks.questions import counterfact_table

    table = counterfact_table()
    asked = [(r, q) for r in records if (q := table.questions(r)) is not None]
    start = time.perf_counter()
    with EditableModel.from_pretrained(name) as em:
        cloze = greedy_batch(em, [r.text for r, _ in asked], args.tokens, args.batch)
        answers = chat_answers(em, [q.question for _, q in asked], batch_size=args.batch)
        form = question_form(em.tokenizer)
    cloze_hits = [mentions(a, r.ground_truth) for a, (r, _) in zip(cloze, asked)]
    question_hits = [mentions(a, r.ground_truth) for a, (r, _) in zip(answers, asked)]
    return {"model": name, "records": len(asked), "question_form": form,
            "cloze_true": sum(cloze_hits) / len(asked), "question_true": sum(question_hits) / len(asked),
            "both": sum(a and b for a, b in zip(cloze_hits, question_hits)) / len(asked),
            "seconds": round(time.perf_counter() - start, 1),
            # per record, in order: a run on fewer records compares with the first ones of a longer run
            "cloze_hits": cloze_hits, "question_hits": question_hits,
            "examples": [[q.question, a, r.ground_truth] for a, (r, q) in list(zip(answers, asked))[:5]]}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from grace_hooks.eval.runinfo import loadavg, run_record
    from grace_hooks.requests import read_requests

    torch.set_num_threads(args.threads)
    record = {"run": run_record(REPO, args.threads), "data": str(args.data), "n": args.n, "rows": []}
    records = read_requests(args.data, limit=args.n)
    for name in args.model:
        row = knowledge(name, records, args)
        record["rows"].append(row)
        print(f"{name}: cloze continuation names the true answer {100 * row['cloze_true']:.1f}%, "
              f"{row['question_form']} question {100 * row['question_true']:.1f}% ({row['records']} records, "
              f"{row['seconds']:.0f} s)", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record["loadavg_end"] = loadavg()
        args.out.write_text(json.dumps(record, indent=1))  # after each model: a long run keeps what it measured
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
