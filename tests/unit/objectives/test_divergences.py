import math

import pytest
import torch

from pbkd_cli.objectives.divergences import (DIVERGENCES, distillation_loss, distillation_loss_from_hidden, forward_kl,
                                             generalized_jsd, reverse_kl, skew_forward_kl, skew_reverse_kl,
                                             total_variation)

F64 = torch.float64
B, T, V = 3, 5, 7
MASK = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # 11 valid positions
PARAMS = {"fkl": {}, "rkl": {}, "jsd": {"beta": 0.3}, "tvd": {}, "skl": {"alpha": 0.2}, "srkl": {"alpha": 0.2}}


def reference(name: str, p: torch.Tensor, q: torch.Tensor, beta: float = 0.3, alpha: float = 0.2) -> torch.Tensor:
    """The divergence of one position, in plain probability space (p = teacher, q = student)."""
    def kl(a, b):
        return (a * (a / b).log()).sum()

    if name == "fkl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum()
    if name == "skl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if name == "srkl":
        return kl(q, alpha * q + (1 - alpha) * p)
    raise AssertionError(name)


def reference_loss(name, student_logits, teacher_logits, mask, temperature=1.0, **params):
    """Loop over the valid positions and average; float64 throughout."""
    terms = []
    for b, t in mask.nonzero().tolist():
        p = torch.softmax(teacher_logits[b, t] / temperature, -1)
        q = torch.softmax(student_logits[b, t] / temperature, -1)
        terms.append(reference(name, p, q, **params))
    return torch.stack(terms).mean()


def logits(seed: int, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(B, T, V, generator=g, dtype=F64)).requires_grad_()
    teacher = scale * torch.randn(B, T, V, generator=g, dtype=F64)
    return student, teacher


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_values_and_student_gradients_match_a_float64_reference(name, temperature):
    student, teacher = logits(0)
    loss = distillation_loss(name, student, teacher, MASK, temperature=temperature, **PARAMS[name])
    (grad,) = torch.autograd.grad(loss, student)
    ref_student = student.detach().clone().requires_grad_()
    expected = reference_loss(name, ref_student, teacher, MASK, temperature, **PARAMS[name])
    (expected_grad,) = torch.autograd.grad(expected, ref_student)
    assert loss.item() > 1e-3  # random logits: a real, non-trivial divergence
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 7])  # none divides the 11 valid positions
def test_chunked_equals_unchunked_in_value_and_gradients(name, chunk_size):
    student, teacher = logits(1)
    teacher.requires_grad_()
    full = distillation_loss(name, student, teacher, MASK, temperature=1.5, **PARAMS[name])
    full_grads = torch.autograd.grad(full, (student, teacher))
    chunked = distillation_loss(name, student, teacher, MASK, temperature=1.5, chunk_size=chunk_size,
                                **PARAMS[name])
    chunked_grads = torch.autograd.grad(chunked, (student, teacher))
    torch.testing.assert_close(chunked, full, rtol=1e-12, atol=1e-14)
    for a, b in zip(chunked_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", ["jsd", "skl"])
def test_chunked_backward_passes_gradcheck(name):
    g = torch.Generator().manual_seed(2)
    student = torch.randn(2, 3, 4, generator=g, dtype=F64, requires_grad=True)
    teacher = torch.randn(2, 3, 4, generator=g, dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.autograd.gradcheck(
        lambda s, t: distillation_loss(name, s, t, mask, chunk_size=2, **PARAMS[name]), (student, teacher))


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_masked_positions_contribute_nothing(name, chunk_size):
    student, teacher = logits(3)
    loss = distillation_loss(name, student, teacher, MASK, chunk_size=chunk_size, **PARAMS[name])
    (grad,) = torch.autograd.grad(loss, student)
    off = ~MASK.bool()
    garbage_student = student.detach().clone()
    garbage_teacher = teacher.clone()
    garbage_student[off] = 1e4 * torch.randn(int(off.sum()), V, dtype=F64)
    garbage_teacher[off] = -1e4 * torch.randn(int(off.sum()), V, dtype=F64)
    again = distillation_loss(name, garbage_student, garbage_teacher, MASK, chunk_size=chunk_size, **PARAMS[name])
    torch.testing.assert_close(again, loss.detach(), rtol=1e-12, atol=0.0)
    assert torch.all(grad[off] == 0) and torch.all(grad[~off].abs().sum(-1) > 0)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_every_divergence_is_zero_for_equal_logits(name):
    student, _ = logits(4)
    loss = distillation_loss(name, student, student.detach() + 3.0, MASK, **PARAMS[name])  # shift: same softmax
    assert abs(loss.item()) < 1e-14


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_is_bounded_by_the_entropy_of_beta(beta):
    bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)  # ln 2 at beta = 0.5
    student, teacher = logits(5, scale=3.0)
    value = generalized_jsd(student, teacher, MASK, beta=beta).item()
    assert 0.0 < value < bound
    # Disjoint supports reach the bound.
    far = torch.full((1, 1, V), -40.0, dtype=F64)
    near_teacher, near_student = far.clone(), far.clone()
    near_teacher[..., 0], near_student[..., 1] = 40.0, 40.0
    disjoint = generalized_jsd(near_student, near_teacher, torch.ones(1, 1), beta=beta).item()
    assert disjoint == pytest.approx(bound, rel=1e-9)


def test_jsd_limits_scale_to_forward_and_reverse_kl():
    student, teacher = logits(6)
    fkl, rkl = forward_kl(student, teacher, MASK), reverse_kl(student, teacher, MASK)
    small = 1e-6
    assert (generalized_jsd(student, teacher, MASK, beta=small) / small).item() == pytest.approx(fkl.item(), rel=1e-4)
    assert (generalized_jsd(student, teacher, MASK, beta=1 - small) / small).item() == pytest.approx(rkl.item(),
                                                                                                  rel=1e-4)
    for beta in (0.0, 1.0):
        with pytest.raises(ValueError):
            generalized_jsd(student, teacher, MASK, beta=beta)


def test_skew_kls_recover_plain_kls_at_alpha_zero_and_vanish_at_one():
    student, teacher = logits(7)
    fkl, rkl = forward_kl(student, teacher, MASK), reverse_kl(student, teacher, MASK)
    torch.testing.assert_close(skew_forward_kl(student, teacher, MASK, alpha=0.0), fkl)
    torch.testing.assert_close(skew_reverse_kl(student, teacher, MASK, alpha=0.0), rkl)
    torch.testing.assert_close(skew_forward_kl(student, teacher, MASK, alpha=1e-9), fkl, rtol=1e-6, atol=0.0)
    assert skew_forward_kl(student, teacher, MASK, alpha=1.0).item() == 0.0
    assert skew_reverse_kl(student, teacher, MASK, alpha=1.0).item() == 0.0
    # Skewing toward the target shrinks the divergence.
    assert skew_forward_kl(student, teacher, MASK, alpha=0.5) < skew_forward_kl(student, teacher, MASK, alpha=0.1) < fkl
    with pytest.raises(ValueError):
        skew_reverse_kl(student, teacher, MASK, alpha=1.5)


def test_tvd_lies_in_the_unit_interval_and_reaches_one_on_disjoint_supports():
    student, teacher = logits(8)
    assert 0.0 < total_variation(student, teacher, MASK).item() < 1.0
    a = torch.tensor([[[50.0, 0.0, 0.0]]], dtype=F64)
    b = torch.tensor([[[0.0, 50.0, 0.0]]], dtype=F64)
    assert total_variation(a, b, torch.ones(1, 1)).item() == pytest.approx(1.0, abs=1e-15)


def test_temperature_divides_both_logits_without_t_squared_scaling():
    student, teacher = logits(9)
    for name in ("fkl", "tvd"):
        hot = distillation_loss(name, student, teacher, MASK, temperature=4.0)
        torch.testing.assert_close(hot, distillation_loss(name, student / 4.0, teacher / 4.0, MASK))


def test_non_contiguous_slices_half_precision_and_empty_masks():
    student, teacher = logits(10)
    sliced = forward_kl(student[:, :-1], teacher[:, :-1], MASK[:, :-1], chunk_size=2)
    copied = forward_kl(student[:, :-1].contiguous(), teacher[:, :-1].contiguous(), MASK[:, :-1])
    torch.testing.assert_close(sliced, copied)

    half_student = student.detach().bfloat16().requires_grad_()
    half = reverse_kl(half_student, teacher.bfloat16(), MASK, chunk_size=4)
    exact = reverse_kl(student, teacher, MASK)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), exact.detach(), rtol=0.05, atol=0.0)
    (half_grad,), (exact_grad,) = torch.autograd.grad(half, half_student), torch.autograd.grad(exact, student)
    assert half_grad.dtype == torch.bfloat16
    torch.testing.assert_close(half_grad.double(), exact_grad, rtol=0.1, atol=2e-3)

    empty = forward_kl(student, teacher, torch.zeros(B, T), chunk_size=4)
    assert empty.item() == 0.0
    (grad,) = torch.autograd.grad(empty, student)
    assert torch.all(grad == 0)


def test_distillation_loss_dispatches_and_rejects_unknown_names():
    student, teacher = logits(11)
    torch.testing.assert_close(distillation_loss("jsd", student, teacher, MASK, beta=0.7),
                               generalized_jsd(student, teacher, MASK, beta=0.7))
    torch.testing.assert_close(distillation_loss("srkl", student, teacher, MASK, alpha=0.3),
                               skew_reverse_kl(student, teacher, MASK, alpha=0.3))
    assert set(DIVERGENCES) == {"fkl", "rkl", "jsd", "tvd", "skl", "srkl"}
    with pytest.raises(ValueError):
        distillation_loss("kl", student, teacher, MASK)


# -- from hidden states (the logits never whole) ------------------------------------------------

def hidden_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, 4, generator=g, dtype=F64).requires_grad_()
    weight = torch.randn(V, 4, generator=g, dtype=F64).requires_grad_()
    teacher_hidden, teacher_weight = torch.randn(B, T, 6, generator=g, dtype=F64), torch.randn(V, 6, generator=g, dtype=F64)
    targets = torch.randint(0, V, (B, T), generator=g)
    return hidden, weight, teacher_hidden, teacher_weight, targets


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_from_hidden_states_equals_the_float64_reference_in_value_and_gradients(name, chunk_size):
    hidden, weight, teacher_hidden, teacher_weight, targets = hidden_inputs(3)
    student_logits = hidden @ weight.T
    divergence = reference_loss(name, student_logits, teacher_hidden @ teacher_weight.T, MASK, temperature=1.5,
                                **PARAMS[name])
    log_probs = torch.log_softmax(student_logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ce = -(log_probs * MASK).sum() / MASK.sum()
    expected = divergence + 0.5 * ce
    want = torch.autograd.grad(expected, [hidden, weight])
    loss, divergence_value, ce_value = distillation_loss_from_hidden(
        name, hidden, weight, teacher_hidden, teacher_weight, targets, MASK, temperature=1.5, chunk_size=chunk_size,
        ce_weight=0.5, **PARAMS[name])
    got = torch.autograd.grad(loss, [hidden, weight])
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    assert divergence_value == pytest.approx(divergence.item(), abs=1e-12) and ce_value == pytest.approx(ce.item(), abs=1e-12)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-12)


def test_from_hidden_states_leaves_the_teacher_alone_and_checks_the_vocabularies():
    hidden, weight, teacher_hidden, teacher_weight, targets = hidden_inputs(4)
    teacher_weight.requires_grad_()
    loss, _, _ = distillation_loss_from_hidden("fkl", hidden, weight, teacher_hidden, teacher_weight, targets, MASK)
    loss.backward()
    assert teacher_weight.grad is None and weight.grad is not None
    with pytest.raises(ValueError, match="cover 7 and 6 tokens"):
        distillation_loss_from_hidden("fkl", hidden, weight, teacher_hidden, teacher_weight[:6], targets, MASK)
