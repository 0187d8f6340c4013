"""The real embedded model (SmolLM2-135M-Instruct): 20 GRACE CounterFact edits in one call, and a
two-pack comeba_hk chain with each gate."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_first_edit_reads_shipped_text, counterfact_path, embedded_or_skip, prompt_logits
from grace_hooks import EditableModel, EditRequest, read_requests
from grace_hooks.bases.hooks import count_hooks
from grace_hooks.eval import greedy, reaches
from grace_hooks.eval.generation import mentions

pytestmark = pytest.mark.real_model
FIXTURES = Path(__file__).resolve().parent / "fixtures"
N_TOKENS = 6


@pytest.fixture(scope="module")
def smol():
    em = EditableModel.from_pretrained(embedded_or_skip("smollm2-135m"))
    yield em
    em.close()


def test_twenty_counterfact_edits_save_reload_rollback(smol, tmp_path):
    reqs = read_requests(counterfact_path(), limit=20)
    base_answers = [greedy(smol, r.text, N_TOKENS) for r in reqs]
    base_loc = [prompt_logits(smol, r.locality_prompt) for r in reqs]

    smol.edit(reqs, method="grace", pack="cf20")
    answers = [greedy(smol, r.text, N_TOKENS) for r in reqs]
    assert sum(reaches(a, r.target_new) for a, r in zip(answers, reqs)) >= 19, answers
    assert sum(torch.equal(prompt_logits(smol, r.locality_prompt), b) for r, b in zip(reqs, base_loc)) >= 19

    smol.save_pack("cf20", tmp_path)
    script = (
        "import json,sys; from grace_hooks import EditableModel, read_requests; from grace_hooks.cli.demo import greedy;"
        f"em=EditableModel.from_pretrained('smollm2-135m', adapters=sys.argv[1]);"
        f"reqs=read_requests(sys.argv[2], limit=20); print(json.dumps([greedy(em, r.text, {N_TOKENS}) for r in reqs]))"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(counterfact_path())],
                          capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == answers  # same answers in a fresh process

    smol.remove_pack("cf20")
    assert [greedy(smol, r.text, N_TOKENS) for r in reqs] == base_answers
    assert count_hooks(smol.base_model) == 0


def test_the_fixture_demo_pack_answers(smol):
    """The demo pack in an old format (tests/fixtures/demo-facts) loads on the real model and answers."""
    info = smol.load_pack(FIXTURES / "demo-facts")
    try:
        for r in smol.pack(info.name).requests:
            prompt = r["prompt"].replace("{}", r["subject"])
            assert reaches(greedy(smol, prompt, N_TOKENS), r["target_new"]), prompt
    finally:
        smol.remove_pack(info.name)
    assert count_hooks(smol.base_model) == 0


@pytest.fixture(scope="module")
def cf_corpus(tmp_path_factory):
    """C0 text for the comeba_hk test: CounterFact sentences beyond the edited records (4,000
    tokens, more samples than the site's 1,536 input dimensions). Sampling the model's own text
    as the benchmarks do would take minutes here."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    reqs = read_requests(counterfact_path(), limit=1500)[500:]
    path.write_text("\n\n".join(f"{r.text} {r.ground_truth}. {r.rephrase_prompt or ''}" for r in reqs), encoding="utf-8")
    return dict(corpus=str(path), max_tokens=4000, corpus_probe=4000, stop="most_probable")


@pytest.mark.parametrize("gate", ["router", "zscore"])
def test_comeba_hook_layers_on_counterfact(smol, cf_corpus, gate):
    reqs = read_requests(counterfact_path(), limit=6)
    first = [smol.tokenizer(" " + r.target_new, add_special_tokens=False).input_ids[0] for r in reqs]
    base = [prompt_logits(smol, t)[0, -1] for t in [r.text for r in reqs] + [r.locality_prompt for r in reqs]]

    smol.edit(reqs[:3], method="comeba_hk", pack="c0", gate=gate, **cf_corpus)
    after_one = [prompt_logits(smol, t)[0, -1] for t in [r.text for r in reqs] + [r.locality_prompt for r in reqs]]
    smol.edit(reqs[3:], method="comeba_hk", pack="c1", gate=gate, **cf_corpus)
    now = [prompt_logits(smol, r.text)[0, -1] for r in reqs]
    assert sum(int(n.argmax()) == f for n, f in zip(now, first)) >= 5  # the target's first token is the greedy next
    loc = [prompt_logits(smol, r.locality_prompt)[0, -1] for r in reqs]
    if gate == "router":  # unrelated prompts stay bit-identical
        assert sum(torch.equal(a, b) for a, b in zip(loc, base[6:])) >= 5

    smol.remove_pack("c1")  # rollback is exact, one pack at a time
    assert all(torch.equal(prompt_logits(smol, t)[0, -1], b)
               for t, b in zip([r.text for r in reqs] + [r.locality_prompt for r in reqs], after_one))
    smol.remove_pack("c0")
    assert all(torch.equal(prompt_logits(smol, t)[0, -1], b)
               for t, b in zip([r.text for r in reqs] + [r.locality_prompt for r in reqs], base))
    assert count_hooks(smol.base_model) == 0


def test_a_made_up_multi_token_answer_ends_where_it_ends(smol):
    """Issue 18: after 'The capital of Freedonia is' -> 'Zorbatown' the answer used to run on as
    'Zorbatownownown...': the value, trained only to write the answer, pulled every later position back
    to its last piece. GRACE now also trains the base's token after the answer, and the key stops
    once its answer has been written."""
    req = EditRequest(prompt="The capital of Freedonia is", subject="Freedonia", target_new="Zorbatown")
    base_tail = greedy(smol, req.text + " Zorbatown", 4)
    smol.edit([req], method="grace", pack="zorba")
    try:
        answer = greedy(smol, req.text, 12)
        assert mentions(answer, "Zorbatown") and not answer.strip().startswith("Zorbatownown"), answer
        assert answer.startswith(" Zorbatown" + base_tail[:1]), (answer, base_tail)  # then the base's own next token
        ids = smol.tokenizer(req.text + answer, return_tensors="pt").input_ids
        answer_end = len(smol.tokenizer(req.text + " Zorbatown").input_ids) - 1
        with torch.no_grad(), smol.routes() as hits:
            smol(input_ids=ids)
        assert hits and max(pos for _, _, pos, _, _ in hits) < answer_end  # nothing fires from the answer's end on
    finally:
        smol.remove_pack("zorba")


@pytest.mark.parametrize("method", ["encore", "grace"])
def test_chat_form_edits_answer_the_question_asked_in_a_chat(smol, cf_corpus, method):
    """``chat_form``: the default's target vectors also optimised on the prompt asked as a user turn of
    SmolLM2's chat template; GRACE also keys the edit at the end of that turn. Asked that way and
    answered to the natural stop, the edited facts come back; questions about unrelated things get
    the base's answer, word for word."""
    from grace_hooks.eval.chat import chat_answers, chat_success
    reqs = read_requests(counterfact_path(), limit=4)
    questions, unrelated = [r.text for r in reqs], [r.locality_prompt for r in reqs]
    base = chat_answers(smol, questions + unrelated)
    smol.edit(reqs, method=method, pack="chat", chat_form=True, **(cf_corpus if method == "encore" else {}))
    try:
        answers = chat_answers(smol, questions + unrelated)
        assert sum(chat_success(answers[:4], [r.target_new for r in reqs])) >= 3, answers[:4]
        assert answers[4:] == base[4:]
    finally:
        smol.remove_pack("chat")
    assert chat_answers(smol, questions) == base[:4]  # rollback


def test_first_default_edit_reads_the_shipped_corpus_and_prefixes(smol, tmp_path, monkeypatch):
    assert_first_edit_reads_shipped_text(smol, "smollm2-135m", tmp_path, monkeypatch)
