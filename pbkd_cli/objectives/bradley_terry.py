"""Bradley–Terry preference likelihood and the RM step of the PbKD min-max game."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Negative BT log-likelihood of the pairs, `L_r = −(1/N) Σ_n log σ(r(τ_w,n) − r(τ_l,n))`.

    Both inputs are `[N]`. `logsigmoid` keeps large negative margins finite (no `log(0)`).
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs ranked correctly, `(1/N) Σ_n 1[r(τ_w,n) > r(τ_l,n)]`; ties count as wrong."""
    return (chosen_rewards > rejected_rewards).float().mean()


def within_group_accuracy(rewards: torch.Tensor, correct: torch.Tensor, group_size: int) -> float | None:
    """How often a reward orders a right sample above a wrong one of the same prompt.

    `rewards` and `correct` (bool) are `[B·k]`, B groups of k = `group_size` consecutive samples of one
    prompt. Over every (right, wrong) pair inside a group: the fraction with `r(right) > r(wrong)` (ties
    count half). This, not pairwise accuracy on a preference file, is the signal a group-baseline policy
    gradient gets from the reward; 0.5 is noise. None when no group holds both a right and a wrong sample.
    """
    r = rewards.reshape(-1, group_size).double()
    ok = correct.reshape(-1, group_size).bool()
    pairs = ok.unsqueeze(2) & ~ok.unsqueeze(1)  # [B, i right, j wrong]
    if not pairs.any():
        return None
    diff = r.unsqueeze(2) - r.unsqueeze(1)
    wins = (diff > 0).double() + 0.5 * (diff == 0).double()
    return (wins[pairs].sum() / pairs.sum()).item()


def rm_game_objective(teacher_rewards: torch.Tensor, student_rewards: torch.Tensor,
                      chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                      beta: float, reward_l2: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss for the RM step: the negated Lagrangian that the reward model ascends.

        objective = mean r(x, τE) − mean r(x, τπ) − β · L_r(D_batch) − λ · mean(r²)

    `teacher_rewards` / `student_rewards` (`[B]`) score teacher responses and fresh student samples,
    `chosen_rewards` / `rejected_rewards` (`[N]`) score the preference pairs, and λ = `reward_l2`.
    The mean of r² runs over every reward passed in: the gap term is linear in r, so without a bound
    the RM can raise it forever by scaling r up. Returns `(−objective, metrics)`, the metrics being
    `gap`, `bt_loss`, `rm_accuracy`, `reward_l2_term` (λ·mean r², as it enters the objective),
    `reward_sq_mean` (mean r², to watch the scale of r when λ = 0) and `objective`.
    """
    gap = teacher_rewards.mean() - student_rewards.mean()
    bt_loss = bradley_terry_loss(chosen_rewards, rejected_rewards)
    reward_sq_mean = torch.cat([teacher_rewards, student_rewards, chosen_rewards, rejected_rewards]).square().mean()
    l2_term = reward_l2 * reward_sq_mean
    objective = gap - beta * bt_loss - l2_term
    metrics = {
        "gap": gap.item(),
        "bt_loss": bt_loss.item(),
        "rm_accuracy": pairwise_accuracy(chosen_rewards, rejected_rewards).item(),
        "reward_l2_term": l2_term.item(),
        "reward_sq_mean": reward_sq_mean.item(),
        "objective": objective.item(),
    }
    return -objective, metrics
