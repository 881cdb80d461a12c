"""Builds ral._C: CPU kernels always, CUDA kernels when nvcc is found.

Environment:
  RAL_SKIP_CUDA_BUILD=1   never build the CUDA kernels
  RAL_CUDA_ARCHS="80;90a" target architectures (PTX of the lowest is embedded too)
  RAL_CPU_ARCH=native     value of -march for the CPU kernels ("" to leave it out)
  RAL_CPU_LANES=8         floats per vector in the CPU kernels (4, 8 or 16; default: the widest the
                          target has, csrc/cpu/simd.h), e.g. 8 for the AVX2 code path on an AVX-512 CPU
  RAL_BUILD_JOBS=N        parallel compile jobs, and the threads one nvcc may use (default: number of CPUs)

No libtorch: the module needs only pybind11 and the C++/CUDA toolchains, so one build serves
every torch version and `pip install -e .` works with pip's build isolation.
"""

import glob
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
JOBS = int(os.environ.get("RAL_BUILD_JOBS", os.cpu_count() or 1))


def find_cuda_home():
    """The CUDA toolkit root holding nvcc and the static runtime, or None."""
    if os.environ.get("RAL_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return None
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in filter(None, candidates):
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and glob.glob(
                os.path.join(home, "lib*", "libcudart_static.a")):
            return home
    return None


def cuda_gencode_flags():
    archs = [a.strip() for a in os.environ.get("RAL_CUDA_ARCHS", "80;90a").replace(",", ";").split(";")
             if a.strip()]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    lowest = min(archs, key=lambda a: int(a.rstrip("a")))
    flags.append(f"-gencode=arch=compute_{lowest},code=compute_{lowest}")
    return flags


def nvcc_parallel_flags(nvcc, jobs):
    """Let each nvcc use up to `jobs` threads where it can: one per target architecture (--threads)
    and ptxas one per kernel (its --split-compile, where this ptxas has it). The sources already
    compile in parallel; these keep the cores busy while the longest one finishes alone. The machine
    code is the same as without them (ptxas compiles each kernel on its own either way). nvcc's own
    --split-compile is left out: its front end then emits slightly different PTX."""
    if jobs <= 1:
        return []
    flags = ["--threads", str(jobs)]
    ptxas = os.path.join(os.path.dirname(nvcc), "ptxas")
    try:
        usage = subprocess.run([ptxas, "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout
    except OSError:
        usage = ""
    if "--split-compile" in usage:
        flags += ["-Xptxas", f"--split-compile={jobs}"]
    return flags


class BuildExt(build_ext):
    """build_ext that compiles csrc/cuda/*.cu with nvcc (in parallel) and links them in."""

    def build_extensions(self):
        compiler = self.compiler.compiler_so[0] if self.compiler.compiler_so else "c++"
        if shutil.which(compiler) is None:
            raise RuntimeError(
                f"ral needs a C++17 compiler to build ral._C, and '{compiler}' was not found. "
                "Install one (Debian/Ubuntu: apt-get install g++) and run pip install again.")
        cuda_home = find_cuda_home()
        for ext in self.extensions:
            if cuda_home:
                ext.extra_objects += self.compile_cuda(ext, cuda_home)
                ext.define_macros.append(("RAL_WITH_CUDA", "1"))
                libdir = glob.glob(os.path.join(cuda_home, "lib64", "libcudart_static.a")) or glob.glob(
                    os.path.join(cuda_home, "lib*", "libcudart_static.a"))
                ext.library_dirs.append(os.path.dirname(libdir[0]))
                ext.libraries += ["cudart_static", "dl", "rt", "pthread"]
                ext.include_dirs.append(os.path.join(cuda_home, "include"))
            else:
                print("ral: nvcc not found (or RAL_SKIP_CUDA_BUILD=1): building the CPU kernels only")
        super().build_extensions()

    def compile_cuda(self, ext, cuda_home):
        sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        nvcc = os.path.join(cuda_home, "bin", "nvcc")
        out_dir = os.path.join(self.build_temp, "cuda")
        os.makedirs(out_dir, exist_ok=True)
        flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-lineinfo", "-Xptxas", "-v",
                 "--expt-relaxed-constexpr", f"-I{os.path.join(ROOT, 'csrc')}", *cuda_gencode_flags(),
                 *nvcc_parallel_flags(nvcc, JOBS)]

        def compile_one(src):
            obj = os.path.join(out_dir, os.path.basename(src) + ".o")
            cmd = [nvcc, *flags, "-c", src, "-o", obj]
            print(" ".join(cmd), flush=True)
            done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            print(done.stdout, flush=True)  # ptxas register / spill report
            if done.returncode != 0:
                raise RuntimeError(f"nvcc failed on {os.path.relpath(src, ROOT)} (exit {done.returncode})")
            return obj

        print(f"ral: compiling {len(sources)} CUDA sources with {nvcc} ({JOBS} jobs)", flush=True)
        with ThreadPoolExecutor(max_workers=JOBS) as pool:
            return list(pool.map(compile_one, sources))


cpu_arch = os.environ.get("RAL_CPU_ARCH", "native")
cpu_lanes = os.environ.get("RAL_CPU_LANES", "")
if cpu_lanes not in ("", "4", "8", "16"):
    raise SystemExit(f"RAL_CPU_LANES must be 4, 8 or 16 (or unset), got {cpu_lanes!r}")
cxx_flags = ["-O3", "-fno-math-errno", "-fno-trapping-math"] + ([f"-march={cpu_arch}"] if cpu_arch else [])
if cpu_lanes:
    cxx_flags += [f"-DRAL_CPU_LANES={cpu_lanes}", "-Wno-psabi"]

ParallelCompile(default=JOBS).install()

ext = Pybind11Extension(
    "ral._C",
    sources=sorted(["csrc/bindings.cpp"] + glob.glob("csrc/cpu/*.cpp")),
    include_dirs=["csrc"],
    extra_compile_args=cxx_flags,
    extra_link_args=["-pthread"],
    cxx_std=17,
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
