#!/usr/bin/env python
"""Random problems against the float64 oracle for as long as asked: not part of the suite (whose
``test_random_problems`` draws 12 fixed examples), a bug hunt that prints every problem that breaks
tests/oracle.py's accuracy rule, with its seed, so that one line reproduces it.

    python tests/random_campaign.py cpu --seconds 100          # ~3,300 problems on this 2-core host
    TRITON_INTERPRET=1 python tests/random_campaign.py triton --seconds 600
    python tests/random_campaign.py cuda-emu --seconds 600     # the CUDA kernels on the CPU emulator

Each seed draws one problem: dense (``Problem``, with left / right key padding one time in three) or
packed (``PackedProblem``, 1-5 sequences, empty ones included), an option combination of the grid,
H / Hkv / Hr / Hrkv from 1 to 9, head dims 8-128, v or not, a row mask, given ref_stats, 0-3 key
segments (``check_stats`` then), fp32 / fp16 / bf16 (fp32 only for triton, fp16 / bf16 for the CUDA
kernels) and, one time in five, a scale of 0.05, 0.5 or 2.0. ``cuda-emu`` runs backend="cuda" on CPU
tensors through the emulator of tests/cuda_emu, as tests/test_cuda_emulated.py does (its checks of
cp.async ranges, unwritten shared memory and warp collectives included; ``RAL_EMU_SCHEDULE=random:5``
in the environment shuffles the warps' interleaving). A failure is not always a bug: each is printed
with its kind (``KINDS``: the kinds benchmarks/RESULTS.md sorted, or "other") and the run ends with a
count per kind.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from oracle import (AccuracyError, PackedProblem, Problem, check, check_packed, check_stats,  # noqa: E402
                    option_grid)

OPTIONS = list(option_grid())


def draw(seed: int, backend: str, device: str = "cpu"):
    """The problem of `seed` and the check that runs it (the backend on `device`'s tensors)."""
    rng = random.Random(seed)
    opts = dict(rng.choice(OPTIONS))
    if rng.random() < 0.2:
        opts["scale"] = rng.choice([0.05, 0.5, 2.0])
    kv = rng.randint(1, 3)
    heads = kv * rng.randint(1, 3)
    mean = opts["heads"] == "mean"
    ref_kv = rng.randint(1, 3) if mean else kv
    ref_heads = ref_kv * rng.randint(1, 2) if mean else heads
    dtypes = {"triton": [torch.float32], "cuda": [torch.float16, torch.bfloat16]}.get(
        backend, [torch.float32, torch.float32, torch.float16, torch.bfloat16])
    common = dict(heads=heads, kv_heads=kv, head_dim=rng.choice([8, 16, 40, 64, 72, 128]),
                  v_head_dim=rng.choice([None, 16, 24, 64]), ref_heads=ref_heads, ref_kv_heads=ref_kv,
                  ref_head_dim=rng.choice([16, 32, 64]) if mean else None, dtype=rng.choice(dtypes),
                  seed=seed, options=opts, segments=rng.choice([0, 0, 1, 2, 3]))
    if rng.random() < 2 / 3:
        k_len = rng.randint(1, 200)
        q_len = rng.randint(1, k_len) if opts["causal"] else rng.randint(1, 200)
        batch = rng.randint(1, 2)
        left = tuple(rng.randint(0, k_len) for _ in range(batch)) if rng.random() < 0.4 else ()
        right = tuple(rng.randint(0, k_len // 2) for _ in range(batch)) if rng.random() < 0.2 else ()
        problem = Problem(batch=batch, q_len=q_len, k_len=k_len, left_pad=left, right_pad=right,
                          row_mask=rng.random() < 0.5, with_ref_stats=rng.random() < 0.4, **common)
        if problem.segments:
            with_div = rng.random() < 0.7
            return problem, lambda: check_stats(problem, backend, with_div=with_div, device=device)
        return problem, lambda: check(problem, backend, device=device)
    q_lens = tuple(rng.choice([0, 1, 2, rng.randint(1, 150)]) for _ in range(rng.randint(1, 5)))
    if opts["causal"]:
        k_lens = tuple(q + rng.choice([0, 0, rng.randint(0, 30)]) for q in q_lens)
    else:
        k_lens = tuple(rng.choice([0, 1, rng.randint(1, 150)]) if q == 0 else rng.randint(1, 150) for q in q_lens)
    if max(q_lens) == 0 or max(k_lens) == 0:
        return None, None
    problem = PackedProblem(q_lens=q_lens, k_lens=k_lens, row_mask=rng.random() < 0.5,
                            with_ref_stats=rng.random() < 0.4, **common)
    return problem, lambda: check_packed(problem, backend, device=device)


# The kinds of failure seen so far (docs/design.md, "Accuracy"; benchmarks/RESULTS.md sorts them), and
# "other": what none of them explains, the ones to read first.
KINDS = {
    "exact zero": "the reference's largest value is below 1e-6 (a gradient that is 0, e.g. softmax over one key)",
    "PyTorch non-finite": "PyTorch's own error in the dtype is not finite (fp16 / bf16 overflow)",
    "dq / dk with v": "mostly delta = rowsum(dO out) on near one-hot rows (docs/design.md, \"Accuracy\")",
    "div below 1e-6": "an absolute div error below 1e-6 (the stored lse's rounding on supports of one or two keys)",
    "stored lse, peaked": "fp32 dq / dk without v at scale >= 2 (scores of tens: exp(s - lse) carries the fp32 lse's "
                          "rounding; the Triton kernels show it too)",
    "other": "none of the above: read these first",
}


def kind(err: AssertionError, problem) -> str:
    """Which of KINDS an assertion of the accuracy rule on `problem` falls under (a hint for sorting,
    not a verdict)."""
    if not isinstance(err, AccuracyError):
        return "other"
    if err.scale < 1e-6:
        return "exact zero"
    if not math.isfinite(err.err_torch):
        return "PyTorch non-finite"
    if err.name in ("dq", "dk") and problem.v_head_dim:
        return "dq / dk with v"
    if err.name == "div" and err.err < 1e-6:
        return "div below 1e-6"
    if err.name in ("dq", "dk") and problem.dtype == torch.float32 and problem.options.get("scale", 0.0) >= 2.0:
        return "stored lse, peaked"  # without v: "dq / dk with v" took the others
    return "other"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("backend", choices=["cpu", "triton", "cuda", "cuda-emu", "reference"])
    ap.add_argument("--seconds", type=float, default=100.0)
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    backend, device = args.backend, "cuda" if args.backend == "cuda" else "cpu"
    if backend == "cuda-emu":
        import test_cuda_emulated as emulated
        emulated.route_cuda_to_emulator(emulated.emu_build.load())
        backend = "cuda"
    start, seed, done, failed = time.time(), args.first_seed, 0, {name: 0 for name in KINDS}
    while time.time() - start < args.seconds:
        problem, run = draw(seed, backend, device)
        seed += 1
        if problem is None:
            continue
        done += 1
        try:
            run()
        except AssertionError as err:
            which = kind(err, problem)
            failed[which] += 1
            print(f"FAIL ({which}) seed={seed - 1}: {str(err).splitlines()[0][:300]}\n  {problem!r}", flush=True)
    print(f"{done} problems, {sum(failed.values())} failed, seeds {args.first_seed}..{seed - 1}, "
          f"{time.time() - start:.0f} s")
    for which, count in failed.items():
        print(f"  {count:6d}  {which}: {KINDS[which]}")
    return 1 if sum(failed.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
