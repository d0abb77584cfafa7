"""White-box MM PbKD: the Q-function form of the min-max game (METHOD.md, "White-box: MM PbKD").

Shapes: `q_values[:, h] = Q(s_h, ·)` and `teacher_probs[:, h] = πE(· | s_h)` are `[B, T, V]`,
`actions[:, h] = a_h` is the token taken in `s_h` (`[B, T]`), and `mask` (`[B, T]`) is 1 on the
response tokens, so `q_values[:, h + 1]` belongs to `s_{h+1} = (s_h, a_h)`.
"""

from __future__ import annotations

import torch

from pbkd_cli.objectives.bradley_terry import bradley_terry_loss, pairwise_accuracy


def _taken_q(q_values: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Q(s_h, a_h), `[B, T]`; actions off the mask may be padding ids."""
    safe_actions = actions.masked_fill(~mask.bool(), 0)
    return q_values.gather(-1, safe_actions.unsqueeze(-1)).squeeze(-1)


def expected_q(q_values: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """`V(s_h) = Σ_a probs(a | s_h) Q(s_h, a)`, `[B, T]`."""
    # einsum contracts V as a batched matmul, without a [B, T, V] product tensor.
    dtype = torch.promote_types(q_values.dtype, probs.dtype)
    return torch.einsum("btv,btv->bt", probs.to(dtype), q_values.to(dtype))


def _moment_terms(q_values: torch.Tensor, teacher_probs: torch.Tensor, actions: torch.Tensor,
                  mask: torch.Tensor, student_probs: torch.Tensor | None = None) -> torch.Tensor:
    """`Σ_a πE(a|s_h) Q(s_h, a) − Q(s_h, a_h)` per position, `[B, T]`, zero off the mask; with
    `student_probs` the taken action's `Q(s_h, a_h)` is replaced by its expectation `Σ_a π(a|s_h) Q(s_h, a)`."""
    student_term = (_taken_q(q_values, actions, mask) if student_probs is None
                    else expected_q(q_values, student_probs))
    per_token = expected_q(q_values, teacher_probs) - student_term
    return per_token * mask.to(per_token.dtype)


def moment_gap(q_values: torch.Tensor, teacher_probs: torch.Tensor, actions: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
    """Sample estimate of `J(πE, r) − J(π, r)` by the performance difference lemma:

        gap = (1/B) Σ_b Σ_{valid h} ( Σ_a πE(a|s_h) Q(s_h, a) − Q(s_h, a_h) )

    on sequences sampled from the student π (sum over the response, mean over the batch).
    """
    return _moment_terms(q_values, teacher_probs, actions, mask).sum(1).mean()


def implied_rewards(q_values: torch.Tensor, teacher_probs: torch.Tensor, actions: torch.Tensor,
                    mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Sequence reward implied by Q, `[B]`: `Σ_{valid h} r_Q(s_h, a_h)` with

        r_Q(s_h, a_h) = Q(s_h, a_h) − γ Σ_a πE(a | s_{h+1}) Q(s_{h+1}, a),

    the value after the last valid token being 0 (the response has ended). For γ = 1 the sum
    telescopes to `V_Q(s_0) + Σ_h (Q(s_h, a_h) − V_Q(s_h))` with `V_Q(s) = Σ_a πE(a|s) Q(s, a)`.
    """
    mask = mask.to(q_values.dtype)
    values = expected_q(q_values, teacher_probs) * mask
    next_values = torch.nn.functional.pad(values[:, 1:], (0, 1))
    return ((_taken_q(q_values, actions, mask) - gamma * next_values) * mask).sum(1)


def q_game_objective(q_values: torch.Tensor, teacher_probs: torch.Tensor, actions: torch.Tensor,
                     mask: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                     beta: float, reward_l2: float = 0.0,
                     student_probs: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss for the Q step: the negated Lagrangian that the Q head ascends,

        objective = gap(Q; student samples) − β · L_BT(r_Q(τ_w), r_Q(τ_l)) − reward_l2 · mean_h m_h²

    with `m_h = Σ_a πE(a|s_h) Q(s_h, a) − Q(s_h, a_h)` the per-token moment term over the valid
    positions of the student samples. Why the penalty: the gap is linear in Q, so without it Q can
    grow the gap without bound on any token the student takes that the teacher would not.

    `q_values`, `teacher_probs`, `actions`, `mask` describe student samples (see `moment_gap`);
    `chosen_rewards` / `rejected_rewards` are `implied_rewards(...)` of the preference pairs, `[N]`
    each. Returns `(−objective, metrics)` with `moment_gap`, `bt_loss`, `q_accuracy`, `objective`.

    `student_probs` (π(·|s_h) of the sampling policy, `[B, T, V]`) swaps the sampled `Q(s_h, a_h)` for
    its exact expectation: the same gap in expectation with less variance, and Q is then pushed down
    on every token the student puts mass on, not only on the one it drew, so the student's
    moment-matching step cannot climb Q values that no sample ever checked.
    """
    terms = _moment_terms(q_values, teacher_probs, actions, mask, student_probs)
    gap = terms.sum(1).mean()
    bt_loss = bradley_terry_loss(chosen_rewards, rejected_rewards)
    penalty = terms.pow(2).sum() / mask.sum().clamp_min(1)
    objective = gap - beta * bt_loss - reward_l2 * penalty
    metrics = {
        "moment_gap": gap.item(),
        "bt_loss": bt_loss.item(),
        "q_accuracy": pairwise_accuracy(chosen_rewards, rejected_rewards).item(),
        "moment_l2": penalty.item(),
        "objective": objective.item(),
    }
    return -objective, metrics


def student_moment_matching_loss(q_values: torch.Tensor, teacher_probs: torch.Tensor,
                                 student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The student's side of the gap, differentiable in π:

        loss = (1/B) Σ_b Σ_{valid h} ( Σ_a πE(a|s_h) Q(s_h, a) − Σ_a π(a|s_h) Q(s_h, a) ),  π = softmax(logits)

    Why: the gap's student term is `E_{a_h~π} Q(s_h, a_h)`; replacing the sampled `Q(s_h, a_h)` by its
    exact expectation `Σ_a π(a|s_h) Q(s_h, a)` at every visited state gives a low-variance, directly
    differentiable objective (on-policy action-value moment matching), so the student minimises the
    gap by raising `Σ_a π Q`. Q is detached because this is the student's move; the dependence of the
    visited states on π is left to the policy-gradient term. The teacher term is constant in π and
    only makes the value read as a gap.
    """
    q_values = q_values.detach()
    student_probs = torch.softmax(student_logits, dim=-1, dtype=torch.promote_types(student_logits.dtype,
                                                                                     torch.float32))
    per_token = expected_q(q_values, teacher_probs) - expected_q(q_values, student_probs)
    return (per_token * mask.to(per_token.dtype)).sum(1).mean()
