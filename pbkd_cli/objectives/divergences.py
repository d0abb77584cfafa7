"""Token-level distillation divergences between teacher and student next-token distributions.

Every public function takes `student_logits` and `teacher_logits` (`[B, T, V]`, position t of both
predicting the same next token) and `mask` (`[B, T]`, 1 on response tokens), and returns the mean of
the per-position divergence over the positions with `mask == 1`. `p_T` is the teacher's distribution,
`q_S` the student's.

Temperature: both logits are divided by `temperature` before the softmax. The result is *not*
multiplied by T² (Hinton et al.'s factor, which only keeps gradient scales comparable when a soft loss
is mixed with a hard-label one); a caller that wants it multiplies the loss itself.

Memory: with `chunk_size` set, the valid positions are processed `chunk_size` at a time and each
chunk's log-softmaxes are recomputed in the backward pass, so for a 150k vocabulary over long
sequences only one chunk of full-vocabulary intermediates exists at a time (plus the gradient of the
logits, which autograd needs anyway). Logits are upcast to at least float32 chunk by chunk.
`distillation_loss_from_hidden` goes further (the fused-linear pattern of Liger Kernel's fused linear
JSD and torchtune's chunked KD loss): it takes both models' final hidden states and output-layer
weights and computes the logits a chunk at a time, so neither the logits nor their gradient is ever
whole: peak memory O(chunk_size x V) plus a weight-sized gradient.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
from torch.autograd.function import once_differentiable

# (student log-probs [n, V], teacher log-probs [n, V]) -> divergence per position [n]
TokenDivergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = Σ_v p(v) (log p(v) − log q(v)), per row."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _log_mixture(logp: torch.Tensor, logq: torch.Tensor, weight: float) -> torch.Tensor:
    """log(w·p + (1 − w)·q), in log space so that tiny probabilities do not underflow."""
    if weight == 0.0:
        return logq
    if weight == 1.0:
        return logp
    return torch.logaddexp(logp + math.log(weight), logq + math.log1p(-weight))


def _forward_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return _kl(teacher, student)


def _reverse_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return _kl(student, teacher)


def _jsd(student: torch.Tensor, teacher: torch.Tensor, beta: float) -> torch.Tensor:
    mixture = _log_mixture(teacher, student, beta)
    return beta * _kl(teacher, mixture) + (1.0 - beta) * _kl(student, mixture)


def _tvd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return 0.5 * (teacher.exp() - student.exp()).abs().sum(-1)


def _skew_forward_kl(student: torch.Tensor, teacher: torch.Tensor, alpha: float) -> torch.Tensor:
    return _kl(teacher, _log_mixture(teacher, student, alpha))


def _skew_reverse_kl(student: torch.Tensor, teacher: torch.Tensor, alpha: float) -> torch.Tensor:
    return _kl(student, _log_mixture(student, teacher, alpha))


def _from_logits(divergence: TokenDivergence, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    student = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    teacher = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    return divergence(student, teacher)


class _ChunkedSum(torch.autograd.Function):
    """Σ over the given positions of a per-position function of (student, teacher) logit rows.

    Forward keeps no intermediates; backward recomputes one chunk at a time and writes its gradient
    rows into the logits' gradient, so peak memory is one chunk's worth of full-vocabulary tensors.
    """

    @staticmethod
    def forward(ctx, per_position: TokenDivergence, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                rows: torch.Tensor, cols: torch.Tensor, chunk_size: int) -> torch.Tensor:
        ctx.per_position, ctx.chunk_size = per_position, chunk_size
        ctx.save_for_backward(student_logits, teacher_logits, rows, cols)
        total = None
        for start in range(0, rows.numel(), chunk_size):
            r, c = rows[start:start + chunk_size], cols[start:start + chunk_size]
            part = per_position(student_logits[r, c], teacher_logits[r, c]).sum()
            total = part if total is None else total + part
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: torch.Tensor):
        student_logits, teacher_logits, rows, cols = ctx.saved_tensors
        need_student, need_teacher = ctx.needs_input_grad[1:3]
        grad_student = torch.zeros_like(student_logits) if need_student else None
        grad_teacher = torch.zeros_like(teacher_logits) if need_teacher else None
        for start in range(0, rows.numel(), ctx.chunk_size):
            r, c = rows[start:start + ctx.chunk_size], cols[start:start + ctx.chunk_size]
            student = student_logits[r, c].detach().requires_grad_(need_student)
            teacher = teacher_logits[r, c].detach().requires_grad_(need_teacher)
            with torch.enable_grad():
                part = ctx.per_position(student, teacher).sum()
                inputs = [x for x in (student, teacher) if x.requires_grad]
                grads = iter(torch.autograd.grad(part, inputs, grad_total))
            if need_student:
                grad_student[r, c] = next(grads).to(grad_student.dtype)
            if need_teacher:
                grad_teacher[r, c] = next(grads).to(grad_teacher.dtype)
        return None, grad_student, grad_teacher, None, None, None


class _FusedLinearKD(torch.autograd.Function):
    """Σ over the given positions of `divergence + ce_weight * cross-entropy`, the student's and the
    teacher's logits (`hidden @ weight.T`) computed a chunk at a time; also returns the two sums apart.

    The gradients of the student's hidden states and weight are accumulated chunk by chunk during the
    forward pass (the loss is a scalar, so backward only scales them); no chunk's logits outlive it.
    """

    @staticmethod
    def forward(ctx, per_position: TokenDivergence, ce_weight: float, hidden: torch.Tensor, weight: torch.Tensor,
                teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor,
                cols: torch.Tensor, chunk_size: int):
        need_hidden, need_weight = ctx.needs_input_grad[2:4]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # Summed over the chunks in at least float32 (a bf16 sum of many chunks would lose the small ones).
        grad_weight = (torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
                       if need_weight else None)
        sums = torch.zeros(2, dtype=torch.float64, device=hidden.device)  # divergence, cross-entropy
        for start in range(0, rows.numel(), chunk_size):
            r, c = rows[start:start + chunk_size], cols[start:start + chunk_size]
            h = hidden[r, c]
            teacher_logits = teacher_hidden[r, c] @ teacher_weight.T
            with torch.enable_grad():
                logits = (h @ weight.T).requires_grad_(need_hidden or need_weight)
                divergence = per_position(logits, teacher_logits).sum()
                ce = torch.nn.functional.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)),
                                                       targets[r, c], reduction="sum")
                if need_hidden or need_weight:
                    (grad_logits,) = torch.autograd.grad(divergence + ce_weight * ce, [logits])
            # The chain rule through `h @ W.T` by hand, so that no weight-sized gradient is made per chunk.
            if need_hidden:
                grad_hidden[r, c] = (grad_logits @ weight).to(grad_hidden.dtype)
            if need_weight:
                grad_weight.addmm_(grad_logits.T.to(grad_weight.dtype), h.to(grad_weight.dtype))
            sums += torch.stack([divergence.detach(), ce.detach()]).double()
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        parts = sums.to(dtype)
        ctx.mark_non_differentiable(parts)
        return (sums[0] + ce_weight * sums[1]).to(dtype), parts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: torch.Tensor, _grad_parts):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = lambda grad: None if grad is None else grad * grad_total.to(grad.dtype)  # noqa: E731
        return None, None, scale(grad_hidden), scale(grad_weight), None, None, None, None, None, None


def _masked_token_mean(divergence: TokenDivergence, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       mask: torch.Tensor, temperature: float, chunk_size: int | None) -> torch.Tensor:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    # Indexing by (row, col) pairs rather than reshaping to [B·T, V] avoids copying non-contiguous
    # slices such as `logits[:, :-1]`.
    rows, cols = mask.bool().nonzero(as_tuple=True)
    per_position = partial(_from_logits, divergence, temperature=temperature)
    if chunk_size is None or rows.numel() <= chunk_size:
        total = per_position(student_logits[rows, cols], teacher_logits[rows, cols]).sum()
    else:
        total = _ChunkedSum.apply(per_position, student_logits, teacher_logits, rows, cols, chunk_size)
    return total / max(rows.numel(), 1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               temperature: float = 1.0, chunk_size: int | None = None) -> torch.Tensor:
    """Forward KL, `KL(p_T || q_S) = Σ_v p_T(v) (log p_T(v) − log q_S(v))` (mode-covering)."""
    return _masked_token_mean(_forward_kl, student_logits, teacher_logits, mask, temperature, chunk_size)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               temperature: float = 1.0, chunk_size: int | None = None) -> torch.Tensor:
    """Reverse KL, `KL(q_S || p_T) = Σ_v q_S(v) (log q_S(v) − log p_T(v))` (mode-seeking)."""
    return _masked_token_mean(_reverse_kl, student_logits, teacher_logits, mask, temperature, chunk_size)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    temperature: float = 1.0, chunk_size: int | None = None, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen–Shannon divergence of GKD (Agarwal et al., 2024, Eq. 1):

        M = β p_T + (1 − β) q_S
        JSD(β) = β KL(p_T || M) + (1 − β) KL(q_S || M)

    β = 0.5 is the usual JSD. The formula is used as written, so 0 ≤ JSD(β) ≤ H(β) =
    −β ln β − (1 − β) ln(1 − β) ≤ ln 2, and it vanishes at both ends: JSD(β)/β → KL(p_T || q_S) as
    β → 0 and JSD(β)/(1 − β) → KL(q_S || p_T) as β → 1. Because the endpoints would be a silent zero
    loss, β must lie in (0, 1); use `forward_kl` / `reverse_kl` for the endpoint behaviour (TRL's GKD
    trainer switches to those KLs at β = 0 and β = 1).
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must lie in (0, 1), got {beta}; use fkl / rkl for the endpoints")
    return _masked_token_mean(partial(_jsd, beta=beta), student_logits, teacher_logits, mask, temperature,
                              chunk_size)


def total_variation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    temperature: float = 1.0, chunk_size: int | None = None) -> torch.Tensor:
    """Total variation distance, `TVD = ½ Σ_v |p_T(v) − q_S(v)|`, in [0, 1]."""
    return _masked_token_mean(_tvd, student_logits, teacher_logits, mask, temperature, chunk_size)


def skew_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    temperature: float = 1.0, chunk_size: int | None = None, alpha: float = 0.1) -> torch.Tensor:
    """Skew KL of DistiLLM (Ko et al., 2024), `SKL(α) = KL(p_T || α p_T + (1 − α) q_S)`.

    α = 0 is the forward KL; the mixture keeps the divergence finite where q_S underflows.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return _masked_token_mean(partial(_skew_forward_kl, alpha=alpha), student_logits, teacher_logits, mask,
                              temperature, chunk_size)


def skew_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    temperature: float = 1.0, chunk_size: int | None = None, alpha: float = 0.1) -> torch.Tensor:
    """Skew reverse KL of DistiLLM, `SRKL(α) = KL(q_S || α q_S + (1 − α) p_T)`; α = 0 is the reverse KL."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return _masked_token_mean(partial(_skew_reverse_kl, alpha=alpha), student_logits, teacher_logits, mask,
                              temperature, chunk_size)


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "jsd": generalized_jsd,
    "tvd": total_variation,
    "skl": skew_forward_kl,
    "srkl": skew_reverse_kl,
}


def _token_divergence(name: str, beta: float = 0.5, alpha: float = 0.1) -> TokenDivergence:
    """The per-position divergence of `DIVERGENCES[name]` with its parameter, checked as there."""
    if name == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"beta must lie in (0, 1), got {beta}; use fkl / rkl for the endpoints")
    if name in ("skl", "srkl") and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    table = {"fkl": _forward_kl, "rkl": _reverse_kl, "jsd": partial(_jsd, beta=beta), "tvd": _tvd,
             "skl": partial(_skew_forward_kl, alpha=alpha), "srkl": partial(_skew_reverse_kl, alpha=alpha)}
    if name not in table:
        raise ValueError(f"unknown divergence {name!r}; expected one of {sorted(table)}")
    return table[name]


def distillation_loss_from_hidden(name: str, student_hidden: torch.Tensor, student_weight: torch.Tensor,
                                  teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, targets: torch.Tensor,
                                  mask: torch.Tensor, temperature: float = 1.0, chunk_size: int = 1024,
                                  ce_weight: float = 0.0, **kwargs: float) -> tuple[torch.Tensor, float, float]:
    """`distillation_loss(name, ...) + ce_weight * cross-entropy of targets` over the masked positions,
    with neither model's logits ever whole: from the final hidden states (`[B, T, d_S]`, `[B, T, d_T]`)
    and the output layers' weights (`[V, d_S]`, `[V, d_T]`, as `nn.Linear` holds them; both cut to the
    shared vocabulary), `chunk_size` masked positions at a time; the logits are `hidden @ weight.T`.
    `targets` (`[B, T]`) is the next token at each position. Gradients reach the student's hidden
    states and weight; the teacher's inputs are read only. Returns (loss, divergence, cross-entropy),
    the last two as token means, for logging."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student and teacher output layers cover {student_weight.shape[0]} and "
                         f"{teacher_weight.shape[0]} tokens; cut both to the shared vocabulary")
    rows, cols = mask.bool().nonzero(as_tuple=True)
    count = max(rows.numel(), 1)
    per_position = partial(_from_logits, _token_divergence(name, **kwargs), temperature=temperature)
    total, parts = _FusedLinearKD.apply(per_position, ce_weight, student_hidden, student_weight,
                                        teacher_hidden.detach(), teacher_weight.detach(), targets, rows, cols, chunk_size)
    return total / count, parts[0].item() / count, parts[1].item() / count


def distillation_loss(name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                      temperature: float = 1.0, chunk_size: int | None = None, **kwargs: float) -> torch.Tensor:
    """The divergence `DIVERGENCES[name]`; `kwargs` carries its own parameter (`beta` for jsd,
    `alpha` for skl/srkl)."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; expected one of {sorted(DIVERGENCES)}")
    return DIVERGENCES[name](student_logits, teacher_logits, mask, temperature=temperature,
                             chunk_size=chunk_size, **kwargs)
