"""Subject keys over context prefixes and target-vector optimisation (shared by weight-delta methods)."""
import torch

from conftest import CHAT_TEMPLATE, param_hash
from grace_hooks.bases.architectures import Site
from grace_hooks.bases.hooks import count_hooks
from grace_hooks.engine.memo import WeightMemo
from grace_hooks.locate.subject_keys import context_prefixes, subject_keys
from grace_hooks.locate.target_vectors import TargetVectorConfig, target_vector
from grace_hooks.methods.comeba.hook_layer import HookLayerView
from grace_hooks.testing import TINY_REQUESTS
from grace_hooks.tokens import TextTokens


def test_prefixes_are_made_once_per_weight_version(make_model, tokenizer):
    model = make_model("llama")
    memo = WeightMemo(model)
    first = context_prefixes(model, tokenizer, n_tokens=3, memo=memo)
    assert first[0] == "" and len(first) == 6 and all(p.endswith(". ") for p in first[1:])
    assert context_prefixes(model, tokenizer, n_tokens=3, memo=memo) is first
    with torch.no_grad():
        next(model.parameters()).mul_(1.0)  # a write in place (same values): what was derived is remade
    assert ("context_prefixes", 3, 0) not in memo
    assert context_prefixes(model, tokenizer, n_tokens=3, memo=memo) is not first


def test_prefixes_come_from_the_cache_then_the_shipped_folder_then_the_model(make_model, tokenizer, tmp_path,
                                                                           monkeypatch):
    import json

    from grace_hooks.locate import subject_keys

    model = make_model("llama")
    name = subject_keys.prefix_file_name("abc", 0, 3)
    shipped, cache = tmp_path / "shipped", tmp_path / "cache"
    shipped.mkdir()
    stored = ["", "The a. ", "Therefore b. ", "Because c. ", "I d. ", "You e. "]
    (shipped / name).write_text(json.dumps({"prefixes": stored, "source": "test"}))
    monkeypatch.setattr(subject_keys, "SHIPPED_PREFIXES", str(shipped))  # an absolute folder replaces the package's
    calls = []
    real = subject_keys.write_prefixes
    monkeypatch.setattr(subject_keys, "write_prefixes", lambda *a, **k: calls.append(1) or real(*a, **k))

    assert subject_keys.context_prefixes(model, tokenizer, 3, model_hash="abc", cache=cache) == stored and not calls
    (shipped / name).write_text("{not json")  # a broken shipped file is not used: the model writes them, kept
    written = subject_keys.context_prefixes(model, tokenizer, 3, model_hash="abc", cache=cache)
    assert calls == [1] and written == real(model, tokenizer, 3, 0) and (cache / name).is_file()
    assert subject_keys.context_prefixes(model, tokenizer, 3, model_hash="abc", cache=cache) == written and calls == [1]
    (cache / name).write_text(json.dumps({"prefixes": ["only one"]}))  # not prefixes: ignored, written again
    assert subject_keys.context_prefixes(model, tokenizer, 3, model_hash="abc", cache=cache) == written and calls == [1, 1]


def test_subject_keys_average_the_site_input_at_the_subject(make_model, tokenizer):
    model = make_model("llama")
    site = Site(1)
    prefixes = ["", "the sun . "]
    got = subject_keys(model, tokenizer, site, TINY_REQUESTS, prefixes)
    for i, req in enumerate(TINY_REQUESTS):
        want = []
        for p in prefixes:
            pos = TextTokens(tokenizer).key_positions([req], p)[0]
            assert tokenizer.convert_ids_to_tokens(tokenizer(p + req.text)["input_ids"][pos]) == req.subject
            grabbed = []
            h = site.module(model).register_forward_hook(lambda m, a, o: grabbed.append(a[0][0, pos]))
            with torch.no_grad():
                model(**tokenizer(p + req.text, return_tensors="pt"))
            h.remove()
            want.append(grabbed[0])
        assert torch.allclose(got[i], torch.stack(want).mean(0), atol=1e-5)


def test_target_vector_makes_the_target_likely_without_changing_the_model(make_model, tokenizer):
    model = make_model("llama")
    before = param_hash(model)
    req = TINY_REQUESTS[2]  # a random tiny model carries this subject-token edit (layer 0) in a few steps
    cfg = TargetVectorConfig(steps=40, stop="most_probable", lr=1.0, clamp=4.0)
    start = target_vector(model, tokenizer, 0, req, ["", "the sun . "], TargetVectorConfig(steps=1))
    tv = target_vector(model, tokenizer, 0, req, ["", "the sun . "], cfg)
    assert param_hash(model) == before and count_hooks(model) == 0
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(start.z, start.h)  # no step taken: z is the unedited residual
    assert tv.steps < 40 and tv.target_prob > 2 * start.target_prob  # stopped: the target became the argmax
    assert (tv.z - tv.h).norm() <= 4.0 * tv.h.norm() + 1e-4


def test_target_vector_respects_the_clamp(make_model, tokenizer):
    model = make_model("llama")
    tv = target_vector(model, tokenizer, 2, TINY_REQUESTS[1], [""], TargetVectorConfig(steps=10, clamp=0.05, lr=5.0))
    assert (tv.z - tv.h).norm() <= 0.05 * tv.h.norm() + 1e-5


def test_batched_target_vectors_equal_one_at_a_time(make_model, tokenizer):
    """Each request keeps its own delta, loss and early stop inside a batch (Adam is per coordinate)."""
    from grace_hooks.locate.target_vectors import target_vectors
    from grace_hooks.testing import DELTA_REQUESTS

    model = make_model("qwen2")
    cfg = dict(steps=30, stop="most_probable", lr=1.0, clamp=4.0)
    together = target_vectors(model, tokenizer, 1, DELTA_REQUESTS, ["", "the sun . "], TargetVectorConfig(batch_size=3, **cfg))
    alone = [target_vector(model, tokenizer, 1, r, ["", "the sun . "], TargetVectorConfig(**cfg)) for r in DELTA_REQUESTS]
    assert len({tv.steps for tv in together}) > 1  # requests stopped at different steps
    for a, b in zip(together, alone):
        assert a.steps == b.steps
        torch.testing.assert_close(a.z, b.z, rtol=1e-4, atol=1e-4)


def test_target_vectors_refuse_the_last_block(make_model, tokenizer):
    import pytest

    with pytest.raises(ValueError, match="below the last block"):
        target_vector(make_model("llama"), tokenizer, 3, TINY_REQUESTS[0], [""])


import pytest  # noqa: E402


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma3_text"])
def test_cached_prefix_gives_the_full_replays_target_vectors(arch, make_model, tokenizer, monkeypatch):
    """Replaying only the columns from the key token on (keys aligned by left padding) is exact."""
    from grace_hooks.locate.replay import LayerReplay
    from grace_hooks.locate.target_vectors import target_vectors
    from grace_hooks.testing import DELTA_REQUESTS

    starts = []
    init = LayerReplay.__init__
    monkeypatch.setattr(LayerReplay, "__init__", lambda self, *a, **k: init(self, *a, **k) or starts.append(self.start))
    model = make_model(arch)
    cfg = TargetVectorConfig(steps=12, stop="most_probable", lr=1.0, clamp=4.0, batch_size=3)
    prefixes = ["", "the sun . ", "a dog ran in the park . "]
    cached = target_vectors(model, tokenizer, 1, DELTA_REQUESTS, prefixes, cfg)
    assert max(starts) > 0  # the rewrite prompts' keys sit at column 11 (the KL prompts' first token may be it)
    n_cached = len(starts)
    full = target_vectors(model, tokenizer, 1, DELTA_REQUESTS, prefixes, cfg, cached_prefix=False)
    assert max(starts[n_cached:]) == 0
    for a, b in zip(cached, full):
        assert a.steps == b.steps
        torch.testing.assert_close(a.z, b.z, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.h, b.h, rtol=1e-5, atol=1e-5)


def test_cached_prefix_is_exact_under_a_z_score_gate_below(make_model, tokenizer):
    """A z-score gate scores the whole sequence; the cached columns come from a forward over all of it."""
    from grace_hooks import EditableModel
    from grace_hooks.locate.target_vectors import target_vectors
    from grace_hooks.testing import DELTA_REQUESTS, DELTA_TINY

    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    em.edit(DELTA_REQUESTS[:2], method="comeba_hk", gate="zscore", layers="0", **DELTA_TINY)
    assert em.loaded.site("L0.mlp_out").view(HookLayerView).alpha is not None
    cfg = TargetVectorConfig(steps=12, stop="most_probable", lr=1.0, clamp=4.0, batch_size=3)
    prefixes = ["", "the sun . ", "a dog ran in the park . "]
    with em.edit_context() as ctx:
        run = lambda cached: target_vectors(em.base_model, tokenizer, 1, DELTA_REQUESTS, prefixes, cfg,  # noqa: E731
                                            ctx.attention_mask, cached_prefix=cached)
        with em.routes() as fired:
            cached = run(True)
        assert any(f[3] == "zscore" or f[4] == -1 for f in fired)  # the gate fired in these forwards
        for a, b in zip(cached, run(False)):
            assert a.steps == b.steps
            torch.testing.assert_close(a.z, b.z, rtol=1e-4, atol=1e-4)


def test_stop_prob_waits_for_a_margin_beyond_the_argmax(make_model, tokenizer):
    """ENCORE's most-probable stop, with a margin: the target must also reach the asked probability."""
    model = make_model("llama")
    req, prefixes = TINY_REQUESTS[2], ["", "the sun . "]
    plain = TargetVectorConfig(steps=80, stop="most_probable", lr=1.0, clamp=4.0)
    bare = target_vector(model, tokenizer, 0, req, prefixes, plain)
    margin = target_vector(model, tokenizer, 0, req, prefixes, TargetVectorConfig(**{**vars(plain), "stop_prob": 0.3}))
    assert bare.steps < margin.steps < 80  # it went on after the argmax and then stopped on its own
    assert margin.target_prob >= 0.3 > bare.target_prob


class _Recording:
    """A tokenizer that records every text it is asked to encode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, []

    def __call__(self, text, *args, **kwargs):
        self.texts.extend([text] if isinstance(text, str) else text)
        return self.tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_kl_factor_zero_runs_no_kl_prompts(make_model, tokenizer):
    """The KL term's prompts ("{subject} is a") are encoded only when its factor is not 0."""
    model, req = make_model("llama"), TINY_REQUESTS[2]
    cfg = TargetVectorConfig(steps=5, lr=1.0)
    with_kl, without = _Recording(tokenizer), _Recording(tokenizer)
    kl = target_vector(model, with_kl, 0, req, [""], cfg)
    no_kl = target_vector(model, without, 0, req, [""], TargetVectorConfig(**{**vars(cfg), "kl_factor": 0.0}))
    kl_prompt = f"{req.subject} is a"
    assert kl_prompt in with_kl.texts and kl_prompt not in without.texts
    assert no_kl.steps >= 1 and not torch.equal(no_kl.z, kl.z)


def test_kl_prompts_cut_after_the_subject_give_the_same_vectors(make_model, tokenizer, monkeypatch):
    """The KL term reads the subject token only, so cutting its prompts there changes nothing."""
    from grace_hooks.locate.replay import LayerReplay
    from grace_hooks.locate.target_vectors import target_vectors
    from grace_hooks.testing import DELTA_REQUESTS
    from grace_hooks.tokens import EditBatch

    model = make_model("llama")
    cfg = TargetVectorConfig(steps=12, stop="most_probable", lr=1.0, clamp=4.0, batch_size=3, kl_factor=1.0)
    widths = []
    init = LayerReplay.__init__
    monkeypatch.setattr(LayerReplay, "__init__",
                        lambda self, *a, **k: init(self, *a, **k) or widths.append(self.hidden_in.shape[1]))
    cut = target_vectors(model, tokenizer, 1, DELTA_REQUESTS, ["", "the sun . "], cfg)
    assert min(widths) == 1  # the KL replays hold the subject column alone
    monkeypatch.setattr(EditBatch, "up_to_keys", lambda self: self)
    whole = target_vectors(model, tokenizer, 1, DELTA_REQUESTS, ["", "the sun . "], cfg)
    for a, b in zip(cut, whole):
        assert a.steps == b.steps
        torch.testing.assert_close(a.z, b.z, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma3_text"])
def test_a_shared_prefix_run_once_gives_the_same_keys(arch, make_model, tokenizer, monkeypatch):
    """Keys behind a context prefix: the prefix runs once and every row continues its cache."""
    import grace_hooks.locate.subject_keys as keys_module

    model = make_model(arch)
    shared = []
    real = keys_module.continue_shared_prefix
    monkeypatch.setattr(keys_module, "continue_shared_prefix",
                        lambda *a: (lambda out: shared.append(out[1]) or out)(real(*a)))
    modules = {"in": Site(1).module(model), "out": Site(2).module(model)}
    prefixes = ["", "the sun rose over the quiet town . "]
    once = keys_module.activations_at_subject_of(modules, model, tokenizer, TINY_REQUESTS, prefixes, share_prefix=True)
    assert shared[0] == 0 and shared[1] >= 8  # the bare prompts share nothing; the prefix runs once
    whole = keys_module.activations_at_subject_of(modules, model, tokenizer, TINY_REQUESTS, prefixes)
    by_length = keys_module.activations_at_subject_of(modules, model, tokenizer, TINY_REQUESTS, prefixes,
                                                      share_prefix=True, batch_size=2)  # rows regrouped, order kept
    for name in modules:
        torch.testing.assert_close(once[name], whole[name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(by_length[name], whole[name], rtol=1e-4, atol=1e-5)


def test_a_shared_prefix_keeps_the_packs_that_act_on_it(make_model, tokenizer):
    """Loaded causal packs see the prefix once and every row after it as if each had run it (subject
    spans carry over from the one row to all); the runtime says when they are not causal."""
    from grace_hooks import EditableModel
    from grace_hooks.locate.subject_keys import activations_at_subject_of
    from grace_hooks.requests import EditRequest
    from grace_hooks.testing import DELTA_REQUESTS, DELTA_TINY

    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    em.edit(DELTA_REQUESTS[:2], method="memit", layers="0-1", **DELTA_TINY)
    em.edit([EditRequest(prompt="{} rose over the", subject="the sun", target_new="dog")], method="grace")
    assert em.loaded.causal
    modules = {"in": Site(1).module(em.base_model), "top": Site(3).module(em.base_model)}
    prefixes = ["the sun rose over the quiet town . "]
    requests = [*TINY_REQUESTS, *DELTA_REQUESTS]
    with em.routes() as fired:
        once = activations_at_subject_of(modules, em.base_model, tokenizer, requests, prefixes, which="output",
                                         share_prefix=True)
    assert fired  # the GRACE key fires inside the shared prefix
    whole = activations_at_subject_of(modules, em.base_model, tokenizer, requests, prefixes, which="output")
    for name in modules:
        torch.testing.assert_close(once[name], whole[name], rtol=1e-4, atol=1e-5)
    em.edit(DELTA_REQUESTS[2:], method="comeba_hk", gate="zscore", layers="2", **DELTA_TINY)
    assert not em.loaded.causal  # a z-score gate scores each position against its whole row
    last = EditableModel(make_model("llama"), tokenizer, name="tiny")
    last.edit(TINY_REQUESTS[:1], method="grace", replacement="last")
    assert not last.loaded.causal


def test_target_vectors_come_back_in_request_order_when_grouped_by_length(make_model, tokenizer):
    """Requests are optimised with those of like length; each vector still belongs to its request."""
    from grace_hooks.locate.target_vectors import replayed_columns, target_vectors

    model = make_model("llama")
    reqs = [TINY_REQUESTS[2], TINY_REQUESTS[0], TINY_REQUESTS[1]]
    assert replayed_columns(tokenizer, reqs[0]) > replayed_columns(tokenizer, reqs[1])  # the order changes
    cfg = dict(steps=20, stop="most_probable", lr=1.0, clamp=4.0)
    grouped = target_vectors(model, tokenizer, 1, reqs, [""], TargetVectorConfig(batch_size=2, **cfg))
    for got, req in zip(grouped, reqs):
        alone = target_vector(model, tokenizer, 1, req, [""], TargetVectorConfig(**cfg))
        assert got.steps == alone.steps
        torch.testing.assert_close(got.z, alone.z, rtol=1e-4, atol=1e-4)


def test_chat_form_adds_the_prompt_asked_as_a_user_turn():
    from grace_hooks.locate.target_vectors import rewrite_contexts
    from grace_hooks.testing import tiny_tokenizer
    plain, chat = tiny_tokenizer(), tiny_tokenizer()
    chat.chat_template = CHAT_TEMPLATE
    prefixes = ["", "the sun . "]
    assert rewrite_contexts(chat, prefixes, True) == [("", ""), ("the sun . ", ""), ("who does ", " ? ")]
    assert rewrite_contexts(chat, prefixes, False) == rewrite_contexts(plain, prefixes, True) == [("", ""), ("the sun . ", "")]


def test_chat_form_target_vector_makes_the_target_the_answer_in_chat_form(make_model):
    """With ``chat_form`` the most-probable stop waits until the target also opens the answer to the
    prompt asked as a user turn: adding z - h at the subject of that turn makes it the argmax."""
    from grace_hooks.testing import tiny_tokenizer
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    model = make_model("llama")
    req = TINY_REQUESTS[1]  # one the random tiny model carries in chat form in a few steps
    cfg = TargetVectorConfig(steps=80, stop="most_probable", lr=1.0, clamp=4.0, chat_form=True)
    tv = target_vector(model, tok, 0, req, [""], cfg)
    assert tv.steps < 80
    text = "who does " + req.text + " ? "
    pos = TextTokens(tok).key_positions([req], "who does ")[0]
    assert tok.convert_ids_to_tokens(tok(text)["input_ids"][pos]) == req.subject

    def add_delta(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[0, pos] += tv.z - tv.h
        return output

    handle = model.model.layers[0].register_forward_hook(add_delta)
    try:
        with torch.no_grad():
            logits = model(**tok(text, return_tensors="pt")).logits
    finally:
        handle.remove()
    assert tok.convert_ids_to_tokens(int(logits[0, -1].argmax())) == req.target_new


def test_question_form_adds_the_relations_edit_question_and_nothing_else():
    """A cloze of a known relation gains one row, its relation's edit wording about the subject (the
    harness never asks that wording); a question record and a cloze of an unknown relation gain none."""
    from grace_hooks import EditRequest
    from grace_hooks.locate.target_vectors import rewrite_rows
    from grace_hooks.questions import counterfact_table
    from grace_hooks.testing import tiny_tokenizer
    tok = tiny_tokenizer()
    capital = TINY_REQUESTS[0]  # "the capital of {} is"
    contexts = [("", ""), ("the sun . ", "")]
    rows = rewrite_rows(tok, capital, contexts, ("who does ", " ? "))
    rel = next(r for r in counterfact_table().relations if r.id == "capital")
    assert rel.edit_question not in (rel.question, rel.rephrase)
    assert rows[:2] == rewrite_rows(tok, capital, contexts) and len(rows) == 3
    text, pos, target = rows[2]
    assert target == "tokyo"
    assert rewrite_rows(tok, capital, contexts, ("who does ", " ? "), "statement")[2][2] == "the capital of narnia is tokyo"
    assert text == "who does " + rel.edit_question.replace("{}", "narnia") + " ? "
    start, end = tok(text, return_offsets_mapping=True)["offset_mapping"][pos]
    assert "narnia" in text[start:end]  # the key: the subject's last token in the question
    question = EditRequest(prompt="what is the capital of {} ?", subject="narnia", target_new="tokyo")
    unknown = EditRequest(prompt="{} zorbles with", subject="narnia", target_new="tokyo")
    for req in (question, unknown):
        assert len(rewrite_rows(tok, req, contexts, ("who does ", " ? "))) == 2


def test_question_form_changes_target_vectors_not_the_model(make_model, tokenizer):
    model = make_model("llama")
    before = param_hash(model)
    cfg = dict(steps=6, stop="most_probable", lr=1.0, clamp=4.0)
    plain = target_vector(model, tokenizer, 1, TINY_REQUESTS[0], [""], TargetVectorConfig(**cfg))
    asked = target_vector(model, tokenizer, 1, TINY_REQUESTS[0], [""], TargetVectorConfig(question_form=True, **cfg))
    assert param_hash(model) == before
    torch.testing.assert_close(plain.h, asked.h)  # the same residual before the edit (the bare prompt's)
    assert not torch.allclose(plain.z, asked.z)  # the question's row pulls the delta elsewhere


def test_question_stop_off_lets_the_prompts_decide_when_to_stop(make_model, tokenizer):
    """Without question_stop the question's row pulls on the loss but does not hold the stop back:
    never more steps than with it, and the bare prompt still gets its target."""
    model = make_model("llama")
    cfg = dict(steps=80, stop="most_probable", lr=1.0, clamp=4.0, question_form=True)
    waits = target_vector(model, tokenizer, 0, TINY_REQUESTS[1], [""], TargetVectorConfig(**cfg))
    free = target_vector(model, tokenizer, 0, TINY_REQUESTS[1], [""], TargetVectorConfig(question_stop=False, **cfg))
    assert free.steps <= waits.steps and free.steps < 80
    assert not torch.equal(free.z, target_vector(model, tokenizer, 0, TINY_REQUESTS[1], [""],
                                                 TargetVectorConfig(**{**cfg, "question_form": False})).z)


def test_one_edit_tokenises_each_text_once(make_model, tokenizer, monkeypatch):
    """Keys, target vectors (with the question row), residuals and the landing check read each text
    through the edit's TextTokens: no text reaches the tokenizer twice in one edit."""
    from grace_hooks import EditableModel
    from grace_hooks.testing import DELTA_TINY

    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    em.edit(TINY_REQUESTS[:1], method="encore", pack="warm", **DELTA_TINY)  # the corpus and prefixes, made once
    seen = []
    plain_call = type(tokenizer).__call__

    def counted(self, text=None, *args, **kwargs):
        seen.append((repr(text), kwargs.get("add_special_tokens", True)))
        return plain_call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counted)
    em.edit(TINY_REQUESTS[1:3], method="encore", pack="counted", question_form=True, n_prefixes=2, **{
        k: v for k, v in DELTA_TINY.items() if k != "n_prefixes"})
    repeated = {t for t in seen if seen.count(t) > 1}
    assert seen and not repeated, repeated
