"""Ahead-of-time GPU compile check of the Triton kernels, no GPU needed.

tests/test_triton.py runs the kernels under TRITON_INTERPRET=1, which never takes the compiled path
(bf16 dots are upcast there, one fixed small config runs, no shared-memory or register limits).
This file runs in a process without TRITON_INTERPRET (it skips under it) and compiles, for sm_80
and sm_90 (triton.compile with a GPUTarget and the bundled ptxas), the kernel variants the
launchers produce, with the exact arguments they pass: it asks
``ral.backends.triton.launch.forward_launch`` / ``backward_launch`` for the launch of a call, builds
the signature, constexprs and specialisation attributes with triton's own binder, and compiles
with each autotune config the pruner keeps for that call. It asserts that every one compiles and
fits the target's opt-in shared memory per block, and that the first kept config (the one
RAL_TRITON_AUTOTUNE=0 runs) spills at most spill_budget() bytes (registers and spills from ptxas -v).

The backward's query split count (Q_SPLITS) is not a compile-time constant: the kernel reads it
from the grid size, so every compiled backward already holds both dk / dv flushes (a store when
unsplit, fp32 atomics when split; "mean" with Hkv > 1 adds by atomics either way). The "-split"
variant is the target layout (28 query heads on 4 kv heads, "mean", jsd) launched with forced
splits; it also checks that the launch's grid carries them.

CI (default): every variant x {sm_80, sm_90}, bf16, head dim 128, the config RAL_TRITON_AUTOTUNE=0
runs (the first the pruner keeps). RAL_TRITON_COMPILE_ALL=1: every kept config, head dims 64 / 128
/ 256, bf16 and fp16 and fp32; RAL_TRITON_COMPILE_REPORT=path appends one line per compile
(variant, arch, dtype, head dim, config, shared bytes, registers, spill bytes) to that file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re

import pytest
import torch

triton = pytest.importorskip("triton")

from ral.backends import Call, Options  # noqa: E402
from ral.backends.triton import launch as triton_launch  # noqa: E402

pytestmark = pytest.mark.skipif(triton_launch.INTERPRETED,
                                reason="the kernels were built for the interpreter (TRITON_INTERPRET=1)")

ALL = os.environ.get("RAL_TRITON_COMPILE_ALL", "0") not in ("", "0")
REPORT = os.environ.get("RAL_TRITON_COMPILE_REPORT")
SMEM_LIMIT = {80: 166912, 90: 232448}  # opt-in shared memory per block: 163 KB / 227 KB


def _compiler():
    """(GPUTarget, make_backend, ASTSource, create_function_from_signature) or skip."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature
        make_backend(GPUTarget("cuda", 80, 32))
        ptxas = triton.knobs.nvidia.ptxas.path
    except Exception as err:  # pragma: no cover - depends on the triton build
        pytest.skip(f"triton's NVIDIA backend is not usable here ({type(err).__name__}: {err})")
    if not ptxas or not os.path.exists(ptxas):
        pytest.skip("triton's bundled ptxas is missing")
    return GPUTarget, make_backend, ASTSource, create_function_from_signature


@pytest.fixture(autouse=True)
def _compiled_mode(monkeypatch):
    """Compile every time (a cache hit gives no ptxas log) and have triton print ptxas -v."""
    monkeypatch.setenv("TRITON_ALWAYS_COMPILE", "1")
    monkeypatch.setenv("TRITON_DUMP_PTXAS_LOG", "1")
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, without its warning
    monkeypatch.delenv("RAL_TRITON_AUTOTUNE", raising=False)


# (name, backward, options, features). Features: v, ref_stats (forward only), kpm, rm (forward
# only), heads (query heads, default 4), kv_heads (backward "mean" with kv_heads > 1 accumulates
# dk/dv in memory), q_splits (backward: forced RAL_TRITON_Q_SPLITS), seqs (a sequence table of
# three packed sequences: Call.seqs, HAS_SEQS). Options with policy_stats get key_segments (when
# num_segments > 0) and, for the backward, the statistics' weights (Call.stats_w).
VARIANTS = [
    ("fwd-mean-jsd", False, dict(divergence="jsd"), dict(v=True, kpm=True, rm=True)),
    ("fwd-mean-kl-refstats-nov", False, dict(divergence="kl"), dict(v=False, ref_stats=True)),
    ("fwd-mean-rkl-noself-nocausal", False, dict(divergence="reverse_kl", exclude_self=False, causal=False),
     dict(v=True)),
    ("fwd-each-kl", False, dict(divergence="kl", heads_each=True), dict(v=True, kpm=True, rm=True)),
    ("fwd-each-rkl-refstats", False, dict(divergence="reverse_kl", heads_each=True),
     dict(v=True, ref_stats=True)),
    ("fwd-each-jsd", False, dict(divergence="jsd", heads_each=True), dict(v=True)),
    ("bwd-mean-jsd-mqa", True, dict(divergence="jsd"), dict(v=True, kpm=True, kv_heads=1)),
    ("bwd-mean-kl-gqa", True, dict(divergence="kl"), dict(v=True, kv_heads=2)),
    ("bwd-mean-rkl-nov", True, dict(divergence="reverse_kl"), dict(v=False, kv_heads=2)),
    ("bwd-mean-jsd-gqa-split", True, dict(divergence="jsd"),
     dict(v=True, kpm=True, heads=28, kv_heads=4, q_splits=4)),
    ("bwd-each-jsd", True, dict(divergence="jsd", heads_each=True), dict(v=True, kpm=True)),
    ("bwd-each-rkl-noself-nocausal", True,
     dict(divergence="reverse_kl", heads_each=True, exclude_self=False, causal=False), dict(v=True)),
    # with a sequence table (packed sequences / context-parallel chunks: HAS_SEQS)
    ("fwd-mean-jsd-seqs", False, dict(divergence="jsd"), dict(v=True, rm=True, seqs=True)),
    ("fwd-each-kl-seqs", False, dict(divergence="kl", heads_each=True), dict(v=True, seqs=True)),
    ("bwd-mean-jsd-gqa-seqs", True, dict(divergence="jsd"), dict(v=True, heads=28, kv_heads=4, seqs=True)),
    ("bwd-each-jsd-seqs", True, dict(divergence="jsd", heads_each=True), dict(v=True, seqs=True)),
    # with policy statistics (entropy and num_segments masses: POLICY_STATS, NUM_SEG; NO_REF for
    # ral.attention_stats), the target layout's 28 heads on 4 kv heads for "mean"
    ("fwd-mean-jsd-stats", False, dict(divergence="jsd", policy_stats=True, num_segments=3),
     dict(v=True, kpm=True, rm=True, heads=28, kv_heads=4)),
    ("fwd-each-kl-stats", False, dict(divergence="kl", heads_each=True, policy_stats=True, num_segments=8),
     dict(v=True)),
    ("fwd-mean-stats-noref-seqs", False, dict(policy_stats=True, no_reference=True), dict(v=True, ref_stats=True,
                                                                                          seqs=True)),
    ("bwd-mean-jsd-gqa-stats", True, dict(divergence="jsd", policy_stats=True, num_segments=3),
     dict(v=True, heads=28, kv_heads=4)),
    ("bwd-each-rkl-stats", True, dict(divergence="reverse_kl", heads_each=True, policy_stats=True, num_segments=8),
     dict(v=True, kpm=True)),
]
ARCHS = [80, 90]
if ALL:
    SHAPES = [(torch.bfloat16, 128), (torch.bfloat16, 256), (torch.bfloat16, 64),
              (torch.float16, 128), (torch.float16, 256), (torch.float32, 128), (torch.float32, 256)]
else:
    SHAPES = [(torch.bfloat16, 128)]


def make_call(backward: bool, options: dict, features: dict, dtype, head_dim: int):
    """A small call with the given features; returns (call, extra backward arguments or None)."""
    batch, heads, seq = 1, features.get("heads", 4), 256
    kv_heads = features.get("kv_heads", 2)
    gen = torch.Generator().manual_seed(0)
    t = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    opts = Options(**{"scale": head_dim ** -0.5, "ref_scale": head_dim ** -0.5, **options})
    call = Call(
        q=t(batch, heads, seq, head_dim), k=t(batch, kv_heads, seq, head_dim),
        v=t(batch, kv_heads, seq, head_dim) if features.get("v") else None,
        q_ref=t(batch, heads, seq, head_dim), k_ref=t(batch, kv_heads, seq, head_dim),
        ref_stats=torch.zeros(batch, heads, seq, 2) if features.get("ref_stats") and not backward else None,
        key_padding_mask=torch.ones(batch, seq, dtype=torch.bool) if features.get("kpm") else None,
        row_mask=torch.ones(batch, seq, dtype=torch.bool) if features.get("rm") else None,
        options=opts, key_segments=torch.zeros(batch, seq, dtype=torch.int32) if opts.num_segments else None)
    if features.get("seqs"):
        # three packed sequences of 100, 56 and 100 rows and keys, causal bottom-right in each
        rows = [[0, start, n, start, n, 0, 0, 0] for start, n in ((0, 100), (100, 56), (156, 100))]
        call = dataclasses.replace(call, seqs=torch.tensor(rows, dtype=torch.int32), max_q_len=100,
                                   max_k_len=100)
    if not backward:
        return call, None
    rows = (batch, heads, seq) if opts.heads_each else (batch, seq)
    if opts.policy_stats:
        call = dataclasses.replace(call, stats_w=torch.ones(rows + (1 + opts.num_segments,)))
    extra = dict(dout=t(batch, heads, seq, head_dim) if call.v is not None else None,
                 ddiv=torch.ones(rows), delta=torch.zeros(batch, heads, seq),
                 stats=torch.zeros(batch, heads, seq, 2), ref_stats=torch.zeros(batch, heads, seq, 2),
                 gbar=torch.zeros(rows))
    return call, extra


def launch_for(backward: bool, call, extra):
    if backward:
        return triton_launch.backward_launch(call, **extra, interp=False)
    return triton_launch.forward_launch(call, interp=False)


def kept_configs(launch) -> list:
    """The configs the autotuner would benchmark for this launch (its own early_config_prune),
    first = the one RAL_TRITON_AUTOTUNE=0 runs."""
    kern = launch.kernel
    assert hasattr(kern, "configs"), "compiled-mode kernels are autotuned"
    return kern.early_config_prune(kern.configs, {}, **launch.kwargs)  # every argument goes by name


_PTXAS = [("regs", r"Used (\d+) registers"), ("spill_stores", r"(\d+) bytes spill stores"),
          ("spill_loads", r"(\d+) bytes spill loads"), ("stack", r"(\d+) bytes stack frame")]


def compile_launch(launch, config, arch: int) -> dict:
    """Compile `launch` with `config` for sm_`arch` exactly as JITFunction.run would; returns
    shared bytes and the ptxas -v numbers."""
    GPUTarget, make_backend, ASTSource, create_function_from_signature = _compiler()
    fn = launch.kernel.fn  # the JITFunction under the autotuner
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs, **config.all_kwargs())
    bound, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                options=options.__dict__)
    text = log.getvalue()
    res = {"shared": int(kernel.metadata.shared)}
    for key, pattern in _PTXAS:
        found = re.findall(pattern, text)
        res[key] = max(int(x) for x in found) if found else None
    assert res["regs"] is not None, f"no ptxas -v output captured:\n{text[-2000:]}"
    return res


def _config_name(cfg) -> str:
    kw = cfg.kwargs
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']}w{cfg.num_warps}s{cfg.num_stages}"


CASES = [pytest.param(arch, name, backward, options, features, dtype, dim,
                      id=f"sm{arch}-{name}-{str(dtype).split('.')[-1]}-d{dim}")
         for dtype, dim in SHAPES for name, backward, options, features in VARIANTS for arch in ARCHS]


def spill_budget(backward: bool, dtype, dim: int):
    """Register spill bytes (ptxas "spill stores") allowed for the first kept config, the one
    RAL_TRITON_AUTOTUNE=0 runs; None: reported, not asserted. 16-bit types: a few dozen bytes
    (ptxas spills 4-40 B in some variants of otherwise spill-free tiles); the backward at head dim
    256 spills ~0.5-1 KB with every tile tried (a known cost, see _BWD_TABLE); fp32 (the accuracy
    path) is reported only. The other kept configs are autotune candidates: they must compile and
    fit, and their spills are reported."""
    if dtype == torch.float32:
        return None
    if backward and dim > 128:
        return 1024
    return 64


@pytest.mark.parametrize("arch,name,backward,options,features,dtype,dim", CASES)
def test_compiles_and_fits(monkeypatch, arch, name, backward, options, features, dtype, dim):
    _compiler()
    call, extra = make_call(backward, options, features, dtype, dim)
    launch = launch_for(backward, call, extra)
    configs = kept_configs(launch)
    assert configs, "the pruner kept no config"
    splits = features.get("q_splits")
    if splits:
        monkeypatch.setenv("RAL_TRITON_Q_SPLITS", str(splits))
        meta = configs[0].all_kwargs()
        assert launch.grid(meta) == (triton.cdiv(call.k.shape[2], meta["BLOCK_N"]) * splits,)
    if not ALL:
        configs = configs[:1]
    budget = spill_budget(backward, dtype, dim)
    problems = []
    for i, cfg in enumerate(configs):
        try:
            res = compile_launch(launch, cfg, arch)
        except Exception as err:
            problems.append(f"{_config_name(cfg)}: does not compile: {type(err).__name__}: {str(err)[:500]}")
            continue
        line = (f"{name}\tsm_{arch}\t{str(dtype).split('.')[-1]}\t{dim}\t{_config_name(cfg)}\t"
                f"{res['shared']}\t{res['regs']}\t{res['spill_stores']}\t{res['spill_loads']}\t{res['stack']}")
        print(line)
        if REPORT:
            with open(REPORT, "a") as f:
                f.write(line + "\n")
        if res["shared"] > SMEM_LIMIT[arch]:
            problems.append(f"{_config_name(cfg)}: {res['shared']} B shared > {SMEM_LIMIT[arch]}")
        if i == 0 and budget is not None and (res["spill_stores"] or 0) > budget:
            problems.append(f"{_config_name(cfg)} (first kept): ptxas spills {res['spill_stores']} B > {budget}")
    assert not problems, "; ".join(problems)


def test_autotune_off_takes_first_kept(monkeypatch):
    """RAL_TRITON_AUTOTUNE=0 keeps exactly the first config the pruner keeps (the one compiled above)."""
    _compiler()
    for backward in (False, True):
        for dim in (64, 128, 256):
            call, extra = make_call(backward, dict(divergence="jsd"), dict(v=True), torch.bfloat16, dim)
            launch = launch_for(backward, call, extra)
            kept = kept_configs(launch)
            monkeypatch.setenv("RAL_TRITON_AUTOTUNE", "0")
            assert kept_configs(launch) == kept[:1]
            monkeypatch.delenv("RAL_TRITON_AUTOTUNE")
