"""What the benchmarks compare, and how one point is measured. Shared by bench_memory.py,
bench_speed.py and the pytest-benchmark suite (test_bench_ops.py).

Providers (all compute the final-layer attention output; all but ``sdpa`` also the per-row
divergence of the head-averaged attention policy from a reference's, and its gradient):

    eager     the paper's way: materialise both models' (B, H, S, S) attention probabilities
              (as transformers' ``eager_attention_forward`` does), average the heads, drop the
              self position, renormalise, JSD; backward through all of it.
    sdpa      torch.nn.functional.scaled_dot_product_attention, output only: the floor (it does
              not compute any divergence). ``sdpa-flash``: the same restricted to the
              FlashAttention kernel (the GPU floor of issue 3; an error where flash cannot run).
    ral-<b>   ral.ops.attention_kl(..., backend=<b>) for every kernel backend this machine has
              (cpu, triton, cuda); ``ral-reference`` (the materialising oracle) on request only.

Modes: ``fwd`` (forward, no autograd graph), ``bwd`` (backward only, after a forward outside the
measurement), ``full`` (forward + backward).

Memory: CPU = resident-set peak (VmHWM, reset through /proc/self/clear_refs) above the resident
set once the inputs exist; run each point in a fresh process (bench_memory.py does, with glibc's
mmap threshold fixed there: fixed_mmap_threshold). GPU =
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` above
``memory_allocated`` once the inputs exist. Both include the outputs and the gradients.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:  # an installed ral (pip install -e .) wins; a bare source checkout works too
    import ral  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, REPO)
    import ral  # noqa: F401

import torch
import torch.nn.functional as F

import ral.backends
import ral.ops
from ral.backends import compiled

MODES = ("fwd", "bwd", "full")
GIB = 1024 ** 3
MIB = 1024 ** 2


# ----------------------------------------------------------------------------------------------
# Configuration and inputs
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """The shape and options of a sweep; S varies per point. Hr = H and Dr = D (same model)."""

    batch: int = 1
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    causal: bool = True
    divergence: str = "jsd"
    heads_mode: str = "mean"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def asdict(self) -> dict:
        return asdict(self)


def make_inputs(cfg: Config, seq: int, seed: int = 0) -> dict:
    """q, k, v (requiring grad), the reference q_ref, k_ref, and the upstream gradients dout, ddiv."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dt, dev = cfg.torch_dtype, cfg.device

    def rand(*shape, grad=False, scale=1.0):
        t = (torch.randn(*shape, generator=gen) * scale).to(device=dev, dtype=dt)
        return t.requires_grad_(grad)

    b, h, hkv, d = cfg.batch, cfg.heads, cfg.kv_heads, cfg.head_dim
    div_shape = (b, seq) if cfg.heads_mode == "mean" else (b, h, seq)
    return dict(
        q=rand(b, h, seq, d, grad=True), k=rand(b, hkv, seq, d, grad=True), v=rand(b, hkv, seq, d, grad=True),
        q_ref=rand(b, h, seq, d), k_ref=rand(b, hkv, seq, d),
        dout=rand(b, h, seq, d, scale=0.1),
        ddiv=(torch.randn(*div_shape, generator=gen)).to(device=dev, dtype=torch.float32),
    )


# ----------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------

def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' repeat_kv: (B, Hkv, S, D) -> (B, Hkv * n_rep, S, D)."""
    if n_rep == 1:
        return x
    b, hkv, s, d = x.shape
    return x[:, :, None].expand(b, hkv, n_rep, s, d).reshape(b, hkv * n_rep, s, d)


def eager_attention(q, k, v=None, causal: bool = True, scale: Optional[float] = None):
    """transformers' ``eager_attention_forward`` (Qwen2), returning the (B, H, S, S) probabilities.

    scores = q k^T * scale + additive causal mask; softmax in fp32; out = probs @ v (None without v).
    """
    n_rep = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = _repeat_kv(k, n_rep)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if causal:
        sq, sk = q.shape[2], k.shape[2]
        mask = torch.full((sq, sk), torch.finfo(scores.dtype).min, dtype=scores.dtype, device=q.device)
        mask = torch.triu(mask, diagonal=sk - sq + 1)
        scores = scores + mask[None, None]
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = None if v is None else torch.matmul(probs, _repeat_kv(v, n_rep))
    return out, probs


def eager_policy(probs: torch.Tensor, heads_mode: str = "mean", eps: float = 1e-12) -> torch.Tensor:
    """The paper's Eq. 2 from materialised probabilities: head mean, drop self, renormalise.

    (B, H, Sq, Sk) -> (B, Sq, Sk) ("mean") or (B, H, Sq, Sk) ("each"), fp32.
    """
    p = probs.float()
    if heads_mode == "mean":
        p = p.mean(1)
    sq, sk = p.shape[-2], p.shape[-1]
    rows = torch.arange(sq, device=p.device)[:, None] + (sk - sq)   # bottom-right aligned
    self_pos = rows == torch.arange(sk, device=p.device)[None, :]
    p = p.masked_fill(self_pos, 0.0)
    return p / p.sum(-1, keepdim=True).clamp_min(eps)


def eager_divergence(p: torch.Tensor, r: torch.Tensor, divergence: str = "jsd", eps: float = 1e-12):
    """Row divergence of two materialised distributions (natural log); eps keeps log(0) finite."""
    lp, lr = torch.log(p + eps), torch.log(r + eps)
    if divergence == "kl":
        return (p * (lp - lr)).sum(-1)
    if divergence == "reverse_kl":
        return (r * (lr - lp)).sum(-1)
    lm = torch.log(0.5 * (p + r) + eps)
    return 0.5 * (p * (lp - lm)).sum(-1) + 0.5 * (r * (lr - lm)).sum(-1)


def forward_eager(inp: dict, cfg: Config):
    out, probs = eager_attention(inp["q"], inp["k"], inp["v"], cfg.causal)
    with torch.no_grad():
        _, ref_probs = eager_attention(inp["q_ref"], inp["k_ref"], None, cfg.causal)
        rho = eager_policy(ref_probs, cfg.heads_mode)
        del ref_probs
    pi = eager_policy(probs, cfg.heads_mode)
    return out, eager_divergence(pi, rho, cfg.divergence)


def forward_sdpa(inp: dict, cfg: Config):
    q, k, v = inp["q"], inp["k"], inp["v"]
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal, enable_gqa=gqa)
    return out, None


def forward_sdpa_flash(inp: dict, cfg: Config):
    """SDPA restricted to its FlashAttention kernel (the GPU floor); raises when flash cannot take the
    call (torch then names why), rather than silently timing another kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return forward_sdpa(inp, cfg)


def forward_ral(backend: str) -> Callable:
    def fwd(inp: dict, cfg: Config):
        res = ral.ops.attention_kl(inp["q"], inp["k"], inp["v"], q_ref=inp["q_ref"], k_ref=inp["k_ref"],
                                   divergence=cfg.divergence, heads=cfg.heads_mode, exclude_self=True,
                                   causal=cfg.causal, backend=backend)
        return res.out, res.div
    return fwd


def provider_fn(name: str) -> Callable:
    if name == "eager":
        return forward_eager
    if name == "sdpa":
        return forward_sdpa
    if name == "sdpa-flash":
        return forward_sdpa_flash
    if name.startswith("ral-"):
        return forward_ral(name[4:])
    raise ValueError(f"unknown provider {name!r}")


def ral_backends_for(device: str) -> list:
    """The ral kernel backends that can run on `device` here (never the reference)."""
    have = ral.backends.available()
    if device.startswith("cuda"):
        return [b for b in ("cuda", "triton") if b in have]
    return [b for b in ("cpu",) if b in have]


def default_providers(device: str) -> list:
    return ["eager", "sdpa"] + [f"ral-{b}" for b in ral_backends_for(device)]


def backend_label(provider: str, device: str) -> str:
    """What actually runs: the torch path for eager/sdpa, the ral backend otherwise."""
    if provider == "eager":
        return "torch-matmul-softmax"
    if provider == "sdpa":
        return "torch-sdpa"
    if provider == "sdpa-flash":
        return "torch-sdpa-flash"
    return provider[4:]


def backward(out, div, inp: dict, retain_graph: bool = False) -> None:
    tensors, grads = [out], [inp["dout"]]
    if div is not None:
        tensors.append(div)
        grads.append(inp["ddiv"])
    torch.autograd.backward(tensors, grads, retain_graph=retain_graph)


def clear_grads(inp: dict) -> None:
    for name in ("q", "k", "v"):
        inp[name].grad = None


# ----------------------------------------------------------------------------------------------
# Memory meters
# ----------------------------------------------------------------------------------------------

def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _glibc(call: str, *args) -> None:
    """libc.so.6's `call`(*args) where the C library is glibc; nothing elsewhere."""
    try:
        getattr(ctypes.CDLL("libc.so.6"), call)(*args)
    except (OSError, AttributeError):
        pass


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc) so they are not reused invisibly to RSS."""
    _glibc("malloc_trim", 0)


def fixed_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """Serve every allocation of `nbytes` or more (glibc) by its own mmap, returned to the OS when
    freed. glibc's default threshold moves up to the size of the last large block freed, after
    which same-sized tensors come from the heap and stay resident once freed; the resident-set
    peak of one call then depended on what earlier calls had left (the same ral-cpu point at
    S=4096 measured 69.0-79.0 MiB over nine fresh processes, 69.4-71.0 MiB with this). Call it in a
    process that only measures memory: timing after it pays fresh pages on every large
    allocation."""
    _glibc("mallopt", -3, int(nbytes))  # M_MMAP_THRESHOLD


class RssMeter:
    """Resident-set peak above a baseline, Linux: VmHWM after resetting it via /proc/self/clear_refs.

    Elsewhere falls back to ru_maxrss (a process-lifetime peak: only honest in a fresh process).
    """

    def __init__(self):
        self.exact = os.path.exists("/proc/self/clear_refs") and _status_kib("VmHWM") is not None
        self.base = 0

    def start(self) -> None:
        gc.collect()
        _malloc_trim()
        if self.exact:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.base = _status_kib("VmRSS") * 1024
        else:  # pragma: no cover
            import resource
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

    def peak(self) -> int:
        if self.exact:
            return max(0, _status_kib("VmHWM") * 1024 - self.base)
        import resource  # pragma: no cover
        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) - self.base)


class CudaMeter:
    def __init__(self, device):
        self.device = torch.device(device)
        self.base = 0

    def start(self) -> None:
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return max(0, torch.cuda.max_memory_allocated(self.device) - self.base)


def meter_for(device: str):
    return CudaMeter(device) if device.startswith("cuda") else RssMeter()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def is_oom(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    if hasattr(torch.cuda, "OutOfMemoryError") and isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


# ----------------------------------------------------------------------------------------------
# One point
# ----------------------------------------------------------------------------------------------

def make_step(provider: str, mode: str, inp: dict, cfg: Config):
    """(step, state): `step()` runs one call of `mode` for `provider` on `inp` (gradients cleared
    first); for "bwd" the forward runs here, once, and `state` keeps its graph alive."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    fwd = provider_fn(provider)
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fwd(inp, cfg)
        return step, None
    if mode == "full":
        def step():
            clear_grads(inp)
            o, d = fwd(inp, cfg)
            backward(o, d, inp)
        return step, None
    graph = fwd(inp, cfg)

    def step():
        clear_grads(inp)
        backward(*graph, inp, retain_graph=True)
    return step, graph


class Timer:
    """Seconds of one call: CUDA events around it on a GPU (median-friendly, no host sync inside
    the region), perf_counter on a CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn: Callable) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def _failure(err: BaseException) -> dict:
    return dict(status="oom" if is_oom(err) else "error", peak_bytes=None, time_s=None, times=[],
                note=f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}")


def _release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def measure_peak(provider: str, mode: str, seq: int, cfg: Config, *, warmup_small: bool = True,
                   seed: int = 0) -> dict:
    """Peak bytes of one (provider, mode, S) call above the inputs: {"status": "ok", "peak_bytes",
    "first_call_s"} or {"status": "oom"|"error", "note"}.

    A tiny warm-up call first (thread pools, dispatch caches, the custom op, code loading); on a
    GPU also a full call at the real shape (compilation, autotuning). The measured call is the
    first at the real shape on a CPU: its time, ``first_call_s``, includes first-touch page faults
    and is reported apart from the timed repeats (time_interleaved).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    fwd = provider_fn(provider)
    on_gpu = cfg.device.startswith("cuda")
    graph = None
    try:
        if warmup_small:
            tiny = make_inputs(cfg, min(64, seq), seed)
            out, div = fwd(tiny, cfg)
            backward(out, div, tiny)
            del tiny, out, div
        inp = make_inputs(cfg, seq, seed)
        if on_gpu:  # compile / autotune at the real shape before measuring (only what the mode runs)
            if mode == "fwd":
                with torch.no_grad():
                    out, div = fwd(inp, cfg)
            else:
                out, div = fwd(inp, cfg)
                backward(out, div, inp)
            del out, div
            clear_grads(inp)
        meter = meter_for(cfg.device)
        if mode == "bwd":
            graph = fwd(inp, cfg)
            sync(cfg.device)
        meter.start()
        t0 = time.perf_counter()
        if mode == "fwd":
            with torch.no_grad():
                out, div = fwd(inp, cfg)
            del out, div
        elif mode == "full":
            out, div = fwd(inp, cfg)
            backward(out, div, inp)
            del out, div
        else:
            backward(*graph, inp, retain_graph=True)
        sync(cfg.device)
        first = time.perf_counter() - t0
        peak = meter.peak()
        return dict(status="ok", peak_bytes=peak, first_call_s=first)
    except Exception as err:  # noqa: BLE001 - recorded, not raised: a sweep goes on
        return _failure(err)
    finally:
        graph = None
        _release(cfg.device)


def time_interleaved(providers: list, mode: str, seq: int, cfg: Config, *, repeats: int = 5,
                     min_time: float = 1.0, min_repeats: int = 3, seed: int = 0,
                     max_seconds: Optional[float] = None) -> dict:
    """Median time of `mode` at S=seq for each provider, the providers' calls interleaved.

    One set of inputs; each provider first makes one untimed warm-up call at the real shape
    (compilation, autotuning, first-touch page faults: its time is ``warmup_s``, reported apart).
    Then rounds: each round times one call of every provider still timing, in an order rotated
    by one each round, so that a slow drift of the machine (another tenant, clocks, thermals)
    lands on every provider alike. A provider stops after `repeats` timed calls, or after
    `min_repeats` once `min_time` seconds of it were timed; `max_seconds` (wall) stops all.
    Returns {provider: {"status": "ok", "time_s" (median), "times", "warmup_s"} or a failure}.
    """
    res, steps, state, warm = {}, {}, [], {}
    timer = Timer(cfg.device)
    t_start = time.perf_counter()
    try:
        inp = make_inputs(cfg, seq, seed)
    except Exception as err:  # noqa: BLE001
        fail = _failure(err)
        return {p: dict(fail) for p in providers}
    for p in providers:
        try:
            step, keep = make_step(p, mode, inp, cfg)
            sync(cfg.device)
            t0 = time.perf_counter()
            step()
            sync(cfg.device)
            warm[p] = time.perf_counter() - t0
            steps[p] = step
            state.append(keep)
        except Exception as err:  # noqa: BLE001
            res[p] = _failure(err)
            _release(cfg.device)
    times = {p: [] for p in steps}
    cap = max(1, repeats)
    floor = max(1, min(min_repeats, cap))

    def timing(p):
        n = len(times[p])
        return p not in res and n < cap and (n < floor or sum(times[p]) < min_time)
    rnd, truncated = 0, False
    while True:
        todo = [p for p in steps if timing(p)]
        if not todo:
            break
        if max_seconds is not None and rnd > 0 and time.perf_counter() - t_start > max_seconds:
            truncated = True
            break
        k = rnd % len(todo)
        for p in todo[k:] + todo[:k]:
            clear_grads(inp)
            try:
                times[p].append(timer(steps[p]))
            except Exception as err:  # noqa: BLE001
                res[p] = _failure(err)
                _release(cfg.device)
        rnd += 1
    for p in steps:
        if p in res:
            continue
        res[p] = dict(status="ok", time_s=statistics.median(times[p]), times=times[p], warmup_s=warm[p],
                      note=f"stopped by max_seconds after {len(times[p])} repeats" if truncated else "")
    del steps, state, inp
    _release(cfg.device)
    return res


def run_point(provider: str, mode: str, seq: int, cfg: Config, *, repeats: int = 5, min_time: float = 1.0,
              measure_memory: bool = True, warmup_small: bool = True, seed: int = 0) -> dict:
    """One (provider, mode, S) alone: the peak of the first call (measure_peak; None when
    `measure_memory` is False), then the median of timed repeats after a warm-up call
    (time_interleaved with one provider). {"status", "peak_bytes", "time_s", "times",
    "first_call_s", "warmup_s"}."""
    mem = dict(status="ok", peak_bytes=None, first_call_s=None)
    if measure_memory:
        mem = measure_peak(provider, mode, seq, cfg, warmup_small=warmup_small, seed=seed)
        if mem["status"] != "ok":
            return mem
    res = time_interleaved([provider], mode, seq, cfg, repeats=repeats, min_time=min_time, seed=seed)[provider]
    res.update(peak_bytes=mem["peak_bytes"], first_call_s=mem["first_call_s"])
    return res


# ----------------------------------------------------------------------------------------------
# Predictions (to skip points that would not fit) and FLOP counts
# ----------------------------------------------------------------------------------------------

def predicted_bytes(provider: str, mode: str, seq: int, cfg: Config) -> float:
    """A rough a-priori peak for a point (only eager and ral-reference grow as S^2)."""
    elem = torch.empty((), dtype=cfg.torch_dtype).element_size()
    b, h, d = cfg.batch, cfg.heads, cfg.head_dim
    linear = 12 * b * h * seq * d * elem + 64 * b * h * seq
    if provider in ("eager", "ral-reference"):
        ss = b * h * seq * seq * max(elem, 4)
        # measured here (fp32, S=512): eager holds ~4.5 / 5.6 / 9.8 score-sized tensors at its peak
        n = {"fwd": 5.0, "bwd": 6.0, "full": 10.0}[mode] if provider == "eager" else 12.0
        return n * ss + linear
    return linear


def attention_flops(mode: str, seq: int, cfg: Config) -> float:
    """FlashAttention's count: 4·B·H·Sq·Sk·D forward (QK^T and PV), 2.5x that backward, halved causal."""
    f = 4.0 * cfg.batch * cfg.heads * seq * seq * cfg.head_dim
    if cfg.causal:
        f /= 2
    return {"fwd": f, "bwd": 2.5 * f, "full": 3.5 * f}[mode]


def divergence_flops(mode: str, seq: int, cfg: Config) -> float:
    """The divergence's extra matmul work in ral's fused kernels, counted like attention_flops.

    One Sq×Sk×D score product costs 2·B·H·Sq·Sk·D (halved causal). The forward of a two-sweep
    divergence (jsd or heads="mean": the row normalisers come first) adds, beyond attention's own
    QK^T: the current scores again in the second sweep (1 product) and the reference's scores in
    both sweeps (2 products; Hr = H, Dr = D here). A one-sweep divergence (kl / reverse_kl with
    heads="each") adds only the reference's scores (1 product). The backward recomputes the
    reference's scores once (1 product); its dS term rides on attention's dQ/dK products.
    """
    one = 2.0 * cfg.batch * cfg.heads * seq * seq * cfg.head_dim
    if cfg.causal:
        one /= 2
    two_sweeps = cfg.divergence == "jsd" or cfg.heads_mode == "mean"
    fwd = (3 if two_sweeps else 1) * one
    bwd = 1 * one
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


# ----------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> set:
    """The logical CPUs this process may run on (all of them where the OS does not say)."""
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # pragma: no cover - not Linux
        return set(range(os.cpu_count() or 1))


def cpu_cores(sysfs: str = "/sys/devices/system/cpu") -> Optional[tuple]:
    """(the logical CPUs this process may run on, the cores they sit on): SMT siblings, e.g. a cloud
    VM's two vCPUs on one core, count as one core (Linux's CPU topology); None where it is unknown."""
    try:
        cpus = usable_cpus()
        cores = set()
        for cpu in cpus:
            with open(os.path.join(sysfs, f"cpu{cpu}", "topology", "thread_siblings_list")) as fh:
                cores.add(fh.read().strip())
    except (AttributeError, OSError):
        return None
    return len(cpus), len(cores)


def cpu_description() -> str:
    """The CPU model, its logical CPUs and, where the usable ones share cores, how many (SMT)."""
    topology = cpu_cores()
    smt = ""
    if topology and topology[1] < topology[0]:
        smt = f" (SMT: {topology[0]} usable on {topology[1]} core{'s' if topology[1] > 1 else ''})"
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs{smt}"


def device_description(device: str) -> str:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{props.name} ({props.total_memory / GIB:.0f} GiB)"
    lanes = getattr(compiled._C, "cpu_lanes", None)  # 16 AVX-512, 8 AVX / AVX2, 4 SSE (csrc/cpu/simd.h)
    width = f", ral-cpu vectors of {lanes} floats" if lanes else ""
    return f"{cpu_description()}, torch threads {torch.get_num_threads()}{width}"


def load_average() -> Optional[list]:
    try:
        return list(os.getloadavg())
    except OSError:  # pragma: no cover
        return None


def versions() -> dict:
    return dict(ral_version=getattr(ral, "__version__", "?"), torch_version=torch.__version__)


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / 1024:.0f} KiB"


def fmt_time(t: Optional[float]) -> str:
    if t is None:
        return "-"
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.1f} ms"
    return f"{t * 1e6:.0f} us"


def seq_label(s: int) -> str:
    return f"{s // 1024}k" if s >= 1024 and s % 1024 == 0 else str(s)


def default_dtype(device: str) -> str:
    return "bfloat16" if device.startswith("cuda") else "float32"


def add_problem_arguments(ap) -> None:
    """The op's options every sweep takes: --dtype, --divergence, --heads-mode, --no-causal
    (read back by problem_options)."""
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="default float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--divergence", default="jsd", choices=["jsd", "kl", "reverse_kl"])
    ap.add_argument("--heads-mode", default="mean", choices=["mean", "each"])
    ap.add_argument("--no-causal", action="store_true")


def problem_options(args, device: str) -> dict:
    """add_problem_arguments' values as Config's fields: dtype, divergence, heads_mode, causal."""
    return dict(dtype=args.dtype or default_dtype(device), divergence=args.divergence, heads_mode=args.heads_mode,
                causal=not args.no_causal)


def pick_device(requested: str) -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; exits with a clear message when a
    CUDA device is asked for and torch cannot see one."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {requested}: torch {torch.__version__} sees no CUDA device "
                         "(a CPU-only torch build, or no GPU/driver here); use --device cpu")
    return requested


__all__ = ["Config", "MODES", "make_inputs", "provider_fn", "default_providers", "ral_backends_for",
           "make_step", "measure_peak", "time_interleaved", "run_point", "predicted_bytes",
           "attention_flops", "divergence_flops"]


def worker(conn, provider: str, mode: str, seq: int, cfg_dict: dict, opts: dict) -> None:
    """Entry point of a fresh per-point process (bench_memory.py): measure the memory of one
    point (measure_peak), send the result back."""
    try:
        if opts.get("threads"):
            torch.set_num_threads(int(opts["threads"]))
        if not cfg_dict.get("device", "cpu").startswith("cuda"):
            fixed_mmap_threshold()
        res = measure_peak(provider, mode, seq, Config(**cfg_dict))
    except BaseException as err:  # noqa: BLE001
        res = dict(status="error", peak_bytes=None, time_s=None, times=[], note=f"{type(err).__name__}: {err}")
    conn.send(res)
    conn.close()


def time_worker(conn, providers: list, mode: str, seq: int, cfg_dict: dict, opts: dict) -> None:
    """Entry point of a fresh process timing one (mode, S) for several providers, interleaved."""
    try:
        if opts.get("threads"):
            torch.set_num_threads(int(opts["threads"]))
        res = time_interleaved(providers, mode, seq, Config(**cfg_dict), repeats=opts.get("repeats", 5),
                               min_time=opts.get("min_time", 1.0), min_repeats=opts.get("min_repeats", 3),
                               max_seconds=opts.get("max_seconds"))
    except BaseException as err:  # noqa: BLE001
        res = {p: dict(status="error", time_s=None, times=[], note=f"{type(err).__name__}: {err}") for p in providers}
    conn.send(res)
    conn.close()


def spawn_json_worker(script: str, job: dict, timeout: float, env: Optional[dict] = None) -> dict:
    """Runs ``python script --worker <job as JSON>`` in a fresh process and returns the last JSON
    line it printed, or {"error": why} (a timeout, an exit status, the last line of its stderr)."""
    try:
        done = subprocess.run([sys.executable, os.path.abspath(script), "--worker", json.dumps(job)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(error=f"no result within {timeout:.0f} s")
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        return dict(error=(done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:300])
    return json.loads(lines[-1])
