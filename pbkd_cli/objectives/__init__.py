"""Pure loss functions: `(tensors) -> loss, metrics`, no I/O and no config objects."""

from pbkd_cli.objectives.bradley_terry import bradley_terry_loss, pairwise_accuracy, rm_game_objective
from pbkd_cli.objectives.divergences import (DIVERGENCES, distillation_loss, forward_kl, generalized_jsd,
                                             reverse_kl, skew_forward_kl, skew_reverse_kl, total_variation)
from pbkd_cli.objectives.moment_matching import (expected_q, implied_rewards, moment_gap, q_game_objective,
                                                 student_moment_matching_loss)
from pbkd_cli.objectives.policy_gradient import (clipped_policy_gradient_loss, group_advantages, kl_penalty,
                                                 sequence_logprobs)
from pbkd_cli.objectives.preference_optimization import preference_optimization_loss, response_logprob_sums

__all__ = [
    "DIVERGENCES",
    "bradley_terry_loss",
    "clipped_policy_gradient_loss",
    "distillation_loss",
    "expected_q",
    "forward_kl",
    "generalized_jsd",
    "group_advantages",
    "implied_rewards",
    "kl_penalty",
    "moment_gap",
    "pairwise_accuracy",
    "preference_optimization_loss",
    "q_game_objective",
    "response_logprob_sums",
    "reverse_kl",
    "rm_game_objective",
    "sequence_logprobs",
    "skew_forward_kl",
    "skew_reverse_kl",
    "student_moment_matching_loss",
    "total_variation",
]
