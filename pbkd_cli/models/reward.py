"""The scalar reward model: a backbone with a one-output value head, or a language model whose
likelihood is the reward.

How a reward is read off the model is part of the artefact (`config.reward_pooling`):
  - `last` (the default): the value head at the last real token, as every sequence classifier does, so
    transformers, TRL and vLLM score the saved RM exactly as pbkd does;
  - `mean`: the mean of the value head over the response tokens. A flaw anywhere in a response (a wrong
    sum in step 2 of 3) is then visible where it happens instead of having to reach the last token
    through attention, which small RMs learn far faster. Opt-in, because only pbkd reads it so: any
    other tool loads the checkpoint as a sequence classifier and reads the last token alone, which the
    fit of the mean never pinned down, so its scores there, and even its rankings, differ from pbkd's.
  - `likelihood`: the mean log-probability the model's own LM head gives the response tokens, times
    `config.reward_scale` (a generative RM, SimPO's length-normalised implicit reward with its beta,
    without a reference model). It starts as a verifier of what its backbone can do: a student's LM
    head puts a wrong sum below the right one, where a fresh value head starts at noise. The
    Bradley-Terry fit then moves that likelihood; the scale sets how far apart the fit finds the pairs
    at its start (`train_rm.likelihood_scale`).
`last` and `mean` save as an `AutoModelForSequenceClassification` checkpoint (`num_labels=1`),
`likelihood` as an `AutoModelForCausalLM`; transformers, TRL or any other tool loads either back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pbkd_cli.config.schema import ModelConfig, RewardPooling
from pbkd_cli.data.prompts import collate
from pbkd_cli.models.factory import _check_local, _tiny_llama_config, from_pretrained
from pbkd_cli.models.logits import next_token_logits, next_token_probs, response_logprobs, shared_prompt_forward
from pbkd_cli.models.lora import unwrapped
from pbkd_cli.objectives.moment_matching import implied_rewards


def _saved_reward_config(name_or_path: str) -> dict:
    """How a trained RM reads its rewards (`reward_pooling`, `reward_scale`), as it was fitted; empty for a
    plain backbone or a hub id."""
    config = Path(name_or_path).expanduser() / "config.json"
    saved = json.loads(config.read_text()) if config.is_file() else {}
    return {k: saved[k] for k in ("reward_pooling", "reward_scale") if k in saved}


def load_reward_model(cfg: ModelConfig, tokenizer, pooling: RewardPooling, key: str = "model.rm",
                      likelihood_scale: float = 1.0):
    """A trained RM from `name_or_path`, or a fresh value head on a backbone (hub, local or tiny).

    `pooling` and `likelihood_scale` apply to a fresh head; a trained RM keeps those it was fitted with.
    """
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaForCausalLM,
                              LlamaForSequenceClassification)

    saved = {}
    if cfg.name_or_path is not None:
        _check_local(cfg.name_or_path, key)
        saved = _saved_reward_config(cfg.name_or_path)
        pooling = RewardPooling(saved.get("reward_pooling") or pooling.value)
    generative = pooling == RewardPooling.likelihood
    if cfg.name_or_path is None:
        config = _tiny_llama_config(cfg, tokenizer, key)
        config.num_labels = 1
        model = (LlamaForCausalLM if generative else LlamaForSequenceClassification)(config)
    else:
        auto, head = (AutoModelForCausalLM, {}) if generative else (AutoModelForSequenceClassification, {"num_labels": 1})
        model = from_pretrained(auto, cfg, key, **head)
    model.config.reward_pooling = pooling.value
    if generative:
        # An RM fitted before the scale existed was read at scale 1.
        model.config.reward_scale = saved.get("reward_scale", 1.0 if "reward_pooling" in saved else likelihood_scale)
    # Sequence classifiers find the last real token through pad_token_id.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def score(model, batch) -> torch.Tensor:
    """Rewards [B] of a right-padded `TokenBatch` of (prompt + response) rows, computing each distinct
    prompt once where rows share it (a group of samples, a preference pair: `shared_prompt_forward`).

    `model` may be a DeepSpeed engine; the `mean` pooling calls its backbone and head directly.
    """
    module = unwrapped(model)
    pooling = module.config.reward_pooling
    if pooling == RewardPooling.likelihood.value:
        logprobs = response_logprobs(model, batch)
        mean = logprobs.sum(-1) / batch.response_mask[:, 1:].sum(-1).clamp_min(1).to(logprobs.dtype)
        return module.config.reward_scale * mean
    if pooling == RewardPooling.last.value:
        # The suffix holds the row's last prompt token, so the classifier's last non-pad token is the row's.
        shared = shared_prompt_forward(model, batch)
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask) if shared is None else shared[0]
        return out.logits.squeeze(-1).float()
    shared = shared_prompt_forward(model, batch, forward=module.base_model)
    if shared is None:
        hidden = module.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        mask = batch.response_mask
    else:
        out, split = shared
        hidden, mask = out.last_hidden_state, split.suffix_mask.clone()
        mask[:, 0] = 0  # the row's last prompt token
    per_token = module.score(hidden).squeeze(-1).float()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


class ImpliedRewards:
    """`r_Q(x, τ) = Σ_h Q(s_h, a_h) − γ Σ_a πE(a|s_{h+1}) Q(s_{h+1}, a)` of each row of a batch: the
    sequence reward MM PbKD's Q-function (a causal LM whose logits are `Q(s, .)` over the teacher's
    vocabulary) stands for, scored like a reward model (`rewards(q_model, batch)`)."""

    def __init__(self, teacher, vocab_size: int, gamma: float):
        self.teacher, self.vocab_size, self.gamma = teacher, vocab_size, gamma

    def __call__(self, q_model, batch) -> torch.Tensor:
        q_values = next_token_logits(q_model, batch, self.vocab_size)
        probs = next_token_probs(self.teacher, batch, self.vocab_size)
        return implied_rewards(q_values, probs, batch.input_ids[:, 1:], batch.response_mask[:, 1:],
                               self.gamma).float()


@torch.no_grad()
def batched_rewards(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                    batch_size: int, reward=score) -> torch.Tensor:
    """Rewards of many (prompt, response) rows without building a graph; `reward(model, batch)` is the
    scalar RM's `score` or a Q-function's `ImpliedRewards`."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = collate(prompts[start:start + batch_size], responses[start:start + batch_size], pad_id).to(device)
        out.append(reward(model, batch).cpu())
    return torch.cat(out) if out else torch.zeros(0)
