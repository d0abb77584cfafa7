"""Policy-gradient pieces of the PbKD student step: baselines, token log-probs, clipped surrogate, KL."""

from __future__ import annotations

from typing import Literal

import torch


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: Literal["none", "group", "batch"] = "none",
                     eps: float = 1e-6, leave_one_out: bool = False) -> torch.Tensor:
    """Advantages `A_i = (r_i − b_i) / s` with a per-prompt baseline, no critic.

    `rewards` is `[B·k]`, laid out as B groups of k = `group_size` consecutive samples of one prompt.
    The baseline is the group mean `b_i = (1/k) Σ_j r_j` (GRPO), or with `leave_one_out` the mean of
    the other samples `b_i = (1/(k−1)) Σ_{j≠i} r_j` (RLOO), which keeps `r_i` out of its own baseline
    and so leaves the gradient estimate unbiased. The scale `s`:
      - `none`: 1, the reward's own units;
      - `group`: the population std of the prompt's group, + eps (GRPO); a near-tie group of a noisy
        reward then gets advantages of ±1 like a decisive one;
      - `batch`: the population std of all the (centred) advantages, + eps: reward-scale free, so a
        KL weight or a learning rate means the same for any RM, while a decisive group still
        outweighs a near-tie.
    """
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if leave_one_out and group_size < 2:
        raise ValueError("a leave-one-out baseline needs at least 2 samples per prompt")
    groups = rewards.reshape(-1, group_size)
    if leave_one_out:
        baseline = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    else:
        baseline = groups.mean(1, keepdim=True)
    advantages = groups - baseline
    if scale == "group":
        advantages = advantages / (groups.std(1, correction=0, keepdim=True) + eps)
    elif scale == "batch":
        advantages = advantages / (advantages.std(correction=0) + eps)
    elif scale != "none":
        raise ValueError(f"unknown advantage scale {scale!r}; expected 'none', 'group' or 'batch'")
    return advantages.reshape(-1)


def widest_groups(rewards: torch.Tensor, group_size: int, keep: int, eligible: torch.Tensor | None = None) -> list[int]:
    """The `keep` groups (of `group_size` consecutive rewards) whose rewards spread most, in their order.

    A group whose samples all score the same has zero advantage everywhere: it carries no policy
    gradient, only dilutes the step's few informative prompts (DAPO's dynamic sampling drops such
    groups). Ties keep the earlier group, so a binary reward keeps every mixed group first. Groups
    where `eligible` (bool, one per group) is False come after every eligible one.
    """
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    spread = rewards.reshape(-1, group_size).double().std(1, correction=0)
    if not 0 < keep <= spread.numel():
        raise ValueError(f"cannot keep {keep} of {spread.numel()} groups")
    if eligible is not None:
        spread = torch.where(eligible.bool(), spread, spread - (spread.max() - spread.min() + 1.0))
    order = torch.sort(-spread, stable=True).indices[:keep]
    return sorted(order.tolist())


def trusted_groups(reference_rewards: torch.Tensor, distrusted_fraction: float) -> torch.Tensor:
    """Which groups (bool) to learn from: all but the `distrusted_fraction` whose reference answer (the
    teacher's) the reward scores lowest.

    A learnt reward that scores even the teacher's answer low is, mostly, a reward that cannot tell right
    from wrong on that prompt: there its ranking of the student's samples pushes up the least bad wrong one.
    Ties at the cut are kept.
    """
    if not 0.0 <= distrusted_fraction < 1.0:
        raise ValueError(f"distrusted fraction {distrusted_fraction}: must lie in [0, 1)")
    if distrusted_fraction == 0.0:
        return torch.ones_like(reference_rewards, dtype=torch.bool)
    cut = torch.quantile(reference_rewards.double(), distrusted_fraction)
    return reference_rewards.double() >= cut


def weigh_negative_advantages(advantages: torch.Tensor, weight: float) -> torch.Tensor:
    """Advantages with the negative ones multiplied by `weight`.

    `weight = 1` is the policy gradient as it is; `weight = 0` keeps only the samples that beat their
    group (a filtered, RFT/ReST-style update: imitate the better samples, push nothing down). Pushing
    down a whole sampled sequence also pushes down its right steps before the first mistake, and
    moves probability to tokens nobody sampled; the weight trades that against using every sample.
    """
    if weight < 0:
        raise ValueError(f"negative-advantage weight {weight}: must be >= 0")
    return torch.where(advantages < 0, weight * advantages, advantages)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token log-probabilities `log π(labels_t | s_t)`, `[B, T]`, zero where `mask == 0`.

    `logits[:, t]` (`[B, T, V]`) must already predict `labels[:, t]`. Labels off the mask may hold
    anything (padding ids, −100). The log-softmax is the only full-vocabulary tensor created; it is
    computed in at least float32, since half precision loses too much over a large vocabulary.
    """
    mask = mask.bool()
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    taken = logp.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return taken.masked_fill(~mask, 0.0)


def clipped_policy_gradient_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                                 mask: torch.Tensor, clip_eps: float) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate, as a loss over the valid tokens of the batch.

        ρ_t = exp(log π(a_t|s_t) − log π_old(a_t|s_t))
        loss = −(1/|valid|) Σ_{valid t} min(ρ_t A, clip(ρ_t, 1 − ε, 1 + ε) A)

    `logprobs`, `old_logprobs`, `mask` are `[B, T]`; `advantages` is `[B]`, one per sequence, shared
    by its tokens. The token mean runs over all valid tokens of the batch (long responses weigh more).
    Metrics: `clip_fraction` (valid tokens whose clipped term is the smaller one, i.e. whose gradient
    the clip removes), `approx_kl` (mean of old − new log-prob, an estimate of KL(π_old || π)) and
    `ratio_mean`.
    """
    # The old policy and the advantages are constants of the surrogate; only π is optimised.
    log_ratio = logprobs - old_logprobs.detach()
    ratio = log_ratio.exp()
    adv = advantages.detach().unsqueeze(-1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    loss = -_masked_mean(torch.minimum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "clip_fraction": _masked_mean((clipped < unclipped).to(ratio.dtype), mask).item(),
            "approx_kl": _masked_mean(-log_ratio, mask).item(),
            "ratio_mean": _masked_mean(ratio, mask).item(),
        }
    return loss, metrics


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
               kind: Literal["k1", "k3"] = "k3") -> torch.Tensor:
    """Sample estimate of KL(π || π_ref) from tokens drawn from π, as a masked token mean.

    With `d_t = log π_ref(a_t|s_t) − log π(a_t|s_t)`:
    `k1 = −d_t` (unbiased, can be negative) and `k3 = exp(d_t) − d_t − 1` (unbiased and ≥ 0, lower
    variance; Schulman's estimator).
    """
    delta = ref_logprobs - logprobs
    if kind == "k1":
        per_token = -delta
    elif kind == "k3":
        per_token = delta.exp() - delta - 1.0
    else:
        raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1' or 'k3'")
    return _masked_mean(per_token, mask)
