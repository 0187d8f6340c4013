#!/usr/bin/env python
"""GPU readiness: edit, reload and roll back in half precision on the accelerator, and time it.

    python benchmarks/gpu_check.py [--model smollm2-135m] [--device cuda|cpu] [--dtypes bfloat16,float16]
                                   [--n 100] [--data ../shared/data/counterfact-val.json] [--method SPEC ...]

For each dtype and each method (``--method``, repeatable, ``name`` or ``name:key=value,key=value``;
default GRACE and the default method), on the accelerator (cuda when present, else cpu):

1. load the base in that dtype, on that device (``EditableModel.from_pretrained(model, dtype=...,
   device_map=...)``, as a user would) and record its last-position logits on the compared prompts
   (the first ``--compare`` edited prompts and a few unrelated paragraphs) and its success share;
2. edit the N requests in one call (seconds per edit); the pack must hold finite float32 tensors;
3. the success share: greedy continuation of each prompt starts with its target (``--min-success``);
   unrelated paragraphs must keep the base's logits bit for bit while the edit acts;
4. save the pack and load it into a FRESH EditableModel on a freshly loaded base: the same logits
   bit for bit and the same greedy answers as the edited model;
5. remove the pack: the logits equal the base's again bit for bit, and no hook is left;
6. tokens/s of greedy generation (batch 1, fixed length) with the edits (the fresh model) and
   without (the rolled-back model, the pure base), in interleaved rounds in this process;
7. peak accelerator memory (``torch.cuda.max_memory_allocated`` per device, both models loaded;
   on CPU the process's peak RSS so far).

With two or more CUDA devices the same runs with the model split over them (``device_map="auto"``;
when "auto" keeps a small model on one device, a memory limit per device forces the split);
otherwise the JSON and the table say that part was skipped. Work is bounded: ``--budget-s`` (default
450 s on CUDA) stops starting new runs, and a run not made counts as a failure. Writes the results
(``--out``) with the commit, dirty flag, UTC date, versions, device name, threads and load average,
and exits 1 when any check failed (or a run was not made), 0 otherwise.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from anywhere: the checkout's library, not another install
    sys.path.insert(0, str(REPO))

from grace_hooks import EditableModel  # noqa: E402
from grace_hooks.bases.hooks import count_hooks  # noqa: E402
from grace_hooks.config import DEFAULT_METHOD  # noqa: E402
from grace_hooks.engine.health import reference_texts  # noqa: E402
from grace_hooks.eval.editors import MethodSpec  # noqa: E402
from grace_hooks.eval.generation import generate_one, greedy_batch  # noqa: E402
from grace_hooks.eval.metrics import generation_success  # noqa: E402
from grace_hooks.eval.runinfo import loadavg, peak_rss_mib, run_record  # noqa: E402
from grace_hooks.requests import read_requests  # noqa: E402

log = logging.getLogger("gpu_check")

DEFAULT_DATA = REPO.parent / "shared" / "data" / "counterfact-val.json"
PACK = "gpu-check"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CUDA_BUDGET_S = 450.0  # the whole check within ~8 minutes on a GPU, loading and start-up included


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="any base EditableModel.from_pretrained takes (short name, "
                                                           "hub id, local folder, .gguf file)")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--dtypes", default="bfloat16,float16", help=f"comma-separated, of {', '.join(DTYPES)}")
    ap.add_argument("--n", type=int, default=100, help="edit requests, all in one edit() call")
    ap.add_argument("--data", "--requests", dest="data", type=Path, default=DEFAULT_DATA,
                    help="edit records (CounterFact, ROME or zsRE layout; JSON or JSON lines), the first --n")
    ap.add_argument("--method", action="append", default=None,
                    help=f"method spec, repeatable: name or name:key=value,key=value (default: grace and {DEFAULT_METHOD})")
    ap.add_argument("--compare", type=int, default=16, help="edited prompts whose logits and answers are compared bit for bit")
    ap.add_argument("--answer-tokens", type=int, default=8, help="greedy tokens of each compared answer")
    ap.add_argument("--unrelated", type=int, default=4, help="unrelated paragraphs compared bit for bit")
    ap.add_argument("--unrelated-tokens", type=int, default=48, help="tokens of each unrelated paragraph")
    ap.add_argument("--gen-prompts", type=int, default=4, help="prompts of each timed generation round")
    ap.add_argument("--gen-tokens", type=int, default=32, help="new tokens per timed generation")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (edited, base) after one warm-up")
    ap.add_argument("--min-success", type=float, default=0.8, help="the edited success share must reach this")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"start no run after this many seconds (default {CUDA_BUDGET_S:.0f} on CUDA, none on CPU)")
    ap.add_argument("--no-split", action="store_true", help="skip the device_map='auto' runs even with several GPUs")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/gpu_check-<device>.json)")
    args = ap.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown or not args.dtypes:
        ap.error(f"--dtypes: unknown {unknown or 'none given'}; choose from {list(DTYPES)}")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device (a CPU-only torch build?)")
    if args.budget_s is None:
        args.budget_s = CUDA_BUDGET_S if args.device.type == "cuda" else 0.0
    return args


# ---------------------------------------------------------------------------------------------- helpers
def sync() -> None:
    """Wait for queued CUDA work, so that a timing covers it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def accelerator(device: torch.device, cpu_name: str) -> dict[str, Any]:
    """What ran the model: the CUDA device names, or the CPU's model name."""
    if device.type == "cuda":
        n = torch.cuda.device_count()
        return {"type": "cuda", "count": n, "name": torch.cuda.get_device_name(device),
                "names": [torch.cuda.get_device_name(i) for i in range(n)], "cuda": torch.version.cuda}
    return {"type": device.type, "count": 0, "name": cpu_name or device.type, "names": []}


def dtype_kwarg() -> str:
    """How from_pretrained takes the dtype: ``dtype`` from transformers 4.56 (``torch_dtype`` is kept
    there for old callers, with a deprecation warning), ``torch_dtype`` before."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def load(model: str, dtype: torch.dtype, placement: Any, adapters: Path | None = None, **extra) -> EditableModel:
    """The base through ``EditableModel.from_pretrained``, as a user loads it: the dtype and the
    placement (None: the CPU, a device string, "auto" or an explicit device map) go to Hugging Face."""
    kwargs: dict[str, Any] = {dtype_kwarg(): dtype, **extra}
    if placement is not None:
        kwargs["device_map"] = placement
    return EditableModel.from_pretrained(model, adapters=adapters, **kwargs)


def devices_of(em: EditableModel) -> list[str]:
    return sorted({str(p.device) for p in em.base_model.parameters()})


def memory_reset() -> None:
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def memory_peak(device: torch.device) -> dict[str, float]:
    """MiB: the peak allocated per CUDA device since the last reset, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return {f"cuda:{i}": round(torch.cuda.max_memory_allocated(i) / 2**20, 1) for i in range(torch.cuda.device_count())}
    return {"cpu_peak_rss": round(peak_rss_mib(), 1)}


@torch.inference_mode()
def last_logits(em: EditableModel, texts: Sequence[str], max_tokens: int) -> list[torch.Tensor]:
    """Each text's last-position logits, in the model's own dtype (compared bit for bit), one text per forward."""
    out = []
    for text in texts:
        ids = em.tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens].to(em.device)
        out.append(em(input_ids=ids).logits[0, -1].detach().cpu())
    return out


def all_equal(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def pack_is_float32_and_finite(em: EditableModel) -> bool:
    return all(t.dtype == torch.float32 and bool(torch.isfinite(t).all()) for t in em.pack(PACK).tensors.values())


def timed_round(em: EditableModel, prompts: Sequence[str], new_tokens: int) -> float:
    """Seconds for ``new_tokens`` greedy tokens after each prompt (batch 1; EOS cannot end one early)."""
    sync()
    t0 = time.perf_counter()
    for p in prompts:
        generate_one(em, p, new_tokens, fixed_length=True)
    sync()
    return time.perf_counter() - t0


def throughput(edited: EditableModel, base: EditableModel, prompts: Sequence[str], new_tokens: int,
               rounds: int) -> dict[str, Any]:
    """tokens/s of both models, measured in alternating rounds (which goes first alternates too), so
    that machine noise reaches both alike; one untimed warm-up each first."""
    timings: dict[str, list[float]] = {"edited": [], "base": []}
    models = {"edited": edited, "base": base}
    for name in models:
        timed_round(models[name], prompts[:1], min(new_tokens, 4))
    for r in range(rounds):
        for name in (("edited", "base") if r % 2 == 0 else ("base", "edited")):
            timings[name].append(timed_round(models[name], prompts, new_tokens))
    tokens = len(prompts) * new_tokens
    out: dict[str, Any] = {f"{k}_tokens_per_s": round(tokens / statistics.median(v), 1) for k, v in timings.items()}
    out["rounds_s"] = {k: [round(x, 3) for x in v] for k, v in timings.items()}
    out["edited_over_base"] = round(out["edited_tokens_per_s"] / out["base_tokens_per_s"], 3)
    return out


def split_placement(model: str, dtype: torch.dtype) -> tuple[Any, dict]:
    """(device_map, extra from_pretrained kwargs) that split the model over every CUDA device: "auto"
    when that splits it; else "auto" under a per-device memory limit of a share of the model's size
    (a small model fits on the first device, and "auto" would leave it there)."""
    n = torch.cuda.device_count()
    probe = load(model, dtype, "auto")
    try:
        if len(devices_of(probe)) >= 2:
            return dict(probe.base_model.hf_device_map), {}
        size = probe.base_model.get_memory_footprint()
    finally:
        probe.close()
        del probe
        free_memory()
    share = int(size / n * 1.25) + 2**20  # a quarter over an even share: each device takes part, all fits
    return "auto", {"max_memory": {i: share for i in range(n)}}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- one run
def run_one(args, requests, unrelated: list[str], dtype_name: str, spec: MethodSpec, split: bool) -> dict[str, Any]:
    """Every step and check for one (dtype, method, placement); an exception is recorded, not raised."""
    dtype = DTYPES[dtype_name]
    res: dict[str, Any] = {"dtype": dtype_name, "method": spec.label, "placement": "split" if split else str(args.device),
                           "checks": {}, "figures": {}, "error": None}
    checks, figures = res["checks"], res["figures"]
    em = fresh = None
    memory_reset()
    started = time.perf_counter()
    try:
        if split:
            placement, extra = split_placement(args.model, dtype)
        else:
            placement, extra = (None if args.device.type == "cpu" else str(args.device)), {}
        em = load(args.model, dtype, placement, **extra)
        if split:  # the fresh base gets the very same layout (with the first model resident "auto" could differ)
            placement, extra = dict(em.base_model.hf_device_map), {}
        res["devices"] = devices_of(em)
        res["parameter_dtypes"] = sorted({str(p.dtype) for p in em.base_model.parameters()})  # some classes keep a few in float32
        asked_device = [str(torch.empty(0, device=args.device).device)]  # "cuda" -> "cuda:0"
        checks["loaded_as_asked"] = em.base_model.dtype == dtype and (
            len(res["devices"]) >= 2 if split else res["devices"] == asked_device)
        prompts = [r.text for r in requests]
        compared = prompts[: args.compare] + unrelated
        base_logits = last_logits(em, compared, args.unrelated_tokens)
        figures["base_success_share"] = round(sum(generation_success(em, requests)) / len(requests), 4)

        sync()
        t0 = time.perf_counter()
        em.edit(requests, method=spec.method, pack=PACK, **dict(spec.overrides))
        sync()
        edit_s = time.perf_counter() - t0
        figures["edit_seconds"] = round(edit_s, 3)
        figures["seconds_per_edit"] = round(edit_s / len(requests), 4)
        metrics = em.pack(PACK).metrics
        figures["method_metrics"] = {k: metrics[k] for k in ("landed_share", "teacher_forced_success", "seconds", "iterations")
                                     if k in metrics}
        checks["pack_float32_finite"] = pack_is_float32_and_finite(em)

        success = generation_success(em, requests)
        figures["success_share"] = round(sum(success) / len(success), 4)
        checks["success_share"] = figures["success_share"] >= args.min_success
        edited_logits = last_logits(em, compared, args.unrelated_tokens)
        n_cmp = len(compared) - len(unrelated)
        checks["unrelated_unchanged_while_edited"] = all_equal(edited_logits[n_cmp:], base_logits[n_cmp:])
        edited_answers = greedy_batch(em, prompts[: args.compare], args.answer_tokens)
        res["answers"] = [{"prompt": p, "target": r.target_new, "answer": a}
                          for p, r, a in zip(prompts[:3], requests[:3], edited_answers[:3])]

        with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
            em.save_pack(PACK, folder)
            fresh = load(args.model, dtype, placement, adapters=Path(folder), **extra)  # a freshly loaded base + the pack
        checks["reload_logits_equal"] = all_equal(last_logits(fresh, compared, args.unrelated_tokens), edited_logits)
        checks["reload_answers_equal"] = greedy_batch(fresh, prompts[: args.compare], args.answer_tokens) == edited_answers

        em.remove_pack(PACK)
        checks["remove_restores_base_logits"] = all_equal(last_logits(em, compared, args.unrelated_tokens), base_logits)
        checks["remove_leaves_no_hook"] = count_hooks(em.base_model) == 0

        figures.update(throughput(fresh, em, prompts[: args.gen_prompts], args.gen_tokens, args.rounds))
        figures["peak_memory_mib"] = memory_peak(args.device)
        fresh.close()
        checks["close_leaves_no_hook"] = count_hooks(fresh.base_model) == 0
    except Exception as exc:  # one broken run must not hide the others' results
        log.error("%s %s %s failed: %s", dtype_name, spec.label, res["placement"], exc)
        res["error"] = f"{type(exc).__name__}: {exc}"
        res["traceback"] = traceback.format_exc().splitlines()[-12:]
        checks["completed"] = False
    finally:
        for m in (em, fresh):
            if m is not None:
                m.close()
        del em, fresh
        free_memory()
    res["seconds"] = round(time.perf_counter() - started, 1)
    res["ok"] = all(checks.values())
    return res


# ---------------------------------------------------------------------------------------------- report
def _fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: dict[str, Any]) -> None:
    acc = results["accelerator"]
    print(f"\n{results['model']} on {acc['name'] or acc['type']}, {results['n_requests']} edits per run, "
          f"torch threads {results['run']['torch_threads']}, load {results['run']['loadavg_start']}")
    head = f"{'dtype':9s} {'method':28s} {'placement':9s} {'s/edit':>7s} {'success':>13s} {'tok/s edited':>12s} " \
           f"{'tok/s base':>10s} {'peak MiB':>9s}  checks"
    print(head)
    print("-" * len(head))
    for r in results["runs"]:
        f = r["figures"]
        peak = max(f["peak_memory_mib"].values()) if f.get("peak_memory_mib") else None
        success = f"{_fmt(f.get('base_success_share'), '.2f')} -> {_fmt(f.get('success_share'), '.2f')}"
        failed = [k for k, v in r["checks"].items() if not v]
        print(f"{r['dtype']:9s} {r['method'][:28]:28s} {r['placement']:9s} {_fmt(f.get('seconds_per_edit'), '7.3f')} "
              f"{success:>13s} {_fmt(f.get('edited_tokens_per_s'), '12.1f')} {_fmt(f.get('base_tokens_per_s'), '10.1f')} "
              f"{_fmt(peak, '9.1f')}  {'ok' if r['ok'] else 'FAILED: ' + ', '.join(failed)}")
        if r["error"]:
            print(f"    error: {r['error']}")
    print(f"split over several GPUs: {results['split']}")
    for line in results["not_run"]:
        print(f"not run: {line}")
    print(f"\n{'ALL CHECKS PASSED' if results['ok'] else 'SOME CHECKS FAILED'}; results in {results['out']}")


# ---------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    run = run_record(REPO, args.threads)
    requests = read_requests(args.data, limit=args.n)
    texts = reference_texts()[: args.unrelated]
    specs = [MethodSpec.parse(m) for m in (args.method or ["grace", DEFAULT_METHOD])]
    out = args.out or REPO / "benchmarks" / "results" / f"gpu_check-{args.device.type}.json"

    plan = [(d, s, False) for d in args.dtypes for s in specs]
    n_cuda = torch.cuda.device_count() if args.device.type == "cuda" else 0
    if args.no_split:
        split = "skipped: --no-split"
    elif n_cuda >= 2:
        split = f"ran over {n_cuda} CUDA devices"
        plan += [(d, s, True) for d in args.dtypes for s in specs]
    else:
        split = f"skipped: {n_cuda} CUDA device(s) here, the split needs two or more"

    runs: list[dict] = []
    not_run: list[str] = []

    def write(complete: bool) -> dict[str, Any]:
        """The results so far, written after every run: a check cut short by a time limit keeps what it did."""
        results = {
            "run": {**run, "loadavg_end": loadavg(), "seconds": round(time.perf_counter() - started, 1)},
            "accelerator": accelerator(args.device, run["machine"].get("cpu", "")),
            "model": args.model, "data": str(args.data), "n_requests": len(requests),
            "args": {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items()},
            "runs": runs, "split": split, "not_run": not_run, "out": str(out), "complete": complete,
            "ok": complete and bool(runs) and not not_run and all(r["ok"] for r in runs),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2, default=str))
        tmp.replace(out)
        return results

    for dtype_name, spec, is_split in plan:
        label = f"{dtype_name} {spec.label} {'split' if is_split else args.device}"
        if args.budget_s and time.perf_counter() - started > args.budget_s:
            not_run.append(f"{label} (time budget of {args.budget_s:.0f} s spent)")
            continue
        log.info("running %s", label)
        runs.append(run_one(args, requests, texts, dtype_name, spec, is_split))
        log.info("%s: %s in %.0f s; %s", label, "ok" if runs[-1]["ok"] else "FAILED", runs[-1]["seconds"],
                 json.dumps(runs[-1]["figures"], default=str))
        write(complete=False)

    results = write(complete=True)
    print_table(results)
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    sys.exit(main())
