"""Statistics of the current policy (docs/design.md, "Attention statistics"; SPEC section 8) in the
CUDA kernels of csrc/cuda, run on the CPU emulator of tests/cuda_emu through the real Python path
(backend="cuda" routed to the emulated module by the fixtures of tests/test_cuda_emulated.py).

Values and gradients of entropy and mass, alone and beside the divergence, against the float64
reference with the accuracy rule of tests/oracle.py: a slice of the option grid, GQA and ragged
tiles past 64 rows / keys, every segment count 1..8, empty and padded rows (0, never NaN), packed
sequences (the sequence table) and ral.ops.attention_stats (no reference model).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracle import (STATS_NAMES, PackedProblem, Problem, cast, check_packed, compare, option_grid,  # noqa: E402
                    option_id, run, stats_upstream, upstream)
from test_cuda_emulated import BF16, F16, emu, emu_module, launches  # noqa: E402,F401  (fixtures)
from test_stats import check_stats  # noqa: E402

import ral  # noqa: E402

# every divergence, heads mode, exclude_self and causal value, in 8 of the 24 combinations
OPTIONS = list(option_grid())[::3]


@pytest.mark.parametrize("with_div", [True, False], ids=["div+stats", "stats"])
@pytest.mark.parametrize("opts", OPTIONS, ids=option_id)
def test_option_grid(emu, opts, with_div):
    problem = Problem(batch=2, heads=4, kv_heads=2, q_len=40, k_len=40, left_pad=(2, 0), right_pad=(0, 3),
                      row_mask=True, segments=3, seed=1, dtype=F16, options=opts)
    check_stats(problem, "cuda", with_div=with_div)


@pytest.mark.parametrize("heads", ["mean", "each"])
def test_ragged_tiles_gqa(emu, heads):
    """several query and key tiles, both ragged (70 rows, 130 keys), GQA, key splits over 4 SMs, bf16."""
    problem = Problem(batch=1, heads=4, kv_heads=2, q_len=70, k_len=130, head_dim=32, v_head_dim=16,
                      left_pad=(5,), segments=4, seed=3, dtype=BF16, options=dict(heads=heads, divergence="kl"))
    check_stats(problem, "cuda")


def test_other_reference_heads_and_ref_stats(emu):
    problem = Problem(batch=1, heads=4, kv_heads=2, q_len=33, k_len=33, ref_heads=3, ref_kv_heads=1,
                      ref_head_dim=32, with_ref_stats=True, segments=2, seed=5, dtype=F16)
    check_stats(problem, "cuda")


@pytest.mark.parametrize("num_segments", range(1, 9))
def test_every_segment_count(emu, num_segments):
    """the forward's masses (values only: cheap) for S = 1..8, both heads modes."""
    problem = Problem(batch=1, heads=2, kv_heads=2, q_len=20, k_len=20, segments=num_segments, seed=num_segments,
                      dtype=F16, options=dict(heads="mean" if num_segments % 2 else "each"))
    base = problem.make()
    want, got = (ral.attention_kl(**cast(base, dtype), backend=be)
                 for dtype, be in ((torch.float64, "reference"), (F16, "cuda")))
    assert got.mass.shape == want.mass.shape
    torch.testing.assert_close(got.mass.double(), want.mass, atol=2e-3, rtol=0)
    torch.testing.assert_close(got.entropy.double(), want.entropy, atol=1e-2, rtol=2e-3)


@pytest.mark.parametrize("heads", ["mean", "each"])
def test_empty_and_padded_rows_give_zero(emu, heads):
    """exclude_self's first row, rows before the first real key, a fully padded batch element and
    row_mask False rows: entropy 0 and mass 0, never NaN; gradients finite."""
    problem = Problem(batch=3, heads=4, kv_heads=2, q_len=12, k_len=12, left_pad=(3, 12, 0), segments=3,
                      options=dict(heads=heads))
    kw = cast(problem.make(), F16)
    kw["row_mask"] = torch.ones(3, 12, dtype=torch.bool)
    kw["row_mask"][2, 5] = False
    got = run(kw, "cuda", *upstream(kw), dstats=stats_upstream(kw))
    for name in ("entropy", "mass", "div", "dq", "dk", "dv"):
        assert not torch.isnan(got[name]).any(), name
    for b, rows in [(0, slice(0, 4)), (1, slice(None)), (2, 0), (2, 5)]:  # empty P or masked
        index = (b, rows) if heads == "mean" else (b, slice(None), rows)
        assert (got["entropy"][index] == 0).all() and (got["mass"][index] == 0).all()
    assert (got["entropy"][0, ..., 5:] > 0).all() if heads == "mean" else (got["entropy"][0, :, 5:] > 0).all()
    assert (got["dq"][1] == 0).all()  # a fully padded element gets no gradient at all


@pytest.mark.parametrize("heads", ["mean", "each"])
def test_packed_sequences(emu, heads):
    """the sequence table: lengths 0, 1 and one past a tile, with row_mask."""
    problem = PackedProblem(q_lens=(5, 0, 1, 70), heads=4, kv_heads=2, row_mask=True, segments=3, dtype=F16,
                            options=dict(heads=heads))
    check_packed(problem, "cuda", names=STATS_NAMES)


@pytest.mark.parametrize("segments", [0, 3])
@pytest.mark.parametrize("heads", ["mean", "each"])
def test_attention_stats(emu, heads, segments):
    """no reference model: the placeholders are never swept (no reference launch), div is 0."""
    problem = Problem(batch=2, heads=4, kv_heads=2, q_len=30, k_len=70, left_pad=(2, 0), row_mask=True,
                      segments=segments, seed=7, options=dict(heads=heads, exclude_self=True, causal=False))
    base = problem.make()
    for name in ("q_ref", "k_ref"):
        base.pop(name)
    dout, _ = upstream(base)
    dentropy = stats_upstream(dict(base, key_segments=None))[0]
    dmass = stats_upstream(base)[1] if segments else None

    def stats_op(q, k, v=None, **kw):
        return ral.ops.attention_stats(q, k, v, **kw)

    emu.ral_emu_take_log()
    results = [run(kw, be, dout, None, op=stats_op, dstats=(dentropy, dmass))
               for kw, be in ((base, "reference"), (cast(base, F16), "reference"), (cast(base, F16), "cuda"))]
    names = ("out", "stats", "entropy", "dq", "dk", "dv") + (("mass",) if segments else ())
    compare(*results, F16, names, what=f"attention_stats ({heads}, {segments} segments) on cuda")
    assert (results[2]["mass"] is None) == (segments == 0)
    # forward: the current heads' pass 1, pass 2, pass 3 (no reference pass 1); backward: one launch
    heads_grid = [grid[1] for grid, _, _ in launches(emu)]
    assert len(heads_grid) == 4 and heads_grid[0] == 4
