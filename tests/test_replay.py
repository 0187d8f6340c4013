"""LayerReplay: the logits recomputed from block L equal the model's own, on every architecture."""
import pytest
import torch
from transformers import (
    AutoModelForCausalLM, Gemma2Config, Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, GemmaConfig,
    Qwen3Config, SiglipVisionConfig,
)

from conftest import TINY_REQUESTS, UNRELATED
from grace_hooks import EditableModel, EditRequest
from grace_hooks.architectures import ARCHITECTURES, num_layers
from grace_hooks.hooks import count_hooks
from grace_hooks.methods.grace import method as grace_method
from grace_hooks.replay import LayerReplay
from grace_hooks.tokens import build_edit_batch
from tiny import _LLAMA_LIKE, TINY_CONFIGS, tiny_model

# The table's architectures that tests/tiny.py does not build; small sliding windows make the
# per-layer attention masks differ, and Gemma 2 soft-caps its logits.
EXTRA = {
    "qwen3": lambda: Qwen3Config(**_LLAMA_LIKE, head_dim=16),
    "gemma": lambda: GemmaConfig(**_LLAMA_LIKE, head_dim=16),
    "gemma2": lambda: Gemma2Config(**_LLAMA_LIKE, head_dim=16, sliding_window=3, final_logit_softcapping=5.0),
    "gemma3_text-sliding": lambda: Gemma3TextConfig(**_LLAMA_LIKE, head_dim=16, sliding_window=3),
}
ALL = sorted(TINY_CONFIGS) + sorted(EXTRA) + ["gemma3"]
PROMPTS = ["the capital of narnia is tokyo", "the cat sat", "alice speaks german and plays chess on the mat ."]


def _model(arch: str):
    if arch in TINY_CONFIGS:
        return tiny_model(arch)
    torch.manual_seed(0)
    if arch == "gemma3":  # the multimodal wrapper: blocks under model.language_model
        text = Gemma3TextConfig(**_LLAMA_LIKE, head_dim=16, sliding_window=3)
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=28, patch_size=14)
        cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=1,
                           boi_token_index=1, eoi_token_index=1)
        return Gemma3ForConditionalGeneration(cfg).eval()
    cfg = EXTRA[arch]()
    cfg.initializer_range = 0.2
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_every_architecture_is_covered():
    assert {_model(a).config.model_type for a in ALL} == set(ARCHITECTURES)


@pytest.mark.parametrize("arch", ALL)
def test_replay_equals_forward(arch, tokenizer):
    model = _model(arch)
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)  # right-padded
    hooks = count_hooks(model)
    with torch.no_grad():
        full = model(**enc).logits
        for layer in sorted({0, num_layers(model) // 2, num_layers(model) - 1}):
            replay = LayerReplay(model, layer, enc.input_ids, enc.attention_mask)
            assert count_hooks(model) == hooks
            torch.testing.assert_close(replay.logits(), full, atol=1e-5, rtol=0)
            rows, cols = torch.tensor([[0, 0], [2, 2]]), torch.tensor([[1, 5], [0, 9]])
            torch.testing.assert_close(replay.logits((rows, cols)), full[rows, cols], atol=1e-5, rtol=0)
            rows = torch.tensor([2, 0])
            torch.testing.assert_close(replay.select(rows).logits(), full[rows], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("replacement", ["in_scope", "last"])
def test_replay_with_a_pack_loaded(arch, replacement, tokenizer):
    """The runtime's site hooks fire in a replay, below (baked into the recorded input) and above L."""
    em = EditableModel(tiny_model(arch), tokenizer)
    em.edit(TINY_REQUESTS, method="grace", layer=1, replacement=replacement)
    enc = tokenizer([r.text for r in TINY_REQUESTS] + UNRELATED[:1], return_tensors="pt", padding=True)
    with torch.no_grad():
        full = em(**enc).logits
        with em.disabled():
            assert not torch.allclose(em(**enc).logits, full)  # the pack changes these logits
        for layer in (0, 1, 2):
            replay = LayerReplay(em.base_model, layer, enc.input_ids, enc.attention_mask)
            with em._runtime.attention_mask(enc.attention_mask):
                torch.testing.assert_close(replay.logits(), full, atol=1e-5, rtol=0)


def test_batched_training_replays_only_unfinished_rows(tokenizer, monkeypatch):
    """Rows whose entries are done leave the replayed batch; their kept scores are still exact."""
    selected = []
    select = LayerReplay.select
    monkeypatch.setattr(LayerReplay, "select", lambda self, rows: selected.append(len(rows)) or select(self, rows))
    requests = TINY_REQUESTS + [EditRequest(prompt="{} works for the", subject="erin", target_new="company"),
                                EditRequest(prompt="the river of {} is", subject="rohan", target_new="red")]
    em = EditableModel(tiny_model("llama"), tokenizer)
    em.edit(requests, method="grace", pack="p")
    assert selected and min(selected) < len(requests)
    assert em.pack("p").metrics["teacher_forced_success"] == 1.0
    batch = build_edit_batch(tokenizer, requests)
    with torch.no_grad():
        logits = em(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert bool(grace_method.score_targets(logits, batch).correct.all())
