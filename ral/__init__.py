"""ral: fused attention + attention-divergence kernels and a thin trainer for Reinforced Attention Learning.

    import ral
    res = ral.attention_kl(q, k, v, q_ref=q_old, k_ref=k_old)   # -> AttentionKL(out, div, stats)
"""

from . import ops
from .backends import available as available_backends
from .integrations.transformers import AttentionPolicy, AttentionReference
from .losses import attention_policy_loss, group_advantages, grpo_token_loss
from .ops import AttentionKL, attention_kl

__version__ = "0.1.0"
__all__ = ["ops", "attention_kl", "AttentionKL", "available_backends", "AttentionPolicy", "AttentionReference",
           "attention_policy_loss", "group_advantages", "grpo_token_loss", "__version__"]
