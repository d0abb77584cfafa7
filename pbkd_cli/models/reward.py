"""The scalar reward model: a backbone with a one-output value head.

Saved with `save_pretrained` it is an ordinary `AutoModelForSequenceClassification` checkpoint
(`num_labels=1`), so TRL, transformers or any other tool reads it back. The reward of a response is
the head's output at the sequence's last real token.
"""

from __future__ import annotations

import torch

from pbkd_cli.config.schema import ModelConfig
from pbkd_cli.io import PbkdError
from pbkd_cli.models.factory import _check_local, _pretrained_kwargs, _tiny_llama_config


def load_reward_model(cfg: ModelConfig, tokenizer, key: str = "model.rm"):
    """A trained RM from `name_or_path`, or a fresh value head on a backbone (hub, local or tiny)."""
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    if cfg.name_or_path is None:
        config = _tiny_llama_config(cfg, tokenizer, key)
        config.num_labels = 1
        model = LlamaForSequenceClassification(config)
    else:
        _check_local(cfg.name_or_path, key)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                cfg.name_or_path, num_labels=1, **_pretrained_kwargs(cfg))
        except (OSError, ValueError) as exc:
            raise PbkdError(f"{key}.name_or_path={cfg.name_or_path}: {str(exc).splitlines()[0]}") from None
    # Sequence classifiers find the last real token through pad_token_id.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def score(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Rewards [B] for right-padded rows."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()
