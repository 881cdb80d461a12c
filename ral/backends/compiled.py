"""Launchers for the compiled kernels in ``ral._C`` (csrc/): shared by the cpu and cuda backends.

The compiled module links no libtorch: this layer allocates every output and scratch buffer with
torch and hands the kernels an ``AttentionKLParams`` (csrc/common/params.h) of addresses, shapes
and element strides, plus (on CUDA) torch's current stream.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import outputs
from .call import Call

try:
    from .. import _C
    _IMPORT_ERROR: Optional[str] = None
except ImportError as err:  # not built (e.g. a source checkout without pip install -e .)
    _C = None
    _IMPORT_ERROR = f"the compiled module ral._C is not built ({err})"

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def import_error() -> Optional[str]:
    return _IMPORT_ERROR


def _inner_contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    """Kernels take any strides but need the last dimension contiguous."""
    if t is None or t.stride(-1) == 1 or t.shape[-1] == 1:
        return t
    return t.contiguous()


def _view(t: Optional[Tensor]):
    view = _C.View()
    if t is not None:
        view.ptr = t.data_ptr()
        view.stride = list(t.stride()) + [0] * (4 - t.dim())
    return view


def params(call: Call, num_threads: int = 1):
    """An AttentionKLParams with the inputs, shapes and options of `call` (no outputs yet)."""
    q, k, v, q_ref, k_ref = (_inner_contiguous(t) for t in (call.q, call.k, call.v, call.q_ref, call.k_ref))
    opts = call.options
    p = _C.AttentionKLParams()
    p.batch, p.heads, p.q_len, p.head_dim = q.shape
    p.kv_heads, p.k_len = k.shape[1], k.shape[2]
    p.v_head_dim = v.shape[3] if v is not None else 0
    p.ref_heads, p.ref_kv_heads, p.ref_head_dim = q_ref.shape[1], k_ref.shape[1], q_ref.shape[3]
    p.dtype, p.ref_dtype = _DTYPE_CODES[q.dtype], _DTYPE_CODES[q_ref.dtype]
    p.divergence = opts.divergence_code
    p.heads_each, p.exclude_self, p.causal = opts.heads_each, opts.exclude_self, opts.causal
    p.scale, p.ref_scale = opts.scale, opts.ref_scale
    p.has_v = v is not None
    p.has_ref_stats = call.ref_stats is not None
    p.has_key_padding_mask = call.key_padding_mask is not None
    p.has_row_mask = call.row_mask is not None
    p.num_threads = num_threads
    p.q, p.k, p.v, p.q_ref, p.k_ref = (_view(t) for t in (q, k, v, q_ref, k_ref))
    p.ref_stats_in = _view(call.ref_stats)
    p.key_padding_mask = _view(call.key_padding_mask)
    p.row_mask = _view(call.row_mask)
    p.policy_stats, p.num_segments, p.no_reference = opts.policy_stats, opts.num_segments, opts.no_reference
    if opts.num_segments:
        p.key_segments = _view(call.key_segments)
    if call.seqs is not None:
        seqs = call.seqs
        if seqs.dtype != torch.int32 or seqs.dim() != 2 or seqs.shape[1] != 8 or not seqs.is_contiguous() \
                or seqs.shape[0] == 0:
            raise ValueError(f"seqs: must be a contiguous int32 (N, 8) tensor with N >= 1, "
                             f"got {seqs.dtype} of shape {tuple(seqs.shape)}")
        p.seqs, p.num_seqs = seqs.data_ptr(), seqs.shape[0]
        p.max_q_len, p.max_k_len = call.max_q_len, call.max_k_len
    # keep the (possibly copied) tensors alive as long as p
    p_tensors = (q, k, v, q_ref, k_ref, call.key_segments)
    return p, p_tensors


def _scratch(p, nbytes: int, device: torch.device) -> Optional[torch.Tensor]:
    """Allocates `nbytes` of kernel scratch (uint8) and points p at it; None (and p.scratch_bytes
    0) for 0 bytes."""
    nbytes = int(nbytes)
    if nbytes <= 0:
        p.scratch, p.scratch_bytes = 0, 0
        return None
    scratch = torch.empty((nbytes,), dtype=torch.uint8, device=device)
    p.scratch, p.scratch_bytes = scratch.data_ptr(), nbytes
    return scratch


def forward(call: Call, launch: Callable, num_threads: int = 1,
            scratch_bytes: Optional[Callable] = None):
    """Allocate the forward outputs (and, when `scratch_bytes(p)` gives a positive size, the
    kernel's scratch), fill the params, run `launch(p)`. Returns the six outputs described in
    ral.backends (ForwardOutputs), followed by the three StatsOutputs when the call asks for
    policy statistics."""
    opts = call.options
    out, div, stats, ref_stats_out, gbar, cbar = outputs.forward_outputs(
        call.q, call.v, call.q_ref, call.ref_stats is not None, opts.heads_each)
    extra = outputs.stats_outputs(call.q, opts.heads_each, opts.policy_stats, opts.num_segments)
    p, keep = params(call, num_threads)
    p.out = out.data_ptr() if call.v is not None else 0
    p.div, p.stats, p.gbar, p.cbar = div.data_ptr(), stats.data_ptr(), gbar.data_ptr(), cbar.data_ptr()
    p.ref_stats_out = ref_stats_out.data_ptr() if call.ref_stats is None else 0
    if opts.policy_stats:
        p.entropy = extra.entropy.data_ptr()
        p.mass = extra.mass.data_ptr() if opts.num_segments else 0
        p.cstats = extra.cstats.data_ptr() if not opts.heads_each else 0
    scratch = _scratch(p, scratch_bytes(p) if scratch_bytes is not None else 0, call.q.device)
    launch(p)
    del keep, scratch
    result = outputs.ForwardOutputs(out, div, stats, ref_stats_out, gbar, cbar)
    return result + extra if opts.policy_stats else result


def backward(call: Call, dout, ddiv, delta, stats, ref_stats, gbar, launch: Callable,
             scratch_bytes: Callable, num_threads: int = 1):
    """Allocate fp32 gradient buffers (and the kernel's scratch), run `launch(p)`, cast the
    gradients to the input dtypes. Returns (dq, dk, dv)."""
    q, k, v = call.q, call.k, call.v
    dq, dk, dv = outputs.gradient_accumulators(q, k, v)
    p, keep = params(call, num_threads)
    p.has_ref_stats = True  # the backward always reads the reference statistics the forward used
    p.ref_stats_in = _view(ref_stats)
    stats, gbar, ddiv, delta = (t.contiguous() for t in (stats, gbar, ddiv, delta))
    p.stats, p.gbar, p.ddiv, p.delta = stats.data_ptr(), gbar.data_ptr(), ddiv.data_ptr(), delta.data_ptr()
    # the forward-only outputs are not read by the backward; give the re-check non-null addresses
    p.div, p.cbar = gbar.data_ptr(), delta.data_ptr()
    stats_w = None
    if call.options.policy_stats:
        stats_w = call.stats_w.float().contiguous()
        p.stats_w = stats_w.data_ptr()
        p.entropy = p.mass = p.cstats = stats_w.data_ptr()  # forward-only, not read (as div, cbar)
    p.dq, p.dk = dq.data_ptr(), dk.data_ptr()
    if v is not None:
        dout = dout.contiguous()
        p.dout, p.dv, p.out = dout.data_ptr(), dv.data_ptr(), dout.data_ptr()
    scratch = _scratch(p, scratch_bytes(p), q.device)
    launch(p)
    del keep, scratch
    return outputs.cast_gradients(dq, dk, dv, q, k, v)
