"""Do GRACE answers end where the answer ends? (issue 18)

Edits N CounterFact records whose new target is given a made-up multi-token name (so the model
cannot know how it continues), with GRACE's ``end_answer`` off (before) and on (now), and decodes
each prompt greedily for ``--tokens`` tokens. Counts:
- ``reached``: the continuation starts with the target;
- ``repeats``: the target is followed by its own last token again ("Zorbatown" + "own" ...);
- ``ends_like_base``: the token after the target is the base model's own next token after
  prompt + target (what the edit should let come next).

    python benchmarks/studies/answer_end.py --n 50 --json benchmarks/results/answer_end.json
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from grace_hooks import EditableModel, EditRequest, read_requests
from grace_hooks.eval.generation import greedy_batch
from grace_hooks.eval.runinfo import run_record

REPO = Path(__file__).resolve().parents[2]

SYLLABLES = ["zor", "ba", "tel", "vix", "mun", "dra", "qua", "pel", "rish", "ton", "gar", "lem"]


def made_up_name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/counterfact-train.json")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = run_record(REPO, args.threads)
    rng = random.Random(0)
    reqs = [EditRequest(prompt=r.prompt, subject=r.subject, target_new=made_up_name(rng))
            for r in read_requests(args.data, limit=args.n)]
    em = EditableModel.from_pretrained(args.model)
    prompts = [r.text for r in reqs]
    last_piece = [em.tokenizer.decode(em.tokenizer(" " + r.target_new, add_special_tokens=False).input_ids[-1]) for r in reqs]
    base_next = greedy_batch(em, [p + " " + r.target_new for p, r in zip(prompts, reqs)], 1)
    result = {"run": run, "n": len(reqs), "model": args.model, "tokens": args.tokens, "runs": {}}
    for label, end_answer in (("before (end_answer=False)", False), ("now (end_answer=True)", True)):
        t0 = time.perf_counter()
        em.edit(reqs, method="grace", pack="run", end_answer=end_answer)
        seconds = time.perf_counter() - t0
        answers = greedy_batch(em, prompts, args.tokens)
        em.remove_pack("run")
        reached = [a.strip().startswith(r.target_new) for a, r in zip(answers, reqs)]
        repeats = [ok and a.strip()[len(r.target_new):].startswith(last) for a, r, last, ok in zip(answers, reqs, last_piece, reached)]
        ends = [ok and a.strip()[len(r.target_new):].startswith(nxt) for a, r, nxt, ok in zip(answers, reqs, base_next, reached)]
        result["runs"][label] = {"reached": sum(reached), "repeats": sum(repeats), "ends_like_base": sum(ends),
                                 "edit_seconds": seconds, "examples": [[p, a] for p, a in zip(prompts[:5], answers[:5])]}
        print(f"{label}: reached {sum(reached)}/{len(reqs)}, repeats its last piece {sum(repeats)}, next token as the base's "
              f"{sum(ends)}, edit {seconds:.1f} s")
        for p, a in zip(prompts[:3], answers[:3]):
            print(f"   {p!r} -> {a!r}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
