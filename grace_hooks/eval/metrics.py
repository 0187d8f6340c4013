"""Method-agnostic editing metrics on an :class:`~grace_hooks.EditableModel` and edit records.

Scoring (model forwards) and metrics (arithmetic on scores) are separate, so that the base
scores of a record can be measured once, side by side with the edited ones, and reused.

- CounterFact (ROME): efficacy ES = P(new) > P(true) on the prompt, paraphrase PS the same on
  the rephrase prompt, neighbourhood NS = P(true) > P(new) on the locality prompt; magnitudes
  are the mean probability differences. A multi-token target's probability is the product over
  its tokens (the sum of log-probabilities).
- EasyEdit: reliability / generality = teacher-forced token accuracy of the new target on the
  prompt / rephrase prompt; locality = share of argmax tokens on the locality prompt and its
  answer that are unchanged against the base.
- Routing: router recall = share of rephrase prompts in scope of (a key serving) their own edit;
  false-fire rate = share of locality prompts in scope of any key. In a long stream many locality
  prompts name a subject that another record edits ("John Lennon performs on the"), where the
  router is right to act: the ``*_unrelated`` figures count only the prompts that name none.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Collection, Sequence

import numpy as np
import torch

from ..bases.hooks import head_only_at
from ..requests import EditRequest
from ..tokens import build_pair_batch, score_targets, scored_positions, target_text
from .generation import greedy_batch, mentions, reaches

PARTS = ("prompt", "rephrase", "locality")  # which prompt of a record a score is about
Hit = tuple[str, str, int]  # (site, pack name, key index)


@dataclass
class PairScores:
    """Teacher-forced scores of (prompt, target) pairs; NaN / empty where a pair was missing."""

    logprob: np.ndarray  # log P(target | prompt), summed over target tokens
    accuracy: np.ndarray  # share of target tokens that are the argmax
    predicted: list[list[int]]  # argmax token at each target position
    digest: list[str]  # hash of the float32 logits at the last prompt position ("" if missing)
    hits: list[set[Hit]] | None  # router hits at prompt positions; None when not traced


def _digest(logits: torch.Tensor) -> str:
    return hashlib.sha1(logits.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def score_pairs(model, prompts: Sequence[str | None], targets: Sequence[str | None], batch_size: int = 32,
                routes: bool = False) -> PairScores:
    """Score every (prompt, target) pair, ``batch_size`` pairs per right-padded forward, in order
    (so equal inputs give equal batches and bit-comparable logits). Pairs with a missing prompt or
    target are skipped. ``routes``: also record router hits (needs ``model.routes()``)."""
    n = len(prompts)
    out = PairScores(np.full(n, np.nan), np.full(n, np.nan), [[] for _ in range(n)], [""] * n,
                     [set() for _ in range(n)] if routes else None)
    present = [i for i in range(n) if prompts[i] and targets[i]]
    for start in range(0, len(present), batch_size):
        rows = present[start:start + batch_size]
        batch = build_pair_batch(model.tokenizer, [prompts[i] for i in rows], [targets[i] for i in rows],
                                 device=model.device)
        index, scored = scored_positions(batch)  # last prompt token .. last target token of each row
        trace = model.routes() if routes else contextlib.nullcontext()
        with torch.inference_mode(), trace as hits, head_only_at(getattr(model, "base_model", None), index) as narrowed:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        if not narrowed:
            logits = logits[index[0], index[1]]
        scores = score_targets(logits, scored)
        for j, i in enumerate(rows):
            out.logprob[i] = float(scores.logprob[j])
            out.accuracy[i] = float(scores.accuracy[j])
            out.predicted[i] = scores.predicted[j]
            out.digest[i] = _digest(logits[j, 0])
        for site, row, pos, pack, key in hits or ():
            if pos < int(batch.prompt_len[row]):
                out.hits[rows[row]].add((site, pack, key))
    return out


def _pairs(requests: Sequence[EditRequest], part: str) -> tuple[list, list, list]:
    """(prompts, new targets, true targets) of one part of each record."""
    if part == "prompt":
        return [r.text for r in requests], [r.target_new for r in requests], [r.ground_truth for r in requests]
    if part == "rephrase":
        return [r.rephrase_prompt for r in requests], [r.target_new for r in requests], [r.ground_truth for r in requests]
    if part == "locality":
        truth = [r.locality_ground_truth or r.ground_truth for r in requests]
        return [r.locality_prompt for r in requests], [r.target_new for r in requests], truth
    raise ValueError(f"part must be one of {PARTS}, got {part!r}")


def score_records(model, requests: Sequence[EditRequest], parts: Sequence[str] = PARTS, batch_size: int = 16,
                  routes: bool = False) -> dict[str, PairScores]:
    """Scores ``<part>/new`` and ``<part>/true`` for each part; one forward holds the new and the
    true target of ``batch_size`` records."""
    out = {}
    for part in parts:
        prompts, new, true = _pairs(requests, part)
        both = score_pairs(model, [p for p in prompts for _ in (0, 1)], [t for pair in zip(new, true) for t in pair],
                           2 * batch_size, routes)
        for name, sl in (("new", slice(0, None, 2)), ("true", slice(1, None, 2))):
            out[f"{part}/{name}"] = PairScores(both.logprob[sl], both.accuracy[sl], both.predicted[sl], both.digest[sl],
                                               both.hits[sl] if both.hits is not None else None)
    return out


def take_scores(scores: dict[str, PairScores], idx: Sequence[int]) -> dict[str, PairScores]:
    """The rows ``idx`` of every score set."""
    return {k: PairScores(v.logprob[list(idx)], v.accuracy[list(idx)], [v.predicted[i] for i in idx],
                          [v.digest[i] for i in idx], None if v.hits is None else [v.hits[i] for i in idx])
            for k, v in scores.items()}


def concat_scores(parts: list[dict[str, PairScores]]) -> dict[str, PairScores]:
    """Score sets of consecutive chunks of records joined into one, in order."""
    if not parts:
        return {}
    out = {}
    for k in parts[0]:
        vs = [p[k] for p in parts]
        hits = None if vs[0].hits is None else [h for v in vs for h in v.hits]
        out[k] = PairScores(np.concatenate([v.logprob for v in vs]), np.concatenate([v.accuracy for v in vs]),
                            [x for v in vs for x in v.predicted], [x for v in vs for x in v.digest], hits)
    return out


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else None


def _wins(a: np.ndarray, b: np.ndarray) -> list:
    return [None if (math.isnan(x) or math.isnan(y)) else float(x > y) for x, y in zip(a, b)]


def _margins(a: np.ndarray, b: np.ndarray) -> list:
    return [None if (math.isnan(x) or math.isnan(y)) else math.exp(x) - math.exp(y) for x, y in zip(a, b)]


def efficacy(scores: dict[str, PairScores]) -> dict[str, float | None]:
    """ES and its magnitude from ``prompt`` scores (ROME's efficacy, product-of-tokens probability)."""
    new, true = scores["prompt/new"].logprob, scores["prompt/true"].logprob
    return {"ES": _mean(_wins(new, true)), "ES_magnitude": _mean(_margins(new, true))}


def retention(now: Sequence[bool], right_after: Sequence[float | None]) -> float | None:
    """ERR: of the edits that succeeded right after they were made, the share that still succeed now."""
    worked = [i for i, x in enumerate(right_after) if x]
    return float(np.mean([bool(now[i]) for i in worked])) if worked else None


def counterfact_metrics(edited: dict[str, PairScores], base: dict[str, PairScores] | None = None,
                        serves: Sequence[Callable[[Hit], bool]] | None = None) -> dict[str, float | None]:
    """Every teacher-forced metric from the scores of the edited model (and of the base, measured on
    the same batches). ``serves[i](hit)`` says whether a router hit belongs to record i's edit."""
    m: dict[str, float | None] = dict(efficacy(edited))
    if "rephrase/new" in edited:
        new, true = edited["rephrase/new"].logprob, edited["rephrase/true"].logprob
        m.update(PS=_mean(_wins(new, true)), PS_magnitude=_mean(_margins(new, true)))
        m["generality"] = _mean(edited["rephrase/new"].accuracy)
    m["reliability"] = _mean(edited["prompt/new"].accuracy)
    if "locality/new" in edited:
        new, true = edited["locality/new"].logprob, edited["locality/true"].logprob
        m.update(NS=_mean(_wins(true, new)), NS_magnitude=_mean(_margins(true, new)))
    if base is not None:
        m["ES_base"] = efficacy(base)["ES"]
        if "rephrase/new" in base:
            m["PS_base"] = _mean(_wins(base["rephrase/new"].logprob, base["rephrase/true"].logprob))
        if "locality/new" in base and "locality/new" in edited:
            m["NS_base"] = _mean(_wins(base["locality/true"].logprob, base["locality/new"].logprob))
            e, b = edited["locality/true"], base["locality/true"]
            m["locality"] = _mean([None if not p else float(np.mean(np.equal(p, q))) for p, q in zip(e.predicted, b.predicted)])
            m["bit_identical"] = _mean([None if not d else float(d == c) for d, c in zip(e.digest, b.digest)])
    loc_hits = edited.get("locality/true")
    if loc_hits is not None and loc_hits.hits is not None:
        m["false_fire"] = _mean([float(bool(h)) for h, d in zip(loc_hits.hits, loc_hits.digest) if d])
    reph = edited.get("rephrase/new")
    if serves is not None and reph is not None and reph.hits is not None:
        m["router_recall"] = _mean([float(any(map(f, h))) for f, h, d in zip(serves, reph.hits, reph.digest) if d])
    return m


def names_edited_subject(prompt: str | None, own_subject: str, subjects: Collection[str]) -> bool:
    """Whether ``prompt`` names, as whole words, the subject of an edit other than its own record's."""
    if not prompt:
        return False
    low = prompt.lower()
    return any(s != own_subject and s.lower() in low and mentions(prompt, s) for s in subjects)


def unrelated_locality(edited: dict[str, PairScores], base: dict[str, PairScores],
                       unrelated: Sequence[bool]) -> dict[str, float | None]:
    """Bit-identical share and false-fire rate over the locality prompts with ``unrelated[i]`` (those
    that name no edited subject: :func:`names_edited_subject`), and how many there were."""
    e, b = edited["locality/true"], base["locality/true"]
    rows = [i for i, u in enumerate(unrelated) if u and e.digest[i]]
    m: dict[str, float | None] = {"unrelated_locality_prompts": float(len(rows)),
                                  "bit_identical_unrelated": _mean([float(e.digest[i] == b.digest[i]) for i in rows])}
    if e.hits is not None:
        m["false_fire_unrelated"] = _mean([float(bool(e.hits[i])) for i in rows])
    return m


def generation_success(model, requests: Sequence[EditRequest], batch_size: int = 16, part: str = "prompt",
                       extra_tokens: int = 0) -> list[bool] | tuple[list[bool], list[bool]]:
    """Greedy decoding of each prompt (``part`` 'rephrase': of its paraphrase) starts with its new
    target (as many tokens as the target has). With ``extra_tokens``, that many more are decoded and
    also returned: whether the target occurs anywhere in them (:func:`mentions`)."""
    tok = model.tokenizer
    prompts = [r.text if part == "prompt" else r.rephrase_prompt for r in requests]
    lengths = [len(tok(target_text(p, r.target_new), add_special_tokens=False)["input_ids"]) for p, r in zip(prompts, requests)]
    answers = greedy_batch(model, prompts, [n + extra_tokens for n in lengths], batch_size)
    starts = [reaches(a, r.target_new) for a, r in zip(answers, requests)]  # greedy: the first tokens are the same
    return (starts, [mentions(a, r.target_new) for a, r in zip(answers, requests)]) if extra_tokens else starts


@dataclass
class TextScores:
    nll_sum: float  # summed over every predicted token of every text
    tokens: int
    digest: list[str]  # hash of each text's last-position logits
    hits: list[set[Hit]] | None

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.tokens)


def score_texts(model, texts: Sequence[str], max_tokens: int = 512, routes: bool = False) -> TextScores:
    """Language-model scores of plain texts, each scored alone (at most ``max_tokens`` tokens)."""
    out = TextScores(0.0, 0, [], [] if routes else None)
    for text in texts:
        ids = model.tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens].to(model.device)
        if ids.shape[1] < 2:
            raise ValueError(f"text {text[:40]!r} has fewer than two tokens")
        trace = model.routes() if routes else contextlib.nullcontext()
        with torch.inference_mode(), trace as hits:
            logits = model(input_ids=ids).logits[0].float()
        out.nll_sum += float(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum"))
        out.tokens += ids.shape[1] - 1
        out.digest.append(_digest(logits[-1]))
        if routes:
            out.hits.append({(site, pack, key) for site, _, _, pack, key in hits})
    return out


def perplexity(model, texts: Sequence[str], max_tokens: int = 512) -> float:
    """Perplexity over every token of ``texts`` (each text scored alone)."""
    return score_texts(model, texts, max_tokens).perplexity
