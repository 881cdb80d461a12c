"""Launchers: outputs, grids, query splits, and the keyword arguments of each kernel launch.

``forward_launch`` / ``backward_launch`` build a launch without running it (``Launch``);
tests/test_triton_compile.py compiles exactly those arguments for sm_80 / sm_90a without a GPU.
Every tensor, stride and size goes to the kernel by name: ``strides("q", q)`` gives
{"stride_q": (batch, head, row, dim)}, one tuple per tensor placed by LAYOUT's dimension letters.

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
from .forward import forward_kernel

LOG2E = 1.4426950408889634

# Whether the kernels below were built for the interpreter (TRITON_INTERPRET when imported).
INTERPRETED = IMPORT_ERROR is None and settings().interpret
if IMPORT_ERROR is None and not INTERPRETED:
    FORWARD = autotuned(forward_kernel, FORWARD_TABLE, FORWARD_KEY)
    BACKWARD = autotuned(backward_kernel, BACKWARD_TABLE, BACKWARD_KEY, reset_to_zero=["DQ", "DK", "DV"])
else:
    FORWARD, BACKWARD = forward_kernel, backward_kernel

# The backward's grid aims at this many waves (programs per SM; ptxas gives the backward 170-255
# registers x 256 threads, so one program fits an SM at a time). See benchmarks/RESULTS.md,
# "Triton kernels: design history and scheduling model".
BACKWARD_MIN_WAVES = 3

# Dimension letters of every tensor the kernels read or write: b batch, h head, m query row,
# n key, d feature, c a column (the [lse_A, lse_P] of the statistics; the [entropy, mass_0 ..] of
# the policy statistics; the segment of mass).
LAYOUT = {
    "q": "bhmd", "k": "bhnd", "v": "bhnd", "q_ref": "bhmd", "k_ref": "bhnd", "ref_stats": "bhmc",
    "key_pad": "bn", "row_mask": "bm", "seg": "bn", "out": "bhmd", "stats": "bhmc", "div": "bhm",
    "cbar": "bhm", "mass": "bhmc", "cstats": "bhmc", "dout": "bhmd", "ddiv": "bhm", "delta": "bhm",
    "stats_w": "bhmc", "dq": "bhmd", "dk": "bhnd", "dv": "bhnd",
}
# The slot of each dimension letter in a kernel's stride tuple (common.py: BATCH, HEAD, ROW / KEY, DIM / COL).
SLOTS = {"b": 0, "h": 1, "m": 2, "n": 2, "d": 3, "c": 3}


def strides(name: str, t: Optional[torch.Tensor]) -> dict:
    """{"stride_<name>": (batch, head, row | key, dim | column)}: the strides of the dimensions
    LAYOUT[name] in their slots, 0 for the others and for a missing tensor. A per-row tensor of
    heads="mean" (no head dimension: (B, Sq) for "bhm", (B, Sq, S) for "bhmc") gets head stride 0."""
    dims = LAYOUT[name]
    values = [0, 0, 0, 0]
    if t is not None:
        if t.dim() == len(dims):
            present = dims
        elif dims.startswith("bh") and t.dim() == len(dims) - 1:
            present = "b" + dims[2:]
        else:
            raise ValueError(f"{name}: expected {len(dims)} dimensions ({dims}), got shape {tuple(t.shape)}")
        for dim, stride in zip(present, t.stride()):
            values[SLOTS[dim]] = stride
    return {f"stride_{name}": tuple(values)}


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
    interpreter) picks the interpreter-only flags. Outputs: the six ForwardOutputs, then the three
    StatsOutputs when the call asks for policy statistics."""
    q, k, v, q_ref, k_ref = call.q, call.k, call.v, call.q_ref, call.k_ref
    interp = INTERPRETED if interp is None else interp
    opts = call.options
    n_heads = q.shape[1]
    each = opts.heads_each
    has_ref_stats = call.ref_stats is not None
    out, div, stats, ref_stats_out, gbar, cbar = outputs.forward_outputs(q, v, q_ref, has_ref_stats, each)
    entropy, mass, cstats = outputs.stats_outputs(q, each, opts.policy_stats, opts.num_segments)
    ref_stats = call.ref_stats if has_ref_stats else ref_stats_out
    key_pad, row_mask = _mask_u8(call.key_padding_mask), _mask_u8(call.row_mask)
    segs = call.key_segments if opts.num_segments else None

    kernel = FORWARD
    size = sizes(call)
    kwargs = dict(
        Q=q, K=k, V=v if v is not None else q, Q_REF=q_ref, K_REF=k_ref, REF_STATS=ref_stats,
        KEY_PAD=key_pad if key_pad is not None else stats, ROW_MASK=row_mask if row_mask is not None else stats,
        SEGS=segs if segs is not None else stats, OUT=out if v is not None else q, STATS=stats, DIV=div, GBAR=gbar,
        CBAR=cbar, **_stats_outputs(opts, stats, entropy, mass, cstats),
        **strides("q", q), **strides("k", k), **strides("v", v), **strides("q_ref", q_ref),
        **strides("k_ref", k_ref), **strides("ref_stats", ref_stats), **strides("key_pad", key_pad),
        **strides("row_mask", row_mask), **strides("seg", segs), **strides("out", out if v is not None else None),
        **strides("stats", stats), **strides("div", div), **strides("cbar", cbar),
        **strides("mass", mass if opts.num_segments else None),
        **strides("cstats", cstats if opts.policy_stats and not each else None),
        **seqs_table(call), **size,
        scale2=opts.scale * LOG2E, ref_scale2=opts.ref_scale * LOG2E,
        DIVERGENCE=opts.divergence_code, HEADS_EACH=each,
        ONE_SWEEP=each and opts.divergence != "jsd" and not opts.policy_stats,
        EXCLUDE_SELF=opts.exclude_self, CAUSAL=opts.causal, HAS_V=v is not None,
        HAS_REF_STATS=has_ref_stats, NO_REF=opts.no_reference, HAS_KEY_PAD=key_pad is not None,
        HAS_ROW_MASK=row_mask is not None, **_stats_flags(opts),
        H_PAD=1 if each else triton.next_power_of_2(n_heads), **_flags(call, interp, kernel))
    assert gbar.stride() == div.stride()  # GBAR (and ENTROPY) are addressed with DIV's strides
    assert not opts.policy_stats or entropy.stride() == div.stride()
    units = n_units(call) * (n_heads if each else 1)
    grid = forward_grid(size["max_q_len"], units)
    results = (out, div, stats, ref_stats_out, gbar, cbar)
    if opts.policy_stats:
        results += (entropy, mass, cstats)
    return Launch(kernel, grid, kwargs, results, empty=size["max_q_len"] == 0 or units == 0)


def _stats_outputs(opts, placeholder, entropy, mass, cstats) -> dict:
    """ENTROPY, MASS, CSTATS of the forward kernel: the statistics outputs the call has, else
    `placeholder` (never written)."""
    return dict(ENTROPY=entropy if opts.policy_stats else placeholder,
                MASS=mass if opts.num_segments else placeholder,
                CSTATS=cstats if opts.policy_stats and not opts.heads_each else placeholder)


def _stats_flags(opts) -> dict:
    """POLICY_STATS, NUM_SEG (S) and NSTAT_PAD (columns [entropy, mass_0 .. mass_{S-1}], padded)."""
    return dict(POLICY_STATS=opts.policy_stats, NUM_SEG=opts.num_segments,
                NSTAT_PAD=triton.next_power_of_2(1 + opts.num_segments) if opts.policy_stats else 1)


def backward_launch(call: Call, dout, ddiv, delta, stats, ref_stats, gbar,
                    interp: Optional[bool] = None) -> Launch:
    """The backward launch for `call` (arguments as backward()); outputs: the fp32 (dq, dk, dv|None).
    With policy statistics (call.stats_w), gbar is gbar_total (ral.backends)."""
    q, k, v, q_ref, k_ref = call.q, call.k, call.v, call.q_ref, call.k_ref
    interp = INTERPRETED if interp is None else interp
    opts = call.options
    kv_heads = k.shape[1]
    each = opts.heads_each
    dq, dk, dv = outputs.gradient_accumulators(q, k, v)
    w, gbar = ddiv.to(torch.float32).contiguous(), gbar.to(torch.float32).contiguous()
    stats_w = call.stats_w.to(torch.float32).contiguous() if opts.policy_stats else None
    segs = call.key_segments if opts.policy_stats and opts.num_segments else None
    key_pad = _mask_u8(call.key_padding_mask)
    dout = dout if v is not None else None

    kernel = BACKWARD
    size = sizes(call)
    kwargs = dict(
        Q=q, K=k, V=v if v is not None else q, Q_REF=q_ref, K_REF=k_ref, REF_STATS=ref_stats,
        KEY_PAD=key_pad if key_pad is not None else stats, SEGS=segs if segs is not None else stats,
        DOUT=dout if dout is not None else q, DDIV=w, DELTA=delta, STATS=stats, GBAR=gbar,
        STATS_W=stats_w if stats_w is not None else stats, DQ=dq, DK=dk, DV=dv if dv is not None else dk,
        **strides("q", q), **strides("k", k), **strides("v", v), **strides("q_ref", q_ref),
        **strides("k_ref", k_ref), **strides("ref_stats", ref_stats), **strides("key_pad", key_pad),
        **strides("seg", segs), **strides("dout", dout), **strides("ddiv", w), **strides("delta", delta),
        **strides("stats", stats), **strides("stats_w", stats_w), **strides("dq", dq), **strides("dk", dk),
        **strides("dv", dv), **seqs_table(call), n_units=n_units(call), kv_heads=kv_heads, **size,
        scale=opts.scale, scale2=opts.scale * LOG2E, ref_scale2=opts.ref_scale * LOG2E,
        DIVERGENCE=opts.divergence_code, HEADS_EACH=each,
        EXCLUDE_SELF=opts.exclude_self, CAUSAL=opts.causal, HAS_V=v is not None,
        HAS_KEY_PAD=key_pad is not None, **_stats_flags(opts), ACC_IN_REGS=each or kv_heads == 1,
        **_flags(call, interp, kernel))
    assert gbar.stride() == w.stride()  # GBAR is addressed with DDIV's strides
    groups = n_units(call) * (kv_heads if each else 1)
    grid = backward_grid(size["max_k_len"], size["max_q_len"], groups, q.device)
    empty = size["max_k_len"] == 0 or size["max_q_len"] == 0 or groups == 0
    return Launch(kernel, grid, kwargs, (dq, dk, dv), empty=empty)
