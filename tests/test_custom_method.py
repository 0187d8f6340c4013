"""A method family from outside the package (issue 19): defined here, registered, and held to the
contract (the edit works, unrelated inputs are unchanged, save -> load is bit-identical, rollback is
exact, no hook is left) without any change to ``grace_hooks/``.

The method, ``steer``: at one site, a key per request (the site input at the prompt's last token)
and a vector added to the site output wherever that key wins the position, trained until the target
is the greedy next token. Its effect is the two classes below; the runtime composes it with the
others through the shared router without knowing what it is."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from conftest import (TINY_REQUESTS, UNRELATED, assert_reloads_and_rolls_back, last_logits, next_token, param_hash,
                      target_id)
from grace_hooks import EditableModel
from grace_hooks.architectures import Site, num_layers
from grace_hooks.config import option
from grace_hooks.effects import Effect, EffectLayer, Gate, Hits, Plan, stored
from grace_hooks.errors import PackError
from grace_hooks.export import export_peft
from grace_hooks.methods import ComputedEdit, EditContext, EditMethod, register, unregister
from grace_hooks.pack_schema import TensorSpec
from grace_hooks.runtime import SiteContribution


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
        tensors = {f"{n}/keys": keys.contiguous(), f"{n}/radii": cfg.radius * keys.norm(dim=1),
                   f"{n}/vectors": torch.stack(vectors).contiguous()}
        return ComputedEdit(sites=[n], tensors=tensors)

    def site_layouts(self, config: SteerConfig) -> list[dict[str, TensorSpec]]:
        return [{"keys": TensorSpec(("n", "d_in")), "radii": TensorSpec(("n",)), "vectors": TensorSpec(("n", "d_out"))}]

    def contributions(self, pack) -> dict[str, SiteContribution]:
        out = {}
        for site in pack.sites:
            t = pack.site_tensors(site)
            out[site] = SiteContribution(Addition(t["vectors"]), keys=t["keys"], radii=t["radii"])
        return out


@pytest.fixture
def steer():
    register(Steer)
    yield Steer.name
    unregister(Steer.name)


# ---------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_method_from_outside_the_package_keeps_the_contract(arch, steer, make_model, tokenizer, tmp_path):
    model = make_model(arch)
    weights_before = param_hash(model)
    em = EditableModel(model, tokenizer, name=f"tiny-{arch}")
    prompts = [r.text for r in TINY_REQUESTS]
    base_edit, base_unrelated = last_logits(model, tokenizer, prompts), last_logits(model, tokenizer, UNRELATED)

    em.edit(TINY_REQUESTS, method=steer, pack="s1")
    assert [next_token(em, tokenizer, p) for p in prompts] == [target_id(tokenizer, r) for r in TINY_REQUESTS]
    assert all(torch.equal(a, b) for a, b in zip(last_logits(em, tokenizer, UNRELATED), base_unrelated))
    with em.routes() as hits, torch.no_grad():
        em(**tokenizer(prompts[0], return_tensors="pt"))
    assert {pack for *_, pack, _ in hits} == {"s1"}
    edited = last_logits(em, tokenizer, prompts)

    # what health and export ask of an effect: no dense update, no LoRA form (the defaults)
    assert em.health(UNRELATED[:1]) == {}
    with pytest.raises(PackError, match="no LoRA form"):
        export_peft(em.pack("s1"), tmp_path / "lora")

    # it composes with a built-in family loaded on top (GRACE at the same site; its keys win where they fire)
    em.edit(TINY_REQUESTS[:1], method="grace", pack="g", layer=num_layers(model) - 1)
    assert all(torch.equal(a, b) for a, b in zip(last_logits(em, tokenizer, UNRELATED), base_unrelated))
    em.remove_pack("g")
    assert all(torch.equal(a, b) for a, b in zip(last_logits(em, tokenizer, prompts), edited))

    # save -> load on a fresh copy of the base: bit-identical; rollback is exact, no hook left, weights untouched
    assert_reloads_and_rolls_back(em, "s1", arch, make_model, tokenizer, prompts, edited, base_edit, weights_before,
                                  tmp_path / "adapters")
