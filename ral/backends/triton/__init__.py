"""backend="triton": fused attention + attention-divergence kernels in Triton (docs/design.md,
"The op", "The math", "Attention statistics", "Gradient", "Memory", "Packed sequences").

Implements the backend interface of ``ral.backends``: ``unavailable_reason``, ``unsupported_reason``,
``forward``, ``backward``. GPU kernels; CPU tensors run under the Triton interpreter when the process
set TRITON_INTERPRET=1 before this package was imported (tests; slow). Importing needs no GPU, and
without triton installed ``unavailable_reason()`` says why.

Package layout:
  common.py    jit helpers: loads, the work unit of a sequence table, online softmax in log2 units
               (log2(e) folded into the scales), key sets, the policy / reference on a tile,
               the divergence terms, the policy statistics' sums and their gradient
  forward.py   forward_kernel: two key sweeps (jsd, heads="mean", policy statistics) or one
               (heads="each" with kl / reverse_kl)
  backward.py  backward_kernel (dq, dk, dv; query splits; the statistics' g_total)
  configs.py   settings() (the environment knobs), tile configs per head-dim class, autotune pruning
  launch.py    outputs, grids, query splits and the named kernel arguments (forward_launch /
               backward_launch)

A call may carry a sequence table (``Call.seqs``, packed batches and context-parallel chunks):
unit s then reads rows q_start.. and keys k_start.. of batch `batch`, row i at key position
q_pos + i; the grids span max_q_len / max_k_len per unit and programs past their unit's end return.
Units may share keys, so dk / dv are added with atomics; rows that no unit covers are not written
(a packed batch's table covers every row). Without a table (HAS_SEQS False) every unit is a batch
row. The design history and the scheduling model are in benchmarks/RESULTS.md,
"Triton kernels: design history and scheduling model".
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import alert_not_deterministic, outputs
from ..call import Call

from .common import IMPORT_ERROR
from .configs import MAX_HEAD_DIM, interpreter_problem
from .launch import INTERPRETED, backward_launch, forward_launch

__all__ = ["unavailable_reason", "unsupported_reason", "forward", "backward"]


def unavailable_reason() -> Optional[str]:
    return IMPORT_ERROR


def unsupported_reason(call: Call) -> Optional[str]:
    if IMPORT_ERROR is not None:
        return IMPORT_ERROR
    device = call.q.device
    if device.type == "cpu":
        if not INTERPRETED:
            return ("CPU tensors run only under the Triton interpreter: set TRITON_INTERPRET=1 before "
                    "importing ral (slow; meant for tests), or use CUDA tensors")
        problem = interpreter_problem()
        if problem is not None:
            return problem
    elif device.type != "cuda":
        return f"needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
    dims = {"D (q.shape[3])": call.q.shape[3], "Dr (q_ref.shape[3])": call.q_ref.shape[3]}
    if call.v is not None:
        dims["Dv (v.shape[3])"] = call.v.shape[3]
    for name, dim in dims.items():
        if dim > MAX_HEAD_DIM:
            return f"head dim {name} = {dim} is above the Triton kernels' limit of {MAX_HEAD_DIM}"
    for name, t in (("q", call.q), ("q_ref", call.q_ref)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"{name}: dtype must be float32, float16 or bfloat16, got {t.dtype}"
    if call.seqs is not None and call.seqs.device != device:
        return f"seqs: must be on the tensors' device ({device}), got {call.seqs.device}"
    return None


def forward(call: Call):
    """-> out (B,H,Sq,Dv)|(0,), div, stats (B,H,Sq,2), ref_stats_out (B,Hr,Sq,2)|(0,), gbar, cbar (B,H,Sq),
    and, when call.options.policy_stats, entropy, mass, cstats (outputs.StatsOutputs).
    div, gbar and entropy are (B,Sq) for "mean" and (B,H,Sq) for "each"; all fp32 but out."""
    return forward_launch(call).run(call.q)


def backward(call: Call, dout, ddiv, delta, stats, ref_stats, gbar):
    """-> dq (B,H,Sq,D), dk (B,Hkv,Sk,D), dv (B,Hkv,Sk,Dv)|(0,) in the input dtypes.
    ddiv (w) and gbar like div; delta (B,H,Sq) = rowsum(dout*out) + w*cbar/H; stats (B,H,Sq,2);
    ref_stats (B,Hr,Sq,2): the reference statistics the forward used. With policy statistics
    (call.stats_w, call.key_segments) gbar is gbar_total and delta holds their c_h terms too."""
    alert_not_deterministic("ral's Triton backward (dq, and dk / dv of split or shared keys, summed over tiles)")
    dq, dk, dv = backward_launch(call, dout, ddiv, delta, stats, ref_stats, gbar).run(call.q)
    return outputs.cast_gradients(dq, dk, dv, call.q, call.k, call.v)
