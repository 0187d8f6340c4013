"""GRACE specifics: codebook rules, cross-pack conflicts, batch training, hook hygiene on errors."""
import pytest
import torch

from conftest import CHAT_TEMPLATE, UNRELATED, last_logits, next_token, target_id
from grace_hooks import EditableModel, EditRequest
from grace_hooks.bases.hooks import count_hooks
from grace_hooks.testing import TINY_REQUESTS

NARNIA = "the capital of {} is"


def _em(make_model, tokenizer, arch="llama"):
    return EditableModel(make_model(arch), tokenizer, name="tiny")


def test_same_prompt_same_label_shares_one_entry(make_model, tokenizer):
    em = _em(make_model, tokenizer)
    same = EditRequest(prompt=NARNIA, subject="narnia", target_new="tokyo")
    em.edit([same, same], method="grace", pack="p")
    assert em.pack("p").metrics["codebook"]["entries"] == 1


def test_conflicting_labels_split_within_a_pack(make_model, tokenizer):
    em = _em(make_model, tokenizer)
    a = EditRequest(prompt=NARNIA, subject="narnia", target_new="tokyo")
    b = EditRequest(prompt=NARNIA, subject="narnia", target_new="london")
    em.edit([a, b], method="grace", pack="p", eps_init=50.0)
    book = em.pack("p").metrics["codebook"]
    assert book["entries"] == 2 and book["splits"] == 1


def test_cross_pack_split_shrinks_earlier_key_until_removed(make_model, tokenizer):
    em = _em(make_model, tokenizer)
    em.edit([EditRequest(prompt=NARNIA, subject="narnia", target_new="tokyo")], method="grace", pack="old", eps_init=50.0)
    probe = ["the capital of gondor is"]  # inside the big old radius
    old_only = last_logits(em, tokenizer, probe)[0]
    em.edit([EditRequest(prompt=NARNIA, subject="gondor", target_new="london")], method="grace", pack="new", eps_init=50.0)
    assert em.pack("new").metrics["codebook"]["shrunk_earlier_keys"] == 1
    assert next_token(em, tokenizer, "the capital of gondor is") == target_id(tokenizer, EditRequest(NARNIA, "x", "london"))
    assert next_token(em, tokenizer, "the capital of narnia is") == target_id(tokenizer, EditRequest(NARNIA, "x", "tokyo"))
    em.remove_pack("new")  # the earlier key's radius comes back with the rollback
    assert torch.equal(last_logits(em, tokenizer, probe)[0], old_only)


def test_the_same_prompt_edited_again_updates_the_fact_until_removed(make_model, tokenizer):
    """A new answer for an earlier pack's key itself is an update, not a split into radii of about 0
    (which would fire only on bit-equal activations): the newer pack answers, with a padded batch
    around it too, and removing it brings the earlier answer back."""
    em = _em(make_model, tokenizer)
    em.edit([EditRequest(prompt=NARNIA, subject="narnia", target_new="tokyo")], method="grace", pack="old")
    before = last_logits(em, tokenizer, ["the capital of narnia is"])[0]
    em.edit([EditRequest(prompt=NARNIA, subject="narnia", target_new="london")], method="grace", pack="new")
    book = em.pack("new").metrics["codebook"]
    assert (book["updates"], book["splits"], book["shrunk_earlier_keys"]) == (1, 0, 0)
    london = target_id(tokenizer, EditRequest(NARNIA, "x", "london"))
    assert next_token(em, tokenizer, "the capital of narnia is") == london
    batch = tokenizer(["the capital of narnia is", "a much longer unrelated text that pads the first row"],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = em(**batch).logits
    assert int(logits[0, int(batch["attention_mask"][0].sum()) - 1].argmax()) == london
    em.remove_pack("new")
    assert torch.equal(last_logits(em, tokenizer, ["the capital of narnia is"])[0], before)


def test_values_warm_and_cold(make_model, tokenizer):
    for init in ("cold", "warm"):
        em = _em(make_model, tokenizer)
        em.edit(TINY_REQUESTS, method="grace", pack="p", value_init=init)
        assert em.pack("p").metrics["teacher_forced_success"] == 1.0


def test_compute_leaves_model_untouched_and_no_hooks_on_error(make_model, tokenizer):
    em = _em(make_model, tokenizer)
    model = em.base_model
    flags = [p.requires_grad for p in model.parameters()]

    def boom(module, args, output):
        raise RuntimeError("boom inside forward")

    handle = model.lm_head.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        em.edit(TINY_REQUESTS, method="grace", pack="p")
    handle.remove()
    assert count_hooks(model) == 0 and em.packs == []
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())


def test_exception_in_user_forward_leaves_only_pack_hooks(make_model, tokenizer):
    em = _em(make_model, tokenizer)
    em.edit(TINY_REQUESTS, method="grace", pack="p")
    hooks = count_hooks(em.base_model)
    with pytest.raises(Exception):
        em(input_ids=torch.tensor([[10_000]]))  # out-of-vocabulary id fails inside forward
    assert count_hooks(em.base_model) == hooks
    assert em._runtime.context.mask is None  # white box: the failed forward's mask is not left for the next one
    base = last_logits(em.base_model, tokenizer, UNRELATED[:1])  # still routed correctly afterwards
    with em.disabled():
        assert torch.equal(last_logits(em, tokenizer, UNRELATED[:1])[0], base[0])
    em.close()
    assert count_hooks(em.base_model) == 0


def test_pack_bytes_and_metadata(make_model, tokenizer):
    em = _em(make_model, tokenizer)
    info = em.edit(TINY_REQUESTS, method="grace", pack="p")
    d_in, d_out = 128, 64
    assert info.n_edits == 3 and info.nbytes == 3 * (d_in + d_out + 1) * 4
    assert em.pack("p").base.model_type == "llama" and em.pack("p").requests[0]["target_new"] == "tokyo"


@pytest.mark.parametrize("scope", ["span", "key"])
def test_span_scope_keeps_a_wide_key_to_texts_that_name_its_subject(make_model, tokenizer, scope):
    em = _em(make_model, tokenizer)
    other = "the capital of gondor is"
    base = last_logits(em, tokenizer, [other])[0]
    em.edit([EditRequest(prompt=NARNIA, subject="narnia", target_new="tokyo")], method="grace", pack="p",
            eps_init=1e4, scope=scope)  # a radius that covers every input
    assert next_token(em, tokenizer, NARNIA.format("narnia")) == tokenizer.convert_tokens_to_ids("tokyo")
    unchanged = torch.equal(last_logits(em, tokenizer, [other])[0], base)
    assert unchanged == (scope == "span")  # 'narnia' is not in the other prompt: only the span rule sees it


@pytest.mark.parametrize("chat_form", [False, True])
def test_chat_form_keys_the_prompt_asked_as_a_user_turn(make_model, chat_form):
    """``chat_form``: a second key per edit at the end of its prompt asked as a user turn, serving the
    same request; asked that way, the answer opens with the target (and only with the option), and
    removing the pack gives the base's answer back."""
    from grace_hooks.testing import tiny_tokenizer
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    em = _em(make_model, tok)
    req = TINY_REQUESTS[0]
    asked = "who does " + req.text + " ? "
    base = next_token(em, tok, asked)
    assert base != target_id(tok, req)
    em.edit([req], method="grace", pack="p", chat_form=chat_form)
    pack = em.pack("p")
    assert pack.metrics["codebook"]["entries"] == (2 if chat_form else 1)
    assert all(served == [0] for served in next(iter(pack.routing.key_requests.values())))
    assert next_token(em, tok, req.text) == target_id(tok, req)
    assert (next_token(em, tok, asked) == target_id(tok, req)) == chat_form
    assert pack.metrics.get("chat_form_success") == (1.0 if chat_form else None)
    em.remove_pack("p")
    assert next_token(em, tok, asked) == base
