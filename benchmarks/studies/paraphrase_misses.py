#!/usr/bin/env python
"""Why greedy decoding of a paraphrase misses the new target (issue 16): edit the first N records in
one call with the default method, then read each paraphrase's next-token distribution and its
greedy continuation, edited and unedited.

    python benchmarks/studies/paraphrase_misses.py --model smollm2-135m --n 100 --json benchmarks/results/paraphrase_misses.json

Per paraphrase: the rank and probability of the target's first token, and of the old answer's; the
greedy continuation (the target's length + 12 tokens) sorted into: starts with the target, names
it later (a lead-up: "is incredible at playing the piano"), starts with the old answer, other.
C0 from CounterFact sentences of records 500-1,499, as ``norm_aware_solve.py``.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from grace_hooks import EditableModel
from grace_hooks.eval.generation import greedy_batch, mentions, reaches
from grace_hooks.eval.runinfo import run_record
from grace_hooks.tokens import target_text

from common import edit_bench, usable_requests

EXTRA_TOKENS = 12
REPO = Path(__file__).resolve().parents[2]


def _first_token(tok, prompt: str, answer: str) -> int:
    """The id of the answer's first token as it continues the prompt."""
    ids = tok(prompt + target_text(prompt, answer))["input_ids"]
    return ids[len(tok(prompt)["input_ids"])]


@torch.inference_mode()
def _next_token(em, prompts: list[str], batch_size: int = 16) -> torch.Tensor:
    """(n, vocab) next-token probabilities after each prompt (left padding)."""
    tok = em.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True).to(em.device)
            out.append(em(**enc).logits[:, -1].float().softmax(-1).cpu())
    finally:
        tok.padding_side = side
    return torch.cat(out)


def _read(em, reqs) -> dict:
    tok = em.tokenizer
    prompts = [r.rephrase_prompt for r in reqs]
    probs = _next_token(em, prompts)
    new = torch.tensor([_first_token(tok, p, r.target_new) for p, r in zip(prompts, reqs)])
    old = torch.tensor([_first_token(tok, p, r.ground_truth) for p, r in zip(prompts, reqs)])
    rows = torch.arange(len(reqs))
    p_new, p_old = probs[rows, new], probs[rows, old]
    rank_new = (probs > p_new[:, None]).sum(1) + 1
    lengths = [len(tok(target_text(p, r.target_new), add_special_tokens=False)["input_ids"]) + EXTRA_TOKENS
               for p, r in zip(prompts, reqs)]
    answers = greedy_batch(em, prompts, lengths)
    kinds = []
    for a, r in zip(answers, reqs):
        kinds.append("starts with the target" if reaches(a, r.target_new) else
                     "names it later" if mentions(a, r.target_new) else
                     "starts with the old answer" if reaches(a, r.ground_truth) else "other")
    n = len(reqs)
    return {
        "first_token_new_above_old": float((p_new > p_old).float().mean()),
        "first_token_new_top1": float((rank_new == 1).float().mean()),
        "first_token_new_top5": float((rank_new <= 5).float().mean()),
        "first_token_new_rank_median": float(rank_new.float().median()),
        "first_token_new_prob_median": float(p_new.median()),
        "first_token_old_prob_median": float(p_old.median()),
        "greedy": {k: sum(x == k for x in kinds) / n for k in
                   ("starts with the target", "names it later", "starts with the old answer", "other")},
        "examples": [[r.rephrase_prompt, r.target_new, a] for r, a in list(zip(reqs, answers))[:8]],
        "_ranks": rank_new.tolist(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/counterfact-train.json")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", dest="overrides", default="", help="method options, e.g. target_prefixes=5")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/paraphrase_misses.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = run_record(REPO, args.threads)
    em = EditableModel.from_pretrained(args.model)
    records = usable_requests(args.data, 1500)
    reqs = [r for r in records[: args.n] if r.rephrase_prompt]
    with em.disabled():
        base = _read(em, reqs)
    edit_bench(em, reqs, records, args.overrides)
    edited = _read(em, reqs)
    em.remove_pack("bench")
    ranks = edited.pop("_ranks")
    base.pop("_ranks")
    # each row its own run record: rows of earlier runs accumulate in the same file
    row = {"run": run, "model": args.model, "data": args.data, "n": len(reqs), "options": args.overrides,
           "edited": edited, "base": base,
           "edited_rank_quartiles": statistics.quantiles(ranks, n=4) if len(ranks) > 1 else ranks}
    print(json.dumps({k: v for k, v in row.items() if k != "run"}, indent=1))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(args.json.read_text())["rows"] if args.json.exists() else []
    args.json.write_text(json.dumps({"rows": rows + [row]}, indent=2))


if __name__ == "__main__":
    main()
