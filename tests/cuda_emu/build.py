"""Builds the CUDA kernels of csrc/cuda as host C++ on top of the CPU emulator (cuda_emu.h), into a
pybind11 module with the same interface as ral._C (csrc/bindings.cpp, module name _ral_cuda_emu).

The .cu sources compile unchanged except for two mechanical rewrites done on temporary copies:
``kernel<<<grid, block, smem, stream>>>(args)`` becomes ``ral_emu::launch(kernel, {grid, block,
smem, stream}, args)`` and ``extern __shared__ ... name[];`` becomes a pointer to the emulator's
per-block dynamic shared memory. The module is cached under build/cuda_emu/<hash of every input>.

    python tests/cuda_emu/build.py     # build (or find) it and print its path

RAL_EMU_SANITIZE=address[,undefined] builds a separate, instrumented copy (-fsanitize=... -O1, its own
cache entry) for tests/cuda_emu/memcheck.py, which runs it with libasan preloaded.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# RAL_EMU_CSRC: build another copy of csrc (e.g. a mutated one, to check that the tests catch it)
CSRC = os.environ.get("RAL_EMU_CSRC") or os.path.join(ROOT, "csrc")
MODULE = "_ral_cuda_emu"


class Unavailable(RuntimeError):
    """The emulated build cannot run here (no g++, no CUDA headers, no pybind11)."""


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
    cpp = [os.path.join(CSRC, "bindings.cpp")] + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    deps = sorted(glob.glob(os.path.join(CSRC, "**", "*"), recursive=True) +
                  glob.glob(os.path.join(HERE, "*")))
    return cu, cpp, [d for d in deps if os.path.isfile(d) and not d.endswith((".pyc",))]


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
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise Unavailable(f"no C++ compiler ({cxx})")
    inc = cuda_include()
    if inc is None:
        raise Unavailable("no CUDA headers (cuda_fp16.h, cuda_bf16.h, cuda_runtime.h) found")
    try:
        import pybind11
    except ImportError as err:
        raise Unavailable(f"pybind11 is not installed ({err})")
    cu, cpp, deps = _sources()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h = hashlib.sha256()
    for part in (version, opt, " ".join(san), sys.version, inc, pybind11.__version__):
        h.update(part.encode())
    for d in deps:
        h.update(d.encode())
        with open(d, "rb") as f:
            h.update(f.read())
    out_dir = os.path.join(ROOT, "build", "cuda_emu", h.hexdigest()[:16])
    target = os.path.join(out_dir, MODULE + sysconfig.get_config_var("EXT_SUFFIX"))
    if os.path.exists(target):
        return target
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    with open(os.path.join(os.path.dirname(out_dir), ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (parallel test workers)
        if os.path.exists(target):
            return target
        tmp = tempfile.mkdtemp(dir=os.path.dirname(out_dir))
        try:
            _compile(cxx, inc, pybind11.get_include(), cu, cpp, tmp, os.path.basename(target), verbose, opt, san)
            os.replace(tmp, out_dir) if not os.path.exists(out_dir) else shutil.rmtree(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _prune(os.path.dirname(out_dir), keep=4)
    return target


def _prune(cache: str, keep: int) -> None:
    """Drop all but the `keep` newest builds (one per source state) from the cache."""
    dirs = sorted((d for d in glob.glob(os.path.join(cache, "*")) if os.path.isdir(d) and not
                   os.path.basename(d).startswith("tmp")), key=os.path.getmtime, reverse=True)
    for d in dirs[keep:]:
        shutil.rmtree(d, ignore_errors=True)


def _compile(cxx, inc, pyinc, cu, cpp, tmp, target_name, verbose, opt, san=()):
    common = ["-std=c++17", opt, *san, "-fPIC", "-fvisibility=hidden", "-I", CSRC, "-I", inc,
              "-I", pyinc, "-I", sysconfig.get_paths()["include"], "-DRAL_WITH_CUDA", "-DRAL_CUDA_EMULATE"]
    emu = ["-include", os.path.join(HERE, "cuda_emu.h"), "-I", HERE]
    jobs = []
    for src in cu:
        rewritten = os.path.join(tmp, os.path.basename(src) + ".cpp")
        with open(src) as f, open(rewritten, "w") as g:
            g.write(f'#line 1 "{src}"\n' + rewrite_cu(f.read()))
        jobs.append([cxx, *common, *emu, "-x", "c++", "-c", rewritten])
    for src in cpp:
        jobs.append([cxx, *common, f"-DRAL_MODULE_NAME={MODULE}", "-c", src])
    jobs.append([cxx, *common, *emu, "-c", os.path.join(HERE, "cuda_emu.cpp")])
    objs = []
    for i, job in enumerate(jobs):
        obj = os.path.join(tmp, f"{i}_{os.path.basename(job[-1])}.o")
        job += ["-o", obj]
        objs.append(obj)

    def run(cmd):
        t0 = time.time()
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"cuda_emu build failed: {' '.join(cmd)}\n{done.stdout[-20000:]}")
        if verbose:
            print(f"{time.time() - t0:6.1f}s {os.path.basename(cmd[-3])}", flush=True)

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        list(pool.map(run, jobs))
    run([cxx, "-shared", *san, "-o", os.path.join(tmp, target_name), *objs, "-pthread"])


def load(path: Optional[str] = None):
    """Import the built module (once per process)."""
    if MODULE in sys.modules:
        return sys.modules[MODULE]
    path = path or build()
    spec = importlib.util.spec_from_file_location(MODULE, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[MODULE] = mod
    return mod


if __name__ == "__main__":
    t0 = time.time()
    print(build(verbose=True), f"({time.time() - t0:.1f}s)")
