"""What the white-box stages share: a frozen teacher whose token probabilities they read, and the
Q-function of MM PbKD, a causal LM whose logits are `Q(s, .)` over the teacher's vocabulary.

Position h of every `[B, T-1, ...]` tensor here is the state before token `input_ids[:, h + 1]`, so
`actions = input_ids[:, 1:]` and `mask = response_mask[:, 1:]` line up with it.
"""

from __future__ import annotations

import torch

from pbkd_cli.config.schema import PbkdConfig
from pbkd_cli.data.prompts import TokenBatch
from pbkd_cli.engine import build_frozen_engine
from pbkd_cli.io import PbkdError
from pbkd_cli.models import load_causal_lm
from pbkd_cli.objectives.moment_matching import implied_rewards
from pbkd_cli.stages._shared import load_lm, load_role_tokenizer


def require_same_vocab(tokenizer, other, key: str) -> None:
    """White-box objectives compare distributions token by token, so the vocabularies must agree."""
    if tokenizer.get_vocab() != other.get_vocab():
        raise PbkdError(f"{key}: its tokenizer differs from the student's; white-box distillation compares "
                        f"next-token distributions and needs one shared vocabulary")


def load_teacher(cfg: PbkdConfig, student_tokenizer):
    """The teacher as a frozen model (its own ZeRO-3 engine when the DeepSpeed config is stage 3)."""
    if cfg.model.teacher.api.base_url is not None:
        raise PbkdError("model.teacher.api.base_url: white-box distillation needs the teacher's weights, "
                        "not an API (unset it or use variant=black_box)")
    tokenizer, teacher = load_lm(cfg, "teacher")
    require_same_vocab(student_tokenizer, tokenizer, "model.teacher")
    return build_frozen_engine(teacher, cfg.deepspeed)


def load_q_model(cfg: PbkdConfig, student_tokenizer):
    """(tokenizer, Q) for `model.rm`: Q(s, .) is the logits of a causal LM (a trained Q, the teacher's
    or the student's weights as a start, or a tiny Llama from scratch)."""
    tokenizer = load_role_tokenizer(cfg, "rm")
    require_same_vocab(student_tokenizer, tokenizer, "model.rm")
    return tokenizer, load_causal_lm(cfg.model.rm, tokenizer, "model.rm")


def next_token_logits(model, batch: TokenBatch, vocab_size: int) -> torch.Tensor:
    """`[B, T-1, V]` logits of the states before each next token, cut to the tokenizer's vocabulary
    (checkpoints pad their output layer to different sizes, e.g. Qwen2.5 0.5B and 7B)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logits[:, :-1, :vocab_size]


@torch.no_grad()
def next_token_probs(model, batch: TokenBatch, vocab_size: int) -> torch.Tensor:
    """A frozen policy's π(. | s_h) (the teacher's, or the student's π_old), `[B, T-1, V]`, in at least float32."""
    logits = next_token_logits(model, batch, vocab_size)
    return torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))


class ImpliedRewards:
    """`r_Q(x, τ) = Σ_h Q(s_h, a_h) − γ Σ_a πE(a|s_{h+1}) Q(s_{h+1}, a)` of each row of a batch: the
    sequence reward a Q-function stands for, scored like a reward model (`rewards(q_model, batch)`)."""

    def __init__(self, teacher, vocab_size: int, gamma: float):
        self.teacher, self.vocab_size, self.gamma = teacher, vocab_size, gamma

    def __call__(self, q_model, batch: TokenBatch) -> torch.Tensor:
        q_values = next_token_logits(q_model, batch, self.vocab_size)
        probs = next_token_probs(self.teacher, batch, self.vocab_size)
        return implied_rewards(q_values, probs, batch.input_ids[:, 1:], batch.response_mask[:, 1:],
                               self.gamma).float()
