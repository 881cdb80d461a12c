"""The op's output and gradient buffers: allocated here, once, for the fake function and every
kernel launcher, so their shapes and dtypes cannot drift apart.

Every function allocates with ``Tensor.new_empty`` / ``new_zeros`` on the first argument, so the
same code serves real tensors and torch.compile's fake tensors.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class ForwardOutputs(NamedTuple):
    """What every backend's forward returns (shapes for q (B, H, Sq, D), q_ref (B, Hr, Sq, Dr)):

    out (B, H, Sq, Dv) in q's dtype, or (0,) when v is None; div and gbar (B, Sq) for "mean" or
    (B, H, Sq) for "each", fp32; stats (B, H, Sq, 2) fp32; ref_stats_out (B, Hr, Sq, 2) fp32, or
    (0,) when ref_stats was given; cbar (B, H, Sq) fp32.
    """

    out: Tensor
    div: Tensor
    stats: Tensor
    ref_stats_out: Tensor
    gbar: Tensor
    cbar: Tensor


def forward_outputs(q: Tensor, v: Optional[Tensor], q_ref: Tensor, has_ref_stats: bool,
                    heads_each: bool) -> ForwardOutputs:
    """Uninitialised forward outputs for q (B, H, Sq, D), v (B, Hkv, Sk, Dv) | None, q_ref (B, Hr, Sq, Dr)."""
    batch, n_heads, q_len, _ = q.shape
    f32 = dict(dtype=torch.float32)
    row_shape = (batch, n_heads, q_len) if heads_each else (batch, q_len)
    return ForwardOutputs(
        out=q.new_empty((batch, n_heads, q_len, v.shape[-1])) if v is not None else q.new_empty((0,)),
        div=q.new_empty(row_shape, **f32),
        stats=q.new_empty((batch, n_heads, q_len, 2), **f32),
        ref_stats_out=q.new_empty((0,) if has_ref_stats else (batch, q_ref.shape[1], q_len, 2), **f32),
        gbar=q.new_empty(row_shape, **f32),
        cbar=q.new_empty((batch, n_heads, q_len), **f32),
    )


class StatsOutputs(NamedTuple):
    """The forward's statistics of the current policy (docs/design.md, "Attention statistics"),
    which a backend that supports them returns after the six ForwardOutputs (as one flat 9-tuple,
    ``ForwardOutputs + StatsOutputs``) when ``call.options.policy_stats``; all (0,) otherwise:

    entropy (B, Sq) "mean" | (B, H, Sq) "each"; mass (B, Sq, S) | (B, H, Sq, S), (0,) without key
    segments (S = num_segments); cstats (B, H, Sq, 1 + S) ("mean" only, else (0,)): per head the
    c_h of the entropy and of each segment's mass, c = (u_h - stat Z_h) / Z with u_h = sum_P a_hj g_j
    for g_j = -log pi_j (entropy) and [seg(j) = s] (mass s), all fp32.
    ForwardOutputs keeps its six fields: launchers unpack it (ral/backends/triton/launch.py).
    """

    entropy: Tensor
    mass: Tensor
    cstats: Tensor


def stats_outputs(q: Tensor, heads_each: bool, policy_stats: bool, num_segments: int) -> StatsOutputs:
    """Uninitialised statistics outputs for q (B, H, Sq, D); (0,) tensors when not policy_stats."""
    batch, n_heads, q_len, _ = q.shape
    f32 = dict(dtype=torch.float32)
    empty = (0,)
    row_shape = (batch, n_heads, q_len) if heads_each else (batch, q_len)
    return StatsOutputs(
        entropy=q.new_empty(row_shape if policy_stats else empty, **f32),
        mass=q.new_empty(row_shape + (num_segments,) if policy_stats and num_segments else empty, **f32),
        cstats=q.new_empty((batch, n_heads, q_len, 1 + num_segments) if policy_stats and not heads_each else empty,
                           **f32),
    )


def gradient_accumulators(q: Tensor, k: Tensor, v: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Zero-filled fp32 dq, dk, dv (dv None without v) in the shapes of q, k, v; the kernels add into them."""
    return (q.new_zeros(q.shape, dtype=torch.float32), k.new_zeros(k.shape, dtype=torch.float32),
            v.new_zeros(v.shape, dtype=torch.float32) if v is not None else None)


def cast_gradients(dq: Tensor, dk: Tensor, dv: Optional[Tensor], q: Tensor, k: Tensor,
                   v: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The fp32 accumulators cast back to the dtypes of q, k, v; dv is (0,) without v (a custom op
    cannot return None)."""
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype) if v is not None else q.new_empty((0,))
