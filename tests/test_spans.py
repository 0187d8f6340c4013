"""Subject spans (issue 16): a key with spans fires only where its subject's tokens are in the text."""
import numpy as np
import pytest
import torch

from conftest import UNRELATED, last_logits
from grace_hooks.bases.architectures import Site
from grace_hooks.engine.router import NO_KEY, KeyRouter
from grace_hooks.engine.runtime import EditRuntime, SiteContribution
from grace_hooks.engine.spans import NO_TOKEN, SpanIndex, subject_spans
from grace_hooks.locate.replay import cache_argument
from grace_hooks.methods.delta.effect import LowRankDelta
from grace_hooks.store.header import NoState, read_state
from grace_hooks.store.typed import Invalid

SUBJECT = [7, 8]  # token ids of a two-token subject


def _index(anchor: str) -> SpanIndex:
    index = SpanIndex()
    index.add(np.array([0, 1]), [[SUBJECT], [[9]]], anchor)
    return index


def test_end_anchor_allows_only_the_position_where_the_span_ends():
    tokens = np.array([[1, 7, 8, 5, 7, 3], [7, 2, 8, 9, NO_TOKEN, NO_TOKEN]])
    flat, ids = _index("end").candidates(tokens, 6, [set(), set()])
    assert sorted(zip(flat.tolist(), ids.tolist())) == [(2, 0), (6 + 3, 1)]  # [7, 8] ends at 2; 9 at row 1's 3


def test_seen_anchor_allows_every_position_from_the_span_on_and_is_carried_across_calls():
    index, seen = _index("seen"), [set()]
    flat, ids = index.candidates(np.array([[1, 7, 8, 5]]), 4, seen)
    assert sorted(flat[ids == 0].tolist()) == [2, 3] and seen == [{0}]
    flat, ids = index.candidates(np.array([[1, 7, 8, 5, 4]]), 1, seen)  # the next cached step
    assert flat[ids == 0].tolist() == [0]


ANSWER = [4, 6]  # token ids of the answer that closes key 0


def test_an_answer_closes_a_seen_key_at_its_last_token_and_the_subject_reopens_it():
    index, seen = SpanIndex(), [set()]
    index.add(np.array([0]), [[SUBJECT]], "seen", closers=[[ANSWER]])
    #                  0  1  2  3  4  5  6  7  8
    tokens = np.array([[1, 7, 8, 5, 4, 6, 5, 7, 8]])
    flat, ids = index.candidates(tokens[:, :6], 6, seen)  # subject ends at 2, answer at 5
    assert flat.tolist() == [2, 3, 4] and seen == [set()]
    flat, ids = index.candidates(tokens[:, :7], 1, seen)  # a generated token after the answer: out of scope
    assert len(flat) == 0
    flat, ids = index.candidates(tokens, 2, seen)  # the subject again: in scope from its end on
    assert flat.tolist() == [1] and seen == [{0}]
    flat, _ = index.candidates(np.array([[4, 6, 7, 8, 5]]), 5, [set()])  # an answer before the subject closes nothing
    assert flat.tolist() == [3, 4]


def test_an_answer_split_across_cached_forwards_still_closes():
    index, seen = SpanIndex(), [set()]
    index.add(np.array([0]), [[SUBJECT]], "seen", closers=[[ANSWER]])
    assert index.candidates(np.array([[7, 8, 4]]), 3, seen)[0].tolist() == [1, 2]
    assert index.candidates(np.array([[7, 8, 4, 6]]), 1, seen)[0].tolist() == [] and seen == [set()]


def test_closers_are_only_for_seen_keys():
    with pytest.raises(ValueError, match="seen"):
        SpanIndex().add(np.array([0]), [[SUBJECT]], "end", closers=[[ANSWER]])


def test_a_span_split_across_cached_forwards_still_matches():
    index = _index("end")
    first = index.candidates(np.array([[1, 7]]), 2, [set()])
    second = index.candidates(np.array([[1, 7, 8]]), 1, [set()])  # history + the new token
    assert len(first[0]) == 0 and second[0].tolist() == [0] and second[1].tolist() == [0]


def test_padding_never_completes_a_span():
    flat, _ = _index("end").candidates(np.array([[7, NO_TOKEN, 8]]), 3, [set()])
    assert len(flat) == 0


def test_removed_keys_leave_the_index():
    index = _index("end")
    index.remove(np.array([0]))
    assert 0 not in index and 1 in index and index.lengths() == [1]


def test_a_key_given_the_same_span_twice_is_indexed_and_removed_once():
    """A router key that serves two requests of one subject (zsRE has such pairs) carries their
    spans and answers twice; removing its pack once must leave the index empty (it raised KeyError)."""
    index = SpanIndex()
    index.add(np.array([4]), [[SUBJECT, SUBJECT]], "seen", closers=[[[5], [5]]])
    hits = index.ends(np.array([[1, 7, 8, 5]]))
    assert hits == [[(2, 4)]]  # one hit, not one per copy
    index.remove(np.array([4]))
    assert 4 not in index and index.lengths() == [] and index.ends(np.array([[1, 7, 8, 5]])) == [[]]


def test_router_tests_spanned_keys_only_at_their_candidates():
    router = KeyRouter(2)
    router.add(np.zeros((1, 2), np.float32), np.array([100.0]), rank=1, spans=[[SUBJECT]])
    router.add(np.full((1, 2), 5.0, np.float32), np.array([0.5]), rank=1)  # a key without spans
    queries = np.array([[0.0, 0.0], [5.0, 5.0], [1.0, 1.0]], np.float32)
    assert router.assign(queries).tolist() == [NO_KEY, 1, NO_KEY]  # the spanned key never fires without candidates
    got = router.assign(queries, candidates=(np.array([0, 2]), np.array([0, 0])))
    assert got.tolist() == [0, 1, 0]


def test_subject_spans_give_both_tokenisations(tokenizer):
    # the word-level test tokenizer splits on spaces, so both tokenisations are the same: one span
    assert subject_spans(tokenizer, " alice speaks ") == [tokenizer("alice speaks", add_special_tokens=False).input_ids]


@pytest.mark.parametrize("state, problem", [
    ({"subject_spans": [[[1, 2]]], "key_requests": {"L1.mlp_out": [[0]]}}, None),
    ({"subject_spans": [[[1, -2]]], "key_requests": {"L1.mlp_out": [[0]]}}, "subject_spans"),
    ({"subject_spans": [[[]]], "key_requests": {"L1.mlp_out": [[0]]}}, "subject_spans"),
    ({"subject_spans": [[[1]], [[2]]], "key_requests": {"L1.mlp_out": [[0]]}}, "subject_spans"),
    ({"subject_spans": [[[1, 2]]], "key_requests": {"L1.mlp_out": [[3]]}}, "key_requests"),
    ({"subject_spans": [[[1, 2]]], "key_requests": {"L1.mlp_out": [[0], [0]]}}, "key_requests"),
    ({"subject_spans": [[[1, 2]]], "answer_spans": [[[5, 6], [6]]], "key_requests": {"L1.mlp_out": [[0]]}}, None),
    ({"subject_spans": [[[1, 2]]], "answer_spans": [], "key_requests": {"L1.mlp_out": [[0]]}}, "answer_spans"),
    ({"subject_spans": [[[1, 2]]], "answer_spans": [[["x"]]], "key_requests": {"L1.mlp_out": [[0]]}}, "answer_spans"),
    ({"answer_spans": [[[5]]], "key_requests": {"L1.mlp_out": [[0]]}}, "subject_spans"),
])
def test_span_state_is_checked(state, problem):
    """Types are checked as the header's state is read; counts and ranges against the pack after."""
    try:
        rest, routing = read_state(NoState, state)
        problems = routing.problems(1, {"L1.mlp_out": 1})
    except Invalid as exc:
        problems = [str(exc)]
    assert (problems == []) if problem is None else (len(problems) == 1 and problem in problems[0])


def _site_outputs(model, tokenizer, site, text, step_by_step=False):
    """The site's output at each position of ``text``, by one forward or token by token with a cache."""
    out = []
    h = site.module(model).register_forward_hook(lambda m, a, o: out.append(o[0].detach()))
    ids = tokenizer(text, return_tensors="pt").input_ids
    try:
        with torch.no_grad():
            if not step_by_step:
                model(input_ids=ids)
            else:
                cache = None
                for t in range(ids.shape[1]):
                    out_t = model(input_ids=ids[:, t:t + 1], use_cache=True, **{cache_argument(model): cache})
                    cache = out_t.past_key_values
    finally:
        h.remove()
    return torch.cat(out)


def test_a_spanned_delta_acts_only_at_its_subject_even_with_a_huge_radius(make_model, tokenizer):
    model = make_model("llama")
    rt = EditRuntime(model)  # the core runtime under test, on its own
    site = Site(1)
    d_in, d_out = site.dims(model)
    g = torch.Generator().manual_seed(0)
    U, V = torch.randn(d_out, 2, generator=g), torch.randn(d_in, 2, generator=g)
    spans = subject_spans(tokenizer, "alice speaks")
    base = _site_outputs(model, tokenizer, site, "bob says alice speaks french")
    base_unrelated = last_logits(model, tokenizer, UNRELATED + ["alice works for bob"])
    rt.add_pack("p", 1, {site.name: SiteContribution(LowRankDelta(U, V, routed=True), keys=torch.zeros(1, d_in),
                                                              radii=torch.tensor([1e6]), spans=[spans])})
    got = _site_outputs(model, tokenizer, site, "bob says alice speaks french")
    changed = (got != base).any(-1).nonzero().squeeze(1).tolist()
    assert changed == [3]  # 'speaks', where the subject ends; the key alone would take every position
    stepped = _site_outputs(model, tokenizer, site, "bob says alice speaks french", step_by_step=True)
    assert torch.allclose(stepped, got, atol=1e-5)  # the span crosses cached forwards and still matches
    for a, b in zip(last_logits(model, tokenizer, UNRELATED + ["alice works for bob"]), base_unrelated):
        assert torch.equal(a, b)  # 'alice' without 'speaks' is not the subject
