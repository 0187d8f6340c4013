"""benchmarks/router_scale.py end to end on a tiny model: the fixed JSON interface and its figures."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from test_cli import build_tiny_model

SUBJECTS = ["Paris", "Tokyo", "Rome", "Berlin", "London", "Japan"]


def _records(path: Path) -> Path:
    records = [{"prompt": f"The capital of {s} is", "subject": s, "target_new": "Rome",
                "ground_truth": "Paris", "rephrase_prompt": f"The capital of {s} is",  # the prompt itself
                "locality_prompt": "A quick brown fox jumps over the lazy dog", "locality_ground_truth": "dog"}
               for s in SUBJECTS]
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("scope, scales, keys_per_edit, scale", [("key", "0.5,1.1", 3, 1.1), ("span", "0.5,3.0", 1, 3.0)])
def test_router_scale_writes_the_fixed_interface(tmp_path, monkeypatch, scope, scales, keys_per_edit, scale):
    spec = importlib.util.spec_from_file_location("router_scale", Path(__file__).resolve().parents[1] / "benchmarks" / "router_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("GRACE_HOOKS_CACHE", str(tmp_path / "cache"))
    model = build_tiny_model(tmp_path / "model")
    out = tmp_path / "out.json"
    monkeypatch.setattr(sys, "argv", ["router_scale.py", "--data", str(_records(tmp_path / "cf.json")), "--n", "6",
                                      "--model", str(model), "--json", str(out), "--batch", "2", "--generic-tokens", "100",
                                      "--scales", scales, "--set", f"scope={scope}", "--set", "corpus_texts=4", "--set", "corpus_tokens=16",
                                      "--set", "corpus_probe=32", "--set", "corpus_margin=0", "--set", "n_prefixes=1", "--set", "prefix_tokens=3"])
    module.main()
    result = json.loads(out.read_text())
    assert {"n", "recall", "wrong_edit", "false_fire_locality", "false_fire_tokens", "us_per_token", "bytes_per_key"} <= set(result)
    assert result["n"] == 6 and result["keys_per_site"] == 6 * keys_per_edit and result["radius_scale"] == scale
    assert result["recall"] == 1.0  # each rephrase is its own prompt: its bare-prompt key matches exactly
    for key in ("wrong_edit", "false_fire_locality", "false_fire_tokens"):
        assert 0.0 <= result[key] <= 1.0
    assert result["us_per_token"] > 0 and result["bytes_per_key"] > 4 * 64
    assert [c["scale"] for c in result["curve"]] == [float(x) for x in scales.split(",")] and out.with_suffix(".png").is_file()
    if scope == "span":  # no locality prompt or generic token holds a subject's tokens
        assert result["false_fire_locality"] == result["false_fire_tokens"] == 0.0
    assert result["curve"][0]["agree"] == {}  # one site: no agreement rule to measure


def test_agreement_keeps_only_edits_that_win_at_k_sites():
    spec = importlib.util.spec_from_file_location("router_scale", Path(__file__).resolve().parents[1] / "benchmarks" / "router_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    winners = np.array([[3, -1, 7, 2], [3, 5, 7, -1], [1, 5, 7, -1]])  # 3 sites x 4 tokens
    assert module.agreeing(winners, 2).tolist() == [[3, -1, 7, -1], [3, 5, 7, -1], [-1, 5, 7, -1]]
    assert module.agreeing(winners, 3).tolist() == [[-1, -1, 7, -1]] * 3
