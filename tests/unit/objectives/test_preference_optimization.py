import math

import pytest
import torch

from pbkd_cli.objectives.preference_optimization import preference_optimization_loss, response_logprob_sums


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def pair(policy_chosen, policy_rejected, reference_chosen, reference_rejected):
    as_tensor = lambda v: torch.tensor(v, dtype=torch.float64, requires_grad=True)  # noqa: E731
    return [as_tensor(v) for v in (policy_chosen, policy_rejected, reference_chosen, reference_rejected)]


def test_dpo_loss_rewards_and_gradient_match_a_hand_computation():
    # Chosen log-ratio +1, rejected −1: margin h = 2, β h = 1.
    pc, pr, rc, rr = pair([-1.0], [-3.0], [-2.0], [-2.0])
    loss, figures = preference_optimization_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-12)
    assert figures["chosen_reward"] == pytest.approx(0.5) and figures["rejected_reward"] == pytest.approx(-0.5)
    assert figures["reward_margin"] == pytest.approx(1.0) and figures["reward_accuracy"] == 1.0
    loss.backward()
    # dL/d log π(y_w) = −β σ(−β h); the rejected response gets the opposite push.
    assert pc.grad.item() == pytest.approx(-0.5 * sigmoid(-1.0), rel=1e-12)
    assert pr.grad.item() == pytest.approx(0.5 * sigmoid(-1.0), rel=1e-12)


def test_label_smoothing_is_conservative_dpo():
    pc, pr, rc, rr = pair([-1.0], [-3.0], [-2.0], [-2.0])
    loss, _ = preference_optimization_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    expected = 0.9 * math.log1p(math.exp(-1.0)) + 0.1 * math.log1p(math.exp(1.0))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_ipo_is_the_squared_distance_of_the_margin_to_one_over_two_beta():
    pc, pr, rc, rr = pair([-1.0, 0.0], [-3.0, 0.0], [-2.0, 0.0], [-2.0, 0.0])  # margins 2 and 0
    loss, _ = preference_optimization_loss(pc, pr, rc, rr, beta=0.5, loss="ipo")
    assert loss.item() == pytest.approx(((2 - 1) ** 2 + (0 - 1) ** 2) / 2, rel=1e-12)
    loss.backward()
    assert pc.grad.tolist() == pytest.approx([2 * (2 - 1) / 2, 2 * (0 - 1) / 2])  # at h = 1/(2β) it is still


def test_at_the_reference_every_loss_is_its_value_at_zero_margin():
    logps = torch.randn(4, dtype=torch.float64)
    dpo, figures = preference_optimization_loss(logps, logps - 1, logps, logps - 1, beta=0.3)
    assert dpo.item() == pytest.approx(math.log(2), rel=1e-12) and figures["reward_accuracy"] == 0.0


def test_float32_matches_a_float64_reference_and_huge_margins_stay_finite():
    torch.manual_seed(0)
    logps = [torch.randn(64, dtype=torch.float64) * 20 for _ in range(4)]
    loss32, _ = preference_optimization_loss(*[x.float() for x in logps], beta=0.1, label_smoothing=0.2)
    h = (logps[0] - logps[2]) - (logps[1] - logps[3])
    naive = -(0.8 * torch.log(torch.sigmoid(0.1 * h)) + 0.2 * torch.log(torch.sigmoid(-0.1 * h))).mean()
    assert loss32.item() == pytest.approx(naive.item(), rel=1e-5)
    huge, _ = preference_optimization_loss(torch.tensor([-5000.0]), torch.tensor([0.0]), torch.zeros(1),
                                           torch.zeros(1), beta=1.0)
    assert math.isfinite(huge.item()) and huge.item() == pytest.approx(5000.0)


def test_an_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown preference loss 'hinge'"):
        preference_optimization_loss(*[torch.zeros(1)] * 4, beta=0.1, loss="hinge")


def test_response_logprob_sums_count_response_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    ids = torch.tensor([[1, 2, 3, 4, 0], [5, 6, 1, 0, 0]])
    response = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]])  # row 0: tokens 3, 4; row 1: tokens 6, 1
    logp = torch.log_softmax(logits, -1)
    expected = torch.stack([logp[0, 1, 3] + logp[0, 2, 4], logp[1, 0, 6] + logp[1, 1, 1]])
    torch.testing.assert_close(response_logprob_sums(logits, ids, response), expected)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_a_policy_trained_on_pairs_moves_probability_from_rejected_to_chosen(loss):
    """One-token responses from a categorical policy over 6 tokens: chosen 1 over rejected 4."""
    torch.manual_seed(0)
    reference = torch.log_softmax(torch.randn(6, dtype=torch.float64), -1)
    theta = reference.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([theta], lr=0.2)
    for _ in range(100):
        logp = torch.log_softmax(theta, -1)
        value, _ = preference_optimization_loss(logp[[1]], logp[[4]], reference[[1]], reference[[4]], beta=0.5,
                                                loss=loss)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    moved = torch.log_softmax(theta, -1).detach() - reference
    assert moved[1] > 0.3 and moved[4] < -0.3
    if loss == "ipo":   # IPO stops at margin 1/(2β) = 1 instead of pushing on
        assert (moved[1] - moved[4]).item() == pytest.approx(1.0, abs=1e-3)


def test_the_chosen_answers_nll_is_added_per_token_with_its_weight():
    pc, pr, rc, rr = pair([-2.0, -6.0], [-3.0, -7.0], [-2.0, -6.0], [-3.0, -7.0])     # at the reference
    tokens = torch.tensor([4.0, 4.0], dtype=torch.float64)
    loss, figures = preference_optimization_loss(pc, pr, rc, rr, beta=0.1, sft_weight=0.5, chosen_tokens=tokens)
    assert figures["chosen_nll"] == pytest.approx(8 / 8) and figures["preference_loss"] == pytest.approx(math.log(2))
    assert loss.item() == pytest.approx(math.log(2) + 0.5 * 1.0, rel=1e-12)
    loss.backward()
    # The NLL's gradient raises both chosen answers (weight / total tokens each), on top of the DPO push.
    assert pc.grad.tolist() == pytest.approx([-0.1 * 0.5 / 2 - 0.5 / 8] * 2)
    with pytest.raises(ValueError, match="sft_weight needs chosen_tokens"):
        preference_optimization_loss(pc, pr, rc, rr, beta=0.1, sft_weight=0.5)
