"""On-policy attention distillation (the paper's Eq. 5-6): the loss on a transformers student.

The student samples; the teacher scores the student's own tokens. The loss is

    L = lambda_rl · L_RL  +  mu · L_token  +  gamma_attn · L_attn

- ``L_RL``: any RL loss on the student's samples (GRPO, from :mod:`ral.losses`), or off.
- ``L_token``: per response token, the reverse KL ``KL(p_student || p_teacher)`` between the two
  next-token distributions, over the whole vocabulary. :func:`ral.lm_head.chunked_reverse_kl` computes it from
  the two models' final hidden states and LM heads in chunks of tokens and recomputes each chunk in
  the backward, so neither the forward nor the backward ever holds a B x S x V (or N x V) float32
  tensor: the scratch is ``chunk_size x V`` whatever the sequence length.
- ``L_attn``: per response token, ``JSD(student attention || teacher attention)`` of the final
  layer, heads averaged (``heads="mean"``), self dropped and renormalised -- the same policy as
  RAL's Eq. 2, with the teacher's cached q/k as the reference. Teacher and student may have
  different head counts, kv-head counts and head dims; only the token sequence must match.

Any term is switched off by a zero weight; a zero-weight term costs nothing (no teacher pass is
needed when ``mu == gamma_attn == 0``; no record pass when ``gamma_attn == 0``).

Normalisation. Both distillation terms are averaged over the response tokens of the batch
(``norm="token"``, default: the weight does not depend on response length), or per response then
over responses (``"sequence"``), or summed (``"sum"``, the paper's literal ``sum_t``).

The building blocks here are model-agnostic (tensors in, tensors out); the model-level glue
(:func:`teacher_pass`, :func:`distill_loss`) uses :class:`ral.integrations.transformers.AttentionPolicy`
to capture post-rotary q/k, and is what ``ral train --method distill|kd`` and the TRL trainer call.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..checks import check_choice, check_float, check_int
from ..lm_head import chunked_reverse_kl, chunked_token_logps
from ..losses import NORMS, masked_token_mean
from .models import forward_hidden, lm_head_params, next_token_rows

__all__ = ["DistillConfig", "TeacherOutputs", "teacher_pass", "distill_loss"]

@dataclass
class DistillConfig:
    """Weights of the three terms; 0 switches a term off.

    lambda_rl: weight of the RL (GRPO) loss on the student's samples.
    mu: weight of the per-token reverse KL to the teacher's next-token distribution.
    gamma_attn: weight of the attention JSD to the teacher's final-layer attention.
    chunk_size: tokens per chunk of the reverse KL (scratch is chunk_size x V fp32).
    temperature: both models' logits are divided by it before the KL.
    norm: "token" | "sequence" | "sum" (see the module docstring).
    """

    lambda_rl: float = 1.0
    mu: float = 1.0
    gamma_attn: float = 1.0
    chunk_size: int = 1024
    temperature: float = 1.0
    norm: str = "token"

    def __post_init__(self):
        for name in ("lambda_rl", "mu", "gamma_attn"):
            check_float(name, getattr(self, name), ">= 0")
        check_int("chunk_size", self.chunk_size, 1)
        check_float("temperature", self.temperature, "> 0")
        check_choice("norm", self.norm, NORMS)

    @classmethod
    def kd(cls, **kw) -> "DistillConfig":
        """Token-level KD only (the attention term off)."""
        return cls(**{"gamma_attn": 0.0, **kw})

    @property
    def needs_teacher(self) -> bool:
        return self.mu > 0 or self.gamma_attn > 0


@dataclass
class TeacherOutputs:
    """What the student's loss needs from the teacher, recorded once per rollout under no_grad.

    hidden: (N, Dt) the teacher's final hidden states at the rows predicting the response tokens
        (``next_token_rows`` order), or None when mu == 0. O(N x Dt), never N x V.
    reference: the teacher's ``AttentionReference`` (post-rotary q/k + stats of its chosen layer),
        or None when gamma_attn == 0.
    """

    hidden: Optional[Tensor]
    reference: Optional[object]


@torch.no_grad()
def teacher_pass(teacher: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor,
                 cfg: DistillConfig, *, teacher_policy=None, **model_kwargs) -> TeacherOutputs:
    """Score the student's sampled sequences with the teacher: one forward of the teacher backbone.

    Args:
        teacher: a transformers causal LM (frozen).
        input_ids, attention_mask: (B, S) the student's prompt + response tokens and padding mask.
        response_mask: (B, S) bool, True on response tokens.
        teacher_policy: ``AttentionPolicy(teacher)`` (needed when cfg.gamma_attn > 0).
    """
    if cfg.gamma_attn > 0 and teacher_policy is None:
        raise ValueError("teacher_policy: an AttentionPolicy(teacher) is needed when gamma_attn > 0")
    ctx = teacher_policy.record(attention_mask=attention_mask) if cfg.gamma_attn > 0 else contextlib.nullcontext()
    with ctx as rec:
        hidden = forward_hidden(teacher, input_ids, attention_mask, **model_kwargs)
    rows = next_token_rows(hidden, response_mask) if cfg.mu > 0 else None
    return TeacherOutputs(hidden=rows, reference=rec.reference if cfg.gamma_attn > 0 else None)


def distill_loss(student: torch.nn.Module, teacher_out: Optional[TeacherOutputs], input_ids: Tensor,
                 attention_mask: Tensor, response_mask: Tensor, cfg: DistillConfig, *, student_policy=None,
                 teacher_head: Optional[tuple] = None, rl_loss_fn=None, **model_kwargs):
    """``lambda_rl · L_RL + mu · L_token + gamma_attn · L_attn`` with one student forward.

    Args:
        student: the transformers causal LM being trained.
        teacher_out: from :func:`teacher_pass` on the same (B, S) tokens (None if no teacher term).
        input_ids, attention_mask, response_mask: (B, S); response_mask True on response tokens.
        cfg: the term weights.
        student_policy: ``AttentionPolicy(student)`` (needed when gamma_attn > 0).
        teacher_head: (W_t, b_t), the teacher's LM head (needed when mu > 0).
        rl_loss_fn: ``f(logps) -> scalar``, where logps (B, S - 1) float32 are the student's
            log-probs of tokens 1..S-1 (0 off ``response_mask[:, 1:]``), differentiable; it closes
            over advantages / old log-probs (e.g. ``ral.losses``' GRPO loss). None: no RL term.

    Returns:
        (loss, metrics) with metrics {"loss_rl", "token_kl", "attn_jsd"} as floats (NaN if off).
    """
    need_rl = cfg.lambda_rl > 0 and rl_loss_fn is not None
    if (cfg.mu > 0 or cfg.gamma_attn > 0) and teacher_out is None:
        raise ValueError("teacher_out: needed when mu > 0 or gamma_attn > 0")
    if cfg.gamma_attn > 0 and student_policy is None:
        raise ValueError("student_policy: an AttentionPolicy(student) is needed when gamma_attn > 0")
    if cfg.mu > 0 and teacher_head is None:
        raise ValueError("teacher_head: the teacher's (lm_head.weight, lm_head.bias) is needed when mu > 0")
    response_mask = response_mask.to(torch.bool)
    ctx = (student_policy.compare(teacher_out.reference, row_mask=response_mask, attention_mask=attention_mask)
           if cfg.gamma_attn > 0 else contextlib.nullcontext())
    with ctx as cmp:
        hidden = forward_hidden(student, input_ids, attention_mask, **model_kwargs)
    pred = response_mask[:, 1:]
    rows = next_token_rows(hidden, response_mask)
    w_s, b_s = lm_head_params(student)
    loss = hidden.new_zeros((), dtype=torch.float32)
    metrics = {"loss_rl": float("nan"), "token_kl": float("nan"), "attn_jsd": float("nan")}
    if need_rl:
        targets = input_ids[:, 1:][pred]
        logps = chunked_token_logps(rows, w_s, targets, b=b_s, chunk_size=cfg.chunk_size)
        full = torch.zeros(pred.shape, dtype=logps.dtype, device=logps.device).masked_scatter(pred, logps)
        rl = rl_loss_fn(full)
        loss = loss + cfg.lambda_rl * rl
        metrics["loss_rl"] = float(rl.detach())
    if cfg.mu > 0:
        w_t, b_t = teacher_head
        kl = chunked_reverse_kl(rows, w_s, teacher_out.hidden, w_t, b_student=b_s, b_teacher=b_t,
                                temperature=cfg.temperature, chunk_size=cfg.chunk_size)
        full = torch.zeros(pred.shape, dtype=kl.dtype, device=kl.device).masked_scatter(pred, kl)
        token = masked_token_mean(full, pred, cfg.norm)
        loss = loss + cfg.mu * token
        metrics["token_kl"] = float(token.detach())
    if cfg.gamma_attn > 0:
        attn = masked_token_mean(cmp.div, response_mask, cfg.norm)
        loss = loss + cfg.gamma_attn * attn
        metrics["attn_jsd"] = float(attn.detach())
    return loss, metrics
