"""Builds the CUDA kernels of csrc/cuda as host C++ on top of the CPU emulator (cuda_emu.h), into a
pybind11 module with the same interface as ral._C (csrc/bindings.cpp, module name _ral_cuda_emu).

The .cu sources (and the .cuh headers they include) compile unchanged except for two mechanical
rewrites done on temporary copies:
``kernel<<<grid, block, smem, stream>>>(args)`` becomes ``ral_emu::launch(kernel, {grid, block,
smem, stream}, args)`` and ``extern __shared__ ... name[];`` becomes a pointer to the emulator's
per-block dynamic shared memory. The module is cached under build/cuda_emu/<hash of every input>.

    python tests/cuda_emu/build.py     # build (or find) it and print its path

RAL_EMU_SANITIZE=address[,undefined] builds a separate, instrumented copy (-fsanitize=... -O1, its own
cache entry) for tests/cuda_emu/memcheck.py, which runs it with libasan preloaded.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))
import native_build  # noqa: E402  (tests/native_build.py)
from native_build import Unavailable  # noqa: E402,F401  (the callers' exception)

# RAL_EMU_CSRC: build another copy of csrc (e.g. a mutated one, to check that the tests catch it)
CSRC = os.environ.get("RAL_EMU_CSRC") or os.path.join(ROOT, "csrc")
MODULE = "_ral_cuda_emu"


def cuda_include() -> Optional[str]:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    homes += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in filter(None, homes):
        inc = os.path.join(home, "include")
        if all(os.path.exists(os.path.join(inc, h)) for h in ("cuda_fp16.h", "cuda_bf16.h", "cuda_runtime.h")):
            return inc
    return None


def rewrite_cu(text: str) -> str:
    """The two launch-syntax rewrites (see the module docstring)."""
    text = re.sub(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w ]+?)\s+(\w+)\[\];",
                  r"\1* \2 = reinterpret_cast<\1*>(::ral_emu::dynamic_smem());", text)
    text = re.sub(r"\b(\w+)<<<(.*?)>>>\(",
                  lambda m: f"::ral_emu::launch({m.group(1)}, ::ral_emu::LaunchConfig({m.group(2)}), ", text, flags=re.S)
    return text


def _sources():
    cu = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu"))) + [os.path.join(HERE, "selftest.cu")]
    headers = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cuh")))
    cpp = [os.path.join(CSRC, "bindings.cpp")] + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    deps = sorted(glob.glob(os.path.join(CSRC, "**", "*"), recursive=True) +
                  glob.glob(os.path.join(HERE, "*")))
    return cu, headers, cpp, [d for d in deps if os.path.isfile(d) and not d.endswith((".pyc",))]


def sanitize_flags() -> list:
    """Compile / link flags of the sanitizer build (env RAL_EMU_SANITIZE=address[,undefined]); [] without it."""
    names = [n.strip() for n in os.environ.get("RAL_EMU_SANITIZE", "").split(",") if n.strip()]
    bad = set(names) - {"address", "undefined"}
    if bad:
        raise ValueError(f"RAL_EMU_SANITIZE: unknown sanitizer(s) {sorted(bad)} (address, undefined)")
    if not names:
        return []
    flags = [f"-fsanitize={','.join(names)}", "-fno-omit-frame-pointer", "-g"]
    if "undefined" in names:  # a UB finding aborts with a report, as an ASan one does
        flags.append("-fno-sanitize-recover=undefined")
    return flags


def build(verbose: bool = False, opt: str = "-O2"):
    """Returns the path of the built module (building it if its inputs changed)."""
    san = sanitize_flags()
    if san:
        opt = "-O1"
    inc = cuda_include()
    if inc is None:
        raise Unavailable("no CUDA headers (cuda_fp16.h, cuda_bf16.h, cuda_runtime.h) found")
    cu, headers, cpp, deps = _sources()

    def jobs(tmp):
        cxx = native_build.compiler()
        common = [*native_build.python_flags(CSRC), opt, *san, "-I", inc, "-DRAL_WITH_CUDA", "-DRAL_CUDA_EMULATE"]
        # the rewritten copies in tmp/cuda/, found first by both the .cu files and their includes
        # ("cuda/....cuh"): -I tmp comes before csrc's own -I
        emu = ["-include", os.path.join(HERE, "cuda_emu.h"), "-I", HERE, "-I", tmp]
        os.makedirs(os.path.join(tmp, "cuda"))

        def copy_rewritten(src, name):
            dst = os.path.join(tmp, "cuda", name)
            with open(src) as f, open(dst, "w") as g:
                g.write(f'#line 1 "{src}"\n' + rewrite_cu(f.read()))
            return dst
        for src in headers:
            copy_rewritten(src, os.path.basename(src))
        out = [[cxx, *emu, *common, "-x", "c++", "-c", copy_rewritten(src, os.path.basename(src) + ".cpp")]
               for src in cu]
        for src in cpp:
            out.append([cxx, *common, f"-DRAL_MODULE_NAME={MODULE}", "-c", src])
        out.append([cxx, *common, *emu, "-c", os.path.join(HERE, "cuda_emu.cpp")])
        return out

    return native_build.cached_module(MODULE, "cuda_emu", deps, (opt, " ".join(san), inc), jobs, san, verbose)


def load(path: Optional[str] = None):
    """Import the built module (once per process)."""
    return native_build.load(MODULE, lambda: path or build())


if __name__ == "__main__":
    t0 = time.time()
    print(build(verbose=True), f"({time.time() - t0:.1f}s)")
