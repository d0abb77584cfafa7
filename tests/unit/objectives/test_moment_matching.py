import pytest
import torch

from pbkd_cli.objectives.bradley_terry import bradley_terry_loss
from pbkd_cli.objectives.moment_matching import (expected_q, implied_rewards, moment_gap, q_game_objective,
                                                 student_moment_matching_loss)

F64 = torch.float64
B, T, V = 3, 4, 5
MASK = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]])  # prompt, response, padding


def game(seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, V, generator=g, dtype=F64, requires_grad=True)
    teacher_probs = torch.softmax(torch.randn(B, T, V, generator=g, dtype=F64), -1)
    actions = torch.randint(0, V, (B, T), generator=g).masked_fill(MASK == 0, -100)  # padding ids off the mask
    return q, teacher_probs, actions


def loop_value(q, probs, b, h):
    return sum(probs[b, h, a] * q[b, h, a] for a in range(V))


def loop_gap(q, teacher_probs, actions):
    per_sequence = [sum(loop_value(q, teacher_probs, b, h) - q[b, h, actions[b, h]]
                        for h in range(T) if MASK[b, h]) for b in range(B)]
    return sum(per_sequence) / B


def loop_implied_rewards(q, teacher_probs, actions, gamma):
    rewards = []
    for b in range(B):
        total = 0.0
        for h in range(T):
            if not MASK[b, h]:
                continue
            next_value = loop_value(q, teacher_probs, b, h + 1) if h + 1 < T and MASK[b, h + 1] else 0.0
            total = total + q[b, h, actions[b, h]] - gamma * next_value
        rewards.append(total)
    return torch.stack(rewards)


def test_expected_q_is_the_probability_weighted_sum():
    q, teacher_probs, _ = game(0)
    expected = torch.stack([torch.stack([loop_value(q, teacher_probs, b, h) for h in range(T)]) for b in range(B)])
    torch.testing.assert_close(expected_q(q, teacher_probs), expected)


def test_moment_gap_matches_a_loop_in_value_and_gradient():
    q, teacher_probs, actions = game(1)
    gap = moment_gap(q, teacher_probs, actions, MASK)
    torch.testing.assert_close(gap, loop_gap(q, teacher_probs, actions))
    (grad,) = torch.autograd.grad(gap, q)
    # d gap / d Q(s_h, a) = (πE(a|s_h) − 1[a = a_h]) / B on valid positions, 0 elsewhere.
    expected = teacher_probs.clone()
    for b, h in MASK.nonzero().tolist():
        expected[b, h, actions[b, h]] -= 1.0
    torch.testing.assert_close(grad, expected * MASK[..., None] / B)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_implied_rewards_match_a_loop(gamma):
    q, teacher_probs, actions = game(2)
    torch.testing.assert_close(implied_rewards(q, teacher_probs, actions, MASK, gamma=gamma),
                               loop_implied_rewards(q, teacher_probs, actions, gamma))


def test_implied_rewards_telescope_to_first_value_plus_teacher_advantages():
    q, teacher_probs, actions = game(3)
    values = expected_q(q, teacher_probs)
    expected = []
    for b in range(B):
        valid = [h for h in range(T) if MASK[b, h]]
        advantages = sum(q[b, h, actions[b, h]] - values[b, h] for h in valid)
        expected.append(values[b, valid[0]] + advantages)
    torch.testing.assert_close(implied_rewards(q, teacher_probs, actions, MASK), torch.stack(expected))


def test_the_first_value_cancels_in_a_pair_that_shares_the_prompt():
    q, teacher_probs, actions = game(4)
    mask = torch.ones(2, T)
    pair_q, pair_probs, pair_actions = q[:2].detach().clone(), teacher_probs[:2].clone(), actions[1:3].clone()
    pair_actions[pair_actions < 0] = 0
    pair_q[1, 0], pair_probs[1, 0] = pair_q[0, 0], pair_probs[0, 0]  # same first state s_0
    margin = implied_rewards(pair_q, pair_probs, pair_actions, mask)
    values = expected_q(pair_q, pair_probs)
    taken = pair_q.gather(-1, pair_actions[..., None]).squeeze(-1)
    advantage_sums = (taken - values).sum(1)
    torch.testing.assert_close(margin[0] - margin[1], advantage_sums[0] - advantage_sums[1])


def test_q_game_objective_is_the_negated_lagrangian():
    q, teacher_probs, actions = game(5)
    pair_q, pair_probs, pair_actions = game(6)
    pair_rewards = implied_rewards(pair_q, pair_probs, pair_actions, MASK)
    chosen, rejected = pair_rewards[:2], pair_rewards[1:]
    beta = 0.7
    loss, metrics = q_game_objective(q, teacher_probs, actions, MASK, chosen, rejected, beta=beta)
    gap = loop_gap(q, teacher_probs, actions)
    bt = bradley_terry_loss(chosen, rejected)
    torch.testing.assert_close(loss, -(gap - beta * bt))
    assert metrics["moment_gap"] == pytest.approx(gap.item())
    assert metrics["bt_loss"] == pytest.approx(bt.item())
    assert metrics["objective"] == pytest.approx(-loss.item())
    assert metrics["q_accuracy"] == pytest.approx((chosen > rejected).double().mean().item())

    grad_q, grad_pair_q = torch.autograd.grad(loss, (q, pair_q))
    loop_rewards = loop_implied_rewards(pair_q, pair_probs, pair_actions, 1.0)
    loop_loss = -(loop_gap(q, teacher_probs, actions) - beta * bradley_terry_loss(loop_rewards[:2], loop_rewards[1:]))
    expected_q_grad, expected_pair_grad = torch.autograd.grad(loop_loss, (q, pair_q))
    torch.testing.assert_close(grad_q, expected_q_grad)
    torch.testing.assert_close(grad_pair_q, expected_pair_grad)
    # Descending the loss lowers Q of the student's own actions and raises it where the teacher puts mass.
    for b, h in MASK.nonzero().tolist():
        assert grad_q[b, h, actions[b, h]] > 0
        assert grad_q[b, h].sum().abs() < 1e-12  # Σ_a (1[a = a_h] − πE(a)) = 0


def test_q_game_penalty_is_the_mean_squared_moment_term():
    q, teacher_probs, actions = game(9)
    pair_rewards = implied_rewards(*game(10), MASK)
    chosen, rejected = pair_rewards[:2], pair_rewards[1:]
    plain, _ = q_game_objective(q, teacher_probs, actions, MASK, chosen, rejected, beta=0.5)
    penalised, metrics = q_game_objective(q, teacher_probs, actions, MASK, chosen, rejected, beta=0.5,
                                          reward_l2=0.3)
    terms = [loop_value(q, teacher_probs, b, h) - q[b, h, actions[b, h]] for b, h in MASK.nonzero().tolist()]
    mean_square = sum(t ** 2 for t in terms) / len(terms)
    torch.testing.assert_close(penalised, plain + 0.3 * mean_square)
    assert metrics["moment_l2"] == pytest.approx(mean_square.item())
    # The penalty pulls Q towards zero moment terms: scaling Q up raises it quadratically.
    big, _ = q_game_objective(10 * q, teacher_probs, actions, MASK, chosen, rejected, beta=0.0, reward_l2=1.0)
    small, _ = q_game_objective(q, teacher_probs, actions, MASK, chosen, rejected, beta=0.0, reward_l2=1.0)
    assert big > small


def test_q_game_with_student_probs_uses_the_expected_student_term():
    q, teacher_probs, actions = game(11)
    student_probs = torch.softmax(torch.randn(B, T, V, generator=torch.Generator().manual_seed(12), dtype=F64), -1)
    pair_rewards = implied_rewards(*game(13), MASK)
    loss, metrics = q_game_objective(q, teacher_probs, actions, MASK, pair_rewards[:2], pair_rewards[1:], beta=0.0,
                                     reward_l2=0.2, student_probs=student_probs)
    terms = [loop_value(q, teacher_probs, b, h) - loop_value(q, student_probs, b, h) for b, h in MASK.nonzero().tolist()]
    gap = sum(terms) / B
    torch.testing.assert_close(loss, -(gap - 0.2 * sum(t ** 2 for t in terms) / len(terms)))
    assert metrics["moment_gap"] == pytest.approx(gap.item())
    # With equal distributions there is no gap to open, whatever the sampled actions.
    same, _ = q_game_objective(q, teacher_probs, actions, MASK, pair_rewards[:2], pair_rewards[1:], beta=0.0,
                               student_probs=teacher_probs)
    assert same.abs() < 1e-12


def test_student_moment_matching_loss_matches_a_loop_and_leaves_q_alone():
    q, teacher_probs, _ = game(7)
    g = torch.Generator().manual_seed(8)
    student_logits = torch.randn(B, T, V, generator=g, dtype=F64, requires_grad=True)
    loss = student_moment_matching_loss(q, teacher_probs, student_logits, MASK)
    student_probs = torch.softmax(student_logits, -1)
    expected = sum(loop_value(q, teacher_probs, b, h) - loop_value(q, student_probs, b, h)
                   for b, h in MASK.nonzero().tolist()) / B
    torch.testing.assert_close(loss, expected)

    loss.backward()
    assert q.grad is None  # the student's move does not train Q
    # d loss / d logit_a = −π(a) (Q(a) − Σ_a' π(a') Q(a')) / B: mass moves toward above-average actions.
    probs = student_probs.detach()
    centred = q.detach() - expected_q(q.detach(), probs)[..., None]
    torch.testing.assert_close(student_logits.grad, -probs * centred * MASK[..., None] / B)


def test_a_student_step_raises_its_expected_q_and_shrinks_the_gap():
    q, teacher_probs, _ = game(9)
    student_logits = torch.zeros(B, T, V, dtype=F64, requires_grad=True)
    before = student_moment_matching_loss(q, teacher_probs, student_logits, MASK)
    before.backward()
    with torch.no_grad():
        stepped = student_logits - 0.5 * student_logits.grad
    after = student_moment_matching_loss(q, teacher_probs, stepped, MASK)
    assert after < before
    gain = (expected_q(q, torch.softmax(stepped, -1)) - expected_q(q, torch.softmax(student_logits, -1))).detach()
    assert torch.all(gain[MASK.bool()] > 0) and torch.all(gain[~MASK.bool()] == 0)
