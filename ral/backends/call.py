"""The checked description of one call of the op, as every backend receives it.

``ral.ops`` builds a ``Call`` after checking the user's arguments (docs/design.md, "Bad input");
the kernel backends (``ral.backends.cpu``, ``.cuda``, ``.triton``) read it and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

DIVERGENCE_CODES = {"jsd": 0, "kl": 1, "reverse_kl": 2}


@dataclass(frozen=True)
class Options:
    """The scalar options of a call, already resolved (scale filled in, strings checked)."""

    divergence: str = "jsd"
    heads_each: bool = False
    exclude_self: bool = True
    causal: bool = True
    scale: float = 1.0
    ref_scale: float = 1.0
    # statistics of the current policy (docs/design.md, "Attention statistics"): entropy when
    # policy_stats, and the mass on each of num_segments key segments (Call.key_segments) when > 0
    policy_stats: bool = False
    num_segments: int = 0
    # statistics only (ral.ops.attention_stats): q_ref / k_ref / ref_stats are placeholders, div is 0
    no_reference: bool = False

    @property
    def divergence_code(self) -> int:
        """The divergence as the kernels number it (csrc/common/params.h, Divergence): jsd 0, kl 1, reverse_kl 2."""
        return DIVERGENCE_CODES[self.divergence]


@dataclass
class Call:
    """The tensors of a checked call. Shapes: q (B,H,Sq,D), k (B,Hkv,Sk,D), v (B,Hkv,Sk,Dv) | None,
    q_ref (B,Hr,Sq,Dr), k_ref (B,Hrkv,Sk,Dr), ref_stats (B,Hr,Sq,2) fp32 | None,
    key_padding_mask (B,Sk) bool | None, row_mask (B,Sq) bool | None."""

    q: Tensor
    k: Tensor
    v: Optional[Tensor]
    q_ref: Tensor
    k_ref: Tensor
    ref_stats: Optional[Tensor]
    key_padding_mask: Optional[Tensor]
    row_mask: Optional[Tensor]
    options: Options
    # Sequence table (csrc/common/params.h, SeqRange): int32 (N, 8) rows
    # [batch, q_start, q_len, k_start, k_len, q_pos, 0, 0] on the tensors' device, or None (dense).
    # With a table, unit s reads rows q_start.. and keys k_start.. of batch `batch`, and the
    # outputs keep the dense (B, H, Sq, ...) shapes of the tensors (B = 1, Sq = Tq for a packed batch).
    seqs: Optional[Tensor] = None
    max_q_len: int = 0  # longest q_len in seqs (0 without a table)
    max_k_len: int = 0
    # int32 (B, Sk) segment ids in [0, options.num_segments), contiguous, or None
    key_segments: Optional[Tensor] = None
    # backward only, with policy statistics: the upstream weights of the statistics per row,
    # fp32 (B, Sq, 1 + S) "mean" | (B, H, Sq, 1 + S) "each" = [w_E, w_0 .. w_{S-1}] (0 on dead
    # rows); the backward's `gbar` is then gbar_total = w gbar + w_E entropy + sum_s w_s mass_s
    stats_w: Optional[Tensor] = None
