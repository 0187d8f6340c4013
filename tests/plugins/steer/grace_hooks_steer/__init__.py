"""``steer``: a method family from outside grace_hooks, as its own distribution.

At one site, a key per request (the site input at the prompt's last token) and a vector added to the
site output wherever that key wins the position, trained until the target is the greedy next token.
Its effect is the two classes below; the runtime composes it with the others through the shared
router without knowing what it is. Everything comes from ``grace_hooks.method_kit``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from grace_hooks.method_kit import (ComputedEdit, EditContext, EditMethod, Effect, EffectLayer, Gate, Hits, Plan, Site,
                                    SiteContribution, TensorSpec, named, num_layers, option, stored)


# ---------------------------------------------------------------------------- the family's effect
class Additions(EffectLayer):
    """Every loaded ``steer`` pack at a site: where one of its keys wins a position, its vector is added."""

    order = 25

    def plan(self, flat_x: torch.Tensor, hits: Hits | None, gate: Gate | None) -> Plan | None:
        won = self.winning(hits, "vectors")  # where its keys win, and each winning key's vector
        if won is None:
            return None
        rows, vectors = won

        def add(flat: torch.Tensor) -> None:
            flat[rows] = flat[rows] + vectors.to(flat)

        return add


@dataclass
class Addition(Effect):
    vectors: torch.Tensor  # (n, d_out): key i's vector
    layer: ClassVar[type[EffectLayer]] = Additions

    def stored(self) -> "Addition":
        return Addition(stored(self.vectors))


# ---------------------------------------------------------------------------- the method
@dataclass
class SteerConfig:
    layer: int | None = option(None, "block whose MLP output is steered; None = the last")
    radius: float = option(0.01, "key radius, relative to the key's norm")
    lr: float = option(0.5, "Adam learning rate of the vectors")
    steps: int = option(200, "most Adam steps per request")


class Steer(EditMethod):
    name = "steer"
    config_class = SteerConfig

    def compute(self, ctx: EditContext, requests, cfg: SteerConfig) -> ComputedEdit:
        site = Site(cfg.layer if cfg.layer is not None else num_layers(ctx.model) - 1)
        encs = [ctx.tokenizer(r.text, return_tensors="pt").to(ctx.device) for r in requests]
        keys = torch.stack([ctx.capture(site, **enc)[0][0, -1] for enc in encs]).float()
        vectors = []
        with ctx.frozen(), ctx.hooks.scoped() as scope:
            now: dict[str, torch.Tensor] = {}

            def steer(module, args, output):
                out = output.clone()
                out[0, -1] = out[0, -1] + now["v"].to(out)
                return out

            scope.forward(site.module(ctx.model), steer)
            for r, enc in zip(requests, encs):
                target = torch.tensor([ctx.tokenizer(" " + r.target_new, add_special_tokens=False)["input_ids"][0]])
                v = torch.zeros(site.dims(ctx.model)[1], requires_grad=True)
                opt = torch.optim.Adam([v], lr=cfg.lr)
                for _ in range(cfg.steps):
                    now["v"] = v
                    logits = ctx.model(**enc).logits[0, -1]
                    if int(logits.argmax()) == int(target):
                        break
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(logits[None], target).backward()
                    opt.step()
                vectors.append(v.detach().clone())
        n = site.name
        tensors = named({n: {"keys": keys.contiguous(), "radii": cfg.radius * keys.norm(dim=1),
                             "vectors": torch.stack(vectors).contiguous()}})
        return ComputedEdit(sites=[n], tensors=tensors)

    def site_layouts(self, config: SteerConfig) -> list[dict[str, TensorSpec]]:
        return [{"keys": TensorSpec(("n", "d_in")), "radii": TensorSpec(("n",)), "vectors": TensorSpec(("n", "d_out"))}]

    def contributions(self, pack) -> dict[str, SiteContribution]:
        out = {}
        for site in pack.sites:
            t = pack.site_tensors(site)
            out[site] = SiteContribution(Addition(t["vectors"]), keys=t["keys"], radii=t["radii"])
        return out
