"""backend="cuda": the CUDA C++ kernels of csrc/cuda (see ral.backends for the interface).

They take float16 and bfloat16 inputs; float32 CUDA calls are routed by backend="auto" to the
Triton backend (an explicit backend="cuda" with float32 raises ValueError)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import alert_not_deterministic, compiled
from .call import Call


def unavailable_reason() -> Optional[str]:
    if compiled.import_error() is not None:
        return compiled.import_error()
    if not getattr(compiled._C, "has_cuda", False):
        return "ral._C was built without the CUDA kernels (nvcc was not found at install time)"
    return None


def _widened_placeholders(call: Call) -> Call:
    """The call with ral.ops.attention_stats' reference placeholders (q_ref, k_ref: zero-stride, head dim 1)
    zero-padded to head dim 8, the smallest the kernels take, still zero-stride over (B, H, S): every
    score q_ref k_ref^T is unchanged. The kernels never read them with no_reference, nor in a backward
    with w = 0, which is the only backward such a forward gets (ral.ops)."""
    def placeholder(t):
        return t.shape[-1] == 1 and all(s == 0 for s in t.stride())

    if not (placeholder(call.q_ref) and placeholder(call.k_ref)):
        return call

    def widened(t):
        row = torch.nn.functional.pad(t[(0,) * (t.dim() - 1)], (0, 7))  # [c, 0, 0, 0, 0, 0, 0, 0]
        return row.expand(*t.shape[:-1], 8)

    return dataclasses.replace(call, q_ref=widened(call.q_ref), k_ref=widened(call.k_ref))


def unsupported_reason(call: Call) -> Optional[str]:
    if not call.q.is_cuda:
        return f"needs CUDA tensors, got {call.q.device}"
    p, _ = compiled.params(_widened_placeholders(call))
    with torch.cuda.device(call.q.device):  # cuda_supports checks that device's shared memory
        supported = compiled._C.cuda_supports(p)
    if not supported:
        dims = compiled._C.cuda_head_dims()
        return (f"the CUDA kernels take float16/bfloat16 with head dims D, Dr, Dv in {dims[0]}..{dims[-1]} "
                f"(step {dims[1] - dims[0]}) whose tiles fit the device's shared memory per block "
                f"(99 KB on sm_86 / sm_89 holds D, Dv up to about 144; statistics take 32 KB more in the "
                f"backward), got {call.q.dtype} with "
                f"D={call.q.shape[-1]}, Dr={call.q_ref.shape[-1]}"
                + (f", Dv={call.v.shape[-1]}" if call.v is not None else ""))
    return None


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def forward(call: Call):
    alert_not_deterministic("ral's CUDA forward (div, gbar and c_h summed over key splits)")
    call = _widened_placeholders(call)
    with torch.cuda.device(call.q.device):
        return compiled.forward(call, lambda p: compiled._C.cuda_forward(p, _stream()))


def backward(call: Call, dout, ddiv, delta, stats, ref_stats, gbar):
    alert_not_deterministic("ral's CUDA backward (dq, dk and dv summed over tiles)")
    call = _widened_placeholders(call)
    with torch.cuda.device(call.q.device):
        return compiled.backward(call, dout, ddiv, delta, stats, ref_stats, gbar,
                                  lambda p: compiled._C.cuda_backward(p, _stream()),
                                  compiled._C.cuda_backward_scratch_bytes)
