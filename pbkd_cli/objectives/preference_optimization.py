"""Pairwise preference optimisation of a policy against a frozen reference: DPO and IPO.

The policy's log-ratio to the reference is an implicit reward, `r(x, y) = β (log π(y|x) − log π_ref(y|x))`
(DPO, Rafailov et al. 2023; DPKD's implicit reward). Every loss here is a function of the margin

    h = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]

over `[N]` summed response log-probabilities of the chosen (`y_w`) and rejected (`y_l`) responses:
  sigmoid  −(1−ε) log σ(βh) − ε log σ(−βh): DPO; ε > 0 is conservative DPO (labels flipped with
           probability ε);
  ipo      (h − 1/(2β))²: IPO (Azar et al. 2023), which does not drive h to infinity on pairs it can
           already separate.
Either can add `sft_weight` times the chosen responses' per-token NLL (RPO, Pang et al. 2024; TRL's
`rpo_alpha`): the margin alone is raised as well by lowering both log-probs, which on small models
unlearns the chosen answers too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pbkd_cli.objectives.policy_gradient import sequence_logprobs


def preference_optimization_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                                 reference_chosen: torch.Tensor, reference_rejected: torch.Tensor, *,
                                 beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0,
                                 sft_weight: float = 0.0, chosen_tokens: torch.Tensor | None = None,
                                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean loss over the N pairs, and figures: the implicit rewards of chosen and rejected responses
    (`β` times their log-ratios), their margin, and how often the chosen one's is higher. With
    `sft_weight`, `chosen_tokens` (`[N]`, the chosen responses' lengths) gives the NLL per token."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    margin = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    elif loss == "ipo":
        losses = (margin - 1 / (2 * beta)).square()
    else:
        raise ValueError(f"unknown preference loss {loss!r}")
    total = losses.mean()
    figures = {}
    if sft_weight:
        if chosen_tokens is None:
            raise ValueError("sft_weight needs chosen_tokens, the chosen responses' lengths")
        chosen_nll = -policy_chosen.sum() / chosen_tokens.sum().clamp_min(1)
        total = total + sft_weight * chosen_nll
        figures["chosen_nll"] = chosen_nll.item()
    chosen_reward, rejected_reward = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    return total, {
        "loss": total.item(),
        "preference_loss": losses.mean().item(),
        **figures,
        "chosen_reward": chosen_reward.mean().item(),
        "rejected_reward": rejected_reward.mean().item(),
        "reward_margin": (chosen_reward - rejected_reward).mean().item(),
        "reward_accuracy": (chosen_reward > rejected_reward).float().mean().item(),
    }


def response_logprob_sums(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """`log π(response | prompt)` of each row, `[B]`: the response tokens' log-probs, summed.
    `logits` are the model's on `input_ids` (`[B, T, V]`); `response_mask` marks the response tokens."""
    return sequence_logprobs(logits[:, :-1], input_ids[:, 1:], response_mask[:, 1:]).sum(-1)
