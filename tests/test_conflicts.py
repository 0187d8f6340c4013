"""Conflicting edits: found at edit time and in a folder, and which edit wins where two act."""
import logging

import torch

from grace_hooks import EditableModel
from grace_hooks.conflicts import THIS_EDIT, find_conflicts, folder_conflicts
from grace_hooks.eval.generation import greedy
from grace_hooks.requests import EditRequest
from grace_hooks.testing import DELTA_REQUESTS, DELTA_TINY, TINY_REQUESTS

TONGUE = EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English")
NATIVE = EditRequest(prompt="The native language of {} is", subject="danielle darrieux ", target_new="German")
BORN = EditRequest(prompt="{} was born in", subject="Danielle Darrieux", target_new="Paris")
OTHER = EditRequest(prompt="The mother tongue of {} is", subject="Bob", target_new="French")
GRACE_FAST = dict(n_iter=40, lr=1.0)


def test_same_subject_and_prompt_or_relation_conflict_and_nothing_else_does():
    found = find_conflicts([NATIVE, BORN, OTHER], [("old", [TONGUE.to_dict()])])
    assert [(c.request, c.pack, c.earlier, c.why) for c in found] == [(0, "old", 0, "same relation native_language")]
    assert found[0].earlier_target == "English" and found[0].target == "German"
    same = find_conflicts([TONGUE], [("old", [TONGUE])])
    assert [c.why for c in same] == ["same prompt"]
    within = find_conflicts([TONGUE, NATIVE], [])
    assert [(c.request, c.pack, c.earlier) for c in within] == [(1, THIS_EDIT, 0)]
    assert find_conflicts([BORN, OTHER], [("old", [TONGUE])]) == []


def test_a_folder_lists_each_later_request_against_the_earlier_ones():
    found = folder_conflicts([("a", [TONGUE]), ("b", [BORN]), ("c", [OTHER, NATIVE])])
    assert [(newer, c.request, c.pack, c.earlier) for newer, c in found] == [("c", 1, "a", 0)]


def test_edit_reports_conflicts_with_loaded_packs(make_model, tokenizer, caplog):
    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    em.edit(TINY_REQUESTS[:1], method="grace", pack="first", **GRACE_FAST)
    newer = EditRequest(prompt=TINY_REQUESTS[0].prompt, subject="narnia", target_new="chess")
    with caplog.at_level(logging.WARNING, logger="grace_hooks"):
        info = em.edit([newer, TINY_REQUESTS[1]], method="grace", pack="second", **GRACE_FAST)
    assert [(c.request, c.pack, c.earlier, c.why) for c in info.conflicts] == [(0, "first", 0, "same prompt")]
    assert "conflicts with request 0 of first" in caplog.text


def test_the_newest_grace_key_wins_and_its_rollback_brings_the_older_back(make_model, tokenizer):
    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    prompt = TINY_REQUESTS[0].text
    em.edit(TINY_REQUESTS[:1], method="grace", pack="first", **GRACE_FAST)
    assert greedy(em, prompt, 1).strip() == "tokyo"
    em.edit([EditRequest(prompt=TINY_REQUESTS[0].prompt, subject="narnia", target_new="chess")], method="grace",
            pack="second", **GRACE_FAST)
    assert greedy(em, prompt, 1).strip() == "chess"
    em.remove_pack("second")
    assert greedy(em, prompt, 1).strip() == "tokyo"


def test_two_routed_delta_edits_of_one_fact_both_add_their_update(make_model, tokenizer):
    """Today's rule for routed deltas: each pack's key fires on its own and both updates are added."""
    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    em.edit(DELTA_REQUESTS[:1], method="encore", pack="first", **DELTA_TINY)
    em.edit([EditRequest(prompt=DELTA_REQUESTS[0].prompt, subject="narnia", target_new="chess")], method="encore",
            pack="second", **DELTA_TINY)
    text = DELTA_REQUESTS[0].text
    with em.routes() as winners, torch.no_grad():
        em(**tokenizer(text, return_tensors="pt"))
    with em.routes(every=True) as acting, torch.no_grad():
        em(**tokenizer(text, return_tensors="pt"))
    assert {pack for _, _, _, pack, _ in winners} == {"second"}  # the newest pack wins the position...
    assert {pack for _, _, _, pack, _ in acting} == {"first", "second"}  # ...and both add their update
    assert set(em.explain(text, max_new_tokens=1).acting) == {"first", "second"}
    with em.without("second"):
        only_first = em(**tokenizer(text, return_tensors="pt")).logits
    with em.disabled():
        base = em(**tokenizer(text, return_tensors="pt")).logits
    both = em(**tokenizer(text, return_tensors="pt")).logits
    assert not torch.equal(both, only_first) and not torch.equal(only_first, base)


def _acting(em, text):
    with em.routes(every=True) as acting, torch.no_grad():
        logits = em(**em.tokenizer(text, return_tensors="pt")).logits
    return {pack for _, _, _, pack, _ in acting}, logits


def test_a_superseding_edit_stops_the_older_one_until_it_is_removed(make_model, tokenizer, tmp_path):
    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    em.edit(DELTA_REQUESTS[:2], method="encore", pack="first", **DELTA_TINY)
    narnia, alice = DELTA_REQUESTS[0].text, DELTA_REQUESTS[1].text
    before = {t: _acting(em, t) for t in (narnia, alice)}
    newer = EditRequest(prompt=DELTA_REQUESTS[0].prompt, subject="narnia", target_new="chess")
    info = em.edit([newer], method="encore", pack="second", supersede=True, **DELTA_TINY)
    assert [c.pack for c in info.conflicts] == ["first"]
    assert em.pack("second").supersedes and {s.pack_id for s in em.pack("second").supersedes} == {em.pack("first").pack_id}
    assert _acting(em, narnia)[0] == {"second"}  # the older edit no longer acts on its subject...
    assert _acting(em, alice)[0] == {"first"}  # ...and still acts on its other request
    em.save_pack("first", tmp_path)
    em.save_pack("second", tmp_path)
    em.remove_pack("second")
    for text, (packs, logits) in before.items():  # rolled back: the older edit acts again, bit for bit
        again = _acting(em, text)
        assert again[0] == packs and torch.equal(again[1], logits)
    em.close()
    reloaded = EditableModel(make_model("llama"), tokenizer, name="tiny")
    reloaded.load_adapters(tmp_path)  # the supersession is part of the saved pack
    assert _acting(reloaded, narnia)[0] == {"second"}
    with reloaded.without("second"):
        assert _acting(reloaded, narnia)[0] == {"first"}


def test_only_a_superseding_pack_writes_the_field(make_model, tokenizer, tmp_path):
    from grace_hooks.store.packs import PACK_JSON

    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    em.edit(TINY_REQUESTS[:1], method="grace", pack="plain", **GRACE_FAST)
    em.save_pack("plain", tmp_path)
    assert "supersedes" not in (tmp_path / "plain" / PACK_JSON).read_text()


def test_a_global_delta_cannot_be_superseded_request_by_request(make_model, tokenizer):
    import pytest

    from grace_hooks.errors import EditError

    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    em.edit(DELTA_REQUESTS[:1], method="encore", pack="global", mode="global", **DELTA_TINY)
    newer = EditRequest(prompt=DELTA_REQUESTS[0].prompt, subject="narnia", target_new="chess")
    with pytest.raises(EditError, match="acts everywhere"):
        em.edit([newer], method="grace", pack="newer", supersede=True, **GRACE_FAST)
    assert [p.name for p in em.packs] == ["global"]


def test_conflicts_follow_a_new_version_of_a_pack(make_model, tokenizer):
    """The requests of loaded packs are indexed once per pack: a pack that lost a request no longer
    conflicts through it."""
    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    em.edit(TINY_REQUESTS, method="grace", pack="facts", **GRACE_FAST)
    newer = EditRequest(prompt=TINY_REQUESTS[1].prompt, subject="alice", target_new="chess")
    assert [c.earlier for c in em.edit([newer], method="grace", pack="a", **GRACE_FAST).conflicts] == [1]
    em.remove_pack("a")
    em.remove_request("facts", 1)
    assert em.edit([newer], method="grace", pack="b", **GRACE_FAST).conflicts == ()
