"""The CPU kernels built for another vector width than this machine's (csrc/cpu/simd.h, RAL_CPU_LANES),
as a module with ral._C's interface (csrc/bindings.cpp, module name _ral_cpu_lanes<N>).

The install builds one width, the target's own (16 floats with AVX-512, 8 with AVX2, 4 with SSE), so
a machine runs only its own width's lane logic: the butterflies of the lane reductions, the register
transposes, the tile loops and the GEMM's register blocking (4 x 2, 6 x 2 or 6 x 4 vectors). This build
forces another width on the same target (RAL_CPU_LANES, as setup.py does): GCC lowers a vector wider
than the target's to pairs of its own, and where the target has no intrinsic of that width (any, vfma)
portable code stands in (vfma lane by lane through fmaf, still one rounding). So an AVX2 machine runs
AVX-512's lane logic and SSE's intrinsics, and an AVX-512 machine the AVX2 and SSE paths. Cached
under build/cpu_lanes/<hash of every input> (tests/native_build.py).

    python tests/cpu_lanes.py 16         # build (or find) the 16-lane module (-O2) and print its path
    python tests/cpu_lanes.py 8 -O3      # the 8-lane one at setup.py's -O3 (benchmarks/cpu_check.py)
"""

from __future__ import annotations

import glob
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import native_build  # noqa: E402
from native_build import Unavailable  # noqa: E402,F401  (the callers' exception)

CSRC = os.path.join(os.path.dirname(HERE), "csrc")
# setup.py's flags for the CPU kernels with RAL_CPU_LANES (the tests build at -O2, a shorter build;
# benchmarks/cpu_check.py at setup.py's -O3; -Wno-psabi: GCC notes that a vector wider than the
# target's is passed differently, which only the module's own code sees)
FLAGS = ["-fno-math-errno", "-fno-trapping-math", "-Wno-psabi"]
SETUP_OPT = "-O3"      # setup.py's optimisation level
WIDTHS = (4, 8, 16)    # the vector widths RAL_CPU_LANES takes (floats: SSE, AVX2, AVX-512)


def module_name(lanes: int) -> str:
    return f"_ral_cpu_lanes{lanes}"


def build(lanes: int, verbose: bool = False, opt: str = "-O2") -> str:
    """The path of the module built with RAL_CPU_LANES = lanes (4, 8 or 16) at optimisation `opt`."""
    if lanes not in WIDTHS:
        raise ValueError(f"lanes must be one of {WIDTHS}, got {lanes}")
    arch = os.environ.get("RAL_CPU_ARCH", "native")  # as setup.py
    flags = [opt] + FLAGS + ([f"-march={arch}"] if arch else []) + [f"-DRAL_CPU_LANES={lanes}",
                                                            f"-DRAL_MODULE_NAME={module_name(lanes)}"]
    sources = [os.path.join(CSRC, "bindings.cpp")] + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    inputs = [p for p in glob.glob(os.path.join(CSRC, "**", "*"), recursive=True)
              if os.path.isfile(p) and "cuda" not in os.path.relpath(p, CSRC).split(os.sep)]

    def jobs(tmp):
        cxx = native_build.compiler()
        return [[cxx, *native_build.python_flags(CSRC), *flags, "-c", src] for src in sources]

    return native_build.cached_module(module_name(lanes), "cpu_lanes", inputs, flags, jobs, verbose=verbose)


def load(lanes: int):
    """Import the module of `lanes` (building it if needed; once per process)."""
    return native_build.load(module_name(lanes), lambda: build(lanes))


if __name__ == "__main__":
    t0 = time.time()
    lanes = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    print(build(lanes, verbose=True, opt=sys.argv[2] if len(sys.argv) > 2 else "-O2"), f"({time.time() - t0:.1f}s)")
