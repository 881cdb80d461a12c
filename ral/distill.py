"""On-policy attention distillation (the paper's Eq. 5-6).

The student samples; the teacher scores the student's own tokens. The loss is

    L = lambda_rl · L_RL  +  mu · L_token  +  gamma_attn · L_attn

- ``L_RL``: any RL loss on the student's samples (GRPO, from :mod:`ral.losses`), or off.
- ``L_token``: per response token, the reverse KL ``KL(p_student || p_teacher)`` between the two
  next-token distributions, over the whole vocabulary. :func:`chunked_reverse_kl` computes it from
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

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "DistillConfig",
    "chunked_reverse_kl",
    "reverse_kl_full",
    "attention_distill_div",
    "masked_token_mean",
    "next_token_rows",
    "chunked_token_logps",
    "TeacherOutputs",
    "teacher_pass",
    "distill_loss",
    "backbone",
    "lm_head_params",
    "forward_hidden",
    "train_distill",
    "cmd_distill",
    "add_distill_arguments",
]

NORMS = ("token", "sequence", "sum")


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
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
        if not (isinstance(self.chunk_size, int) and self.chunk_size > 0):
            raise ValueError(f"chunk_size must be a positive int, got {self.chunk_size!r}")
        if not (self.temperature > 0):
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")

    @classmethod
    def kd(cls, **kw) -> "DistillConfig":
        """Token-level KD only (the attention term off)."""
        return cls(**{"gamma_attn": 0.0, **kw})

    @property
    def needs_teacher(self) -> bool:
        return self.mu > 0 or self.gamma_attn > 0


# ----------------------------------------------------------------------------------------------
# Token term: chunked reverse KL from hidden states and LM heads.
# ----------------------------------------------------------------------------------------------

def _logits(h: Tensor, w: Tensor, b: Optional[Tensor], temperature: float) -> Tensor:
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
                lps = torch.log_softmax(_logits(h_s[sl], w_s, b_s, temperature), dim=-1)
                lpt = torch.log_softmax(_logits(h_t[sl], w_t, b_t, temperature), dim=-1)
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
                lps = torch.log_softmax(_logits(h_s[sl], w_s, b_s, temperature), dim=-1)
                lpt = torch.log_softmax(_logits(h_t[sl], w_t, b_t, temperature), dim=-1)
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
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if h_student.shape[0] == 0:
        return h_student.new_zeros(0, dtype=torch.float32) + 0 * w_student.sum()
    h_teacher = h_teacher.detach().to(w_teacher.dtype)
    return _ChunkedReverseKL.apply(h_student, w_student, b_student, h_teacher, w_teacher.detach(),
                                   None if b_teacher is None else b_teacher.detach(),
                                   float(temperature), int(chunk_size))


def reverse_kl_full(h_student: Tensor, w_student: Tensor, h_teacher: Tensor, w_teacher: Tensor, *,
                    b_student: Optional[Tensor] = None, b_teacher: Optional[Tensor] = None,
                    temperature: float = 1.0) -> Tensor:
    """The same as :func:`chunked_reverse_kl`, materialised (N x V) under plain autograd: the oracle."""
    lps = torch.log_softmax(_logits(h_student, w_student, b_student, temperature), -1)
    with torch.no_grad():
        lpt = torch.log_softmax(_logits(h_teacher.to(w_teacher.dtype), w_teacher, b_teacher, temperature), -1)
    return (lps.exp() * (lps - lpt)).sum(-1)


# ----------------------------------------------------------------------------------------------
# Attention term and reductions.
# ----------------------------------------------------------------------------------------------

def attention_distill_div(q: Tensor, k: Tensor, v: Optional[Tensor] = None, *, q_teacher: Tensor,
                          k_teacher: Tensor, teacher_stats: Optional[Tensor] = None,
                          key_padding_mask: Optional[Tensor] = None, row_mask: Optional[Tensor] = None,
                          backend: str = "auto"):
    """JSD(student attention || teacher attention) per row: ``ral.ops.attention_kl`` with the teacher
    as the reference, heads="mean" (teacher and student head counts / dims may differ), self dropped.

    Returns the op's AttentionKL(out, div (B, Sq), stats).
    """
    from .ops import attention_kl
    return attention_kl(q, k, v, q_ref=q_teacher, k_ref=k_teacher, ref_stats=teacher_stats,
                        divergence="jsd", heads="mean", exclude_self=True, causal=True,
                        key_padding_mask=key_padding_mask, row_mask=row_mask, backend=backend)


def masked_token_mean(values: Tensor, mask: Tensor, norm: str = "token") -> Tensor:
    """Reduce per-token values (B, T) over mask (B, T): "token" mean over all masked tokens,
    "sequence" mean per row then over rows that have tokens, "sum" plain sum."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    mask = mask.to(values.dtype)
    total = (values * mask)
    if norm == "sum":
        return total.sum()
    if norm == "token":
        return total.sum() / mask.sum().clamp(min=1.0)
    per_row = total.sum(-1) / mask.sum(-1).clamp(min=1.0)
    has = (mask.sum(-1) > 0).to(values.dtype)
    return (per_row * has).sum() / has.sum().clamp(min=1.0)


def next_token_rows(hidden: Tensor, response_mask: Tensor) -> Tensor:
    """The hidden states (N, D) that predict the response tokens: position t-1 for every t with
    response_mask[:, t] True (row-major order, the same order as ``response_mask[:, 1:][m]``)."""
    pred = response_mask[:, 1:].to(torch.bool)
    return hidden[:, :-1][pred]


# ----------------------------------------------------------------------------------------------
# Model-level glue: teacher pass, student loss.
# ----------------------------------------------------------------------------------------------

def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder backbone of a transformers causal LM (returns ``last_hidden_state``, post-norm)."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ValueError("model: expected a transformers *ForCausalLM / *ForConditionalGeneration with a "
                         "separate backbone (model.base_model) and LM head (get_output_embeddings())")
    return base


def _lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers LM of a wrapper that holds it as ``.lm`` (e.g. the grounding task's TinyVLM)."""
    return getattr(model, "lm", model)


def forward_hidden(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, **model_kwargs) -> Tensor:
    """Final (post-norm) hidden states (B, S, D) without the LM head. Wrappers with ``.lm`` and
    ``.embed(input_ids, **model_kwargs)`` (TinyVLM) feed ``inputs_embeds``; others take input_ids."""
    if hasattr(model, "lm") and hasattr(model, "embed"):
        embeds = model.embed(input_ids, **model_kwargs)
        return backbone(model.lm)(inputs_embeds=embeds, attention_mask=attention_mask,
                                  use_cache=False).last_hidden_state
    return backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                           **model_kwargs).last_hidden_state


def lm_head_params(model: torch.nn.Module) -> tuple[Tensor, Optional[Tensor]]:
    head = _lm(model).get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def _token_logps_chunk(h: Tensor, w: Tensor, b: Optional[Tensor], targets: Tensor, temperature: float) -> Tensor:
    z = _logits(h, w, b, temperature)
    return z.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(z, -1)


def chunked_token_logps(h: Tensor, w: Tensor, targets: Tensor, *, b: Optional[Tensor] = None,
                        temperature: float = 1.0, chunk_size: int = 1024) -> Tensor:
    """log p(target) per row (N,) float32 from hidden states (N, D) and an LM head (V, D), in chunks
    recomputed in the backward (``torch.utils.checkpoint``): scratch O(chunk_size x V)."""
    from torch.utils.checkpoint import checkpoint
    parts = []
    for start in range(0, h.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
            parts.append(checkpoint(_token_logps_chunk, h[sl], w, b, targets[sl], temperature,
                                    use_reentrant=False))
        else:
            parts.append(_token_logps_chunk(h[sl], w, b, targets[sl], temperature))
    return torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)


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
    ctx = teacher_policy.record(attention_mask=attention_mask) if cfg.gamma_attn > 0 else _null()
    with ctx as rec:
        hidden = forward_hidden(teacher, input_ids, attention_mask, **model_kwargs)
    rows = next_token_rows(hidden, response_mask) if cfg.mu > 0 else None
    return TeacherOutputs(hidden=rows, reference=rec.reference if cfg.gamma_attn > 0 else None)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


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
           if cfg.gamma_attn > 0 else _null())
    with ctx as cmp:
        hidden = forward_hidden(student, input_ids, attention_mask, **model_kwargs)
    pred = response_mask[:, 1:]
    rows = hidden[:, :-1][pred]
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


# ----------------------------------------------------------------------------------------------
# On-policy distillation loop on an embedded task, and the CLI hook (`ral train --method distill|kd`).
# ----------------------------------------------------------------------------------------------

def train_distill(student: torch.nn.Module, teacher: torch.nn.Module, task, cfg: DistillConfig, *,
                  steps: int = 100, prompts_per_step: int = 16, group_size: int = 4, lr: float = 3e-4,
                  seed: int = 0, temperature: float = 1.0, eval_prompts: int = 512, eval_every: int = 10,
                  out_dir: Optional[str] = None, backend: str = "auto", progress: bool = False) -> list:
    """On-policy distillation on ``task``: each step the student samples ``prompts_per_step x
    group_size`` responses, the teacher scores them (:func:`teacher_pass`), and the student takes
    one AdamW step on :func:`distill_loss`. The RL term (``cfg.lambda_rl``) is GRPO on the task
    reward with group advantages (on-policy, one update per rollout: ratio 1, no clipping).
    Metrics (JSONL in ``out_dir/metrics.jsonl`` when given): reward, accuracy, token_kl, attn_jsd,
    and every ``eval_every`` steps the greedy ``eval_accuracy`` on ``eval_prompts`` fixed prompts.
    """
    import json
    import os
    import time
    from .integrations.transformers import AttentionPolicy
    from .losses import group_advantages
    from .trainer import completion_mask, evaluate, sample_completions

    teacher.eval().requires_grad_(False)
    s_policy = AttentionPolicy(_lm(student), backend=backend) if cfg.gamma_attn > 0 else None
    t_policy = AttentionPolicy(_lm(teacher), backend=backend) if cfg.gamma_attn > 0 else None
    head_t = lm_head_params(teacher)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr)
    history = []
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    log = open(os.path.join(out_dir, "metrics.jsonl"), "w") if out_dir else None
    try:
        for step in range(steps + 1):
            row = {"step": step}
            if eval_prompts and (step % eval_every == 0 or step == steps):
                ev = evaluate(student, task, eval_prompts)
                row.update({f"eval_{k}": v for k, v in ev.items()})
            if step == steps:
                history.append(row)
                break
            t0 = time.time()
            gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
            prompts = task.sample(prompts_per_step, gen).repeat(group_size)
            torch.manual_seed(seed * 1_000_003 + step)
            comp = sample_completions(student, prompts, task, temperature)
            cmask = completion_mask(comp, task.eos_token_id)
            scores = task.reward(comp, prompts)
            ids = torch.cat([prompts.input_ids, comp], 1)
            mask = torch.cat([prompts.attention_mask, cmask.to(prompts.attention_mask.dtype)], 1)
            resp = torch.cat([torch.zeros_like(prompts.attention_mask, dtype=torch.bool), cmask], 1)
            extras = prompts.model_inputs()
            tout = teacher_pass(teacher, ids, mask, resp, cfg, teacher_policy=t_policy, **extras) \
                if cfg.needs_teacher else None
            rl_fn = None
            if cfg.lambda_rl > 0:
                adv = group_advantages(scores["reward"], group_size)
                pred = resp[:, 1:].float()

                def rl_fn(logps, adv=adv, pred=pred):      # on-policy GRPO: -A * logp, token mean per response
                    per_seq = (logps * pred).sum(-1) / pred.sum(-1).clamp(min=1.0)
                    return -(adv * per_seq).mean()
            student.train()
            loss, m = distill_loss(student, tout, ids, mask, resp, cfg, student_policy=s_policy,
                                   teacher_head=head_t, rl_loss_fn=rl_fn, **extras)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            row.update({k: float(v.float().mean()) for k, v in scores.items()})
            row.update({k: v for k, v in m.items() if v == v})
            row.update(loss=float(loss.detach()), time_s=time.time() - t0)
            history.append(row)
            if log:
                log.write(json.dumps(row) + "\n")
                log.flush()
        if log and history and history[-1]["step"] == steps:
            log.write(json.dumps(history[-1]) + "\n")
    finally:
        if log:
            log.close()
        for pol in (s_policy, t_policy):
            if pol is not None:
                pol.remove()
    return history


def add_distill_arguments(parser) -> None:
    """Options of ``ral train`` for ``--method distill|kd`` (add to the train sub-parser)."""
    parser.add_argument("--teacher", default=None, help="teacher checkpoint (.pt with 'model' and 'task' "
                        "config, e.g. an SFT checkpoint of a larger model); needed by --method distill|kd")
    parser.add_argument("--mu", type=float, default=1.0, help="distill/kd: weight of the token reverse KL")
    parser.add_argument("--gamma-attn", type=float, default=1.0, help="distill: weight of the attention JSD")
    parser.add_argument("--lambda-rl", type=float, default=0.0, help="distill/kd: weight of the GRPO term")
    parser.add_argument("--student-heads", type=int, default=None, help="distill/kd: student attention heads")
    parser.add_argument("--student-kv-heads", type=int, default=None)
    parser.add_argument("--kl-chunk", type=int, default=1024, help="tokens per chunk of the reverse KL")


def cmd_distill(args) -> int:
    """``ral train --method distill|kd --teacher CKPT``: on-policy (attention) distillation of the
    task's student model from a teacher checkpoint. ``kd`` is ``distill`` with ``gamma_attn = 0``.
    The student starts from the SFT checkpoint when ``--sft-checkpoint`` is given, else from scratch."""
    import dataclasses
    import json
    import os
    from .tasks import get_task
    if not args.teacher:
        raise SystemExit("--method distill|kd needs --teacher CKPT")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    state = torch.load(args.teacher, map_location="cpu", weights_only=False)
    task = get_task(args.task)
    teacher_task = type(task)(dataclasses.replace(task.cfg, **state["task"])) if "task" in state else task
    teacher = teacher_task.build_model()
    teacher.load_state_dict(state["model"])
    student_cfg = task.cfg
    if getattr(args, "student_heads", None):
        student_cfg = dataclasses.replace(student_cfg, heads=args.student_heads,
                                          kv_heads=args.student_kv_heads or args.student_heads)
    task = type(task)(student_cfg)
    torch.manual_seed(args.seed)
    student = task.build_model()
    if getattr(args, "sft_checkpoint", None):
        student.load_state_dict(torch.load(args.sft_checkpoint, map_location="cpu", weights_only=False)["model"])
    cfg = DistillConfig(lambda_rl=args.lambda_rl, mu=args.mu,
                        gamma_attn=0.0 if args.method == "kd" else args.gamma_attn, chunk_size=args.kl_chunk)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump({"method": args.method, "task": args.task, "teacher": args.teacher,
                   "student": dataclasses.asdict(student_cfg), "distill": dataclasses.asdict(cfg),
                   **{k: v for k, v in vars(args).items() if k != "func"}}, f, indent=1)
    history = train_distill(student, teacher, task, cfg, steps=args.steps, lr=args.lr, seed=args.seed,
                            temperature=args.temperature, eval_prompts=args.eval_prompts,
                            eval_every=args.eval_every, out_dir=args.out, backend=args.backend,
                            prompts_per_step=args.prompts_per_step, group_size=args.group_size)
    torch.save({"model": student.state_dict(), "task": dataclasses.asdict(student_cfg)},
               os.path.join(args.out, "student.pt"))
    print(json.dumps(history[-1]))
    return 0
