"""Test builds of the C++ sources into extra pybind11 modules, cached by the hash of their inputs.

Two builds use it: the CUDA kernels on the CPU emulator (tests/cuda_emu/build.py) and the CPU kernels
with a forced vector width (tests/cpu_lanes.py). Each names its module (csrc/bindings.cpp's
RAL_MODULE_NAME), its compile jobs and what else its result depends on; the module lands under
build/<cache>/<hash>/ and is rebuilt only when a source, a flag or the compiler changes.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Unavailable(RuntimeError):
    """The test build cannot run here (no compiler, headers or pybind11)."""


def compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise Unavailable(f"no C++ compiler ({cxx})")
    return cxx


def _pybind11():
    try:
        import pybind11
    except ImportError as err:
        raise Unavailable(f"pybind11 is not installed ({err})")
    return pybind11


def python_flags(csrc: str) -> List[str]:
    """The flags every module build shares: C++17, PIC, hidden symbols, csrc, pybind11 and Python headers."""
    return ["-std=c++17", "-fPIC", "-fvisibility=hidden", "-I", csrc, "-I", _pybind11().get_include(),
            "-I", sysconfig.get_paths()["include"]]


def cached_module(module: str, cache: str, inputs: Sequence[str], key: Sequence[str],
                  make_jobs: Callable[[str], List[List[str]]], link_flags: Sequence[str] = (),
                  verbose: bool = False) -> str:
    """The path of `module` built from the compile commands make_jobs(tmp) returns (each ending in its
    source; "-o OBJ" is appended), linked into one shared object with link_flags. Cached under
    build/<cache>/<hash of key, the compiler's, Python's and pybind11's versions and every input file>;
    one build at a time (a lock file), the four newest kept."""
    cxx, pybind11 = compiler(), _pybind11()
    h = hashlib.sha256()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    for part in (*key, version, sys.version, pybind11.__version__):
        h.update(part.encode())
    for path in sorted(inputs):
        h.update(path.encode())
        with open(path, "rb") as f:
            h.update(f.read())
    root = os.path.join(ROOT, "build", cache)
    out_dir = os.path.join(root, h.hexdigest()[:16])
    target = os.path.join(out_dir, module + sysconfig.get_config_var("EXT_SUFFIX"))
    if os.path.exists(target):
        return target
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (parallel test workers)
        if os.path.exists(target):
            return target
        tmp = tempfile.mkdtemp(dir=root)
        try:
            _compile(cxx, make_jobs(tmp), tmp, os.path.basename(target), link_flags, verbose)
            os.replace(tmp, out_dir) if not os.path.exists(out_dir) else shutil.rmtree(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _prune(root, keep=4)
    return target


def _compile(cxx: str, jobs: List[List[str]], tmp: str, target_name: str, link_flags: Sequence[str],
             verbose: bool) -> None:
    objs = []
    for i, job in enumerate(jobs):
        obj = os.path.join(tmp, f"{i}_{os.path.basename(job[-1])}.o")
        job += ["-o", obj]
        objs.append(obj)

    def run(cmd, label=None):
        t0 = time.time()
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"test build failed: {' '.join(cmd)}\n{done.stdout[-20000:]}")
        if verbose:
            print(f"{time.time() - t0:6.1f}s {label or os.path.basename(cmd[-3])}", flush=True)

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        list(pool.map(run, jobs))
    run([cxx, "-shared", *link_flags, "-o", os.path.join(tmp, target_name), *objs, "-pthread"], "link")


def _prune(cache: str, keep: int) -> None:
    """Drop all but the `keep` newest builds (one per source state) from the cache."""
    dirs = sorted((d for d in glob.glob(os.path.join(cache, "*")) if os.path.isdir(d) and not
                   os.path.basename(d).startswith("tmp")), key=os.path.getmtime, reverse=True)
    for d in dirs[keep:]:
        shutil.rmtree(d, ignore_errors=True)


def load(module: str, locate: Callable[[], str]):
    """Import `module` from the path locate() gives (building it there if needed), once per process."""
    if module in sys.modules:
        return sys.modules[module]
    spec = importlib.util.spec_from_file_location(module, locate())
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[module] = mod
    return mod
