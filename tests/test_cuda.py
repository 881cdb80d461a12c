"""backend="cuda" (csrc/cuda) against the float64 reference, with the accuracy rule of tests/oracle.py.

Needs a CUDA device and ral._C built with nvcc; skips cleanly otherwise.
"""

import pytest
import torch

from oracle import (PEAKED_SHAPES, STATS_NAMES, PackedProblem, Problem, cast, check, check_peaked_rows_against_fused,
                    check_nan_stays_in_its_row, check_packed, option_grid, option_id)
from oracle import (check_attention_stats, check_dead_rows_give_zero, check_near_reference, check_peaky_self_attention,
                    check_stats)

import ral
from ral import backends


def _cuda_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    return backends.unavailable_reason("cuda")


_REASON = _cuda_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"cuda backend unavailable: {_REASON}")

DTYPES = [torch.float16, torch.bfloat16]
OPTIONS = list(option_grid())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", OPTIONS, ids=option_id)
def test_option_grid(opts, dtype):
    check(Problem(q_len=113, k_len=113, head_dim=64, v_head_dim=64, dtype=dtype, options=opts), "cuda", "cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("heads", ["mean", "each"])
def test_head_dims(head_dim, heads, dtype):
    opts = dict(divergence="jsd", heads=heads, exclude_self=True, causal=True)
    check(Problem(batch=1, heads=3, kv_heads=3, q_len=70, k_len=70, head_dim=head_dim, v_head_dim=head_dim,
                  dtype=dtype, options=opts), "cuda", "cuda")


@pytest.mark.parametrize("q_len,k_len", [(1, 1), (1, 77), (17, 17), (17, 130), (113, 200), (1023, 1023)])
@pytest.mark.parametrize("causal", [True, False])
def test_lengths(q_len, k_len, causal):
    opts = dict(divergence="kl", heads="mean", exclude_self=True, causal=causal)
    check(Problem(batch=1, heads=2, kv_heads=1, q_len=q_len, k_len=k_len, head_dim=64, v_head_dim=64,
                  dtype=torch.float16, options=opts), "cuda", "cuda")


@pytest.mark.parametrize("divergence", ["jsd", "kl", "reverse_kl"])
def test_non_causal_more_queries_than_keys(divergence):
    opts = dict(divergence=divergence, heads="mean", exclude_self=True, causal=False)
    check(Problem(q_len=90, k_len=40, dtype=torch.bfloat16, head_dim=64, v_head_dim=64, options=opts),
          "cuda", "cuda")


@pytest.mark.parametrize("heads", ["mean", "each"])
@pytest.mark.parametrize("divergence", ["jsd", "kl", "reverse_kl"])
def test_gqa_mqa(divergence, heads):
    opts = dict(divergence=divergence, heads=heads, exclude_self=True, causal=True)
    for kv_heads, ref_kv_heads in ((2, 4), (1, 1)):
        check(Problem(heads=4, kv_heads=kv_heads, ref_kv_heads=ref_kv_heads, q_len=80, k_len=96, head_dim=64,
                      v_head_dim=64, dtype=torch.float16, options=opts), "cuda", "cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence", ["jsd", "kl", "reverse_kl"])
def test_teacher_shapes(divergence, dtype):
    """heads="mean" with a reference of another head count and head dim (distillation)."""
    opts = dict(divergence=divergence, heads="mean", exclude_self=True, causal=True)
    check(Problem(heads=4, kv_heads=2, ref_heads=6, ref_kv_heads=3, ref_head_dim=128, q_len=100, k_len=100,
                  head_dim=64, v_head_dim=64, dtype=dtype, options=opts), "cuda", "cuda")


@pytest.mark.parametrize("opts", OPTIONS[::3], ids=option_id)
def test_masks_and_ref_stats(opts):
    check(Problem(q_len=75, k_len=75, head_dim=80, v_head_dim=80, dtype=torch.bfloat16, left_pad=(5, 0),
                  right_pad=(0, 9), row_mask=True, with_ref_stats=True, options=opts), "cuda", "cuda")


@pytest.mark.parametrize("heads", ["mean", "each"])
def test_without_v(heads):
    opts = dict(divergence="jsd", heads=heads, exclude_self=True, causal=True)
    check(Problem(q_len=65, k_len=65, head_dim=96, v_head_dim=None, dtype=torch.float16, options=opts),
          "cuda", "cuda")


def test_v_head_dim_differs():
    opts = dict(divergence="kl", heads="mean", exclude_self=False, causal=True)
    check(Problem(q_len=50, k_len=60, head_dim=64, v_head_dim=192, dtype=torch.float16, options=opts),
          "cuda", "cuda")


def test_strided_inputs_match_contiguous():
    """(B, S, H, D) storage seen as (B, H, S, D), and an odd row stride from a slice."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, H, S, D = 2, 4, 97, 64

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float16)

    q = rand(B, S, H, D).transpose(1, 2)
    k = rand(B, S, H, D).transpose(1, 2)
    v = rand(B, S, H, D + 8)[..., :D].transpose(1, 2)   # padded rows
    q_ref = rand(B, S, H, D).transpose(1, 2)
    k_ref = rand(B, H, S, 2 * D)[..., 1:D + 1]           # misaligned base: the plain-load path
    kw = dict(q_ref=q_ref, k_ref=k_ref, divergence="jsd", heads="mean", backend="cuda")
    args = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    contiguous = [t.detach().contiguous().requires_grad_(True) for t in (q, k, v)]
    got = ral.attention_kl(*args, **kw)
    want = ral.attention_kl(*contiguous, **dict(kw, q_ref=q_ref.contiguous(), k_ref=k_ref.contiguous()))
    torch.testing.assert_close(got.out, want.out, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(got.div, want.div, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.stats, want.stats, atol=1e-4, rtol=1e-4)
    (got.out.float().sum() + got.div.sum()).backward()
    (want.out.float().sum() + want.div.sum()).backward()
    for a, b in zip(args, contiguous):
        torch.testing.assert_close(a.grad, b.grad, atol=5e-3, rtol=5e-3)


def test_float32_raises():
    q = torch.randn(1, 2, 8, 64, device="cuda")
    with pytest.raises(ValueError, match="float16/bfloat16"):
        ral.attention_kl(q, q, q, q_ref=q, k_ref=q, backend="cuda")


def test_auto_routes_float32_elsewhere():
    if backends.unavailable_reason("triton") is not None:
        pytest.skip("triton backend unavailable")
    q = torch.randn(1, 2, 8, 64, device="cuda")
    assert backends.resolve("auto", ral.ops._checked_call(
        q, q, q, q, q, None, "jsd", "mean", True, True, None, None, None, None, "auto")) == "triton"


@pytest.mark.parametrize("heads", ["mean", "each"])
@pytest.mark.parametrize("divergence", ["jsd", "kl", "reverse_kl"])
def test_peaky_self_attention(divergence, heads):
    check_peaky_self_attention("cuda", divergence, heads, q_len=90, device="cuda")


@pytest.mark.parametrize("backend,dtype", [("cuda", torch.float16), ("cuda", torch.bfloat16), ("triton", torch.float32)])
@pytest.mark.parametrize("heads", ["mean", "each"])
def test_jsd_near_reference(backend, dtype, heads):
    check_near_reference(backend, heads, dtype, device="cuda", q_len=200)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", PEAKED_SHAPES, ids=str)
def test_peaked_rows_against_fused(backend, dtype, shape):
    check_peaked_rows_against_fused(backend, dtype, shape, device="cuda")


@pytest.mark.parametrize("heads", ["mean", "each"])
def test_nan_stays_in_its_row(heads):
    """It never turns the row's div into 0; atomics make the fp32 sums' order vary, hence the tolerance."""
    check_nan_stays_in_its_row("cuda", heads, torch.float16, "cuda", q_len=150, head_dim=64, tol=1e-4)


@pytest.mark.parametrize("heads", ["mean", "each"])
def test_dead_rows_are_exactly_zero(heads):
    """Empty supports (first position with exclude_self, fully padded rows) and row_mask False give
    div == 0 exactly and no divergence gradient, whatever the values."""
    opts = dict(divergence="reverse_kl", heads=heads, exclude_self=True, causal=True)
    problem = Problem(batch=2, heads=2, kv_heads=1, q_len=70, k_len=100, head_dim=64, v_head_dim=64,
                      left_pad=(0, 40), row_mask=True, options=opts, seed=3)
    kw = cast(problem.make(), torch.bfloat16, "cuda")
    res = ral.attention_kl(backend="cuda", **kw)
    div = res.div if heads == "each" else res.div[:, None]
    assert (div[1, :, :11] == 0).all()  # batch 1: rows 0-10 sit at keys 30-40, padding or only themselves
    assert (div[~kw["row_mask"][:, None].expand_as(div)] == 0).all()
    assert torch.isneginf(res.stats[1, :, :10]).all() and torch.isneginf(res.stats[1, :, 10, 1]).all()
    assert torch.isfinite(res.div).all()
    check(problem, "cuda", "cuda")


# ---- statistics of the current policy (docs/design.md, "Attention statistics") -----------------------

@pytest.mark.parametrize("with_div", [True, False], ids=["div+stats", "stats"])
@pytest.mark.parametrize("opts", OPTIONS, ids=option_id)
def test_statistics_option_grid(opts, with_div):
    problem = Problem(batch=2, heads=4, kv_heads=2, q_len=113, k_len=113, head_dim=64, v_head_dim=64,
                      left_pad=(3, 0), right_pad=(0, 5), row_mask=True, segments=3, seed=1, dtype=torch.float16,
                      options=opts)
    check_stats(problem, "cuda", with_div=with_div, device="cuda")


def _stats_smem_fits(head_dim: int) -> bool:
    """The backward with statistics keeps 32 KB more shared memory per block: at D = 256 its single
    stage (182 KB) needs a device with that much per block (H100, not A100)."""
    optin = torch.cuda.get_device_properties(torch.cuda.current_device()).shared_memory_per_block_optin
    return head_dim < 256 or optin >= 186368


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("heads", ["mean", "each"])
def test_statistics_head_dims(head_dim, heads):
    if not _stats_smem_fits(head_dim):
        pytest.skip("the statistics' backward tiles do not fit this device's shared memory at D = 256")
    problem = Problem(batch=1, heads=3, kv_heads=3, q_len=150, k_len=150, head_dim=head_dim, v_head_dim=head_dim,
                      segments=5, seed=2, dtype=torch.bfloat16, options=dict(heads=heads, divergence="kl"))
    check_stats(problem, "cuda", device="cuda")


@pytest.mark.parametrize("num_segments", range(1, 9))
def test_statistics_every_segment_count(num_segments):
    problem = Problem(batch=2, heads=4, kv_heads=1, q_len=100, k_len=100, head_dim=64, v_head_dim=64,
                      segments=num_segments, seed=num_segments, dtype=torch.float16,
                      options=dict(heads="mean" if num_segments % 2 else "each"))
    check_stats(problem, "cuda", device="cuda")


@pytest.mark.parametrize("heads", ["mean", "each"])
def test_statistics_packed(heads):
    problem = PackedProblem(q_lens=(5, 0, 1, 113, 300), heads=4, kv_heads=2, head_dim=64, v_head_dim=64,
                            row_mask=True, segments=3, dtype=torch.float16, options=dict(heads=heads))
    check_packed(problem, "cuda", "cuda", names=STATS_NAMES)


@pytest.mark.parametrize("heads", ["mean", "each"])
def test_statistics_empty_and_padded_rows_give_zero(heads):
    check_dead_rows_give_zero("cuda", heads, torch.float16, "cuda")


@pytest.mark.parametrize("segments", [0, 3])
@pytest.mark.parametrize("heads", ["mean", "each"])
def test_attention_stats(heads, segments):
    check_attention_stats("cuda", heads, segments, torch.float16, "cuda", k_len=200, causal=False)
