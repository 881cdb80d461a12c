"""LM-head losses computed in chunks of tokens, so that no (tokens x vocabulary) float32 tensor is
ever held: the per-token reverse KL between a student's and a teacher's next-token distributions
(on-policy distillation's token term, the paper's Eq. 5-6), and per-token log-probabilities.

Both take final hidden states (N, D) and an LM head (V, D) (+ bias), and recompute each chunk in
the backward: the scratch is ``chunk_size x V`` whatever N is.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .checks import check_float, check_int

__all__ = ["chunked_reverse_kl", "chunked_token_logps", "logits"]


def logits(h: Tensor, w: Tensor, b: Optional[Tensor], temperature: float) -> Tensor:
    z = torch.nn.functional.linear(h, w, b)
    z = z if z.dtype == torch.float64 else z.float()
    return z / temperature if temperature != 1.0 else z


class _ChunkedReverseKL(torch.autograd.Function):
    """KL(softmax(h_s W_s^T + b_s) || softmax(h_t W_t^T + b_t)) per row, chunk by chunk.

    Saves only its inputs; the backward recomputes each chunk's logits. Scratch: O(chunk x V).
    """

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, temperature, chunk_size):
        n = h_s.shape[0]
        work = torch.float64 if h_s.dtype == torch.float64 else torch.float32
        kl = torch.empty(n, dtype=work, device=h_s.device)
        with torch.no_grad():
            for start in range(0, n, chunk_size):
                sl = slice(start, min(start + chunk_size, n))
                lps = torch.log_softmax(logits(h_s[sl], w_s, b_s, temperature), dim=-1)
                lpt = torch.log_softmax(logits(h_t[sl], w_t, b_t, temperature), dim=-1)
                kl[sl] = (lps.exp() * (lps - lpt)).sum(-1)
                del lps, lpt
        ctx.save_for_backward(h_s, w_s, b_s, h_t, w_t, b_t, kl)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        h_s, w_s, b_s, h_t, w_t, b_t, kl = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(h_s) if need_h else None
        work = kl.dtype
        grad_w = torch.zeros(w_s.shape, dtype=work, device=w_s.device) if need_w else None
        grad_b = torch.zeros(b_s.shape, dtype=work, device=b_s.device) if need_b else None
        n = h_s.shape[0]
        grad_kl = grad_kl.to(work)
        w_s32 = w_s.to(work) if need_h else None
        with torch.no_grad():
            for start in range(0, n, chunk_size):
                sl = slice(start, min(start + chunk_size, n))
                lps = torch.log_softmax(logits(h_s[sl], w_s, b_s, temperature), dim=-1)
                lpt = torch.log_softmax(logits(h_t[sl], w_t, b_t, temperature), dim=-1)
                # d KL / d z_s = p_s * (log p_s - log p_t - KL), times 1/T for the temperature.
                gz = (lps - lpt).sub_(kl[sl, None])
                del lpt
                gz.mul_(lps.exp_()).mul_(grad_kl[sl, None] / temperature)
                del lps
                if need_h:
                    grad_h[sl] = (gz @ w_s32).to(h_s.dtype)
                if need_w:
                    grad_w.addmm_(gz.t(), h_s[sl].to(work))
                if need_b:
                    grad_b.add_(gz.sum(0))
                del gz
        if need_w:
            grad_w = grad_w.to(w_s.dtype)
        if need_b:
            grad_b = grad_b.to(b_s.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def chunked_reverse_kl(h_student: Tensor, w_student: Tensor, h_teacher: Tensor, w_teacher: Tensor, *,
                       b_student: Optional[Tensor] = None, b_teacher: Optional[Tensor] = None,
                       temperature: float = 1.0, chunk_size: int = 1024) -> Tensor:
    """Per-token reverse KL, ``KL(p_student || p_teacher)``, without a N x V tensor.

    Args:
        h_student: (N, Ds) the student's final hidden states at the N scored positions (the
            positions whose *next* token is a response token).
        w_student: (V, Ds) the student's LM head weight (b_student: (V,) bias or None).
        h_teacher: (N, Dt), w_teacher: (V, Dt), b_teacher: the teacher's; never get gradients.
        temperature: logits are divided by it (both models).
        chunk_size: rows per chunk; the forward and the backward each hold O(chunk_size x V)
            float32 scratch, plus the (V, Ds) float32 weight-gradient accumulator.

    Returns:
        (N,) float32 KL per row (float64 for float64 inputs), natural log. Gradients reach h_student, w_student, b_student.
    """
    if h_student.dim() != 2 or h_teacher.dim() != 2:
        raise ValueError(f"h_student and h_teacher must be (N, D), got {tuple(h_student.shape)} and "
                         f"{tuple(h_teacher.shape)}")
    if h_student.shape[0] != h_teacher.shape[0]:
        raise ValueError(f"h_teacher: N must match h_student's ({h_student.shape[0]}), got {h_teacher.shape[0]}")
    if w_student.shape[0] != w_teacher.shape[0]:
        raise ValueError(f"w_teacher: vocabulary size must match the student's ({w_student.shape[0]}), "
                         f"got {w_teacher.shape[0]}; slice both heads to the shared vocabulary")
    if w_student.shape[1] != h_student.shape[1] or w_teacher.shape[1] != h_teacher.shape[1]:
        raise ValueError("LM head weights must be (V, D) with D the hidden size of their hidden states")
    check_int("chunk_size", chunk_size, 1)
    check_float("temperature", temperature, "> 0")
    if h_student.shape[0] == 0:
        return h_student.new_zeros(0, dtype=torch.float32) + 0 * w_student.sum()
    h_teacher = h_teacher.detach().to(w_teacher.dtype)
    return _ChunkedReverseKL.apply(h_student, w_student, b_student, h_teacher, w_teacher.detach(),
                                   None if b_teacher is None else b_teacher.detach(),
                                   float(temperature), int(chunk_size))


def _token_logps_chunk(h: Tensor, w: Tensor, b: Optional[Tensor], targets: Tensor, temperature: float) -> Tensor:
    z = logits(h, w, b, temperature)
    return z.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(z, -1)


def chunked_token_logps(h: Tensor, w: Tensor, targets: Tensor, *, b: Optional[Tensor] = None,
                        temperature: float = 1.0, chunk_size: int = 1024) -> Tensor:
    """log p(target) per row (N,) float32 from hidden states (N, D) and an LM head (V, D), in chunks
    recomputed in the backward (``torch.utils.checkpoint``): scratch O(chunk_size x V)."""
    check_int("chunk_size", chunk_size, 1)
    check_float("temperature", temperature, "> 0")
    if h.dim() != 2 or w.dim() != 2 or w.shape[1] != h.shape[1]:
        raise ValueError(f"h (N, D) and w (V, D) must share D, got {tuple(h.shape)} and {tuple(w.shape)}")
    if tuple(targets.shape) != tuple(h.shape[:1]):
        raise ValueError(f"targets: expected (N,) = {tuple(h.shape[:1])}, got {tuple(targets.shape)}")
    parts = []
    for start in range(0, h.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
            parts.append(checkpoint(_token_logps_chunk, h[sl], w, b, targets[sl], temperature,
                                    use_reentrant=False))
        else:
            parts.append(_token_logps_chunk(h[sl], w, b, targets[sl], temperature))
    return torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
