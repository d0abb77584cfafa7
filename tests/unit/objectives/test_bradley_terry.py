import math

import pytest
import torch

from pbkd_cli.objectives.bradley_terry import (bradley_terry_loss, pairwise_accuracy, rm_game_objective,
                                              within_group_accuracy)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_bt_loss_and_gradient_match_a_hand_computation():
    chosen = torch.tensor([2.0, 0.0, -1.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64, requires_grad=True)
    loss = bradley_terry_loss(chosen, rejected)
    margins = [2.0, -1.0, 0.0]
    assert loss.item() == pytest.approx(sum(math.log1p(math.exp(-m)) for m in margins) / 3, rel=1e-12)
    loss.backward()
    # d/dm of -log σ(m) is -σ(-m); each pair carries weight 1/N.
    expected = torch.tensor([-sigmoid(-m) / 3 for m in margins], dtype=torch.float64)
    torch.testing.assert_close(chosen.grad, expected)
    torch.testing.assert_close(rejected.grad, -expected)


def test_bt_loss_is_finite_for_huge_margins():
    chosen = torch.tensor([-1000.0, 1000.0], requires_grad=True)
    loss = bradley_terry_loss(chosen, torch.zeros(2))
    loss.backward()
    assert loss.item() == pytest.approx(500.0)  # (1000 + 0) / 2
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.5, 0.0]))


def test_pairwise_accuracy_counts_ties_as_wrong():
    accuracy = pairwise_accuracy(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 4.0]))
    assert accuracy.item() == pytest.approx(1 / 3)


def test_rm_game_objective_matches_the_lagrangian_by_hand():
    def t(*values):
        return torch.tensor(values, dtype=torch.float64, requires_grad=True)

    teacher, student, chosen, rejected = t(1.0, 3.0), t(0.0, -2.0, 1.0), t(1.0, 2.0), t(0.0, 3.0)
    beta, l2 = 0.5, 0.1
    loss, metrics = rm_game_objective(teacher, student, chosen, rejected, beta=beta, reward_l2=l2)

    gap = 2.0 - (-1.0 / 3.0)
    bt = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    sq_mean = (1 + 9 + 0 + 4 + 1 + 1 + 4 + 0 + 9) / 9
    objective = gap - beta * bt - l2 * sq_mean
    assert loss.item() == pytest.approx(-objective, rel=1e-12)
    assert metrics["gap"] == pytest.approx(gap)
    assert metrics["bt_loss"] == pytest.approx(bt)
    assert metrics["rm_accuracy"] == pytest.approx(0.5)
    assert metrics["reward_l2_term"] == pytest.approx(l2 * sq_mean)
    assert metrics["reward_sq_mean"] == pytest.approx(sq_mean)
    assert metrics["objective"] == pytest.approx(objective)
    assert all(isinstance(v, float) for v in metrics.values())

    loss.backward()
    l2_grad = lambda r: 2 * l2 * r.detach() / 9  # noqa: E731 - d(l2 · mean r²)/dr over 9 rewards
    torch.testing.assert_close(teacher.grad, -torch.full((2,), 0.5, dtype=torch.float64) + l2_grad(teacher))
    torch.testing.assert_close(student.grad, torch.full((3,), 1 / 3, dtype=torch.float64) + l2_grad(student))
    bt_weight = torch.tensor([sigmoid(-1.0), sigmoid(1.0)], dtype=torch.float64) / 2
    torch.testing.assert_close(chosen.grad, -beta * bt_weight + l2_grad(chosen))
    torch.testing.assert_close(rejected.grad, beta * bt_weight + l2_grad(rejected))


def test_descending_the_rm_loss_raises_teacher_rewards_and_lowers_student_rewards():
    teacher = torch.zeros(4, requires_grad=True)
    student = torch.zeros(4, requires_grad=True)
    pair = torch.zeros(2)
    loss, _ = rm_game_objective(teacher, student, pair, pair, beta=1.0)
    loss.backward()
    assert (teacher.grad < 0).all() and (student.grad > 0).all()


def test_within_group_accuracy_counts_right_over_wrong_pairs_inside_each_group():
    # Group 1: right samples 0 and 2, wrong 1 and 3 -> pairs (0,1) (0,3) (2,1) (2,3); group 2: no pair.
    rewards = torch.tensor([3.0, 1.0, 0.5, 0.5, 9.0, -9.0, 0.0, 1.0])
    correct = torch.tensor([True, False, True, False, True, True, True, True])
    # (0,1) win, (0,3) win, (2,1) loss, (2,3) tie -> (1 + 1 + 0 + 0.5) / 4
    assert within_group_accuracy(rewards, correct, 4) == pytest.approx(2.5 / 4)
    # A reward that is the label itself is perfect; its negation is always wrong.
    assert within_group_accuracy(correct.float(), correct, 4) == 1.0
    assert within_group_accuracy(-correct.float(), correct, 4) == 0.0
    # No group with both a right and a wrong answer: no figure rather than a made-up one.
    assert within_group_accuracy(rewards, torch.ones(8, dtype=torch.bool), 4) is None
    # Pairs across groups never count: group 1 all right, group 2 all wrong.
    assert within_group_accuracy(rewards, torch.tensor([True] * 4 + [False] * 4), 4) is None


def test_a_reward_scale_puts_the_fits_gradient_on_the_pairs_it_ranks_wrong():
    # The demo's likelihood RM at its start: 98.7% of its pairs ranked right, by mean log-probability
    # margins of a few hundredths. At scale 1 every pair sits near log 2 and gets almost the same push,
    # so nearly all of the fit's gradient goes to widening pairs already ranked right; at 30 the pairs
    # ranked wrong get most of it.
    margins = torch.cat([torch.full((987,), 0.03), torch.full((13,), -0.03)]).double()

    def share_on_wrong(scale: float) -> float:
        scaled = (scale * margins).requires_grad_()
        bradley_terry_loss(scaled, torch.zeros_like(scaled)).backward()
        push = scaled.grad.abs()
        return (push[987:].sum() / push.sum()).item()

    def by_hand(scale: float) -> float:  # |dL/dm| of a pair is sigmoid(-m) / N
        wrong, right = 13 * sigmoid(scale * 0.03), 987 * sigmoid(-scale * 0.03)
        return wrong / (wrong + right)

    for scale in (1.0, 30.0):
        assert share_on_wrong(scale) == pytest.approx(by_hand(scale), rel=1e-6)
    assert share_on_wrong(1.0) == pytest.approx(0.0134, abs=1e-4)  # ~ the 1.3% of pairs ranked wrong
    assert share_on_wrong(30.0) > 2.3 * share_on_wrong(1.0)
