"""LayerReplay: the logits recomputed from block L equal the model's own, on every architecture."""
import pytest
import torch
from transformers import (
    AutoModelForCausalLM, Gemma2Config, Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, GemmaConfig,
    Qwen3Config, SiglipVisionConfig,
)

from conftest import UNRELATED
from grace_hooks import EditableModel, EditRequest
from grace_hooks.bases.architectures import ARCHITECTURES, num_layers
from grace_hooks.bases.hooks import count_hooks
from grace_hooks.locate.replay import LayerReplay
from grace_hooks.methods.grace import method as grace_method
from grace_hooks.testing import TINY_CONFIGS, TINY_LLAMA_LIKE, TINY_REQUESTS, tiny_model
from grace_hooks.tokens import build_edit_batch

# The table's architectures that grace_hooks.testing does not build; small sliding windows make the
# per-layer attention masks differ, and Gemma 2 soft-caps its logits.
EXTRA = {
    "qwen3": lambda: Qwen3Config(**TINY_LLAMA_LIKE, head_dim=16),
    "gemma": lambda: GemmaConfig(**TINY_LLAMA_LIKE, head_dim=16),
    "gemma2": lambda: Gemma2Config(**TINY_LLAMA_LIKE, head_dim=16, sliding_window=3, final_logit_softcapping=5.0),
    "gemma3_text-sliding": lambda: Gemma3TextConfig(**TINY_LLAMA_LIKE, head_dim=16, sliding_window=3),
}
ALL = sorted(TINY_CONFIGS) + sorted(EXTRA) + ["gemma3"]
PROMPTS = ["the capital of narnia is tokyo", "the cat sat", "alice speaks german and plays chess on the mat ."]


def _model(arch: str):
    if arch in TINY_CONFIGS:
        return tiny_model(arch)
    torch.manual_seed(0)
    if arch == "gemma3":  # the multimodal wrapper: blocks under model.language_model
        text = Gemma3TextConfig(**TINY_LLAMA_LIKE, head_dim=16, sliding_window=3)
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
            with em.edit_context() as ctx, ctx.attention_mask(enc.attention_mask, enc.input_ids):  # spans read the tokens
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


@pytest.mark.parametrize("arch", ALL)
def test_suffix_replay_equals_forward(arch, tokenizer):
    """From column ``start`` on, with the earlier columns' keys and values cached once."""
    model = _model(arch)
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)  # right-padded; every row has >= 3 tokens
    hooks = count_hooks(model)
    with torch.no_grad():
        full = model(**enc).logits
        for layer in sorted({0, num_layers(model) // 2, num_layers(model) - 1}):
            replay = LayerReplay(model, layer, enc.input_ids, enc.attention_mask, start=3)
            if arch == "gemma2":  # the table turns it off: a full replay, whose columns 3: are read
                assert replay.start == 0
                torch.testing.assert_close(replay.logits((torch.tensor([0]), torch.tensor([5]))), full[[0], [5]],
                                           atol=1e-5, rtol=0)
                continue
            assert replay.start == 3 and replay.hidden_in.shape[1] == enc.input_ids.shape[1] - 3
            assert count_hooks(model) == hooks
            for _ in range(2):  # a replay leaves the prefix cache as it was
                torch.testing.assert_close(replay.logits(), full[:, 3:], atol=1e-5, rtol=0)
            rows, cols = torch.tensor([[0, 0], [2, 2]]), torch.tensor([[3, 5], [4, 9]])
            torch.testing.assert_close(replay.logits((rows, cols)), full[rows, cols], atol=1e-5, rtol=0)
            rows = torch.tensor([2, 0])
            torch.testing.assert_close(replay.select(rows).logits(), full[rows, 3:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_suffix_replay_of_left_padded_rows_with_positions(arch, tokenizer):
    """Rows shifted right by left padding, with position ids from the mask, give each prompt's own logits."""
    model = _model(arch)
    rows = [tokenizer(p).input_ids for p in PROMPTS]
    width = max(map(len, rows)) + 2
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r):], mask[b, width - len(r):] = torch.tensor(r), 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    start = width - 3
    with torch.no_grad():
        replay = LayerReplay(model, 1, ids, mask, start=start, position_ids=pos)
        out = replay.logits()
        for b, r in enumerate(rows):
            own = model(input_ids=torch.tensor([r])).logits[0, -3:]
            torch.testing.assert_close(out[b], own, atol=1e-5, rtol=0)


def test_hooks_on_replayed_blocks_make_a_full_replay(tokenizer):
    """A hook inside a replayed block would see only the suffix, so the replay runs in full."""
    em = EditableModel(tiny_model("llama"), tokenizer)
    em.edit(TINY_REQUESTS, method="grace", layer=2)
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert LayerReplay(em.base_model, 1, enc.input_ids, enc.attention_mask, start=3).start == 0
    assert LayerReplay(em.base_model, 3, enc.input_ids, enc.attention_mask, start=3).start == 3
