"""backend="cpu": the tiled, multithreaded C++ kernels of csrc/cpu (see ral.backends for the
interface), with or without a sequence table (Call.seqs). Extra memory: O(B·H·Sq) row statistics,
plus a backward scratch of two key tiles' fp32 dK/dV per thread (threads × 2·Hkv·64·(D+Dv) floats,
added into dk/dv tile by tile, each key row's additions in a fixed order: B·Sk int32 turn counters,
so the results are the same bits from run to run, docs/design.md "Determinism"), and in the forward
a score cache of at most SCORE_CACHE_BYTES (at most threads × (H+Hr)·BM·(L + L/64) floats, BM <= 128
query rows: pass 1's exponentials and tile maxima for heads="mean", the scores for "each"): linear
in the key length, never Sq × Sk."""

from __future__ import annotations

from typing import Optional

import torch

from . import compiled
from .call import Call


# The forward keeps both models' scores of a query block from its first sweep over the keys for
# the second (saving 2 of its 5 GEMMs on every cached key tile) in a cache of at most this many
# bytes, all threads together; key tiles past it are recomputed. It is freed when the forward
# returns. At the main job's shape (S=4096, H=Hr=8, 2 threads) it holds the first 2048 keys of
# each query block, about 3/4 of the causal tiles, and it sets the peak of a forward + backward
# there (the backward's own scratch is one key tile a thread).
SCORE_CACHE_BYTES = 48 << 20


def _forward_scratch_bytes(p) -> int:
    return min(compiled._C.cpu_forward_scratch_bytes(p), SCORE_CACHE_BYTES)


def unavailable_reason() -> Optional[str]:
    return compiled.import_error()


def unsupported_reason(call: Call) -> Optional[str]:
    if call.q.device.type != "cpu":
        return f"needs CPU tensors, got {call.q.device}"
    return None


def forward(call: Call):
    return compiled.forward(call, compiled._C.cpu_forward, torch.get_num_threads(), _forward_scratch_bytes)


def backward(call: Call, dout, ddiv, delta, stats, ref_stats, gbar):
    return compiled.backward(call, dout, ddiv, delta, stats, ref_stats, gbar, compiled._C.cpu_backward,
                              compiled._C.cpu_backward_scratch_bytes, torch.get_num_threads())
