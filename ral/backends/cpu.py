"""backend="cpu": the tiled, multithreaded C++ kernels of csrc/cpu (see ral.backends for the
interface), with or without a sequence table (Call.seqs). Extra memory: O(B·H·Sq) row statistics,
plus a backward scratch of per-thread fp32 dK/dV partials (threads × Hkv·L·(D+Dv) floats, L = Sk,
or max_k_len with a table): linear in the key length, never Sq × Sk."""

from __future__ import annotations

from typing import Optional

import torch

from . import compiled
from .call import Call


def unavailable_reason() -> Optional[str]:
    return compiled.import_error()


def unsupported_reason(call: Call) -> Optional[str]:
    if call.q.device.type != "cpu":
        return f"needs CPU tensors, got {call.q.device}"
    return None


def forward(call: Call):
    return compiled.forward(call, compiled._C.cpu_forward, torch.get_num_threads())


def backward(call: Call, dout, ddiv, delta, stats, ref_stats, gbar):
    return compiled.backward(call, dout, ddiv, delta, stats, ref_stats, gbar, compiled._C.cpu_backward,
                              compiled._C.cpu_backward_scratch_bytes, torch.get_num_threads())
