"""The scalar reward model: a backbone with a one-output value head.

Saved with `save_pretrained` it is an ordinary `AutoModelForSequenceClassification` checkpoint
(`num_labels=1`), so TRL, transformers or any other tool reads it back. How the head's per-token
outputs become one reward is part of the artefact (`config.reward_pooling`):
  - `last`: the output at the last real token, as every sequence classifier does;
  - `mean`: the mean of the outputs over the response tokens. A flaw anywhere in a response (a wrong
    sum in step 2 of 3) is then visible where it happens instead of having to reach the last token
    through attention, which small RMs learn far faster.
"""

from __future__ import annotations

import torch

from pbkd_cli.config.schema import ModelConfig, RewardPooling
from pbkd_cli.io import PbkdError
from pbkd_cli.models.factory import _check_local, _pretrained_kwargs, _tiny_llama_config


def load_reward_model(cfg: ModelConfig, tokenizer, pooling: RewardPooling, key: str = "model.rm"):
    """A trained RM from `name_or_path`, or a fresh value head on a backbone (hub, local or tiny).

    `pooling` applies to a fresh head; a trained RM keeps the pooling it was fitted with.
    """
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
    if getattr(model.config, "reward_pooling", None) is None:
        model.config.reward_pooling = pooling.value
    # Sequence classifiers find the last real token through pad_token_id.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def score(model, batch) -> torch.Tensor:
    """Rewards [B] of a right-padded `TokenBatch` of (prompt + response) rows.

    `model` may be a DeepSpeed engine; the `mean` pooling calls its backbone and head directly.
    """
    module = getattr(model, "module", model)
    if module.config.reward_pooling == RewardPooling.last.value:
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.squeeze(-1).float()
    hidden = module.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    per_token = module.score(hidden).squeeze(-1).float()
    mask = batch.response_mask.to(per_token.dtype)
    return (per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
