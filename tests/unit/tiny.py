"""Tiny models built on the spot for in-process tests: a BPE tokenizer fitted on a few sums, and
one- or two-layer Llamas over it."""

from __future__ import annotations

import torch

from pbkd_cli.config.schema import ModelConfig, TinyLlamaConfig
from pbkd_cli.models import build_bpe_tokenizer, load_causal_lm

TEXTS = ["12 + 30 = 42", "7 * 6 = 42", "1 + 2 = 3", "4 + 5 = 9", "Question: Answer:"]


def tiny_tokenizer(vocab_size: int = 90):
    return build_bpe_tokenizer(TEXTS * 20, vocab_size)


def tiny_arch(hidden: int = 32, layers: int = 1) -> ModelConfig:
    return ModelConfig(tiny=TinyLlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                            num_key_value_heads=2, intermediate_size=2 * hidden))


def tiny_lm(tokenizer, hidden: int = 32, layers: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    return load_causal_lm(tiny_arch(hidden, layers), tokenizer, "model.student")
