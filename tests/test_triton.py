"""backend="triton" against the float64 reference (tests/oracle.py's accuracy rule).

On CPU the kernels run under the Triton interpreter, which triton fixes when the kernels are
decorated (the import of ral.backends.triton): the CPU tests run only in a pytest process started
with TRITON_INTERPRET=1,

    TRITON_INTERPRET=1 python -m pytest -q tests/test_triton.py tests/test_triton_seqs.py

and skip elsewhere; the CUDA tests (and the check that CPU tensors need the interpreter) run only
in a process without it. The 24 option combinations each run once, on a rotation of small problems
that covers, pairwise, the shape and layout features (Sq in {1, 17} and Sq < Sk, head dims 16 / 24
/ 80, GQA and MQA, Hr != H and Dr != D with "mean", left padding + row_mask, ref_stats, fp32 /
fp16, non-contiguous inputs, no v). The backward's query splits (dk / dv by atomics) run forced
through RAL_TRITON_Q_SPLITS, and their count is checked for a pretend 132-SM GPU. Larger shapes
and bf16 run on CUDA only (marked `cuda`, skipped without a GPU).
"""

from __future__ import annotations

import types

import pytest
import torch

from oracle import (Problem, cast, check, check_far_from_reference, check_near_reference,
                    check_out_weights_sum_to_one, check_stats, option_grid, option_id)

triton = pytest.importorskip("triton")

import ral  # noqa: E402
from ral import backends  # noqa: E402
from ral.backends.triton import launch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = launch.INTERPRETED  # TRITON_INTERPRET was set when the kernels were built
interpreted = pytest.mark.skipif(
    not INTERPRETED, reason="CPU kernels need the Triton interpreter: run this file in its own process, "
                            "TRITON_INTERPRET=1 python -m pytest tests/test_triton.py")
compiled = pytest.mark.skipif(INTERPRETED, reason="compiled kernels: run without TRITON_INTERPRET")

# The interpreter evaluates masked-out lanes too (exp2 overflow, inf * 0) before tl.where drops them.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


class StridedProblem(Problem):
    """A Problem whose q, k, v, q_ref, k_ref are (B, S, H, D) buffers viewed as (B, H, S, D)."""

    def make(self, device="cpu") -> dict:
        kw = super().make(device)
        for key in ("q", "k", "v", "q_ref", "k_ref"):
            if kw.get(key) is not None:
                kw[key] = kw[key].transpose(1, 2).contiguous().transpose(1, 2)
        return kw


# A rotation of small problems; option combination n takes variant n % len(VARIANTS).
# "mean_only" fields (Hr != H, Dr != D, a reference GQA) are dropped for heads="each".
VARIANTS = [
    dict(batch=2, heads=4, kv_heads=4, q_len=17, k_len=17, head_dim=16, dtype=torch.float32),
    dict(batch=2, heads=4, kv_heads=2, q_len=1, k_len=19, head_dim=24, dtype=torch.float16,
         with_ref_stats=True),
    dict(batch=1, heads=4, kv_heads=1, q_len=17, k_len=33, head_dim=16, dtype=torch.float32,
         mean_only=dict(ref_heads=2, ref_kv_heads=1, ref_head_dim=32), with_ref_stats=True),
    dict(batch=2, heads=2, kv_heads=2, q_len=17, k_len=20, head_dim=16, dtype=torch.float16,
         left_pad=(0, 5), row_mask=True, v_head_dim=None),
    dict(batch=1, heads=4, kv_heads=2, q_len=17, k_len=24, head_dim=80, v_head_dim=32,
         dtype=torch.float32, strided=True, mean_only=dict(ref_heads=6, ref_kv_heads=3, ref_head_dim=24)),
    dict(batch=2, heads=3, kv_heads=1, q_len=16, k_len=17, head_dim=16, dtype=torch.float32,
         left_pad=(3, 0), right_pad=(0, 2), row_mask=True, with_ref_stats=True,
         options=dict(scale=0.9)),
]


def make_problem(variant: dict, opts: dict, seed: int = 0) -> Problem:
    fields = {key: val for key, val in variant.items() if key not in ("mean_only", "strided", "options")}
    if opts["heads"] == "mean":
        fields.update(variant.get("mean_only", {}))
    options = {**opts, **variant.get("options", {})}
    cls = StridedProblem if variant.get("strided") else Problem
    return cls(options=options, seed=seed, **fields)


GRID = list(option_grid())


@interpreted
@pytest.mark.parametrize("index", range(len(GRID)), ids=[option_id(o) for o in GRID])
def test_option_grid_interpreted(index):
    opts = GRID[index]
    problem = make_problem(VARIANTS[index % len(VARIANTS)], opts, seed=index)
    check(problem, "triton")


@interpreted
def test_strided_inputs_are_not_copied(monkeypatch):
    """A (B, S, H, D) tensor viewed as (B, H, S, D) reaches the kernel as is, with its strides."""
    mod = backends.module("triton")
    seen = {}

    class Recorder:
        configs = ()  # looks autotuned: the launcher passes no block sizes

        def __getitem__(self, grid):
            return lambda **kwargs: seen.setdefault("kwargs", kwargs)

    monkeypatch.setattr(launch, "FORWARD", Recorder())
    kw = cast(StridedProblem(dtype=torch.float32).make(), torch.float32)
    call = ral.ops._checked_call(kw["q"], kw["k"], kw["v"], kw["q_ref"], kw["k_ref"], None, "jsd", "mean",
                                 True, True, None, None, None, None, "triton")
    mod.forward(call)
    for key in ("q", "k", "v", "q_ref", "k_ref"):
        got = seen["kwargs"][key.upper()]
        assert got.data_ptr() == kw[key].data_ptr() and got.stride() == kw[key].stride()
        assert not got.is_contiguous()


@interpreted
def test_bf16_interpreted_upcast():
    """bf16 under the interpreter runs with fp32 dots (triton 3.9 interpreter bug, docs/design.md "Backends")."""
    opts = dict(divergence="jsd", heads="mean", exclude_self=True, causal=True)
    check(Problem(batch=1, heads=2, kv_heads=1, q_len=9, k_len=12, dtype=torch.bfloat16, options=opts),
          "triton")


@interpreted
def test_peaky_self_attention_log_space():
    """A row that attends almost only to itself: Z is tiny but lse_P must stay exact, no NaN."""
    opts = dict(divergence="reverse_kl", heads="mean", exclude_self=True, causal=True, scale=8.0)
    problem = Problem(batch=1, heads=2, kv_heads=2, q_len=8, k_len=8, options=opts)
    base = problem.make()
    base["k"] = base["q"].clone()  # s_ii = 8 |q_i|^2 dominates every row
    res = ral.attention_kl(backend="triton", **cast(base, torch.float32))
    want = ral.attention_kl(backend="reference", **base)
    assert torch.isfinite(res.div).all()
    torch.testing.assert_close(res.div.double(), want.div, rtol=1e-4, atol=1e-6)
    finite = torch.isfinite(want.stats)
    torch.testing.assert_close(res.stats.double()[finite], want.stats[finite], rtol=1e-5, atol=1e-5)


@interpreted
@pytest.mark.parametrize("heads", ["mean", "each"])
def test_jsd_near_reference(heads):
    check_near_reference("triton", heads, q_len=40)


@interpreted
@pytest.mark.parametrize("exclude_self", [True, False])
@pytest.mark.parametrize("heads", ["mean", "each"])
def test_kl_far_from_reference(heads, exclude_self):
    """dq / dk within 2x PyTorch's error, as the CPU kernels'. Fails if gbar is sum_P pi g alone
    ("mean" measured 4.5-8.3x, "each" 1.0-2.3x) or if the stored lse's are rounded twice and read
    back with a third rounding ("mean" up to 2.45x on the test's cases; benchmarks/RESULTS.md,
    2026-12-07)."""
    check_far_from_reference("triton", heads, exclude_self, q_len=48)


@interpreted
@pytest.mark.parametrize("exclude_self", [True, False])
def test_out_weights_sum_to_one(exclude_self):
    check_out_weights_sum_to_one("triton", exclude_self)


@compiled
def test_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kw = cast(Problem(batch=1, heads=2, kv_heads=2, q_len=4, k_len=4).make(), torch.float32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        ral.attention_kl(backend="triton", **kw)


@interpreted
def test_head_dim_limit():
    kw = cast(Problem(batch=1, heads=1, kv_heads=1, q_len=2, k_len=2, head_dim=272).make(), torch.float32)
    with pytest.raises(ValueError, match="256"):
        ral.attention_kl(backend="triton", **kw)


def test_kernels_follow_the_interpret_mode_at_import():
    """The kernels are interpreted exactly when TRITON_INTERPRET was set as they were built, and the
    backend is available in either mode (this process's)."""
    from triton.runtime.interpreter import InterpretedFunction

    for kernel in (launch.FORWARD, launch.BACKWARD):
        interpreted_fn = isinstance(kernel, InterpretedFunction) or isinstance(getattr(kernel, "fn", None),
                                                                                InterpretedFunction)
        assert interpreted_fn == INTERPRETED
        assert hasattr(kernel, "configs") != INTERPRETED  # autotuned when compiled
    assert backends.unavailable_reason("triton") is None


def test_interpreter_problem_names_the_versions_that_cannot_run_the_kernels():
    """Triton's interpreter before 3.7 converts loop bounds with int() of a 1-element array, which numpy
    2.4 refuses (seen: triton 3.6.0 with numpy 2.4.6 and 2.5.5, every interpreted kernel call failing;
    numpy 2.3.5 ran them); the reason names both versions and the way out."""
    from ral.backends.triton.configs import interpreter_problem

    why = interpreter_problem("3.6.0", "2.4.6")
    assert why is not None and "3.6.0" in why and "2.4.6" in why and "triton>=3.7" in why
    assert interpreter_problem("3.6.0", "2.5.5") is not None
    for triton_version, numpy_version in (("3.6.0", "2.3.5"), ("3.7.0", "2.5.5"), ("3.9.0", "2.4.6"),
                                          ("3.10.0+git1a2b3c", "2.4.0rc1"), ("3.2.0", "1.26.4")):
        assert interpreter_problem(triton_version, numpy_version) is None, (triton_version, numpy_version)


@interpreted
def test_interpreter_problem_stops_the_call_with_its_reason(monkeypatch):
    import ral.backends.triton as triton_backend

    monkeypatch.setattr(triton_backend, "interpreter_problem", lambda: "triton 3.6.0 with numpy 2.4.6: reason")
    kw = cast(Problem(batch=1, heads=1, kv_heads=1, q_len=4, k_len=4, head_dim=8).make(), torch.float32)
    with pytest.raises(ValueError, match="backend='triton' cannot run this call: triton 3.6.0 with numpy 2.4.6"):
        ral.attention_kl(backend="triton", **kw)


# ----------------------------------------------------------------------------------------------
# heads="each" with kl / reverse_kl: the single-sweep forward
# ----------------------------------------------------------------------------------------------

ONE_SWEEP = [dict(divergence=d, heads="each", exclude_self=x, causal=c)
             for d in ("kl", "reverse_kl") for x in (True, False) for c in (True, False)]
# Sq < Sk over several key tiles (the running maxes move between tiles), left and right padding
# (a fully padded row in batch 0), row_mask, kv and reference GQA with different group sizes.
ONE_SWEEP_VARIANT = dict(batch=2, heads=2, kv_heads=1, ref_kv_heads=2, q_len=13, k_len=37,
                         head_dim=16, left_pad=(0, 7), right_pad=(25, 0), row_mask=True)


@interpreted
@pytest.mark.parametrize("with_ref_stats", [False, True], ids=["own_ref", "ref_stats"])
@pytest.mark.parametrize("opts", ONE_SWEEP, ids=option_id)
def test_each_one_sweep(opts, with_ref_stats):
    dtype = torch.float16 if opts["causal"] and not opts["exclude_self"] else torch.float32
    problem = Problem(options=opts, with_ref_stats=with_ref_stats, dtype=dtype, seed=3,
                      **ONE_SWEEP_VARIANT)
    check(problem, "triton")


class PeakyProblem(Problem):
    """Every row attends almost only to itself (k = q, large scale); the reference too when
    `peaky_ref` (then pi and rho are both near one-hot and the divergence sums cancel hardest)."""

    peaky_ref: bool = False

    def make(self, device="cpu") -> dict:
        kw = super().make(device)
        kw["k"] = kw["q"].clone()
        if self.peaky_ref:
            kw["k_ref"] = kw["q_ref"].clone() + 0.05 * kw["k_ref"]
        return kw


@interpreted
@pytest.mark.parametrize("peaky_ref", [False, True], ids=["diffuse_ref", "peaky_ref"])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
def test_each_one_sweep_peaky_self(divergence, peaky_ref):
    opts = dict(divergence=divergence, heads="each", exclude_self=True, causal=True, scale=6.0,
                ref_scale=6.0 if peaky_ref else None)
    problem = PeakyProblem(batch=1, heads=2, kv_heads=2, q_len=24, k_len=24, options=opts, seed=5)
    problem.peaky_ref = peaky_ref
    check(problem, "triton")
    kw = cast(problem.make(), torch.float32)
    res = ral.attention_kl(backend="triton", **kw)
    assert torch.isfinite(res.div).all() and torch.isfinite(res.stats[..., 1][:, :, 1:]).all()


@interpreted
@pytest.mark.parametrize("divergence,heads", [("kl", "each"), ("reverse_kl", "each"), ("jsd", "each"),
                                             ("reverse_kl", "mean")])
def test_row_rules_nan_empty_masked(divergence, heads):
    """NaN stays in its row (stats and div, not an empty row's 0); empty supports, masked rows and
    fully padded rows give 0. Single-sweep ("each" kl / reverse_kl) and two-sweep paths."""
    opts = dict(divergence=divergence, heads=heads, exclude_self=True, causal=True)
    base = Problem(batch=2, heads=2, kv_heads=1, q_len=9, k_len=20, left_pad=(0, 14), row_mask=True,
                   options=opts, seed=7).make()
    base["row_mask"][0, 4] = True
    base["q"][0, 1, 4] = float("nan")
    base["q"][1, 0, 6] = float("nan")
    base["row_mask"][1, 6] = False
    res = ral.attention_kl(backend="triton", **cast(base, torch.float32))
    want = ral.attention_kl(backend="reference", **base)
    nan_row = (0, 1, 4) if heads == "each" else (0, 4)
    assert torch.isnan(res.div).sum() == 1 and torch.isnan(res.div[nan_row])
    assert torch.isnan(res.stats[0, 1, 4]).all() and torch.isnan(res.stats[1, 0, 6]).all()
    assert torch.isnan(res.stats).sum() == 4
    assert (res.div[1, ..., :5] == 0).all()  # batch 1: rows 0-4 see only padding or only themselves
    ok = ~torch.isnan(want.div)
    assert torch.equal(torch.isnan(res.div), ~ok)
    torch.testing.assert_close(res.div.double()[ok], want.div[ok], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Backward query splits: each key block's query sweep cut into Q_SPLITS chunks, dk / dv by atomics
# ----------------------------------------------------------------------------------------------

# Sq = 50: 4 query blocks of 16 in the interpreter, so 3 splits give chunks of 2, 1, 1 and causal
# key blocks near the end have fewer query blocks than splits (empty chunks); 8 splits clamp to 4.
# Sq < Sk (causal offset), left padding + row_mask, kv GQA (Hkv > 1: "mean" accumulates dk / dv in
# memory) and MQA (in registers), no v.
SPLIT_CASES = [
    ("mean-mqa", 3, dict(divergence="jsd", heads="mean", exclude_self=True, causal=True),
     dict(batch=2, heads=3, kv_heads=1, left_pad=(0, 6), row_mask=True)),
    ("mean-gqa", 3, dict(divergence="kl", heads="mean", exclude_self=True, causal=True),
     dict(heads=4, kv_heads=2, ref_heads=2, ref_kv_heads=1)),
    ("mean-gqa-nocausal-nov", 8, dict(divergence="reverse_kl", heads="mean", exclude_self=False, causal=False),
     dict(heads=4, kv_heads=2, v_head_dim=None)),
    ("each-gqa", 3, dict(divergence="jsd", heads="each", exclude_self=True, causal=True),
     dict(batch=2, heads=2, kv_heads=1, left_pad=(0, 6), row_mask=True)),
    ("each-kl-nocausal", 8, dict(divergence="kl", heads="each", exclude_self=True, causal=False),
     dict(heads=2, kv_heads=2)),
]


@interpreted
@pytest.mark.parametrize("name,splits,opts,fields", SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES])
def test_backward_query_splits(monkeypatch, name, splits, opts, fields):
    """RAL_TRITON_Q_SPLITS forces the split; the same accuracy rule as everywhere."""
    monkeypatch.setenv("RAL_TRITON_Q_SPLITS", str(splits))
    problem = Problem(**{"batch": 1, **fields}, q_len=50, k_len=56, head_dim=16, options=opts, seed=11)
    check(problem, "triton")


def _backward_grid(monkeypatch, q_len, k_len, kv_heads, each, sm_count=None, forced=None):
    """The backward launch's program count for BLOCK_M = 16, BLOCK_N = 32, on a pretend GPU with
    sm_count SMs (a CUDA device is only named, never touched)."""
    if forced is None:
        monkeypatch.delenv("RAL_TRITON_Q_SPLITS", raising=False)
    else:
        monkeypatch.setenv("RAL_TRITON_Q_SPLITS", str(forced))
    if sm_count is not None:
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda dev: types.SimpleNamespace(multi_processor_count=sm_count))
    device = torch.device("cuda" if sm_count is not None else "cpu")
    grid = launch.backward_grid(k_len, q_len, kv_heads if each else 1, device)
    return grid(dict(BLOCK_M=16, BLOCK_N=32))[0]


def test_backward_split_choice(monkeypatch):
    """The target shape (B=1, Hkv=4, S=4096, 132 SMs): "mean" gets 4 splits (512 programs, >= 3
    waves), "each" (512 programs already) and S=16384 stay unsplit; never more splits than query
    blocks; the interpreter runs unsplit unless forced."""
    assert _backward_grid(monkeypatch, 4096, 4096, 4, False, sm_count=132) == 128 * 4
    assert _backward_grid(monkeypatch, 4096, 4096, 4, True, sm_count=132) == 128 * 4
    assert _backward_grid(monkeypatch, 16384, 16384, 4, False, sm_count=132) == 512
    assert _backward_grid(monkeypatch, 16, 4096, 1, False, sm_count=132) == 128  # one query block
    assert _backward_grid(monkeypatch, 40, 40, 1, False, sm_count=132) == 2 * 3  # 3 query blocks
    assert _backward_grid(monkeypatch, 4096, 4096, 4, False) == 128
    assert _backward_grid(monkeypatch, 4096, 4096, 4, False, forced=5) == 128 * 5
    assert _backward_grid(monkeypatch, 4096, 4096, 4, False, sm_count=132, forced=1) == 128


# ----------------------------------------------------------------------------------------------
# CUDA: compiled kernels, larger shapes, bf16
# ----------------------------------------------------------------------------------------------

CUDA_CASES = [
    dict(batch=2, heads=8, kv_heads=2, q_len=300, k_len=300, head_dim=64, dtype=torch.bfloat16),
    dict(batch=1, heads=6, kv_heads=6, q_len=129, k_len=400, head_dim=128, dtype=torch.float16,
         left_pad=(37,), row_mask=True),
    dict(batch=2, heads=4, kv_heads=1, q_len=200, k_len=257, head_dim=80, dtype=torch.float32,
         with_ref_stats=True),
    dict(batch=1, heads=4, kv_heads=2, q_len=96, k_len=96, head_dim=256, dtype=torch.bfloat16),
    dict(batch=1, heads=4, kv_heads=4, q_len=1, k_len=513, head_dim=96, dtype=torch.float16),
]


@compiled
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", range(len(CUDA_CASES)))
@pytest.mark.parametrize("opts", [GRID[0], GRID[6], GRID[13], GRID[19], GRID[22]],
                         ids=lambda o: option_id(o))
def test_cuda_larger(case, opts):
    fields = dict(CUDA_CASES[case])
    if opts["heads"] == "mean" and case == 0:
        fields.update(ref_heads=4, ref_kv_heads=4, ref_head_dim=128)
    check(Problem(options=opts, seed=case, **fields), "triton", device="cuda")


@compiled
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_strided_bf16():
    opts = dict(divergence="jsd", heads="mean", exclude_self=True, causal=True)
    problem = StridedProblem(batch=2, heads=8, kv_heads=4, q_len=190, k_len=190, head_dim=64,
                             dtype=torch.bfloat16, options=opts)
    check(problem, "triton", device="cuda")


@compiled
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("exclude_self", [True, False])
@pytest.mark.parametrize("heads", ["mean", "each"])
def test_cuda_kl_far_from_reference(heads, exclude_self):
    """test_kl_far_from_reference compiled (fp32, ieee dots): the statistics' conversions between
    natural and log2 units (common.lse_natural, common.sub_lse) keep their accuracy where the
    compiler fuses multiplies into adds, which the interpreter never does."""
    check_far_from_reference("triton", heads, exclude_self, q_len=48, device="cuda")


@compiled
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", range(2))
@pytest.mark.parametrize("opts", [GRID[0], GRID[13]], ids=lambda o: option_id(o))
def test_cuda_statistics(case, opts):
    """Entropy and per-segment mass beside the divergence, compiled, at sizes with many tiles."""
    fields = dict(CUDA_CASES[case])
    if opts["heads"] == "mean" and case == 0:
        fields.update(ref_heads=4, ref_kv_heads=4, ref_head_dim=128)
    check_stats(Problem(options=opts, seed=case, segments=3 + 5 * case, **fields), "triton", device="cuda")
