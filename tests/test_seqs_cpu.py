"""backend="cpu" with a sequence table (csrc/common/params.h SeqRange, ral.backends.Call.seqs):
packed varlen batches and context-parallel chunks, against the float64 reference called on each
sequence alone (docs/design.md, "Packed sequences") or on the whole sequence ("Context parallelism"), under the accuracy rule
of tests/oracle.py. The kernels are driven through ral.backends.module("cpu") with a Call built
here, and the backward's inputs (w, delta) come from ral.ops exactly as the op computes them.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracle import Problem, cast, compare, option_grid, option_id, options, run, seq_table, upstream  # noqa: E402

from ral import backends, ops, reference  # noqa: E402
from ral.backends import compiled as _compiled  # noqa: E402
from ral.backends import Call, Options  # noqa: E402

pytestmark = pytest.mark.skipif(_compiled.import_error() is not None,
                                reason=f"ral._C not built: {_compiled.import_error()}")

ROW_DIM = {"out": 2, "stats": 2, "dq": 2}  # the row axis of (B, H, S, ...) results; div: 1 ("mean") or 2


# ---- helpers ----------------------------------------------------------------------------------

def kernel_run(call: Call, dout, ddiv) -> dict:
    """Forward + backward of the cpu backend on `call`, with the backward's inputs made by ral.ops.
    Returns float64 copies of out, div, stats, dq, dk, dv (None where there is no v)."""
    cpu = backends.module("cpu")
    out, div, stats, ref_stats_out, gbar, cbar = cpu.forward(call)
    has_v = call.v is not None
    ref_stats = call.ref_stats if call.ref_stats is not None else ref_stats_out
    dout, w, delta = ops._backward_inputs(dout.to(out.dtype) if has_v else None, ddiv.float(),
                                          out if has_v else None, stats, gbar, cbar,
                                          ops._live_rows(stats, call.row_mask, call.options.heads_each),
                                          call.options.heads_each)
    dq, dk, dv = cpu.backward(call, dout, w, delta, stats, ref_stats, gbar)
    got = dict(out=out if has_v else None, div=div, stats=stats, dq=dq, dk=dk, dv=dv if has_v else None)
    return {name: None if t is None else t.detach().double() for name, t in got.items()}


def bhsd(t):
    """(S, H, D) packed rows -> the (1, H, S, D) view the kernels take: strided, not copied."""
    return None if t is None else t.permute(1, 0, 2).unsqueeze(0)


def cat_results(parts: list, heads_each: bool) -> dict:
    """Concatenate per-sequence result dicts along their row (out, div, stats, dq) or key (dk, dv) axis."""
    merged = {}
    for name in ("out", "div", "stats", "dq", "dk", "dv"):
        dim = 1 if name == "div" and not heads_each else 2
        tensors = [p[name] for p in parts if p[name] is not None]
        merged[name] = torch.cat(tensors, dim=dim) if tensors else None
    return merged


# ---- (a) packed batches ------------------------------------------------------------------------

# (q lengths, extra keys per sequence): empty sequences, single rows, 113 rows (several query
# blocks), odd mixes; a sequence with keys but no rows (its keys must get zero gradient)
LENGTHS = [
    ([0, 1, 113, 5, 17, 0, 64, 2], [0, 0, 0, 3, 0, 4, 1, 70]),
    ([113, 1, 33], [0, 0, 0]),
    ([1, 1, 1, 0, 130, 7], [0, 2, 0, 0, 0, 9]),
    ([3, 0, 0, 66, 29], [5, 0, 0, 0, 100]),
]
# (H, Hkv, D, Dv, Hr, Hrkv, Dr): GQA / MQA, no v, a teacher with other head count and head dim
HEADS = [
    (4, 4, 16, 16, 4, 4, 16),
    (8, 2, 64, 48, 4, 1, 32),
    (6, 1, 80, 80, 6, 6, 80),
    (4, 2, 32, None, 6, 2, 24),
    (6, 3, 24, 40, 12, 12, 16),
]
OPTIONS = list(option_grid())


def packed_case(q_lens, extra, heads, opts, dtype=torch.float32, row_mask=False, with_ref_stats=False,
                key_mask=False, seed=0):
    """Random packed inputs; returns (want, torch_same, got) result dicts in packed (1, ., T, .) layout.
    A sequence with rows but no keys (extra = -q_len) expects out 0, div 0, stats -inf, dq 0."""
    h, hkv, d, dv, hr, hrkv, dr = heads
    if opts["heads"] == "each":  # needs Hr == H; the teacher keeps its own head dim and kv heads
        hr, hrkv = h, hkv
    k_lens = [n + e for n, e in zip(q_lens, extra)]
    cu_q = [0] + list(torch.tensor(q_lens).cumsum(0).tolist())
    cu_k = [0] + list(torch.tensor(k_lens).cumsum(0).tolist())
    tq, tk = cu_q[-1], cu_k[-1]
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, sd=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * sd

    q, k = rand(tq, h, d), rand(tk, hkv, d)
    v = rand(tk, hkv, dv) if dv else None
    q_ref, k_ref = rand(tq, hr, dr, sd=1.3), rand(tk, hrkv, dr)
    mask = torch.rand(tq, generator=gen) > 0.3 if row_mask else None
    key_padding_mask = torch.rand(tk, generator=gen) > 0.2 if key_mask else None
    each = opts["heads"] == "each"
    dout = rand(tq, h, dv) if dv else None
    ddiv = rand(tq, h) if each else rand(tq)
    flags = dict(opts, scale=1 / math.sqrt(d), ref_scale=1 / math.sqrt(dr))

    want_parts, same_parts, ref_stats_parts, units = [], [], [], []
    for n, (q_len, k_len) in enumerate(zip(q_lens, k_lens)):
        rows, keys = slice(cu_q[n], cu_q[n + 1]), slice(cu_k[n], cu_k[n + 1])
        units.append((0, cu_q[n], q_len, cu_k[n], k_len, k_len - q_len))
        if q_len == 0:  # nothing to compare; its keys get no gradient
            zero = {"dk": torch.zeros(1, hkv, k_len, d, dtype=torch.float64),
                    "dv": torch.zeros(1, hkv, k_len, dv, dtype=torch.float64) if dv else None}
            want_parts.append(dict(out=None, div=None, stats=None, dq=None, **zero))
            same_parts.append(dict(want_parts[-1]))
            continue
        if k_len == 0:  # rows that attend nothing (the reference needs keys)
            empty = dict(out=torch.zeros(1, h, q_len, dv, dtype=torch.float64) if dv else None,
                         div=torch.zeros((1, h, q_len) if each else (1, q_len), dtype=torch.float64),
                         stats=torch.full((1, h, q_len, 2), -math.inf, dtype=torch.float64),
                         dq=torch.zeros(1, h, q_len, d, dtype=torch.float64),
                         dk=torch.zeros(1, hkv, 0, d, dtype=torch.float64),
                         dv=torch.zeros(1, hkv, 0, dv, dtype=torch.float64) if dv else None)
            want_parts.append(empty)
            same_parts.append(dict(empty))
            ref_stats_parts.append(torch.full((q_len, hr, 2), -math.inf))
            continue
        kw = dict(q=bhsd(q[rows]), k=bhsd(k[keys]), v=bhsd(v[keys]) if dv else None, q_ref=bhsd(q_ref[rows]),
                  k_ref=bhsd(k_ref[keys]), **flags)
        if row_mask:
            kw["row_mask"] = mask[rows][None]
        if key_mask:
            kw["key_padding_mask"] = key_padding_mask[keys][None]
        if with_ref_stats:
            stats = reference.attention_kl(kw["q_ref"], kw["k_ref"], q_ref=kw["q_ref"], k_ref=kw["k_ref"],
                                           scale=flags["ref_scale"], causal=opts["causal"],
                                           exclude_self=opts["exclude_self"],
                                           key_padding_mask=kw.get("key_padding_mask")).stats.float()
            kw["ref_stats"] = stats
            ref_stats_parts.append(stats[0].permute(1, 0, 2))  # (S, Hr, 2)
        seq_dout = bhsd(dout[rows]) if dv else None
        seq_ddiv = ddiv[rows].T[None] if each else ddiv[rows][None]
        want_parts.append(run(kw, "reference", seq_dout, seq_ddiv))
        same_parts.append(run(cast(kw, dtype), "reference", seq_dout, seq_ddiv))
    want, torch_same = cat_results(want_parts, each), cat_results(same_parts, each)

    ref_stats = bhsd(torch.cat(ref_stats_parts)) if with_ref_stats else None  # (1, Hr, Tq, 2), strided
    call = Call(bhsd(q.to(dtype)), bhsd(k.to(dtype)), bhsd(v.to(dtype)) if dv else None, bhsd(q_ref.to(dtype)),
                bhsd(k_ref.to(dtype)), ref_stats, key_padding_mask[None] if key_mask else None,
                mask[None] if row_mask else None,
                options(opts, d, dr), seqs=seq_table(units), max_q_len=max(q_lens), max_k_len=max(k_lens))
    assert not call.q.is_contiguous() and call.q.stride(-1) == 1
    got = kernel_run(call, bhsd(dout) if dv else torch.zeros(0), ddiv.T[None] if each else ddiv[None])
    return want, torch_same, got


@pytest.mark.parametrize("index", range(len(OPTIONS)), ids=[option_id(o) for o in OPTIONS])
def test_packed(index):
    """Every divergence x heads x exclude_self x causal, each on another length mix / head layout,
    with row_mask and cached ref_stats on alternate cases."""
    q_lens, extra = LENGTHS[index % len(LENGTHS)]
    heads = HEADS[index % len(HEADS)]
    want, torch_same, got = packed_case(q_lens, extra, heads, OPTIONS[index], row_mask=index % 2 == 1,
                                        with_ref_stats=index % 3 == 0, seed=index)
    compare(want, torch_same, got, torch.float32, what=f"packed {q_lens} + {extra}, {heads}, {OPTIONS[index]}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", range(2))
def test_packed_low_precision(dtype, case):
    opts = OPTIONS[[0, 10][case]]
    q_lens, extra = LENGTHS[case]
    want, torch_same, got = packed_case(q_lens, extra, HEADS[case + 1], opts, dtype=dtype, row_mask=case == 1,
                                        seed=100 + case)
    compare(want, torch_same, got, dtype, what=f"packed {dtype} {q_lens}, {opts}")


@pytest.mark.parametrize("opts_index", [0, 3, 7, 20], ids=lambda i: option_id(OPTIONS[i]))
def test_packed_rows_without_keys_and_key_mask(opts_index):
    """A unit with rows but no keys gives out 0, div 0, stats -inf, dq 0; a key_padding_mask is
    read at the unit's keys (batch, k_start + j)."""
    q_lens, extra = [3, 4, 0, 20, 1], [2, -4, 0, 45, 0]
    want, torch_same, got = packed_case(q_lens, extra, HEADS[1], OPTIONS[opts_index], key_mask=True,
                                        with_ref_stats=opts_index % 2 == 1, seed=opts_index)
    compare(want, torch_same, got, torch.float32, what=f"packed {q_lens} + {extra}, {OPTIONS[opts_index]}")


def test_packed_threads_and_blocks():
    """One thread and three threads (several units per thread, key tiles that straddle two dk locks), with
    many small sequences (32-row blocks) and a long one (128-row blocks)."""
    before = torch.get_num_threads()
    try:
        for n_threads, q_lens in ((1, [300, 2, 0, 45]), (3, [9, 31, 1, 200, 64, 0, 77])):
            torch.set_num_threads(n_threads)
            extra = [n % 5 for n in q_lens]
            want, torch_same, got = packed_case(q_lens, extra, HEADS[1], OPTIONS[0], row_mask=True, seed=n_threads)
            compare(want, torch_same, got, torch.float32, what=f"{n_threads} threads, {q_lens}")
    finally:
        torch.set_num_threads(before)


# ---- a trivial table equals the dense call -------------------------------------------------------

@pytest.mark.parametrize("opts_index", [0, 11, 14])
def test_dense_table_equals_dense(opts_index):
    """The table {b, 0, Sq, 0, Sk, Sk - Sq} for every b gives what the call without a table gives,
    key_padding_mask included."""
    problem = Problem(batch=2, heads=4, kv_heads=2, q_len=70, k_len=90, head_dim=32, v_head_dim=16,
                      left_pad=(5, 0), right_pad=(0, 3), row_mask=True, options=OPTIONS[opts_index])
    kw = cast(problem.make(), torch.float32)
    dout, ddiv = upstream(kw)
    opts = {key: kw.pop(key) for key in ("divergence", "heads", "exclude_self", "causal")}
    dense = Call(kw["q"], kw["k"], kw["v"], kw["q_ref"], kw["k_ref"], None, kw["key_padding_mask"],
                 kw["row_mask"], options(opts, 32, 32))
    table = Call(**{**dense.__dict__, "seqs": seq_table([(b, 0, 70, 0, 90, 20) for b in range(2)]),
                    "max_q_len": 70, "max_k_len": 90})
    want, got = kernel_run(dense, dout, ddiv), kernel_run(table, dout, ddiv)
    for name, t in want.items():
        if t is not None:  # the same additions in the same order (units of equal work keep theirs)
            torch.testing.assert_close(got[name], t, rtol=0, atol=0, msg=name)


# ---- (b) context-parallel chunks ------------------------------------------------------------------

def zigzag_bounds(seq_len: int, ranks: int) -> list:
    """Boundaries of 2P nearly equal chunks (uneven when 2P does not divide S)."""
    return [round(i * seq_len / (2 * ranks)) for i in range(2 * ranks + 1)]


def rank_call(kw: dict, opts: dict, seq_len: int, chunks: list):
    """The table call of one context-parallel rank holding `chunks` [(a, e), ..] of each of the B
    sequences of `kw` (rows packed, all S keys; row i of a chunk at key position a + i): its units
    share keys. Returns (call, rows, take), take(t, dim) = t's rows of the rank."""
    rows = torch.cat([torch.arange(a, e) for a, e in chunks])
    units = []
    for b in range(kw["q"].shape[0]):
        start = 0
        for a, e in chunks:
            units.append((b, start, e - a, 0, seq_len, a))
            start += e - a
    take = lambda t, dim=2: None if t is None else t.index_select(dim, rows)  # noqa: E731
    call = Call(take(kw["q"]), kw["k"], kw["v"], take(kw["q_ref"]), kw["k_ref"], take(kw.get("ref_stats")),
                None, take(kw["row_mask"], 1), options(opts, 32, 16), seqs=seq_table(units),
                max_q_len=max(e - a for a, e in chunks), max_k_len=seq_len)
    assert call.q.shape[2] == len(rows)
    return call, rows, take


CP_CASES = [
    # (S, ranks, options index, threads)
    (150, 2, 0, None),   # jsd mean exclude_self causal
    (150, 2, 1, 3),      # jsd mean exclude_self full, 3 threads
    (97, 3, 16, None),   # reverse_kl mean exclude_self causal
    (130, 2, 6, 1),      # jsd each, self kept, causal, 1 thread
]


@pytest.mark.parametrize("seq_len,ranks,opts_index,n_threads", CP_CASES,
                         ids=[f"S{c[0]}-P{c[1]}-{option_id(OPTIONS[c[2]])}" for c in CP_CASES])
def test_context_parallel(seq_len, ranks, opts_index, n_threads):
    """Rank r holds chunks r and 2P-1-r of each of B = 2 sequences (rows packed, all S keys);
    its units put row i at key position chunk start + i. out/div/stats/dq are the full call's
    rows, and dk/dv summed over the ranks are the full call's."""
    opts = OPTIONS[opts_index]
    problem = Problem(batch=2, heads=4, kv_heads=2, q_len=seq_len, k_len=seq_len, head_dim=32, v_head_dim=24,
                      ref_heads=4 if opts["heads"] == "each" else 6, ref_kv_heads=2, ref_head_dim=16,
                      row_mask=True, with_ref_stats=opts_index == 1, options=opts)
    base = problem.make()
    dout, ddiv = upstream(base)
    want = run(base, "reference", dout, ddiv)
    torch_same = run(cast(base, torch.float32), "reference", dout, ddiv)

    kw = cast(base, torch.float32)
    each = opts["heads"] == "each"
    bounds = zigzag_bounds(seq_len, ranks)
    got = {name: torch.zeros_like(t) if t is not None else None for name, t in want.items()}
    before = torch.get_num_threads()
    try:
        if n_threads:
            torch.set_num_threads(n_threads)
        for rank in range(ranks):
            chunks = [(bounds[c], bounds[c + 1]) for c in (rank, 2 * ranks - 1 - rank)]
            call, rows, take = rank_call(kw, opts, seq_len, chunks)
            part = kernel_run(call, take(dout), take(ddiv, 2 if each else 1))
            for name in ("out", "stats", "dq"):
                got[name][:, :, rows] = part[name]
            got["div"][..., rows] = part["div"]
            for name in ("dk", "dv"):
                got[name] += part[name]
    finally:
        torch.set_num_threads(before)
    compare(want, torch_same, got, torch.float32, what=f"context parallel S={seq_len} P={ranks} {opts}")


@pytest.mark.parametrize("opts_index", [0, 1, 6])
def test_shared_keys_gradients_are_reproducible(opts_index):
    """Units that share keys (a context-parallel rank's two chunks of each sequence, causal or not:
    the early chunk's keys get additions from both) add into each dk / dv row in one fixed order, so
    with 2 and 3 workers dq / dk / dv are the same bits in every run. (The float64 comparison is
    test_context_parallel's.)"""
    seq_len = 700
    opts = OPTIONS[opts_index]
    problem = Problem(batch=2, heads=8, kv_heads=2, q_len=seq_len, k_len=seq_len, head_dim=32, v_head_dim=24,
                      row_mask=True, with_ref_stats=opts_index == 1, options=opts)
    kw = cast(problem.make(), torch.float32)
    dout, ddiv = upstream(kw)
    call, _, take = rank_call(kw, opts, seq_len, [(0, 180), (520, 700)])
    upstream_rows = (take(dout), take(ddiv, 2 if opts["heads"] == "each" else 1))
    before = torch.get_num_threads()
    try:
        first = {}
        for n_threads in (2, 3, 2, 3, 2, 3):
            torch.set_num_threads(n_threads)
            got = kernel_run(call, *upstream_rows)
            want = first.setdefault(n_threads, got)
            for name in ("dq", "dk", "dv"):
                assert torch.equal(got[name], want[name]), (name, n_threads)
    finally:
        torch.set_num_threads(before)


# ---- bad tables ----------------------------------------------------------------------------------

def _small_call(units, max_q_len=8, max_k_len=10, causal=True):
    problem = Problem(batch=1, heads=2, kv_heads=1, q_len=8, k_len=10, head_dim=8, v_head_dim=8)
    kw = cast(problem.make(), torch.float32)
    return Call(kw["q"], kw["k"], kw["v"], kw["q_ref"], kw["k_ref"], None, None, None,
                Options(causal=causal, scale=0.35, ref_scale=0.35), seqs=seq_table(units),
                max_q_len=max_q_len, max_k_len=max_k_len)


BAD_TABLES = [
    (dict(units=[(0, 0, 5, 0, 5, 0), (0, 5, 4, 5, 5, 0)]), "past Sq"),         # rows past Sq = 8
    (dict(units=[(0, 0, 4, 7, 4, 0)]), "past Sk"),                              # keys past Sk = 10
    (dict(units=[(1, 0, 4, 0, 4, 0)]), "batch must be"),                        # B = 1
    (dict(units=[(0, 0, -1, 0, 4, 0)]), ">= 0"),
    (dict(units=[(0, -3, 2, 0, 4, 0)]), ">= 0"),
    (dict(units=[(0, 0, 6, 0, 6, 0)], max_q_len=5), "max_q_len"),
    (dict(units=[(0, 0, 6, 0, 6, 0)], max_k_len=5), "max_k_len"),
    (dict(units=[(0, 0, 4, 0, 5, 2)]), "causal"),                               # q_pos + q_len > k_len
    (dict(units=[(0, 0, 4, 0, 5, 1), (0, 3, 2, 5, 5, 3)]), "share query rows"),
    (dict(units=[(0, 0, 4, 0, 5, 1)], max_k_len=11), "max_k_len"),             # max_k_len > Sk
    (dict(units=[(0, 0, 4, 0, 5, 1)], max_q_len=-1), "max_q_len"),
]


@pytest.mark.parametrize("bad,match", BAD_TABLES, ids=[m for _, m in BAD_TABLES])
def test_bad_table_raises(bad, match):
    """ral._C re-checks the table: a unit outside the tensors raises ValueError, never crashes."""
    call = _small_call(**bad)
    cpu = backends.module("cpu")
    with pytest.raises(ValueError, match=match):
        cpu.forward(call)
    f32 = dict(dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        cpu.backward(call, torch.zeros(1, 2, 8, 8), torch.zeros(1, 8, **f32), torch.zeros(1, 2, 8, **f32),
                     torch.zeros(1, 2, 8, 2, **f32), torch.zeros(1, 2, 8, 2, **f32), torch.zeros(1, 8, **f32))


def test_bad_table_counts():
    """num_seqs must be positive with a table, and 0 without one; a good table runs."""
    call = _small_call([(0, 0, 4, 0, 5, 1), (0, 4, 4, 5, 5, 1)], max_k_len=5)
    backends.module("cpu").forward(call)  # fine
    C = _compiled._C
    p, keep = _compiled.params(call)
    p.num_seqs = 0
    with pytest.raises(ValueError, match="num_seqs"):
        C.cpu_backward_scratch_bytes(p)
    p.seqs, p.num_seqs = 0, 2
    with pytest.raises(ValueError, match="num_seqs"):
        C.cpu_backward_scratch_bytes(p)
    del keep
