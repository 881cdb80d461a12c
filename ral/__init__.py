"""ral: fused attention + attention-divergence kernels for Reinforced Attention Learning.

    import ral
    res = ral.attention_kl(q, k, v, q_ref=q_old, k_ref=k_old)   # -> AttentionKL(out, div, stats)

This package's front door is the op layer only (``ral.ops``, ``ral.losses``); importing it never
imports transformers, TRL or the trainer. The layers above it: ``ral.integrations.transformers``
(``AttentionPolicy``), ``ral.integrations.trl`` (``RALGRPOTrainer``) and ``ral.train`` (the embedded
trainer and ``ral`` command line). See docs/design.md.
"""

from . import ops
from .backends import available as available_backends
from .losses import attention_policy_loss, group_advantages, grpo_token_loss
from .ops import AttentionKL, AttentionStats, attention_kl, attention_kl_varlen, attention_stats

__version__ = "0.1.0"
__all__ = ["ops", "attention_kl", "attention_kl_varlen", "attention_stats", "AttentionKL", "AttentionStats",
           "available_backends", "attention_policy_loss", "group_advantages", "grpo_token_loss", "__version__"]
