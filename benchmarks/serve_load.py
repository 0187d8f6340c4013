#!/usr/bin/env python
"""Throughput and latency of ``grace-hooks serve``, with 0 edits and with packs loaded, and the time
from ``POST /v1/packs`` to the edit being live.

    python benchmarks/serve_load.py --packs-from ../main/benchmarks/results/tenk/cf10k-b100-grace/grace/adapters

The server runs in this process on a free localhost port (uvicorn in a thread, the same app as
``grace-hooks serve``, with its side copy for edits); ``--clients`` threads each send ``--requests``
chat completions with the official openai client (greedy, ``--max-tokens`` tokens at most), one
after another: a bounded load loop. The questions are the prompts of the first CounterFact records
(the records the 1,000-edit packs of the 10,000-edit run edited first, so their keys fire). For each
``--packs-from`` folder, the oldest packs holding ``--edits`` edits in all are copied into the
served folder and picked up by a folder sync, and the loop runs again. Then a one-fact GRACE pack
is POSTed twice: with the server idle, and while the clients keep it busy; the time is from sending
the POST until its answer (the edit is live when the answer comes), checked by asking the edited
question. ``--overhead N`` first answers N questions both through the server (one client) and with
``generate`` in process, alternating, for what the server itself costs. Prints a markdown table;
writes ``benchmarks/results/serve_load.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import openai
import torch

from grace_hooks import EditableModel
from grace_hooks.eval.runinfo import run_record
from grace_hooks.requests import read_requests
from grace_hooks.serve import ServeConfig, create_app, running
from grace_hooks.store.packs import read_header, reading

REPO = Path(__file__).resolve().parents[1]
FACT = {"prompt": "The capital of {} is", "subject": "Freedonia", "target_new": "Zorbatown"}


def copy_packs(source: Path, dest: Path, edits: int) -> int:
    """Copy the oldest packs of ``source`` into ``dest`` until they hold ``edits`` edits; returns how many."""
    total = 0
    with reading(source) as paths:  # under the source's lock: a run still writing there is not disturbed
        for path in paths:
            if total >= edits:
                break
            shutil.copytree(path, dest / path.name)
            total += len(read_header(path).requests)
    return total


def load_loop(client: openai.OpenAI, model: str, questions: list[str], clients: int, per_client: int,
              max_tokens: int) -> dict:
    """``clients`` threads, each asking ``per_client`` questions in turn; every latency and the wall time."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        for i in range(per_client):
            text = questions[(k * per_client + i) % len(questions)]
            t0 = time.perf_counter()
            try:
                client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                               max_tokens=max_tokens, temperature=0)
            except openai.OpenAIError as exc:
                errors.append(str(exc))
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"requests": len(latencies), "errors": errors, "wall_s": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 3),
            "median_latency_s": round(statistics.median(latencies), 3) if latencies else None,
            "p90_latency_s": round(statistics.quantiles(latencies, n=10)[-1], 3) if len(latencies) >= 2 else None}


def time_to_live(url: str, client: openai.OpenAI, model: str, name: str) -> dict:
    """Seconds from sending POST /v1/packs (one GRACE fact) to its answer, and whether the edit then answers."""
    import urllib.request

    body = json.dumps({"name": name, "method": "grace", "requests": [FACT]}).encode()
    req = urllib.request.Request(url + "/v1/packs", data=body, method="POST", headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        info = json.loads(resp.read())
    seconds = time.perf_counter() - t0
    answer = client.completions.create(model=model, prompt="The capital of Freedonia is", max_tokens=4,
                                       temperature=0).choices[0].text
    return {"post_to_live_s": round(seconds, 3), "server_timings_s": info["timings_s"], "answer": answer,
            "live": FACT["target_new"] in answer}


def overhead(model: EditableModel, client: openai.OpenAI, name: str, questions: list[str], max_tokens: int) -> dict:
    """Seconds of one chat answer through the server (one client) against ``generate`` on the same
    model in this process, alternating question by question so machine noise hits both alike."""
    from grace_hooks.eval.chat import end_of_turn_ids

    tok = model.tokenizer
    direct, served = [], []
    for q in questions:
        ids = tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False, return_tensors="pt")
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=end_of_turn_ids(tok),
                           pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        direct.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": q}], max_tokens=max_tokens,
                                       temperature=0)
        served.append(time.perf_counter() - t0)
    return {"questions": len(questions), "direct_median_s": round(statistics.median(direct), 3),
            "served_median_s": round(statistics.median(served), 3),
            "served_over_direct": round(statistics.median(s / d for s, d in zip(served, direct)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/counterfact-train.json")
    ap.add_argument("--packs-from", type=Path, action="append", default=[], help="adapters folder to take packs from (repeatable)")
    ap.add_argument("--edits", type=int, default=1000, help="edits to load from each --packs-from folder")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=8, help="requests per client in each load loop")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--overhead", type=int, default=0, help="first, this many questions answered directly and through the server")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_load.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = run_record(REPO, args.threads)

    questions = [r.text for r in read_requests(args.data, limit=args.clients * args.requests)]
    model, workshop = EditableModel.from_pretrained(args.model), EditableModel.from_pretrained(args.model)
    folder = Path(tempfile.mkdtemp(prefix="serve_load-"))
    app = create_app(model, folder, ServeConfig(model_id=args.model, watch_s=0), workshop=workshop)
    live = app.state.grace.live
    rows, record = [], {"run": run, "args": {k: str(v) for k, v in vars(args).items()}, "phases": []}
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)  # warm-up
        if args.overhead:
            record["overhead"] = overhead(model, client, args.model, questions[:args.overhead], args.max_tokens)
            print(f"one answer through the server vs generate() in process: {record['overhead']}", flush=True)
        sources = [None] + args.packs_from
        for source in sources:
            for p in [p for p in folder.iterdir() if not p.name.startswith(".")]:
                shutil.rmtree(p)
            edits = 0 if source is None else copy_packs(source, folder, args.edits)
            t0 = time.perf_counter()
            live.sync_with_folder()
            load_s = time.perf_counter() - t0
            assert sum(p.n_edits for p in model.packs) == edits
            loop = load_loop(client, args.model, questions, args.clients, args.requests, args.max_tokens)
            phase = {"edits": edits, "source": str(source), "sync_load_s": round(load_s, 2)} | loop
            record["phases"].append(phase)
            rows.append(f"| {edits:,} | {loop['requests_per_s']} | {loop['median_latency_s']} | {loop['p90_latency_s']} "
                        f"| {len(loop['errors'])} |")
            print(rows[-1], flush=True)
        idle = time_to_live(url, client, args.model, "fact-idle")
        busy_loop: dict = {}
        loader = threading.Thread(target=lambda: busy_loop.update(
            load_loop(client, args.model, questions, args.clients, args.requests, args.max_tokens)))
        loader.start()
        time.sleep(1.0)  # the clients are under way
        busy = time_to_live(url, client, args.model, "fact-busy")
        loader.join()
        record["post_to_live"] = {"idle": idle, "under_load": busy, "load_meanwhile": busy_loop,
                                  "edits_loaded": sum(p.n_edits for p in model.packs) - 2}
    shutil.rmtree(folder, ignore_errors=True)
    print("\n| edits loaded | requests/s | median latency (s) | p90 latency (s) | errors |\n|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nPOST /v1/packs (1 GRACE fact) to live: idle {idle['post_to_live_s']} s (server: {idle['server_timings_s']}), "
          f"under load {busy['post_to_live_s']} s (server: {busy['server_timings_s']}); live: {idle['live']}, {busy['live']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
