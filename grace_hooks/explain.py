"""Why did this answer change? For each generated token, the loaded packs that acted on the forward
that produced it (site, input position, router key), the requests each firing key serves, and the
answer with each acting pack left out.

The answer is decoded greedily with the KV cache, one forward per token, exactly as ``generate``
decodes it, and each forward is traced (:meth:`EditableModel.routes`). A pack acts on a forward
where one of its router keys claimed a position, or a family's own gate fired, or the pack has no
router keys at a site at all (a global weight delta acts at every position): those are listed
apart. "Left out" is exact: the stack is rebuilt without the pack for that one generation
(:meth:`EditableModel.without`), then restored.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .locate.replay import cache_argument

MAX_LEFT_OUT = 8  # generations with one pack left out, at most (one each): the rest are named, not run


@dataclass(frozen=True)
class Firing:
    """One claimed input position at one site: ``pack`` (a pack name, or ``<name gate>`` where a
    family's gate fired without a key), the router key's index in that pack (-1 for a gate) and the
    requests that key serves (each as prompt, subject and target_new)."""

    site: str
    position: int
    token: str
    pack: str
    key: int
    requests: tuple[dict, ...] = ()


@dataclass(frozen=True)
class TokenStep:
    """A generated token and the firings on the forward that produced it (the first forward reads
    the whole prompt, so its firings sit at prompt positions)."""

    token: str
    firings: tuple[Firing, ...]


@dataclass(frozen=True)
class Explanation:
    prompt: str
    answer: str
    steps: tuple[TokenStep, ...]
    keyless: tuple[str, ...]  # packs with no router keys at some site: they act wherever their layer says
    without: dict[str, str] = field(default_factory=dict)  # pack -> the answer with it left out
    not_left_out: tuple[str, ...] = ()  # acting packs past MAX_LEFT_OUT: no generation was run without them

    @property
    def acting(self) -> list[str]:
        """Packs that acted, in the order they first did (keyless packs last)."""
        seen = dict.fromkeys(f.pack for s in self.steps for f in s.firings if not f.pack.startswith("<"))
        return list(seen) + [p for p in self.keyless if p not in seen]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["acting"] = self.acting
        return out

    def lines(self) -> list[str]:
        """The explanation for a person, one line per fact."""
        if not self.acting and not any(s.firings for s in self.steps):
            return [f"answer: {self.answer!r}", "no loaded pack acted on this prompt or its answer (the base model's own)"]
        out = [f"answer: {self.answer!r}"]
        for i, step in enumerate(self.steps):
            sites: dict[tuple, list[Firing]] = {}  # one line per key and position, naming every site it fired at
            for f in step.firings:
                sites.setdefault((f.pack, f.key, f.position, f.token), []).append(f)
            for (pack, key, position, token), fired in sites.items():
                where, requests = [f.site for f in fired], fired[0].requests
                serves = "; ".join(f"{r.get('prompt', '').replace('{}', r.get('subject', ''))!r} -> {r.get('target_new')!r}"
                                   for r in requests) or "(no request recorded)"
                who = pack if key < 0 else f"{pack} key {key}"
                out.append(f"token {i} {step.token!r}: {who} at {', '.join(where)}, position {position} {token!r}: {serves}")
        for pack in self.keyless:
            out.append(f"{pack}: no router keys at a site, acts there wherever its method does (a global delta: everywhere)")
        for pack, answer in self.without.items():
            out.append(f"without {pack}: {answer!r}")
        if self.not_left_out:
            out.append(f"not left out (over {MAX_LEFT_OUT}): {', '.join(self.not_left_out)}")
        return out


def greedy_traced(em, prompt: str, max_new_tokens: int, stop_ids: tuple[int, ...] = (),
                  add_special_tokens: bool = True) -> tuple[list[int], list[int], list[list[tuple]]]:
    """(prompt ids, generated ids, per generated token the trace of its forward with absolute positions):
    greedy decoding with the KV cache, a forward per token."""
    tok = em.tokenizer
    device = em.device
    ids = tok(prompt, return_tensors="pt", add_special_tokens=add_special_tokens)["input_ids"].to(device)
    prompt_ids = ids[0].tolist()
    mask = torch.ones_like(ids)
    step_ids, past, offset = ids, None, 0
    cache_kwarg = cache_argument(em.base_model)  # 'cache' from transformers 5.24, 'past_key_values' before
    generated: list[int] = []
    traces: list[list[tuple]] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            with em.routes(every=True) as hits:
                out = em(input_ids=step_ids, attention_mask=mask, use_cache=True, **{cache_kwarg: past})
            traces.append([(site, row, offset + pos, pack, key) for site, row, pos, pack, key in hits])
            nxt = int(out.logits[0, -1].argmax())
            generated.append(nxt)
            if nxt in stop_ids:
                break
            offset += step_ids.shape[1]
            past = out[cache_kwarg] if cache_kwarg in out else out["past_key_values"]
            step_ids = torch.tensor([[nxt]], device=device)
            mask = torch.cat([mask, torch.ones_like(step_ids)], 1)
    return prompt_ids, generated, traces


def explain(em, prompt: str, max_new_tokens: int = 20, stop_ids: tuple[int, ...] = (), add_special_tokens: bool = True,
            keyless: tuple[str, ...] = (), max_left_out: int = MAX_LEFT_OUT) -> Explanation:
    """:class:`Explanation` of ``em``'s greedy answer to ``prompt`` (see the module's docstring);
    ``keyless``: the loaded packs without router keys at some site (the model knows them)."""
    tok = em.tokenizer
    with em.exclusive():  # one stack of packs for the answer and every left-out generation
        prompt_ids, generated, traces = greedy_traced(em, prompt, max_new_tokens, stop_ids, add_special_tokens)
        seq = prompt_ids + generated
        steps = []
        for token_id, trace in zip(generated, traces):
            firings = tuple(Firing(site, pos, tok.decode([seq[pos]]), pack, key, _requests(em, pack, site, key))
                            for site, _, pos, pack, key in sorted(set(trace), key=lambda h: (h[2], h[0], h[3], h[4])))
            steps.append(TokenStep(tok.decode([token_id]), firings))
        answer = tok.decode(generated, skip_special_tokens=True)
        acting = Explanation(prompt, answer, tuple(steps), keyless).acting
        without = {}
        for pack in acting[:max_left_out]:
            with em.without(pack):
                without[pack] = tok.decode(greedy_traced(em, prompt, max_new_tokens, stop_ids, add_special_tokens)[1],
                                           skip_special_tokens=True)
    return Explanation(prompt, answer, tuple(steps), keyless, without, tuple(acting[max_left_out:]))


def _requests(em, pack_name: str, site: str, key: int) -> tuple[dict, ...]:
    """The requests (prompt, subject, target_new) router key ``key`` of pack ``pack_name`` serves at ``site``."""
    if key < 0:
        return ()
    pack = em.pack(pack_name)
    served = (pack.routing.key_requests or {}).get(site)
    if served is None or key >= len(served):
        return ()
    fields = ("prompt", "subject", "target_new")
    return tuple({k: pack.requests[i].get(k) for k in fields} for i in served[key] if 0 <= i < len(pack.requests))


__all__ = ["Explanation", "Firing", "MAX_LEFT_OUT", "TokenStep", "explain", "greedy_traced"]
