#!/usr/bin/env python
"""The default method's edits of the first N records in one call, each read back at once: whether
greedy decoding of the prompt and of its paraphrase now starts with the target, plus the pack's own
figures (z reached, landed, seconds per phase). Rolled back after.

    python benchmarks/studies/norm_aware_solve.py --model gemma3-270m --n 20 --json benchmarks/results/norm_aware_solve.json

C0 comes from CounterFact sentences beyond the edited records (records 500-1,499: sampling the
model's own text takes about 20 minutes on Gemma here). With ``--chat`` it also asks each prompt
and paraphrase in chat form, answered to the natural stop. ``--set`` passes method options:

    python benchmarks/studies/norm_aware_solve.py --model smollm2-135m --n 100 --chat --set chat_form=true --json OUT.json

The name is from its first use: on Gemma 3, whose MLP output reaches the residual stream through a
norm, it compared a solve taken as is with one aimed through that norm (rows up to commit 4b12318);
the update is now added after the norm (architectures.ArchSpec.written_at), so there is one solve.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from grace_hooks import EditableModel
from grace_hooks.bases import architectures
from grace_hooks.bases.architectures import Site
from grace_hooks.cli.took import target_token_count
from grace_hooks.eval.chat import chat_answers, chat_success
from grace_hooks.eval.generation import greedy_batch, reaches
from grace_hooks.eval.runinfo import run_record

from common import edit_bench, usable_requests

REPO = Path(__file__).resolve().parents[2]


def _answers(em, prompts, reqs):
    lengths = [target_token_count(em.tokenizer, p, r.target_new) for p, r in zip(prompts, reqs)]
    return [reaches(a, r.target_new) for a, r in zip(greedy_batch(em, prompts, lengths, batch_size=16), reqs)]


def _chat(em, prompts, reqs):
    """Asked in chat form, answered to the natural stop: does the answer hold the target (issue 18's metric)."""
    return chat_success(chat_answers(em, prompts, batch_size=16), [r.target_new for r in reqs])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--data", default="../shared/data/counterfact-train.json")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", dest="overrides", default="", help="method options, e.g. layers=2-6 or passes=3 "
                                                                 "(sweeps over the edited blocks)")
    ap.add_argument("--chat", action="store_true", help="also ask each prompt and paraphrase in chat form, answered "
                                                         "to the natural stop (issue 18's chat success)")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/norm_aware_solve.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = run_record(REPO, args.threads)
    em = EditableModel.from_pretrained(args.model)
    records = usable_requests(args.data, 1500)
    reqs = records[: args.n]
    rows = []
    edit_bench(em, reqs, records, args.overrides)
    metrics = em.pack("bench").metrics
    prompt = _answers(em, [r.text for r in reqs], reqs)
    para = _answers(em, [r.rephrase_prompt for r in reqs], reqs)
    chat = _chat(em, [r.text for r in reqs], reqs) if args.chat else []
    chat_para = _chat(em, [r.rephrase_prompt for r in reqs], reqs) if args.chat else []
    em.remove_pack("bench")
    # each row its own run record: rows of earlier runs (other commits) accumulate in the same file
    rows.append({"run": run, "solve": "after the norm" if architectures.arch_spec(em.base_model).written_at else "as is",
                 "data": args.data, "options": args.overrides, "n": len(reqs),
                 "layers": [Site.parse(s).layer for s in metrics["layers"]],
                 "greedy_prompt": sum(prompt) / len(reqs), "greedy_paraphrase": sum(para) / len(reqs),
                 **({"chat_prompt": sum(chat) / len(reqs), "chat_paraphrase": sum(chat_para) / len(reqs)}
                    if args.chat else {}),
                 "landed_share": metrics["landed_share"],
                 "z_reached_mean": metrics["z_reached_mean"], "target_prob_mean": metrics["target_prob_mean"],
                 "target_steps_mean": metrics["target_steps_mean"], "seconds": metrics["seconds"]})
    print(json.dumps({k: v for k, v in rows[-1].items() if k != "run"}), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    if args.json.exists():  # one file for every run of the script: rows accumulate
        rows = json.loads(args.json.read_text())["rows"] + rows
    args.json.write_text(json.dumps({"model": args.model, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
