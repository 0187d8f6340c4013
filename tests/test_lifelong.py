"""The lifelong harness: checkpoints, resume after an interrupt, baselines, outputs."""
import json
from dataclasses import replace

import pytest
import torch

from conftest import param_hash
from grace_hooks import EditableModel, EditRequest
from grace_hooks.errors import ConfigError
from grace_hooks.eval import FineTune, LifelongConfig, LifelongRun, MethodSpec, PackEditor, checkpoint_counts
from grace_hooks.eval.bench import run_benchmark
from grace_hooks.store.adapters_dir import LOCK_NAME

SUBJECTS = ["narnia", "gondor", "mordor", "rohan", "alice", "bob"]
TARGETS = ["tokyo", "london", "berlin", "madrid", "rome", "paris"]
STREAM = [EditRequest(prompt="the capital of {} is", subject=s, target_new=t, ground_truth="paris" if t != "paris" else "rome",
                      rephrase_prompt=f"what is the capital of {s} ?", locality_prompt="the capital of city is",
                      locality_ground_truth="paris") for s, t in zip(SUBJECTS, TARGETS)]
# answer_tokens: a random model's answers rarely stop early; short caps keep the answered figures cheap
CFG = LifelongConfig(n_records=6, batch=2, checkpoint_every=2, eval_sample=3, eval_batch=4, gen_tokens=2, gen_rounds=1,
                     answer_tokens=6)
STABLE = ("ES", "ERR", "PS", "NS", "NS_base", "generation_success", "bit_identical", "perplexity_ratio", "router_recall",
          "false_fire", "sample_size", "edits", "bit_identical_unrelated", "false_fire_unrelated")


def test_checkpoint_counts():
    assert checkpoint_counts(1000, 1) == list(range(100, 1001, 100))
    assert checkpoint_counts(1000, 100, 200) == [200, 400, 600, 800, 1000]
    assert checkpoint_counts(10, 3, 2) == [3, 6, 9, 10]  # multiples of the batch, ending at n
    with pytest.raises(ConfigError):
        checkpoint_counts(0, 1)
    assert checkpoint_counts(10000, 100, 0, "1000,2000,5000") == [1000, 2000, 5000, 10000]  # the end is always one
    for bad in ("1000,2050", "abc", "0", "20000"):
        with pytest.raises(ConfigError):
            checkpoint_counts(10000, 100, 0, bad)


def test_method_spec_parsing():
    spec = MethodSpec.parse("grace:key=subject_last,layer=0")
    assert spec.method == "grace" and dict(spec.overrides) == {"key": "subject_last", "layer": "0"}
    assert spec.label == "grace-key=subject_last-layer=0"
    with pytest.raises(ConfigError):
        MethodSpec.parse("grace:layer")


def _run(make_model, tokenizer, workdir, spec="grace", cfg=CFG):
    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    return LifelongRun(em, STREAM, MethodSpec.parse(spec), cfg, workdir, meta={"model": "tiny"}).run(progress=False)


@pytest.mark.parametrize("every, checkpoints_before", [(2, 2), (6, 0)])
def test_resume_after_interrupt_gives_the_same_result(make_model, tokenizer, tmp_path, monkeypatch, every,
                                                     checkpoints_before):
    """The state is saved after every batch, also between checkpoints."""
    cfg = replace(CFG, checkpoint_every=every)
    whole = _run(make_model, tokenizer, tmp_path / "whole", cfg=cfg)
    real_edit = PackEditor.edit

    def crash_on_third(self, requests, index):
        if index == 2:
            raise KeyboardInterrupt("interrupted")
        return real_edit(self, requests, index)

    monkeypatch.setattr(PackEditor, "edit", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        _run(make_model, tokenizer, tmp_path / "resumed", cfg=cfg)
    state = json.loads((tmp_path / "resumed" / "state.json").read_text())
    assert state["edits"] == 4 and len(state["checkpoints"]) == checkpoints_before
    assert len(state["immediate_es"]) == 4 and len(state["batch_seconds"]) == 2
    monkeypatch.setattr(PackEditor, "edit", real_edit)
    resumed = _run(make_model, tokenizer, tmp_path / "resumed", cfg=cfg)
    assert len(resumed["checkpoints"]) == len(whole["checkpoints"])
    for a, b in zip(whole["checkpoints"], resumed["checkpoints"]):
        assert {k: a.get(k) for k in STABLE} == {k: b.get(k) for k in STABLE}
    assert sorted(p.name for p in (tmp_path / "resumed" / "adapters").iterdir() if p.name != LOCK_NAME) == ["e00000", "e00001", "e00002"]


def test_resume_refuses_other_settings(make_model, tokenizer, tmp_path):
    _run(make_model, tokenizer, tmp_path)
    with pytest.raises(ConfigError, match="other settings"):
        _run(make_model, tokenizer, tmp_path, spec="grace:key=subject_last")


def test_resume_refuses_another_default_or_commit_and_says_what_differs(make_model, tokenizer, tmp_path):
    """The signature holds the resolved method config (every option, defaults filled in) and the code:
    a default changed between two processes, or other code, is named in the refusal."""
    em = EditableModel(make_model("llama"), tokenizer, name="tiny")

    def run(commit):
        meta = {"model": "tiny", "git": {"commit": commit, "diff_sha256": None, "dirty": False}}
        return LifelongRun(em, STREAM, MethodSpec("grace"), CFG, tmp_path, meta=meta).run(progress=False)

    first = run("a" * 40)
    assert first["code"] == {"commit": "a" * 40, "diff_sha256": None}
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["signature"]["method_config"]["lr"] == first["method_config"]["lr"]  # resolved, defaults filled in
    run("a" * 40)  # same code, same defaults: resumes (here: finished, nothing to do)
    with pytest.raises(ConfigError, match="code.commit: 'aaa+' -> 'bbb+'"):
        run("b" * 40)
    state["signature"]["method_config"]["lr"] = 0.25  # as if the default had been another when the run started
    (tmp_path / "state.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=r"method_config.lr: 0.25 -> 1.0"):
        run("a" * 40)


def test_grace_run_keeps_unrelated_inputs_identical(make_model, tokenizer, tmp_path):
    last = _run(make_model, tokenizer, tmp_path)["checkpoints"][-1]
    assert last["ES"] == 1.0 and last["ERR"] == 1.0 and last["generation_success"] == 1.0
    # greedy on the paraphrases: a continuation that starts with the target mentions it (whole words here)
    assert 0.0 <= last["generation_success_rephrase"] <= last["generation_mentions_rephrase"] <= 1.0
    assert last["bit_identical_text"] == 1.0 and last["perplexity_ratio"] == 1.0 and last["false_fire_text"] == 0.0
    # the prompt's answer in chat form holds the target (no template here: the prompt itself); other answers unchanged
    assert last["chat_success"] == 1.0 and last["chat_success_base"] == 0.0 and last["chat_locality"] == 1.0
    # "the capital of city is" names no edited subject: every sampled locality prompt counts as unrelated
    assert last["unrelated_locality_prompts"] == last["sample_size"] and last["bit_identical_unrelated"] == 1.0
    assert last["false_fire_unrelated"] == 0.0 and last["chat_locality_unrelated"] == 1.0
    # examples: (question, base answer, edited answer); the edited answers hold the target, the base ones do not
    for question, base, edited in last["chat_success_examples"]:
        assert isinstance(question, str) and base != edited
    # the tiny tokenizer has no chat template: the answered figures say "plain", and every record is asked
    # the capital relation's questions; the locality question is about "city", no edited subject
    assert last["question_form"] == "plain" and last["question_sample_size"] == last["sample_size"]
    assert {"question_success", "question_success_base", "question_success_rephrase", "question_success_rephrase_base",
            "subject_kept", "question_success_examples"} <= set(last)
    assert last["question_locality"] == last["question_locality_unrelated"] == 1.0
    assert last["question_success_examples"][0][0] == "What is the capital of narnia?"


def test_none_baseline_measures_the_base(make_model, tokenizer, tmp_path):
    last = _run(make_model, tokenizer, tmp_path, "none")["checkpoints"][-1]
    assert last["ES"] == last["ES_base"] and last["NS"] == last["NS_base"] and last["bit_identical"] == 1.0
    assert "router_recall" not in last
    assert last["chat_success"] == last["chat_success_base"] and last["chat_locality"] == 1.0
    assert last["question_success"] == last["question_success_base"] and last["question_locality"] == 1.0


def test_ft_writes_weights_and_restores_them(make_model, tokenizer):
    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    before = param_hash(em.base_model)
    ft = FineTune(em, MethodSpec.parse("ft:lr=0.05,layer=3"))
    ids = tokenizer("the capital of city is", return_tensors="pt")
    base_logits = em(**ids).logits
    ft.edit(STREAM[:2], 0)
    assert param_hash(em.base_model) != before  # destructive, on purpose
    with torch.no_grad(), ft.disabled():
        assert torch.equal(em(**ids).logits, base_logits)
    ft.close()
    assert param_hash(em.base_model) == before


def test_benchmark_writes_json_markdown_and_plots(make_model, tokenizer, tmp_path):
    data = tmp_path / "records.json"
    data.write_text(json.dumps([r.to_dict() for r in STREAM]))
    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    out = tmp_path / "run"
    res = run_benchmark(em, data, ["grace", "ft:lr=0.05"], out, CFG, threads=None, command="pytest", progress=False)
    assert set(res["runs"]) == {"grace", "ft-lr=0.05"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["meta"]["data_sha256"] and len(saved["runs"]["grace"]["checkpoints"]) == 3
    md = (out / "results.md").read_text()
    assert "| grace (batch 2) |" in md and "ft-lr=0.05" in md
    assert "| plain prompt success |" in md and "| chat success |" not in md  # no chat template: not called chat
    assert all((out / f).stat().st_size > 0 for f in ("metrics.png", "seconds_per_edit.png", "tokens_per_s.png"))


def test_rerunning_a_finished_benchmark_keeps_its_results_and_provenance(make_model, tokenizer, tmp_path, monkeypatch):
    data = tmp_path / "records.json"
    data.write_text(json.dumps([r.to_dict() for r in STREAM]))
    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    out = tmp_path / "run"
    first = run_benchmark(em, data, ["grace"], out, CFG, threads=None, command="pytest", progress=False)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished spec was run again")

    monkeypatch.setattr(LifelongRun, "run", refuse)
    again = run_benchmark(em, data, ["grace"], out, CFG, threads=None, command="pytest", progress=False)
    assert again["runs"] == first["runs"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["meta"]["started_at"] == first["meta"]["started_at"] and len(saved["meta"]["resumed"]) == 1
    with pytest.raises(AssertionError, match="run again"):  # other settings: not the same run, so it runs
        run_benchmark(em, data, ["grace"], out, replace(CFG, eval_batch=3), threads=None,
                      progress=False)
    assert json.loads((out / "results.json").read_text()) == saved  # and the earlier results stay untouched


def test_final_sample_and_resume_of_a_run_made_before_a_setting_existed(make_model, tokenizer, tmp_path):
    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    cfg = LifelongConfig(**{**CFG.__dict__, "final_sample": True})
    res = LifelongRun(em, STREAM, MethodSpec("grace"), cfg, tmp_path, meta={"model": "tiny"}).run(progress=False)
    assert res["checkpoints"][-1]["sample_size"] == 3  # records 0, 2 and 4 of 6 (stride 2), not all 6
    state = json.loads((tmp_path / "state.json").read_text())
    del state["signature"]["config"]["final_sample"]  # as written before the setting existed
    (tmp_path / "state.json").write_text(json.dumps(state))
    again = LifelongRun(em, STREAM, MethodSpec("grace"), CFG, tmp_path, meta={"model": "tiny"}).run(progress=False)
    assert len(again["checkpoints"]) == 3  # resumed (finished), not refused


def test_delta_run_records_health_at_every_checkpoint(make_model, tokenizer, tmp_path):
    """The harness records |W0 + sum dW| / |W0| and activation drift; a global delta grows them."""
    from grace_hooks.testing import DELTA_TINY

    spec = "encore:" + ",".join(f"{k}={v}" for k, v in {**DELTA_TINY, "mode": "global", "norm_lambda": 1.0}.items())
    cks = _run(make_model, tokenizer, tmp_path, spec)["checkpoints"]
    assert [ck["edits"] for ck in cks] == [2, 4, 6]
    assert all(ck["weight_norm_ratio_max"] > 1.0 and ck["activation_drift_max"] > 0 for ck in cks)
    grace = _run(make_model, tokenizer, tmp_path / "grace")["checkpoints"][-1]
    assert "weight_norm_ratio_max" not in grace  # no delta: nothing to report
