#!/usr/bin/env python
"""Gradients on near one-hot rows: a backend's rms error against the float64 oracle as a multiple of
PyTorch's fused SDPA kernel's (the flash kernel, in the same dtype), beside transformers' eager
recipe and the suite's peer (tests/oracle.py, ``peaked_row_errors``; nothing asserted:
``check_peaked_rows_against_fused`` holds the backend within 1.6x in the suite).

    python benchmarks/accuracy_peaked.py cpu
    python benchmarks/accuracy_peaked.py cuda-emu --dtypes float16 bfloat16   # the CUDA kernels, emulated
    python benchmarks/accuracy_peaked.py cuda --device cuda --dtypes float16 bfloat16   # on a GPU (also: triton)

Per dtype and (Sq, Sk, causal) of ``PEAKED_SHAPES`` (B = 2, H = 4, D = 64, scale 2.0, --seeds seeds
pooled) it prints rms(who) / rms(fused) for dq, dk and dv, the max-abs ratio in brackets, and writes
them to --json when asked. Such a row's exact dS = a (dP - delta) cancels, and what is left carries
the rounding of delta = rowsum(dO · out) and of the scores (docs/design.md, "Accuracy").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from oracle import PEAKED_SHAPES, peaked_row_errors  # noqa: E402

WHO = ("backend", "eager", "peer")


def ratios(backend: str, dtypes, seeds: int, device: str = "cpu") -> dict:
    """{"dtype (Sq, Sk, causal)": {who: {grad: [rms ratio, max-abs ratio]}}}, ratios to the fused kernel."""
    cases = [(dtype, shape) for dtype in dtypes for shape in PEAKED_SHAPES]
    out: dict = {}
    for dtype, shape in tqdm(cases, desc=backend):
        errors = peaked_row_errors(backend, dtype, *shape, seeds=range(seeds), device=device)
        fused = errors["fused"]
        out[f"{str(dtype).split('.')[-1]} {shape}"] = {
            who: {name: [errors[who][name][i] / fused[name][i] for i in (0, 1)] for name in fused} for who in WHO}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backend", choices=["cpu", "triton", "cuda", "cuda-emu"])
    parser.add_argument("--device", default="cpu", help="where the tensors live: cpu, or cuda on a GPU")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"],
                        choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--json", help="write the ratios here")
    args = parser.parse_args()
    start = time.time()
    backend = args.backend
    if backend == "cuda-emu":  # backend="cuda" on CPU tensors through tests/cuda_emu (built on first use)
        import test_cuda_emulated as emulated
        emulated.route_cuda_to_emulator(emulated.emu_build.load())
        backend = "cuda"
    res = ratios(backend, [getattr(torch, name) for name in args.dtypes], args.seeds, args.device)
    print(f"rms / PyTorch fused SDPA's (max-abs ratio in brackets), {args.backend} on {args.device}, "
          f"{args.seeds} seeds pooled")
    for key, cell in res.items():
        cols = "  ".join(f"{who} " + " ".join(f"{name} {r[0]:.2f} ({r[1]:.2f})" for name, r in cell[who].items())
                         for who in WHO)
        print(f"{key:26s} {cols}")
    print(f"({time.time() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": args.backend, "device": args.device, "seeds": args.seeds, "ratios": res}, f,
                      indent=1)


if __name__ == "__main__":
    main()
