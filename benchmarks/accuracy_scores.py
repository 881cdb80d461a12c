#!/usr/bin/env python
"""How exact an fp32 score and its row's lse are, by how the sum over the head dim is formed: one fma
chain (one accumulator per score, K streamed: a GEMM micro-kernel), the same chain cut in two halves
or four quarters added at the end (csrc/cpu/gemm.h's kSplitK is two), PyTorch's matmul, and the lse
that ral-cpu and PyTorch's fused SDPA kernel store. Each against float64 on the same fp32 inputs;
nothing asserted.

    python benchmarks/accuracy_scores.py                  # scale 2.0 on D = 64: scores of tens
    python benchmarks/accuracy_scores.py --q-len 1        # one query row (PyTorch's matmul differs)

The chains are emulated in float64 with one rounding to fp32 per fma (a product of two fp32 values
is exact in float64).
"""

from __future__ import annotations

import argparse
import math

import torch

import ral


def chain(q: torch.Tensor, k: torch.Tensor, pieces: int) -> torch.Tensor:
    """fp32 scores q k^T (B, H, Sq, Sk), each summed over D as `pieces` fma chains added in order."""
    dim = q.shape[-1]
    bounds = [dim * i // pieces for i in range(pieces + 1)]
    total = None
    for lo, hi in zip(bounds, bounds[1:]):
        acc = torch.zeros(q.shape[:-1] + (k.shape[-2],), dtype=torch.float32)
        for d in range(lo, hi):
            acc = (q[..., d:d + 1].double() * k[..., d].double().unsqueeze(-2) + acc.double()).float()
        total = acc if total is None else (total.double() + acc.double()).float()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--q-len", type=int, default=8)
    parser.add_argument("--k-len", type=int, default=130)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args()
    errors: dict = {}

    def add(name, got, want):
        square, count = errors.get(name, (0.0, 0))
        errors[name] = (square + float((got.double() - want).pow(2).sum()), count + want.numel())

    for seed in range(args.seeds):
        gen = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(2, 4, n, args.head_dim, generator=gen, dtype=torch.float64).float()
                   for n in (args.q_len, args.k_len, args.k_len))
        q_scaled = q * args.scale  # ral folds the scale into q; a power of two is exact
        exact = q_scaled.double() @ k.double().transpose(-1, -2)
        lse = torch.logsumexp(exact, -1)
        formed = {f"{n} chain{'s' if n > 1 else ''}": chain(q_scaled, k, n) for n in (1, 2, 4)}
        formed["torch matmul"] = q_scaled @ k.transpose(-1, -2)
        for name, scores in formed.items():
            add(f"score, {name}", scores, exact)
            add(f"lse,   {name}", torch.logsumexp(scores.double(), -1), lse)
        stats = ral.attention_kl(q, k, v, q_ref=q, k_ref=k, scale=args.scale, causal=False, backend="cpu").stats
        add("lse,   ral-cpu (stored)", stats[..., 0], lse)
        fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=args.scale)[1]
        add("lse,   PyTorch fused SDPA (stored)", fused, lse)
    print(f"rms error against float64, B = 2, H = 4, Sq = {args.q_len}, Sk = {args.k_len}, D = {args.head_dim}, "
          f"scale {args.scale}, {args.seeds} seeds")
    for name, (square, count) in errors.items():
        print(f"  {name:38s} {math.sqrt(square / count):.2e}")


if __name__ == "__main__":
    main()
