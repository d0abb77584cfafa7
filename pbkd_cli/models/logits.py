"""What the objectives read off a causal LM: next-token logits, probabilities and the log-probabilities of
the tokens taken.

Position h of every `[B, T-1, ...]` tensor here is the state before token `input_ids[:, h + 1]`, so
`actions = input_ids[:, 1:]` and `mask = response_mask[:, 1:]` line up with it.
"""

from __future__ import annotations

import torch

from pbkd_cli.data.prompts import TokenBatch
from pbkd_cli.models.lora import unwrapped
from pbkd_cli.objectives.policy_gradient import sequence_logprobs


def next_token_logits(model, batch: TokenBatch, vocab_size: int | None = None) -> torch.Tensor:
    """`[B, T-1, V]` logits of the states before each next token, cut to the tokenizer's vocabulary when
    given (checkpoints pad their output layer to different sizes, e.g. Qwen2.5 0.5B and 7B)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logits[:, :-1, :vocab_size]


@torch.no_grad()
def next_token_probs(model, batch: TokenBatch, vocab_size: int) -> torch.Tensor:
    """A frozen policy's π(. | s_h) (the teacher's, or the student's π_old), `[B, T-1, V]`, in at least float32."""
    logits = next_token_logits(model, batch, vocab_size)
    return torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))


@torch.no_grad()
def token_logprobs(model, batch: TokenBatch, micro_batch_size: int, vocab_size: int | None = None,
                   temperature: float = 1.0) -> torch.Tensor:
    """log pi_T(a_t | s_t) of every response token of `batch` ([B, T-1], zero off the response), over
    the first `vocab_size` logits when given, `micro_batch_size` rows at a time.

    pi_T = softmax(logits / temperature) is the policy a game samples from, so it is the one whose
    probabilities the policy gradient and its ratios use."""
    out = []
    for start in range(0, batch.input_ids.shape[0], micro_batch_size):
        rows = batch.rows(slice(start, start + micro_batch_size))
        out.append(sequence_logprobs(next_token_logits(model, rows, vocab_size) / temperature,
                                     rows.input_ids[:, 1:], rows.response_mask[:, 1:]))
    return torch.cat(out)


def hidden_state_head(model):
    """(decoder, output-layer weight `[V, d]`) of a causal LM whose logits are exactly
    `decoder(...).last_hidden_state @ weight.T`, with its weights whole on this rank, or None: a
    ZeRO-3 engine partitions them; a head with a bias, scaled or soft-capped logits (Cohere, Gemma 2)
    compute other logits. `model` may be a DeepSpeed engine."""
    if getattr(model, "zero_optimization_partition_weights", lambda: False)():
        return None
    module = unwrapped(model)  # a LoRA model's adapters live in its decoder's layers
    head, config = module.get_output_embeddings(), module.config
    if type(head) is not torch.nn.Linear or head.bias is not None or module.base_model is module:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return None
    return module.base_model, head.weight


def final_hidden_states(decoder, batch: TokenBatch) -> torch.Tensor:
    """`[B, T-1, d]`: the decoder's last hidden state before each next token."""
    return decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state[:, :-1]
