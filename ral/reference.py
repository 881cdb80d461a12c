"""The contract of docs/design.md ("The math", "Gradient") in plain PyTorch: the executable spec and the oracle of every test.

It materialises every (B, H, Sq, Sk) tensor, so it is meant for small shapes, and it is written
to be obviously right rather than fast. Pass float64 tensors to get a float64 oracle; otherwise it
computes in float32 whatever the input dtype. Gradients come from autograd.

Masked entries are replaced by finite values *before* every exp/log so that autograd never sees
``0 * inf``; rows with an empty set get -inf statistics, zero divergence and zero gradient.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

DIVERGENCES = ("jsd", "kl", "reverse_kl")
HEADS_MODES = ("mean", "each")


class AttentionKL(NamedTuple):
    """What ``attention_kl`` returns.

    out:   (B, H, Sq, Dv) in q's dtype, or None when v is None.
    div:   (B, Sq) for heads="mean", (B, H, Sq) for heads="each"; float32 (float64 from a float64 reference).
    stats: (B, H, Sq, 2) float32: per head, the natural-log LSE of the scores over the attended
           keys and over the policy support (-inf for an empty set).
    entropy: (B, Sq) "mean" | (B, H, Sq) "each": - sum_P pi log pi of the current policy, or None
           when no statistics were asked for (docs/design.md, "Attention statistics").
    mass:  (B, Sq, num_segments) "mean" | (B, H, Sq, num_segments) "each": the policy's mass on
           each key segment, or None without key_segments.
    """

    out: Optional[Tensor]
    div: Tensor
    stats: Tensor
    entropy: Optional[Tensor] = None
    mass: Optional[Tensor] = None


def key_sets(batch: int, q_len: int, k_len: int, *, causal: bool, exclude_self: bool,
             key_padding_mask: Optional[Tensor], device, q_pos: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Attended keys A(i) and policy support P(i), both (B, Sq, Sk) bool.

    Query row i sits at key position q_pos + i; q_pos defaults to Sk - Sq (bottom-right aligned).
    """
    pos = torch.arange(q_len, device=device) + (k_len - q_len if q_pos is None else q_pos)
    key = torch.arange(k_len, device=device)
    attended = torch.ones(batch, q_len, k_len, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        attended = attended & key_padding_mask[:, None, :].to(torch.bool)
    if causal:
        attended = attended & (key[None, :] <= pos[:, None])[None]
    support = attended
    if exclude_self:
        support = attended & (key[None, :] != pos[:, None])[None]
    return attended, support


def _masked_logsumexp(x: Tensor, mask: Tensor, dim: int) -> Tensor:
    """logsumexp of x over `dim` where mask is True; -inf with zero gradient where none is."""
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    empty = ~mask.any(dim, keepdim=True)
    shift = x.masked_fill(~mask, float("-inf")).amax(dim, keepdim=True).detach()
    shift = torch.where(empty, torch.zeros_like(shift), shift)
    total = torch.where(mask, torch.exp(x - shift), torch.zeros_like(x)).sum(dim, keepdim=True)
    total = torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(total, float("-inf")), shift + torch.log(total))
    return lse.squeeze(dim)


def _finite_or_zero(x: Tensor) -> Tensor:
    """Replace -inf (an empty set's LSE) with 0 so that `s - lse` stays finite; NaN passes."""
    return torch.where(torch.isneginf(x), torch.zeros_like(x), x)


def head_scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """scale * q @ k^T with GQA: (B, H, Sq, D) x (B, Hkv, Sk, D) -> (B, H, Sq, Sk)."""
    group = q.shape[1] // k.shape[1]
    return scale * torch.matmul(q, k.repeat_interleave(group, dim=1).transpose(-1, -2))


def row_stats(scores: Tensor, attended: Tensor, support: Tensor) -> Tensor:
    """[lse over A, lse over P] per head: (B, H, Sq, Sk) -> (B, H, Sq, 2)."""
    lse_a = _masked_logsumexp(scores, attended[:, None], -1)
    lse_p = _masked_logsumexp(scores, support[:, None], -1)
    return torch.stack([lse_a, lse_p], dim=-1)


def log_policy(scores: Tensor, stats: Tensor, attended: Tensor, support: Tensor, heads: str) -> Tensor:
    """log pi on P (0 elsewhere): (B, Sq, Sk) for "mean", (B, H, Sq, Sk) for "each"."""
    lse_a, lse_p = _finite_or_zero(stats[..., 0]), _finite_or_zero(stats[..., 1])
    n_heads = scores.shape[1]
    if heads == "each":
        log_pi = scores - lse_p[..., None]
        return torch.where(support[:, None], log_pi, torch.zeros_like(log_pi))
    # log abar = logsumexp_h(s - lse_A) - log H ;  log Z = logsumexp_h(lse_P - lse_A) - log H
    per_head = torch.where(attended[:, None], scores - lse_a[..., None], torch.zeros_like(scores))
    log_abar = torch.logsumexp(per_head, dim=1) - math.log(n_heads)
    log_z = torch.logsumexp(lse_p - lse_a, dim=1) - math.log(n_heads)
    log_z = torch.where(support.any(-1), log_z, torch.zeros_like(log_z))
    log_pi = log_abar - log_z[..., None]
    return torch.where(support, log_pi, torch.zeros_like(log_pi))


def divergence_terms(log_pi: Tensor, log_rho: Tensor, divergence: str) -> Tensor:
    """f(pi_j, rho_j) elementwise from log-probabilities (natural log)."""
    pi, rho = torch.exp(log_pi), torch.exp(log_rho)
    if divergence == "kl":
        return pi * (log_pi - log_rho)
    if divergence == "reverse_kl":
        return rho * (log_rho - log_pi)
    log_mid = torch.logaddexp(log_pi, log_rho) - math.log(2.0)
    return 0.5 * pi * (log_pi - log_mid) + 0.5 * rho * (log_rho - log_mid)


def policy_statistics(log_pi: Tensor, keep: Tensor, key_segments: Optional[Tensor],
                      num_segments: Optional[int]) -> tuple[Tensor, Optional[Tensor]]:
    """entropy = - sum_P pi log pi and mass[s] = sum_{P, seg = s} pi from log pi ((B, Sq, Sk) "mean"
    or (B, H, Sq, Sk) "each", 0 outside P) and `keep` (P, broadcastable): rows with an empty P give 0."""
    pi = torch.where(keep, torch.exp(log_pi), torch.zeros_like(log_pi))
    entropy = -(pi * log_pi).sum(-1)
    if key_segments is None:
        return entropy, None
    one_hot = torch.nn.functional.one_hot(key_segments.long(), num_segments).to(pi.dtype)  # (B, Sk, S)
    return entropy, torch.matmul(pi, one_hot if pi.dim() == 3 else one_hot[:, None])


def attention_kl(q: Tensor, k: Tensor, v: Optional[Tensor] = None, *, q_ref: Tensor, k_ref: Tensor,
                 ref_stats: Optional[Tensor] = None, divergence: str = "jsd", heads: str = "mean",
                 exclude_self: bool = True, causal: bool = True, scale: Optional[float] = None,
                 ref_scale: Optional[float] = None, key_padding_mask: Optional[Tensor] = None,
                 row_mask: Optional[Tensor] = None, q_pos: Optional[int] = None, policy_stats: bool = False,
                 key_segments: Optional[Tensor] = None, num_segments: Optional[int] = None) -> AttentionKL:
    """The whole op, materialised. Shapes as in ``ral.ops.attention_kl``; no input checks here.
    ``q_pos``: key position of row 0 (default Sk - Sq), as a unit of a sequence table has it.
    ``policy_stats`` (implied by ``key_segments``): also the entropy (and, with key_segments (B, Sk)
    ids in [0, num_segments), the segment mass) of the current policy; 0 on rows with row_mask
    False or an empty support."""
    assert divergence in DIVERGENCES and heads in HEADS_MODES
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, _, q_len, head_dim = q.shape
    k_len = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    ref_scale = 1.0 / math.sqrt(q_ref.shape[-1]) if ref_scale is None else ref_scale
    attended, support = key_sets(batch, q_len, k_len, causal=causal, exclude_self=exclude_self,
                                 key_padding_mask=key_padding_mask, device=q.device, q_pos=q_pos)

    scores = head_scores(q.to(work), k.to(work), scale)
    stats = row_stats(scores, attended, support)
    probs = torch.where(attended[:, None], torch.exp(scores - _finite_or_zero(stats[..., :1])),
                        torch.zeros_like(scores))
    out = None if v is None else torch.matmul(
        probs, v.to(work).repeat_interleave(q.shape[1] // v.shape[1], dim=1)).to(q.dtype)

    with torch.no_grad():
        ref_scores = head_scores(q_ref.detach().to(work), k_ref.detach().to(work), ref_scale)
        ref_row_stats = (row_stats(ref_scores, attended, support) if ref_stats is None
                         else ref_stats.detach().to(work))
        log_rho = log_policy(ref_scores, ref_row_stats, attended, support, heads)
    log_pi = log_policy(scores, stats, attended, support, heads)

    keep = support if heads == "mean" else support[:, None]
    terms = divergence_terms(log_pi, log_rho, divergence)
    div = torch.where(keep, terms, torch.zeros_like(terms)).sum(-1)
    entropy = mass = None
    if policy_stats or key_segments is not None:
        entropy, mass = policy_statistics(log_pi, keep, key_segments, num_segments)
    if row_mask is not None:
        row_keep = row_mask.to(torch.bool) if heads == "mean" else row_mask.to(torch.bool)[:, None]
        div = torch.where(row_keep, div, torch.zeros_like(div))
        if entropy is not None:
            entropy = torch.where(row_keep, entropy, torch.zeros_like(entropy))
        if mass is not None:
            mass = torch.where(row_keep[..., None], mass, torch.zeros_like(mass))
    return AttentionKL(out, div, stats.detach(), entropy, mass)


def attention_kl_units(q: Tensor, k: Tensor, v: Optional[Tensor] = None, *, q_ref: Tensor, k_ref: Tensor,
                       seqs: Tensor, ref_stats: Optional[Tensor] = None, row_mask: Optional[Tensor] = None,
                       key_padding_mask: Optional[Tensor] = None, heads: str = "mean", policy_stats: bool = False,
                       key_segments: Optional[Tensor] = None, num_segments: Optional[int] = None,
                       **options) -> AttentionKL:
    """The op over a sequence table (docs/design.md, "Packed sequences"): ``attention_kl`` on each
    unit alone, written into outputs of the dense shapes.

    q (B, H, Sq, D), k (B, Hkv, Sk, D), v, q_ref, k_ref, ref_stats, row_mask, key_padding_mask as in
    ``attention_kl``; seqs (N, 8) int rows [batch, q_start, q_len, k_start, k_len, q_pos, 0, 0].
    key_segments (B, Sk) as in ``attention_kl``, addressed like the keys.
    Rows no unit covers get out 0, div 0, stats -inf (entropy, mass 0); so do a unit's rows when it
    has no keys.
    """
    batch, n_heads, q_len, _ = q.shape
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = None if v is None else q.new_zeros((batch, n_heads, q_len, v.shape[-1]))
    div = torch.zeros((batch, n_heads, q_len) if heads == "each" else (batch, q_len), dtype=work, device=q.device)
    stats = torch.full((batch, n_heads, q_len, 2), float("-inf"), dtype=torch.float32, device=q.device)
    policy_stats = policy_stats or key_segments is not None
    entropy = torch.zeros_like(div) if policy_stats else None
    mass = (torch.zeros(div.shape + (num_segments,), dtype=work, device=q.device)
            if key_segments is not None else None)
    for b, q0, nq, k0, nk, pos in seqs[:, :6].tolist():
        if nq == 0 or nk == 0:
            continue
        rows, keys = slice(q0, q0 + nq), slice(k0, k0 + nk)
        res = attention_kl(
            q[b:b + 1, :, rows], k[b:b + 1, :, keys], None if v is None else v[b:b + 1, :, keys],
            q_ref=q_ref[b:b + 1, :, rows], k_ref=k_ref[b:b + 1, :, keys], heads=heads, q_pos=pos,
            ref_stats=None if ref_stats is None else ref_stats[b:b + 1, :, rows],
            row_mask=None if row_mask is None else row_mask[b:b + 1, rows],
            key_padding_mask=None if key_padding_mask is None else key_padding_mask[b:b + 1, keys],
            policy_stats=policy_stats, key_segments=None if key_segments is None else key_segments[b:b + 1, keys],
            num_segments=num_segments, **options)
        if v is not None:
            out = _put_rows(out, b, rows, res.out[0])
        row_axis = 2 if heads == "each" else 1
        div = _put_rows(div, b, rows, res.div[0], row_axis)
        stats = _put_rows(stats, b, rows, res.stats[0])
        if entropy is not None:
            entropy = _put_rows(entropy, b, rows, res.entropy[0], row_axis)
        if mass is not None:
            mass = _put_rows(mass, b, rows, res.mass[0], row_axis)
    return AttentionKL(out, div, stats, entropy, mass)


def _put_rows(t: Tensor, b: int, rows: slice, value: Tensor, row_axis: int = 2) -> Tensor:
    """t with t[b, ..., rows, ...] = value (rows on `row_axis`: 1 for the (B, Sq, ...) outputs of
    heads="mean", 2 for (B, H, Sq, ...)), out of place (autograd-friendly)."""
    index = (b, rows) if row_axis == 1 else (b, slice(None), rows)
    t = t.clone()
    t[index] = value.to(t.dtype)
    return t
