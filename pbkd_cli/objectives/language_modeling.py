"""Next-token objectives on response tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def response_nll_loss(logits: torch.Tensor, input_ids: torch.Tensor,
                      response_mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean negative log-likelihood of the response tokens.

    `logits[:, t]` predicts `input_ids[:, t + 1]`; a token counts when `response_mask` marks it,
    so prompt and padding tokens carry no loss. The mean is over all response tokens of the batch
    (long responses weigh more, as in standard SFT).
    """
    targets = input_ids[:, 1:]
    mask = response_mask[:, 1:].bool()
    selected = logits[:, :-1][mask]
    # bf16/fp16 logits are upcast: a log-softmax over a large vocabulary loses too much in half precision.
    loss = F.cross_entropy(selected.to(torch.promote_types(selected.dtype, torch.float32)), targets[mask])
    return loss, {"loss": loss.item(), "response_tokens": int(mask.sum())}
