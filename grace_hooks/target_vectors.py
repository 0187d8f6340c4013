"""Target vectors z: the residual stream at the last subject token that makes the new target likely.

MEMIT (Meng et al. 2023, eq. 16): z = h + argmin_delta of the target's NLL over the context-prefixed
prompts, plus a KL term on "{subject} is a" (keeps the subject's meaning) and a weight decay, with
|delta| clamped to ``clamp`` |h|. ENCORE (Gupta et al. 2025) stops as soon as the target is the
most probable continuation of every rewrite prompt ("most-probable early stopping").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .architectures import arch_spec
from .config import option
from .hooks import HookOwner, frozen_parameters
from .requests import EditRequest
from .subject_keys import lookup_positions
from .tokens import build_pair_batch, score_targets


@dataclass
class TargetVectorConfig:
    lr: float = option(0.5, "Adam learning rate of delta (MEMIT's)")
    steps: int = option(25, "at most this many optimisation steps per request")
    kl_factor: float = option(0.0625, "weight of the KL term on '{subject} is a'")
    weight_decay: float = option(0.5, "weight of |delta| / |h|^2")
    clamp: float = option(0.75, "|delta| <= clamp * |h|")
    stop: str = option("loss", "'loss': stop when the loss < 5e-2 (MEMIT); 'most_probable': stop once the target "
                       "is the argmax on every rewrite prompt (ENCORE)", choices=("loss", "most_probable"))


@dataclass
class TargetVector:
    z: torch.Tensor  # (d_model,) h + delta
    h: torch.Tensor  # (d_model,) the residual before the edit, at the bare prompt's subject token
    steps: int
    target_prob: float  # mean over rewrite prompts of P(target), at the end


def _block_output_hook(rows: torch.Tensor, cols: torch.Tensor, delta: torch.Tensor, seen: list):
    """Adds ``delta`` to a block's output hidden states at (rows, cols); records the original."""
    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        seen.append(h[rows, cols].detach())
        shift = torch.zeros_like(h)
        shift[rows, cols] = delta.to(h.dtype)
        h = h + shift
        return (h, *output[1:]) if isinstance(output, tuple) else h
    return hook


def target_vector(model, tokenizer, layer: int, request: EditRequest, prefixes: Sequence[str],
                  cfg: TargetVectorConfig | None = None) -> TargetVector:
    """Optimise delta at the output of block ``layer`` for one request (the model is not changed)."""
    cfg = cfg or TargetVectorConfig()
    device = next(model.parameters()).device
    block = model.get_submodule(arch_spec(model).layers)[layer]
    prompts = [p + request.text for p in prefixes]
    lookups = [lookup_positions(tokenizer, [request], p)[0] for p in prefixes]
    rewrite = build_pair_batch(tokenizer, prompts, [request.target_new] * len(prompts), lookups, device)
    kl_req = EditRequest(prompt="{} is a", subject=request.subject, target_new="x")
    kl_enc = tokenizer([kl_req.text], return_tensors="pt").to(device)
    kl_pos = lookup_positions(tokenizer, [kl_req], "")[0]

    delta = torch.zeros(block_width(model), device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    rows = torch.arange(len(prompts), device=device)
    kl_init = h_init = None
    steps, prob = 0, 0.0
    with frozen_parameters(model):
        for steps in range(1, cfg.steps + 1):
            seen: list[torch.Tensor] = []
            with HookOwner().scoped() as scope:
                scope.forward(block, _block_output_hook(rows, rewrite.key_pos, delta, seen))
                logits = model(input_ids=rewrite.input_ids, attention_mask=rewrite.attention_mask).logits
                scope.remove_all()
                scope.forward(block, _block_output_hook(torch.zeros(1, dtype=torch.long, device=device),
                                                        torch.tensor([kl_pos], device=device), delta, []))
                kl_logp = torch.log_softmax(model(**kl_enc).logits[0, kl_pos].float(), -1)
            if h_init is None:
                h_init, kl_init = seen[0][0].float(), kl_logp.detach()
            scores = score_targets(logits, rewrite)
            nll = scores.nll.mean()
            kl = torch.nn.functional.kl_div(kl_init, kl_logp, log_target=True, reduction="sum")
            loss = nll + cfg.kl_factor * kl + cfg.weight_decay * delta.norm() / h_init.norm() ** 2
            prob = float(torch.exp(-scores.nll.detach()).mean())
            done = bool(scores.correct.all()) if cfg.stop == "most_probable" else float(loss.detach()) < 5e-2
            if done or steps == cfg.steps:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():  # project back into the ball |delta| <= clamp |h|
                limit = cfg.clamp * h_init.norm()
                if delta.norm() > limit:
                    delta.mul_(limit / delta.norm())
    return TargetVector(z=(h_init + delta.detach()).cpu(), h=h_init.cpu(), steps=steps, target_prob=prob)


def block_width(model) -> int:
    """Width of the residual stream (hidden size)."""
    return model.get_input_embeddings().weight.shape[1]
