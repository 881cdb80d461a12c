"""The public op: fused attention + per-row attention divergence against a cached reference.

``attention_kl`` checks its inputs (docs/design.md, "Bad input"), picks a backend (docs/design.md, "Backends") and calls
the ``torch.library`` custom ops ``ral::attention_kl`` / ``ral::attention_kl_backward``, which
have fake (meta) functions and a registered autograd formula, so ``torch.compile(fullgraph=True)``
traces through them. ``backend="reference"`` runs ``ral.reference`` directly under autograd.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import backends, reference
from .backends import BACKENDS, Call, Options, outputs
from .checks import check_choice, check_flag
from .reference import DIVERGENCES, HEADS_MODES, AttentionKL

__all__ = ["attention_kl", "attention_kl_varlen", "attention_stats", "AttentionKL", "AttentionStats",
           "sequence_table"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ALL_DTYPES = _KERNEL_DTYPES + (torch.float64,)


def attention_kl(q: Tensor, k: Tensor, v: Optional[Tensor] = None, *, q_ref: Tensor, k_ref: Tensor,
                 ref_stats: Optional[Tensor] = None, divergence: str = "jsd", heads: str = "mean",
                 exclude_self: bool = True, causal: bool = True, scale: Optional[float] = None,
                 ref_scale: Optional[float] = None, key_padding_mask: Optional[Tensor] = None,
                 row_mask: Optional[Tensor] = None, backend: str = "auto", key_segments: Optional[Tensor] = None,
                 num_segments: Optional[int] = None) -> AttentionKL:
    """Attention output and the divergence of its attention policy from a reference's.

    Args:
        q: (B, H, Sq, D) queries after rotary embedding; float32, float16 or bfloat16
            (float64 runs on backend="reference" only).
        k: (B, Hkv, Sk, D) keys; H % Hkv == 0 (query head h reads kv head h // (H // Hkv)).
        v: (B, Hkv, Sk, Dv) values, or None to skip the attention output.
        q_ref, k_ref: (B, Hr, Sq, Dr), (B, Hrkv, Sk, Dr): the cached reference (old policy or
            teacher). Never receive gradients. Cast to q's dtype if theirs differs.
        ref_stats: (B, Hr, Sq, 2) float32 reference row statistics (the ``stats`` this op returned
            when q_ref/k_ref were the current model, with the same masks and flags), or None.
        divergence: "jsd" (JSD(pi||rho)), "kl" (KL(pi||rho)) or "reverse_kl" (KL(rho||pi)).
        heads: "mean": one policy per row from the head-averaged attention (the paper);
            "each": one per head (needs Hr == H).
        exclude_self: drop the row's own position from the policy support and renormalise.
        causal: bottom-right aligned causal mask; query row i sits at key position Sk - Sq + i.
        scale, ref_scale: softmax scales; default 1/sqrt(D) and 1/sqrt(Dr).
        key_padding_mask: (B, Sk) bool, True for real keys.
        row_mask: (B, Sq) bool; rows where False get div = 0 and no divergence gradient.
        backend: "auto", "triton", "cuda", "cpu" or "reference".
        key_segments: (B, Sk) integer segment ids in [0, num_segments) (e.g. 0 text, 1 image), or
            None: with them the op also returns the entropy and the per-segment mass of the current
            policy, from the same pass (docs/design.md, "Attention statistics"); every backend
            computes them.
        num_segments: 1..8, given exactly when key_segments is.

    Returns:
        AttentionKL(out, div, stats, entropy, mass): out (B, H, Sq, Dv) in q's dtype or None; div (B, Sq)
        ("mean") or (B, H, Sq) ("each") float32; stats (B, H, Sq, 2) float32 = per head the LSE
        over the attended keys and over the policy support; entropy like div and mass (div's shape
        + (num_segments,)), float32, both None without key_segments. Gradients reach q, k, v from
        out, div, entropy and mass.
    """
    call = _checked_call(q, k, v, q_ref, k_ref, ref_stats, divergence, heads, exclude_self, causal,
                         scale, ref_scale, key_padding_mask, row_mask, backend, key_segments, num_segments)
    if _runs_reference(backend, q):
        return reference.attention_kl(
            q, k, v, q_ref=call.q_ref, k_ref=call.k_ref, ref_stats=ref_stats, divergence=divergence,
            heads=heads, exclude_self=exclude_self, causal=causal, scale=call.options.scale,
            ref_scale=call.options.ref_scale, key_padding_mask=key_padding_mask, row_mask=row_mask,
            policy_stats=call.options.policy_stats, key_segments=call.key_segments,
            num_segments=call.options.num_segments or None)
    return _run_kernels(call, backend)


class AttentionStats(NamedTuple):
    """What ``attention_stats`` returns: out (B, H, Sq, Dv) or None, entropy (B, Sq) | (B, H, Sq),
    mass (B, Sq, S) | (B, H, Sq, S) or None without key_segments, stats (B, H, Sq, 2)."""

    out: Optional[Tensor]
    entropy: Tensor
    mass: Optional[Tensor]
    stats: Tensor


def attention_stats(q: Tensor, k: Tensor, v: Optional[Tensor] = None, *, key_segments: Optional[Tensor] = None,
                    num_segments: Optional[int] = None, heads: str = "mean", exclude_self: bool = True,
                    causal: bool = True, scale: Optional[float] = None, key_padding_mask: Optional[Tensor] = None,
                    row_mask: Optional[Tensor] = None, backend: str = "auto") -> AttentionStats:
    """The entropy (and, with key_segments, the per-segment mass) of one model's attention policy,
    with the attention output, in one pass and with exact gradients; no reference model.

    Arguments as in ``attention_kl``. The kernels run with no reference (Options.no_reference:
    no reference sweep, div 0); the op's reference arguments get placeholders that are never read
    (zero-stride zero tensors of head dim 1). backend="reference" computes the same statistics
    against that placeholder (the uniform policy) and drops the divergence, so no gradient comes from it.
    """
    _tensor("q", q, 4, "(B, H, Sq, D)")
    _tensor("k", k, 4, "(B, Hkv, Sk, D)")
    check_choice("heads", heads, HEADS_MODES)
    batch, n_heads, q_len, _ = q.shape
    zero = torch.zeros((), dtype=q.dtype if q.dtype in _ALL_DTYPES else torch.float32, device=q.device)
    q_ref = zero.expand(batch, n_heads if heads == "each" else 1, q_len, 1)
    k_ref = zero.expand(batch, 1, k.shape[2], 1)
    ref_stats = torch.zeros((), dtype=torch.float32, device=q.device).expand(batch, q_ref.shape[1], q_len, 2)
    call = _checked_call(q, k, v, q_ref, k_ref, ref_stats, "jsd", heads, exclude_self, causal, scale, 1.0,
                         key_padding_mask, row_mask, backend, key_segments, num_segments, policy_stats=True)
    call = dataclasses.replace(call, options=dataclasses.replace(call.options, no_reference=True))
    if _runs_reference(backend, q):
        res = reference.attention_kl(
            q, k, v, q_ref=call.q_ref, k_ref=call.k_ref, heads=heads, exclude_self=exclude_self, causal=causal,
            scale=call.options.scale, ref_scale=1.0, key_padding_mask=key_padding_mask, row_mask=row_mask,
            policy_stats=True, key_segments=call.key_segments, num_segments=call.options.num_segments or None)
    else:
        res = _run_kernels(call, backend)
    return AttentionStats(res.out, res.entropy, res.mass, res.stats)


def run_table(call: Call, seqs: Tensor, max_q_len: int, max_k_len: int, backend: str) -> AttentionKL:
    """A checked dense call restricted to the work units of a sequence table (docs/design.md,
    "Packed sequences"); outputs in the dense shapes of the call's tensors. The varlen op and the
    context-parallel op (``ral.distributed``) build their tables and come here."""
    call = dataclasses.replace(call, seqs=seqs, max_q_len=max_q_len, max_k_len=max_k_len)
    if _runs_reference(backend, call.q):
        opts = call.options
        return reference.attention_kl_units(
            call.q, call.k, call.v, q_ref=call.q_ref, k_ref=call.k_ref, seqs=seqs, ref_stats=call.ref_stats,
            row_mask=call.row_mask, key_padding_mask=call.key_padding_mask, divergence=opts.divergence,
            heads="each" if opts.heads_each else "mean", exclude_self=opts.exclude_self, causal=opts.causal,
            scale=opts.scale, ref_scale=opts.ref_scale, policy_stats=opts.policy_stats,
            key_segments=call.key_segments, num_segments=opts.num_segments or None)
    return _run_kernels(call, backend)


def _run_kernels(call: Call, backend: str) -> AttentionKL:
    """The custom op on a checked call -> AttentionKL in the dense shapes of the call's tensors."""
    opts = call.options
    out, div, stats, _, _, _, entropy, mass, _ = torch.ops.ral.attention_kl(
        call.q, call.k, call.v, call.q_ref, call.k_ref, call.ref_stats, call.key_padding_mask,
        call.row_mask, opts.divergence, opts.heads_each, opts.exclude_self, opts.causal, opts.scale,
        opts.ref_scale, backend, call.seqs, call.max_q_len, call.max_k_len, opts.policy_stats, call.key_segments,
        opts.num_segments, opts.no_reference)
    return AttentionKL(out if call.v is not None else None, div, stats, entropy if opts.policy_stats else None,
                       mass if opts.num_segments else None)


def attention_kl_varlen(q: Tensor, k: Tensor, v: Optional[Tensor] = None, *, q_ref: Tensor, k_ref: Tensor,
                        cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                        ref_stats: Optional[Tensor] = None, divergence: str = "jsd", heads: str = "mean",
                        exclude_self: bool = True, causal: bool = True, scale: Optional[float] = None,
                        ref_scale: Optional[float] = None, row_mask: Optional[Tensor] = None,
                        backend: str = "auto", key_segments: Optional[Tensor] = None,
                        num_segments: Optional[int] = None) -> AttentionKL:
    """``attention_kl`` on packed sequences (FlashAttention's varlen convention): no padding.

    Sequence n owns query rows ``cu_seqlens_q[n]:cu_seqlens_q[n+1]`` and keys
    ``cu_seqlens_k[n]:cu_seqlens_k[n+1]``; every rule of the dense op holds per sequence (causal is
    bottom-right aligned within each sequence) and no row sees a key of another sequence. The result
    equals ``attention_kl`` called on each sequence alone. Sequences of length 0 are allowed.

    Args:
        q, q_ref: (Tq, H, D), (Tq, Hr, Dr): all query rows, packed.
        k, v, k_ref: (Tk, Hkv, D), (Tk, Hkv, Dv) or None, (Tk, Hrkv, Dr): all keys, packed.
        cu_seqlens_q, cu_seqlens_k: (N + 1,) int32 on q's device: 0, then cumulative lengths.
        max_seqlen_q, max_seqlen_k: int, at least the longest sequence (the kernels' grid sizes).
        ref_stats: (Tq, Hr, 2) float32 or None; row_mask: (Tq,) bool or None.
        key_segments: (Tk,) integer segment ids of the packed keys, with num_segments, or None.
        divergence, heads, exclude_self, causal, scale, ref_scale, backend: as in ``attention_kl``.

    Returns:
        AttentionKL(out (Tq, H, Dv) or None, div (Tq,) "mean" | (Tq, H) "each", stats (Tq, H, 2),
        entropy like div, mass (Tq, S) | (Tq, H, S)), entropy and mass None without key_segments.
        They are views of head-major kernel buffers (call ``.contiguous()`` where a contiguous
        tensor is needed). Reading cu_seqlens costs one device-to-host copy per call.
    """
    given = dict(q=q, k=k, v=v, q_ref=q_ref, k_ref=k_ref, ref_stats=ref_stats, row_mask=row_mask,
                 key_segments=key_segments)
    for name, layout in _PACKED_LAYOUTS.items():
        _tensor(name, given[name], layout.count(",") + 1, layout,
                optional=name in ("v", "ref_stats", "row_mask", "key_segments"))
    for name, t, total, what in (("q_ref", q_ref, q.shape[0], "Tq (q.shape[0])"),
                                 ("ref_stats", ref_stats, q.shape[0], "Tq (q.shape[0])"),
                                 ("row_mask", row_mask, q.shape[0], "Tq (q.shape[0])"),
                                 ("v", v, k.shape[0], "Tk (k.shape[0])"),
                                 ("k_ref", k_ref, k.shape[0], "Tk (k.shape[0])"),
                                 ("key_segments", key_segments, k.shape[0], "Tk (k.shape[0])")):
        if t is not None:
            _same(name, t.shape[0], f"packed length {what}", total, t.shape)
    seqs = sequence_table(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q.shape[0], k.shape[0],
                          causal, q.device)

    call = _checked_call(packed_as_dense(q), packed_as_dense(k), packed_as_dense(v), packed_as_dense(q_ref),
                         packed_as_dense(k_ref), packed_as_dense(ref_stats), divergence, heads, exclude_self, causal,
                         scale, ref_scale, None, None if row_mask is None else row_mask.unsqueeze(0), backend,
                         None if key_segments is None else key_segments.unsqueeze(0), num_segments)
    return dense_as_packed(run_table(call, seqs, int(max_seqlen_q), int(max_seqlen_k), backend), heads)


def packed_as_dense(t: Optional[Tensor]) -> Optional[Tensor]:
    """(T, heads, dim) -> (1, heads, T, dim), a view (None stays None)."""
    return None if t is None else t.transpose(0, 1).unsqueeze(0)


def dense_as_packed(res: AttentionKL, heads: str) -> AttentionKL:
    """A table call's dense result of batch 1 -> the packed shapes of ``attention_kl_varlen`` (views)."""
    rows = (lambda t: t[0].transpose(0, 1)) if heads == "each" else (lambda t: t[0])
    return AttentionKL(None if res.out is None else res.out[0].transpose(0, 1), rows(res.div),
                       res.stats[0].transpose(0, 1), None if res.entropy is None else rows(res.entropy),
                       None if res.mass is None else rows(res.mass))


_PACKED_LAYOUTS = {"q": "(Tq, H, D)", "k": "(Tk, Hkv, D)", "v": "(Tk, Hkv, Dv)", "q_ref": "(Tq, Hr, Dr)",
                   "k_ref": "(Tk, Hrkv, Dr)", "ref_stats": "(Tq, Hr, 2)", "row_mask": "(Tq)",
                   "key_segments": "(Tk)"}


def sequence_table(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                   total_q: int, total_k: int, causal: bool, device) -> Tensor:
    """The sequence table of a packed batch: (N, 8) int32 on `device`, rows
    [0, q_start, q_len, k_start, k_len, k_len - q_len, 0, 0] (docs/design.md, "Packed sequences").

    Checks the types and shapes always and, outside torch.compile, the values (one device-to-host
    copy): a ValueError naming the argument for bad cu_seqlens / max_seqlen. The table itself is
    built with tensor operations, so a compiled graph has no data-dependent branch.
    """
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (N + 1,) int32, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name}: dtype must be torch.int32, got {cu.dtype}")
        if cu.dim() != 1 or cu.shape[0] < 2:
            raise ValueError(f"{name} must have shape (N + 1,) with N >= 1, got {tuple(cu.shape)}")
        if cu.device != device:
            raise ValueError(f"{name}: must be on q's device ({device}), got {cu.device}")
    if cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:
        raise ValueError(f"cu_seqlens_k: must describe as many sequences as cu_seqlens_q "
                         f"({cu_seqlens_q.shape[0] - 1}), got {cu_seqlens_k.shape[0] - 1}")
    for name, given in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(given, bool) or not isinstance(given, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(given).__name__}")
    if not torch.compiler.is_compiling():
        _check_cu_seqlens(cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), max_seqlen_q, max_seqlen_k, total_q,
                          total_k, causal)
    q_len, k_len = cu_seqlens_q.diff(), cu_seqlens_k.diff()
    zeros = torch.zeros_like(q_len)
    return torch.stack([zeros, cu_seqlens_q[:-1], q_len, cu_seqlens_k[:-1], k_len, k_len - q_len, zeros, zeros],
                       dim=1).contiguous()


def _check_cu_seqlens(cu_q: list, cu_k: list, max_q: int, max_k: int, total_q: int, total_k: int,
                      causal: bool) -> None:
    for name, cu, total in (("cu_seqlens_q", cu_q, total_q), ("cu_seqlens_k", cu_k, total_k)):
        if cu[0] != 0:
            raise ValueError(f"{name}[0] must be 0, got {cu[0]}")
        if any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"{name} must be non-decreasing, got {cu}")
        if cu[-1] != total:
            raise ValueError(f"{name}[-1] must equal the packed length {total}, got {cu[-1]}")
    q_lens = [b - a for a, b in zip(cu_q, cu_q[1:])]
    k_lens = [b - a for a, b in zip(cu_k, cu_k[1:])]
    if causal:
        for n, (q_len, k_len) in enumerate(zip(q_lens, k_lens)):
            if q_len > k_len:
                raise ValueError(f"cu_seqlens_q: causal attention needs each sequence's query length <= its key "
                                 f"length, sequence {n} has {q_len} > {k_len}")
    for name, given, longest in (("max_seqlen_q", max_q, max(q_lens)), ("max_seqlen_k", max_k, max(k_lens))):
        if given < longest:
            raise ValueError(f"{name} must be at least the longest sequence ({longest}), got {given}")


def _runs_reference(backend: str, q: Tensor) -> bool:
    """Whether the call runs ral.reference under autograd instead of a kernel custom op.

    Decided from constants only, so torch.compile traces it; the kernel backend itself
    ("auto" included) is resolved inside the custom ops, which torch.compile does not trace."""
    if q.dtype == torch.float64:
        if backend not in ("auto", "reference"):
            raise TypeError(f"q: float64 is only supported by backend='reference' (the oracle), "
                            f"got backend={backend!r}; use float32, float16 or bfloat16")
        return True
    return backend == "reference" or (backend == "auto" and q.device.type == "cpu" and not _CPU_BUILT)


_CPU_BUILT = backends.unavailable_reason("cpu") is None


# ----------------------------------------------------------------------------------------------
# Input checks (docs/design.md, "Bad input"): every misuse raises before any kernel runs, naming the argument.
# ----------------------------------------------------------------------------------------------

def _tensor(name: str, t, ndim: int, layout: str, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")


def _scale(name: str, value, head_dim: int) -> float:
    if value is None:
        return backends.default_scale(head_dim)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float or None, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{name} must be a positive finite float, got {value}")
    return value


def _same(name: str, got: int, what: str, expected: int, shape) -> None:
    if got != expected:
        raise ValueError(f"{name}: {what} must be {expected}, got {got} (shape {tuple(shape)})")


MAX_SEGMENTS = 8


def _checked_segments(key_segments, num_segments, q: Tensor, k: Tensor) -> Optional[Tensor]:
    """key_segments as the kernels take it (int32, contiguous) after the checks of "Bad input"."""
    if key_segments is None and num_segments is None:
        return None
    if key_segments is None:
        raise ValueError(f"key_segments: num_segments={num_segments!r} was given without key_segments; "
                         f"give both or neither")
    if num_segments is None:
        raise ValueError("num_segments: key_segments was given without num_segments (1..8); give both or neither")
    if isinstance(num_segments, bool) or not isinstance(num_segments, numbers.Integral):
        raise TypeError(f"num_segments must be an int in 1..{MAX_SEGMENTS}, got {type(num_segments).__name__}")
    if not 1 <= num_segments <= MAX_SEGMENTS:
        raise ValueError(f"num_segments must be in 1..{MAX_SEGMENTS}, got {num_segments}")
    _tensor("key_segments", key_segments, 2, "(B, Sk)")
    if key_segments.dtype.is_floating_point or key_segments.dtype.is_complex or key_segments.dtype == torch.bool:
        raise TypeError(f"key_segments: dtype must be an integer type (e.g. torch.int64), got {key_segments.dtype}")
    if key_segments.device != q.device:
        raise ValueError(f"key_segments: must be on q's device ({q.device}), got {key_segments.device}")
    expected = (q.shape[0], k.shape[2])
    if tuple(key_segments.shape) != expected:
        raise ValueError(f"key_segments: shape must be (B, Sk) = {expected}, got {tuple(key_segments.shape)}")
    if not torch.compiler.is_compiling():  # one device-to-host copy; a compiled graph stays branch-free
        low, high = torch.stack([key_segments.min(), key_segments.max()]).tolist()
        if low < 0 or high >= num_segments:
            raise ValueError(f"key_segments: ids must be in [0, num_segments={num_segments}), "
                             f"got values in [{low}, {high}]")
    return key_segments.to(torch.int32).contiguous()


def _checked_call(q, k, v, q_ref, k_ref, ref_stats, divergence, heads, exclude_self, causal, scale,
                  ref_scale, key_padding_mask, row_mask, backend, key_segments=None, num_segments=None,
                  policy_stats=False) -> Call:
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("heads", heads, HEADS_MODES)
    check_choice("backend", backend, BACKENDS)
    check_flag("exclude_self", exclude_self)
    check_flag("causal", causal)
    _tensor("q", q, 4, "(B, H, Sq, D)")
    _tensor("k", k, 4, "(B, Hkv, Sk, D)")
    _tensor("v", v, 4, "(B, Hkv, Sk, Dv)", optional=True)
    _tensor("q_ref", q_ref, 4, "(B, Hr, Sq, Dr)")
    _tensor("k_ref", k_ref, 4, "(B, Hrkv, Sk, Dr)")
    _tensor("ref_stats", ref_stats, 4, "(B, Hr, Sq, 2)", optional=True)
    _tensor("key_padding_mask", key_padding_mask, 2, "(B, Sk)", optional=True)
    _tensor("row_mask", row_mask, 2, "(B, Sq)", optional=True)

    if q.dtype not in _ALL_DTYPES:
        raise TypeError(f"q: dtype must be float32, float16 or bfloat16, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t is not None and t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype must match q's ({q.dtype}), got {t.dtype}")
    if q_ref.dtype not in _ALL_DTYPES:
        raise TypeError(f"q_ref: dtype must be float32, float16 or bfloat16, got {q_ref.dtype}")
    if k_ref.dtype != q_ref.dtype:
        raise TypeError(f"k_ref: dtype must match q_ref's ({q_ref.dtype}), got {k_ref.dtype}")
    if ref_stats is not None and ref_stats.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"ref_stats: dtype must be float32, got {ref_stats.dtype}")
    for name, t in (("key_padding_mask", key_padding_mask), ("row_mask", row_mask)):
        if t is not None and t.dtype != torch.bool:
            raise TypeError(f"{name}: dtype must be torch.bool (True = keep), got {t.dtype}")
    for name, t in (("k", k), ("v", v), ("q_ref", q_ref), ("k_ref", k_ref), ("ref_stats", ref_stats),
                    ("key_padding_mask", key_padding_mask), ("row_mask", row_mask)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name}: must be on q's device ({q.device}), got {t.device}")

    batch, n_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    ref_heads, ref_dim = q_ref.shape[1], q_ref.shape[3]
    for name, t in (("k", k), ("v", v), ("q_ref", q_ref), ("k_ref", k_ref), ("ref_stats", ref_stats),
                    ("key_padding_mask", key_padding_mask), ("row_mask", row_mask)):
        if t is not None:
            _same(name, t.shape[0], "batch size B (q.shape[0])", batch, t.shape)
    _same("k", k.shape[3], "head dim D (q.shape[3])", head_dim, k.shape)
    if n_heads % kv_heads:
        raise ValueError(f"k: q's head count H={n_heads} must be a multiple of k's Hkv={kv_heads}")
    if v is not None:
        _same("v", v.shape[1], "kv heads Hkv (k.shape[1])", kv_heads, v.shape)
        _same("v", v.shape[2], "key length Sk (k.shape[2])", k_len, v.shape)
    _same("q_ref", q_ref.shape[2], "query length Sq (q.shape[2])", q_len, q_ref.shape)
    _same("k_ref", k_ref.shape[2], "key length Sk (k.shape[2])", k_len, k_ref.shape)
    _same("k_ref", k_ref.shape[3], "head dim Dr (q_ref.shape[3])", ref_dim, k_ref.shape)
    if ref_heads % k_ref.shape[1]:
        raise ValueError(f"k_ref: q_ref's head count Hr={ref_heads} must be a multiple of "
                         f"k_ref's Hrkv={k_ref.shape[1]}")
    if heads == "each" and ref_heads != n_heads:
        raise ValueError(f"q_ref: heads='each' needs as many reference heads as q's (H={n_heads}), "
                         f"got Hr={ref_heads}; use heads='mean'")
    if ref_stats is not None and tuple(ref_stats.shape) != (batch, ref_heads, q_len, 2):
        raise ValueError(f"ref_stats: shape must be (B, Hr, Sq, 2) = {(batch, ref_heads, q_len, 2)}, "
                         f"got {tuple(ref_stats.shape)}")
    if key_padding_mask is not None:
        _same("key_padding_mask", key_padding_mask.shape[1], "key length Sk (k.shape[2])", k_len,
              key_padding_mask.shape)
    if row_mask is not None:
        _same("row_mask", row_mask.shape[1], "query length Sq (q.shape[2])", q_len, row_mask.shape)
    if causal and q_len > k_len:
        raise ValueError(f"q: causal attention needs Sq <= Sk, got Sq={q_len} > Sk={k_len}")

    key_segments = _checked_segments(key_segments, num_segments, q, k)
    options = Options(divergence=divergence, heads_each=heads == "each", exclude_self=exclude_self,
                      causal=causal, scale=_scale("scale", scale, head_dim),
                      ref_scale=_scale("ref_scale", ref_scale, ref_dim),
                      policy_stats=policy_stats or key_segments is not None,
                      num_segments=0 if key_segments is None else int(num_segments))
    if q_ref.dtype != q.dtype and q.dtype != torch.float64:
        q_ref, k_ref = q_ref.to(q.dtype), k_ref.to(q.dtype)
    if ref_stats is not None:
        ref_stats = ref_stats.to(torch.float32)
    return Call(q, k, v, q_ref.detach(), k_ref.detach(), ref_stats, key_padding_mask, row_mask, options,
                key_segments=key_segments)


# ----------------------------------------------------------------------------------------------
# Custom ops: one forward and one backward, for every kernel backend; the backend is an argument.
# ----------------------------------------------------------------------------------------------

def _call(q, k, v, q_ref, k_ref, ref_stats, key_padding_mask, row_mask, divergence, heads_each,
          exclude_self, causal, scale, ref_scale, seqs, max_q_len, max_k_len, policy_stats=False,
          key_segments=None, num_segments=0, stats_w=None, no_reference=False) -> Call:
    return Call(q, k, v, q_ref, k_ref, ref_stats, key_padding_mask, row_mask,
                Options(divergence, heads_each, exclude_self, causal, scale, ref_scale, policy_stats, num_segments,
                        no_reference),
                seqs, max_q_len, max_k_len, key_segments, stats_w)


@torch.library.custom_op("ral::attention_kl", mutates_args=())
def _attention_kl_op(q: Tensor, k: Tensor, v: Optional[Tensor], q_ref: Tensor, k_ref: Tensor,
                     ref_stats: Optional[Tensor], key_padding_mask: Optional[Tensor],
                     row_mask: Optional[Tensor], divergence: str, heads_each: bool, exclude_self: bool,
                     causal: bool, scale: float, ref_scale: float, backend: str,
                     seqs: Optional[Tensor] = None, max_q_len: int = 0, max_k_len: int = 0,
                     policy_stats: bool = False, key_segments: Optional[Tensor] = None, num_segments: int = 0,
                     no_reference: bool = False
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> out (B,H,Sq,Dv)|(0,), div, stats (B,H,Sq,2), ref_stats_out (B,Hr,Sq,2)|(0,), gbar, cbar (B,H,Sq),
    entropy, mass, cstats (outputs.StatsOutputs; (0,) without policy_stats).
    seqs (N, 8) int32: the sequence table (docs/design.md, "Packed sequences"), or None (dense).
    key_segments (B, Sk) int32 with num_segments 1..8, or None and 0. no_reference (with policy_stats
    and ref_stats given): statistics only, the reference arguments are placeholders, div is 0."""
    call = _call(q, k, v, q_ref, k_ref, ref_stats, key_padding_mask, row_mask, divergence, heads_each,
                 exclude_self, causal, scale, ref_scale, seqs, max_q_len, max_k_len, policy_stats, key_segments,
                 num_segments, no_reference=no_reference)
    res = tuple(backends.module(backends.resolve(backend, call)).forward(call))
    if len(res) == len(outputs.ForwardOutputs._fields):  # a backend without statistics (never asked for them)
        res = res + tuple(outputs.stats_outputs(q, heads_each, False, 0))
    return res


@_attention_kl_op.register_fake
def _attention_kl_fake(q, k, v, q_ref, k_ref, ref_stats, key_padding_mask, row_mask, divergence,
                       heads_each, exclude_self, causal, scale, ref_scale, backend, seqs=None, max_q_len=0,
                       max_k_len=0, policy_stats=False, key_segments=None, num_segments=0, no_reference=False):
    return (tuple(outputs.forward_outputs(q, v, q_ref, ref_stats is not None, heads_each))
            + tuple(outputs.stats_outputs(q, heads_each, policy_stats, num_segments)))


@torch.library.custom_op("ral::attention_kl_backward", mutates_args=())
def _attention_kl_backward_op(dout: Optional[Tensor], ddiv: Tensor, delta: Tensor, q: Tensor, k: Tensor,
                              v: Optional[Tensor], q_ref: Tensor, k_ref: Tensor, stats: Tensor,
                              ref_stats: Tensor, gbar: Tensor, key_padding_mask: Optional[Tensor],
                              divergence: str, heads_each: bool, exclude_self: bool, causal: bool,
                              scale: float, ref_scale: float, backend: str,
                              seqs: Optional[Tensor] = None, max_q_len: int = 0, max_k_len: int = 0,
                              key_segments: Optional[Tensor] = None, num_segments: int = 0,
                              stats_w: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """-> dq (B,H,Sq,D), dk (B,Hkv,Sk,D), dv (B,Hkv,Sk,Dv)|(0,) in the input dtypes.
    stats_w: the statistics' upstream weights (Call.stats_w) or None; with it, gbar is gbar_total."""
    call = _call(q, k, v, q_ref, k_ref, ref_stats, key_padding_mask, None, divergence, heads_each,
                 exclude_self, causal, scale, ref_scale, seqs, max_q_len, max_k_len, stats_w is not None,
                 key_segments, num_segments, stats_w)
    return backends.module(backends.resolve(backend, call)).backward(call, dout, ddiv, delta, stats, ref_stats,
                                                                     gbar)


@_attention_kl_backward_op.register_fake
def _attention_kl_backward_fake(dout, ddiv, delta, q, k, v, q_ref, k_ref, stats, ref_stats, gbar,
                                key_padding_mask, divergence, heads_each, exclude_self, causal, scale,
                                ref_scale, backend, seqs=None, max_q_len=0, max_k_len=0, key_segments=None,
                                num_segments=0, stats_w=None):
    return outputs.cast_gradients(*outputs.gradient_accumulators(q, k, v), q, k, v)


def _setup_context(ctx, inputs, output):
    (q, k, v, q_ref, k_ref, ref_stats, key_padding_mask, row_mask, divergence, heads_each,
     exclude_self, causal, scale, ref_scale, backend, seqs, max_q_len, max_k_len, policy_stats, key_segments,
     num_segments, no_reference) = inputs
    out, _, stats, ref_stats_out, gbar, cbar, entropy, mass, cstats = output
    ctx.save_for_backward(q, k, v, q_ref, k_ref, ref_stats if ref_stats is not None else ref_stats_out,
                          key_padding_mask, row_mask, out if v is not None else None, stats, gbar, cbar, seqs,
                          key_segments, entropy, mass, cstats)
    ctx.flags = (divergence, heads_each, exclude_self, causal, scale, ref_scale, backend, max_q_len, max_k_len,
                 policy_stats, num_segments, no_reference)


def _backward(ctx, dout, ddiv, _stats, _ref_stats_out, _gbar, _cbar, dentropy, dmass, _cstats):
    (q, k, v, q_ref, k_ref, ref_stats, key_padding_mask, row_mask, out, stats, gbar, cbar, seqs, key_segments,
     entropy, mass, cstats) = ctx.saved_tensors
    (divergence, heads_each, exclude_self, causal, scale, ref_scale, backend, max_q_len, max_k_len,
     policy_stats, num_segments, no_reference) = ctx.flags
    if no_reference:  # no divergence: w = 0, and the backward never reads the placeholder reference
        ddiv = None
    live = _live_rows(stats, row_mask, heads_each)
    dout, w, delta = _backward_inputs(dout, ddiv, out if v is not None else None, stats, gbar, cbar, live, heads_each)
    stats_w = None
    if policy_stats and (dentropy is not None or (num_segments and dmass is not None)):
        gbar, stats_w, delta = _stats_backward_inputs(w, gbar, delta, dentropy, dmass if num_segments else None,
                                                      entropy, mass, cstats, stats, live, heads_each,
                                                      num_segments)
    dq, dk, dv = torch.ops.ral.attention_kl_backward(
        dout, w, delta, q, k, v, q_ref, k_ref, stats, ref_stats, gbar,
        key_padding_mask, divergence, heads_each, exclude_self, causal, scale, ref_scale, backend,
        seqs, max_q_len, max_k_len, key_segments if stats_w is not None else None,
        num_segments if stats_w is not None else 0, stats_w)
    return (dq, dk, dv if v is not None else None) + (None,) * 19


def _live_rows(stats, row_mask, heads_each):
    """Rows that carry a divergence and statistics: row_mask True and a non-empty policy support."""
    lse_support = stats[..., 1] if heads_each else stats[:, 0, :, 1]
    live = ~torch.isneginf(lse_support)
    if row_mask is not None:
        live = live & (row_mask[:, None] if heads_each else row_mask)
    return live


def _backward_inputs(dout, ddiv, out, stats, gbar, cbar, live, heads_each):
    """(dout, w, delta) that a backend's backward takes (ral.backends), from the upstream
    gradients and the forward's outputs (out None when there is no v); live = _live_rows(...); row-wise."""
    n_heads = stats.shape[1]
    # w: the upstream gradient of div, 0 on rows that carry no divergence (row_mask False, empty P).
    w = ddiv.float() if ddiv is not None else torch.zeros_like(gbar)
    w = torch.where(live, w, torch.zeros_like(w))
    # delta = rowsum(dout * out) + w * c_h / H: the c_h term has the shape of the softmax's Delta.
    if out is not None:
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        delta = _rowwise_dot(dout, out)
    else:
        dout, delta = None, torch.zeros_like(cbar)
    if not heads_each:
        delta = delta + w[:, None, :] * cbar / n_heads
    return dout, w.contiguous(), delta.contiguous()


def _stats_backward_inputs(w, gbar, delta, dentropy, dmass, entropy, mass, cstats, stats, live, heads_each,
                           num_segments):
    """(gbar_total, stats_w, delta) of a backward with policy statistics (docs/design.md, "Attention
    statistics"): g_j gains w_E (-log pi_j) + w_seg(j), so, being linear in the weights,
    gbar_total = w gbar + w_E entropy + sum_s w_s mass_s, and ("mean") delta gains
    (w_E c^E_h + sum_s w_s c^s_h) / H from the forward's cstats. stats_w = [w_E, w_0 ..] per row, 0 on
    dead rows (live False: _live_rows)."""
    w_e = dentropy.float() if dentropy is not None else torch.zeros_like(w)
    weights = [w_e[..., None]]
    if num_segments:
        weights.append(dmass.float() if dmass is not None else w.new_zeros(w.shape + (num_segments,)))
    stats_w = torch.where(live[..., None], torch.cat(weights, -1), torch.zeros((), device=w.device))
    values = torch.cat([entropy[..., None]] + ([mass] if num_segments else []), -1)
    gbar_total = w * gbar + (stats_w * values).sum(-1)
    if not heads_each:
        delta = delta + (stats_w[:, None] * cstats).sum(-1) / stats.shape[1]
    return gbar_total.contiguous(), stats_w.contiguous(), delta.contiguous()


_attention_kl_op.register_autograd(_backward, setup_context=_setup_context)


def _rowwise_dot(a: Tensor, b: Tensor, chunk_elements: int = 1 << 24) -> Tensor:
    """sum(a * b, -1) in fp32 for (B, H, S, Dv) tensors, upcasting one slice of heads at a time so
    that no fp32 copy of a whole low-precision tensor is held: (B, H, S, Dv) x 2 -> (B, H, S)."""
    heads_per_chunk = max(1, chunk_elements // max(1, a[:, :1].numel()))
    return torch.cat([(a[:, h:h + heads_per_chunk].float() * b[:, h:h + heads_per_chunk].float()).sum(-1)
                      for h in range(0, a.shape[1], heads_per_chunk)], dim=1)
