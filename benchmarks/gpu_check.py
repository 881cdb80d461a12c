#!/usr/bin/env python
"""One command for a fresh H100 / H200 machine (an image with torch, triton, pybind11, ninja and
pytest, and no package registry): build, test, sanitize and benchmark ral's GPU backends within a
wall-clock budget.

    python benchmarks/gpu_check.py                     # every step, within --budget 420 s
    python benchmarks/gpu_check.py --out $OUT          # on the lent machine: files come back from $OUT
    python benchmarks/gpu_check.py --dry-run           # any machine: walk the steps, run no GPU one
    python benchmarks/gpu_check.py --steps build,bench-jsd-mean --budget 200
    python benchmarks/gpu_check.py --autotune          # let Triton autotune (each config compiles: slow)

Steps (STEPS below; each a function with an estimated and a minimum useful time):

    env               versions, the device and its compute capability, nvcc, compute-sanitizer
    build             pip install --no-build-isolation --no-deps -e . with RAL_CUDA_ARCHS set to the
                      device's own architecture only (9.0 -> "90a"), timed; ptxas spills counted
    test-cuda         python -m pytest tests/test_cuda.py
    test-triton-cuda  python -m pytest tests/test_triton.py -m cuda (compiled kernels, no TRITON_INTERPRET);
                      both with -n <half the cores, at most 8> where pytest-xdist is installed
    bench-jsd-mean    bench_memory.py --device cuda: S = 4k, 16k, bf16, B=1, H=28, Hkv=4, D=128, causal,
    bench-kl-each     fwd+bwd; providers sdpa-flash (the floor; torch's own sdpa where flash cannot
                      run), eager (until out of memory), ral-triton, ral-cuda; median of interleaved
                      repeats (CUDA events) and peak memory above the inputs (max_memory_allocated);
                      issue 3's goals as PASS / FAIL
    memcheck          compute-sanitizer --tool memcheck / racecheck on a tiny script (this file's
    racecheck         --sanitize-case: ral.attention_kl(backend="cuda"), forward + backward, 3 cases)
    report            <out>/gpu_check.json, gpu_check.md, gpu_check_logs.tar.gz (the raw logs, kept in a
                      temporary folder: a device run's $OUT carries back 8 files at most); the short
                      table last. Exit status 1 when a step failed, errored or hit its cap.

Budget: before each step the time left is shared out: a step may use at most what is left minus
the minimum of every later step, and when the estimates of what is left do not fit, its share in
proportion to its estimate (the build is exempt: it is needed by all). A step stops itself at its
cap (pytest is interrupted and its partial counts kept; the benchmark trims points); a step whose
cap is under its minimum is skipped and reported. A failed step is recorded and the run goes on.
Triton runs its first config only (RAL_TRITON_AUTOTUNE=0) unless --autotune.

--dry-run (any machine, exit 0): the same steps in the same order with their estimates and caps;
the GPU steps are not run, and each rehearses what it can on the CPU instead (the tests are
collected, the benchmark sweep runs at S=64 on the CPU through the same functions, the sanitizer
script runs its cases on the CPU).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch.utils.cpp_extension import CUDA_HOME

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(HERE, "out", "gpu_check")  # git-ignored
BENCH_SEQS = (4096, 16384)
BENCH_SHAPE = dict(batch=1, heads=28, kv_heads=4, head_dim=128, dtype="bfloat16")
# sdpa (torch's own pick) is the floor only where sdpa-flash cannot run (report.floor_provider)
BENCH_PROVIDERS = ("sdpa-flash", "sdpa", "eager", "ral-triton", "ral-cuda")
BENCH_CONFIGS = {"bench-jsd-mean": ("jsd", "mean"), "bench-kl-each": ("kl", "each")}


# ----------------------------------------------------------------------------------------------
# The run's state and the step table
# ----------------------------------------------------------------------------------------------

@dataclass
class Step:
    name: str
    est_s: float              # expected seconds on an H100 / H200 with a cold cache
    min_s: float              # below this the step is not worth starting
    fn: Callable
    gpu: bool = True          # needs a CUDA GPU (a dry run rehearses it on the CPU instead)
    fair: bool = True         # its cap shrinks in proportion when the estimates do not fit
    what: str = ""


@dataclass
class Ctx:
    args: argparse.Namespace
    out: str
    logs: str
    dry: bool
    t0: float = field(default_factory=time.perf_counter)
    env: dict = field(default_factory=dict)
    results: list = field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.args.budget - self.elapsed()

    def log_path(self, name: str) -> str:
        return os.path.join(self.logs, name)


def run_cmd(cmd: list, log: str, cap: float, env: Optional[dict] = None, cwd: str = REPO) -> dict:
    """Run `cmd` (output to `log`), stopping it at `cap` seconds: SIGINT first (pytest then prints
    its summary), SIGKILL 20 s later. {"rc", "seconds", "timed_out", "tail"}."""
    t0 = time.perf_counter()
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    with open(log, "w") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, env=full_env,
                                start_new_session=True)
        timed_out = False
        try:
            rc = proc.wait(timeout=max(cap, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGINT)
                rc = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
            except ProcessLookupError:
                rc = proc.wait()
    return dict(rc=rc, seconds=round(time.perf_counter() - t0, 1), timed_out=timed_out, tail=tail(log, 30))


def tail(path: str, n: int) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-n:])
    except OSError:
        return ""


def py_env(ctx: Ctx, **extra) -> dict:
    """The environment of the Python subprocesses: the checkout first on the path, Triton compiled
    (never interpreted), its first config only unless --autotune."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
           "TRITON_INTERPRET": None}
    if not ctx.args.autotune:
        env["RAL_TRITON_AUTOTUNE"] = "0"
    if ctx.dry:  # rehearsals are tiny: one thread each, no spinning against the others
        env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------

def cuda_arch(capability) -> Optional[str]:
    """RAL_CUDA_ARCHS for a device: its own architecture only; Hopper (9.0) as 90a (wgmma)."""
    if not capability:
        return None
    major, minor = capability
    return f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit torch's extension builder would use (CUDA_HOME, CUDA_PATH, nvcc on PATH,
    /usr/local/cuda), if it holds nvcc."""
    return CUDA_HOME if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) else None


def find_sanitizer() -> Optional[str]:
    """compute-sanitizer on PATH or under the CUDA toolkit, else None."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    homes = [find_cuda_home(), "/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in filter(None, homes):
        for rel in ("bin/compute-sanitizer", "compute-sanitizer/compute-sanitizer"):
            path = os.path.join(home, rel)
            if os.access(path, os.X_OK):
                return path
    for path in sorted(glob.glob("/opt/nvidia/*/compute-sanitizer*/compute-sanitizer")) + sorted(
            glob.glob("/opt/nvidia/compute-sanitizer/compute-sanitizer")):
        if os.access(path, os.X_OK):
            return path
    return None


PROBE = r"""
import json, sys, torch
env = dict(python=sys.version.split()[0], torch=torch.__version__, cuda_runtime=torch.version.cuda)
try:
    import triton
    env["triton"] = triton.__version__
except Exception as err:
    env["triton"] = f"not importable: {type(err).__name__}: {err}"
env["gpu"] = torch.cuda.is_available()
if env["gpu"]:
    props = torch.cuda.get_device_properties(0)
    env.update(device=props.name, capability=list(torch.cuda.get_device_capability(0)),
               sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2 ** 30, 1))
try:
    import pybind11
    env["pybind11"] = pybind11.__version__
except ImportError:
    env["pybind11"] = None
print(json.dumps(env))
"""


def step_env(ctx: Ctx, cap: float) -> dict:
    """Versions and the device, probed in a subprocess (this process keeps no CUDA context)."""
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=max(cap, 30))
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return dict(status="fail", summary=f"probe failed (rc {done.returncode}): {done.stderr.strip()[-300:]}")
    env = json.loads(lines[-1])
    env.update(cpu_count=os.cpu_count(),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    env["ral_cuda_archs"] = cuda_arch(env.get("capability"))
    home = find_cuda_home()
    env["cuda_home"] = home
    if home:
        done = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True)
        env["nvcc"] = (done.stdout.strip().splitlines() or ["?"])[-1]
    env["compute_sanitizer"] = find_sanitizer()
    for tool in ("ninja", "nvidia-smi"):
        env[tool] = shutil.which(tool)
    try:
        env["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                    text=True).stdout.strip() or None
    except OSError:
        env["git"] = None
    ctx.env.update(env)
    device = (f"{env['device']} (cc {'.'.join(map(str, env['capability']))}, {env['sms']} SMs, "
              f"{env['memory_gib']} GiB) -> RAL_CUDA_ARCHS={env['ral_cuda_archs']}" if env["gpu"] else "no CUDA device")
    summary = (f"{device}; torch {env['torch']}, triton {env['triton']}, nvcc: {env.get('nvcc', 'not found')}, "
               f"compute-sanitizer: {env['compute_sanitizer'] or 'not found'}")
    return dict(status="ok", summary=summary, details=env)


def build_command(arch: Optional[str]) -> tuple:
    cmd = [sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "-e", "."]
    env = {"RAL_CUDA_ARCHS": arch or "<the device's, from torch.cuda.get_device_capability>",
           "RAL_BUILD_JOBS": str(os.cpu_count() or 1)}
    return cmd, env


SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def step_build(ctx: Ctx, cap: float) -> dict:
    arch = ctx.env.get("ral_cuda_archs")
    cmd, env = build_command(arch)
    if ctx.dry:
        why = "" if ctx.env.get("cuda_home") else " (nvcc not found here: it would build the CPU kernels only)"
        return dict(status="skip", summary=f"dry run: would run {' '.join(f'{k}={v}' for k, v in env.items())} "
                                           f"{shlex.join(cmd)}{why}")
    if not ctx.env.get("cuda_home"):
        return dict(status="fail", summary="nvcc not found (CUDA_HOME, PATH, /usr/local/cuda*): "
                                           "the cuda backend cannot be built")
    res = run_cmd(cmd, ctx.log_path("build.log"), cap, env=env)
    log = tail(ctx.log_path("build.log"), 100000)
    spills = [(int(a), int(b)) for a, b in SPILL.findall(log)]
    worst = max((a + b for a, b in spills), default=0)
    check = subprocess.run([sys.executable, "-c", "import ral, ral.backends as b; print(b.available()); "
                            "print(b.unavailable_reason('cuda'))"], capture_output=True, text=True, cwd=REPO)
    avail = check.stdout.strip().splitlines()
    details = dict(command=f"RAL_CUDA_ARCHS={arch} {shlex.join(cmd)}", seconds=res["seconds"], rc=res["rc"],
                   kernels_with_spills=sum(1 for a, b in spills if a + b), max_spill_bytes=worst,
                   backends_available=avail[0] if avail else check.stderr.strip()[-300:],
                   cuda_unavailable_reason=avail[1] if len(avail) > 1 else None)
    ok = res["rc"] == 0 and "cuda" in (avail[0] if avail else "")
    status = "ok" if ok else ("timeout" if res["timed_out"] else "fail")
    summary = (f"{res['seconds']:.0f} s for sm_{arch}; backends {details['backends_available']}; "
               f"ptxas spills: {details['kernels_with_spills']} kernels (max {worst} B)")
    if not ok:
        summary += f"; rc {res['rc']}: " + res["tail"].strip().splitlines()[-1][:200] if res["tail"].strip() else ""
    return dict(status=status, summary=summary, details=details)


PYTEST_SUMMARY = re.compile(r"=+ (.*?) in [\d.]+s.*=+")
PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def pytest_counts(log_text: str) -> dict:
    """Counts from pytest's summary line, or from -v's per-test lines if it was interrupted."""
    counts = {}
    lines = [m.group(1) for m in PYTEST_SUMMARY.finditer(log_text)]
    if lines:
        for n, what in PYTEST_COUNT.findall(lines[-1]):
            counts["error" if what.startswith("error") else what] = int(n)
        return counts
    for what in ("PASSED", "FAILED", "SKIPPED", "ERROR"):   # -v lines, plain or xdist ("[gw0] [ 5%] PASSED t::x")
        n = len(re.findall(rf"^(?!{what} )(?=.*::)(?=.*\b{what}\b).*$", log_text, re.M))
        if n:
            counts[what.lower() if what != "ERROR" else "error"] = n
    return counts


def xdist_workers() -> int:
    """pytest-xdist workers for the GPU tests (their time is mostly Triton / nvcc-free compiles on
    the CPU): half the cores up to 8 where xdist is installed, else 0 (no -n)."""
    import importlib.util
    if importlib.util.find_spec("xdist") is None or (os.cpu_count() or 1) < 4:
        return 0
    return min(8, (os.cpu_count() or 1) // 2)


def pytest_step(ctx: Ctx, cap: float, name: str, selection: list, extra_env: Optional[dict] = None) -> dict:
    workers = 0 if ctx.dry else xdist_workers()
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider",
           *(["-n", str(workers)] if workers else []), *selection]
    log = ctx.log_path(f"{name}.log")
    if ctx.dry:  # rehearsal: the selection collects
        res = run_cmd([*cmd[:3], "--collect-only", "-q", "-p", "no:cacheprovider", *selection], log, cap,
                      env=py_env(ctx, **(extra_env or {})))
        m = re.search(r"(\d+)(?:/\d+)? tests? collected|(\d+) tests? selected|collected (\d+)", res["tail"])
        n = next((g for g in (m.groups() if m else ()) if g), None)
        ok = res["rc"] in (0, 5) and n is not None
        return dict(status="skip" if ok else "fail",
                    summary=f"dry run: {n} tests collected; would run {shlex.join(cmd)}" if ok else
                    f"dry run: collection failed (rc {res['rc']}): {res['tail'][-300:]}",
                    details=dict(collected=int(n) if n else None, command=shlex.join(cmd)))
    res = run_cmd(cmd, log, cap, env=py_env(ctx, **(extra_env or {})))
    counts = pytest_counts(tail(log, 10 ** 6))
    failed = counts.get("failed", 0) + counts.get("error", 0)
    status = "timeout" if res["timed_out"] else ("ok" if res["rc"] == 0 and counts.get("passed") else "fail")
    summary = ", ".join(f"{v} {k}" for k, v in counts.items()) or f"rc {res['rc']}"
    summary += f" in {res['seconds']:.0f} s" + (f" (stopped at its cap, {cap:.0f} s)" if res["timed_out"] else "")
    fails = re.findall(r"^FAILED (\S+)", tail(log, 10 ** 6), re.M)[:20]
    return dict(status=status if not (status == "ok" and failed) else "fail", summary=summary,
                details=dict(counts=counts, rc=res["rc"], seconds=res["seconds"], failed=fails, command=shlex.join(cmd)))


def step_test_cuda(ctx: Ctx, cap: float) -> dict:
    return pytest_step(ctx, cap, "test-cuda", ["tests/test_cuda.py"])


def step_test_triton_cuda(ctx: Ctx, cap: float) -> dict:
    return pytest_step(ctx, cap, "test-triton-cuda", ["tests/test_triton.py", "-m", "cuda"])


def bench_argv(name: str, out: str, budget: float, dry: bool) -> list:
    divergence, heads = BENCH_CONFIGS[name]
    tag = "gpu_check_" + name[len("bench-"):].replace("-", "_")
    if dry:  # the same sweep code, at S=64 on the CPU, in this process
        shape = ["--device", "cpu", "--seqlens", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "32",
                 "--dtype", "float32", "--isolate", "none", "--repeats", "2", "--min-repeats", "2", "--min-time", "0",
                 "--threads", "1"]
        providers = ["sdpa-flash", "eager"] + (["ral-cpu"] if _ral_backend_ok("cpu") else ["ral-reference"])
    else:
        shape = ["--device", "cuda", "--seqlens", ",".join(map(str, BENCH_SEQS)), "--batch", str(BENCH_SHAPE["batch"]),
                 "--heads", str(BENCH_SHAPE["heads"]), "--kv-heads", str(BENCH_SHAPE["kv_heads"]),
                 "--head-dim", str(BENCH_SHAPE["head_dim"]), "--dtype", BENCH_SHAPE["dtype"],
                 "--repeats", "15", "--min-time", "0.3"]
        providers = list(BENCH_PROVIDERS)
    return [*shape, "--modes", "full", "--providers", ",".join(providers), "--divergence", divergence,
            "--heads-mode", heads, "--out", out, "--tag", tag, "--no-plot", "--no-progress",
            "--budget", f"{max(budget, 1.0):.0f}"]


def _ral_backend_ok(name: str) -> bool:
    try:
        import ral.backends
        return ral.backends.unavailable_reason(name) is None
    except Exception:  # noqa: BLE001
        return False


def bench_step(ctx: Ctx, cap: float, name: str) -> dict:
    out = os.path.join(ctx.logs, "bench")
    # the sweep trims itself to its --budget; the subprocess is killed at cap (then no JSON)
    argv = bench_argv(name, out, min(cap - 15, 0.85 * cap) if not ctx.dry else cap, ctx.dry)
    tag = argv[argv.index("--tag") + 1]
    path = os.path.join(out, tag + ".json")
    if ctx.dry:  # rehearsal on the CPU, in this process, through bench_memory.main
        if HERE not in sys.path:
            sys.path.insert(0, HERE)
        import contextlib
        import io

        import bench_memory
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            bench_memory.main(argv)
        with open(ctx.log_path(f"{name}.log"), "w") as fh:
            fh.write(buf.getvalue())
    else:
        cmd = [sys.executable, os.path.join(HERE, "bench_memory.py"), *argv]
        res = run_cmd(cmd, ctx.log_path(f"{name}.log"), cap, env=py_env(ctx))
        if not os.path.exists(path):
            return dict(status="timeout" if res["timed_out"] else "fail",
                        summary=f"no results (rc {res['rc']}): " + (res["tail"].strip().splitlines() or [""])[-1][:200])
    with open(path) as fh:
        data = json.load(fh)
    rows = data["rows"]
    goals = [] if ctx.dry else bench_goals(rows, name)   # no goal applies to the CPU rehearsal
    ran = [r for r in rows if r["status"] == "ok"]
    cmd_text = "python benchmarks/bench_memory.py " + shlex.join(argv)
    details = dict(command=cmd_text, json=os.path.relpath(path, ctx.out), rows=rows, goals=goals,
                   summary_lines=data.get("summary", []), wall_s=data["meta"].get("wall_s"))
    not_ok = [f"{r['provider']} S={r['S']} {r['status'].upper()}" for r in rows if r["status"] != "ok"]
    summary = f"{len(ran)}/{len(rows)} points measured" + (f" (not: {', '.join(not_ok)})" if not_ok else "")
    if ctx.dry:
        bad = [r for r in rows if r["status"] != "ok"]
        return dict(status="fail" if bad else "skip",
                    summary=f"dry run: the sweep ran on the CPU at S=64 ({summary}); would run "
                            f"python benchmarks/bench_memory.py {shlex.join(bench_argv(name, '<out>', cap - 15, False))}",
                    details=details)
    verdicts = [g["verdict"] for g in goals]
    status = "ok" if ran and "FAIL" not in verdicts else "fail"
    if goals:
        summary += f"; goals: {verdicts.count('PASS')} PASS, {verdicts.count('FAIL')} FAIL"
    return dict(status=status, summary=summary, details=details)


def bench_goals(rows: list, name: str) -> list:
    """Issue 3's goals at S = 4k and 16k, fwd+bwd (benchmarks/RESULTS.md): ral's time <= 2.0x SDPA
    flash's (1.4x for kl, heads="each"), ral's peak <= 1.1x SDPA's, eager out of memory or >= 30x
    ral's peak. One entry per (S, ral provider, goal) with the value and PASS / FAIL / n/a."""
    divergence, heads = BENCH_CONFIGS.get(name, ("jsd", "mean"))
    limit = 1.4 if (divergence, heads) == ("kl", "each") else 2.0
    floor = "sdpa-flash" if any(r["provider"] == "sdpa-flash" and r["status"] == "ok" for r in rows) else "sdpa"
    by = {(r["provider"], r["S"]): r for r in rows if r["mode"] == "full"}
    goals = []
    for s in sorted({r["S"] for r in rows}):
        base, eager = by.get((floor, s)), by.get(("eager", s))
        for p in sorted({r["provider"] for r in rows if r["provider"].startswith("ral-")}):
            r = by.get((p, s))
            ok = r is not None and r["status"] == "ok"
            base_ok = base is not None and base["status"] == "ok"

            def add(goal, value, verdict):
                goals.append(dict(config=name, S=s, provider=p, goal=goal, value=value, verdict=verdict))
            if ok and base_ok:
                t = r["time_s"] / base["time_s"]
                add(f"time <= {limit}x {floor}", f"{t:.2f}x", "PASS" if t <= limit else "FAIL")
                if r.get("peak_bytes") and base.get("peak_bytes"):
                    m = r["peak_bytes"] / base["peak_bytes"]
                    add(f"peak <= 1.1x {floor}", f"{m:.2f}x", "PASS" if m <= 1.1 else "FAIL")
            else:
                add(f"time <= {limit}x {floor}", f"{p} {r['status'] if r else '-'} / {floor} "
                    f"{base['status'] if base else '-'}", "n/a")
            if not ok:
                continue
            if eager is None:
                add("eager OOM or >= 30x ral's peak", "eager not run", "n/a")
            elif eager["status"] == "ok" and eager.get("peak_bytes") and r.get("peak_bytes"):
                m = eager["peak_bytes"] / r["peak_bytes"]
                add("eager OOM or >= 30x ral's peak", f"{m:.1f}x", "PASS" if m >= 30 else "FAIL")
            elif eager["status"] == "oom" or "OOM" in (eager.get("note") or "") or "--max-gb" in (eager.get("note") or ""):
                add("eager OOM or >= 30x ral's peak", "eager OOM", "PASS")
            else:
                add("eager OOM or >= 30x ral's peak", f"eager {eager['status']}: {eager.get('note', '')[:60]}", "n/a")
    return goals


# The sanitizer cases: small, covering GQA, both head modes, a ragged length and head dim 128.
SANITIZE_CASES = [
    dict(b=1, h=4, hkv=2, s=70, d=64, dtype="bfloat16", divergence="jsd", heads="mean"),
    dict(b=2, h=2, hkv=2, s=33, d=64, dtype="float16", divergence="kl", heads="each"),
    dict(b=1, h=4, hkv=1, s=129, d=128, dtype="bfloat16", divergence="reverse_kl", heads="mean"),
]


def sanitize_cases(device: str = "cuda", backend: str = "cuda") -> int:
    """Forward + backward of ral.attention_kl on SANITIZE_CASES; checks the results are finite.
    What compute-sanitizer runs (python benchmarks/gpu_check.py --sanitize-case)."""
    import torch

    import ral
    for i, c in enumerate(SANITIZE_CASES):
        gen = torch.Generator().manual_seed(i)
        dt = getattr(torch, c["dtype"]) if device != "cpu" else torch.float32

        def rnd(*shape, grad=False):
            return torch.randn(*shape, generator=gen).to(device=device, dtype=dt).requires_grad_(grad)
        q, k, v = rnd(c["b"], c["h"], c["s"], c["d"], grad=True), rnd(c["b"], c["hkv"], c["s"], c["d"], grad=True), \
            rnd(c["b"], c["hkv"], c["s"], c["d"], grad=True)
        q_ref, k_ref = rnd(c["b"], c["h"], c["s"], c["d"]), rnd(c["b"], c["hkv"], c["s"], c["d"])
        res = ral.attention_kl(q, k, v, q_ref=q_ref, k_ref=k_ref, divergence=c["divergence"], heads=c["heads"],
                               causal=True, backend=backend)
        (res.out.float().square().mean() + res.div.sum()).backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        for name, t in (("out", res.out), ("div", res.div), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
            if not torch.isfinite(t.float()).all():
                print(f"case {i} {c}: {name} not finite")
                return 1
        print(f"case {i} ok: {c}")
    print("sanitize cases ok")
    return 0


def sanitizer_step(ctx: Ctx, cap: float, tool: str) -> dict:
    sanitizer = ctx.env.get("compute_sanitizer") if "compute_sanitizer" in ctx.env else find_sanitizer()
    script = [sys.executable, os.path.abspath(__file__), "--sanitize-case"]
    if ctx.dry:
        backend = "cpu" if _ral_backend_ok("cpu") else "reference"
        where = sanitizer or "compute-sanitizer (not found here)"
        would = f"would run {where} --tool {tool} --error-exitcode 9 {shlex.join(script)}"
        done = next((r for r in ctx.results if r["name"] in ("memcheck", "racecheck")), None)
        if done is not None:  # the same script: rehearsed once
            return dict(status=done["status"], summary=f"dry run: the script was rehearsed by {done['name']}; {would}")
        res = run_cmd([*script, "--sanitize-device", "cpu", "--sanitize-backend", backend],
                      ctx.log_path(f"{tool}.log"), cap, env=py_env(ctx))
        ok = res["rc"] == 0
        return dict(status="skip" if ok else "fail",
                    summary=(f"dry run: the script's {len(SANITIZE_CASES)} cases ran on the CPU (backend={backend}); "
                             if ok else f"dry run: the script failed on the CPU (rc {res['rc']}); ")
                    + would,
                    details=dict(sanitizer=sanitizer, tail=res["tail"]))
    if not sanitizer:
        return dict(status="skip", summary="compute-sanitizer not found (PATH, CUDA_HOME/bin, "
                                           "/usr/local/cuda*/, /opt/nvidia/*): not run")
    cmd = [sanitizer, "--tool", tool, "--error-exitcode", "9", "--print-limit", "50", *script]
    # without the caching allocator, an access past one tensor's end is past its allocation
    extra = dict(PYTORCH_NO_CUDA_MEMORY_CACHING="1") if tool == "memcheck" else {}
    res = run_cmd(cmd, ctx.log_path(f"{tool}.log"), cap, env=py_env(ctx, **extra))
    text = tail(ctx.log_path(f"{tool}.log"), 10 ** 6)
    m = re.search(r"ERROR SUMMARY: (\d+) errors?", text)
    races = re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    errors = int(m.group(1)) if m else None
    cases_ok = "sanitize cases ok" in text
    if res["timed_out"]:
        status = "timeout"
    elif res["rc"] == 0 and cases_ok and not errors:
        status = "ok"
    else:
        status = "fail"
    summary = (f"{errors if errors is not None else '?'} errors" + (f", {races.group(0)}" if races else "")
               + f"; cases {'ok' if cases_ok else 'not finished'}; rc {res['rc']} in {res['seconds']:.0f} s")
    return dict(status=status, summary=summary,
                details=dict(command=shlex.join(cmd), errors=errors, rc=res["rc"], seconds=res["seconds"],
                             tail=res["tail"][-2000:]))


STEPS = [
    Step("env", 10, 10, step_env, gpu=False, fair=False, what="versions, device, capability, tools"),
    Step("build", 100, 60, step_build, fair=False,
         what="pip install --no-build-isolation --no-deps -e . for the device's arch only"),
    Step("test-cuda", 60, 20, step_test_cuda, what="pytest tests/test_cuda.py"),
    Step("test-triton-cuda", 150, 30, step_test_triton_cuda, what="pytest tests/test_triton.py -m cuda"),
    Step("bench-jsd-mean", 90, 30, lambda c, cap: bench_step(c, cap, "bench-jsd-mean"),
         what="S=4k,16k bf16 H=28 Hkv=4 D=128 causal fwd+bwd, jsd heads=mean"),
    Step("bench-kl-each", 90, 30, lambda c, cap: bench_step(c, cap, "bench-kl-each"),
         what="the same, kl heads=each"),
    Step("memcheck", 60, 25, lambda c, cap: sanitizer_step(c, cap, "memcheck"),
         what="compute-sanitizer memcheck, 3 small cases fwd+bwd"),
    Step("racecheck", 60, 25, lambda c, cap: sanitizer_step(c, cap, "racecheck"),
         what="compute-sanitizer racecheck, the same cases"),
]
REPORT_RESERVE_S = 5


def plan_cap(step: Step, later: list, left: float) -> float:
    """The seconds `step` may use: what is left minus every later step's minimum (at least its own
    minimum while that much is left: the steps come in order of need); when the estimates from
    here on exceed what is left, at most its share in proportion to its estimate."""
    cap = left - sum(s.min_s for s in later)
    if cap < step.min_s:   # earlier steps first: its minimum if that is left, and later ones lose
        cap = min(step.min_s, left)
    total = step.est_s + sum(s.est_s for s in later)
    if step.fair and total > left:
        cap = min(cap, max(step.min_s, left * step.est_s / total))
    return cap


def simulate_plan(steps: list, budget: float) -> list:
    """[(cap, seconds)] per step if every step took its estimate (at most its cap; 0 if skipped):
    what a GPU run of this budget would give each step. Printed first; the dry run's caps."""
    left, plan = budget - REPORT_RESERVE_S, []
    for i, step in enumerate(steps):
        cap = plan_cap(step, steps[i + 1:], left)
        used = min(step.est_s, cap) if cap >= step.min_s else 0.0
        plan.append((cap, used))
        left -= used
    return plan


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def fmt_cell(r: dict) -> str:
    if r["status"] != "ok":
        return r["status"].upper()
    from providers import fmt_bytes, fmt_time  # benchmarks/providers.py
    return f"{fmt_time(r['time_s'])} / {fmt_bytes(r['peak_bytes'])}"


def bench_table(results: list) -> list:
    lines = []
    for res in results:
        rows = (res.get("details") or {}).get("rows")
        if not rows or res["name"] not in BENCH_CONFIGS:
            continue
        providers = list(dict.fromkeys(r["provider"] for r in rows))
        lines.append(f"| {res['name']} (fwd+bwd, time / peak above inputs) | " + " | ".join(providers) + " |")
        lines.append("|---|" + "---:|" * len(providers))
        for s in sorted({r["S"] for r in rows}):
            cells = []
            for p in providers:
                r = next((x for x in rows if x["provider"] == p and x["S"] == s), None)
                cells.append("-" if r is None else fmt_cell(r))
            lines.append(f"| S={s} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def write_report(ctx: Ctx) -> list:
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    goals = [g for res in ctx.results for g in (res.get("details") or {}).get("goals", [])]
    skipped = [f"{r['name']}: {r['summary']}" for r in ctx.results if r["status"] == "skip"]
    data = dict(command="python benchmarks/gpu_check.py" + ("" if not sys.argv[1:] else " " + shlex.join(sys.argv[1:])),
                dry_run=ctx.dry, budget_s=ctx.args.budget, wall_s=round(ctx.elapsed(), 1), env=ctx.env,
                steps=ctx.results, goals=goals, skipped=skipped)
    json_path = os.path.join(ctx.out, "gpu_check.json")
    with open(json_path, "w") as fh:
        json.dump(data, fh, indent=1, default=str)
    md = [f"# gpu_check {'(dry run) ' if ctx.dry else ''}{ctx.env.get('date', '')}", "",
          f"`{data['command']}`: {ctx.env.get('device', 'no CUDA device')}, torch {ctx.env.get('torch')}, "
          f"triton {ctx.env.get('triton')}, budget {ctx.args.budget:.0f} s, wall {data['wall_s']:.0f} s", "",
          "| step | est s | cap s | took s | status | summary |", "|---|---:|---:|---:|---|---|"]
    for r in ctx.results:
        md.append(f"| {r['name']} | {r['est_s']:.0f} | {r['cap_s']:.0f} | {r['seconds']:.0f} | {r['status']} | "
                  f"{r['summary'].replace('|', '/')} |")
    md.append("")
    md += bench_table(ctx.results)
    if goals:
        md += ["| goal | config | S | provider | value | verdict |", "|---|---|---:|---|---:|---|"]
        md += [f"| {g['goal']} | {g['config']} | {g['S']} | {g['provider']} | {g['value']} | {g['verdict']} |"
               for g in goals]
    md_path = os.path.join(ctx.out, "gpu_check.md")
    with open(md_path, "w") as fh:
        fh.write("\n".join(md) + "\n")
    logs_path = os.path.join(ctx.out, "gpu_check_logs.tar.gz")
    with tarfile.open(logs_path, "w:gz") as tar:
        tar.add(ctx.logs, arcname="gpu_check_logs")
    return [json_path, md_path, logs_path]


def print_short(ctx: Ctx, files: list) -> None:
    print("\n" + "=" * 100)
    print(f"gpu_check{' --dry-run' if ctx.dry else ''}: {ctx.env.get('device', 'no CUDA device')}, "
          f"wall {ctx.elapsed():.0f} s of {ctx.args.budget:.0f} s")
    for r in ctx.results:
        print(f"  {r['name']:<17} {r['status']:<8} {r['seconds']:>5.0f} s (est {r['est_s']:.0f}, cap {r['cap_s']:.0f})  "
              f"{r['summary'][:150]}")
    table = bench_table(ctx.results)
    if table:
        print()
        print("\n".join(table).rstrip())
    goals = [g for res in ctx.results for g in (res.get("details") or {}).get("goals", [])]
    if goals and not ctx.dry:
        print()
        for g in goals:
            print(f"  {g['verdict']:<4} {g['config']} S={g['S']} {g['provider']}: {g['goal']}: {g['value']}")
    skipped = [r["name"] for r in ctx.results if r["status"] == "skip"]
    if skipped:
        print(f"\nskipped: {', '.join(skipped)}")
    print(f"raw logs in {ctx.logs}")
    print(f"wrote {', '.join(os.path.relpath(f) for f in files)}")


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=420.0, help="wall-clock seconds for the whole run (default 420)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output folder (default benchmarks/out/gpu_check, git-ignored)")
    ap.add_argument("--dry-run", action="store_true",
                    help="walk the steps, run no GPU step (rehearse them on the CPU); any machine, exit 0")
    ap.add_argument("--steps", default=None, help=f"comma list of steps to run (default all: "
                                                  f"{','.join(s.name for s in STEPS)}; env always runs)")
    ap.add_argument("--autotune", action="store_true", help="let Triton autotune over its config table "
                                                            "(default: its first config, RAL_TRITON_AUTOTUNE=0)")
    ap.add_argument("--sanitize-case", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sanitize-device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--sanitize-backend", default="cuda", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sanitize_case:
        return sanitize_cases(args.sanitize_device, args.sanitize_backend)
    wanted = None if args.steps is None else {"env", *args.steps.split(",")}
    unknown = (wanted or set()) - {s.name for s in STEPS}
    if unknown:
        raise SystemExit(f"--steps: unknown {sorted(unknown)}; steps are {[s.name for s in STEPS]}")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    # raw logs outside <out>: a device run's $OUT carries back at most 8 files; they travel tarred
    logs = tempfile.mkdtemp(prefix="gpu_check_logs_")
    ctx = Ctx(args=args, out=out, logs=logs, dry=args.dry_run)
    steps = [s for s in STEPS if wanted is None or s.name in wanted]
    print(f"gpu_check{' --dry-run' if ctx.dry else ''}: {len(steps)} steps, budget {args.budget:.0f} s, out {out}",
          flush=True)
    plan = simulate_plan(steps, args.budget)
    print("plan if each step takes its estimate: " + ", ".join(
        f"{s.name} {used:.0f}/{s.est_s:.0f} s" + ("" if used else " (skipped)") for s, (_, used) in zip(steps, plan)),
        flush=True)
    for i, step in enumerate(steps):
        left = ctx.left() - REPORT_RESERVE_S
        cap = plan_cap(step, steps[i + 1:], left)
        if ctx.dry:   # show the GPU run's cap; a rehearsal gets what is left here
            cap_shown = plan[i][0]
            cap = max(cap, step.min_s)
        else:
            cap_shown = cap
        entry = dict(name=step.name, what=step.what, est_s=step.est_s, min_s=step.min_s,
                     cap_s=round(max(cap_shown, 0), 1), gpu=step.gpu, seconds=0.0)
        print(f"[{ctx.elapsed():5.0f} s] {step.name:<17} est {step.est_s:>4.0f} s, min {step.min_s:>3.0f} s, "
              f"cap {max(cap_shown, 0):>4.0f} s  {step.what}", flush=True)
        if cap_shown < step.min_s and not ctx.dry:
            entry.update(status="skip", summary=f"budget: {max(cap, 0):.0f} s left for it, under its minimum "
                                                f"{step.min_s:.0f} s (estimate {step.est_s:.0f} s)")
        elif step.gpu and not ctx.dry and not ctx.env.get("gpu"):
            entry.update(status="skip", summary="no CUDA device visible to torch")
        else:
            t0 = time.perf_counter()
            try:
                res = step.fn(ctx, cap)
            except Exception as err:  # noqa: BLE001 - recorded; the run goes on
                res = dict(status="error", summary=f"{type(err).__name__}: {err}",
                           details=dict(traceback=traceback.format_exc()))
            entry.update(res)
            entry["seconds"] = round(time.perf_counter() - t0, 1)
        ctx.results.append(entry)
        print(f"          -> {entry['status']} ({entry['seconds']:.0f} s): {entry['summary'][:300]}", flush=True)
    files = write_report(ctx)
    print_short(ctx, files)
    # 0 when every step that ran passed (skips included); 1 when one failed, errored or timed out
    return 1 if [r for r in ctx.results if r["status"] in ("fail", "error", "timeout")] else 0


if __name__ == "__main__":
    sys.exit(main())
