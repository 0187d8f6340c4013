"""Target vectors z: the residual stream at the last subject token that makes the new target likely.

MEMIT (Meng et al. 2023, eq. 16): z = h + argmin_delta of the target's NLL over the context-prefixed
prompts, plus a KL term on "{subject} is a" (keeps the subject's meaning) and a weight decay, with
|delta| clamped to ``clamp`` |h|. ENCORE (Gupta et al. 2025) stops as soon as the target is the
most probable continuation of every rewrite prompt ("most-probable early stopping").
"""
from __future__ import annotations

from dataclasses import dataclass
import contextlib
import math
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..bases.architectures import arch_spec
from ..bases.hooks import frozen_parameters
from ..config import option
from ..questions import edit_question
from ..requests import EditRequest
from ..tokens import EditBatch, build_pair_batch, chat_wrapping, score_targets, scored_positions, target_text, text_tokens
from .replay import LayerReplay


@dataclass
class TargetVectorConfig:
    lr: float = option(0.5, "Adam learning rate of delta (MEMIT's)")
    steps: int = option(25, "at most this many optimisation steps per request")
    kl_factor: float = option(0.0625, "weight of the KL term on '{subject} is a' (0 = no KL prompts are run)")
    weight_decay: float = option(0.5, "weight of |delta| / |h|^2")
    clamp: float = option(0.75, "|delta| <= clamp * |h|")
    batch_size: int = option(8, "requests optimised together (one delta each); memory grows with it")
    stop: str = option("loss", "'loss': stop when the loss < 5e-2 (MEMIT); 'most_probable': stop once the target "
                       "is the argmax on every rewrite prompt (ENCORE)", choices=("loss", "most_probable"))
    stop_prob: float = option(0.0, "with stop 'most_probable': also wait until every rewrite prompt gives each target token "
                                   "at least this probability on average (geometric mean), a margin for what the spread "
                                   "over blocks loses")
    chat_form: bool = option(False, "also optimise each target vector on its prompt asked as a user turn of the "
                                    "tokenizer's chat template, the target opening the assistant's answer (instruct "
                                    "models: edits reach questions asked in a chat); no effect without a template")
    question_form: bool = option(False, "also optimise each target vector on a question about the request's subject: "
                                        "its relation's edit wording (grace_hooks.questions; the evaluation never asks "
                                        "it), in chat form where the tokenizer has a template, the target opening the "
                                        "answer; requests of unknown relations, or already questions, get none")
    question_stop: bool = option(True, "with question_form: the most-probable stop also waits for the question's "
                                       "row (False: the question only pulls on the loss while the prompts decide "
                                       "when to stop, about half the steps)")
    question_answer: str = option("target", "with question_form: the answer the question's row is optimised on: "
                                            "'target' (the answer opens with the new target) or 'statement' (the "
                                            "edit's prompt completed by the target, so the answer names the subject "
                                            "again before the new fact)", ("target", "statement"))


@dataclass
class TargetVector:
    z: torch.Tensor  # (d_model,) h + delta
    h: torch.Tensor  # (d_model,) the residual before the edit, at the bare prompt's subject token
    steps: int
    target_prob: float  # mean over rewrite prompts of P(target), at the end


def target_vectors(model, tokenizer, layer: int, requests: Sequence[EditRequest], prefixes: Sequence[str],
                   cfg: TargetVectorConfig | None = None, real_positions=None, cached_prefix: bool = True) -> list[TargetVector]:
    """Optimise one delta per request at the output of block ``layer`` (the model is not changed).

    Requests are optimised ``cfg.batch_size`` at a time (those of like length together), each with its
    own delta, loss and early stop (Adam is per coordinate, so this equals one run per request). Blocks up to ``layer`` run
    once: every step replays the blocks above it. ``real_positions(mask)``: a context manager that
    tells hooks on the replayed blocks which positions are real (``EditRuntime.attention_mask``).
    ``cached_prefix``: replay only the columns from the key token on (exact: nothing before the key
    depends on the delta; False replays every column, for comparison). ``tokenizer``: a tokenizer or
    the edit's :class:`~grace_hooks.tokens.TextTokens` (each text is then tokenised once per edit).
    """
    cfg = cfg or TargetVectorConfig()
    tokenizer = text_tokens(tokenizer)
    n_blocks = len(model.get_submodule(arch_spec(model).layers))
    if not 0 <= layer < n_blocks - 1:
        raise ValueError(f"target vectors are optimised at the output of block {layer}: it must be below the last "
                         f"block ({n_blocks - 1}); edit earlier layers")
    out: list[TargetVector | None] = [None] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: replayed_columns(tokenizer, requests[i]))  # less padding
    with frozen_parameters(model):
        for lo in range(0, len(requests), cfg.batch_size):
            rows = order[lo:lo + cfg.batch_size]
            found = _optimise(model, tokenizer, layer, [requests[i] for i in rows], prefixes, cfg, real_positions,
                              cached_prefix)
            for i, vector in zip(rows, found):
                out[i] = vector
    return out


def replayed_columns(tokenizer, request: EditRequest) -> int:
    """Columns a cached-suffix replay of the bare prompt + target runs: from the key token on. Requests
    optimised together are padded to the longest, so like lengths go together."""
    tokens, text = text_tokens(tokenizer), request.text
    total = len(tokens.ids(text)) + len(tokens.target_ids(text, request.target_new))
    return total - tokens.key_positions([request])[0]


def target_vector(model, tokenizer, layer: int, request: EditRequest, prefixes: Sequence[str],
                  cfg: TargetVectorConfig | None = None) -> TargetVector:
    return target_vectors(model, tokenizer, layer, [request], prefixes, cfg)[0]


class _Rows:
    """A replay of some prompts from block ``layer + 1``, with the delta slot of each row.

    Every row's key token is shifted into one column (left padding), and only the columns from
    there on are replayed: nothing before the key depends on the delta (about a third of the work).
    """

    def __init__(self, model, layer, batch: EditBatch, owner: torch.Tensor, real_positions, cached_prefix=True,
                 _replay=None, gates: torch.Tensor | None = None):
        self.batch, self.owner = batch, owner  # owner[row] = request index within the chunk
        self.gates = gates if gates is not None else torch.ones(len(owner), dtype=torch.bool)  # rows the stop waits for
        self.real_positions = real_positions or (lambda mask, input_ids=None: contextlib.nullcontext())
        with self.real_positions(batch.attention_mask, batch.input_ids):
            self.replay = _replay or LayerReplay(model, layer + 1, batch.input_ids, batch.attention_mask,
                                                 start=int(batch.key_pos.min()) if cached_prefix else 0,
                                                 position_ids=batch.position_ids())
        self.index, self.scored = scored_positions(batch)

    def key_columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, columns of ``replay.hidden_in``) of each row's key token."""
        return torch.arange(len(self.owner)), self.batch.key_pos.cpu() - self.replay.start

    def logits(self, delta: torch.Tensor, index=None) -> torch.Tensor:
        rows, cols = self.key_columns()
        # the offset keeps the delta's float32; the replay adds it to the block input in float32 and rounds once
        offset = torch.zeros_like(self.replay.hidden_in, dtype=delta.dtype)
        offset = offset.index_put((rows.to(delta.device), cols.to(delta.device)), delta[self.owner.to(delta.device)])
        with self.real_positions(self.batch.attention_mask, self.batch.input_ids):
            return self.replay.logits(self.index if index is None else index, offset=offset)

    def select(self, rows: torch.Tensor, renumber: torch.Tensor) -> "_Rows":
        batch = self.batch.rows(rows)
        with self.real_positions(batch.attention_mask, batch.input_ids):
            replay = self.replay.select(rows)
        return _Rows(None, None, batch, renumber[self.owner[rows]], self.real_positions, _replay=replay,
                     gates=self.gates[rows])


def _replayed_rows(model, tokenizer, layer, rows, device, real_positions, cached_prefix) -> _Rows:
    """The replay of ``rows``: (text, index of the key token, target, owning request, whether the stop waits for it)."""
    texts, lookups, targets, owners, gates = zip(*rows)
    batch = build_pair_batch(tokenizer, texts, targets, lookups, device).aligned_keys()
    return _Rows(model, layer, batch, torch.tensor(owners), real_positions, cached_prefix, gates=torch.tensor(gates))


class _RowGroups:
    """Groups of rows replayed apart, read as one list of rows (group after group). A question in chat
    form replays about twice the columns of a cloze prompt after the key: padded together, the cloze rows
    would pay for the question's columns."""

    def __init__(self, groups: list[_Rows]):
        self.groups = groups
        self.owner = torch.cat([g.owner for g in groups])
        self.gates = torch.cat([g.gates for g in groups])

    def scores(self, delta: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's mean target NLL (differentiable) and whether its target is the argmax, on ``device``
        (the logits' device, the head's, may differ from the delta's)."""
        found = [score_targets(g.logits(delta), g.scored) for g in self.groups]
        return torch.cat([s.nll.to(device) for s in found]), torch.cat([s.correct.to(device) for s in found])

    def select(self, keep: torch.Tensor, renumber: torch.Tensor) -> "_RowGroups":
        """The rows of requests ``keep`` (chunk indices), renumbered by ``renumber``; empty groups go."""
        kept = [(g, torch.isin(g.owner, keep).nonzero().squeeze(1)) for g in self.groups]
        return _RowGroups([g.select(rows, renumber) for g, rows in kept if len(rows)])


def _optimise(model, tokenizer, layer, requests, prefixes, cfg: TargetVectorConfig, real_positions,
              cached_prefix: bool) -> list[TargetVector]:
    device = next(model.parameters()).device
    contexts = rewrite_contexts(tokenizer, prefixes, cfg.chat_form)
    asked_as = (chat_wrapping(tokenizer) or ("", "")) if cfg.question_form else None
    n = len(requests)
    rows: list[list] = [[], []]  # [the prompts in their contexts, the questions]: replayed apart (see _RowGroups)
    bare = []  # each request's bare-prompt row (its first) in the first group: h is the residual there
    for i, r in enumerate(requests):
        bare.append(len(rows[0]))
        for j, row in enumerate(rewrite_rows(tokenizer, r, contexts, asked_as, cfg.question_answer)):
            asked = j >= len(contexts)  # rows past the contexts: the question
            rows[asked].append((*row, i, not asked or cfg.question_stop))
    n_rows = torch.bincount(torch.tensor([row[3] for group in rows for row in group]), minlength=n).to(torch.float32)
    rewrite = _RowGroups([_replayed_rows(model, tokenizer, layer, group, device, real_positions, cached_prefix)
                          for group in rows if group])
    kl = _KLTerm(model, tokenizer, layer, requests, device, real_positions, cached_prefix) if cfg.kl_factor else None

    prompts, bare = rewrite.groups[0], torch.tensor(bare)
    key_rows, key_cols = prompts.key_columns()
    hidden = prompts.replay.hidden_in
    dev = hidden.device  # block layer + 1's input: not the embedding's device when the model is split over several
    # float32: h, the delta and Adam's moments are float32 even when the model is bfloat16, whose 8 bits
    # would round lr-sized steps away; the loss is float32 too (score_targets upcasts the logits)
    h = hidden[key_rows[bare].to(dev), key_cols[bare].to(dev)].to(torch.float32)  # (n, d): the residual before the edit
    delta = torch.zeros_like(h, dtype=torch.float32, requires_grad=True)  # z - h
    opt = torch.optim.Adam([delta], lr=cfg.lr)

    if kl is not None:
        kl.start(torch.zeros_like(h))
    min_logprob = math.log(cfg.stop_prob) if cfg.stop_prob > 0 else -math.inf
    steps = torch.zeros(n, dtype=torch.long)
    prob = torch.zeros(n, dtype=torch.float32)
    live = torch.ones(n, dtype=torch.bool)
    rw, ids = rewrite, torch.arange(n)  # the rows of the live requests
    bar = tqdm(total=cfg.steps, desc=f"target vectors of {n} request(s)", unit="step", leave=False, disable=None)
    for step in range(1, cfg.steps + 1):
        bar.update()
        bar.set_postfix(optimising=len(ids))
        d = delta[ids.to(dev)]
        row_nll, row_correct = rw.scores(d, dev)
        m = len(ids)
        owner_rows = rw.owner.to(dev)
        per_request = n_rows[ids].to(dev)
        nll = torch.zeros(m, dtype=torch.float32, device=dev).index_add(0, owner_rows, row_nll) / per_request
        hn = h[ids.to(dev)].norm(dim=1)
        loss = nll + cfg.weight_decay * d.norm(dim=1) / hn ** 2
        if kl is not None:
            loss = loss + cfg.kl_factor * kl.divergence(d, ids).to(dev)
        short = ~row_correct | (row_nll.detach() > -min_logprob)  # a rewrite prompt not yet where the stop wants it
        short = short & rw.gates.to(dev)
        all_right = torch.zeros(m, dtype=torch.float32, device=dev).index_add(0, owner_rows, short.float()) == 0
        with torch.no_grad():
            prob[ids] = (torch.zeros(m, dtype=torch.float32, device=dev).index_add(0, owner_rows, torch.exp(-row_nll))
                         / per_request).cpu()
        steps[ids] = step
        done = (all_right if cfg.stop == "most_probable" else loss.detach() < 5e-2).cpu()
        if step == cfg.steps or bool(done.all()):
            break
        live[ids[done]] = False
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        frozen = delta.detach()[~live.to(dev)].clone()
        opt.step()
        with torch.no_grad():
            delta[~live.to(dev)] = frozen  # finished requests keep their delta (Adam's momentum would move it)
            norms, limit = delta.norm(dim=1), cfg.clamp * h.norm(dim=1)
            # project back into the ball |delta| <= clamp |h| (MEMIT eq. 16's clamp)
            over = norms > limit
            delta[over] *= (limit[over] / norms[over])[:, None]
        if bool(done.any()):  # replay only the rows of the requests still optimised
            keep = (~done).nonzero().squeeze(1)
            local = torch.full((m,), -1, dtype=torch.long)
            local[keep] = torch.arange(len(keep))
            rw = rw.select(keep, local)
            if kl is not None:
                kl.select(keep, local)
            ids = ids[keep]
    bar.close()
    with torch.no_grad():
        z = (h + delta.detach()).cpu()
    return [TargetVector(z=z[i], h=h[i].cpu(), steps=int(steps[i]), target_prob=float(prob[i])) for i in range(n)]


def rewrite_contexts(tokenizer, prefixes: Sequence[str], chat_form: bool) -> list[tuple[str, str]]:
    """(before, after) of each text a request's prompt is optimised in: the context prefixes ("" first),
    then, with ``chat_form`` and a chat template, the prompt as a user turn with the answer's turn open."""
    contexts = [(p, "") for p in prefixes]
    wrapping = chat_wrapping(tokenizer) if chat_form else None
    return contexts + [wrapping] if wrapping is not None else contexts


def rewrite_rows(tokenizer, request: EditRequest, contexts: Sequence[tuple[str, str]],
                 asked_as: tuple[str, str] | None = None, answer: str = "target") -> list[tuple[str, int, str]]:
    """(text, index of the last subject token, target) of each text ``request``'s target vector is
    optimised on: its prompt in each of ``contexts``, then, with ``asked_as`` (the (before, after) of a
    question in chat form), its relation's edit question (:func:`grace_hooks.questions.edit_question`)
    if it has one, answered by the target or (``answer="statement"``) by the prompt completed with it."""
    tokens = text_tokens(tokenizer)
    rows = [(before + request.text + after, tokens.key_positions([request], before)[0], request.target_new)
            for before, after in contexts]
    question = edit_question(request) if asked_as is not None else None
    if question is not None:
        before, after = asked_as
        asked = EditRequest(prompt=question, subject=request.subject, target_new=request.target_new)
        said = request.target_new if answer == "target" else request.text.strip() + target_text(request.text, request.target_new)
        rows.append((before + question + after, tokens.key_positions([asked], before)[0], said))
    return rows


class _KLTerm:
    """MEMIT's KL term: the next-token distribution at the subject of "{subject} is a" should stay
    what it was before the edit (keeps the subject's other properties)."""

    def __init__(self, model, tokenizer, layer, requests, device, real_positions, cached_prefix):
        n = len(requests)
        prompts = [EditRequest(prompt="{} is a", subject=r.subject, target_new="x") for r in requests]
        batch = build_pair_batch(tokenizer, [k.text for k in prompts], ["x"] * n,
                                 text_tokens(tokenizer).key_positions(prompts), device).aligned_keys()
        batch = batch.up_to_keys()  # the divergence is read at the subject token: the columns after it are wasted work
        self.rows = _Rows(model, layer, batch, torch.arange(n), real_positions, cached_prefix)
        self.device = device

    def _logp(self, delta: torch.Tensor) -> torch.Tensor:
        index = (torch.arange(len(self.rows.owner), device=self.device), self.rows.batch.key_pos)  # at the subject token
        return torch.log_softmax(self.rows.logits(delta, index).float(), -1)  # float32: a KL of bf16 log-probs is noise

    def start(self, delta: torch.Tensor) -> None:
        self.initial = self._logp(delta)

    def divergence(self, delta: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """KL(current || initial) per live request, as MEMIT."""
        logp = self._logp(delta)
        return (logp.exp() * (logp - self.initial[ids.to(self.initial.device)])).sum(-1)

    def select(self, keep: torch.Tensor, renumber: torch.Tensor) -> None:
        self.rows = self.rows.select(keep, renumber)


def block_width(model) -> int:
    """Width of the residual stream (hidden size)."""
    return model.get_input_embeddings().weight.shape[1]
