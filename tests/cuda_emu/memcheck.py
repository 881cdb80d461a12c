"""A global-memory "memcheck" of the CUDA kernels without a GPU: the CPU analog of
`compute-sanitizer --tool memcheck` (issue #4). Builds the emulated kernels (build.py) with
AddressSanitizer + UBSan (RAL_EMU_SANITIZE=address,undefined: -fsanitize=... -O1, its own cache
entry) and runs tests/test_cuda_emulated.py with libasan preloaded, so that the tensors torch
allocates (posix_memalign, intercepted) get redzones: any read or write of the kernels' plain
global loads / stores / atomics (q, k, v, stats, masks, out, div, stats, dq, dk, dv, scratch) past
the end of a tensor's allocation, any access to shared memory past the launch's dynamic size (the
emulator poisons it), and undefined behaviour in the kernels and the host / launch code (signed
overflow, bad shifts, misaligned pointers, ...) abort the run with a report.

    python tests/cuda_emu/memcheck.py [pytest args]   # all of tests/test_cuda_emulated.py (~2 min + ~50 s build)
    RAL_EMU_DEFAULTS="RAL_EMU_SCHEDULE=random:5,RAL_EMU_CP_ASYNC=early" python tests/cuda_emu/memcheck.py
    python tests/cuda_emu/memcheck.py --plant         # proof that it can fail (see PLANT): must say "caught"

Exit status: 0 clean, 1 a sanitizer report or a failing test, 77 unavailable (no libasan / no
emulator build). Not part of the default pytest run. Limits: an access that lands inside another
live allocation (far past a tensor's end, or inside a view's own storage) is not seen; torch itself
is not instrumented; stack accesses of the coroutine threads are checked as ordinary stack frames.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SANITIZE = "address,undefined"
REPORT_MARKERS = ("ERROR: AddressSanitizer", "AddressSanitizer: CHECK failed", "runtime error:",
                  "ERROR: LeakSanitizer", "WARNING: ASan")

# The planted bug of --plant: the backward reads stats for the rows past q_len of its last query
# tile (a value it then discards), i.e. up to 63 rows past the end of the stats tensor. The value
# checks cannot see it (the result is the same); on a GPU it is an out-of-bounds read.
PLANT = ("cuda/attention_kl_bwd.cuh", "      lse_a[r] = v ? stats[i * 2] : 0.f;\n",
         "      lse_a[r] = stats[i * 2];\n      if (!v) lse_a[r] = 0.f;\n", "test_lengths")


class Unavailable(RuntimeError):
    pass


def _runtime(name: str) -> str:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise Unavailable(f"no C++ compiler ({cxx})")
    path = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise Unavailable(f"{cxx} has no {name} (install libasan / the compiler's sanitizer runtime)")
    return path


def environment(csrc: str | None = None) -> dict:
    """The environment of the sanitized test run (LD_PRELOAD: libasan first, so that it intercepts
    malloc before torch allocates; libstdc++ so that ASan finds __cxa_throw at start-up)."""
    env = dict(os.environ, RAL_EMU_SANITIZE=SANITIZE)
    if csrc:
        env["RAL_EMU_CSRC"] = csrc
    env["LD_PRELOAD"] = " ".join([_runtime("libasan.so"), _runtime("libstdc++.so")])
    # python and torch keep memory until exit by design: no leak report; UB aborts (as ASan does)
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1:" + os.environ.get("ASAN_OPTIONS", "")
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:" + os.environ.get("UBSAN_OPTIONS", "")
    return env


def _build(env: dict, sanitize: bool) -> None:
    env = {k: v for k, v in env.items() if k != "LD_PRELOAD"}  # the compilers run unpreloaded
    if not sanitize:
        env.pop("RAL_EMU_SANITIZE", None)
    done = subprocess.run([sys.executable, os.path.join(HERE, "build.py")], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        if "Unavailable" in tail:
            raise Unavailable(tail.strip().splitlines()[-1])
        raise RuntimeError(f"sanitizer build failed:\n{tail}")


def run_tests(env: dict, args: list, echo: bool = True):
    """pytest on the emulated tests under env; returns (returncode, output, sanitizer report lines).
    --capture=sys: the sanitizers write to fd 2, which pytest would otherwise swallow on abort."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--capture=sys",
           os.path.join(ROOT, "tests", "test_cuda_emulated.py"), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()
    rc = proc.wait()
    out = "".join(lines)
    report = [line.rstrip() for line in lines if any(m in line for m in REPORT_MARKERS)]
    if "SKIPPED" in out and "CUDA emulator unavailable" in out and " passed" not in out:
        raise Unavailable("the emulated module could not be built (see build.py)")
    return rc, out, report


def source_lines(out: str, limit: int = 8) -> list:
    """file:line of the report's frames in the emulated module (gcc 12's libasan prints only
    module+offset for them), from addr2line."""
    frames = re.findall(r"^\s*(#\d+) .*?\((\S+_ral_cuda_emu\S*\.so)\+(0x[0-9a-f]+)\)", out, re.M)
    lines = []
    for num, so, off in frames[:limit]:
        if shutil.which("addr2line") is None:
            break
        where = subprocess.run(["addr2line", "-i", "-e", so, off], capture_output=True, text=True).stdout
        where = [w.split(" (discriminator")[0].strip() for w in where.splitlines() if w.strip()]
        lines.append(f"    {num} {' <- '.join(os.path.relpath(w, ROOT) if w.startswith(ROOT) else w for w in where)}")
    return lines


def memcheck(args: list, csrc: str | None = None, echo: bool = True):
    env = environment(csrc)
    t0 = time.time()
    _build(env, sanitize=True)
    t1 = time.time()
    rc, out, report = run_tests(env, args, echo)
    if report:
        print("memcheck: source lines of the report's first frames (innermost inlined call first):\n" +
              "\n".join(source_lines(out)), flush=True)
    print(f"memcheck: build {t1 - t0:.0f}s, tests {time.time() - t1:.0f}s, exit {rc}, "
          f"{len(report)} sanitizer report line(s)", flush=True)
    return rc, out, report


def plant() -> int:
    """Build a copy of csrc with PLANT's out-of-bounds read: the plain emulated tests pass on it,
    the memcheck must fail with an AddressSanitizer report."""
    path, old, new, k = PLANT
    with tempfile.TemporaryDirectory() as tmp:
        csrc = os.path.join(tmp, "csrc")
        shutil.copytree(os.path.join(ROOT, "csrc"), csrc)
        with open(os.path.join(csrc, path)) as f:
            text = f.read()
        assert text.count(old) == 1, f"the text to plant into is not in {path} exactly once"
        with open(os.path.join(csrc, path), "w") as f:
            f.write(text.replace(old, new))
        plain_env = {k_: v for k_, v in os.environ.items() if k_ not in ("RAL_EMU_SANITIZE", "LD_PRELOAD")}
        plain_env["RAL_EMU_CSRC"] = csrc
        _build(plain_env, sanitize=False)
        plain = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                "tests/test_cuda_emulated.py", "-k", k], cwd=ROOT, env=plain_env,
                               capture_output=True, text=True)
        print(f"plant: plain emulated tests -k {k}: {plain.stdout.strip().splitlines()[-1]}", flush=True)
        rc, out, report = memcheck(["-x", "-k", k], csrc=csrc, echo=False)
    asan = [line[:200] for line in out.splitlines() if "AddressSanitizer" in line or " is located " in line]
    print("\n".join(asan[:6] + source_lines(out, 2)))
    caught = rc != 0 and any("ERROR: AddressSanitizer" in line for line in report)
    print(f"plant: {'caught' if caught else 'MISSED'}", flush=True)
    return 0 if caught else 1


def main(argv: list) -> int:
    try:
        if argv[:1] == ["--plant"]:
            return plant()
        rc, _, report = memcheck(argv)
    except Unavailable as err:
        print(f"memcheck unavailable: {err}", flush=True)
        return 77
    if report:
        print("memcheck: FINDINGS\n" + "\n".join(report[:20]), flush=True)
        return 1
    print("memcheck: clean" if rc == 0 else "memcheck: tests failed (no sanitizer report)", flush=True)
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
