#!/usr/bin/env python
"""Forward, backward and forward+backward time of eager, SDPA and every ral backend here, with
TFLOP/s (``bench_memory.py --metric speed``: same providers, shapes and options; in-process).

    python benchmarks/bench_speed.py                 # CPU: S = 512..8192, fwd / bwd / full
    python benchmarks/bench_speed.py --device cuda   # GPU: S = 1k..32k, bf16, H=28, Hkv=4, D=128
    python benchmarks/bench_speed.py --quick
    python benchmarks/bench_speed.py --out benchmarks/results   # publish (default: benchmarks/out/)

Times are the median of interleaved repeats (bench_memory.py's docstring says how).

TFLOP/s as FlashAttention counts it: 4·B·H·Sq·Sk·D for the forward (QK^T and PV), 2.5x that for
the backward, halved when causal ("tflops_attn": the same work for every provider, so it ranks
them like their times). "tflops_total" adds, for ral, the divergence's extra score products
(providers.divergence_flops): in the forward the current scores once more and the reference's
scores twice (two sweeps: the row normalisers come first for jsd / heads="mean"), in the backward
the reference's scores once; each product is 2·B·H·Sq·Sk·D, halved causal. Eager's extra
(the reference's scores, elementwise work) is not counted: its TFLOP/s is attention-equivalent.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench_memory  # noqa: E402


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--metric" or a.startswith("--metric=") for a in argv):
        argv = ["--metric", "speed"] + argv
    return bench_memory.main(argv)


if __name__ == "__main__":
    main()
