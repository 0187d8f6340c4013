"""Issue 21: what a new user sees in the first hour: progress, whether edits took, PEFT round trip,
CLI details and noise (tiny random Llama saved to a folder; no network, no real model)."""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

from test_cli import REQUESTS, made_packs, requests_file, run, tiny_model  # noqa: F401 - fixtures shared with test_cli

from grace_hooks import EditableModel, EditRequest
from grace_hooks.bases import loading
from grace_hooks.bases.embedded import EMBEDDED
from grace_hooks.cli.took import check_took, target_token_count
from grace_hooks.store.packs import PACK_JSON

README = Path(__file__).resolve().parents[1] / "README.md"
EIFFEL = "The Eiffel Tower is located in the city of"


def _edit(tiny_model, requests_file, adapters, *extra):
    return run("edit", "--method", "grace", "--requests", requests_file, "--adapters", adapters, "--model", tiny_model, *extra)


# ---------------------------------------------------------------------------- 1. no silent long work
def test_library_progress_lines_show_without_verbose(tiny_model, requests_file, tmp_path):
    res = _edit(tiny_model, requests_file, tmp_path / "ad", "--pack", "p1")
    assert res.exit_code == 0, res.output
    assert re.search(r"^grace: 2 requests, .* teacher-forced success$", res.stderr, re.M)  # the library's own INFO line
    assert "saved pack p1 (2 edits)" in res.stderr and "INFO " not in res.stderr
    verbose = run("-v", "ls", "--adapters", tmp_path / "ad")
    assert verbose.exit_code == 0


# ---------------------------------------------------------------------------- 2. did each edit take?
def test_check_took_compares_the_greedy_answer_with_the_target(tiny_model):
    em = EditableModel.from_pretrained(tiny_model)
    try:
        from grace_hooks.eval.generation import greedy

        base_answer = greedy(em, EIFFEL, 1).strip()
        assert target_token_count(em.tokenizer, EIFFEL, "Rome") == 1
        other = "Rome"  # what the shared CLI requests edit this prompt to (it lands on this model)
        assert base_answer != other
        before = check_took(em, [EditRequest(EIFFEL, "The Eiffel Tower", base_answer),
                                 EditRequest(EIFFEL, "The Eiffel Tower", other)])
        assert [t.took for t in before] == [True, False]
        em.edit(REQUESTS, method="grace", pack="p")  # the CLI fixture's edit: both land on this model
        after = check_took(em, REQUESTS)
        assert [t.took for t in after] == [True, True] and after[0].answer.strip() == other
    finally:
        em.close()


def test_edit_prints_a_took_table(tiny_model, requests_file, tmp_path):
    res = _edit(tiny_model, requests_file, tmp_path / "ad")
    assert res.exit_code == 0, res.output
    table = res.stdout[res.stdout.index("did each edit take?"):].splitlines()
    assert table[1].split() == ["TOOK", "PROMPT", "TARGET", "ANSWER", "NOW"]
    assert table[2].split()[0] == "yes" and "Rome" in table[2] and table[3].split()[0] == "yes"
    assert "all 2 edit(s) took." in res.stdout


def test_edit_says_plainly_which_did_not_take_and_what_to_try(tiny_model, requests_file, tmp_path):
    res = _edit(tiny_model, requests_file, tmp_path / "ad", "--pack", "weak", "--set", "n_iter=0")  # values never trained
    assert res.exit_code == 0, res.output
    rows = res.stdout[res.stdout.index("did each edit take?"):].splitlines()[2:4]
    assert [r.split()[0] for r in rows] == ["no", "no"]
    assert "2 of 2 edit(s) did NOT take" in res.stdout
    assert f"grace-hooks rm weak --adapters {tmp_path / 'ad'}" in res.stdout
    assert "--set n_iter=10 (now 0)" in res.stdout and "--method encore" in res.stdout and "--limit" in res.stdout


# ---------------------------------------------------------------------------- 4. PEFT round trip
def test_peft_export_loads_offline_through_auto_peft(tiny_model, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    monkeypatch.setenv("GRACE_HOOKS_CACHE", str(tmp_path / "cache"))
    reqs = tmp_path / "delta.json"  # a delta method edits the last subject token: here it ends the prompt
    reqs.write_text(json.dumps([{"prompt": "The capital of Japan", "subject": "Japan", "target_new": "Berlin"}]))
    tiny_opts = dict(mode="global", corpus_texts=16, corpus_tokens=16, n_prefixes=0, mom2_weight=1.0, clamp=4.0,
                     steps=20, norm_lambda=1.0)
    sets = [a for k, v in tiny_opts.items() for a in ("--set", f"{k}={v}")]
    res = run("edit", "--method", "encore", "--requests", reqs, "--adapters", tmp_path / "ad", "--pack", "jp",
              "--model", tiny_model, *sets)
    assert res.exit_code == 0, res.output
    res = run("export", "jp", tmp_path / "lora", "--adapters", tmp_path / "ad", "--format", "peft")
    assert res.exit_code == 0, res.output
    exported = tmp_path / "lora" / "jp"
    base_ref = json.loads((exported / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_ref == str(Path(tiny_model).resolve())  # a folder PEFT loads by itself, no hub needed
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(exported)).eval()
    em = EditableModel.from_pretrained(tiny_model, adapters=tmp_path / "ad")
    try:
        enc = em.tokenizer(["The capital of Japan", "A quick brown fox"], return_tensors="pt", padding=True)
        with torch.no_grad():
            torch.testing.assert_close(peft_model(**enc).logits, em(**enc).logits, rtol=0, atol=1e-5)
    finally:
        em.close()


def test_embedded_short_names_resolve_to_their_converted_folder(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setenv("GRACE_HOOKS_CACHE", str(tmp_path))
    folder = tmp_path / "models" / "smollm2-135m"
    assert loading.hf_reference("smollm2-135m") == str(folder.resolve())
    assert loading.hf_reference("org/some-model") == "org/some-model"  # a hub id stays as given
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")  # present and made from the pinned file: no new conversion
    (folder / loading.SOURCE_FILE).write_text(json.dumps({"gguf_sha256": EMBEDDED["smollm2-135m"].gguf_sha256}))
    res = run("model-path", "smollm2-135m")
    assert res.exit_code == 0 and res.stdout.strip() == str(folder.resolve())
    monkeypatch.chdir(Path(tiny_model).parent)
    res = run("model-path", Path(tiny_model).name)
    assert res.stdout.strip() == str(Path(tiny_model).resolve())  # a relative folder becomes absolute


def test_readme_shows_the_peft_round_trip_and_adapters_flags():
    text = README.read_text(encoding="utf-8")
    peft = (README.parent / "docs" / "peft.md").read_text(encoding="utf-8")
    assert "AutoPeftModelForCausalLM.from_pretrained" in peft and "grace-hooks model-path" in peft
    assert "docs/peft.md" in text and "grace-hooks model-path" in text
    start = text.index("## Command line")
    cli = text[start:text.index("\n## ", start)]
    for command in ("export", "rm"):
        lines = [line for line in cli.splitlines() if f"grace-hooks {command} " in line]
        assert lines and all("--adapters" in line.split(f"grace-hooks {command} ")[1].split("|")[0] for line in lines)


# ---------------------------------------------------------------------------- 5. CLI details
def test_ls_ignores_folders_that_are_not_packs(made_packs, tmp_path):  # noqa: F811
    shelf = tmp_path / "shelf"
    shutil.copytree(made_packs, shelf)
    (shelf / "src").mkdir()
    (shelf / "notes").mkdir()
    (shelf / "notes" / "todo.txt").write_text("x")
    res = run("ls", "--adapters", shelf)
    assert res.exit_code == 0, res.output
    assert "!corrupt" not in res.output and [line.split()[0] for line in res.stdout.splitlines()[1:]] == ["facts"]
    assert f"not packs (no {PACK_JSON}): notes, src" in res.stderr


def test_ask_with_a_named_adapters_folder_that_does_not_exist_fails(tiny_model, tmp_path):
    res = run("ask", EIFFEL, "--model", tiny_model, "--adapters", tmp_path / "typo")
    assert res.exit_code == 2 and "does not exist" in res.stderr and "--no-edits" in res.stderr
    assert "loading model" not in res.stderr  # refused before any slow work


@pytest.mark.parametrize("option, expected", [("eps_int", "did you mean 'eps_init'?"), ("zzz", "options: layer, point")])
def test_unknown_set_option_is_a_short_message(tmp_path, requests_file, option, expected):  # noqa: F811
    res = run("edit", "--method", "grace", "--requests", requests_file, "--adapters", tmp_path / "ad", "--set", f"{option}=1")
    assert res.exit_code == 2 and expected in res.stderr and "grace-hooks methods" in res.stderr
    assert len(res.stderr) < 300 and "(Euclidean)" not in res.stderr  # names only, no help text on one line


# ---------------------------------------------------------------------------- 6. noise
def test_no_weight_loading_bar_unless_verbose(tiny_model, tmp_path):
    quiet = run("ask", EIFFEL, "--model", tiny_model, "--no-edits", "--max-new-tokens", "1")
    assert quiet.exit_code == 0 and "Loading weights" not in quiet.stderr
    loud = run("-v", "ask", EIFFEL, "--model", tiny_model, "--no-edits", "--max-new-tokens", "1")
    assert loud.exit_code == 0 and "Loading weights" in loud.stderr


def test_cache_rename_warning_is_dropped_unless_verbose():
    from transformers.utils import logging as hf_logging

    from grace_hooks.cli import logs

    record = logging.LogRecord("transformers.utils.generic", logging.WARNING, __file__, 1,
                               "`past_key_values`/`cache_params` are deprecated. Use `cache` instead.", None, None)
    handlers = hf_logging.get_logger().handlers
    try:
        logs.setup(verbose=False)
        assert handlers and not any(h.filter(record) for h in handlers)
        logs.setup(verbose=True)
        assert all(h.filter(record) for h in handlers)
    finally:
        logs.setup(verbose=True)  # leave transformers as other tests expect it: filter off, bars on
