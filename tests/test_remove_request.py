"""Rolling back one edit: a pack without one of its requests, the rest kept as it is."""
import pytest
import torch

from grace_hooks import EditableModel
from grace_hooks.errors import EditError
from grace_hooks.requests import EditRequest
from grace_hooks.testing import DELTA_REQUESTS, DELTA_TINY, TINY_REQUESTS

GRACE_FAST = dict(n_iter=40, lr=1.0)
UNRELATED = "the sun rises over the quiet sea"


def _logits(em, text):
    with torch.no_grad():
        return em(**em.tokenizer(text, return_tensors="pt")).logits


def _acting(em, text):
    with em.routes(every=True) as hits, torch.no_grad():
        em(**em.tokenizer(text, return_tensors="pt"))
    return {pack for _, _, _, pack, _ in hits}


def test_a_grace_request_comes_out_and_every_other_answer_stays_bit_for_bit(make_model, tokenizer, tmp_path):
    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    em.edit(TINY_REQUESTS, method="grace", pack="facts", **GRACE_FAST)
    em.edit([EditRequest(prompt="the colour of {} is", subject="grass", target_new="tokyo")], method="grace",
            pack="later", **GRACE_FAST)
    kept = [TINY_REQUESTS[0].text, TINY_REQUESTS[2].text, UNRELATED, "the colour of grass is"]
    before = {t: _logits(em, t) for t in kept}
    with em.without("facts"):
        base_on_removed = _logits(em, TINY_REQUESTS[1].text)
    info = em.remove_request("facts", 1)
    assert info.n_edits == 2 and [r["subject"] for r in em.pack("facts").requests] == ["narnia", "bob"]
    assert all(torch.equal(_logits(em, t), before[t]) for t in kept)
    assert torch.equal(_logits(em, TINY_REQUESTS[1].text), base_on_removed)  # as if it had never been edited
    assert [p.name for p in em.packs] == ["facts", "later"]  # in its place in the stack
    em.save_pack("facts", tmp_path)
    em.save_pack("later", tmp_path)
    again = EditableModel(make_model("llama"), tokenizer, name="tiny")
    again.load_adapters(tmp_path)
    assert all(torch.equal(_logits(again, t), before[t]) for t in kept)


def test_a_routed_delta_request_comes_out_and_the_pack_no_longer_fires_on_it(make_model, tokenizer):
    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    em.edit(DELTA_REQUESTS, method="encore", pack="facts", **DELTA_TINY)
    before = _logits(em, UNRELATED)
    with em.disabled():
        base = _logits(em, DELTA_REQUESTS[1].text)
    em.remove_request("facts", 1)
    parts = em.pack("facts").site_tensors(em.pack("facts").sites[0])
    assert parts["U"].shape[1] == parts["V"].shape[1] == parts["keys"].shape[0] == 2
    assert torch.equal(_logits(em, UNRELATED), before)
    assert _acting(em, DELTA_REQUESTS[1].text) == set() and torch.equal(_logits(em, DELTA_REQUESTS[1].text), base)
    assert _acting(em, DELTA_REQUESTS[0].text) == {"facts"}


def test_removing_the_request_that_superseded_brings_the_older_edit_back(make_model, tokenizer):
    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    em.edit(DELTA_REQUESTS[:1], method="encore", pack="old", **DELTA_TINY)
    newer = [EditRequest(prompt=DELTA_REQUESTS[0].prompt, subject="narnia", target_new="chess"), DELTA_REQUESTS[2]]
    em.edit(newer, method="encore", pack="new", supersede=True, **DELTA_TINY)
    assert _acting(em, DELTA_REQUESTS[0].text) == {"new"}
    em.remove_request("new", 0)
    assert _acting(em, DELTA_REQUESTS[0].text) == {"old"} and not em.pack("new").supersedes


@pytest.mark.parametrize("case, message", [
    ("global", "cannot lose one request"), ("comeba", "cannot lose one request"),
    ("last", "only request"), ("range", "not 5"), ("held", "shrink or supersede keys"),
])
def test_refusals_say_why_and_change_nothing(make_model, tokenizer, case, message):
    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    if case in ("global", "comeba"):
        method, extra = ("encore", {"mode": "global"}) if case == "global" else ("comeba_hk", {})
        em.edit(DELTA_REQUESTS, method=method, pack="p", **DELTA_TINY, **extra)
    else:
        em.edit(DELTA_REQUESTS[:1] if case == "last" else DELTA_REQUESTS, method="encore", pack="p", **DELTA_TINY)
    if case == "held":
        em.edit([EditRequest(prompt=DELTA_REQUESTS[1].prompt, subject="alice", target_new="tokyo")], method="encore",
                pack="q", supersede=True, **DELTA_TINY)
    before = _logits(em, DELTA_REQUESTS[0].text)
    requests = list(em.pack("p").requests)
    with pytest.raises(EditError, match=message):
        em.remove_request("p", 5 if case == "range" else 0)
    assert em.pack("p").requests == requests and torch.equal(_logits(em, DELTA_REQUESTS[0].text), before)
