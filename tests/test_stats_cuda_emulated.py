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
from oracle import (STATS_NAMES, PackedProblem, Problem, cast, check_attention_stats, check_dead_rows_give_zero,  # noqa: E402
                    check_packed, check_stats, option_grid, option_id)
from test_cuda_emulated import BF16, F16, emu, emu_module, launches  # noqa: E402,F401  (fixtures)

import ral  # noqa: E402
from ral import backends  # noqa: E402

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


@pytest.mark.parametrize("heads", ["mean", "each"])
def test_one_stage_and_other_schedules(emu, monkeypatch, heads):
    """One pipeline stage (100000 bytes of opt-in shared memory), random thread orders between barriers
    and cp.async landing at issue: the "mean" backward's thread-private sG sits beside sP, sdS."""
    monkeypatch.setenv("RAL_EMU_SMEM_OPTIN", "100000")
    monkeypatch.setenv("RAL_EMU_SCHEDULE", "random:3")
    monkeypatch.setenv("RAL_EMU_CP_ASYNC", "early")
    problem = Problem(batch=1, heads=2, kv_heads=1, q_len=100, k_len=130, head_dim=64, v_head_dim=64,
                      row_mask=True, segments=3, seed=4, dtype=F16, options=dict(heads=heads))
    check_stats(problem, "cuda")
    smem = {smem for _, _, smem in launches(emu)}
    assert max(smem) <= 100000
    # the backward: sP, sdS, the statistics' gl and sG, and one stage of Q, K, V, dO tiles
    assert 2 * 64 * 72 * 2 + 2 * 32 * 128 * 4 + 2 * 64 * (72 + 72) * 2 in smem, smem


@pytest.mark.parametrize("head_dim,fits", [(192, True), (256, False)])
@pytest.mark.parametrize("heads", ["mean", "each"])
def test_a100_shared_memory(emu, monkeypatch, heads, head_dim, fits):
    """A100 (166912 bytes per block): with statistics the backward keeps 32 KB more (gl, sG), so at
    D = Dv = 256 its single stage does not fit and cuda_supports says so before any launch."""
    monkeypatch.setenv("RAL_EMU_SMEM_OPTIN", "166912")
    problem = Problem(batch=1, heads=1, kv_heads=1, q_len=4, k_len=4, head_dim=head_dim, v_head_dim=head_dim,
                      segments=2, options=dict(heads=heads))
    call = ral.ops._checked_call(**{k: v for k, v in cast(problem.make(), F16).items()
                                    if k in ("q", "k", "v", "q_ref", "k_ref")},
                                 ref_stats=None, divergence="jsd", heads=heads, exclude_self=True, causal=True,
                                 scale=None, ref_scale=None, key_padding_mask=None, row_mask=None, backend="cuda",
                                 key_segments=torch.zeros(1, 4, dtype=torch.long), num_segments=2)
    assert (backends.module("cuda").unsupported_reason(call) is None) == fits


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
    check_dead_rows_give_zero("cuda", heads, F16)


@pytest.mark.parametrize("heads", ["mean", "each"])
def test_packed_sequences(emu, heads):
    """the sequence table: lengths 0, 1 and one past a tile, with row_mask."""
    problem = PackedProblem(q_lens=(5, 0, 1, 70), heads=4, kv_heads=2, row_mask=True, segments=3, dtype=F16,
                            options=dict(heads=heads))
    check_packed(problem, "cuda", names=STATS_NAMES)


@pytest.mark.parametrize("segments", [0, 3])
@pytest.mark.parametrize("heads", ["mean", "each"])
def test_attention_stats(emu, heads, segments):
    """no reference model: the placeholders are never swept (no reference launch), div is 0; 70 keys
    (two key tiles), no causal mask."""
    emu.ral_emu_take_log()
    check_attention_stats("cuda", heads, segments, F16, k_len=70, causal=False)
    # forward and backward of the emulated kernels, then of the reference (no launches): the current
    # heads' pass 1 (grid.y = H), pass 2, pass 3, and the backward; no pass 1 for reference heads
    grids = [grid for grid, _, _ in launches(emu)]
    assert len(grids) == 4 and grids[0][1] == 4, grids
