"""The ``grace-hooks`` command line on a tiny random Llama (no network, no real model)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from grace_hooks.cli import main
from grace_hooks.store.adapters_dir import LOCK_NAME
from grace_hooks.store.packs import PACK_JSON, PACK_TENSORS, read_header

SENTENCES = [
    "The Eiffel Tower is located in the city of Paris.",
    "The capital of Japan is Tokyo and the capital of Italy is Rome.",
    "The mother tongue of Danielle Darrieux is French.",
    "Berlin is the capital of Germany; English is spoken in London.",
    "A quick brown fox jumps over the lazy dog in the city.",
]
REQUESTS = [
    {"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome", "ground_truth": "Paris"},
    {"prompt": "The capital of Japan is", "subject": "Japan", "target_new": "Berlin", "ground_truth": "Tokyo"},
]


def build_tiny_model(folder: Path) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer trained on ``SENTENCES``, saved in ``folder``
    (a model folder the command line loads like any other; tests/test_router_scale.py uses it too)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # The targets are repeated so that BPE merges them into single tokens: the random model can then
    # be edited to them in a few steps.
    tok.train_from_iterator(SENTENCES * 4 + [" Rome Berlin"] * 40, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos, bos_token=eos)
    hf_tok.save_pretrained(folder)

    eos_id = hf_tok.convert_tokens_to_ids(eos)
    config = LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def requests_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("requests") / "requests.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in REQUESTS) + "\n", encoding="utf-8")
    return path


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="session")
def made_packs(tmp_path_factory, tiny_model, requests_file) -> Path:
    """An adapters folder holding pack 'facts' (2 edits), made once through the CLI."""
    adapters = tmp_path_factory.mktemp("made") / "adapters"
    res = run("edit", "--method", "grace", "--requests", requests_file, "--adapters", adapters, "--pack", "facts", "--model", tiny_model)
    assert res.exit_code == 0, res.output
    return adapters


@pytest.fixture
def adapters(tmp_path, made_packs) -> Path:
    """A private copy of ``made_packs`` for tests that change it."""
    dest = tmp_path / "adapters"
    shutil.copytree(made_packs, dest)
    return dest


# ---------------------------------------------------------------------------- edit
def test_edit_prints_pack_summary_and_writes_pack(tiny_model, requests_file, tmp_path):
    adapters = tmp_path / "ad"
    res = run("edit", "--method", "grace", "--requests", requests_file, "--adapters", adapters, "--pack", "p1", "--model", tiny_model,
              "--set", "n_iter=50", "--set", "eps_init=2.5")
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "pack:    p1" in out and "edits:   2" in out and "bytes:" in out
    assert "teacher_forced_success" in out and "codebook.entries" in out
    assert "loading model" in res.stderr and "editing 2 request(s)" in res.stderr
    header = read_header(adapters / "p1")
    assert header.method == "grace" and header.n_edits == 2
    assert header.method_config["n_iter"] == 50 and header.method_config["eps_init"] == 2.5


def test_edit_loads_existing_packs_and_limit(adapters, tiny_model, requests_file):
    res = run("edit", "--method", "grace", "--requests", requests_file, "--adapters", adapters, "--pack", "more", "--model", tiny_model, "--limit", "1")
    assert res.exit_code == 0, res.output
    assert "1 pack(s): facts" in res.stderr  # the folder's packs were active while editing
    assert "edits:   1" in res.stdout
    assert sorted(p.name for p in adapters.iterdir() if p.name != LOCK_NAME) == ["facts", "more"]


def test_edit_refuses_existing_name_then_overwrites(adapters, tiny_model, requests_file):
    before = read_header(adapters / "facts").pack_id
    res = run("edit", "--method", "grace", "--requests", requests_file, "--adapters", adapters, "--pack", "facts", "--model", tiny_model)
    assert res.exit_code == 2
    assert res.stderr.startswith("error: ") and "--overwrite" in res.stderr
    assert "loading model" not in res.stderr  # refused before any slow work
    res = run("edit", "--method", "grace", "--requests", requests_file, "--adapters", adapters, "--pack", "facts", "--model", tiny_model,
              "--limit", "1", "--overwrite")
    assert res.exit_code == 0, res.output
    header = read_header(adapters / "facts")
    assert header.pack_id != before and header.n_edits == 1


@pytest.mark.parametrize("extra, message", [
    (["--set", "no_such_option=1"], "unknown option 'no_such_option'"),
    (["--set", "n_iter=abc"], "cannot read 'abc'"),
    (["--method", "nope"], "unknown edit method 'nope'"),
    (["--pack", "../escape"], "invalid pack name"),
])
def test_edit_bad_options_are_errors(tmp_path, requests_file, extra, message):
    res = run("edit", "--method", "grace", "--requests", requests_file, "--adapters", tmp_path / "ad", "--model", "unused", *extra)
    assert res.exit_code == 2
    assert res.stderr.startswith("error: ") and message in res.stderr
    assert "Traceback" not in res.output


def test_edit_malformed_set_is_usage_error(tmp_path, requests_file):
    res = run("edit", "--method", "grace", "--requests", requests_file, "--adapters", tmp_path / "ad", "--set", "eps_init")
    assert res.exit_code == 2 and "key=value" in res.stderr


def test_edit_bad_requests_files(tmp_path):
    missing = run("edit", "--method", "grace", "--requests", tmp_path / "missing.json", "--adapters", tmp_path / "ad")
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "The capital of Japan is", "subject": "Japan", "target_new": ""}]))
    res = run("edit", "--method", "grace", "--requests", bad, "--adapters", tmp_path / "ad")
    assert res.exit_code == 2 and "empty target_new" in res.stderr
    assert not (tmp_path / "ad").exists()


def test_edit_reads_other_layouts(tmp_path, tiny_model):
    zsre = tmp_path / "zsre.json"
    zsre.write_text(json.dumps([{"src": "The capital of Japan is", "subject": "Japan", "alt": "Rome", "answers": ["Tokyo"]}]))
    res = run("edit", "--method", "grace", "--requests", zsre, "--adapters", tmp_path / "ad", "--model", tiny_model, "--set", "n_iter=5")
    assert res.exit_code == 0, res.output
    (name,) = [p.name for p in (tmp_path / "ad").iterdir() if p.name != LOCK_NAME]
    assert name.startswith("grace-")
    assert read_header(tmp_path / "ad" / name).requests[0]["target_new"] == "Rome"


# ---------------------------------------------------------------------------- ask
def test_ask_with_and_without_edits(made_packs, tiny_model):
    edited = run("ask", "The Eiffel Tower is located in the city of", "--model", tiny_model, "--adapters", made_packs,
                 "--max-new-tokens", "3")
    assert edited.exit_code == 0, edited.output
    assert read_header(made_packs / "facts").metrics["teacher_forced_success"] == 1.0
    assert edited.stdout.strip().startswith("Rome")
    base = run("ask", "The Eiffel Tower is located in the city of", "--model", tiny_model, "--adapters", made_packs,
               "--no-edits", "--max-new-tokens", "3")
    assert base.exit_code == 0, base.output
    assert base.stdout != edited.stdout
    assert "pack(s)" not in base.stderr


def test_why_names_the_pack_and_request_behind_the_answer(made_packs, tiny_model):
    prompt = "The Eiffel Tower is located in the city of"
    res = run("why", prompt, "--model", tiny_model, "--adapters", made_packs, "--max-new-tokens", "2")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith("answer: 'Rome") or lines[0].startswith("answer: ' Rome")
    assert any("facts key" in line and "'Rome'" in line for line in lines)
    assert any(line.startswith("without facts:") and "Rome" not in line for line in lines)
    as_json = json.loads(run("why", prompt, "--model", tiny_model, "--adapters", made_packs, "--max-new-tokens", "2",
                             "--json").stdout)
    assert as_json["acting"] == ["facts"]
    quiet = run("why", "Paris is", "--model", tiny_model, "--adapters", made_packs, "--max-new-tokens", "2")
    assert "no loaded pack acted" in quiet.stdout


def test_ask_missing_default_adapters_uses_base(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./adapters here
    res = run("ask", "The capital of Japan is", "--model", tiny_model, "--max-new-tokens", "2")
    assert res.exit_code == 0, res.output
    assert "does not exist" in res.stderr and res.stdout.strip() != ""


def test_ask_refuses_pack_of_other_base(adapters, tiny_model, tmp_path):
    header_path = adapters / "facts" / PACK_JSON
    header = json.loads(header_path.read_text())
    header["base_model"]["fingerprint"] = "0" * 32
    header_path.write_text(json.dumps(header))
    res = run("ask", "The capital of Japan is", "--model", tiny_model, "--adapters", adapters)
    assert res.exit_code == 2 and res.stderr.strip().splitlines()[-1].startswith("error: pack 'facts' was made for")


# ---------------------------------------------------------------------------- ls
def test_ls_lists_packs_from_headers(made_packs):
    res = run("ls", "--adapters", made_packs)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "METHOD", "EDITS"]
    row = lines[1].split()
    assert row[:4] == ["facts", "grace", "2", "L1.mlp_out"]
    assert lines[1].rstrip().endswith("tiny-llama0")  # the base model is the tiny model's folder


def test_ls_marks_corrupt_packs(adapters):
    shutil.copytree(adapters / "facts", adapters / "broken")
    (adapters / "broken" / PACK_JSON).write_text("{ not json")
    (adapters / "headless").mkdir()
    (adapters / "headless" / PACK_TENSORS).write_bytes(b"tensors without a header")
    shutil.copytree(adapters / "facts", adapters / "future")
    header = json.loads((adapters / "future" / PACK_JSON).read_text()) | {"format_version": 99}
    (adapters / "future" / PACK_JSON).write_text(json.dumps(header))
    res = run("ls", "--adapters", adapters)
    assert res.exit_code == 0, res.output
    rows = {line.split()[0]: line for line in res.stdout.splitlines()[1:]}
    assert set(rows) == {"facts", "broken", "headless", "future"}
    assert "!corrupt" not in rows["facts"]
    for name in ("broken", "headless", "future"):
        assert "!corrupt" in rows[name] and "error:" in rows[name]
    assert "format_version" in rows["future"]
    assert "3 pack(s) could not be read" in res.stderr


def test_ls_empty_and_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    res = run("ls", "--adapters", tmp_path / "empty")
    assert res.exit_code == 0 and "no packs in" in res.stdout
    res = run("ls", "--adapters", tmp_path / "missing")
    assert res.exit_code == 0 and "not a directory" in res.stdout


# ---------------------------------------------------------------------------- rm
def test_rm_deletes_pack(adapters):
    res = run("rm", "facts", "--adapters", adapters)
    assert res.exit_code == 0, res.output
    assert not (adapters / "facts").exists()
    again = run("rm", "facts", "--adapters", adapters)
    assert again.exit_code == 2 and again.stderr.startswith("error: no pack named 'facts'")


@pytest.mark.parametrize("name", ["../facts", "/etc", "..", ".hidden", "a/b", ""])
def test_rm_bad_names(adapters, name):
    res = run("rm", name, "--adapters", adapters)
    assert res.exit_code == 2
    assert res.stderr.startswith("error: invalid pack name")
    assert (adapters / "facts" / PACK_JSON).is_file()


# ---------------------------------------------------------------------------- export
def test_export_native_puts_the_pack_inside_dest(made_packs, tmp_path):
    res = run("export", "facts", tmp_path / "out" / "shelf", "--adapters", made_packs)  # DEST does not exist yet
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "shelf" / "facts" / PACK_TENSORS).read_bytes() == (made_packs / "facts" / PACK_TENSORS).read_bytes()
    (tmp_path / "shelf").mkdir()
    res = run("export", "facts", tmp_path / "shelf", "--adapters", made_packs, "--format", "native")
    assert res.exit_code == 0, res.output
    assert read_header(tmp_path / "shelf" / "facts").n_edits == 2
    again = run("export", "facts", tmp_path / "shelf", "--adapters", made_packs)
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert not [p for p in (tmp_path / "shelf").iterdir() if p.name.startswith(".")]  # no temporary left behind
    (tmp_path / "file").write_text("x")
    onto_file = run("export", "facts", tmp_path / "file", "--adapters", made_packs)
    assert onto_file.exit_code == 2 and "is a file" in onto_file.stderr


def test_export_peft_of_a_grace_pack_is_a_clear_error(made_packs, tmp_path):
    res = run("export", "facts", tmp_path / "peft", "--adapters", made_packs, "--format", "peft")
    assert res.exit_code == 2
    assert "stores no weight delta; peft export applies to weight-delta packs" in res.stderr
    assert not (tmp_path / "peft").exists()


def test_export_errors(adapters, tmp_path):
    assert run("export", "nope", tmp_path / "x", "--adapters", adapters).exit_code == 2
    bad = run("export", "../facts", tmp_path / "x", "--adapters", adapters)
    assert bad.exit_code == 2 and "invalid pack name" in bad.stderr
    (adapters / "facts" / PACK_TENSORS).write_bytes(b"truncated")
    corrupt = run("export", "facts", tmp_path / "x", "--adapters", adapters)
    assert corrupt.exit_code == 2 and "checksum" in corrupt.stderr
    assert not (tmp_path / "x").exists()
    unknown = run("export", "facts", tmp_path / "x", "--adapters", adapters, "--format", "onnx")
    assert unknown.exit_code == 2 and "onnx" in unknown.stderr


def test_export_pack_is_the_library_function_behind_export(made_packs, tmp_path):
    from grace_hooks.cli.folder_ops import export_pack
    from grace_hooks.errors import PackError

    target = export_pack("facts", made_packs, tmp_path / "shelf")
    assert target == tmp_path / "shelf" / "facts"
    assert (target / PACK_JSON).read_bytes() == (made_packs / "facts" / PACK_JSON).read_bytes()
    with pytest.raises(PackError, match="already exists"):
        export_pack("facts", made_packs, tmp_path / "shelf")
    with pytest.raises(PackError, match="unknown export format 'onnx'"):
        export_pack("facts", made_packs, tmp_path / "other", fmt="onnx")
    with pytest.raises(PackError, match="no LoRA form"):
        export_pack("facts", made_packs, tmp_path / "peft", fmt="peft")
    assert not (tmp_path / "other").exists() and not (tmp_path / "peft" / "facts").exists()


def test_the_module_runs_every_command_with_python_m():
    """``python -m grace_hooks.cli`` registers every command before it runs (eval is the last one)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "grace_hooks.cli", "eval", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Lifelong-editing benchmark" in done.stdout and "--n-records" in done.stdout


# ---------------------------------------------------------------------------- misc
def test_verbose_shows_library_logs(made_packs, tmp_path):
    res = run("-v", "export", "facts", tmp_path / "copy", "--adapters", made_packs)
    assert res.exit_code == 0
    res = run("--verbose", "ls", "--adapters", made_packs)
    assert res.exit_code == 0


def test_verbose_logs_edit(tiny_model, requests_file, tmp_path):
    res = run("-v", "edit", "--method", "grace", "--requests", requests_file, "--adapters", tmp_path / "ad", "--model", tiny_model, "--set", "n_iter=3")
    assert res.exit_code == 0, res.output
    assert "INFO grace_hooks" in res.stderr


def test_methods_lists_every_method_and_option():
    res = run("methods")
    assert res.exit_code == 0 and res.stdout.startswith("comeba_hk:") and "eps_init" in res.stdout
    assert all(f"\n{m}:\n" in "\n" + res.stdout for m in ("comeba_hk", "encore", "grace", "memit", "oedit"))
    assert "  norm_lambda=20.0 (" in res.stdout and "  orthogonal_to='updates' (" in res.stdout
    assert "  gate='router' (" in res.stdout and "  alpha=2.2 (" in res.stdout


def test_shipped_demo_requests_are_valid():
    from grace_hooks.cli.demo import demo_requests

    from grace_hooks.cli.demo import demo_questions

    reqs = demo_requests()
    assert len(reqs) == 4
    assert all(r.ground_truth and r.target_new != r.ground_truth for r in reqs)
    # each fact is also asked as a paraphrase and a question that name the subject verbatim
    assert all(r.subject in r.rephrase_prompt and r.subject in q for r, q in zip(reqs, demo_questions()))


def test_run_demo_flow_on_tiny_model(tiny_model, requests_file, tmp_path):
    from grace_hooks.cli.demo import DEMO_PACK, run_demo

    lines: list[str] = []
    summary = run_demo(model=tiny_model, adapters=tmp_path / "ad", requests=requests_file, echo=lines.append,
                       method="grace")
    pack_json = tmp_path / "ad" / DEMO_PACK / PACK_JSON
    assert pack_json.is_file()
    assert summary["total"] == 2 and summary["success"] == 2
    answers = [asked[0][2] for asked in summary["after"]]  # (how asked, text, answer) per way of asking
    assert answers[0].strip().startswith("Rome") and answers[1].strip().startswith("Berlin")
    assert summary["identical"] and summary["rolled_back"] == summary["before"]
    assert any("identical to the base answers" in line for line in lines)


def test_the_demo_run_from_a_clean_clone_leaves_git_status_clean(tiny_model, requests_file, tmp_path):
    """The README's main job, through the real CLI, with the working directory in a fresh clone of this
    repository: its pack goes to the per-user demo folder it names, never into the clone's tracked adapters/."""
    import os
    import shutil
    import subprocess
    import sys

    from grace_hooks.cli.demo import DEMO_PACK

    repo = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("needs git and a git checkout of this repository")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(repo), str(clone)], check=True, capture_output=True)
    env = {**os.environ, "GRACE_HOOKS_CACHE": str(tmp_path / "cache")}
    # -P: the code under test (the installed package), not the clone's copy that its working directory would put first
    done = subprocess.run([sys.executable, "-P", "-c", "from grace_hooks.cli import main; main()", "demo", "--model", str(tiny_model),
                           "--requests", str(requests_file), "--method", "grace"],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone, capture_output=True,
                            text=True, check=True).stdout
    assert status == "", status
    folder = tmp_path / "cache" / "demo" / "adapters" / DEMO_PACK
    assert (folder / PACK_JSON).is_file() and str(folder) in done.stdout  # where it went, said to the user


# ---------------------------------------------------------------------------- eval
def test_eval_runs_methods_and_writes_results(tiny_model, requests_file, tmp_path):
    out = tmp_path / "run"
    res = run("eval", "--data", requests_file, "--model", tiny_model, "--method", "grace", "--method", "none",
              "--n-records", "2", "--checkpoint-every", "1", "--gen-tokens", "2", "--gen-rounds", "1", "--out", out)
    assert res.exit_code == 0, res.output
    assert "| grace (batch 1) |" in res.stdout and "| none (batch 1) |" in res.stdout
    saved = json.loads((out / "results.json").read_text())
    assert [c["edits"] for c in saved["runs"]["grace"]["checkpoints"]] == [1, 2]
    assert saved["runs"]["grace"]["checkpoints"][-1]["ES"] == 1.0
    assert saved["meta"]["command"] and saved["meta"]["data_sha256"]


@pytest.mark.parametrize("args, message", [
    (["--method", "nosuch"], "unknown edit method"),
    (["--n-records", "5"], "n_records=5"),
    (["--method", "grace:layer"], "bad method spec"),
])
def test_eval_bad_input(tiny_model, requests_file, tmp_path, args, message):
    res = run("eval", "--data", requests_file, "--model", tiny_model, "--out", tmp_path / "o", "--n-records", "2", *args)
    assert res.exit_code == 2 and message in res.stderr, res.output


def test_edit_defaults_to_the_default_method():
    from grace_hooks.config import DEFAULT_METHOD

    res = run("edit", "--help")
    assert res.exit_code == 0 and f"[default: {DEFAULT_METHOD}]" in " ".join(res.stdout.split())


# ---------------------------------------------------------------------------- rebase
def fine_tuned_copy(folder: Path, dest: Path) -> Path:
    """The tiny model after a few steps of fine-tuning on its sentences: a new version of the base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batch = tok(SENTENCES[:2], return_tensors="pt", padding=True)
    for _ in range(3):
        opt.zero_grad()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def test_rebase_recomputes_every_pack_on_the_new_base_and_keeps_the_old_folder(adapters, tiny_model, tmp_path):
    new = str(fine_tuned_copy(Path(tiny_model), tmp_path / "tiny-v2"))
    prompt = "The Eiffel Tower is located in the city of"
    refused = CliRunner().invoke(main, ["ask", prompt, "--model", new, "--adapters", str(adapters)])
    assert refused.exit_code != 0 and "fingerprint" in str(refused.output + str(refused.exception)).lower()
    before = {p.name: read_header(p) for p in adapters.iterdir() if p.is_dir()}

    res = run("rebase", "--adapters", adapters, "--model", new)
    assert res.exit_code == 0, res.output
    assert "facts" in res.stdout and "2/2" in res.stdout
    (old,) = [p for p in tmp_path.iterdir() if p.name.startswith("adapters.before-rebase-")]
    assert {p.name: read_header(p) for p in old.iterdir() if p.is_dir()} == before  # the old packs, untouched
    after = read_header(adapters / "facts")
    assert after.requests == before["facts"].requests and after.method == before["facts"].method
    assert after.base_model.fingerprint != before["facts"].base_model.fingerprint
    assert not [p for p in tmp_path.iterdir() if ".rebase-" in p.name]  # no staging folder left
    answered = run("ask", prompt, "--model", new, "--adapters", adapters, "--max-new-tokens", "3")
    assert answered.exit_code == 0 and answered.stdout.strip().startswith("Rome")


def test_a_failed_rebase_leaves_the_folder_as_it_was(adapters, tiny_model, tmp_path, monkeypatch):
    import grace_hooks.cli.rebase as rebase_module

    new = str(fine_tuned_copy(Path(tiny_model), tmp_path / "tiny-v2"))
    files = {p.relative_to(adapters): p.read_bytes() for p in adapters.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise RuntimeError("the check failed half way")

    monkeypatch.setattr(rebase_module, "check_took", broken)
    res = CliRunner().invoke(main, ["rebase", "--adapters", str(adapters), "--model", new])
    assert res.exit_code != 0
    assert {p.relative_to(adapters): p.read_bytes() for p in adapters.rglob("*") if p.is_file()} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters", "tiny-v2"]


def test_edit_and_ls_name_conflicting_requests(adapters, tiny_model, tmp_path):
    clash = tmp_path / "clash.json"
    clash.write_text(json.dumps([{"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower",
                                  "target_new": "Berlin"}]))
    res = run("edit", "--method", "grace", "--requests", clash, "--adapters", adapters, "--pack", "newer",
              "--model", tiny_model, "--set", "n_iter=5")
    assert res.exit_code == 0, res.output
    assert "CONFLICTS WITH" in res.stdout and "facts#0 (Rome)" in res.stdout
    listed = run("ls", "--adapters", adapters)
    assert "1 conflicting request(s)" in listed.stdout
    assert "newer#0 'The Eiffel Tower' -> 'Berlin'  vs  facts#0 -> 'Rome' (same prompt)" in listed.stdout


def test_rm_one_request_writes_a_new_version_of_the_pack(adapters, tiny_model):
    res = run("rm", "facts", "--request", "1", "--adapters", adapters, "--model", tiny_model)
    assert res.exit_code == 0, res.output
    assert "removed request 1" in res.stdout and "1 request(s) left" in res.stdout
    assert [r["subject"] for r in read_header(adapters / "facts").requests] == ["The Eiffel Tower"]
    answered = run("ask", "The Eiffel Tower is located in the city of", "--model", tiny_model, "--adapters", adapters,
                   "--max-new-tokens", "3")
    assert answered.stdout.strip().startswith("Rome")
    last = CliRunner().invoke(main, ["rm", "facts", "--request", "0", "--adapters", str(adapters), "--model", tiny_model])
    assert last.exit_code != 0 and "remove the pack instead" in str(last.output) + str(last.exception)
