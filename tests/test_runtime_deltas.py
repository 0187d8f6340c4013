"""The runtime composes low-rank weight deltas: global (every position) and routed (in scope only)."""
import copy

import pytest
import torch

from conftest import UNRELATED, last_logits, param_hash
from grace_hooks.bases.architectures import Site
from grace_hooks.bases.hooks import count_hooks
from grace_hooks.engine.runtime import EditRuntime, SiteContribution
from grace_hooks.methods.delta.effect import LowRankDelta
from grace_hooks.methods.grace.effect import Replacement

ARCHS = ["llama", "gpt2", "gemma3_text", "gpt_neox"]


def _delta(site: Site, model, rank=2, seed=0, scale=0.5):
    d_in, d_out = site.dims(model)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, rank, generator=g) * scale, torch.randn(d_in, rank, generator=g) * scale


def _merged(model, site: Site, U, V):
    """A copy of the model with dW = U V^T written into the site's weight (the reference); where the
    architecture adds the site's effects after another module (Gemma's post-MLP norm), plain torch
    hooks on the copy add dW x to that module's output instead."""
    twin = copy.deepcopy(model)
    module, written = site.module(twin), site.written(twin)
    if written is not module:
        seen = {}
        module.register_forward_hook(lambda m, a, o: seen.update(x=a[0]))
        written.register_forward_hook(lambda m, a, o: o + seen.pop("x") @ V @ U.T)
        return twin
    with torch.no_grad():
        dw = U @ V.T
        module.weight += dw.T if module.weight.shape != dw.shape else dw  # GPT-2 Conv1D stores (d_in, d_out)
    return twin


@pytest.mark.parametrize("arch", ARCHS)
def test_global_delta_equals_merged_weights_and_rolls_back(make_model, tokenizer, arch):
    model = make_model(arch)
    rt = EditRuntime(model)  # the core runtime under test, on its own
    site = Site(1)
    U, V = _delta(site, model)
    before_hash = param_hash(model)
    base = last_logits(model, tokenizer, UNRELATED)
    twin = _merged(model, site, U, V)  # before any hook exists (a deep copy would copy hooks too)
    rt.add_pack("p", 1, {site.name: SiteContribution(LowRankDelta(U, V))})
    for got, want in zip(last_logits(model, tokenizer, UNRELATED), last_logits(twin, tokenizer, UNRELATED)):
        assert torch.allclose(got, want, atol=1e-4)
    assert param_hash(model) == before_hash
    rt.remove_pack("p")
    assert all(torch.equal(a, b) for a, b in zip(last_logits(model, tokenizer, UNRELATED), base))
    assert count_hooks(model) == 0


def test_routed_delta_acts_only_in_scope(make_model, tokenizer):
    model = make_model("llama")
    rt = EditRuntime(model)  # the core runtime under test, on its own
    site = Site(1)
    U, V = _delta(site, model)
    prompt = "the capital of narnia is"
    grabbed = []
    h = site.module(model).register_forward_hook(lambda m, a, o: grabbed.append((a[0][0].detach(), o[0].detach())))
    with torch.no_grad():
        model(**tokenizer(prompt, return_tensors="pt"))
    h.remove()
    x, y = grabbed[0]
    key = x[-1:]  # the last prompt token only
    base_unrelated = last_logits(model, tokenizer, UNRELATED)
    rt.add_pack("p", 1, {site.name: SiteContribution(LowRankDelta(U, V, routed=True), keys=key, radii=torch.tensor([1e-3]))})
    out = []
    h = site.module(model).register_forward_hook(lambda m, a, o: out.append(o[0].detach()), prepend=False)
    with torch.no_grad():
        model(**tokenizer(prompt, return_tensors="pt"))
    h.remove()
    got = out[0]
    assert torch.equal(got[:-1], y[:-1])  # out of scope: untouched, bit for bit
    assert torch.allclose(got[-1], y[-1] + (x[-1] @ V) @ U.T, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(last_logits(model, tokenizer, UNRELATED), base_unrelated))
    with rt.tracing() as hits:
        with torch.no_grad():
            model(**tokenizer(prompt, return_tensors="pt"))
    assert hits and all(pack == "p" for _, _, _, pack, _ in hits)


def test_two_packs_in_scope_at_one_position_both_add_their_deltas(make_model, tokenizer):
    """Two packs that edit one subject (say, two relations of it) are both in scope there: both act."""
    model = make_model("llama")
    rt = EditRuntime(model)  # the core runtime under test, on its own
    site = Site(1)
    grabbed = []
    h = site.module(model).register_forward_hook(lambda m, a, o: grabbed.append((a[0][0, -1].detach(), o[0, -1].detach())))
    with torch.no_grad():
        model(**tokenizer("alice speaks", return_tensors="pt"))
    h.remove()
    (x, y), deltas = grabbed[0], [_delta(site, model, seed=s) for s in (1, 2)]
    for rank, (U, V) in enumerate(deltas, start=1):
        rt.add_pack(f"p{rank}", rank, {site.name: SiteContribution(LowRankDelta(U, V, routed=True), keys=x[None],
                                                                            radii=torch.tensor([1e-3]))})
    out = []
    h = site.module(model).register_forward_hook(lambda m, a, o: out.append(o[0, -1].detach()))
    with torch.no_grad():
        model(**tokenizer("alice speaks", return_tensors="pt"))
    h.remove()
    assert torch.allclose(out[0], y + sum((x @ V) @ U.T for U, V in deltas), atol=1e-5)


def test_replacement_wins_over_a_routed_delta_at_the_same_position(make_model, tokenizer):
    model = make_model("llama")
    rt = EditRuntime(model)  # the core runtime under test, on its own
    site = Site(1)
    U, V = _delta(site, model)
    grabbed = []
    h = site.module(model).register_forward_hook(lambda m, a, o: grabbed.append(a[0][0, -1:].detach()))
    with torch.no_grad():
        model(**tokenizer("alice speaks", return_tensors="pt"))
    h.remove()
    key, value = grabbed[0], torch.full((1, site.dims(model)[1]), 0.25)
    rt.add_pack("delta", 1, {site.name: SiteContribution(LowRankDelta(U, V, routed=True), keys=key, radii=torch.tensor([1e-3]))})
    rt.add_pack("grace", 2, {site.name: SiteContribution(Replacement(value), keys=key, radii=torch.tensor([1e-3]))})
    out = []
    h = site.module(model).register_forward_hook(lambda m, a, o: out.append(o[0, -1].detach()))
    with torch.no_grad():
        model(**tokenizer("alice speaks", return_tensors="pt"))
    h.remove()
    assert torch.equal(out[0], value[0])
    rt.remove_pack("grace")
    rt.remove_pack("delta")
    assert count_hooks(model) == 0
