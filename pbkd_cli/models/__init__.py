"""Loading and building the policy, teacher and reward models, and their tokenizers."""

from pbkd_cli.models.factory import build_bpe_tokenizer, load_causal_lm, load_tokenizer

__all__ = ["build_bpe_tokenizer", "load_causal_lm", "load_tokenizer"]
