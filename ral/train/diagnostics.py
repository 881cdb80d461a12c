"""Attention diagnostics of the embedded tasks, from a recorded reference (small shapes only:
these materialise the (B, S, S) policy through ``ral.reference``)."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

from .. import reference as _ref

__all__ = ["attention_metrics"]


def attention_metrics(layer_ref, key_padding_mask: Optional[Tensor], rows: Tensor,
                      targets: Tensor) -> Dict[str, float]:
    """Entropy and target mass of the recorded attention policy at one row per sample.

    Args:
        layer_ref: a ``LayerReference`` (q (B, H, S, D), k, scale) from ``AttentionPolicy.record``.
        key_padding_mask: (B, S) bool or None.
        rows: (B,) the query row per sample (e.g. the ``<ans>`` position).
        targets: (B,) the key position of the target cell.
    Returns {"attn_entropy": mean nats, "attn_on_target": mean probability mass}. The policy is
    the paper's: head mean of the last layer, self excluded, renormalised. Materialises (B, S, S):
    for small diagnostics only.
    """
    q, k = layer_ref.q.float(), layer_ref.k.float()
    b, _, s, _ = q.shape
    attended, support = _ref.key_sets(b, s, s, causal=True, exclude_self=True,
                                      key_padding_mask=key_padding_mask, device=q.device)
    scores = _ref.head_scores(q, k, layer_ref.scale)
    stats = _ref.row_stats(scores, attended, support)
    log_pi = _ref.log_policy(scores, stats, attended, support, "mean")        # (B, S, S)
    idx = torch.arange(b)
    lp = log_pi[idx, rows]                                                    # (B, S)
    sup = support[idx, rows]
    p = torch.where(sup, lp.exp(), torch.zeros_like(lp))
    ent = -(torch.where(sup, p * lp, torch.zeros_like(lp))).sum(-1)
    on_target = p[idx, targets]
    return {"attn_entropy": float(ent.mean()), "attn_on_target": float(on_target.mean()),
            "attn_uniform_entropy": float(torch.log(sup.sum(-1).clamp(min=1).float()).mean())}
