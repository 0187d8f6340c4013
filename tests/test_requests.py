"""Readers for the CounterFact (EasyEdit), ROME and zsRE (MEND) layouts."""
import json

import pytest

from conftest import counterfact_path
from grace_hooks import EditRequest, read_requests
from grace_hooks.errors import EditRequestError
from grace_hooks.requests import record_to_request

EASYEDIT = {"case_id": 2, "prompt": "Toko Yasuda, the", "target_new": "piano", "subject": "Toko Yasuda", "ground_truth": "guitar",
            "rephrase_prompt": "Toko Yasuda is incredible at", "locality_prompt": "John Lennon performs on the", "locality_ground_truth": "guitar"}
ROME = {"case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
        "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"}},
        "paraphrase_prompts": ["Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is"]}
ZSRE = {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform", "rephrase": "What will be the product of UniFirst?",
        "alt": "unmanned aircraft", "answers": ["uniform"], "loc": "nq question: who plays the lead", "loc_ans": "Walter", "cond": "x"}


def test_easyedit_counterfact():
    r = record_to_request(EASYEDIT)
    assert (r.text, r.subject, r.target_new, r.ground_truth, r.case_id) == ("Toko Yasuda, the", "Toko Yasuda", "piano", "guitar", "2")
    assert r.rephrase_prompt.startswith("Toko") and r.locality_ground_truth == "guitar"


def test_rome_layout():
    r = record_to_request(ROME).validate()
    assert r.text == "The mother tongue of Danielle Darrieux is" and r.target_new == "English" and r.ground_truth == "French"
    assert r.locality_prompt == "The mother tongue of Léon Blum is" and r.subject_span() == (21, 38)


def test_zsre_layout():
    r = record_to_request(ZSRE).validate()
    assert (r.text, r.target_new, r.ground_truth, r.rephrase_prompt, r.locality_ground_truth) == (
        "What is the product made by UniFirst?", "unmanned aircraft", "uniform", "What will be the product of UniFirst?", "Walter")


def test_json_and_jsonl_files(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([EASYEDIT, ROME, ZSRE]))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(x) for x in [EASYEDIT, ZSRE]))
    assert [r.target_new for r in read_requests(tmp_path / "a.json")] == ["piano", "English", "unmanned aircraft"]
    assert len(read_requests(tmp_path / "b.jsonl", limit=1)) == 1


def test_native_roundtrip():
    r = EditRequest(prompt="The CEO of {} is", subject="Acme", target_new="Jane Roe")
    assert record_to_request(r.to_dict()) == r and r.text == "The CEO of Acme is"


@pytest.mark.parametrize("record", [{"foo": 1}, [1, 2], {"prompt": "x", "subject": "y"}])
def test_unknown_layouts(record):
    with pytest.raises(EditRequestError):
        record_to_request(record)


def test_missing_file_and_garbage(tmp_path):
    with pytest.raises(EditRequestError, match="does not exist"):
        read_requests(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{{{")
    with pytest.raises(EditRequestError):
        read_requests(tmp_path / "bad.json")


def test_shared_counterfact_file_reads():
    reqs = read_requests(counterfact_path(), limit=50)
    assert len(reqs) == 50 and all(r.subject in r.text for r in reqs)
