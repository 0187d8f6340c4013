"""benchmarks/gpu_check.py on a tiny random Llama in bfloat16 on the CPU (the path a GPU run takes,
minus the device), and the dtype contract: whatever the model's dtype, a pack stores finite float32
tensors and an effect is computed in float32 and rounded once to the activation's dtype."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from grace_hooks import EditableModel
from grace_hooks.config import DEFAULT_METHOD
from grace_hooks.locate.precision import add_to, lowrank_change
from grace_hooks.testing import DELTA_REQUESTS, DELTA_TINY, TINY_REQUESTS, tiny_model, tiny_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """C0 and model-sampled corpora of the tiny model go to a scratch cache, not the user's."""
    monkeypatch.setenv("GRACE_HOOKS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A local model folder (float32 safetensors + tokenizer): the script loads it as any base, in bfloat16."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_script_checks_pass_on_a_bfloat16_tiny_model(tiny_folder, tmp_path, cache):
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps(r.to_dict()) for r in DELTA_REQUESTS) + "\n")
    out = tmp_path / "gpu_check.json"
    default = f"{DEFAULT_METHOD}:" + ",".join(f"{k}={v}" for k, v in DELTA_TINY.items())  # tiny-model settings
    code = _script().main([
        "--model", str(tiny_folder), "--device", "cpu", "--dtypes", "bfloat16", "--requests", str(requests),
        "--n", "3", "--method", "grace", "--method", default, "--compare", "3", "--unrelated", "2",
        "--gen-prompts", "1", "--gen-tokens", "4", "--rounds", "1", "--min-success", "1.0", "--out", str(out),
    ])
    results = json.loads(out.read_text())
    assert code == 0, json.dumps(results["runs"], indent=1)[:4000]
    assert results["ok"] and not results["not_run"]
    assert results["split"].startswith("skipped")  # no CUDA here: the split is reported as skipped, not passed over
    runs = {r["method"].split("-")[0]: r for r in results["runs"]}
    assert set(runs) == {"grace", DEFAULT_METHOD}
    for r in runs.values():
        assert r["dtype"] == "bfloat16" and r["placement"] == "cpu" and r["devices"] == ["cpu"] and r["error"] is None
        assert r["checks"] == {k: True for k in (
            "loaded_as_asked", "pack_float32_finite", "success_share", "unrelated_unchanged_while_edited",
            "reload_logits_equal", "reload_answers_equal", "remove_restores_base_logits", "remove_leaves_no_hook",
            "close_leaves_no_hook")}
        f = r["figures"]
        assert f["success_share"] == 1.0  # every edit lands on the tiny model
        assert f["seconds_per_edit"] > 0 and f["edited_tokens_per_s"] > 0 and f["base_tokens_per_s"] > 0
        assert f["peak_memory_mib"]["cpu_peak_rss"] > 0
    run = results["run"]
    assert run["git"]["commit"] and isinstance(run["git"]["dirty"], bool) and run["started_at"].endswith("+00:00")
    assert run["versions"]["torch"] == torch.__version__ and run["versions"]["transformers"]
    assert run["torch_threads"] >= 1 and "loadavg_start" in run and "loadavg_end" in run
    assert results["accelerator"]["type"] == "cpu" and results["accelerator"]["name"]


def test_script_fails_when_a_check_fails(tiny_folder, tmp_path, cache):
    """An unreachable success share makes the exit code 1 (the table and the JSON say which check)."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps(TINY_REQUESTS[0].to_dict()) + "\n")
    out = tmp_path / "gpu_check.json"
    code = _script().main([
        "--model", str(tiny_folder), "--device", "cpu", "--dtypes", "bfloat16", "--requests", str(requests), "--n", "1",
        "--method", "grace:n_iter=0", "--compare", "1", "--unrelated", "1", "--gen-prompts", "1", "--gen-tokens", "2",
        "--rounds", "1", "--min-success", "1.0", "--out", str(out),
    ])
    (run,) = json.loads(out.read_text())["runs"]
    assert code == 1 and run["checks"]["success_share"] is False and not run["ok"]
    assert run["checks"]["remove_restores_base_logits"]  # the other checks still ran


@pytest.mark.parametrize("method, requests, options", [
    (DEFAULT_METHOD, DELTA_REQUESTS, DELTA_TINY),
    ("grace", TINY_REQUESTS, {}),
])
def test_bfloat16_edit_stores_finite_float32_tensors(tokenizer, method, requests, options, cache):
    em = EditableModel(tiny_model("llama").to(torch.bfloat16), tokenizer, name="tiny-bf16")
    em.edit(requests, method=method, pack="p", **options)
    pack = em.pack("p")
    assert pack.tensors and all(t.dtype == torch.float32 for t in pack.tensors.values())
    assert all(bool(torch.isfinite(t).all()) for t in pack.tensors.values())
    assert all(p.dtype == torch.bfloat16 for p in em.base_model.parameters())  # the model itself stays bfloat16


def test_effects_are_computed_in_float32_and_rounded_once():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 8, generator=gen), torch.randn(5, 6, generator=gen)
    U, V = torch.randn(6, 2, generator=gen), torch.randn(8, 2, generator=gen)
    # float32: exactly the operations the effects ran before (bit-identical packs and rollbacks)
    assert torch.equal(add_to(y, lowrank_change(x, U, V)), y + (x @ V) @ U.T)
    xb, yb = x.bfloat16(), y.bfloat16()
    change = lowrank_change(xb, U, V)
    assert change.dtype == torch.float32
    out = add_to(yb, change)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (yb.float() + (xb.float() @ V) @ U.T).bfloat16())  # one rounding, at the end
