"""Tiny random-weight models of every supported architecture, and a word-level tokenizer.

No model hub is needed: the tokenizer is built from a fixed vocabulary, the models from configs.
"""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, Gemma3TextConfig, LlamaConfig, MistralConfig,
    PreTrainedTokenizerFast, Qwen2Config,
)

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
    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]", bos_token="[BOS]")


_VOCAB = len(SPECIALS) + len(set(WORDS))
_COMMON = dict(vocab_size=_VOCAB, pad_token_id=0, eos_token_id=2, bos_token_id=3)
_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, **_COMMON)
TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_LLAMA_LIKE),
    "mistral": lambda: MistralConfig(**_LLAMA_LIKE, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**_LLAMA_LIKE),
    "gemma3_text": lambda: Gemma3TextConfig(**_LLAMA_LIKE, head_dim=16, sliding_window=64),
    "gpt2": lambda: GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=128, **_COMMON),
    "gpt_neox": lambda: GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, max_position_embeddings=128, **_COMMON),
}


def tiny_model(arch: str, seed: int = 0):
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
