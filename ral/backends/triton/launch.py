"""Launchers: outputs, grids, query splits, and the keyword arguments of each kernel launch.

``forward_launch`` / ``backward_launch`` build a launch without running it (``Launch``);
tests/test_triton_compile.py compiles exactly those arguments for sm_80 / sm_90a without a GPU.
Every tensor, stride and size goes to the kernel by name: ``strides("q", q)`` gives
{"stride_q_b", "stride_q_h", "stride_q_m", "stride_q_d"} from LAYOUT's dimension letters.

The kernels are built once, when this module is imported: autotuned compiled kernels, or, under
TRITON_INTERPRET=1, the plain interpreted ones run with INTERPRETER_BLOCKS (and bf16 operands upcast
to fp32 before tl.dot: triton 3.9's interpreter computes bf16 dots wrongly).
"""

from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple, Optional

import torch

from .. import outputs
from ..call import Call

from .backward import backward_kernel
from .common import IMPORT_ERROR, triton
from .configs import (BACKWARD_KEY, BACKWARD_TABLE, FORWARD_KEY, FORWARD_TABLE, INTERPRETER_BLOCKS, autotuned,
                      settings)
from .forward import forward_each_kernel, forward_kernel

LOG2E = 1.4426950408889634

# Whether the kernels below were built for the interpreter (TRITON_INTERPRET when imported).
INTERPRETED = IMPORT_ERROR is None and settings().interpret
if IMPORT_ERROR is None and not INTERPRETED:
    FORWARD = autotuned(forward_kernel, FORWARD_TABLE, FORWARD_KEY)
    FORWARD_EACH = autotuned(forward_each_kernel, FORWARD_TABLE, FORWARD_KEY)
    BACKWARD = autotuned(backward_kernel, BACKWARD_TABLE, BACKWARD_KEY, reset_to_zero=["DQ", "DK", "DV"])
else:
    FORWARD, FORWARD_EACH, BACKWARD = forward_kernel, forward_each_kernel, backward_kernel

# The backward's grid aims at this many waves (programs per SM; ptxas gives the backward 170-255
# registers x 256 threads, so one program fits an SM at a time). See benchmarks/RESULTS.md,
# "Triton kernels: design history and scheduling model".
BACKWARD_MIN_WAVES = 3

# Dimension letters of every tensor the kernels read or write: b batch, h head, m query row,
# n key, d feature, c the [lse_A, lse_P] column of the statistics.
LAYOUT = {
    "q": "bhmd", "k": "bhnd", "v": "bhnd", "q_ref": "bhmd", "k_ref": "bhnd", "ref_stats": "bhmc",
    "key_pad": "bn", "row_mask": "bm", "out": "bhmd", "stats": "bhmc", "div": "bhm", "cbar": "bhm",
    "dout": "bhmd", "ddiv": "bhm", "delta": "bhm", "dq": "bhmd", "dk": "bhnd", "dv": "bhnd",
}


def strides(name: str, t: Optional[torch.Tensor]) -> dict:
    """{"stride_<name>_<dim>": stride} for the dimensions LAYOUT[name]; zeros for a missing tensor.
    A per-row tensor of heads="mean" ((B, Sq) for a "bhm" layout) gets head stride 0."""
    dims = LAYOUT[name]
    if t is None:
        values = [0] * len(dims)
    elif t.dim() == len(dims):
        values = list(t.stride())
    elif dims == "bhm" and t.dim() == 2:
        values = [t.stride(0), 0, t.stride(1)]
    else:
        raise ValueError(f"{name}: expected {len(dims)} dimensions ({dims}), got shape {tuple(t.shape)}")
    return {f"stride_{name}_{dim}": value for dim, value in zip(dims, values)}


def sizes(call: Call) -> dict:
    """Head counts, head dims and the per-unit lengths the grid spans (Sq, Sk, or the table's
    max_q_len, max_k_len), with the autotuner's length bucket."""
    q, k, v, q_ref, k_ref = call.q, call.k, call.v, call.q_ref, call.k_ref
    max_q_len, max_k_len = unit_lengths(call)
    return dict(n_heads=q.shape[1], group=q.shape[1] // k.shape[1], ref_heads=q_ref.shape[1],
                ref_group=q_ref.shape[1] // k_ref.shape[1], max_q_len=max_q_len, max_k_len=max_k_len,
                head_dim=q.shape[3], v_dim=v.shape[3] if v is not None else 0, ref_dim=q_ref.shape[3],
                len_bucket=triton.next_power_of_2(max(max_q_len, max_k_len, 1)))


def unit_lengths(call: Call) -> tuple:
    """(max_q_len, max_k_len): the tensors' Sq, Sk without a sequence table."""
    if call.seqs is None:
        return call.q.shape[2], call.k.shape[2]
    return int(call.max_q_len), int(call.max_k_len)


def n_units(call: Call) -> int:
    """Work units: B without a sequence table, its row count with one."""
    return call.q.shape[0] if call.seqs is None else call.seqs.shape[0]


def seqs_table(call: Call) -> dict:
    """SEQS and its row stride (a dummy pointer and 0 without a table)."""
    seqs = call.seqs
    if seqs is None:
        return dict(SEQS=call.q, stride_seqs=0, HAS_SEQS=False)
    if seqs.dtype != torch.int32 or seqs.dim() != 2 or seqs.shape[1] != 8:
        raise ValueError(f"seqs: expected an int32 (N, 8) table, got {seqs.dtype} {tuple(seqs.shape)}")
    if seqs.stride(1) != 1:
        seqs = seqs.contiguous()
    return dict(SEQS=seqs, stride_seqs=seqs.stride(0), HAS_SEQS=True)


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


def _flags(call: Call, interp: bool, kernel) -> dict:
    """Padded head dims, dot precision, the interpreter's bf16 upcast, and the fixed tile sizes
    when `kernel` is not autotuned (the interpreter)."""
    dtypes = (call.q.dtype, call.q_ref.dtype)
    flags = dict(D_PAD=_pad(call.q.shape[3]), DV_PAD=_pad(call.v.shape[3] if call.v is not None else 16),
                 DR_PAD=_pad(call.q_ref.shape[3]), UPCAST=bool(interp and torch.bfloat16 in dtypes),
                 PREC="ieee" if torch.float32 in dtypes else "tf32")
    if not hasattr(kernel, "configs"):
        flags.update(INTERPRETER_BLOCKS)
    return flags


def _mask_u8(mask):
    """A bool mask viewed as uint8 (no copy), or None."""
    return mask.view(torch.uint8) if mask is not None else None


class Launch(NamedTuple):
    """One kernel launch as the launchers build it: ``kernel[grid](**kwargs)``.
    kernel: the autotuned kernel (compiled mode; BLOCK_M / BLOCK_N / warps / stages come from its
    configs) or the plain jit function (interpreter; kwargs carry the fixed tile sizes);
    outputs: the tensors the launch fills, as forward() / backward() return them; empty: the grid
    has no program (no unit has a row, or a key for the backward), so nothing is launched."""

    kernel: object
    grid: Callable
    kwargs: dict
    outputs: tuple
    empty: bool = False

    def run(self, device_tensor: torch.Tensor) -> tuple:
        if not self.empty:
            guard = torch.cuda.device(device_tensor.device) if device_tensor.is_cuda else contextlib.nullcontext()
            with guard:
                self.kernel[self.grid](**self.kwargs)
        return self.outputs


def forward_grid(n_rows: int, n_programs: int):
    """1-D grid of cdiv(n_rows, BLOCK_M) x n_programs: axis 0 takes 2^31 - 1 programs (axis 1
    only 65535, which B * H of a large batch exceeds); the kernel recovers n_programs from the
    grid size with the same cdiv."""
    return lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]) * n_programs,)


def q_splits(n_programs: int, n_query_blocks: int, device: torch.device) -> int:
    """Query splits of the backward: into how many chunks each key block's query sweep is cut.
    RAL_TRITON_Q_SPLITS=n forces n; else on CUDA the fewest that give the grid BACKWARD_MIN_WAVES
    waves of the device's SMs, and 1 on CPU (the interpreter). Never above the query block count
    (a chunk holds at least one block of the heaviest key block)."""
    forced = settings().q_splits
    if forced is not None:
        splits = forced
    elif device.type == "cuda":
        n_sm = torch.cuda.get_device_properties(device).multi_processor_count
        splits = triton.cdiv(BACKWARD_MIN_WAVES * n_sm, n_programs)
    else:
        splits = 1
    return max(1, min(splits, n_query_blocks))


def backward_grid(k_len: int, q_len: int, n_groups: int, device: torch.device):
    """1-D grid of cdiv(k_len, BLOCK_N) x n_groups x Q_SPLITS (n_groups = units or units * Hkv;
    k_len, q_len: per unit, the longest with a table); the kernel recovers Q_SPLITS from the
    grid size."""
    def grid(meta):
        n_programs = triton.cdiv(k_len, meta["BLOCK_N"]) * n_groups
        return (n_programs * q_splits(n_programs, triton.cdiv(q_len, meta["BLOCK_M"]), device),)
    return grid


def forward_launch(call: Call, interp: Optional[bool] = None) -> Launch:
    """The forward launch for `call`; interp (default: whether the kernels were built for the
    interpreter) picks the interpreter-only flags."""
    q, k, v, q_ref, k_ref = call.q, call.k, call.v, call.q_ref, call.k_ref
    interp = INTERPRETED if interp is None else interp
    opts = call.options
    n_heads = q.shape[1]
    each = opts.heads_each
    has_ref_stats = call.ref_stats is not None
    out, div, stats, ref_stats_out, gbar, cbar = outputs.forward_outputs(q, v, q_ref, has_ref_stats, each)
    ref_stats = call.ref_stats if has_ref_stats else ref_stats_out
    key_pad, row_mask = _mask_u8(call.key_padding_mask), _mask_u8(call.row_mask)

    kernel = FORWARD_EACH if each and opts.divergence != "jsd" else FORWARD
    size = sizes(call)
    kwargs = dict(
        Q=q, K=k, V=v if v is not None else q, Q_REF=q_ref, K_REF=k_ref, REF_STATS=ref_stats,
        KEY_PAD=key_pad if key_pad is not None else stats, ROW_MASK=row_mask if row_mask is not None else stats,
        OUT=out if v is not None else q, STATS=stats, DIV=div, GBAR=gbar, CBAR=cbar,
        **strides("q", q), **strides("k", k), **strides("v", v), **strides("q_ref", q_ref),
        **strides("k_ref", k_ref), **strides("ref_stats", ref_stats), **strides("key_pad", key_pad),
        **strides("row_mask", row_mask), **strides("out", out if v is not None else None),
        **strides("stats", stats), **strides("div", div), **strides("cbar", cbar),
        **seqs_table(call), **size,
        scale2=opts.scale * LOG2E, ref_scale2=opts.ref_scale * LOG2E,
        DIVERGENCE=opts.divergence_code, HEADS_EACH=each,
        EXCLUDE_SELF=opts.exclude_self, CAUSAL=opts.causal, HAS_V=v is not None,
        HAS_REF_STATS=has_ref_stats, HAS_KEY_PAD=key_pad is not None, HAS_ROW_MASK=row_mask is not None,
        H_PAD=1 if each else triton.next_power_of_2(n_heads), **_flags(call, interp, kernel))
    assert gbar.stride() == div.stride()  # GBAR is addressed with DIV's strides
    units = n_units(call) * (n_heads if each else 1)
    grid = forward_grid(size["max_q_len"], units)
    return Launch(kernel, grid, kwargs, (out, div, stats, ref_stats_out, gbar, cbar),
                  empty=size["max_q_len"] == 0 or units == 0)


def backward_launch(call: Call, dout, ddiv, delta, stats, ref_stats, gbar,
                    interp: Optional[bool] = None) -> Launch:
    """The backward launch for `call` (arguments as backward()); outputs: the fp32 (dq, dk, dv|None)."""
    q, k, v, q_ref, k_ref = call.q, call.k, call.v, call.q_ref, call.k_ref
    interp = INTERPRETED if interp is None else interp
    opts = call.options
    kv_heads = k.shape[1]
    each = opts.heads_each
    dq, dk, dv = outputs.gradient_accumulators(q, k, v)
    w, gbar = ddiv.to(torch.float32).contiguous(), gbar.to(torch.float32).contiguous()
    key_pad = _mask_u8(call.key_padding_mask)
    dout = dout if v is not None else None

    kernel = BACKWARD
    size = sizes(call)
    kwargs = dict(
        Q=q, K=k, V=v if v is not None else q, Q_REF=q_ref, K_REF=k_ref, REF_STATS=ref_stats,
        KEY_PAD=key_pad if key_pad is not None else stats, DOUT=dout if dout is not None else q,
        DDIV=w, DELTA=delta, STATS=stats, GBAR=gbar, DQ=dq, DK=dk, DV=dv if dv is not None else dk,
        **strides("q", q), **strides("k", k), **strides("v", v), **strides("q_ref", q_ref),
        **strides("k_ref", k_ref), **strides("ref_stats", ref_stats), **strides("key_pad", key_pad),
        **strides("dout", dout), **strides("ddiv", w), **strides("delta", delta), **strides("stats", stats),
        **strides("dq", dq), **strides("dk", dk), **strides("dv", dv),
        **seqs_table(call), n_units=n_units(call), kv_heads=kv_heads, **size,
        scale=opts.scale, scale2=opts.scale * LOG2E, ref_scale2=opts.ref_scale * LOG2E,
        DIVERGENCE=opts.divergence_code, HEADS_EACH=each,
        EXCLUDE_SELF=opts.exclude_self, CAUSAL=opts.causal, HAS_V=v is not None,
        HAS_KEY_PAD=key_pad is not None, ACC_IN_REGS=each or kv_heads == 1, **_flags(call, interp, kernel))
    assert gbar.stride() == w.stride()  # GBAR is addressed with DDIV's strides
    groups = n_units(call) * (kv_heads if each else 1)
    grid = backward_grid(size["max_k_len"], size["max_q_len"], groups, q.device)
    empty = size["max_k_len"] == 0 or size["max_q_len"] == 0 or groups == 0
    return Launch(kernel, grid, kwargs, (dq, dk, dv), empty=empty)
