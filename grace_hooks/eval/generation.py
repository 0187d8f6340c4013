"""Greedy decoding for evaluation: batched (left-padded) success checks and timed generation."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


def reaches(answer: str, target: str) -> bool:
    """Whether a continuation starts with ``target`` (surrounding spaces ignored)."""
    return answer.strip().startswith(target.strip())


def mentions(answer: str, target: str) -> bool:
    """Whether ``target`` occurs in a continuation as whole words (case ignored): the looser check
    for paraphrases, whose natural continuation may lead up to the answer ("playing the piano")."""
    return re.search(r"(?<!\w)" + re.escape(target.strip().lower()) + r"(?!\w)", answer.lower()) is not None


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def greedy(model, prompt: str, max_new_tokens: int = 20) -> str:
    """Greedy continuation of ``prompt`` (the new text only, special tokens dropped)."""
    return greedy_batch(model, [prompt], max_new_tokens, batch_size=1)[0]


class _WroteOneOf(StoppingCriteria):
    """Stops a row once its new text (leading space dropped) holds one of ``strings``. Plain decoding
    rather than transformers' ``stop_strings``, which needs a tokenizer whose vocabulary it can map
    to bytes."""

    def __init__(self, tokenizer, start: int, strings: Sequence[str]) -> None:
        self.tokenizer, self.start, self.strings = tokenizer, start, tuple(strings)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([any(s in t.lstrip() for s in self.strings) for t in texts], device=input_ids.device)


def greedy_batch(model, prompts: Sequence[str], max_new_tokens: int | Sequence[int], batch_size: int = 16,
                 special_tokens: bool = True, stop_ids: Sequence[int] | None = None,
                 stop_strings: Sequence[str] | None = None) -> list[str]:
    """Greedy continuations of many prompts, ``batch_size`` at a time with left padding.
    ``max_new_tokens`` may differ per prompt: greedy tokens do not depend on later ones, so each
    row is cut to its own length after decoding a batch to the longest. ``special_tokens``: let the
    tokenizer add its own (False for text that already holds them, e.g. a rendered chat template).
    ``stop_ids`` (default: EOS) end a row; a row may also stop once its text, leading space
    dropped, holds one of ``stop_strings`` (the text past it is the caller's to cut)."""
    tok = model.tokenizer
    stops = list(stop_ids) if stop_ids is not None else tok.eos_token_id
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    side, tok.padding_side = tok.padding_side, "left"
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk, lims = list(prompts[start:start + batch_size]), limits[start:start + batch_size]
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=special_tokens).to(model.device)
            extra = {"stopping_criteria": StoppingCriteriaList([_WroteOneOf(tok, enc["input_ids"].shape[1], stop_strings)])} \
                if stop_strings else {}
            with torch.inference_mode():
                seq = model.generate(**enc, max_new_tokens=max(lims), do_sample=False, num_beams=1,
                                     pad_token_id=_pad_id(tok), eos_token_id=stops, **extra)
            new = seq[:, enc["input_ids"].shape[1]:]
            out += [tok.decode(row[:n], skip_special_tokens=True) for row, n in zip(new, lims)]
    finally:
        tok.padding_side = side
    return out


@dataclass
class Generation:
    """One greedy continuation: its new token ids and text, the seconds ``generate`` took, and each
    step's scores when asked for."""

    ids: list[int]
    text: str
    seconds: float
    scores: torch.Tensor | None = None  # (steps, 1, vocab)


def generate_one(model, prompt: str, max_new_tokens: int, fixed_length: bool = False, scores: bool = False) -> Generation:
    """Greedy continuation of one prompt (batch size 1), timed. ``fixed_length``: EOS cannot stop it
    early, so every call decodes the same number of steps (timings compare)."""
    tok = model.tokenizer
    enc = tok(prompt, return_tensors="pt").to(model.device)
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=_pad_id(tok))
    if fixed_length:
        kw["min_new_tokens"] = max_new_tokens
    if scores:
        kw.update(return_dict_in_generate=True, output_scores=True)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(**enc, **kw)
        secs = time.perf_counter() - t0
    new = (out.sequences if scores else out)[0, enc["input_ids"].shape[1]:]
    return Generation(new.tolist(), tok.decode(new, skip_special_tokens=True), secs,
                      torch.stack(out.scores) if scores else None)


def timed_generation(model, prompt: str, new_tokens: int) -> tuple[float, list[int]]:
    """Seconds for ``new_tokens`` greedy tokens (EOS cannot stop it early, so calls compare)."""
    g = generate_one(model, prompt, new_tokens, fixed_length=True)
    return g.seconds, g.ids
