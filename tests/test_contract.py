"""The contract every method x architecture must keep (DESIGN section 2, invariants 1-4 and 7)."""
import pytest
import torch

from conftest import UNRELATED, assert_reloads_and_rolls_back, last_logits, next_token, param_hash, target_id
from grace_hooks import EditableModel
from grace_hooks.testing import DELTA_REQUESTS, DELTA_TINY, TINY_CONFIGS, TINY_REQUESTS

# (method, config overrides): each a row of the matrix. subject_last keys need layers after the site.
METHODS = {
    "grace": ("grace", {}),
    "grace-subject_last": ("grace", {"key": "subject_last", "layer": 0, "n_iter": 300}),
    "grace-replace_last": ("grace", {"replacement": "last"}),
    **{f"{m}-{mode}": (m, {**DELTA_TINY, **extra, "mode": mode}) for m, extra in
       (("memit", {}), ("encore", {"norm_lambda": 1.0}), ("oedit", {})) for mode in ("global", "routed")},
    "comeba_hk-router": ("comeba_hk", {**DELTA_TINY, "gate": "router"}),
    # a 4-token random-model prompt's largest z-score need not sit at its subject: alpha from the subject
    "comeba_hk-zscore": ("comeba_hk", {**DELTA_TINY, "gate": "zscore", "alpha_from": "subject"}),
}
# Weight deltas act at the last subject token: on random tiny models the edit prompts end in the subject
# (a random block barely carries a subject-token edit to a later position; the real model is tested on CounterFact).
REQUESTS = {name: DELTA_REQUESTS for name, (m, _) in METHODS.items() if m in ("memit", "encore", "oedit", "comeba_hk")}
# A global delta acts on every token by design, and the paper's z-score gate fires at the most
# outlying tokens of any sequence: unrelated text moves, only less than the edited prompts.
GLOBAL = {name for name, (_, cfg) in METHODS.items() if cfg.get("mode") == "global" or cfg.get("gate") == "zscore"}
# The paper's z-score is over the whole sequence, so a full re-run without a cache re-scores earlier
# positions against later ones; cached decoding is checked against a stepwise reference in test_comeba.
NON_CAUSAL = {name for name, (_, cfg) in METHODS.items() if cfg.get("replacement") == "last" or cfg.get("gate") == "zscore"}
ARCHS = sorted(TINY_CONFIGS)
# A random tiny Gemma renormalises its MLP branch, so a value written at the subject token cannot
# steer the last token through two random layers; on real weights it does (test_gemma3.py::test_grace_subject_last_key).
WEAK_CELLS = {("gemma3_text", "grace-subject_last")}


def matrix(weak_xfail: bool = True):
    for method in sorted(METHODS):
        for arch in ARCHS:
            weak = weak_xfail and (arch, method) in WEAK_CELLS
            marks = [pytest.mark.xfail(strict=True, reason="random tiny Gemma cannot carry a subject-token edit")] if weak else []
            yield pytest.param(arch, method, marks=marks, id=f"{method}-{arch}")


@pytest.mark.parametrize("arch,method", matrix())
def test_contract(arch, method, make_model, tokenizer, tmp_path):
    name, cfg = METHODS[method]
    requests = REQUESTS.get(method, TINY_REQUESTS)
    model = make_model(arch)
    weights_before = param_hash(model)
    em = EditableModel(model, tokenizer, name=f"tiny-{arch}")
    prompts = [r.text for r in requests]
    base_edit, base_unrelated = last_logits(model, tokenizer, prompts), last_logits(model, tokenizer, UNRELATED)

    em.edit(requests, method=name, pack="p1", **cfg)
    # the edit works: every target is the greedy next token
    assert [next_token(em, tokenizer, p) for p in prompts] == [target_id(tokenizer, r) for r in requests]
    unrelated = last_logits(em, tokenizer, UNRELATED)
    if method in GLOBAL:  # moved less than the edited prompts
        moved = lambda now, before: torch.stack([(a - b).norm() for a, b in zip(now, before)]).mean()  # noqa: E731
        assert moved(unrelated, base_unrelated) < moved(last_logits(em, tokenizer, prompts), base_edit)
    else:  # unrelated inputs are bit-identical to the base
        assert all(torch.equal(a, b) for a, b in zip(unrelated, base_unrelated))
    with em.disabled():
        assert all(torch.equal(a, b) for a, b in zip(last_logits(em, tokenizer, prompts), base_edit))
    edited = last_logits(em, tokenizer, prompts)

    # save -> load on a fresh copy of the base: bit-identical logits; rollback is exact and leaves no hook
    assert_reloads_and_rolls_back(em, "p1", arch, make_model, tokenizer, prompts, edited, base_edit, weights_before, tmp_path)

def _greedy(model, tokenizer, prompts, **kw):
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id, **kw)
    rows = [row[enc.input_ids.shape[1]:].tolist() for row in out]
    eos = tokenizer.eos_token_id  # a row that ended is padded in a batch, not alone: compare up to its end
    return [row[:row.index(eos) + 1] if eos in row else row for row in rows]


def _padded_logits(model, tokenizer, prompts):
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    positions = (enc.attention_mask.cumsum(1) - 1).clamp(min=0)  # as generate() does for left padding
    with torch.no_grad():
        return enc.attention_mask.bool(), model(**enc, position_ids=positions).logits


@pytest.mark.parametrize("arch,method", matrix(weak_xfail=False))
def test_batched_padded_cached_generation(arch, method, make_model, tokenizer):
    """Invariant 7: batched, padded and KV-cached generation equal one-at-a-time calls."""
    name, cfg = METHODS[method]
    requests = REQUESTS.get(method, TINY_REQUESTS)
    em = EditableModel(make_model(arch), tokenizer)
    em.edit(requests, method=name, **cfg)
    prompts = [r.text for r in requests] + UNRELATED[:2]
    single = [_greedy(em, tokenizer, [p])[0] for p in prompts]
    assert single[0][0] == target_id(tokenizer, requests[0])
    if method not in NON_CAUSAL:  # GRACE's 'last' queries only the newest token: cache-dependent by definition
        assert [_greedy(em, tokenizer, [p], use_cache=False)[0] for p in prompts] == single
    for side in ("left", "right"):
        tokenizer.padding_side = side
        try:
            real, batched = _padded_logits(em, tokenizer, prompts)
            for b, p in enumerate(prompts):
                one = em(**tokenizer(p, return_tensors="pt")).logits[0]
                torch.testing.assert_close(batched[b][real[b]], one, rtol=1e-4, atol=1e-4)
            if side == "left":  # generation continues each row after its last token only with left padding
                with em.disabled():
                    base_consistent = _greedy(em, tokenizer, prompts) == [_greedy(em, tokenizer, [p])[0] for p in prompts]
                if base_consistent:  # HF's GPT-NeoX differs under left padding even without edits
                    assert _greedy(em, tokenizer, prompts) == single
        finally:
            tokenizer.padding_side = "right"
