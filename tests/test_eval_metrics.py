"""Metrics against hand-computed values on a toy bigram model, and routing / generation checks on tiny models."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from grace_hooks import EditableModel, EditRequest
from grace_hooks.eval.generation import mentions
from grace_hooks.eval import (MethodSpec, PackEditor, counterfact_metrics, generation_success, greedy, perplexity,
                              score_pairs, score_records)
from grace_hooks.eval.metrics import retention
from grace_hooks.testing import TINY_REQUESTS


class Bigram(torch.nn.Module):
    """Logits at a position depend on that position's token only: every probability is a table look-up."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab) * 3, requires_grad=False)

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=self.table[input_ids])


class Toy:
    """The part of EditableModel the metrics use."""

    def __init__(self, tokenizer, seed=0):
        self.tokenizer, self.net, self.device = tokenizer, Bigram(len(tokenizer), seed), torch.device("cpu")

    def __call__(self, **kw):
        return self.net(**kw)

    def logp(self, prev: str, nxt: str) -> float:
        ids = self.tokenizer.convert_tokens_to_ids([prev, nxt])
        return float(torch.log_softmax(self.net.table[ids[0]], -1)[ids[1]])


REC = [
    EditRequest(prompt="the capital of {} is", subject="narnia", target_new="tokyo rome", ground_truth="paris",
                rephrase_prompt="what is the capital of narnia ?", locality_prompt="the capital of gondor is",
                locality_ground_truth="paris"),
    EditRequest(prompt="the sport that {} plays is", subject="bob", target_new="chess", ground_truth="golf",
                rephrase_prompt="which sport does bob play", locality_prompt="the sport that dave plays is",
                locality_ground_truth="golf"),
]


def test_multi_token_probability_is_the_product(tokenizer):
    toy = Toy(tokenizer)
    s = score_pairs(toy, ["the capital of narnia is"], ["tokyo rome"])
    assert s.logprob[0] == pytest.approx(toy.logp("is", "tokyo") + toy.logp("tokyo", "rome"), abs=1e-5)
    table = toy.net.table
    ids = tokenizer.convert_tokens_to_ids(["is", "tokyo", "rome"])
    hand_acc = (int(table[ids[0]].argmax() == ids[1]) + int(table[ids[1]].argmax() == ids[2])) / 2
    assert s.accuracy[0] == pytest.approx(hand_acc)


def test_counterfact_metrics_match_hand_computation(tokenizer):
    toy, base = Toy(tokenizer, seed=1), Toy(tokenizer, seed=1)
    # edit the toy: after "is" the new target of record 0 becomes likely; nothing else changes
    is_id, tokyo_id = tokenizer.convert_tokens_to_ids(["is", "tokyo"])
    toy.net.table.data[is_id, tokyo_id] += 20.0
    got = counterfact_metrics(score_records(toy, REC), score_records(base, REC))

    def p(model, prev, words):
        return math.exp(sum(model.logp(a, b) for a, b in zip([prev] + words[:-1], words)))

    es = [p(toy, "is", ["tokyo", "rome"]) > p(toy, "is", ["paris"]), p(toy, "is", ["chess"]) > p(toy, "is", ["golf"])]
    assert got["ES"] == pytest.approx(np.mean(es))
    assert got["ES_magnitude"] == pytest.approx(np.mean([p(toy, "is", ["tokyo", "rome"]) - p(toy, "is", ["paris"]),
                                                         p(toy, "is", ["chess"]) - p(toy, "is", ["golf"])]), abs=1e-6)
    ps = [p(toy, "?", ["tokyo", "rome"]) > p(toy, "?", ["paris"]), p(toy, "play", ["chess"]) > p(toy, "play", ["golf"])]
    assert got["PS"] == pytest.approx(np.mean(ps))
    ns = [p(toy, "is", ["paris"]) > p(toy, "is", ["tokyo", "rome"]), p(toy, "is", ["golf"]) > p(toy, "is", ["chess"])]
    assert got["NS"] == pytest.approx(np.mean(ns))
    ns_base = [p(base, "is", ["paris"]) > p(base, "is", ["tokyo", "rome"]), p(base, "is", ["golf"]) > p(base, "is", ["chess"])]
    assert got["NS_base"] == pytest.approx(np.mean(ns_base))
    # the locality prompts end in "is", whose logits row was edited: not bit-identical; argmax of
    # "is" changed to tokyo only if tokyo now wins that row
    assert got["bit_identical"] == 0.0
    moved = int(toy.net.table[is_id].argmax()) != int(base.net.table[is_id].argmax())
    assert got["locality"] == pytest.approx(0.0 if moved else 1.0)
    assert "router_recall" not in got and "false_fire" not in got  # not traced


def test_untouched_model_is_bit_identical_and_local(tokenizer):
    toy, base = Toy(tokenizer, seed=2), Toy(tokenizer, seed=2)
    got = counterfact_metrics(score_records(toy, REC), score_records(base, REC))
    assert got["bit_identical"] == 1.0 and got["locality"] == 1.0 and got["NS"] == got["NS_base"]


def test_missing_fields_are_skipped_not_scored(tokenizer):
    bare = EditRequest(prompt="the capital of {} is", subject="narnia", target_new="tokyo")
    got = counterfact_metrics(score_records(Toy(tokenizer), [bare, REC[1]]))
    toy = Toy(tokenizer)
    assert got["ES"] == float(toy.logp("is", "chess") > toy.logp("is", "golf"))  # record 0 has no ground truth


def test_perplexity_by_hand(tokenizer):
    toy = Toy(tokenizer)
    words = "the cat sat on the mat".split()
    nll = -np.mean([toy.logp(a, b) for a, b in zip(words, words[1:])])
    assert perplexity(toy, [" ".join(words)]) == pytest.approx(math.exp(nll), rel=1e-5)


def test_generation_success_batched_equals_one_at_a_time(make_model, tokenizer):
    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    prompts = ["the capital of narnia is", "the cat sat on the", "alice speaks"]
    own = [greedy(em, p, 2) for p in prompts]  # the model's own continuations are, by definition, reached
    reqs = [EditRequest(prompt=p, subject=p.split()[1], target_new=o) for p, o in zip(prompts, own) if o.strip()]
    assert generation_success(em, reqs, batch_size=3) == [True] * len(reqs)
    wrong = [EditRequest(prompt=r.prompt, subject=r.subject, target_new="zzz") for r in reqs]
    assert generation_success(em, wrong) == [False] * len(reqs)


def test_paraphrase_generation_checks_the_start_and_the_mentions(make_model, tokenizer):
    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    prompt = "the capital of narnia is"
    words = greedy(em, prompt, 3).split()
    first, later = EditRequest(prompt=prompt, subject="narnia", target_new=words[0]), \
        EditRequest(prompt=prompt, subject="narnia", target_new=words[-1])
    for r in (first, later):
        object.__setattr__(r, "rephrase_prompt", prompt)
    starts, said = generation_success(em, [first, later], part="rephrase", extra_tokens=2)
    assert said == [True, True] and starts[0] and starts[1] == (words[-1] == words[0])


def test_mentions_wants_whole_words():
    assert mentions(" playing the Piano.", "piano") and not mentions(" pianos", "piano") and mentions("Rome", " rome ")


def test_router_recall_and_false_fire(make_model, tokenizer):
    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    editor = PackEditor(em, MethodSpec("grace"))
    recs = [EditRequest(prompt=r.prompt, subject=r.subject, target_new=r.target_new, ground_truth="paris",
                        rephrase_prompt=r.text, locality_prompt="the quick brown fox jumps over the lazy dog",
                        locality_ground_truth="paris") for r in TINY_REQUESTS]
    editor.edit(recs, 0)
    scores = score_records(em, recs, routes=True)
    serves = [editor.serves(0, i) for i in range(len(recs))]
    got = counterfact_metrics(scores, None, serves)
    assert got["router_recall"] == 1.0  # the rephrase is the prompt itself: it must reach its own key
    assert got["false_fire"] == 0.0
    # a hit on another request's key does not count as recall
    swapped = [editor.serves(0, (i + 1) % len(recs)) for i in range(len(recs))]
    assert counterfact_metrics(scores, None, swapped)["router_recall"] == 0.0
    with em.disabled():
        assert counterfact_metrics(score_records(em, recs, routes=True), None, serves)["router_recall"] == 0.0


def test_retention_counts_only_edits_that_worked():
    # edits 0, 1, 3 worked right after; of those, 0 and 3 still work; edit 2 never worked, edit 4 unknown
    assert retention([True, False, True, True, False], [1.0, 1.0, 0.0, 1.0, None]) == pytest.approx(2 / 3)
    assert retention([True], [0.0]) is None


def test_names_edited_subject_wants_another_records_subject_as_whole_words():
    from grace_hooks.eval.metrics import names_edited_subject
    subjects = {"John Lennon", "Paris", "Toko Yasuda"}
    assert names_edited_subject("john lennon performs on the", "Toko Yasuda", subjects)  # case ignored
    assert not names_edited_subject("The Parisian metro is", "Toko Yasuda", subjects)  # not a whole word
    assert not names_edited_subject("Toko Yasuda plays the", "Toko Yasuda", subjects)  # the record's own subject
    assert not names_edited_subject(None, "x", subjects) and not names_edited_subject("the cat sat", "x", subjects)


def test_unrelated_locality_counts_only_the_prompts_that_name_no_edited_subject():
    from grace_hooks.eval.metrics import PairScores, unrelated_locality

    def scores(digests, hits):
        n = len(digests)
        return {"locality/true": PairScores(np.zeros(n), np.zeros(n), [[] for _ in range(n)], digests, hits)}

    edited = scores(["a", "X", "c", "Y", ""], [set(), {("s", "p", 0)}, set(), {("s", "p", 1)}, set()])
    base = scores(["a", "b", "c", "d", ""], None)
    # prompt 1 names an edited subject (its fire is right); prompt 3 does not (a false fire); prompt 4 is missing
    got = unrelated_locality(edited, base, [True, False, True, True, True])
    assert got["unrelated_locality_prompts"] == 3.0
    assert got["bit_identical_unrelated"] == pytest.approx(2 / 3) and got["false_fire_unrelated"] == pytest.approx(1 / 3)
    assert "false_fire_unrelated" not in unrelated_locality(base, base, [True] * 5)  # not traced
