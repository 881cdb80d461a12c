"""Attention diagnostics of the embedded tasks, from a recorded reference or captured (q, k): the
attention policy at one query row per sample, through ``ral.reference`` (O(B·H·S) memory)."""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from .. import reference as _ref

__all__ = ["attention_metrics", "policy_entropy", "row_policy"]


def row_policy(q: Tensor, k: Tensor, scale: float, rows: Union[int, Tensor],
               key_padding_mask: Optional[Tensor] = None, heads: str = "mean") -> Tuple[Tensor, Tensor]:
    """The attention policy (docs/design.md, "The math": causal, self excluded, renormalised) of
    one query row per sample.

    q (B, H, S, D) and k (B, Hkv, S, D) post-rotary (a ``LayerReference``'s, or captured during a
    forward: differentiable); rows: one row for every sample (int) or (B,) rows; key_padding_mask
    (B, S) bool or None. Returns (pi, support): pi (B, S) for heads="mean" or (B, H, S) for
    "each", 0 off the support (so past the row); support (B, S) bool. Float32, through the
    ``ral.reference`` functions on the chosen rows only.
    """
    b, _, s, _ = q.shape
    idx = torch.arange(b, device=q.device)
    row = torch.full((b,), rows, device=q.device) if isinstance(rows, int) else rows.to(q.device).long()
    keys = torch.arange(s, device=q.device)
    attended = keys[None] <= row[:, None]
    if key_padding_mask is not None:
        attended = attended & key_padding_mask.to(device=q.device, dtype=torch.bool)
    support = attended & (keys[None] != row[:, None])
    attended, support = attended[:, None], support[:, None]                      # (B, 1, S)
    scores = _ref.head_scores(q[idx, :, row][:, :, None].float(), k.float(), scale)  # (B, H, 1, S)
    stats = _ref.row_stats(scores, attended, support)
    log_pi = _ref.log_policy(scores, stats, attended, support, heads)
    sup = support if heads == "mean" else support[:, None]
    pi = torch.where(sup, log_pi.exp(), torch.zeros_like(log_pi))
    return pi.squeeze(-2), support.squeeze(1)


def policy_entropy(pi: Tensor) -> Tensor:
    """-sum p log p over the last dim (0 log 0 = 0): (..., S) -> (...)."""
    return -(torch.where(pi > 0, pi * pi.clamp_min(1e-30).log(), torch.zeros_like(pi))).sum(-1)


def attention_metrics(layer_ref, key_padding_mask: Optional[Tensor], rows: Tensor,
                      targets: Tensor) -> Dict[str, float]:
    """Entropy and target mass of the recorded attention policy at one row per sample.

    Args:
        layer_ref: a ``LayerReference`` (q (B, H, S, D), k, scale) from ``AttentionPolicy.record``.
        key_padding_mask: (B, S) bool or None.
        rows: (B,) the query row per sample (e.g. the ``<ans>`` position).
        targets: (B,) the key position of the target cell.
    Returns {"attn_entropy": mean nats, "attn_on_target": mean probability mass,
    "attn_uniform_entropy": the entropy of the uniform policy on the same support}. The policy is
    the paper's: head mean of the last layer, self excluded, renormalised (``row_policy``).
    """
    pi, support = row_policy(layer_ref.q, layer_ref.k, layer_ref.scale, rows, key_padding_mask, "mean")
    on_target = pi[torch.arange(pi.shape[0], device=pi.device), targets.to(pi.device)]
    return {"attn_entropy": float(policy_entropy(pi).mean()), "attn_on_target": float(on_target.mean()),
            "attn_uniform_entropy": float(torch.log(support.sum(-1).clamp(min=1).float()).mean())}
