"""Losses of GRPO + Reinforced Attention Learning.

Shapes: B completions (G per prompt), T completion tokens, ``mask`` (B, T) = 1 on real completion
tokens. The token-loss normalisations follow TRL's ``GRPOTrainer`` (``loss_type``):

- ``"grpo"``: mean over each completion's tokens, then mean over completions;
- ``"bnpo"``: sum over all tokens / number of real tokens in the batch;
- ``"dr_grpo"``: sum over all tokens / (B * max_completion_length) (Dr. GRPO, length-unbiased);
- ``"dapo"``: sum over all tokens / ``num_items`` (the token count of the whole global batch,
  when minibatches are accumulated; defaults to this batch's token count, i.e. bnpo).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .checks import check_choice, check_float, check_int

__all__ = ["group_advantages", "k3_kl", "grpo_token_loss", "attention_policy_loss", "attention_stats_token_loss",
           "attention_stats_loss", "reduce_tokens", "masked_token_mean", "GRPOLoss", "LOSS_TYPES", "NORMS"]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO advantages: (B,) rewards, B = prompts * group_size (groups contiguous) -> (B,).

    A = (r - mean_group(r)) / (std_group(r) + eps) with ``scale``, else r - mean (Dr. GRPO).
    std is the unbiased one (as in TRL).
    """
    check_int("group_size", group_size, 1)
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards: expected (B,) with B a multiple of group_size={group_size}, "
                         f"got {tuple(rewards.shape)}")
    grouped = rewards.float().view(-1, group_size)
    adv = grouped - grouped.mean(1, keepdim=True)
    if scale:
        std = grouped.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(adv[:, :1])
        adv = adv / (std + eps)
    return adv.reshape(-1)


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1, (B, T)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def reduce_tokens(per_token: Tensor, mask: Tensor, loss_type: str = "grpo",
                  max_completion_length: Optional[int] = None, num_items: Optional[float] = None) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar with one of ``LOSS_TYPES`` (see module doc)."""
    check_choice("loss_type", loss_type, LOSS_TYPES)
    if per_token.dim() != 2 or tuple(mask.shape) != tuple(per_token.shape):
        raise ValueError(f"mask: shape {tuple(mask.shape)} must equal the (B, T) per-token values' "
                         f"{tuple(per_token.shape)}")
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        length = max_completion_length if max_completion_length is not None else per_token.shape[-1]
        return masked.sum() / (per_token.shape[0] * length)
    denom = num_items if num_items is not None else mask.sum().clamp(min=1.0)
    return masked.sum() / denom


class GRPOLoss(NamedTuple):
    """loss (scalar), per_token (B, T) unreduced loss, kl (B, T) or None, clip_ratio (scalar)."""

    loss: Tensor
    per_token: Tensor
    kl: Optional[Tensor]
    clip_ratio: Tensor


def grpo_token_loss(logps: Tensor, old_logps: Optional[Tensor], advantages: Tensor, mask: Tensor, *,
                    ref_logps: Optional[Tensor] = None, beta: float = 0.0, epsilon_low: float = 0.2,
                    epsilon_high: Optional[float] = None, loss_type: str = "grpo",
                    max_completion_length: Optional[int] = None, num_items: Optional[float] = None
                    ) -> GRPOLoss:
    """The GRPO clipped-surrogate token loss (TRL's definition).

    Args:
        logps: (B, T) log-probs of the sampled tokens under the current policy (differentiable).
        old_logps: (B, T) under the rollout (old) policy; None = ``logps.detach()`` (ratio 1).
        advantages: (B,) per-completion advantages, or (B, T) per token.
        mask: (B, T) 1 on real completion tokens.
        ref_logps: (B, T) under the frozen reference model, for the k3 KL penalty ``beta * kl``.
        epsilon_low, epsilon_high: ratio clipped to [1 - epsilon_low, 1 + epsilon_high];
            epsilon_high defaults to epsilon_low.
        loss_type: "grpo", "bnpo", "dr_grpo" or "dapo" (module doc).

    per-token loss = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * k3(pi, ref),
    r = exp(logps - old_logps).
    """
    check_float("beta", beta, ">= 0")
    check_float("epsilon_low", epsilon_low, ">= 0")
    if epsilon_high is None:
        epsilon_high = epsilon_low
    check_float("epsilon_high", epsilon_high, ">= 0")
    if logps.dim() != 2:
        raise ValueError(f"logps: expected (B, T), got {tuple(logps.shape)}")
    for name, other in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if other is not None and tuple(other.shape) != tuple(logps.shape):
            raise ValueError(f"{name}: shape {tuple(other.shape)} must equal logps' (B, T) {tuple(logps.shape)}")
    if old_logps is None:
        old_logps = logps.detach()
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = _token_advantages(advantages, logps).to(logps.dtype)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("ref_logps: required when beta != 0")
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
    loss = reduce_tokens(per_token, mask, loss_type, max_completion_length, num_items)
    with torch.no_grad():
        m = mask.to(ratio.dtype)
        was_clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
        clip_ratio = (was_clipped.to(ratio.dtype) * m).sum() / m.sum().clamp(min=1.0)
    return GRPOLoss(loss, per_token, kl, clip_ratio)


def attention_policy_loss(div: Tensor, advantages: Optional[Tensor], response_mask: Tensor,
                          loss_type: str = "grpo", max_completion_length: Optional[int] = None,
                          num_items: Optional[float] = None) -> Tensor:
    """RAL's attention-policy loss (Eq. 3): sum_t A * D(pi_theta^t || pi_old^t), normalised.

    Args:
        div: (B, T) per-token divergence of the attention policy from the reference
            (``AttentionPolicy.compare(...).div``, restricted to the response tokens).
            A (B, S) div over the whole sequence is accepted and right-aligned to the mask's T.
        advantages: (B,) group-normalised advantages, or (B, T) per token (veRL's layout); None =
            no advantage weighting (1 per token: the on-policy attention-distillation term of Eq. 6).
        response_mask: (B, T) 1 on response tokens.
        loss_type: token normalisation, the same choices as the GRPO loss (module doc). The
            paper writes a plain sum over tokens; normalising the same way as L_RL keeps
            lambda_attn independent of response length and batch size.

    A > 0 gives positive weight to the divergence (pulls the attention towards the reference);
    A < 0 pushes it away (bounded by ln 2 per token with JSD).
    """
    if div.dim() != 2 or response_mask.dim() != 2 or div.shape[0] != response_mask.shape[0]:
        raise ValueError(f"div (B, S) and response_mask (B, T) must be 2-D with the same B, got "
                         f"{tuple(div.shape)} and {tuple(response_mask.shape)}")
    per_token = _right_aligned("div", div, response_mask.shape[-1]).float()
    if advantages is not None:
        per_token = per_token * _token_advantages(advantages, per_token).float()
    return reduce_tokens(per_token, response_mask, loss_type, max_completion_length, num_items)


def _token_advantages(advantages: Tensor, per_token: Tensor) -> Tensor:
    """(B,) per-completion or (B, T) per-token advantages -> (B, 1) or (B, T), to multiply the
    (B, T) ``per_token`` values; any other shape (a (B, 1) would broadcast to B x B x T) is refused."""
    if tuple(advantages.shape) == tuple(per_token.shape[:1]):
        return advantages[:, None]
    if tuple(advantages.shape) != tuple(per_token.shape):
        raise ValueError(f"advantages: expected (B,) = {tuple(per_token.shape[:1])} or (B, T) = "
                         f"{tuple(per_token.shape)}, got {tuple(advantages.shape)}")
    return advantages


def _right_aligned(name: str, values: Tensor, length: int) -> Tensor:
    """(B, S, ...) per-token values over a whole sequence -> their last ``length`` tokens (B, T, ...)."""
    if values.shape[1] < length:
        raise ValueError(f"{name}: length {values.shape[1]} < response_mask length {length}")
    return values[:, values.shape[1] - length:]


def attention_stats_token_loss(entropy: Optional[Tensor], mass: Optional[Tensor], length: int, *,
                               entropy_coef: float = 0.0, mass_coef: float = 0.0,
                               segments: Sequence[int] = (1, 2)) -> Tensor:
    """The per-token attention-statistics loss (B, T), float32 (float64 for float64 inputs): ``- entropy_coef * entropy -
    mass_coef * sum_{s in segments} mass[..., s]`` over the last ``length`` tokens.

    Args:
        entropy: (B, S) policy entropy per token (``Comparison.entropy``), or None when entropy_coef == 0.
        mass: (B, S, num_segments) per-segment attention mass (``Comparison.mass``), or None when
            mass_coef == 0.
        length: T, the response length; (B, S) inputs are right-aligned to it (S >= T).
        entropy_coef: > 0 is an entropy bonus (minimising the loss spreads the attention), < 0 sharpens it.
        mass_coef: > 0 rewards attention mass on ``segments`` (default 1, 2: image and video of
            ``VL_SEGMENTS``), i.e. penalises the mass that leaves them: the term equals
            ``mass_coef * (1 - mass_on_segments)`` up to a constant, so its gradient is the same.
        segments: segment ids (indices into mass's last dim) whose mass counts.
    """
    per_token = None
    for name, values, coef in (("entropy", entropy, entropy_coef), ("mass", mass, mass_coef)):
        if not coef:
            continue
        if not isinstance(values, Tensor):
            raise ValueError(f"{name}: required when {name}_coef != 0 (got None; compute the statistics, e.g. "
                             f"AttentionPolicy(stats=True))")
        if values.dim() != (2 if name == "entropy" else 3):
            raise ValueError(f"{name}: expected {'(B, S)' if name == 'entropy' else '(B, S, num_segments)'} "
                             f"(heads='mean'), got {tuple(values.shape)}")
        values = _right_aligned(name, values, length)
        values = values.to(torch.promote_types(values.dtype, torch.float32))
        if name == "mass":
            ids = list(segments)
            if not ids or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < values.shape[-1]
                              for i in ids):
                raise ValueError(f"segments: must be a non-empty sequence of segment ids in [0, "
                                 f"{values.shape[-1]}), got {segments!r}")
            values = values[..., ids].sum(-1)
        term = -float(coef) * values
        per_token = term if per_token is None else per_token + term
    if per_token is None:
        raise ValueError("entropy_coef, mass_coef: both are 0, the loss would be 0")
    return per_token


def attention_stats_loss(entropy: Optional[Tensor], mass: Optional[Tensor], response_mask: Tensor, *,
                         entropy_coef: float = 0.0, mass_coef: float = 0.0, segments: Sequence[int] = (1, 2),
                         loss_type: str = "grpo", max_completion_length: Optional[int] = None,
                         num_items: Optional[float] = None) -> Tensor:
    """A loss on where the policy looks: ``attention_stats_token_loss`` (per token ``-
    entropy_coef * entropy - mass_coef * mass[..., segments].sum(-1)``) reduced over
    ``response_mask`` (B, T) with ``loss_type`` as the GRPO loss (module doc). Not weighted by
    advantages: a regulariser, usable beside the RAL term (``attention_policy_loss``) or instead of it.

    Signs: minimising it raises the entropy for entropy_coef > 0 (a bonus) and the attention mass
    on ``segments`` for mass_coef > 0 (a penalty on attention that leaves the visual tokens).
    """
    per_token = attention_stats_token_loss(entropy, mass, response_mask.shape[-1], entropy_coef=entropy_coef,
                                           mass_coef=mass_coef, segments=segments)
    return reduce_tokens(per_token, response_mask, loss_type, max_completion_length, num_items)


NORMS = ("token", "sequence", "sum")


def masked_token_mean(values: Tensor, mask: Tensor, norm: str = "token") -> Tensor:
    """Reduce per-token values (B, T) over mask (B, T): "token" mean over all masked tokens (bnpo),
    "sequence" mean per row then over the rows that have tokens, "sum" plain sum."""
    check_choice("norm", norm, NORMS)
    if norm == "token":
        return reduce_tokens(values, mask, "bnpo")
    if norm == "sum":
        return reduce_tokens(values, mask, "dapo", num_items=1.0)
    has = mask.to(torch.bool).any(-1)
    if not bool(has.any()):
        return (values * 0).sum()
    return reduce_tokens(values[has], mask[has], "grpo")
