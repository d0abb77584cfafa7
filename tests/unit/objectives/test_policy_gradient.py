import math

import pytest
import torch

from pbkd_cli.objectives.policy_gradient import (clipped_policy_gradient_loss, group_advantages, kl_penalty,
                                                 sequence_logprobs, weigh_negative_advantages, widest_groups)

F64 = torch.float64


def test_group_advantages_subtract_the_group_mean():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    torch.testing.assert_close(group_advantages(rewards, 3), torch.tensor([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0]))


def test_leave_one_out_baseline_is_the_mean_of_the_other_samples():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    expected = torch.tensor([1 - 2.5, 2 - 2.0, 3 - 1.5, 0 - 3.0, 0 - 3.0, 6 - 0.0])
    advantages = group_advantages(rewards, 3, leave_one_out=True)
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(advantages, 1.5 * group_advantages(rewards, 3))  # k/(k-1) × mean-baseline


def test_group_scale_divides_by_the_population_std_of_the_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0], dtype=F64)
    advantages = group_advantages(rewards, 3, scale="group", eps=0.0)
    expected = torch.tensor([-1.0, 0.0, 1.0], dtype=F64) / math.sqrt(2 / 3)
    torch.testing.assert_close(advantages[:3], expected)
    torch.testing.assert_close(advantages[3:], torch.tensor([-2.0, -2.0, 4.0], dtype=F64) / math.sqrt(8.0))
    # One sample per prompt, or identical rewards: zero advantage, not NaN.
    assert torch.equal(group_advantages(torch.tensor([1.0, 5.0]), 1, scale="group"), torch.zeros(2))
    assert torch.equal(group_advantages(torch.ones(4), 2, scale="group"), torch.zeros(4))


def test_group_advantages_reject_bad_group_sizes():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4), 1, leave_one_out=True)


def test_sequence_logprobs_gathers_label_logprobs_and_zeroes_the_rest():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7, dtype=F64, requires_grad=True)
    labels = torch.tensor([[3, 1, -100, -100], [-100, 6, 0, 2]])  # -100 off the mask must not break gather
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    out = sequence_logprobs(logits, labels, mask)
    for b in range(2):
        for t in range(4):
            expected = torch.log_softmax(logits[b, t], -1)[labels[b, t]].item() if mask[b, t] else 0.0
            assert out[b, t].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)

    out.sum().backward()
    probs = torch.softmax(logits.detach(), -1)
    expected_grad = torch.zeros_like(probs)
    for b, t in mask.nonzero().tolist():
        expected_grad[b, t] = -probs[b, t]
        expected_grad[b, t, labels[b, t]] += 1.0
    torch.testing.assert_close(logits.grad, expected_grad)


def test_sequence_logprobs_upcasts_half_precision():
    logits = torch.randn(1, 3, 11).to(torch.bfloat16)
    out = sequence_logprobs(logits, torch.tensor([[1, 2, 3]]), torch.ones(1, 3))
    assert out.dtype == torch.float32
    expected = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor([[[1], [2], [3]]])).squeeze(-1)
    torch.testing.assert_close(out, expected)


def clip_case():
    ratios = torch.tensor([[1.5, 0.7, 1.1], [0.5, 1.05, 3.0]], dtype=F64)
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -0.1, -1.0]], dtype=F64)
    logprobs = (old + ratios.log()).requires_grad_()
    advantages = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return ratios, old, logprobs, advantages, mask


def test_clipped_surrogate_matches_a_hand_computation():
    ratios, old, logprobs, advantages, mask = clip_case()
    loss, metrics = clipped_policy_gradient_loss(logprobs, old, advantages, mask, clip_eps=0.2)
    # Per valid token min(ρA, clip(ρ)A): 1.2 (clipped), 0.7, 1.1 | -1.6 (clipped), -2.1; the 3.0 is masked.
    # ρ = 0.7 lies outside [0.8, 1.2], but with A > 0 the unclipped term is the smaller: no clipping.
    assert loss.item() == pytest.approx(-(1.2 + 0.7 + 1.1 - 1.6 - 2.1) / 5, rel=1e-12)
    assert metrics["clip_fraction"] == pytest.approx(2 / 5)
    assert metrics["ratio_mean"] == pytest.approx((1.5 + 0.7 + 1.1 + 0.5 + 1.05) / 5)
    valid_ratios = [1.5, 0.7, 1.1, 0.5, 1.05]
    assert metrics["approx_kl"] == pytest.approx(-sum(math.log(r) for r in valid_ratios) / 5)

    loss.backward()
    # Where the unclipped branch is active, d/d lp of -(ρA)/N is -ρA/N; clipped and masked tokens get 0.
    expected = torch.tensor([[0.0, -0.7 / 5, -1.1 / 5], [0.0, 2 * 1.05 / 5, 0.0]], dtype=F64)
    torch.testing.assert_close(logprobs.grad, expected)
    assert advantages.grad is None  # advantages are constants of the surrogate


def test_on_policy_clipped_loss_is_the_reinforce_gradient():
    torch.manual_seed(1)
    old = torch.randn(3, 5, dtype=F64)
    logprobs = old.clone().requires_grad_()
    advantages = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    mask = torch.ones(3, 5)
    loss, metrics = clipped_policy_gradient_loss(logprobs, old, advantages, mask, clip_eps=0.1)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, -advantages[:, None].expand(3, 5) / 15)
    assert metrics["clip_fraction"] == 0.0 and metrics["approx_kl"] == 0.0 and metrics["ratio_mean"] == 1.0


def test_kl_penalty_estimators_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -5.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0]])
    assert kl_penalty(logprobs, ref, mask, kind="k1").item() == pytest.approx((0.5 - 1.0) / 2)
    k3 = [math.exp(d) - d - 1 for d in (-0.5, 1.0)]
    assert kl_penalty(logprobs, ref, mask, kind="k3").item() == pytest.approx(sum(k3) / 2)
    with pytest.raises(ValueError):
        kl_penalty(logprobs, ref, mask, kind="k2")


def test_kl_estimators_average_to_the_exact_kl_on_exact_sample_frequencies():
    policy = torch.tensor([0.5, 0.25, 0.25], dtype=F64)
    reference = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    exact = (policy * (policy / reference).log()).sum()
    samples = torch.tensor([[0, 0, 1, 2]])  # token frequencies equal to the policy's probabilities
    lp, ref_lp = policy.log()[samples], reference.log()[samples]
    mask = torch.ones(1, 4)
    for kind in ("k1", "k3"):
        torch.testing.assert_close(kl_penalty(lp, ref_lp, mask, kind=kind), exact)
    assert kl_penalty(ref_lp, lp, mask, kind="k3") >= 0  # k3 never goes negative


def test_batch_scale_divides_by_the_std_of_all_advantages():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0], dtype=F64)
    centred = torch.tensor([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0], dtype=F64)
    advantages = group_advantages(rewards, 3, scale="batch", eps=0.0)
    torch.testing.assert_close(advantages, centred / centred.std(correction=0))
    # Scale-free: the same advantages for the rewards times 100 plus any offset.
    torch.testing.assert_close(group_advantages(100 * rewards + 7, 3, scale="batch", eps=0.0), advantages)
    # A decisive group keeps more weight than a near-tie one (unlike scale="group").
    near_tie = group_advantages(torch.tensor([0.0, 0.01, 0.0, 1.0]), 2, scale="batch")
    assert near_tie[3].abs() > 10 * near_tie[1].abs()
    with pytest.raises(ValueError):
        group_advantages(rewards, 3, scale="sequence")


def test_negative_advantages_are_weighed_and_positive_ones_kept():
    advantages = torch.tensor([1.5, -2.0, 0.0, -0.5])
    torch.testing.assert_close(weigh_negative_advantages(advantages, 0.0), torch.tensor([1.5, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(weigh_negative_advantages(advantages, 0.5), torch.tensor([1.5, -1.0, 0.0, -0.25]))
    assert torch.equal(weigh_negative_advantages(advantages, 1.0), advantages)
    with pytest.raises(ValueError):
        weigh_negative_advantages(advantages, -1.0)


def test_widest_groups_keep_mixed_groups_of_a_binary_reward_first_in_their_order():
    # Groups of 2: [1,1] [0,1] [0,0] [1,0] [0,1]; the three mixed ones come first, ties by position.
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    assert widest_groups(rewards, 2, 2) == [1, 3]
    assert widest_groups(rewards, 2, 3) == [1, 3, 4]
    # More than the mixed ones: uniform groups fill up, the earlier first.
    assert widest_groups(rewards, 2, 4) == [0, 1, 3, 4]


def test_widest_groups_rank_a_continuous_reward_by_its_population_std():
    rewards = torch.tensor([0.0, 0.1, 0.2, -3.0, 0.0, 3.0, 1.0, 1.0, 1.0, 0.0, 1.0, 2.0])
    # Population stds: 0.082, 2.449, 0, 0.816.
    assert widest_groups(rewards, 3, 2) == [1, 3]
    assert widest_groups(rewards, 3, 4) == [0, 1, 2, 3]


def test_widest_groups_reject_what_cannot_be_kept():
    with pytest.raises(ValueError, match="groups of 3"):
        widest_groups(torch.zeros(4), 3, 1)
    with pytest.raises(ValueError, match="cannot keep 3 of 2"):
        widest_groups(torch.zeros(4), 2, 3)



def test_ineligible_groups_are_kept_only_after_every_eligible_one():
    rewards = torch.tensor([0.0, 5.0, 0.0, 1.0, 2.0, 2.0, 0.0, 0.5])  # spreads 2.5, 0.5, 0, 0.25
    eligible = torch.tensor([False, True, True, True])
    assert widest_groups(rewards, 2, 2, eligible) == [1, 3]
    assert widest_groups(rewards, 2, 4, eligible) == [0, 1, 2, 3]
    assert widest_groups(rewards, 2, 1) == [0]


def test_trusted_groups_leave_out_the_lowest_reference_rewards():
    from pbkd_cli.objectives.policy_gradient import trusted_groups

    reference = torch.tensor([0.3, -2.0, 0.1, -0.5, 0.9])
    assert trusted_groups(reference, 0.0).tolist() == [True] * 5
    # The 25% quantile of [-2, -0.5, 0.1, 0.3, 0.9] is -0.5 (linear): only -2.0 falls below it.
    assert trusted_groups(reference, 0.25).tolist() == [True, False, True, True, True]
    assert trusted_groups(reference, 0.5).tolist() == [True, False, True, False, True]
    with pytest.raises(ValueError, match="distrusted fraction 1.0"):
        trusted_groups(reference, 1.0)
