"""Squashing a chain of routed weight-delta packs into one: the chain's outputs, on disk and after
taking one request out; what cannot be squashed is refused with a reason."""
import dataclasses

import pytest
import torch

from conftest import last_logits
from grace_hooks import EditableModel
from grace_hooks.cli.folder_ops import squash_in_folder
from grace_hooks.errors import PackError
from grace_hooks.store.packs import load_pack
from grace_hooks.testing import DELTA_REQUESTS, DELTA_TINY

ROUTED = {**DELTA_TINY, "mode": "routed"}
EXTRA = {"encore": {"norm_lambda": 1.0}, "memit": {}}
# each edit prompt, a text naming two edited subjects, and unrelated text
PROBES = [r.text for r in DELTA_REQUESTS] + ["the capital of narnia and the sport of bob", "a quiet walk in the park"]


def _chain(make_model, tokenizer, method: str = "encore") -> EditableModel:
    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    for i, request in enumerate(DELTA_REQUESTS):
        em.edit([request], method=method, pack=f"b{i}", **ROUTED, **EXTRA[method])
    return em


@pytest.mark.parametrize("method", ["encore", "memit"])
def test_squash_gives_the_chains_logits(make_model, tokenizer, method):
    em = _chain(make_model, tokenizer, method)
    chain = last_logits(em, tokenizer, PROBES)
    info = em.squash_packs(["b0", "b1", "b2"], into="all")
    assert [p.name for p in em.packs] == ["all"] and info.n_edits == 3
    pack = em.pack("all")
    assert pack.state.segments == [1, 1, 1]
    assert pack.site_tensors(pack.sites[0])["U"].shape[1] == 3
    for got, want in zip(last_logits(em, tokenizer, PROBES), chain):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_without_segments_the_joined_factors_act_together(make_model, tokenizer):
    """Why the segments are kept: joined factors acting whole change the edit prompts' logits."""
    em = _chain(make_model, tokenizer)
    chain = last_logits(em, tokenizer, PROBES)
    em.squash_packs(["b0", "b1", "b2"], into="all")
    whole = dataclasses.replace(em.pack("all"), name="whole", state=dataclasses.replace(em.pack("all").state, segments=None))
    em.remove_pack("all")
    em.add_pack(whole)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(last_logits(em, tokenizer, PROBES[:3]), chain))


def test_squash_in_folder_loads_and_drops_a_request_like_the_chain(make_model, tokenizer, tmp_path):
    em = _chain(make_model, tokenizer)
    chain = last_logits(em, tokenizer, PROBES)
    for name in ("b0", "b1", "b2"):
        em.save_pack(name, tmp_path)
    done = squash_in_folder(["b0", "b1", "b2"], "merged", tmp_path)
    assert (done.n_packs, done.n_edits) == (3, 3)
    assert load_pack(tmp_path / "merged").state.segments == [1, 1, 1]
    fresh = EditableModel(make_model("llama"), tokenizer, name="tiny")
    fresh.load_adapters(tmp_path)
    for got, want in zip(last_logits(fresh, tokenizer, PROBES), chain):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # request 1 out of the squashed pack: as the chain without its pack b1
    fresh.remove_request("merged", 1)
    assert fresh.pack("merged").state.segments == [1, 1]
    em.remove_pack("b1")
    for got, want in zip(last_logits(fresh, tokenizer, PROBES), last_logits(em, tokenizer, PROBES)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_what_cannot_be_squashed_is_refused(make_model, tokenizer):
    em = _chain(make_model, tokenizer)
    with pytest.raises(PackError, match="two or more"):
        em.squash_packs(["b0"], into="one")
    em.edit(DELTA_REQUESTS[:1], method="encore", pack="global", **{**ROUTED, "mode": "global"}, **EXTRA["encore"])
    with pytest.raises(PackError, match="global delta"):
        em.squash_packs(["b2", "global"], into="x")
    em.edit(DELTA_REQUESTS[1:2], method="encore", pack="other-sites", **{**ROUTED, "layers": "0"}, **EXTRA["encore"])
    with pytest.raises(PackError, match="same sites"):
        em.squash_packs(["b0", "other-sites"], into="x")
    em.edit(DELTA_REQUESTS[2:], method="memit", pack="memit", **ROUTED)
    with pytest.raises(PackError, match="one method"):
        em.squash_packs(["b0", "memit"], into="x")
    assert [p.name for p in em.packs] == ["b0", "b1", "b2", "global", "other-sites", "memit"]


def test_a_pack_with_bad_segments_is_refused_on_load(make_model, tokenizer):
    em = _chain(make_model, tokenizer)
    em.squash_packs(["b0", "b1", "b2"], into="all")
    bad = dataclasses.replace(em.pack("all"), name="bad", state=dataclasses.replace(em.pack("all").state, segments=[1, 1]))
    em.remove_pack("all")
    with pytest.raises(PackError, match="segments"):
        em.add_pack(bad)
    assert em.packs == []
