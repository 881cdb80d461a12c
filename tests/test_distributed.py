"""ral.distributed: the op on a sequence split over gloo CPU processes equals the single-process op.

Each case spawns P processes (a file store, gloo). Every process builds the same whole-sequence
problem, takes its shard in the layout, runs ``attention_kl_cp`` forward and backward with the
shard of one set of upstream gradients, and compares its rows of out / div / stats and its shard of
dq / dk / dv with the single-process ``attention_kl`` on the whole sequence: exactly in float64
(the reference backend: the same math, so only summation order differs) and under the float64
accuracy rule of tests/oracle.py for the cpu kernels in float32.
"""

import pytest
import torch
import torch.distributed as dist

import ral
from oracle import FLOOR, PackedProblem, Problem, _err, cast, packed_upstream, run, stats_upstream, upstream
from ral import backends
from ral.distributed import (GatheredKeys, attention_kl_cp, attention_kl_cp_varlen, causal_work, chunks, prefetch_keys,
                             shard, unshard)
from ranks import run_ranks

CASES = {
    "causal-mean-jsd": dict(options=dict(heads="mean", divergence="jsd")),
    "full-each-kl": dict(options=dict(heads="each", divergence="kl", causal=False)),
    "gqa-teacher-rkl": dict(heads=4, kv_heads=2, ref_heads=6, ref_kv_heads=3, ref_head_dim=24,
                            options=dict(divergence="reverse_kl")),
    "padding-rowmask": dict(left_pad=(3, 0), right_pad=(0, 2), row_mask=True, options=dict(exclude_self=False)),
    "ref-stats": dict(with_ref_stats=True, options=dict(heads="each", divergence="jsd")),
    "segments-each": dict(segments=3, left_pad=(2, 0), options=dict(heads="each", divergence="kl")),
    "segments-mean": dict(segments=5, kv_heads=2, row_mask=True, options=dict(heads="mean")),
}
# packed streams (lengths include an empty sequence and ones that straddle the ranks' chunks)
PACKED_CASES = {
    "packed-causal-mean": dict(q_lens=(9, 0, 14, 3, 11)),
    "packed-full-each-gqa": dict(q_lens=(6, 17, 1, 13), options=dict(heads="each", causal=False, divergence="kl")),
    "packed-teacher-rowmask": dict(q_lens=(21, 4, 12), ref_heads=6, ref_kv_heads=3, ref_head_dim=24, row_mask=True,
                                   options=dict(divergence="reverse_kl", exclude_self=False)),
    "packed-segments": dict(q_lens=(8, 19, 10), segments=4, with_ref_stats=True, options=dict(heads="mean")),
}


def _case(case, seq_len, layout, backend, dtype_name, keys="shard"):
    """One rank's report for `case` (run by ranks.run_ranks in every spawned process); keys: how k_ref
    is passed: this rank's "shard", "prefetch" (prefetch_keys) or "whole" (GatheredKeys of the whole)."""
    dtype = getattr(torch, dtype_name)
    if case in PACKED_CASES:
        return _packed_case(case, layout, backend, dtype, keys)
    return _dense_case(case, seq_len, layout, backend, dtype, keys)


def _reference_keys(k_ref_whole, dim, seq_len, layout, keys):
    """k_ref for the op, passed as `keys` says (see _case)."""
    if keys == "whole":
        return GatheredKeys(k_ref_whole)
    mine = shard(k_ref_whole, dim, layout=layout)
    return prefetch_keys(mine, dim, seq_len, layout=layout) if keys == "prefetch" else mine


def _dense_case(case, seq_len, layout, backend, dtype, keys="shard"):
    fields = {"batch": 2, "heads": 4, "kv_heads": 4, "head_dim": 16, "seed": 7, **CASES[case]}
    problem = Problem(q_len=seq_len, k_len=seq_len, **fields)
    base = problem.make()
    dout, ddiv = upstream(base)
    dstats = stats_upstream(base) if problem.segments else None
    whole = run(cast(base, dtype), backend, dout, ddiv, dstats=dstats)      # the single-process op
    want = run(base, "reference", dout, ddiv, dstats=dstats)                # float64 oracle (accuracy rule)

    def local(t, dim):
        return None if t is None else shard(t, dim, layout=layout)

    kw = cast(base, dtype)
    leaves = {name: local(kw[name], 2).detach().requires_grad_(True) for name in ("q", "k", "v")}
    k_ref = _reference_keys(kw["k_ref"], 2, seq_len, layout, keys)
    res = attention_kl_cp(
        leaves["q"], leaves["k"], leaves["v"], q_ref=local(kw["q_ref"], 2), k_ref=k_ref,
        seq_len=seq_len, layout=layout, ref_stats=local(kw.get("ref_stats"), 2),
        key_padding_mask=local(kw.get("key_padding_mask"), 1), row_mask=local(kw.get("row_mask"), 1),
        key_segments=local(kw.get("key_segments"), 1), num_segments=kw.get("num_segments"),
        backend=backend, **problem.options)
    row_dim = 2 if res.div.dim() == 3 else 1
    loss = (res.out.double() * local(dout, 2)).sum() + (res.div.double() * local(ddiv, row_dim)).sum()
    loss = loss + _stats_loss(res, dstats, lambda t: local(t, row_dim))
    loss.backward()
    dims = dict(div=row_dim, entropy=row_dim, mass=row_dim)
    return _compare(res, leaves, whole, want, lambda t, name: local(t, dims.get(name, 2)), dtype)


def _packed_case(case, layout, backend, dtype, keys="shard"):
    problem = PackedProblem(seed=7, **PACKED_CASES[case])
    base = problem.make()
    dout, ddiv = packed_upstream(base)
    dstats = stats_upstream(base) if problem.segments else None
    varlen = ral.ops.attention_kl_varlen
    whole = run(cast(base, dtype), backend, dout, ddiv, op=varlen, dstats=dstats)
    want = run(base, "reference", dout, ddiv, op=varlen, dstats=dstats)

    def local(t, _name=None):
        return None if t is None else shard(t, 0, layout=layout)

    kw = cast(base, dtype)
    leaves = {name: local(kw[name]).detach().requires_grad_(True) for name in ("q", "k", "v")}
    k_ref = _reference_keys(kw["k_ref"], 0, int(kw["cu_seqlens_q"][-1]), layout, keys)
    res = attention_kl_cp_varlen(
        leaves["q"], leaves["k"], leaves["v"], q_ref=local(kw["q_ref"]), k_ref=k_ref,
        cu_seqlens=kw["cu_seqlens_q"], max_seqlen=kw["max_seqlen_q"], layout=layout,
        ref_stats=local(kw.get("ref_stats")), row_mask=local(kw.get("row_mask")),
        key_segments=local(kw.get("key_segments")), num_segments=kw.get("num_segments"), backend=backend,
        **problem.options)
    loss = (res.out.double() * local(dout)).sum() + (res.div.double() * local(ddiv)).sum()
    loss = loss + _stats_loss(res, dstats, local)
    loss.backward()
    return _compare(res, leaves, whole, want, local, dtype)


def _stats_loss(res, dstats, local):
    """This rank's rows of the statistics' upstream weights (dentropy, dmass) times entropy and mass."""
    if dstats is None:
        return 0.0
    dentropy, dmass = dstats
    return (res.entropy.double() * local(dentropy)).sum() + (res.mass.double() * local(dmass)).sum()


def _compare(res, leaves, whole, want, local, dtype) -> list:
    """Per tensor "name:ok|FAIL:err:bound": this rank's rows against the same rows of the
    single-process op (float64: up to summation order; float32: the accuracy rule vs the oracle)."""
    got = dict(out=res.out, div=res.div, stats=res.stats, dq=leaves["q"].grad, dk=leaves["k"].grad,
               dv=leaves["v"].grad, entropy=res.entropy, mass=res.mass)
    report = []
    for name, t in got.items():
        if t is None:
            continue
        mine = t.detach().double()
        single = local(whole[name], name)
        oracle = local(want[name], name)
        if dtype == torch.float64:
            bound = 1e-6 if name == "stats" else 1e-9        # stats are float32 whatever the input
            ok = _err(mine, single) <= bound
        else:  # float32 kernels: the accuracy rule against the float64 oracle, like the single process
            finite = torch.isfinite(oracle)
            scale = float(oracle[finite].abs().max()) if finite.any() else 1.0
            bound = 2.0 * _err(single, oracle) + FLOOR[dtype] * max(scale, 1e-3)
            ok = _err(mine, oracle) <= bound
        report.append(f"{name}:{'ok' if ok else 'FAIL'}:{_err(mine, single):.3g}:{bound:.3g}")
    return report


def spawn(tmp_path, world, case, seq_len, layout="zigzag", backend="reference", dtype="float64", keys="shard"):
    run_ranks(tmp_path, world, f"{case}-{keys}", _case, case, seq_len, layout, backend, dtype, keys)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process_float64(tmp_path, case):
    spawn(tmp_path, 2, case, seq_len=23)          # 23 is not divisible by 2P = 4


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_four_ranks_equal_one_process_float64(tmp_path, layout):
    spawn(tmp_path, 4, "gqa-teacher-rkl", seq_len=29, layout=layout)


@pytest.mark.parametrize("case", list(PACKED_CASES))
def test_packed_stream_on_two_ranks_equals_one_process_float64(tmp_path, case):
    spawn(tmp_path, 2, case, seq_len=None)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_packed_stream_on_four_ranks_equals_one_process_float64(tmp_path, layout):
    spawn(tmp_path, 4, "packed-segments", seq_len=None, layout=layout)


@pytest.mark.skipif(backends.unavailable_reason("cpu") is not None, reason="ral._C not built")
@pytest.mark.parametrize("world,case", [(2, "causal-mean-jsd"), (2, "padding-rowmask"), (4, "full-each-kl"),
                                        (2, "segments-mean"), (4, "packed-segments")])
def test_cpu_kernels_on_ranks(tmp_path, world, case):
    spawn(tmp_path, world, case, seq_len=37, backend="cpu", dtype="float32")


@pytest.mark.parametrize("case,keys", [("gqa-teacher-rkl", "prefetch"), ("ref-stats", "whole"),
                                       ("packed-teacher-rowmask", "prefetch"), ("packed-segments", "whole")])
def test_reference_keys_gathered_ahead_or_given_whole(tmp_path, case, keys):
    """k_ref as prefetch_keys' asynchronous all-gather (started before the op) or as a GatheredKeys of
    the whole sequence gives what this rank's shard gives: the single-process op's rows."""
    spawn(tmp_path, 2, case, seq_len=23 if case in CASES else None, keys=keys)


def test_gathered_keys_of_the_wrong_length_are_refused(tmp_path):
    run_ranks(tmp_path, 2, "wrong-keys", _wrong_keys)


def _wrong_keys():
    q = torch.zeros(1, 2, 5, 8)                                   # rank's shard of S = 10 (either rank)
    try:
        attention_kl_cp(q, q, q, q_ref=q, k_ref=GatheredKeys(torch.zeros(1, 2, 9, 8)), seq_len=10,
                        layout="contiguous", backend="reference")
    except ValueError as e:
        return ["refused:ok" if "k_ref: a GatheredKeys holds the whole sequence, 10 positions" in str(e) else f"FAIL:{e}"]
    return ["FAIL:accepted"]


@pytest.mark.parametrize("layout,causal", [("zigzag", True), ("zigzag", False), ("contiguous", True)])
def test_early_rows_run_while_the_second_half_of_the_keys_is_gathered(tmp_path, layout, causal):
    """Causal zigzag: the policy's keys and values come in two all-gathers (the sequence's halves, 12
    and 11 of 23 positions on 2 ranks); the rows of the rank's early chunk run on the first half before
    the second is waited for, the late rows on all 23 keys after. Otherwise: one all-gather, one op
    call. Either way the rows equal the single-process op's (float64, reference backend)."""
    run_ranks(tmp_path, 2, f"halves-{layout}-{causal}", _key_gather_order, layout, causal)


def _key_gather_order(layout, causal, seq_len=23):
    from ral import distributed
    torch.manual_seed(3)
    whole = [torch.randn(2, 3, seq_len, 8, dtype=torch.float64) for _ in range(5)]
    q, k, v, q_ref, k_ref = (shard(t, 2, layout=layout) for t in whole)
    events, wait, run_table = [], distributed._Pending.wait, ral.ops.run_table

    def logged_wait(pending):
        if pending._whole is None:
            events.append(f"wait{sum(length for c in pending.chunks for _, length in c)}")
        return wait(pending)

    def logged_table(call, *args):
        events.append(f"op{call.k.shape[2]}")
        return run_table(call, *args)

    distributed._Pending.wait, ral.ops.run_table = logged_wait, logged_table
    try:
        res = attention_kl_cp(q, k, v, q_ref=q_ref, k_ref=k_ref, seq_len=seq_len, layout=layout, causal=causal,
                              backend="reference")
    finally:
        distributed._Pending.wait, ral.ops.run_table = wait, run_table
    single = ral.attention_kl(*whole[:3], q_ref=whole[3], k_ref=whole[4], causal=causal, backend="reference")
    # k and v of the first half, k_ref (whole), the early rows, k and v of the second half, the late rows
    want = (["wait12", "wait12", "wait23", "op12", "wait11", "wait11", "op23"] if layout == "zigzag" and causal
            else ["wait23"] * 3 + ["op23"])
    report = [f"order:{'ok' if events == want else 'FAIL'}:{events}"]
    for name, dim in (("out", 2), ("div", 1), ("stats", 2)):
        err = _err(getattr(res, name).double(), shard(getattr(single, name).double(), dim, layout=layout))
        bound = 1e-6 if name == "stats" else 1e-9        # stats are float32 whatever the input
        report.append(f"{name}:{'ok' if err <= bound else 'FAIL'}:{err:.3g}")
    return report


def test_chunks_cover_the_sequence_once():
    for layout in ("zigzag", "contiguous"):
        for seq_len, world in ((23, 2), (29, 4), (8, 4), (1000, 3)):
            covered = sorted(pos for rank_chunks in chunks(seq_len, world, layout)
                             for start, length in rank_chunks for pos in range(start, start + length))
            assert covered == list(range(seq_len))


def test_chunks_shard_unshard_refuse_bad_arguments(tmp_path):
    """A world of 0 or a negative length gave [] or negative chunks; shard's dim an IndexError; unshard of a
    shard of the wrong length padded it into a tensor of seq_len positions without a word."""
    for seq_len, world, name in ((7, 0, "world"), (-1, 2, "seq_len"), (7, 2.0, "world")):
        with pytest.raises(ValueError, match=f"{name} must be an int >= "):
            chunks(seq_len, world)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x = torch.randn(2, 7, 3)
        torch.testing.assert_close(unshard(shard(x, 1), 1, 7), x)
        with pytest.raises(ValueError, match="dim: 5 is not a dimension of a 3-D tensor"):
            shard(x, 5)
        with pytest.raises(ValueError, match="x: rank 0's shard of a sequence of 9 in layout 'zigzag' has 9 positions"):
            unshard(x, 1, 9)
    finally:
        dist.destroy_process_group()


def test_zigzag_balances_causal_work():
    """Causal tiles per rank (64 x 64 tiles) within 10% of the mean under zigzag; contiguous is far off."""
    for seq_len, world in ((32768, 2), (32768, 4), (131072, 8), (16384 + 77, 4)):
        work = causal_work(seq_len, world, "zigzag")
        mean = sum(work) / len(work)
        assert max(abs(w - mean) for w in work) <= 0.10 * mean, (seq_len, world, work)
        flat = causal_work(seq_len, world, "contiguous")
        assert max(flat) > 1.4 * (sum(flat) / len(flat))     # the last rank carries the most


def test_needs_a_process_group():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="group: attention_kl_cp needs an initialised"):
        attention_kl_cp(q, q, q, q_ref=q, k_ref=q, seq_len=4)
    packed = torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="group: attention_kl_cp_varlen needs an initialised"):
        attention_kl_cp_varlen(packed, packed, packed, q_ref=packed, k_ref=packed,
                               cu_seqlens=torch.tensor([0, 4], dtype=torch.int32), max_seqlen=4)
