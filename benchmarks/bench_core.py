#!/usr/bin/env python
"""Core benchmark (issue 2): GRACE edit packs on the embedded SmolLM2-135M, CPU.

Measures, in one process and one run:

a. seconds per edit for ``method="grace"`` (default config): one call with a batch of
   ``--a-size`` requests, and ``--a-size`` calls with one request each;
b. greedy generation throughput (batch size 1, ``--max-new-tokens`` tokens, a fixed set of
   unrelated and edited prompts) with 0, 100 and ``--n-edits`` real GRACE edits loaded, against
   the base model (``with model.disabled():``) timed in the same run in alternating rounds; the
   edits are made in calls of ``--batch`` CounterFact records (one pack per call), also timed;
c. the extra load time of an adapters folder holding all the packs over a plain load, and the
   bytes on disk per edit;
d. greedy success (the generation starts with the new target) on every edited prompt with all
   edits loaded, and the share of unrelated prompts whose logits are bit-identical to the base's.

Writes ``<out>/results.json``, prints markdown tables and puts them into
``benchmarks/results-pages/methods.md`` under "## Core (issue 2): GRACE on SmolLM2-135M" (replacing an
earlier version of that section).

Example (from the repository root)::

    python benchmarks/bench_core.py --n-edits 1000 --batch 100
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import torch  # noqa: E402

from grace_hooks.eval.generation import generate_one, reaches  # noqa: E402
from grace_hooks.eval.runinfo import dir_bytes, loadavg, median, replace_md_section, run_record  # noqa: E402
SECTION = "## Core (issue 2): GRACE on SmolLM2-135M"
MODEL = "smollm2-135m"

# Fixed prompts for the generation timing: text unrelated to any CounterFact record ...
UNRELATED_PROMPTS = [
    "The history of the Roman Empire began",
    "To bake a loaf of bread, you first need to",
    "In computer science, a hash table is",
    "The weather forecast for tomorrow says that",
]
# ... and this many edited CounterFact prompts (the first records, edited at every level > 0).
N_EDITED_PROMPTS = 4

log = logging.getLogger("bench_core")


def progress(*args, **kwargs):
    """tqdm bars that refresh at most every few seconds (the log of a long run stays small)."""
    from tqdm import tqdm

    return tqdm(*args, mininterval=5.0, **kwargs)


# ---------------------------------------------------------------------------------------- helpers
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "counterfact-train.json",
                   help="CounterFact records (EasyEdit layout); default ../shared/data/counterfact-train.json from the repo root")
    p.add_argument("--n-edits", type=int, default=1000, help="edits loaded at the largest level of (b), (c), (d)")
    p.add_argument("--batch", type=int, default=100, help="records per edit() call (one pack each) when building the edits")
    p.add_argument("--levels", type=int, nargs="+", default=[0, 100],
                   help="edit counts at which generation is timed, besides --n-edits")
    p.add_argument("--a-size", type=int, default=20, help="requests for the edit-timing part (a)")
    p.add_argument("--rounds", type=int, default=3, help="alternating edited/base timing rounds per level")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--load-repeats", type=int, default=3, help="repeats of the load timing (c)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch and FAISS threads; 1 by default because on a shared 2-core machine 2 OpenMP threads "
                        "stall whenever another process holds a core")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "core", help="results folder")
    p.add_argument("--results-md", type=Path, default=REPO / "benchmarks" / "results-pages" / "methods.md",
                   help="markdown file whose core section is written")
    p.add_argument("--no-results-md", action="store_true", help="do not touch --results-md (development runs)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------- generation
def prompt_logits(model, text: str):
    with torch.inference_mode():
        return model(**model.tokenizer(text, return_tensors="pt").to(model.device)).logits


def time_generation(m, prompts: list[dict], rounds: int, level: int, max_new_tokens: int) -> dict:
    """Alternating rounds of (edited, base) / (base, edited) over every prompt; medians and ratios."""
    # warm-up: one generation per mode (allocator, caches), not timed
    generate_one(m, prompts[0]["text"], 4, fixed_length=True)
    with m.disabled():
        generate_one(m, prompts[0]["text"], 4, fixed_length=True)
    per_round = {"edited": [], "base": []}
    per_prompt = {"edited": [[] for _ in prompts], "base": [[] for _ in prompts]}
    outputs = {}
    bar = progress(total=rounds * 2 * len(prompts), desc=f"generate @ {level} edits", unit="gen", leave=False)
    for r in range(rounds):
        order = ("edited", "base") if r % 2 == 0 else ("base", "edited")
        for mode in order:
            ctx = m.disabled() if mode == "base" else contextlib.nullcontext()
            secs = toks = 0
            with ctx:
                for i, p in enumerate(prompts):
                    res = generate_one(m, p["text"], max_new_tokens, fixed_length=True)
                    secs += res.seconds
                    toks += len(res.ids)
                    per_prompt[mode][i].append(res.seconds)
                    outputs.setdefault(mode, {})[i] = res.ids, res.text
                    bar.update()
            per_round[mode].append({"seconds": secs, "tokens": toks, "tokens_per_s": toks / secs})
    bar.close()
    ratios = [e["seconds"] / b["seconds"] for e, b in zip(per_round["edited"], per_round["base"])]
    out = {
        "edits_loaded": level, "rounds": rounds, "order": "round k: edited first if k even, base first if k odd",
        "tokens_per_round": per_round["edited"][0]["tokens"],
        "edited": {"median_seconds": median([x["seconds"] for x in per_round["edited"]]),
                   "median_tokens_per_s": median([x["tokens_per_s"] for x in per_round["edited"]]),
                   "rounds": per_round["edited"]},
        "base": {"median_seconds": median([x["seconds"] for x in per_round["base"]]),
                 "median_tokens_per_s": median([x["tokens_per_s"] for x in per_round["base"]]),
                 "rounds": per_round["base"]},
        "ratio_edited_over_base_seconds": {"per_round": ratios, "median_of_paired": median(ratios)},
        "prompts": [],
    }
    out["ratio_edited_over_base_seconds"]["of_medians"] = out["edited"]["median_seconds"] / out["base"]["median_seconds"]
    for i, p in enumerate(prompts):
        e_ids, e_text = outputs["edited"][i]
        b_ids, b_text = outputs["base"][i]
        row = {"kind": p["kind"], "text": p["text"], "edited_generation": e_text, "base_generation": b_text,
               "same_tokens_as_base": e_ids == b_ids,
               "median_seconds": {"edited": median(per_prompt["edited"][i]), "base": median(per_prompt["base"][i])}}
        if p.get("target"):
            row["target"] = p["target"]
            row["edited_starts_with_target"] = reaches(e_text, p["target"])
            row["base_starts_with_target"] = reaches(b_text, p["target"])
            row["edited_at_this_level"] = p["record_index"] < level
        out["prompts"].append(row)
    log.info("generation @ %d edits: edited %.1f tok/s, base %.1f tok/s, ratio (paired median) %.3f",
             level, out["edited"]["median_tokens_per_s"], out["base"]["median_tokens_per_s"], out["ratio_edited_over_base_seconds"]["median_of_paired"])
    return out


# ---------------------------------------------------------------------------------------- parts
def part_a(model, reqs, size: int) -> dict:
    """Seconds per edit: one call with ``size`` requests vs ``size`` calls with one each."""
    reqs = reqs[:size]
    # warm-up edit (first autograd pass, allocator): not timed
    info = model.edit(reqs[:1], pack="bench-warmup", n_iter=1)
    model.remove_pack(info.name)

    t0 = time.perf_counter()
    info = model.edit(reqs, pack="bench-a-batch")
    batch_s = time.perf_counter() - t0
    batch_metrics = model.pack(info.name).metrics
    model.remove_pack(info.name)
    log.info("(a) one call with %d requests: %.1f s (%.2f s/edit)", size, batch_s, batch_s / size)

    singles, single_metrics = [], []
    for i, r in enumerate(progress(reqs, desc="(a) single-request edits", unit="edit", leave=False)):
        t0 = time.perf_counter()
        info = model.edit([r], pack=f"bench-a-single-{i:03d}")
        singles.append(time.perf_counter() - t0)
        single_metrics.append(model.pack(info.name).metrics)
    for p in [p.name for p in model.packs]:
        model.remove_pack(p)
    log.info("(a) %d calls with 1 request: median %.2f s, total %.1f s", size, median(singles), sum(singles))
    return {
        "n_requests": size, "records": [0, size],
        "note": "the single-request calls run one after another, each with the previous ones loaded (lifelong editing); "
                "all packs are removed afterwards",
        "batch_call": {"seconds": batch_s, "seconds_per_edit": batch_s / size, "metrics": batch_metrics},
        "single_calls": {"seconds": singles, "median_seconds_per_edit": median(singles), "total_seconds": sum(singles),
                         "mean_seconds_per_edit": sum(singles) / size,
                         "iterations": [m_["iterations"] for m_ in single_metrics],
                         "teacher_forced_success": [m_["teacher_forced_success"] for m_ in single_metrics]},
    }


def build_edits(model, reqs, start: int, stop: int, batch: int, build: list, bar) -> None:
    for a in range(start, stop, batch):
        b = min(a + batch, stop)
        la = loadavg()
        t0 = time.perf_counter()
        info = model.edit(reqs[a:b], pack=f"bench-cf-{a:05d}-{b:05d}")
        secs = time.perf_counter() - t0
        metrics = model.pack(info.name).metrics
        build.append({"pack": info.name, "records": [a, b], "seconds": secs, "seconds_per_edit": secs / (b - a),
                      "nbytes_tensors": info.nbytes, "metrics": metrics, "loadavg_before": la})
        bar.update(b - a)
        bar.set_postfix(last_call_s=f"{secs:.0f}", tf_success=f"{metrics['teacher_forced_success']:.2f}")
        log.info("edit call records %d-%d: %.1f s, %s", a, b, secs, metrics)


def part_c(model, n_edits: int, repeats: int, workdir: Path) -> dict:
    from grace_hooks import EditableModel

    adapters = workdir / "adapters"
    t0 = time.perf_counter()
    for p in model.packs:
        model.save_pack(p.name, adapters)
    save_s = time.perf_counter() - t0
    disk = dir_bytes(adapters)
    plain, with_adapters, loaded_info = [], [], None
    for _ in range(repeats):  # interleaved: plain, adapters, plain, adapters, ...
        t0 = time.perf_counter()
        m0 = EditableModel.from_pretrained(MODEL)
        plain.append(time.perf_counter() - t0)
        m0.close()
        del m0
        if loaded_info is not None:
            loaded_info.close()
        t0 = time.perf_counter()
        loaded_info = EditableModel.from_pretrained(MODEL, adapters=adapters)
        with_adapters.append(time.perf_counter() - t0)
    # the reloaded model must behave exactly as the in-memory one on an edited prompt
    tok = model.tokenizer
    probe = model.pack(model.packs[0].name).requests[0]
    text = probe["prompt"].replace("{}", probe["subject"]) if "{}" in probe["prompt"] else probe["prompt"]
    enc = tok(text, return_tensors="pt")
    with torch.inference_mode():
        same = bool(torch.equal(model(**enc).logits, loaded_info(**enc).logits))
    n_packs = len(loaded_info.packs)
    n_loaded = sum(p.n_edits for p in loaded_info.packs)
    loaded_info.close()
    extra = [a - b for a, b in zip(with_adapters, plain)]
    res = {
        "n_packs": n_packs, "n_edits": n_loaded, "save_seconds": save_s,
        "plain_load_seconds": plain, "adapters_load_seconds": with_adapters,
        "median_plain_load_seconds": median(plain), "median_adapters_load_seconds": median(with_adapters),
        "extra_load_seconds_paired": extra, "median_extra_load_seconds": median(extra),
        "extra_load_seconds_per_edit": median(extra) / max(n_loaded, 1),
        "disk_bytes": disk, "disk_bytes_per_edit": disk["total"] / max(n_loaded, 1),
        "tensor_bytes_per_edit": sum(p.nbytes for p in model.packs) / max(n_edits, 1),
        "reloaded_logits_equal_in_memory": same,
    }
    log.info("(c) adapters load: +%.2f s over plain %.2f s; %.0f bytes/edit on disk; reload identical: %s",
             res["median_extra_load_seconds"], res["median_plain_load_seconds"], res["disk_bytes_per_edit"], same)
    return res


def part_d(model, reqs, n_edits: int, max_new_tokens: int) -> dict:
    from grace_hooks.tokens import target_text

    tok = model.tokenizer
    edited, base = [], []
    for r in progress(reqs[:n_edits], desc="(d) greedy success", unit="prompt", leave=False):
        n_tgt = len(tok(target_text(r.text, r.target_new), add_special_tokens=False)["input_ids"])
        e = generate_one(model, r.text, n_tgt + 1)
        with model.disabled():
            b = generate_one(model, r.text, n_tgt + 1)
        edited.append(reaches(e.text, r.target_new))
        base.append(reaches(b.text, r.target_new))
    # locality: unrelated text prompts, and the CounterFact neighbourhood prompts of the edited records
    def identical(texts):
        same = []
        for t in progress(texts, desc="(d) logits vs base", unit="prompt", leave=False):
            e = prompt_logits(model, t)
            with model.disabled():
                b = prompt_logits(model, t)
            same.append(bool(torch.equal(e, b)))
        return same

    unrelated_same = identical(UNRELATED_PROMPTS)
    loc_texts = [r.locality_prompt for r in reqs[:n_edits] if r.locality_prompt]
    loc_same = identical(loc_texts)
    # generation logits (every step's scores) on the unrelated prompts
    gen_same = []
    for t in UNRELATED_PROMPTS:
        e = generate_one(model, t, max_new_tokens, fixed_length=True, scores=True)
        with model.disabled():
            b = generate_one(model, t, max_new_tokens, fixed_length=True, scores=True)
        gen_same.append(bool(torch.equal(e.scores, b.scores)))
    res = {
        "n_edited_prompts": len(edited),
        "greedy_success_edited": sum(edited) / len(edited), "greedy_success_base": sum(base) / len(base),
        "greedy_success_definition": "greedy continuation (target tokens + 1 new tokens), leading whitespace stripped, starts with target_new",
        "unrelated_text_prompts": {"n": len(unrelated_same), "bit_identical_prompt_logits": sum(unrelated_same) / len(unrelated_same),
                                   "bit_identical_generation_scores": sum(gen_same) / len(gen_same),
                                   "prompts": UNRELATED_PROMPTS},
        "counterfact_locality_prompts": {"n": len(loc_same), "bit_identical_prompt_logits": sum(loc_same) / max(len(loc_same), 1),
                                         "not_identical_examples": [t for t, s in zip(loc_texts, loc_same) if not s][:20]},
    }
    log.info("(d) greedy success %.3f (base %.3f); bit-identical logits: unrelated %.2f, locality %.3f",
             res["greedy_success_edited"], res["greedy_success_base"],
             res["unrelated_text_prompts"]["bit_identical_prompt_logits"], res["counterfact_locality_prompts"]["bit_identical_prompt_logits"])
    return res


# ---------------------------------------------------------------------------------------- report
def fmt(x, nd=2):
    return f"{x:,.{nd}f}"


def markdown(res: dict) -> str:
    a, c, d = res["edit_timing"], res["adapters_load"], res["greedy_and_locality"]
    b = res["build"]
    n = res["config"]["n_edits"]
    lines = [
        "| measure | value |", "|---|---|",
        f"| (a) grace edit, 1 call x {a['n_requests']} requests: s/edit (call total) | {fmt(a['batch_call']['seconds_per_edit'])} ({fmt(a['batch_call']['seconds'], 1)} s, {a['batch_call']['metrics']['iterations']} Adam steps) |",
        f"| (a) grace edit, {a['n_requests']} calls x 1 request: median s/edit (total) | {fmt(a['single_calls']['median_seconds_per_edit'])} ({fmt(a['single_calls']['total_seconds'], 1)} s; mean {fmt(a['single_calls']['mean_seconds_per_edit'])} s/edit) |",
        f"| (b) building {n:,} edits, {len(b['calls'])} calls x {res['config']['batch']}: s/edit (total) | {fmt(b['seconds_per_edit'])} ({fmt(b['total_seconds'], 0)} s; call median {fmt(b['median_call_seconds'], 0)} s) |",
        f"| (c) load adapters dir ({c['n_edits']:,} edits, {c['n_packs']} packs): extra s over plain load, median of {len(c['plain_load_seconds'])} | {fmt(c['median_extra_load_seconds'])} s (plain load {fmt(c['median_plain_load_seconds'])} s) |",
        f"| (c) bytes on disk per edit (tensors alone) | {c['disk_bytes_per_edit']:,.0f} ({c['tensor_bytes_per_edit']:,.0f}) |",
        f"| (d) greedy success on the {d['n_edited_prompts']:,} edited prompts, {n:,} edits loaded (base) | {fmt(100 * d['greedy_success_edited'], 1)}% ({fmt(100 * d['greedy_success_base'], 1)}%) |",
        f"| (d) unrelated text prompts with bit-identical logits vs base (prompt / {res['config']['max_new_tokens']} generated steps) | {fmt(100 * d['unrelated_text_prompts']['bit_identical_prompt_logits'], 0)}% / {fmt(100 * d['unrelated_text_prompts']['bit_identical_generation_scores'], 0)}% of {d['unrelated_text_prompts']['n']} |",
        f"| (d) CounterFact locality prompts of the edited records with bit-identical logits | {fmt(100 * d['counterfact_locality_prompts']['bit_identical_prompt_logits'], 1)}% of {d['counterfact_locality_prompts']['n']:,} |",
        "",
        f"Generation, greedy, batch size 1, {res['config']['max_new_tokens']} new tokens per prompt (EOS suppressed), "
        f"{len(UNRELATED_PROMPTS)} unrelated + {N_EDITED_PROMPTS} edited CounterFact prompts; medians of "
        f"{res['config']['rounds']} alternating rounds; ratio = median over rounds of edited/base seconds:",
        "",
        "| edits loaded | edited tok/s | base tok/s (`disabled()`) | edited/base time | edited prompts: greedy success (base) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for g in res["generation"]:
        hits = [p for p in g["prompts"] if p["kind"] == "edited"]
        succ = f"{sum(p['edited_starts_with_target'] for p in hits)}/{len(hits)} ({sum(p['base_starts_with_target'] for p in hits)}/{len(hits)})"
        lines.append(f"| {g['edits_loaded']:,} | {fmt(g['edited']['median_tokens_per_s'], 1)} | {fmt(g['base']['median_tokens_per_s'], 1)} | "
                     f"{fmt(g['ratio_edited_over_base_seconds']['median_of_paired'], 3)} | {succ} |")
    return "\n".join(lines) + "\n"


def write_results_md(path: Path, res: dict, table: str) -> None:
    run = res["run"]
    mach, git, ver = run["machine"], run["git"], run["versions"]
    body = "\n".join([
        f"Run {res['finished_at']} (UTC), commit `{(git['commit'] or 'unknown')[:12]}`"
        f"{' + uncommitted changes' if git['dirty'] else ''}, produced by:", "",
        "```", res["command"], "```", "",
        f"Machine: {mach['cpu'] or 'unknown CPU'}, {mach['cores_available']} cores available, {run['torch_threads']} torch / "
        f"{run['faiss_threads']} FAISS thread(s), torch {ver['torch']}, transformers {ver['transformers']}, "
        f"faiss {ver['faiss']}, grace_hooks {ver['grace_hooks']}, CPU only. "
        f"Load average at start / end: {run['loadavg_start']} / {res['loadavg_end']}.", "",
        "Caveat: the machine is shared and noisy (other jobs run concurrently), so absolute seconds move a lot "
        "between runs; quote the medians and the edited/base ratios from one run, which are timed interleaved "
        "in the same process. All figures below come from this single run; the full record is "
        f"`{res['results_json']}`.", "",
        table.rstrip("\n"), "",
    ])
    replace_md_section(path, SECTION, body)


# ---------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("grace_hooks").setLevel(logging.WARNING)  # per-call lines are logged here instead

    import faiss
    from grace_hooks import EditableModel, read_requests

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    torch.manual_seed(0)

    n = args.n_edits
    levels = sorted({lv for lv in args.levels if 0 <= lv < n} | {n})
    need = max(n, args.a_size, N_EDITED_PROMPTS)
    started = dt.datetime.now(dt.timezone.utc)  # for wall_seconds; the record's started_at is run_record's
    res: dict = {
        "benchmark": "core (issue 2): GRACE on SmolLM2-135M",
        "command": shlex.join(["python", os.path.relpath(Path(sys.argv[0]).resolve(), Path.cwd())] + sys.argv[1:]),
        "cwd": str(Path.cwd()), "run": run_record(REPO, args.threads),
        "config": {"model": MODEL, "method": "grace", "method_config": "default", "data": str(args.data),
                   "n_edits": n, "batch": args.batch, "levels": levels, "a_size": args.a_size, "rounds": args.rounds,
                   "max_new_tokens": args.max_new_tokens, "load_repeats": args.load_repeats, "threads": args.threads},
    }
    log.info("command: %s", res["command"])
    reqs = read_requests(args.data, limit=need)
    if len(reqs) < need:
        raise SystemExit(f"{args.data} has {len(reqs)} records; need {need}")

    t0 = time.perf_counter()
    model = EditableModel.from_pretrained(MODEL)
    log.info("loaded %s in %.1f s", MODEL, time.perf_counter() - t0)

    # (a)
    res["edit_timing"] = part_a(model, reqs, args.a_size)

    # (b) generation at each level, building the edits between levels
    prompts = [{"kind": "unrelated", "text": t} for t in UNRELATED_PROMPTS]
    prompts += [{"kind": "edited", "text": r.text, "target": r.target_new, "record_index": i}
                for i, r in enumerate(reqs[:N_EDITED_PROMPTS])]
    res["generation"], build = [], []
    have = 0
    bar = progress(total=n, desc="building grace edits", unit="edit")
    for level in levels:
        if level > have:
            build_edits(model, reqs, have, level, args.batch, build, bar)
            have = level
        bar.clear()
        res["generation"].append(time_generation(model, prompts, args.rounds, level, args.max_new_tokens))
        bar.refresh()
    bar.close()
    total = sum(b["seconds"] for b in build)
    res["build"] = {"calls": build, "total_seconds": total, "seconds_per_edit": total / n,
                    "median_call_seconds": median([b["seconds"] for b in build]),
                    "median_seconds_per_edit": median([b["seconds_per_edit"] for b in build])}

    workdir = Path(tempfile.mkdtemp(prefix="bench_core_"))
    try:
        # (d) first (all edits loaded, in-memory model), then (c) save + reload
        res["greedy_and_locality"] = part_d(model, reqs, n, args.max_new_tokens)
        res["adapters_load"] = part_c(model, n, args.load_repeats, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    res["loadavg_end"] = loadavg()
    res["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    res["wall_seconds"] = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
    args.out.mkdir(parents=True, exist_ok=True)
    out_json = args.out / "results.json"
    with contextlib.suppress(ValueError):
        res["results_json"] = str(out_json.resolve().relative_to(REPO))
    res.setdefault("results_json", str(out_json))
    out_json.write_text(json.dumps(res, indent=1, default=str) + "\n", encoding="utf-8")
    table = markdown(res)
    print(table)
    if not args.no_results_md:
        write_results_md(args.results_md, res, table)
        log.info("wrote %s and %s", out_json, args.results_md)
    else:
        log.info("wrote %s", out_json)
    return res


if __name__ == "__main__":
    main()
