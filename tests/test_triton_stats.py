"""backend="triton" with attention statistics of the policy (docs/design.md, "Attention
statistics"; SPEC section 8): entropy and per-segment mass, values and gradients, against the
float64 reference under tests/oracle.py's accuracy rule.

Interpreted, like tests/test_triton.py: these tests run only in a process started with
TRITON_INTERPRET=1 (``TRITON_INTERPRET=1 python -m pytest -q tests/test_triton_stats.py``) and skip
elsewhere. Small shapes (the interpreter's 16 x 16 tiles make ragged tiles at these sizes anyway):
a slice of the option grid with the statistics beside the divergence and alone (left / right
padding, row_mask, GQA, a teacher with other heads and ref_stats, fp16), every segment count 1..8 on
values and a few on gradients, dead rows, the backward's query splits, packed sequences, and
ral.attention_stats (no reference).
"""

from __future__ import annotations

import pytest
import torch

from oracle import (STATS_NAMES, PackedProblem, Problem, cast, check_attention_stats, check_dead_rows_give_zero,
                    check_packed, check_stats, compare, option_grid, option_id)

triton = pytest.importorskip("triton")

import ral  # noqa: E402
from ral.backends.triton import launch  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not launch.INTERPRETED, reason="CPU kernels need the Triton interpreter: run "
                       "TRITON_INTERPRET=1 python -m pytest tests/test_triton_stats.py in its own process"),
    # The interpreter evaluates masked-out lanes too (exp2 overflow, inf * 0) before tl.where drops them.
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

GRID = list(option_grid())
# jsd / kl / reverse_kl x mean / each, with exclude_self and causal on and off among them; the
# statistics with the divergence (div+stats) or alone (stats: the backward's w is 0, no reference).
SLICE = [(0, True), (3, False), (6, True), (9, False), (13, True), (16, False), (18, True), (23, True)]


@pytest.mark.parametrize("index,with_div", SLICE, ids=[f"{option_id(GRID[i])}-{'div+stats' if d else 'stats'}"
                                                       for i, d in SLICE])
def test_option_grid(index, with_div):
    opts = GRID[index]
    problem = Problem(batch=2, heads=4, kv_heads=2, q_len=17, k_len=20, left_pad=(2, 0), right_pad=(0, 3),
                      row_mask=True, segments=3, seed=index, options=opts)
    check_stats(problem, "triton", with_div=with_div)


def test_teacher_with_other_heads_and_ref_stats():
    problem = Problem(batch=1, heads=4, kv_heads=1, q_len=17, k_len=24, ref_heads=2, ref_kv_heads=1,
                      ref_head_dim=32, with_ref_stats=True, segments=2, seed=5)
    check_stats(problem, "triton")


def test_fp16_no_v():
    problem = Problem(batch=1, heads=2, kv_heads=2, q_len=17, k_len=17, v_head_dim=None, dtype=torch.float16,
                      segments=2, seed=2, options=dict(divergence="kl"))
    check_stats(problem, "triton")


@pytest.mark.parametrize("num_segments", range(1, 9))
def test_every_segment_count_values(num_segments):
    """Forward values of entropy and mass (and div, stats) for S = 1..8, "mean" and "each" alternating."""
    heads = "mean" if num_segments % 2 else "each"
    problem = Problem(batch=1, heads=2, kv_heads=1, q_len=9, k_len=18, segments=num_segments, seed=num_segments,
                      options=dict(heads=heads))
    base = problem.make()
    results = []
    for kw, backend in ((base, "reference"), (cast(base, torch.float32), "reference"),
                        (cast(base, torch.float32), "triton")):
        res = ral.attention_kl(backend=backend, **kw)
        results.append({name: getattr(res, name).double() for name in ("div", "stats", "entropy", "mass")})
    errors = compare(*results, torch.float32, ("div", "stats", "entropy", "mass"), what=f"triton for {problem}")
    assert results[2]["mass"].shape[-1] == num_segments
    assert errors["mass"][0] < 1e-5


@pytest.mark.parametrize("num_segments,heads", [(1, "each"), (8, "mean")])
def test_segment_counts_gradients(num_segments, heads):
    problem = Problem(batch=1, heads=4, kv_heads=2, q_len=17, k_len=17, segments=num_segments, seed=num_segments,
                      options=dict(heads=heads, divergence="reverse_kl"))
    check_stats(problem, "triton")


@pytest.mark.parametrize("heads", ["mean", "each"])
def test_empty_and_padded_rows_give_zero(heads):
    check_dead_rows_give_zero("triton", heads)


@pytest.mark.parametrize("heads", ["mean", "each"])
def test_backward_query_splits(monkeypatch, heads):
    """dk / dv by atomics over split query chunks ("mean" with Hkv > 1 adds per block anyway)."""
    monkeypatch.setenv("RAL_TRITON_Q_SPLITS", "3")
    problem = Problem(batch=1, heads=4, kv_heads=2, q_len=50, k_len=50, segments=3, seed=11,
                      options=dict(heads=heads))
    check_stats(problem, "triton")


@pytest.mark.parametrize("heads", ["mean", "each"])
def test_packed_sequences(heads):
    problem = PackedProblem(q_lens=(5, 0, 1, 17, 20), heads=4, kv_heads=2, row_mask=True, segments=3,
                            options=dict(heads=heads, divergence="kl"))
    check_packed(problem, "triton", names=STATS_NAMES)


@pytest.mark.parametrize("heads,segments", [("mean", 3), ("each", 0)])
def test_attention_stats(heads, segments):
    check_attention_stats("triton", heads, segments, seq=20)
