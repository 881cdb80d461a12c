#!/usr/bin/env python
"""The CPU kernels' hot loops on micro-architectures this machine is not: a static throughput model
(issue 17, for an Intel Xeon where only AMD hardware is at hand).

    python benchmarks/cpu_mca.py                               # the default targets below
    python benchmarks/cpu_mca.py --targets sapphirerapids:16,znver3:8 --head-dim 128

For each target ``march:lanes`` the three loops that carry the forward's work are compiled from
csrc/ with setup.py's flags (``-O3 -fno-math-errno -fno-trapping-math``, ``-march=<march>``,
``-DRAL_CPU_LANES=<lanes>``): the GEMM micro-kernel's k loop (``micro_gemm``, every score and
P V product), pass 1's exponentiation of a row of scores (``vexp_nonpositive``, minus the tile
maximum, summed) and ``vlog`` (pass 2, per key and model). Each loop is cut out of the assembly (the
label and its backward jump) and handed to ``llvm-mca -mcpu=<march>``, which models its steady-state
throughput on that CPU's ports. Reported per target: cycles per float for exp and log, FMA lanes per
cycle for the GEMM loop, its instruction count and whether it touches the stack (a spill), and a
model of one (query row, key, head) of the forward at the main job's shape:

    ral:  (2 D + Dv) FMAs (q k, q_ref k_ref, p v) / GEMM rate + 2 exp + (2 / H) log (heads="mean")
    SDPA: (D + Dv) FMAs / GEMM rate + 1 exp

The model leaves out loads, masks, maxima, sums, the mixture and the divergence's own arithmetic,
and SDPA's GEMMs are not ral's (torch calls MKL / oneDNN); it says how the kernels' instruction mix
should scale from one CPU to another, not what they take. llvm-mca's models are its version's:
LLVM 14 models Sapphire Rapids with Skylake-server's ports (p0 / p5 for 512-bit FP), and its Zen 3
model sends each 256-bit FMA to both FMA pipes (8 lanes a cycle, where this Zen 3 measured about 16).

Writes <out>/cpu_mca.json and cpu_mca.md (<out>: benchmarks/out, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CSRC = os.path.join(REPO, "csrc")
sys.path.insert(0, os.path.join(REPO, "tests"))
from cpu_lanes import FLAGS, SETUP_OPT, WIDTHS  # noqa: E402  setup.py's flags for the CPU kernels

DEFAULT_TARGETS = ("sapphirerapids:16", "sapphirerapids:8", "znver3:8")
ITERATIONS = 400

# The loops, each in a function of its own (C names, so the assembly can be cut by function).
PROBE = r"""
#include "cpu/simd.h"
#include "cpu/gemm.h"
using namespace ral::cpu;

extern "C" void probe_gemm(float* c, int64_t ldc, const float* a, int64_t a_row, int64_t a_col, const float* b,
                           int64_t ldb, int64_t k_len) {
  micro_gemm<kGemmRows, kGemmVectors, false>(c, ldc, {a, a_row, a_col}, b, ldb, k_len);
}

extern "C" float probe_exp(const float* in, float* e, float shift, int64_t n) {
  vfloat total{};
  for (int64_t c = 0; c < n; c += kLanes) {
    const vfloat x = vexp_nonpositive(vload(in + c) - shift);
    vstore(e + c, x);
    total += x;
  }
  return hsum(total);
}

extern "C" void probe_log(const float* in, float* out, int64_t n) {
  for (int64_t c = 0; c < n; c += kLanes) vstore(out + c, vlog(vload(in + c)));
}
"""
LOOPS = ("gemm", "exp", "log")


@dataclass
class Loop:
    name: str
    instructions: int      # in one iteration
    fmas: int              # vfmadd* in one iteration
    stack_refs: int        # operands on the stack (%rsp / %rbp): a spill in a loop this small
    cycles: float          # llvm-mca: cycles per iteration, steady state


def compile_probe(march: str, lanes: int, workdir: str, cxx: str = "g++") -> str:
    """The probe's assembly for -march=<march> with RAL_CPU_LANES=<lanes> (setup.py's flags, -O3)."""
    src = os.path.join(workdir, "probe.cpp")
    asm = os.path.join(workdir, f"probe_{march}_{lanes}.s")
    with open(src, "w") as f:
        f.write(PROBE)
    cmd = [cxx, SETUP_OPT, *FLAGS, f"-march={march}", f"-DRAL_CPU_LANES={lanes}", "-std=c++17", f"-I{CSRC}",
           "-S", src, "-o", asm]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return asm


def function_body(asm_text: str, name: str) -> list:
    """The assembly lines of function `name` (from its label to its .size directive), followed by
    those of the functions it calls that this file defines (micro_gemm is kept out of line)."""
    lines = asm_text.split("\n")
    start = lines.index(f"{name}:")
    end = next(i for i in range(start, len(lines)) if lines[i].strip().startswith(f".size\t{name},"))
    body = lines[start + 1:end]
    for callee in re.findall(r"^\s+call\s+([\w.$]+)\s*$", "\n".join(body), re.M):
        if f"{callee}:" in lines:
            body += function_body(asm_text, callee)
    return body


def hottest_loop(body: list) -> list:
    """The straight-line loop of `body` (a label, no other label, a conditional jump back to it) with
    the most vector instructions: its lines, the jump included."""
    best, best_score = None, -1
    for i, line in enumerate(body):
        label = re.match(r"(\.L\w+):", line)
        if not label:
            continue
        for j in range(i + 1, len(body)):
            if re.match(r"\.L\w+:", body[j]):
                break  # a branch target inside: not a straight-line loop
            if re.match(r"\s+j\w+\s+" + re.escape(label.group(1)) + r"\s*$", body[j]):
                loop = [x for x in body[i + 1:j + 1] if x.strip() and not x.strip().startswith((".", "#"))]
                score = sum(("mm" in x) for x in loop)
                if score > best_score:
                    best, best_score = loop, score
                break
    if best is None:
        raise RuntimeError("no loop found")
    return best


def model(loop_lines: list, mcpu: str, workdir: str, name: str) -> float:
    """llvm-mca's cycles per iteration of the loop on -mcpu=<mcpu>."""
    path = os.path.join(workdir, f"{name}_{mcpu}.s")
    with open(path, "w") as f:
        f.write("\n".join(loop_lines) + "\n")
    done = subprocess.run(["llvm-mca", f"-mcpu={mcpu}", f"-iterations={ITERATIONS}", path],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llvm-mca -mcpu={mcpu} failed: {done.stderr.strip()[-500:]}")
    return int(re.search(r"Total Cycles:\s+(\d+)", done.stdout).group(1)) / ITERATIONS


def analyse(march: str, lanes: int, workdir: str, mcpu: Optional[str] = None) -> dict:
    """One target: the three loops and the per-(row, key, head) model (see the module docstring)."""
    asm_text = open(compile_probe(march, lanes, workdir)).read()
    loops = {}
    for name in LOOPS:
        body = hottest_loop(function_body(asm_text, f"probe_{name}"))
        loops[name] = Loop(name=name, instructions=len(body), fmas=sum("vfmadd" in x for x in body),
                           stack_refs=sum(("(%rsp" in x or "(%rbp" in x) for x in body),
                           cycles=model(body, mcpu or march, workdir, f"{name}_{lanes}"))
    return dict(march=march, lanes=lanes, mcpu=mcpu or march, loops={k: asdict(v) for k, v in loops.items()},
                exp_cycles_per_float=loops["exp"].cycles / lanes, log_cycles_per_float=loops["log"].cycles / lanes,
                gemm_fma_lanes_per_cycle=loops["gemm"].fmas * lanes / loops["gemm"].cycles)


def forward_model(t: dict, head_dim: int, v_dim: int, heads: int) -> dict:
    """Cycles per (query row, key, head) of ral's forward and SDPA's, from the loops alone."""
    gemm = t["gemm_fma_lanes_per_cycle"]
    ral_gemm, sdpa_gemm = (2 * head_dim + v_dim) / gemm, (head_dim + v_dim) / gemm
    ral_elem = 2 * t["exp_cycles_per_float"] + 2 / heads * t["log_cycles_per_float"]
    sdpa_elem = t["exp_cycles_per_float"]
    return dict(ral_gemm=ral_gemm, ral_elementwise=ral_elem, ral=ral_gemm + ral_elem,
                elementwise_share=ral_elem / (ral_gemm + ral_elem), sdpa=sdpa_gemm + sdpa_elem,
                ral_over_sdpa=(ral_gemm + ral_elem) / (sdpa_gemm + sdpa_elem))


def markdown(results: list, args) -> str:
    lines = [f"llvm-mca model of ral-cpu's hot loops (`python benchmarks/cpu_mca.py --targets "
             f"{','.join(args.targets)} --head-dim {args.head_dim} --heads {args.heads}`; {args.llvm_mca})", "",
             "| -march / -mcpu | lanes | exp cyc/float | log cyc/float | GEMM FMA lanes/cycle | GEMM loop instr | "
             "GEMM loop stack refs | model: ral cyc per (row, key, head) | elementwise share | model ral / SDPA |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in results:
        m, g = t["forward_model"], t["loops"]["gemm"]
        lines.append(f"| {t['march']} / {t['mcpu']} | {t['lanes']} | {t['exp_cycles_per_float']:.2f} | "
                     f"{t['log_cycles_per_float']:.2f} | {t['gemm_fma_lanes_per_cycle']:.1f} | {g['instructions']} | "
                     f"{g['stack_refs']} | {m['ral']:.2f} | {m['elementwise_share']:.0%} | {m['ral_over_sdpa']:.2f}x |")
    return "\n".join(lines) + "\n"


def parse_target(text: str) -> tuple:
    march, _, lanes = text.partition(":")
    if not march or lanes not in [str(n) for n in WIDTHS]:
        raise argparse.ArgumentTypeError(f"a target is march:lanes with lanes one of {WIDTHS}, got {text!r}")
    return march, int(lanes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", type=lambda s: s.split(","), default=list(DEFAULT_TARGETS),
                    help="comma-separated march:lanes (march as g++ -march and llvm-mca -mcpu take it)")
    ap.add_argument("--head-dim", type=int, default=64, help="D = Dv of the model (the main job's 64)")
    ap.add_argument("--heads", type=int, default=8, help="H of the model (the main job's 8)")
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    args = ap.parse_args(argv)
    try:
        targets = [parse_target(t) for t in args.targets]
    except argparse.ArgumentTypeError as err:
        ap.error(f"--targets: {err}")
    for tool in ("g++", "llvm-mca"):
        if shutil.which(tool) is None:
            raise SystemExit(f"cpu_mca: {tool} is not on PATH")
    version = subprocess.run(["llvm-mca", "--version"], capture_output=True, text=True).stdout
    args.llvm_mca = next((line.strip() for line in version.split("\n") if "version" in line), "llvm-mca")
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for march, lanes in targets:
            t = analyse(march, lanes, workdir)
            t["forward_model"] = forward_model(t, args.head_dim, args.head_dim, args.heads)
            results.append(t)
    os.makedirs(args.out, exist_ok=True)
    text = markdown(results, args)
    with open(os.path.join(args.out, "cpu_mca.json"), "w") as f:
        json.dump(dict(llvm_mca=args.llvm_mca, head_dim=args.head_dim, heads=args.heads, targets=results), f, indent=1)
    with open(os.path.join(args.out, "cpu_mca.md"), "w") as f:
        f.write(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
