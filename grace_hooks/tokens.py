"""Tokenising edit requests (prompt + target), key positions, and teacher-forced target scoring.

Shared by every method and by the evaluation code: one place for "where is the key token" and
"is the target the argmax".
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from .requests import EditRequest

KEY_POSITIONS = ("prompt_last", "subject_last")


def target_text(prompt: str, target: str) -> str:
    """The target as it continues the prompt: with a leading space unless the prompt ends in one."""
    target = target.strip()
    return target if prompt.endswith((" ", "\n")) else " " + target


_PLACEHOLDER = "\x1fuser-text\x1f"


def chat_wrapping(tokenizer) -> tuple[str, str] | None:
    """(before, after): what the tokenizer's chat template writes around one user turn's text, with the
    assistant's turn opened, so ``before + text + after`` is the text asked in chat form; None without
    a template (or one that does not keep the text verbatim). ``tokenizer`` may be a :class:`TextTokens`."""
    tokenizer = tokenizer.tokenizer if isinstance(tokenizer, TextTokens) else tokenizer
    if not getattr(tokenizer, "chat_template", None):
        return None
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _PLACEHOLDER}], tokenize=False,
                                             add_generation_prompt=True)
    before, found, after = rendered.partition(_PLACEHOLDER)
    return (before, after) if found else None


def chat_form_requests(tokenizer, requests: Sequence[EditRequest]) -> list[EditRequest]:
    """Each request with its prompt asked as a user turn of the tokenizer's chat template, the answer's
    turn open and the subject verbatim; [] without a template (see :func:`chat_wrapping`)."""
    wrapping = chat_wrapping(tokenizer)
    if wrapping is None:
        return []
    before, after = wrapping
    return [replace(r, prompt=before + r.text + after) for r in requests]


class TextTokens:
    """The token ids of the texts one edit reads, each text tokenised once (with character offsets, for
    subject positions) and each target once per prompt ending, then shared by every step that reads it:
    keys, target vectors, residuals, the landing check. Any function here that takes a tokenizer also
    takes one of these (:func:`text_tokens`); pass the same object along to tokenise once."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[str, tuple[list[int], list[tuple[int, int]] | None]] = {}
        self._targets: dict[str, list[int]] = {}

    def _encoded(self, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
        if text not in self._texts:
            try:
                enc = self.tokenizer(text, return_offsets_mapping=True)
                self._texts[text] = (list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]])
            except NotImplementedError:  # a tokenizer without offsets (Python tokenizers)
                self._texts[text] = (list(self.tokenizer(text)["input_ids"]), None)
        return self._texts[text]

    def ids(self, text: str) -> list[int]:
        """``tokenizer(text)["input_ids"]`` (special tokens added as the tokenizer adds them)."""
        return self._encoded(text)[0]

    def subject_last(self, text: str, span: tuple[int, int]) -> int:
        """Index of the last token overlapping the character span ``span`` of ``text``."""
        ids, offsets = self._encoded(text)
        end = span[1]
        idx = [i for i, (a, b) in enumerate(offsets or ()) if a < end and b > a]
        if idx:
            return max(i for i in idx if offsets[i][0] < end)
        # Tokenizers without offsets: the prefix ending at the subject has the same tokens (ROME's way).
        return len(self.ids(text[:end])) - 1

    def target_ids(self, prompt: str, target: str) -> list[int]:
        """The target's ids as it continues ``prompt`` (:func:`target_text`), no special tokens."""
        text = target_text(prompt, target)
        if text not in self._targets:
            self._targets[text] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._targets[text]

    def key_positions(self, requests: Sequence[EditRequest], before: str = "") -> list[int]:
        """Index of the last subject token in ``before + request.text`` for each request."""
        out = []
        for r in requests:
            start, end = r.subject_span()
            out.append(self.subject_last(before + r.text, (start + len(before), end + len(before))))
        return out

    def padded(self, texts: Sequence[str], device=None) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids`` and ``attention_mask`` of ``texts`` (a padded tokenizer call's)."""
        seqs = [self.ids(t) for t in texts]
        ids, mask = _right_padded(seqs, self.pad_id)
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0


def text_tokens(tokenizer_or_tokens) -> TextTokens:
    """The :class:`TextTokens` passed in, or a new one over a tokenizer."""
    return tokenizer_or_tokens if isinstance(tokenizer_or_tokens, TextTokens) else TextTokens(tokenizer_or_tokens)


def _right_padded(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, : len(s)] = 1
    return ids, mask


@dataclass
class EditBatch:
    """Padded prompt+target sequences of a list of requests: right-padded, or also left-padded by
    ``left`` columns (then every position, the key's included, counts those columns)."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    prompt_len: torch.Tensor  # (B,) number of prompt tokens
    target_len: torch.Tensor  # (B,)
    key_pos: torch.Tensor  # (B,) column of the key token
    left: torch.Tensor | None = None  # (B,) left padding columns

    def target_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) of every target token, the token at column t predicted by the logits at t - 1."""
        rows, cols = [], []
        left = self.left.tolist() if self.left is not None else [0] * len(self.prompt_len)
        for b, (p, n, s) in enumerate(zip(self.prompt_len.tolist(), self.target_len.tolist(), left)):
            rows += [b] * n
            cols += list(range(s + p, s + p + n))
        return torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)

    def position_ids(self) -> torch.Tensor | None:
        """Each token's position in its own sequence (None when no row is left-padded)."""
        if self.left is None:
            return None
        return (self.attention_mask.cumsum(1) - 1).clamp(min=0)

    def aligned_keys(self) -> "EditBatch":
        """The same rows shifted right by left padding so that every key token sits in one column, the
        first column a cached-suffix replay has to recompute (``LayerReplay(start=key column)``)."""
        if self.left is not None:
            raise ValueError("this batch is already left-padded")
        shift = int(self.key_pos.max()) - self.key_pos
        lengths = self.attention_mask.sum(1)
        width = int((shift + lengths).max())
        ids = torch.full((len(shift), width), 0, dtype=self.input_ids.dtype, device=self.input_ids.device)
        mask = torch.zeros_like(ids, dtype=self.attention_mask.dtype)
        for b, (s, n) in enumerate(zip(shift.tolist(), lengths.tolist())):
            ids[b, s: s + n], mask[b, s: s + n] = self.input_ids[b, :n], 1
        return EditBatch(ids, mask, self.prompt_len, self.target_len, self.key_pos + shift, shift)

    def up_to_keys(self) -> "EditBatch":
        """The same rows cut after the last key column: what a read at the key tokens alone needs
        (causal attention: later columns change nothing there)."""
        width = int(self.key_pos.max()) + 1
        return EditBatch(self.input_ids[:, :width], self.attention_mask[:, :width], self.prompt_len, self.target_len,
                         self.key_pos, self.left)

    def with_next_tokens(self, next_ids: torch.Tensor) -> "EditBatch":
        """The same right-padded rows with one more target token each: ``next_ids[b]`` after row b's
        target (e.g. the token that ends the answer, so an edit learns where its answer stops)."""
        if self.left is not None:
            raise ValueError("only a right-padded batch can be extended")
        ends = (self.prompt_len + self.target_len).tolist()
        width = max(self.input_ids.shape[1], max(ends) + 1)
        grow = width - self.input_ids.shape[1]  # new columns repeat the last one (padding where unused)
        ids = torch.cat([self.input_ids, self.input_ids[:, -1:].expand(-1, grow)], dim=1)
        mask = torch.cat([self.attention_mask, torch.zeros_like(self.attention_mask[:, :grow])], dim=1)
        for b, n in enumerate(ends):
            ids[b, n], mask[b, n] = next_ids[b], 1
        return EditBatch(ids, mask, self.prompt_len, self.target_len + 1, self.key_pos)

    def rows(self, rows: torch.Tensor) -> "EditBatch":
        """The batch of rows ``rows`` (same width)."""
        pick = lambda t: None if t is None else t[rows.to(t.device)]  # noqa: E731
        return EditBatch(pick(self.input_ids), pick(self.attention_mask), pick(self.prompt_len), pick(self.target_len),
                         pick(self.key_pos), pick(self.left))


def build_pair_batch(tokenizer, prompts: Sequence[str], targets: Sequence[str], key_pos: Sequence[int] | None = None,
                     device=None) -> EditBatch:
    """Right-padded ``prompt + target`` sequences; the key defaults to the last prompt token.
    ``tokenizer``: a tokenizer or a :class:`TextTokens` (then nothing it has seen is tokenised again)."""
    tokens = text_tokens(tokenizer)
    seqs, p_lens, t_lens = [], [], []
    for prompt, target in zip(prompts, targets, strict=True):
        prompt_ids = tokens.ids(prompt)
        tgt_ids = tokens.target_ids(prompt, target)
        if not tgt_ids:
            raise ValueError(f"target {target!r} tokenises to nothing")
        seqs.append(prompt_ids + tgt_ids)
        p_lens.append(len(prompt_ids))
        t_lens.append(len(tgt_ids))
    keys = list(key_pos) if key_pos is not None else [n - 1 for n in p_lens]
    ids, mask = _right_padded(seqs, tokens.pad_id)
    as_t = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return EditBatch(ids.to(device), mask.to(device), as_t(p_lens), as_t(t_lens), as_t(keys))


def build_edit_batch(tokenizer, requests: Sequence[EditRequest], key: str = "prompt_last", device=None) -> EditBatch:
    if key not in KEY_POSITIONS:
        raise ValueError(f"key must be one of {KEY_POSITIONS}, got {key!r}")
    tokens = text_tokens(tokenizer)
    prompts = [r.text for r in requests]
    keys = None if key == "prompt_last" else tokens.key_positions(requests)
    return build_pair_batch(tokens, prompts, [r.target_new for r in requests], keys, device)


def scored_positions(batch: EditBatch) -> tuple[tuple[torch.Tensor, torch.Tensor], EditBatch]:
    """The (rows, cols) of the logits that scoring reads, and the batch to score those logits with:
    row b keeps positions prompt_len - 1 .. prompt_len + target_len - 1 (the head runs on these only)."""
    width = int(batch.target_len.max()) + 1
    rows = torch.arange(len(batch.prompt_len), device=batch.input_ids.device)[:, None].expand(-1, width)
    first = batch.prompt_len - 1 + (batch.left if batch.left is not None else 0)
    cols = (first[:, None] + torch.arange(width, device=batch.input_ids.device)).clamp(max=batch.input_ids.shape[1] - 1)
    ones = torch.ones_like(batch.prompt_len)
    return (rows, cols), EditBatch(batch.input_ids[rows, cols], batch.attention_mask[rows, cols], ones, batch.target_len, ones - 1)


@dataclass
class TargetScores:
    nll: torch.Tensor  # (B,) mean NLL per target token, differentiable
    correct: torch.Tensor  # (B,) bool: every target token is the argmax (teacher forced)
    logprob: torch.Tensor  # (B,) log P(target | prompt): the sum over target tokens
    accuracy: torch.Tensor  # (B,) share of target tokens that are the argmax (EasyEdit's token accuracy)
    predicted: list[list[int]]  # argmax token at each target position, per row


def score_targets(logits: torch.Tensor, batch: EditBatch) -> TargetScores:
    rows, cols = batch.target_positions()
    rows, cols = rows.to(logits.device), cols.to(logits.device)
    targets = batch.input_ids.to(logits.device)[rows, cols]  # the head may sit on another GPU than the inputs
    step_logits = logits[rows, cols - 1].float()
    token_nll = torch.nn.functional.cross_entropy(step_logits, targets, reduction="none")
    predicted = step_logits.argmax(-1)
    token_ok = predicted == targets
    n = len(batch.prompt_len)
    counts = batch.target_len.to(logits.device).float()
    total = torch.zeros(n, device=logits.device).index_add(0, rows, token_nll)
    right = torch.zeros(n, device=logits.device).index_add(0, rows, token_ok.float())
    per_row = predicted.detach().cpu().split(batch.target_len.tolist())
    return TargetScores(nll=total / counts, correct=right == counts, logprob=-total.detach(),
                        accuracy=(right / counts).detach(), predicted=[p.tolist() for p in per_row])
