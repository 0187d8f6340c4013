"""Questions the way users ask them (grace_hooks.questions, grace_hooks.eval.asking): the relation
table, records mapped to their questions (synthetic, and the shared CounterFact data when it is here),
the answered figures on hand-made answers, the harness's new columns and their honest labels."""
import pytest

from conftest import CHAT_TEMPLATE, DATA_DIR, counterfact_path
from grace_hooks import EditableModel, EditRequest
from grace_hooks.errors import ConfigError
from grace_hooks.eval import LifelongConfig, LifelongRun, MethodSpec
from grace_hooks.eval.asking import question_metrics, share, subject_kept, unchanged
from grace_hooks.questions import PLACEHOLDER, Relation, RelationTable, counterfact_table, coverage
from grace_hooks.eval.report import table
from grace_hooks.requests import read_requests
from grace_hooks.testing import tiny_model, tiny_tokenizer

COVERAGE_FLOOR = 0.98


def cf(prompt, subject, locality=None, rephrase=None, target="tokyo"):
    return EditRequest(prompt=prompt, subject=subject, target_new=target, ground_truth="paris", rephrase_prompt=rephrase,
                       locality_prompt=locality, locality_ground_truth="paris")


def test_every_relation_has_two_distinct_questions_with_one_placeholder():
    rels = counterfact_table().relations
    assert len({r.id for r in rels}) == len(rels) >= 30
    for r in rels:
        assert r.question != r.rephrase, r.id
        for q in (r.question, r.rephrase):
            assert q.count(PLACEHOLDER) == 1 and q.endswith("?") and "{" not in q.replace(PLACEHOLDER, ""), (r.id, q)
        assert r.templates and all(t.count(PLACEHOLDER) == 1 for t in r.templates), r.id


def test_a_template_belongs_to_one_relation():
    a = Relation("a", "What is {}?", "Who is {}?", ("{} is in",))
    with pytest.raises(ConfigError, match="both"):
        RelationTable([a, Relation("b", "Where is {}?", "Whence {}?", ("{}  IS in",))])  # case and spaces ignored
    with pytest.raises(ConfigError, match="exactly one"):
        RelationTable([Relation("c", "What is it?", "Who is {}?", ("{} is in",))])


def test_records_map_to_their_relation_and_questions():
    table = counterfact_table()
    q = table.questions(cf("The mother tongue of Danielle Darrieux is", "Danielle Darrieux",
                           locality="Montesquieu, speaker of"))
    assert q.relation == "native_language" and q.question == "What is the mother tongue of Danielle Darrieux?"
    assert q.rephrase == "Which language did Danielle Darrieux grow up speaking?"
    assert q.locality == "What is the mother tongue of Montesquieu?" and q.locality_relation == "native_language"
    # ROME layout ("{}" in the prompt); case and runs of spaces ignored
    assert table.questions(cf("{} plays  the instrument", "Toko Yasuda")).relation == "instrument"
    assert table.questions(cf("the capital of narnia is", "narnia")).question == "What is the capital of narnia?"
    # a subject with regex and format characters is filled in verbatim
    odd = "C++ {v2} (1.0)"
    assert table.questions(cf(f"{odd} was developed by", odd)).question == f"Which company makes {odd}?"
    assert table.questions(cf("Narnia has a tail", "Narnia")) is None  # no template of the table


def test_the_locality_subject_is_read_through_the_most_specific_template():
    table = counterfact_table()
    # "{} is located in" would also fit, with the subject "Toronto, which": the longer template wins
    assert table.parse("Toronto, which is located in") == (table.relation_of("{}, which is located in", ""), "Toronto")
    rel, subject = table.parse("What is the twin city of Kyoto? It is")
    assert (rel.id, subject) == ("twin_city", "Kyoto")
    assert table.parse("an unrelated sentence") is None
    q = table.questions(cf("Toko Yasuda, the", "Toko Yasuda", locality="a sentence of no template"))
    assert q.relation == "plays" and q.locality is None  # no locality subject: no locality question


def test_question_records_are_asked_as_they_are():
    table = counterfact_table()
    req = EditRequest(prompt="What is the product made by UniFirst?", subject="UniFirst", target_new="drones",
                      rephrase_prompt="What will be the product of UniFirst?",
                      locality_prompt="nq question: who wrote the book of mormon")
    q = table.questions(req)
    assert (q.question, q.rephrase, q.locality, q.relation) == (
        req.prompt, req.rephrase_prompt, "who wrote the book of mormon?", None)


@pytest.mark.parametrize("split", ["train", "val"])
def test_real_counterfact_records_map_to_relations(split):
    path = counterfact_path() if split == "train" else DATA_DIR / "counterfact-val.json"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path}")
    cov = coverage(read_requests(path))
    assert cov["share"] >= COVERAGE_FLOOR, cov["unmatched_shapes"]
    assert cov["with_locality"] >= COVERAGE_FLOOR * cov["matched"]


def test_real_zsre_records_are_questions():
    path = DATA_DIR / "zsre-train-1k.json"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path}")
    cov = coverage(read_requests(path, limit=200))
    assert cov["share"] == 1.0 and cov["with_locality"] == cov["records"]


def test_pure_answer_figures_on_hand_made_answers():
    edited = ["Narnia is in Tokyo.", "It is Tokyo.", "bob", "x"]
    base = ["Narnia is in Paris.", "Narnia's capital is Paris.", "Paris", "narnia!"]
    # the base names the subject in rows 0, 1 and 3 (whole words, case ignored); only row 0 keeps it
    assert subject_kept(edited, base, ["Narnia", "Narnia", "Narnia", "narnia"]) == [True, False, False]
    assert subject_kept(["Narnians"], ["Narnia"], ["Narnia"]) == [False]  # whole words only
    assert unchanged(["a", "b", "c"], ["a", "B", "c"]) == [True, False, True]
    assert share([True, False, False]) == pytest.approx(1 / 3) and share([]) is None


def test_question_metrics_on_scripted_answers():
    """The harness's arithmetic, with an asker that returns hand-written answers."""
    reqs = [cf("The capital of narnia is", "narnia", "The capital of gondor is", target="tokyo"),
            cf("The capital of rohan is", "rohan", "Mordor's capital is", target="rome"),
            cf("rohan has a tail", "rohan", "The capital of gondor is")]  # no relation: left out
    edited = {"What is the capital of narnia?": "narnia's capital is tokyo.",
              "Which city is the seat of government of narnia?": "It is tokyo.",
              "What is the capital of rohan?": "It is paris.",
              "Which city is the seat of government of rohan?": "The seat of rohan is rome.",
              "What is the capital of gondor?": "paris.", "What is the capital of Mordor?": "berlin."}
    base = {**edited, "What is the capital of narnia?": "narnia's capital is paris.",
            "Which city is the seat of government of narnia?": "narnia rules from paris.",
            "What is the capital of Mordor?": "madrid."}
    asked = []

    def ask(key, texts):
        asked.append(key)
        return [edited[t] for t in texts], [base[t] for t in texts]

    out = question_metrics(ask, reqs, [0, 1, 2], unrelated={0})
    assert out["question_sample_size"] == 2 and out["question_unmatched"] == 1
    assert out["question_success"] == 0.5 and out["question_success_base"] == 0.0
    assert out["question_success_rephrase"] == 1.0 and out["question_success_rephrase_base"] == 0.5
    # the base names the subject in 3 answers (narnia twice, rohan once); the edited rephrase of narnia drops it
    assert out["subject_kept"] == pytest.approx(2 / 3) and out["subject_kept_n"] == 3
    assert out["question_locality_size"] == 2 and out["question_locality"] == 0.5  # Mordor's answer changed
    assert out["question_locality_unrelated"] == 1.0  # record 0 alone: gondor's answer is the base's
    assert out["question_success_examples"][0] == ["What is the capital of narnia?", "narnia's capital is paris.",
                                                   "narnia's capital is tokyo."]
    assert [k[0] for k in asked] == ["question_success", "question_success_rephrase", "question_locality"]


def _tiny_run(tok, tmp_path, spec="none", **cfg):
    stream = [cf("the capital of {} is", s, "the capital of city is", f"what is the capital of {s} ?", t)
              for s, t in (("narnia", "tokyo"), ("gondor", "london"))]
    config = LifelongConfig(n_records=2, batch=2, eval_sample=0, eval_batch=2, gen_tokens=2, gen_rounds=1,
                            answer_tokens=4, **cfg)
    em = EditableModel(tiny_model("llama"), tok, name="tiny")
    return LifelongRun(em, stream, MethodSpec.parse(spec), config, tmp_path, meta={"model": "tiny"}).run(progress=False)


def test_the_harness_reports_question_columns_in_chat_form(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    last = _tiny_run(tok, tmp_path)["checkpoints"][-1]
    assert last["question_form"] == "chat" and last["question_sample_size"] == 2
    # the "none" baseline is the base: every answer is the base's
    assert last["question_success"] == last["question_success_base"]
    assert last["question_success_rephrase"] == last["question_success_rephrase_base"]
    assert last["question_locality"] == 1.0 and last["subject_kept"] in (1.0, None)
    question, base, edited = last["question_success_examples"][0]
    assert question == "What is the capital of narnia?" and base == edited
    header = table([{"row": "none", **last}]).splitlines()[0]
    assert "| chat success |" in header and "question success (chat)" in header


def test_labels_say_plain_where_no_chat_template_was_applied():
    row = {"row": "grace", "question_form": "plain", "chat_sample_size": 2, "chat_success": 1.0, "question_success": 0.5}
    header = table([row]).splitlines()[0]
    assert "chat" not in header
    assert "| plain prompt success |" in header and "question success (plain prompt)" in header
    old = table([{k: v for k, v in row.items() if k != "question_form"}]).splitlines()[0]  # written before the form was
    assert "| chat or plain prompt success |" in old



def test_no_cloze_answers_leaves_out_the_chat_columns_and_keeps_the_questions(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    last = _tiny_run(tok, tmp_path, cloze_answers=False)["checkpoints"][-1]
    assert "chat_success" not in last and "chat_locality" not in last
    assert last["question_sample_size"] == 2 and "question_success" in last
