"""Statistics of the current policy (docs/design.md, "Attention statistics"; SPEC section 8):
entropy and per-segment mass, values and gradients, on the reference and the cpu backend.

The oracle is ral.reference in float64; the cpu kernel must meet the accuracy rule of
tests/oracle.py (the triton kernels: tests/test_triton_stats.py, under the interpreter) for out, div, stats, entropy, mass and the gradients, with upstream weights on
out, div, entropy and mass together (or on the statistics alone).
"""

from __future__ import annotations

import math
import os
import sys
import threading

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracle import (STATS_NAMES, PackedProblem, Problem, assert_compiled_matches_eager,  # noqa: E402
                    check_attention_stats, check_dead_rows_give_zero, check_packed, check_stats, option_grid,
                    option_id)

import ral  # noqa: E402
from ral import backends, reference  # noqa: E402
from ral.backends import compiled as _compiled  # noqa: E402

CPU = _compiled.import_error() is None
needs_cpu = pytest.mark.skipif(not CPU, reason=f"ral._C not built: {_compiled.import_error()}")
OPTIONS = list(option_grid())


# ---- the reference (the oracle) against a direct computation ---------------------------------

def direct_stats(q, k, heads, exclude_self, causal, key_padding_mask, key_segments, num_segments):
    """entropy and mass written out from the definition, with eager softmax (float64)."""
    batch, n_heads, q_len, dim = q.shape
    k_len = k.shape[2]
    scores = q @ k.repeat_interleave(n_heads // k.shape[1], 1).transpose(-1, -2) / math.sqrt(dim)
    attended, support = reference.key_sets(batch, q_len, k_len, causal=causal, exclude_self=exclude_self,
                                           key_padding_mask=key_padding_mask, device=q.device)
    a = torch.softmax(scores.masked_fill(~attended[:, None], float("-inf")), -1).nan_to_num(0.0)
    if heads == "mean":
        p = a.mean(1) * support
    else:
        p = a * support[:, None]
    z = p.sum(-1, keepdim=True)
    pi = torch.where(z > 0, p / z.clamp_min(1e-300), torch.zeros_like(p))
    entropy = -(pi * torch.log(torch.where(pi > 0, pi, torch.ones_like(pi)))).sum(-1)
    one_hot = torch.nn.functional.one_hot(key_segments, num_segments).double()
    mass = pi @ (one_hot if heads == "mean" else one_hot[:, None])
    return entropy, mass


@pytest.mark.parametrize("heads", ["mean", "each"])
@pytest.mark.parametrize("exclude_self", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_reference_is_the_definition(heads, exclude_self, causal):
    problem = Problem(batch=2, heads=4, kv_heads=2, q_len=9, k_len=12, left_pad=(3, 0), segments=3,
                      options=dict(heads=heads, exclude_self=exclude_self, causal=causal))
    kw = problem.make()
    res = ral.attention_kl(**kw, backend="reference")
    entropy, mass = direct_stats(kw["q"], kw["k"], heads, exclude_self, causal, kw["key_padding_mask"],
                                 kw["key_segments"], 3)
    torch.testing.assert_close(res.entropy, entropy)
    torch.testing.assert_close(res.mass, mass)
    live = mass.sum(-1) > 0
    torch.testing.assert_close(mass.sum(-1)[live], torch.ones_like(mass.sum(-1)[live]))


def test_reference_gradients_are_finite_and_exact():
    """gradcheck of the float64 reference through entropy and mass (empty rows included)."""
    problem = Problem(batch=1, heads=2, kv_heads=1, q_len=5, k_len=5, head_dim=4, v_head_dim=None, left_pad=(1,),
                      segments=2)
    kw = problem.make()
    q, k = kw.pop("q").requires_grad_(True), kw.pop("k").requires_grad_(True)
    kw.pop("v")

    def fn(q, k):
        res = ral.attention_kl(q, k, backend="reference", **kw)
        return res.entropy, res.mass

    assert torch.autograd.gradcheck(fn, (q, k))


# ---- the cpu kernel against the oracle -----------------------------------------------------

@needs_cpu
@pytest.mark.parametrize("with_div", [True, False], ids=["div+stats", "stats"])
@pytest.mark.parametrize("index", range(len(OPTIONS)), ids=[option_id(o) for o in OPTIONS])
def test_option_grid(index, with_div):
    problem = Problem(batch=2, heads=4, kv_heads=2, q_len=17, k_len=23, left_pad=(2, 0), right_pad=(0, 3),
                      row_mask=True, segments=3, seed=index, options=OPTIONS[index])
    check_stats(problem, "cpu", with_div=with_div)


@needs_cpu
@pytest.mark.parametrize("heads", ["mean", "each"])
@pytest.mark.parametrize("shape", [(113, 150, 8, 2, 64, 48), (70, 70, 6, 1, 80, None), (1, 9, 4, 4, 16, 16)],
                         ids=["blocks", "mqa-no-v", "one-row"])
def test_shapes(heads, shape):
    """several query / key blocks, partial tiles, GQA / MQA, no v."""
    q_len, k_len, n_heads, kv_heads, dim, v_dim = shape
    problem = Problem(batch=2, heads=n_heads, kv_heads=kv_heads, q_len=q_len, k_len=k_len, head_dim=dim,
                      v_head_dim=v_dim, segments=4, seed=3, options=dict(heads=heads, divergence="kl"))
    check_stats(problem, "cpu")


@needs_cpu
def test_reference_with_other_heads_and_ref_stats():
    problem = Problem(batch=2, heads=8, kv_heads=2, q_len=40, k_len=40, ref_heads=3, ref_kv_heads=1,
                      ref_head_dim=32, with_ref_stats=True, segments=2, seed=5)
    check_stats(problem, "cpu")


@needs_cpu
@pytest.mark.parametrize("num_segments", range(1, 9))
def test_every_segment_count(num_segments):
    problem = Problem(batch=1, heads=4, kv_heads=4, q_len=70, k_len=70, segments=num_segments, seed=num_segments,
                      options=dict(heads="mean" if num_segments % 2 else "each"))
    errors = check_stats(problem, "cpu")
    assert errors["mass"][0] < 1e-5


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    check_stats(Problem(batch=2, heads=4, kv_heads=2, q_len=33, k_len=33, dtype=dtype, segments=3, seed=2), "cpu")


@needs_cpu
@pytest.mark.parametrize("heads", ["mean", "each"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_empty_and_padded_rows_give_zero(heads, backend):
    check_dead_rows_give_zero(backend, heads)


@needs_cpu
@pytest.mark.parametrize("heads", ["mean", "each"])
def test_packed_sequences(heads):
    problem = PackedProblem(q_lens=(5, 0, 1, 17, 70), heads=4, kv_heads=2, row_mask=True, segments=3,
                            options=dict(heads=heads))
    check_packed(problem, "cpu", names=STATS_NAMES)


def test_packed_reference_equals_dense_per_sequence():
    problem = PackedProblem(q_lens=(5, 9), heads=2, kv_heads=1, segments=2, options=dict(heads="each"))
    kw = problem.make()
    res = ral.ops.attention_kl_varlen(**kw, backend="reference")
    assert res.entropy.shape == (14, 2) and res.mass.shape == (14, 2, 2)
    for n, (a, b) in enumerate(((0, 5), (5, 14))):
        dense = {name: kw[name][a:b].transpose(0, 1)[None] for name in ("q", "k", "v", "q_ref", "k_ref")}
        one = ral.attention_kl(**dense, key_segments=kw["key_segments"][a:b][None], num_segments=2, heads="each",
                               backend="reference")
        torch.testing.assert_close(res.entropy[a:b], one.entropy[0].T)
        torch.testing.assert_close(res.mass[a:b], one.mass[0].transpose(0, 1))


# ---- attention_stats ----------------------------------------------------------------------

@pytest.mark.parametrize("segments", [0, 3])
@pytest.mark.parametrize("heads", ["mean", "each"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_attention_stats(backend, heads, segments):
    if backend == "cpu" and not CPU:
        pytest.skip("ral._C not built")
    check_attention_stats(backend, heads, segments)


# ---- interface: bad input, torch.compile, other backends -----------------------------------

def _good():
    torch.manual_seed(0)
    return dict(q=torch.randn(2, 4, 5, 8), k=torch.randn(2, 2, 7, 8), v=torch.randn(2, 2, 7, 8),
                q_ref=torch.randn(2, 4, 5, 8), k_ref=torch.randn(2, 2, 7, 8))


@pytest.mark.parametrize("segments, num, error, match", [
    (torch.zeros(2, 7, dtype=torch.long), None, ValueError, "num_segments"),
    (None, 3, ValueError, "key_segments"),
    (torch.zeros(2, 7, dtype=torch.long), 0, ValueError, "num_segments must be in 1..8"),
    (torch.zeros(2, 7, dtype=torch.long), 9, ValueError, "num_segments must be in 1..8"),
    (torch.zeros(2, 7, dtype=torch.long), 2.0, TypeError, "num_segments must be an int"),
    (torch.zeros(2, 7, dtype=torch.long), True, TypeError, "num_segments must be an int"),
    (torch.zeros(2, 7), 2, TypeError, "key_segments: dtype must be an integer"),
    (torch.zeros(2, 7, dtype=torch.bool), 2, TypeError, "key_segments: dtype must be an integer"),
    (torch.zeros(2, 6, dtype=torch.long), 2, ValueError, r"key_segments: shape must be \(B, Sk\)"),
    (torch.zeros(7, dtype=torch.long), 2, ValueError, "key_segments must have 2 dimensions"),
    (torch.full((2, 7), 2), 2, ValueError, r"key_segments: ids must be in \[0, num_segments=2\)"),
    (torch.full((2, 7), -1), 2, ValueError, r"key_segments: ids must be in \[0, num_segments=2\)"),
    ([[0] * 7] * 2, 2, TypeError, "key_segments must be a torch.Tensor"),
])
def test_bad_input(segments, num, error, match):
    for backend in ("reference", "cpu") if CPU else ("reference",):
        with pytest.raises(error, match=match):
            ral.attention_kl(**_good(), key_segments=segments, num_segments=num, backend=backend)
    kw = _good()
    del kw["q_ref"], kw["k_ref"]
    with pytest.raises(error, match=match):
        ral.ops.attention_stats(**kw, key_segments=segments, num_segments=num)


def test_bad_packed_segments():
    problem = PackedProblem(q_lens=(3, 4), heads=2, kv_heads=1)
    kw = problem.make()
    with pytest.raises(ValueError, match=r"key_segments: packed length Tk"):
        ral.ops.attention_kl_varlen(**kw, key_segments=torch.zeros(5, dtype=torch.long), num_segments=2)


@needs_cpu
def test_kernel_rechecks_segment_ids():
    """ral._C itself refuses out-of-range ids (a direct caller that skipped ral.ops)."""
    kw = _good()
    call = ral.ops._checked_call(kw["q"], kw["k"], kw["v"], kw["q_ref"], kw["k_ref"], None, "jsd", "mean", True,
                                 True, None, None, None, None, "cpu", torch.zeros(2, 7, dtype=torch.long), 2)
    call.key_segments = torch.full((2, 7), 5, dtype=torch.int32)
    with pytest.raises(ValueError, match="key_segments must hold ids"):
        backends.module("cpu").forward(call)


@needs_cpu
def test_backward_rechecks_segment_ids_and_never_hangs(monkeypatch):
    """The backward re-checks them too. With 3 workers and no causal mask every query block sweeps
    every key tile and adds into each dk row in its turn (csrc/cpu/backward.cpp, KeyRowTurns): a bad
    id in the middle tile makes the call raise, it never leaves a worker waiting for a turn."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # the cpu backend's worker count
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 600, 8), torch.randn(1, 2, 600, 8), torch.randn(1, 2, 600, 8)
    call = ral.ops._checked_call(q, k, v, q.clone(), k.clone(), None, "jsd", "mean", True, False, None, None, None,
                                 None, "cpu", torch.zeros(1, 600, dtype=torch.long), 2)
    out, div, stats, ref_stats, gbar, cbar, *_ = backends.module("cpu").forward(call)
    segments = call.key_segments.clone()
    segments[0, 300] = 5
    args = (torch.ones_like(out), torch.ones_like(div), torch.zeros_like(cbar), q, k, v, call.q_ref, call.k_ref,
            stats, ref_stats, gbar, None, "jsd", False, True, False, call.options.scale, call.options.ref_scale,
            "cpu", None, 0, 0, segments, 2, torch.ones(1, 600, 3))
    outcome = []

    def backward():
        try:
            torch.ops.ral.attention_kl_backward(*args)
            outcome.append(None)
        except Exception as err:  # noqa: BLE001 - the test looks at it below
            outcome.append(err)

    worker = threading.Thread(target=backward, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "the backward hung"
    assert isinstance(outcome[0], ValueError) and "key_segments must hold ids" in str(outcome[0]), outcome


@needs_cpu
@pytest.mark.parametrize("heads", ["mean", "each"])
def test_torch_compile_fullgraph(heads):
    kw = _good()
    if heads == "each":
        kw["q_ref"], kw["k_ref"] = torch.randn(2, 4, 5, 4), torch.randn(2, 2, 7, 4)
    segments = torch.tensor([[0, 1, 2, 0, 1, 2, 0], [2, 2, 1, 1, 0, 0, 0]])

    def loss_fn(q, k, v):
        res = ral.attention_kl(q, k, v, q_ref=kw["q_ref"], k_ref=kw["k_ref"], heads=heads, key_segments=segments,
                               num_segments=3, backend="cpu")
        return res.out.square().mean() + res.div.sum() + res.entropy.sum() + (res.mass[..., 1] * 2).sum()

    assert_compiled_matches_eager(loss_fn, [kw[n] for n in ("q", "k", "v")])

    def stats_fn(q, k, v):
        res = ral.ops.attention_stats(q, k, v, heads=heads, backend="cpu")
        return res.entropy.sum() + res.out.sum()

    assert_compiled_matches_eager(stats_fn, [kw[n] for n in ("q", "k", "v")])


@needs_cpu
def test_opcheck_forward_op_with_segments():
    kw = {k: (v.requires_grad_(True) if k in ("q", "k", "v") else v) for k, v in _good().items()}
    args = (kw["q"], kw["k"], kw["v"], kw["q_ref"], kw["k_ref"], None, None, None, "jsd", False, True, True,
            0.35, 0.5, "cpu", None, 0, 0, True, torch.zeros(2, 7, dtype=torch.int32), 2)
    torch.library.opcheck(torch.ops.ral.attention_kl.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_cuda_runs_statistics_or_names_them():
    """backend="auto" on CUDA tensors: float16 runs (the cuda kernels take statistics) and matches the
    reference; float32, which the cuda kernels do not take, either runs or fails with an error that
    names the statistics (a backend without them), never silently drops them."""
    segments = torch.zeros(2, 7, dtype=torch.long, device="cuda")
    segments[:, 3:] = 1
    for dtype in (torch.float16, torch.float32):
        kw = {k: v.cuda().to(dtype) for k, v in _good().items()}
        try:
            res = ral.attention_kl(**kw, key_segments=segments, num_segments=2)
        except ValueError as err:
            assert dtype == torch.float32 and "statistics" in str(err), err
            continue
        want = ral.attention_kl(**{k: v.double() for k, v in kw.items()}, key_segments=segments, num_segments=2,
                                backend="reference")
        torch.testing.assert_close(res.entropy.double(), want.entropy, atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(res.mass.double(), want.mass, atol=1e-2, rtol=1e-2)


def test_no_segments_means_no_statistics():
    res = ral.attention_kl(**_good(), backend="reference")
    assert res.entropy is None and res.mass is None
    if CPU:
        res = ral.attention_kl(**_good(), backend="cpu")
        assert res.entropy is None and res.mass is None and len(res) == 5


@needs_cpu
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to read the RSS peak")
def test_statistics_never_hold_an_s_by_s_buffer():
    """docs/design.md, "Memory": with 8 segments the extra memory is O(B H Sq (1 + S)), at S = 8192
    far below one S x S matrix (the harness and its control are tests/test_memory.py's)."""
    from test_memory import S, SXS_BYTES, measure
    growth = measure("stats")
    assert growth < SXS_BYTES / 8, f"forward + backward with statistics grew the RSS peak by {growth / 2**20:.1f} MiB at S={S}"
