"""Next-token objectives on response tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _token_mean_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # bf16/fp16 logits are upcast: a log-softmax over a large vocabulary loses too much in half precision.
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets)


def response_nll_loss(logits: torch.Tensor, input_ids: torch.Tensor,
                      response_mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean negative log-likelihood of the response tokens.

    `logits[:, t]` predicts `input_ids[:, t + 1]`; a token counts when `response_mask` marks it,
    so prompt and padding tokens carry no loss. The mean is over all response tokens of the batch
    (long responses weigh more, as in standard SFT).
    """
    mask = response_mask[:, 1:].bool()
    loss = _token_mean_nll(logits[:, :-1][mask], input_ids[:, 1:][mask])
    return loss, {"loss": loss.item(), "response_tokens": int(mask.sum())}


def response_nll_loss_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor,
                                  response_mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """`response_nll_loss` of the logits `hidden @ weight.T` (`hidden`: `[B, T-1, d]`, the final hidden
    state before each next token; `weight`: `[V, d]`, the output layer's), with the output layer applied
    to the response positions only: prompt and padding positions, often half a batch, cost no
    `[tokens, vocab]` logits, softmax or logit gradient."""
    mask = response_mask[:, 1:].bool()
    loss = _token_mean_nll(F.linear(hidden[mask], weight), input_ids[:, 1:][mask])
    return loss, {"loss": loss.item(), "response_tokens": int(mask.sum())}
