"""model.explain / grace-hooks why: which packs acted on each generated token, and the answer without each."""
import torch

from grace_hooks import EditableModel
from grace_hooks.eval.generation import greedy
from grace_hooks.testing import DELTA_REQUESTS, DELTA_TINY, TINY_REQUESTS

GRACE_FAST = dict(n_iter=40, lr=1.0)


def _em(make_model, tokenizer):
    return EditableModel(make_model("llama"), tokenizer, name="tiny")


def _logits(em, text):
    with torch.no_grad():
        return em(**em.tokenizer(text, return_tensors="pt")).logits


def test_an_edited_prompt_names_the_pack_its_key_and_request_and_the_answer_without_it(make_model, tokenizer):
    em = _em(make_model, tokenizer)
    em.edit(TINY_REQUESTS, method="grace", pack="facts", **GRACE_FAST)
    em.edit(DELTA_REQUESTS[:1], method="encore", pack="capital", **DELTA_TINY)
    prompt = TINY_REQUESTS[1].text  # alice: only the GRACE pack's key covers it
    before = [_logits(em, t) for t in (prompt, DELTA_REQUESTS[0].text, "the sun rises")]

    why = em.explain(prompt, max_new_tokens=4)
    assert why.answer == greedy(em, prompt, 4)  # the traced decoding is generate's greedy decoding
    assert "facts" in why.acting
    fired = [f for s in why.steps for f in s.firings if f.pack == "facts"]
    assert fired and all(f.key >= 0 and f.site for f in fired)
    assert {"prompt": TINY_REQUESTS[1].prompt, "subject": "alice", "target_new": "german"} in [r for f in fired for r in f.requests]
    with em.without("facts"):
        plain = greedy(em, prompt, 4)
    assert why.without["facts"] == plain
    assert any("facts key" in line and "german" in line for line in why.lines())
    # the stack is exactly as before explain and without()
    after = [_logits(em, t) for t in (prompt, DELTA_REQUESTS[0].text, "the sun rises")]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_without_is_the_stack_as_if_the_pack_was_never_loaded(make_model, tokenizer):
    em = _em(make_model, tokenizer)
    em.edit(TINY_REQUESTS[:2], method="grace", pack="first", **GRACE_FAST)
    em.edit(TINY_REQUESTS[1:], method="grace", pack="second", **GRACE_FAST)  # shares alice: shrinks first's key
    em.edit(TINY_REQUESTS[2:], method="grace", pack="third", **GRACE_FAST)
    texts = [r.text for r in TINY_REQUESTS] + ["the sun rises"]
    with em.without("second"):
        left_out = [_logits(em, t) for t in texts]
    ref = _em(make_model, tokenizer)  # the same base weights (make_model is seeded), first and third only
    for name in ("first", "third"):
        ref.add_pack(em.pack(name))
    assert all(torch.equal(a, _logits(ref, t)) for a, t in zip(left_out, texts))
    ref.close()


def test_a_prompt_no_pack_reaches_says_so_in_one_line(make_model, tokenizer):
    em = _em(make_model, tokenizer)
    em.edit(TINY_REQUESTS[:1], method="grace", pack="facts", **GRACE_FAST)
    why = em.explain("the sun rises over the", max_new_tokens=3)
    assert why.acting == [] and why.without == {}
    assert why.lines()[1].startswith("no loaded pack acted")


def test_a_global_delta_is_named_as_acting_everywhere(make_model, tokenizer):
    em = _em(make_model, tokenizer)
    em.edit(DELTA_REQUESTS[:1], method="encore", pack="global", mode="global", **DELTA_TINY)
    why = em.explain("the sun rises over the", max_new_tokens=2)
    assert why.keyless == ("global",) and why.acting == ["global"]
    with em.disabled():
        base_answer = greedy(em, "the sun rises over the", 2)
    assert why.without["global"] == base_answer
    assert any(line.startswith("global: no router keys") for line in why.lines())
