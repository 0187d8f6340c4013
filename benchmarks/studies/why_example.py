#!/usr/bin/env python
"""``model.explain`` (``grace-hooks why``) on a real model: the shipped demo facts edited with the
default method into one pack and two of them again with GRACE into a second, then each fact asked
as its prompt and as a chat question, and one unrelated prompt. Writes the explanations (JSON and the
lines ``grace-hooks why`` prints) with the run record.

    python benchmarks/studies/why_example.py --model smollm2-135m --out benchmarks/results/why_smollm2.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "why_smollm2.json")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from grace_hooks import EditableModel
    from grace_hooks.eval.chat import explain_asked
    from grace_hooks.eval.runinfo import loadavg, run_record
    from grace_hooks.requests import read_requests

    facts = read_requests(REPO / "grace_hooks" / "data" / "demo_requests.json")
    questions = json.loads((REPO / "grace_hooks" / "data" / "demo_requests.json").read_text())
    em = EditableModel.from_pretrained(args.model)
    em.edit(facts, pack="demo-facts")
    em.edit(facts[2:], method="grace", pack="grace-facts")
    asked = [(f.text, False) for f in facts] + [(q["question"], True) for q in questions]
    asked.append(("The Great Wall of China is located in the country of", False))
    rows = []
    for text, chat in asked:
        t = time.perf_counter()
        why = explain_asked(em, text, chat, args.max_new_tokens)
        rows.append({"asked": text, "chat": chat, "seconds": round(time.perf_counter() - t, 2),
                     "lines": why.lines(), "explanation": why.to_dict()})
        print(f"$ grace-hooks why {text!r}{' --chat' if chat else ''}\n" + "\n".join(why.lines()) + "\n", flush=True)
    em.close()
    record = {"run": run_record(REPO, args.threads), "model": args.model, "packs": ["demo-facts (default method, 4 facts)",
              "grace-facts (grace, the last 2 facts)"], "rows": rows, "loadavg_end": loadavg()}
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
