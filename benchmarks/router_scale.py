#!/usr/bin/env python
"""The router alone, at scale (issue 16, part 1): keys and radii of N edits, then who they fire on.

The keys and radii are the ones a routed weight-delta pack stores (the same code: the method's
sites, ``activations_at_subject_of`` for the keys, ``DeltaMethod.route_keys_and_radii`` for the radii), added
to one ``KeyRouter`` per site in batches of ``--batch`` (rank = batch, as sequential packs). No
target vector is computed, so 10,000 edits take minutes. Measured, as the runtime routes:

- recall: share of rephrase prompts with a position in scope of a key of their own edit (at any site);
- wrong_edit: share of rephrase prompts where some position's winning key is another edit's;
- false_fire_locality: share of locality prompts with any position in scope at any site;
- false_fire_tokens: share of generic-text tokens in scope at any site (text sampled from the model
  with another seed than the C0 corpus, texts naming an edited subject left out);
- us_per_token: router query time per token per site (one thread), bytes_per_key: router memory.

Rephrase and locality prompts are a fixed sample of ``--eval`` records. Each curve point also
measures a candidate rule on the same winners (``agree``): a position is in scope of an edit only
where that edit wins at k or more of the sites. A recall / false-fire
curve over ``--scales`` (the radius scale) is written beside the JSON as a PNG.

    python benchmarks/router_scale.py --data ../shared/data/counterfact-train.json --n 1000 --json OUT.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from grace_hooks import EditableModel
from grace_hooks.bases.hooks import HookOwner, forward_until
from grace_hooks.config import make_config
from grace_hooks.engine.router import NO_KEY, KeyRouter
from grace_hooks.engine.spans import NO_TOKEN, request_spans
from grace_hooks.eval.runinfo import run_record
from grace_hooks.locate.covariance import cached_sample_corpus, model_digest
from grace_hooks.locate.subject_keys import activations_at_subject_of, context_prefixes
from grace_hooks.methods import get_method
from grace_hooks.requests import read_requests

log = logging.getLogger("router_scale")
REPO = Path(__file__).resolve().parents[1]
SUMMARY = ("recall", "wrong_edit", "false_fire_locality", "false_fire_tokens", "us_per_token", "bytes_per_key",
           "false_fire_locality_no_subject", "wrong_edit_no_other_subject")
DEFAULT_SCALES = {"span": "1.1,1.5,2.0,3.0,5.0", "key": "0.5,0.8,1.1,1.5,2.0"}
RULES = {"key": "radius_scale x spread, >= 5% of |k|, <= corpus_margin x distance to the nearest probe token; "
                "mean key and each prefixed sample",
         "span": "the subject's token span ends at the position, and the mean key is within radius_scale x spread "
                 "(>= 5% of |k|)"}


def inputs_by_prompt(model, tokenizer, modules: dict, texts: list[str], batch_size: int = 32, max_length: int = 128):
    """name -> (tokens, d) site inputs at every real position of ``texts``, (tokens,) the text of
    each, and (texts, longest) their token ids (NO_TOKEN after the end), as the runtime sees them."""
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    order = {m: i for i, m in enumerate(model.modules())}
    deepest = max(modules.values(), key=lambda m: order[m])
    out = {name: [] for name in modules}
    owner, ids = [], []
    try:
        for lo in tqdm(range(0, len(texts), batch_size), desc="site inputs", leave=False):
            enc = tokenizer(texts[lo:lo + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            real = enc.attention_mask.bool()
            grabbed = {}
            with HookOwner().scoped() as scope, torch.inference_mode():
                for name, module in modules.items():
                    scope.forward(module, lambda m, a, o, name=name: grabbed.__setitem__(name, a[0]))
                forward_until(model, deepest, **enc)
            for name, t in grabbed.items():
                out[name].append(t[real].float())
            owner.append((torch.arange(lo, lo + real.shape[0])[:, None].expand_as(real))[real])
            ids += [row[m].tolist() for row, m in zip(enc.input_ids, real)]
    finally:
        tokenizer.padding_side = side
    tokens = np.full((len(ids), max(map(len, ids))), NO_TOKEN, dtype=np.int64)
    for row, seq in enumerate(ids):
        tokens[row, :len(seq)] = seq
    return {name: torch.cat(v).numpy() for name, v in out.items()}, torch.cat(owner).numpy(), tokens


def generic_texts(model, tokenizer, n_tokens: int, subjects: list[str], max_rounds: int = 8) -> list[str]:
    """Model-sampled texts with no edited subject, at least ``n_tokens`` tokens of them: sampled with
    seeds 1, 2, ... (C0's corpus uses seed 0) until enough remain after the subject filter."""
    lowered = [s.lower() for s in subjects]
    keep: list[str] = []
    for seed in range(1, max_rounds + 1):
        texts = cached_sample_corpus(model, tokenizer, model_digest(model), n_texts=max(8, n_tokens // 100), n_tokens=128,
                                     seed=seed).texts
        keep += [t for t in texts if not any(s in t.lower() for s in lowered)]
        if sum(len(tokenizer(t).input_ids) for t in keep) >= n_tokens:
            break
    return keep


def router_for(keys: np.ndarray, radii: np.ndarray, owners: np.ndarray, batch: int,
               spans: list | None) -> tuple[KeyRouter, np.ndarray]:
    """A router holding ``keys`` added pack by pack (edits ``batch`` at a time, rank = pack), and
    the edit of each router id. ``spans``: each key's subject spans (scope 'span'), else None."""
    ranks = owners // batch
    order = np.argsort(ranks, kind="stable")  # router ids are given in the order keys are added
    router = KeyRouter(keys.shape[1])
    for rank in np.unique(ranks):
        rows = order[ranks[order] == rank]
        router.add(keys[rows], radii[rows], int(rank), spans=None if spans is None else [spans[r] for r in rows])
    return router, owners[order]


def span_candidates(router: KeyRouter, tokens: np.ndarray, n_queries: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(query index, key id) pairs the keys' subject spans allow: what the runtime's site hook
    passes the router, one prompt per row (padding after the end)."""
    if not len(router.spans):
        return None
    flat, key_ids = router.spans.candidates(tokens, tokens.shape[1], [set() for _ in tokens])
    index = np.where((tokens != NO_TOKEN).reshape(-1), np.cumsum((tokens != NO_TOKEN).reshape(-1)) - 1, -1)
    assert index.max() + 1 == n_queries
    q = index[flat]
    return q[q >= 0], key_ids[q >= 0]


def measure(router: KeyRouter, owner_of_key: np.ndarray, queries: dict, own: np.ndarray) -> dict:
    """For one site: per token of each query set, the edit whose key wins (-1: none); for rephrase
    tokens also whether a key of the prompt's own edit covers it; the query time per generic token
    (span candidates and router search, one thread)."""
    out = {}
    for part, (x, prompt, tokens) in queries.items():
        start = time.perf_counter()
        candidates = span_candidates(router, tokens, len(x))
        ids = router.assign(x, candidates=candidates)
        if part == "generic":
            out["us_per_token"] = 1e6 * (time.perf_counter() - start) / max(1, len(x))
        out[part] = np.where(ids == NO_KEY, -1, owner_of_key[np.maximum(ids, 0)])
        if part == "rephrase":
            q, k, _ = router.in_scope(x, candidates=candidates)
            covered = np.zeros(len(x), bool)
            covered[q[owner_of_key[k] == own[prompt[q]]]] = True
            out["own_in_scope"] = covered
    return out


def summarise(per_site: list[dict], queries: dict, own: np.ndarray, names_subject: np.ndarray,
              names_other: np.ndarray) -> dict:
    """Across sites, as the runtime routes (a prompt is touched where any site fires). Locality
    prompts that name an edited subject are legitimately in scope, and so is another edit on a
    rephrase prompt that names its subject: the rates on the prompts that name none are also given."""
    reph_prompt = queries["rephrase"][1]
    hit_own = np.zeros(len(own), bool)
    hit_other = np.zeros(len(own), bool)
    loc_prompt = queries["locality"][1]
    fired_loc = np.zeros(len(own), bool)
    fired_tok = np.zeros(len(queries["generic"][0]), bool)
    for site in per_site:
        w = site["rephrase"]
        np.logical_or.at(hit_own, reph_prompt, site["own_in_scope"])
        np.logical_or.at(hit_other, reph_prompt, (w != -1) & (w != own[reph_prompt]))
        np.logical_or.at(fired_loc, loc_prompt, site["locality"] != -1)
        fired_tok |= site["generic"] != -1
    return {"recall": float(hit_own.mean()), "wrong_edit": float(hit_other.mean()),
            "false_fire_locality": float(fired_loc.mean()), "false_fire_tokens": float(fired_tok.mean()),
            "false_fire_locality_no_subject": float(fired_loc[~names_subject].mean()),
            "wrong_edit_no_other_subject": float(hit_other[~names_other].mean())}


def agreeing(winners: np.ndarray, k: int) -> np.ndarray:
    """(sites, tokens) winners -> the same, with -1 where fewer than ``k`` sites name that edit."""
    count = (winners[:, None, :] == winners[None, :, :]).sum(0)
    return np.where((winners != -1) & (count >= k), winners, -1)


def summarise_agreement(per_site: list[dict], queries: dict, own: np.ndarray, k: int) -> dict:
    """A candidate rule (issue 16 part 2), measured on the same winners: a position is in scope of an
    edit only where that edit wins at ``k`` or more of the sites (recall: the own edit so wins)."""
    reph_prompt, loc_prompt = queries["rephrase"][1], queries["locality"][1]
    reph = agreeing(np.stack([s["rephrase"] for s in per_site]), k)
    loc = agreeing(np.stack([s["locality"] for s in per_site]), k)
    gen = agreeing(np.stack([s["generic"] for s in per_site]), k)
    hit_own, hit_other, fired_loc = (np.zeros(len(own), bool) for _ in range(3))
    mine = own[reph_prompt]
    np.logical_or.at(hit_own, reph_prompt, (reph == mine).any(0))
    np.logical_or.at(hit_other, reph_prompt, ((reph != -1) & (reph != mine)).any(0))
    np.logical_or.at(fired_loc, loc_prompt, (loc != -1).any(0))
    return {"recall": float(hit_own.mean()), "wrong_edit": float(hit_other.mean()),
            "false_fire_locality": float(fired_loc.mean()), "false_fire_tokens": float((gen != -1).any(0).mean())}


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, action="append",
                    help="CounterFact records (EasyEdit layout); give it twice to join files (train + val)")
    ap.add_argument("--n", type=int, required=True, help="edits (the first N records)")
    ap.add_argument("--method", default="memit", help="a routed weight-delta method (memit, encore, oedit)")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=100, help="edits per pack (router rank)")
    ap.add_argument("--eval", type=int, default=500, help="rephrase / locality prompts measured (a fixed sample of the N)")
    ap.add_argument("--generic-tokens", type=int, default=20_000)
    ap.add_argument("--scales", default=None, help="radius scales for the curve (default: around the rule's own scale)")
    ap.add_argument("--scopes", default=None, help="scope rules to measure on the same forwards, e.g. 'span,key' (default: "
                                                   "the method's); the first is OUT.json's, the others (at their own "
                                                   "scale only) go to its other_scopes")
    ap.add_argument("--set", action="append", default=[], help="method option key=value")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = run_record(REPO, args.threads)

    em = EditableModel.from_pretrained(args.model)
    model, tok = em.base_model, em.tokenizer
    impl = get_method(args.method)
    cfg = make_config(impl.config_class, {"mode": "routed", **dict(s.split("=", 1) for s in args.set)})
    requests = [r for path in args.data for r in read_requests(path)][: args.n]
    if len(requests) < args.n:
        raise SystemExit(f"{[str(p) for p in args.data]} hold {len(requests)} records, fewer than --n {args.n}")
    sites = impl.sites(model, cfg)
    modules = {s.name: s.module(model) for s in sites}
    ctx = contextlib.ExitStack().enter_context(em.edit_context())  # held for the whole run (one thread)
    prefixes = context_prefixes(model, tok, cfg.prefix_tokens, memo=ctx.memo)[: 1 + cfg.n_prefixes]

    t0 = time.perf_counter()
    samples = activations_at_subject_of(modules, model, tok, requests, prefixes, batch_size=64)
    key_seconds = time.perf_counter() - t0
    sample = sorted(random.Random(0).sample(range(args.n), min(args.eval, args.n)))
    reph = [requests[i].rephrase_prompt for i in sample]
    loc = [requests[i].locality_prompt for i in sample]
    generic = generic_texts(model, tok, args.generic_tokens, [r.subject for r in requests])
    queries_by_site = {}
    for part, texts in (("rephrase", reph), ("locality", loc), ("generic", generic)):
        x, owner, tokens = inputs_by_prompt(model, tok, modules, texts)
        for name in modules:
            queries_by_site.setdefault(name, {})[part] = (x[name], owner, tokens)
    n_generic = len(queries_by_site[sites[0].name]["generic"][0])
    own = np.array(sample)
    lowered = [r.subject.lower() for r in requests]
    names_subject = np.array([any(sub in t.lower() for sub in lowered) for t in loc])
    names_other = np.array([any(sub in t.lower() for sub in lowered if sub != lowered[i])
                            for i, t in zip(sample, reph)])

    results = {}
    for i, scope in enumerate(args.scopes.split(",") if args.scopes else [cfg.scope]):
        scoped = replace(cfg, scope=scope)
        spans = request_spans(tok, requests) if scope == "span" else None
        scales = (args.scales or DEFAULT_SCALES[scope]) if i == 0 else str(scoped.route_radius_scale())
        curve = [curve_point(impl, ctx, sites, samples, queries_by_site, own, (names_subject, names_other), spans,
                             replace(scoped, radius_scale=float(scale)), args) for scale in scales.split(",")]
        default = min(curve, key=lambda r: abs(r["scale"] - scoped.route_radius_scale()))
        results[scope] = {"n": args.n, **{k: default[k] for k in SUMMARY}, "scope": scope, "rule": RULES[scope],
                          "keys_per_site": default["keys_per_site"], "radius_scale": default["scale"], "curve": curve}
    first, *others = results.values()
    result = {"run": run, **first, "locality_naming_a_subject": int(names_subject.sum()),
              "rephrase_naming_another_subject": int(names_other.sum()), "method": args.method,
              "sites": [s.name for s in sites], "eval_prompts": len(sample), "generic_tokens": n_generic,
              "key_seconds": round(key_seconds, 1), "data": [str(p) for p in args.data], "model": args.model,
              "other_scopes": {r["scope"]: r for r in others}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    plot(results, args.json.with_suffix(".png"), args.n)
    print(json.dumps({k: v for k, v in result.items() if k not in ("curve", "run")}, indent=1))


def curve_point(impl, ctx, sites, samples, queries_by_site, own, names, spans, cfg, args) -> dict:
    """The router of N edits under ``cfg`` (its scope and radius scale), measured at every site."""
    per_site, us = [], []
    for site in sites:
        s = samples[site.name]
        route_keys, radii = impl.route_keys_and_radii(ctx, sites, site, s, s.mean(0), cfg)
        owners = np.tile(np.arange(args.n), len(route_keys) // args.n)  # mean keys, then prefix-major samples
        router, owner_of_key = router_for(route_keys.numpy(), radii.numpy(), owners, args.batch,
                                          None if spans is None else [spans[o] for o in owners])
        got = measure(router, owner_of_key, queries_by_site[site.name], own)
        us.append(got.pop("us_per_token"))
        per_site.append(got)
    first = queries_by_site[sites[0].name]
    row = {"scale": cfg.radius_scale, **summarise(per_site, first, own, *names),
           "us_per_token": float(np.median(us)), "keys_per_site": len(route_keys),
           "bytes_per_key": route_keys.shape[1] * 4 + 4 * 2 + 8 + 8 + 2,  # vector, radius (base, effective), rank, id, flags
           "agree": {k: summarise_agreement(per_site, first, own, k) for k in range(2, len(sites) + 1)}}
    print(json.dumps({"scope": cfg.scope, **{k: v for k, v in row.items() if k != "agree"}}), flush=True)
    return row


def plot(results: dict, path: Path, n: int) -> None:
    """Recall against false fire for each scope rule measured (one point per radius scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for scope, res in results.items():
        curve = res["curve"]
        for key, label in (("false_fire_locality", "locality prompts"), ("false_fire_tokens", "generic tokens")):
            ax.plot([100 * r[key] for r in curve], [100 * r["recall"] for r in curve], marker="o",
                    linestyle="-" if scope == "span" else "--", label=f"scope {scope}: {label}")
        for r in curve:
            ax.annotate(f"{r['scale']:g}", (100 * r["false_fire_locality"], 100 * r["recall"]), fontsize=7)
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("false fire (%)")
    ax.set_ylabel("paraphrase recall (%)")
    ax.set_title(f"router at {n} edits (labels: radius scale)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
