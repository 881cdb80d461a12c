"""The CUDA kernels of csrc/cuda, run on the CPU through the emulator of tests/cuda_emu, against the
float64 reference with the accuracy rule of tests/oracle.py.

The kernels are the real sources compiled as host C++ (tests/cuda_emu/build.py); they run through
the real Python path (ral.ops.attention_kl -> custom op -> ral.backends.compiled forward/backward), on CPU
tensors, under backend="cuda" routed to the emulated module. Shapes are small (a block is 64 rows x
64 keys, so 1..130 rows / keys give ragged tiles and several key tiles); the emulator reports 4 SMs,
so the forward's divergence pass and the backward split their key tiles over several blocks.
The emulator also checks what a GPU would not report: races between cp.async and ldmatrix, reads
of shared memory that nothing wrote (poisoned with NaN), cp.async reads outside the input views,
deadlocks and divergent warp collectives (tests/cuda_emu/cuda_emu.h). Skips when g++, the CUDA
headers or pybind11 are missing. Local sweeps: RAL_EMU_DEFAULTS="RAL_EMU_SCHEDULE=random:5,
RAL_EMU_CP_ASYNC=early" runs every test under that schedule.

Global-memory bounds (the CPU analog of compute-sanitizer memcheck; not run by default, ~2.5 min):

    python tests/cuda_emu/memcheck.py            # all of this file, kernels built with ASan + UBSan
    python tests/cuda_emu/memcheck.py --plant    # proof it can fail: a planted read past stats

runs this file on an AddressSanitizer + UBSan build of the emulated module with libasan preloaded,
so torch's tensors get redzones: a plain global load / store / atomic of a kernel past the end of
its tensor (q, k, v, masks, stats, out, div, dq, dk, dv, scratch), an access to shared memory past
the launch's dynamic size, and undefined behaviour in the kernels or the host / launch code abort
the run with a report (exit 1; 77 when libasan is missing). See tests/cuda_emu/memcheck.py.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import types

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracle import (PEAKED_SHAPES, Problem, cast, check, check_peaked_rows_against_fused,  # noqa: E402
                    check_nan_stays_in_its_row, check_near_reference, check_peaky_self_attention, option_grid,
                    option_id, upstream, run)

import ral  # noqa: E402
from ral import backends  # noqa: E402
from ral.backends import compiled as _compiled  # noqa: E402
from ral.backends import cuda as cuda_backend  # noqa: E402


def _import_build_helper():
    """tests/cuda_emu/build.py, under a name that cannot clash with an installed `build` package."""
    name = "ral_cuda_emu_build"
    if name not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emu", "build.py")
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


emu_build = _import_build_helper()

OPTIONS = list(option_grid())
F16, BF16 = torch.float16, torch.bfloat16


@pytest.fixture(scope="session")
def emu_module():
    try:
        return emu_build.load()
    except emu_build.Unavailable as err:
        pytest.skip(f"CUDA emulator unavailable: {err}")


def _lib(mod):
    """The emulator's C entry points (ctypes): launch log, cp.async source ranges, selftest."""
    lib = ctypes.CDLL(mod.__file__)
    lib.ral_emu_take_log.restype = ctypes.c_char_p
    lib.ral_emu_selftest.restype = ctypes.c_char_p
    lib.ral_emu_allow.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    return lib


def _allow_inputs(lib, p, backward):
    """Let cp.async read only inside the extents of the views q, k, v, q_ref, k_ref (and dout)."""
    lib.ral_emu_clear_allowed()
    views = [(p.q, (p.batch, p.heads, p.q_len, p.head_dim)), (p.k, (p.batch, p.kv_heads, p.k_len, p.head_dim)),
             (p.q_ref, (p.batch, p.ref_heads, p.q_len, p.ref_head_dim)),
             (p.k_ref, (p.batch, p.ref_kv_heads, p.k_len, p.ref_head_dim))]
    if p.has_v:
        views.append((p.v, (p.batch, p.kv_heads, p.k_len, p.v_head_dim)))
    for view, shape in views:
        extent = 1 + sum((n - 1) * s for n, s in zip(shape, view.stride))
        lib.ral_emu_allow(view.ptr, view.ptr + 2 * extent)
    if backward and p.has_v:
        lib.ral_emu_allow(p.dout, p.dout + 2 * p.batch * p.heads * p.q_len * p.v_head_dim)


def _backend(mod, lib):
    """A backend module (see ral.backends) whose kernels are the emulated CUDA ones (calls prepared as
    ral.backends.cuda prepares them)."""
    widen = cuda_backend._widened_placeholders

    def fwd(p):
        _allow_inputs(lib, p, False)
        mod.cuda_forward(p, 0)

    def bwd(p):
        _allow_inputs(lib, p, True)
        mod.cuda_backward(p, 0)

    def forward(call):
        return _compiled.forward(widen(call), fwd)

    def backward(call, dout, ddiv, delta, stats, ref_stats, gbar):
        return _compiled.backward(widen(call), dout, ddiv, delta, stats, ref_stats, gbar, bwd,
                                  mod.cuda_backward_scratch_bytes)

    def unsupported_reason(call):
        if call.q.device.type != "cpu":
            return "the emulated CUDA kernels take CPU tensors"
        p, _ = _compiled.params(widen(call))
        return None if mod.cuda_supports(p) else "cuda_supports: False (dtype, head dims, or shared memory)"

    return types.SimpleNamespace(unavailable_reason=lambda: None, unsupported_reason=unsupported_reason,
                                 forward=forward, backward=backward)


def route_cuda_to_emulator(mod, set_attribute=setattr):
    """From now on backend="cuda" on CPU tensors runs the emulated kernels of `mod` (emu_build.load()),
    through `set_attribute` (the fixture passes monkeypatch's, which undoes it). Returns the emulator's
    ctypes handle (launch log)."""
    lib = _lib(mod)
    backend = _backend(mod, lib)
    original = backends.module
    set_attribute(backends, "module", lambda name: backend if name == "cuda" else original(name))
    set_attribute(_compiled, "_C", mod)
    set_attribute(_compiled, "_IMPORT_ERROR", None)
    return lib


@pytest.fixture
def emu(emu_module, monkeypatch):
    """backend="cuda" on CPU tensors runs the emulated kernels (undone after the test). Returns the
    emulator's ctypes handle (launch log)."""
    lib = route_cuda_to_emulator(emu_module, monkeypatch.setattr)
    for name in ("RAL_EMU_SCHEDULE", "RAL_EMU_CP_ASYNC", "RAL_EMU_BLOCK_ORDER", "RAL_EMU_SMS", "RAL_EMU_SMEM_OPTIN"):
        monkeypatch.delenv(name, raising=False)
    # RAL_EMU_DEFAULTS="RAL_EMU_SCHEDULE=random:5,RAL_EMU_CP_ASYNC=early": run every test so (local sweeps)
    for item in filter(None, os.environ.get("RAL_EMU_DEFAULTS", "").split(",")):
        name, value = item.split("=", 1)
        monkeypatch.setenv(name.strip(), value.strip())
    lib.ral_emu_take_log()
    lib.ral_emu_clear_allowed()  # no cp.async ranges left from an earlier test (the selftests set none)
    return lib


def launches(lib):
    """(grid, block, smem) of the launches since the last call."""
    out = []
    for line in lib.ral_emu_take_log().decode().splitlines():
        fields = dict(f.split("=") for f in line.split()[1:])
        out.append((tuple(int(x) for x in fields["grid"].split(",")), int(fields["block"]), int(fields["smem"])))
    return out


def problem(**kw):
    kw.setdefault("batch", 1)
    kw.setdefault("heads", 2)
    kw.setdefault("kv_heads", 2)
    kw.setdefault("head_dim", 64)
    kw.setdefault("v_head_dim", kw["head_dim"])
    return Problem(**kw)


# ---- the emulator itself: one warp's ldmatrix + mma against a plain matrix product -----------------

def test_emulator_selftest(emu):
    """ldmatrix (plain and .trans) + mma.sync m16n8k16 + shfl.bfly of one warp against numpy-style
    products (tests/cuda_emu/selftest.cu), for fp16 and bf16."""
    msg = emu.ral_emu_selftest().decode()
    assert msg == "ok", msg


@pytest.mark.parametrize("mode,error", [(0, None), (1, "still in flight"), (3, "no __syncthreads in between"),
                                        (2, "deadlock")])
def test_emulator_catches_races(emu, mode, error):
    """A correct cp.async -> wait -> __syncthreads -> ldmatrix exchange passes; without the wait or
    the barrier, or with a lane skipping a collective, the launch fails (tests/cuda_emu/selftest.cu)."""
    emu.ral_emu_selftest_race.restype = ctypes.c_char_p
    msg = emu.ral_emu_selftest_race(mode).decode()
    assert (msg == "ok") if error is None else (error in msg), msg


# ---- the option grid -------------------------------------------------------------------------------

@pytest.mark.parametrize("opts", OPTIONS, ids=option_id)
def test_option_grid_fp16(emu, opts):
    check(problem(batch=2, q_len=70, k_len=70, options=opts, dtype=F16, seed=1), "cuda")


@pytest.mark.parametrize("opts", OPTIONS[::2], ids=option_id)
def test_option_grid_bf16(emu, opts):
    check(problem(q_len=45, k_len=100, options=opts, dtype=BF16, seed=2,
                  **({} if opts["causal"] else dict(q_len=100, k_len=45))), "cuda")


# ---- shapes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("heads", ["mean", "each"])
def test_head_dims(emu, head_dim, heads):
    dtype = F16 if head_dim in (64, 96, 256) else BF16
    opts = dict(divergence="jsd", heads=heads, exclude_self=True, causal=True)
    check(problem(heads=3, kv_heads=3, q_len=70, k_len=70, head_dim=head_dim, dtype=dtype, options=opts), "cuda")


@pytest.mark.parametrize("dims", [(8, 8, 8), (24, 40, 72), (136, 200, 8), (248, 136, 256)], ids=str)
def test_head_dims_multiple_of_8(emu, dims):
    """D, Dv, Dr that are multiples of 8 but not of 16: the tiles' zero-filled padding columns."""
    head_dim, v_head_dim, ref_head_dim = dims
    opts = dict(divergence="reverse_kl", heads="mean", exclude_self=True, causal=True)
    check(problem(batch=2, kv_heads=1, q_len=67, k_len=90, head_dim=head_dim, v_head_dim=v_head_dim,
                  ref_head_dim=ref_head_dim, dtype=F16 if head_dim < 100 else BF16, options=opts), "cuda")


@pytest.mark.parametrize("q_len,k_len,causal", [(1, 1, True), (1, 77, True), (17, 130, True), (113, 130, False),
                                                (90, 40, False), (1, 9, False)])
def test_lengths(emu, q_len, k_len, causal):
    opts = dict(divergence="kl", heads="mean", exclude_self=True, causal=causal)
    check(problem(heads=2, kv_heads=1, q_len=q_len, k_len=k_len, dtype=F16, options=opts), "cuda")


@pytest.mark.parametrize("heads", ["mean", "each"])
@pytest.mark.parametrize("divergence", ["jsd", "reverse_kl"])
def test_gqa_mqa(emu, divergence, heads):
    opts = dict(divergence=divergence, heads=heads, exclude_self=True, causal=True)
    for kv_heads, ref_kv_heads in ((2, 4), (1, 1)):
        check(problem(heads=4, kv_heads=kv_heads, ref_kv_heads=ref_kv_heads, q_len=40, k_len=80, dtype=F16,
                      options=opts), "cuda")


@pytest.mark.parametrize("divergence,dtype,ref", [("jsd", F16, (6, 3, 128)), ("kl", BF16, (6, 3, 128)),
                                                  ("reverse_kl", F16, (1, 1, 80)), ("jsd", BF16, (3, 1, 32))])
def test_teacher_shapes(emu, divergence, dtype, ref):
    """heads="mean" with a reference of another head count and head dim (distillation)."""
    opts = dict(divergence=divergence, heads="mean", exclude_self=True, causal=True)
    check(problem(heads=4, kv_heads=2, ref_heads=ref[0], ref_kv_heads=ref[1], ref_head_dim=ref[2], q_len=66,
                  k_len=70, dtype=dtype, options=opts), "cuda")


@pytest.mark.parametrize("opts", OPTIONS[::3], ids=option_id)
def test_masks_and_ref_stats(emu, opts):
    check(problem(batch=2, q_len=75, k_len=75, head_dim=80, dtype=BF16, left_pad=(5, 0), right_pad=(0, 9),
                  row_mask=True, with_ref_stats=True, options=opts), "cuda")


@pytest.mark.parametrize("heads", ["mean", "each"])
def test_without_v(emu, heads):
    opts = dict(divergence="jsd", heads=heads, exclude_self=True, causal=True)
    check(problem(q_len=65, k_len=65, head_dim=96, v_head_dim=None, dtype=F16, options=opts), "cuda")


def test_v_head_dim_differs(emu):
    """Dv = 192 > 128: the forward writes out in two launches (columns 0..127, 128..191)."""
    opts = dict(divergence="kl", heads="mean", exclude_self=False, causal=True)
    check(problem(q_len=50, k_len=60, head_dim=64, v_head_dim=192, dtype=F16, options=opts), "cuda")


def test_strided_inputs(emu):
    """(B, S, H, D) storage seen as (B, H, S, D), padded rows, and a misaligned k_ref base (the
    kernels' plain-load path): the same numbers as contiguous inputs, and the reference's."""
    gen = torch.Generator().manual_seed(0)
    B, H, S, D = 2, 2, 70, 64

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(F16)

    strided = dict(q=rand(B, S, H, D).transpose(1, 2), k=rand(B, S, H, D).transpose(1, 2),
                   v=rand(B, S, H, D + 8)[..., :D].transpose(1, 2), q_ref=rand(B, S, H, D).transpose(1, 2),
                   k_ref=rand(B, H, S, 2 * D)[..., 1:D + 1])
    base = {name: t.double() for name, t in strided.items()}
    assert strided["k_ref"].data_ptr() % 16 != 0 and not strided["q"].is_contiguous()
    contiguous = {name: t.contiguous() for name, t in strided.items()}
    dout, ddiv = upstream(dict(base, heads="mean"))
    opts = dict(divergence="jsd", heads="mean")
    got = run(dict(strided, **opts), "cuda", dout, ddiv)
    same = run(dict(contiguous, **opts), "cuda", dout, ddiv)
    want = run(dict(base, **opts), "reference", dout, ddiv)
    for name in ("out", "div", "stats", "dq", "dk", "dv"):
        torch.testing.assert_close(got[name], same[name], atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(got[name], want[name], atol=2e-2, rtol=2e-2, msg=name)


# ---- non-finite and extreme rows --------------------------------------------------------------------

@pytest.mark.parametrize("heads", ["mean", "each"])
def test_nan_stays_in_its_row(emu, heads):
    check_nan_stays_in_its_row("cuda", heads, F16, "cpu", q_len=70, head_dim=64, tol=1e-4)


@pytest.mark.parametrize("heads", ["mean", "each"])
@pytest.mark.parametrize("divergence", ["jsd", "reverse_kl"])
def test_peaky_self_attention(emu, divergence, heads):
    check_peaky_self_attention("cuda", divergence, heads, q_len=70)


@pytest.mark.parametrize("heads", ["mean", "each"])
def test_jsd_near_reference(emu, heads):
    check_near_reference("cuda", heads, F16)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
@pytest.mark.parametrize("shape", PEAKED_SHAPES, ids=str)
def test_peaked_rows_against_fused(emu, dtype, shape):
    check_peaked_rows_against_fused("cuda", dtype, shape)


@pytest.mark.parametrize("heads", ["mean", "each"])
def test_dead_rows_are_exactly_zero(emu, heads):
    opts = dict(divergence="reverse_kl", heads=heads, exclude_self=True, causal=True)
    prob = problem(batch=2, heads=2, kv_heads=1, q_len=70, k_len=100, left_pad=(0, 40), row_mask=True,
                   options=opts, seed=3, dtype=BF16)
    kw = cast(prob.make(), BF16)
    res = ral.attention_kl(backend="cuda", **kw)
    div = res.div if heads == "each" else res.div[:, None]
    assert (div[1, :, :11] == 0).all()
    assert (div[~kw["row_mask"][:, None].expand_as(div)] == 0).all()
    assert torch.isneginf(res.stats[1, :, :10]).all() and torch.isneginf(res.stats[1, :, 10, 1]).all()
    assert torch.isfinite(res.div).all()
    check(prob, "cuda")


# ---- schedules, pipeline depth, key splits ---------------------------------------------------------

SCHEDULES = [
    dict(RAL_EMU_SCHEDULE="reverse"),
    dict(RAL_EMU_SCHEDULE="random:1", RAL_EMU_CP_ASYNC="early"),
    dict(RAL_EMU_SCHEDULE="random:2"),
    dict(RAL_EMU_SCHEDULE="reverse", RAL_EMU_SMEM_OPTIN="60000"),   # one pipeline stage in the backward
    dict(RAL_EMU_SCHEDULE="random:4", RAL_EMU_SMS="1"),             # no key split
    dict(RAL_EMU_SCHEDULE="forward", RAL_EMU_SMS="64"),             # as many splits as key tiles
]


@pytest.mark.parametrize("env", SCHEDULES, ids=lambda e: ",".join(f"{k[8:].lower()}={v}" for k, v in e.items()))
@pytest.mark.parametrize("heads", ["mean", "each"])
def test_schedules(emu, monkeypatch, env, heads):
    """Other thread orders between barriers (a missing __syncthreads shows up as a wrong result in
    some order, or as a race the emulator reports), cp.async landing at issue instead of at the
    wait, one pipeline stage, key splits."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    opts = dict(divergence="jsd", heads=heads, exclude_self=True, causal=True)
    check(problem(batch=2, heads=2, kv_heads=1, q_len=100, k_len=130, head_dim=64, dtype=F16, options=opts,
                  row_mask=True, seed=4), "cuda")
    smem = {smem for _, _, smem in launches(emu)}
    assert smem, "no emulated launch"
    if "RAL_EMU_SMEM_OPTIN" in env:  # the backward: sP, sdS + one stage of Q, K, V, dO tiles
        assert max(smem) == 2 * 64 * 72 * 2 + 2 * 64 * (72 + 72) * 2 <= int(env["RAL_EMU_SMEM_OPTIN"])


@pytest.mark.parametrize("heads", ["mean", "each"])
def test_one_stage_everywhere(emu, monkeypatch, heads):
    """D = 256 without v on a device with 100000 bytes of opt-in shared memory (sm_86-like): every
    kernel runs its single-buffer pipeline."""
    monkeypatch.setenv("RAL_EMU_SMEM_OPTIN", "100000")
    monkeypatch.setenv("RAL_EMU_SCHEDULE", "random:3")
    opts = dict(divergence="kl", heads=heads, exclude_self=True, causal=True)
    check(problem(q_len=70, k_len=100, head_dim=256, v_head_dim=None, dtype=BF16, options=opts), "cuda")
    # stats: 64 x 264 halves (Q) + one K stage; div and backward: one Q + K stage (+ sP, sdS)
    assert sorted({smem for _, _, smem in launches(emu)}) == [0, 2 * 64 * 264 * 2, 2 * 64 * 264 * 2 + 2 * 64 * 72 * 2]


@pytest.mark.parametrize("dims,fits", [((144, 144), True), ((256, 64), False), ((64, 256), False)], ids=str)
def test_small_shared_memory_device(emu, monkeypatch, dims, fits):
    """sm_86 / sm_89 (99 KB of opt-in shared memory per block): the backward's tiles for head dims
    above ~144 do not fit; the kernels say so in cuda_supports (backend="auto" then takes Triton)
    instead of failing at the backward's launch."""
    monkeypatch.setenv("RAL_EMU_SMEM_OPTIN", "101376")
    prob = problem(q_len=20, k_len=70, head_dim=dims[0], v_head_dim=dims[1], dtype=F16)
    if fits:
        check(prob, "cuda")
        assert max(smem for _, _, smem in launches(emu)) <= 101376
    else:
        with pytest.raises(ValueError, match="cuda_supports: False"):
            ral.attention_kl(backend="cuda", **cast(prob.make(), F16))


def test_key_splits(emu):
    """With 4 SMs the divergence pass and the backward split the key tiles over several blocks
    (grid.z > 1), so their fp32 atomics sum partial results."""
    opts = dict(divergence="kl", heads="mean", exclude_self=True, causal=False)
    check(problem(q_len=60, k_len=130, dtype=BF16, options=opts), "cuda")
    grids = launches(emu)
    assert max(grid[2] for grid, _, _ in grids) == 3, grids  # 3 key tiles, one query tile
