"""Tiny random-weight models for tests and benchmarks: every supported architecture, a word-level
tokenizer, and edit requests and options that work on them.

No model hub is needed: the tokenizer is built from a fixed vocabulary, the models from configs, so
a method (a plugin's too) can be tried, its packs saved, reloaded and rolled back, in seconds on a CPU::

    from grace_hooks import EditableModel
    from grace_hooks.testing import TINY_REQUESTS, tiny_model, tiny_tokenizer

    em = EditableModel(tiny_model("llama"), tiny_tokenizer(), name="tiny")
    em.edit(TINY_REQUESTS, method="grace")

:mod:`grace_hooks.testing.pack_mutations` makes hostile packs from saved ones. Nothing else in the
package imports this one (it is the top layer of tests/test_layering.py).
"""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, Gemma3TextConfig, LlamaConfig, MistralConfig,
    PreTrainedTokenizerFast, Qwen2Config,
)

from ..requests import EditRequest

WORDS = (
    "the a of is in on and to was were city capital language sport plays speaks born located "
    "mother tongue native country team river mountain cat dog sat mat ran park sun moon star "
    "red blue green yellow quick brown fox jumps over lazy music piano guitar violin drums football "
    "tennis golf chess paris rome london berlin tokyo madrid french english german spanish italian "
    "japanese narnia gondor mordor rohan alice bob carol dave erin frank grace heidi ivan judy "
    "works for company ceo head what who where which does did , . ?"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[EOS]", "[BOS]"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of ``WORDS`` (split on white space; pad, unk, eos and bos specials)."""
    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]", bos_token="[BOS]")


_VOCAB = len(SPECIALS) + len(set(WORDS))
_COMMON = dict(vocab_size=_VOCAB, pad_token_id=0, eos_token_id=2, bos_token_id=3)
# The sizes every Llama-like tiny config shares (a test may build other architectures with them).
TINY_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, **_COMMON)
TINY_CONFIGS = {  # architecture -> a config of its tiny model
    "llama": lambda: LlamaConfig(**TINY_LLAMA_LIKE),
    "mistral": lambda: MistralConfig(**TINY_LLAMA_LIKE, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**TINY_LLAMA_LIKE),
    "gemma3_text": lambda: Gemma3TextConfig(**TINY_LLAMA_LIKE, head_dim=16, sliding_window=64),
    "gpt2": lambda: GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=128, **_COMMON),
    "gpt_neox": lambda: GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, max_position_embeddings=128, **_COMMON),
}


def tiny_model(arch: str, seed: int = 0):
    """A random-weight model of ``arch`` (a key of ``TINY_CONFIGS``), the same for the same seed, in eval mode."""
    torch.manual_seed(seed)
    cfg = TINY_CONFIGS[arch]()
    cfg.initializer_range = 0.2  # larger random weights: activations of different prompts stay apart
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if arch == "gemma3_text":
        # Gemma renormalises the MLP branch (post_feedforward_layernorm, gain 1 + w with w = 0 at init),
        # so in a random model it is tiny beside the residual stream; trained models learn larger gains.
        with torch.no_grad():
            for layer in model.model.layers:
                layer.post_feedforward_layernorm.weight.fill_(3.0)
    return model


# Single-word targets: at the last layer a replaced output cannot steer later positions, so
# multi-token targets are exercised on real models instead.
TINY_REQUESTS = [
    EditRequest(prompt="the capital of {} is", subject="narnia", target_new="tokyo"),
    EditRequest(prompt="the mother tongue of {} is", subject="alice", target_new="german"),
    EditRequest(prompt="the sport that {} plays is", subject="bob", target_new="chess"),
]
# Weight-delta methods edit the last subject token; here it ends the prompt (see tests/test_contract.py).
DELTA_REQUESTS = [
    EditRequest(prompt="the capital of {}", subject="narnia", target_new="tokyo"),
    EditRequest(prompt="the mother tongue of {}", subject="alice", target_new="german"),
    EditRequest(prompt="the sport of {}", subject="bob", target_new="chess"),
]
# Weight-delta options for the tiny models: a small self-sampled C0 corpus, no context prefixes (a
# random model's prefixes scatter its activations), C0 weight 1 (3 keys against a 128-dim C0) and a
# long target optimisation.
DELTA_TINY = dict(corpus_texts=32, corpus_tokens=32, n_prefixes=0, mom2_weight=1.0, clamp=4.0, lr=1.0, steps=50,
                  stop="most_probable")

__all__ = ["DELTA_REQUESTS", "DELTA_TINY", "SPECIALS", "TINY_CONFIGS", "TINY_LLAMA_LIKE", "TINY_REQUESTS", "WORDS",
           "tiny_model", "tiny_tokenizer"]
