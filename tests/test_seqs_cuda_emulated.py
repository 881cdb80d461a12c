"""The CUDA kernels with a sequence table (csrc/common/params.h, SeqRange; ral.backends.Call.seqs)
on the CPU emulator of tests/cuda_emu, against the float64 reference called per sequence on dense
slices, with the accuracy rule of tests/oracle.py (FACTOR x PyTorch's own error in the same dtype,
plus a floor).

  * packed batches (SPEC section 7): N sequences end to end, lengths with 0, 1, 113 and odd mixes;
    q (Tq, H, D) seen as (1, H, Tq, D) by a permute (strided, never copied); the table from
    cu_seqlens with q_pos = k_len - q_len (bottom-right causal within each sequence);
  * context-parallel chunks (SPEC section 9): one dense sequence cut into 2P chunks, rank r holds
    the rows of chunks r and 2P-1-r with all keys; its rows equal the full call's rows and dK / dV
    summed over the ranks equal the full call's.

The table reaches the kernels through ral.backends.compiled.params (Call.seqs): these tests build Calls and
drive the emulated module through the backend of tests/test_cuda_emulated.py (its fixtures), and
form w and delta for the backward as ral.ops does.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracle import NAMES, compare, options, run, seq_table  # noqa: E402
from test_cuda_emulated import BF16, F16, emu, emu_module, launches  # noqa: E402,F401  (fixtures)

from ral import backends, ops, reference  # noqa: E402
from ral.backends import compiled as _compiled  # noqa: E402
from ral.backends import Call  # noqa: E402


# ---- tables ------------------------------------------------------------------------------------------

def cu_seqlens(lens) -> list:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return out


def packed_table(q_lens, k_lens) -> torch.Tensor:
    """FlashAttention's varlen convention: sequence n owns rows cu_q[n]: and keys cu_k[n]:, its last row
    at its last key (q_pos = k_len - q_len)."""
    cu_q, cu_k = cu_seqlens(q_lens), cu_seqlens(k_lens)
    return seq_table([(0, cu_q[n], q, cu_k[n], k, k - q) for n, (q, k) in enumerate(zip(q_lens, k_lens))])


# ---- running a Call with a table -----------------------------------------------------------------------

def _heads_view(t):
    """(T, H, X) -> (1, H, T, X), (T, H) -> (1, H, T), (T,) -> (1, T): strided views (no copy)."""
    if t is None:
        return None
    return t.unsqueeze(0) if t.dim() == 1 else t.transpose(0, 1).unsqueeze(0)


def run_call(call: Call, dout, ddiv) -> dict:
    """Forward + backward of the (emulated) cuda backend on `call`, w and delta formed as ral.ops
    does (w = 0 on dead rows; delta = rowsum(dout * out) + w c_h / H). float64 results."""
    be = backends.module("cuda")
    assert be.unsupported_reason(call) is None
    out, div, stats, ref_stats_out, gbar, cbar = be.forward(call)
    ref_stats = call.ref_stats if call.ref_stats is not None else ref_stats_out
    dout, w, delta = ops._backward_inputs(dout.to(out.dtype) if call.v is not None else None, ddiv,
                                          out if call.v is not None else None, stats, gbar, cbar,
                                          ops._live_rows(stats, call.row_mask, call.options.heads_each),
                                          call.options.heads_each)
    dq, dk, dv = be.backward(call, dout, w, delta, stats, ref_stats, gbar)
    got = dict(out=out if call.v is not None else None, div=div, stats=stats, dq=dq, dk=dk,
               dv=dv if call.v is not None else None)
    return {name: None if t is None else t.double() for name, t in got.items()}


def assert_rule(got: dict, want: dict, same: dict, dtype, what: str, names=NAMES) -> None:
    """The accuracy rule of tests/oracle.py (check) on assembled results: got (the kernels), want
    (float64 reference), same (the reference in `dtype`)."""
    compare(want, same, got, dtype, names, what=what)


# ---- packed batches ------------------------------------------------------------------------------------

def packed_case(q_lens, k_lens=None, *, heads=2, kv_heads=2, head_dim=64, v_head_dim=64, ref_heads=None,
                ref_kv_heads=None, ref_head_dim=None, dtype=F16, opts=None, row_mask=False, ref_stats=False,
                key_padding=False, seed=0, max_pad=(0, 0)):
    """Packs random sequences, runs the kernels with the table and checks them against the reference
    called on each sequence alone (dense (1, H, len, D) slices). max_pad: added to max_q_len / max_k_len
    (a max_seqlen larger than the longest sequence, as FlashAttention allows)."""
    k_lens = list(q_lens) if k_lens is None else list(k_lens)
    opts = dict(opts or {})
    hr, dr = ref_heads or heads, ref_head_dim or head_dim
    hrkv = ref_kv_heads or hr
    tq, tk = sum(q_lens), sum(k_lens)
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, sd=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * sd

    base = dict(q=rand(tq, heads, head_dim), k=rand(tk, kv_heads, head_dim),
                v=rand(tk, kv_heads, v_head_dim) if v_head_dim else None,
                q_ref=rand(tq, hr, dr, sd=1.3), k_ref=rand(tk, hrkv, dr))
    masks = dict(row_mask=(torch.rand(tq, generator=gen) > 0.3) if row_mask else None,
                 key_padding_mask=(torch.rand(tk, generator=gen) > 0.2) if key_padding else None)
    each = opts.get("heads", "mean") == "each"
    dout = rand(tq, heads, v_head_dim) if v_head_dim else None
    ddiv = rand(tq, heads) if each else rand(tq)
    cu_q, cu_k = cu_seqlens(q_lens), cu_seqlens(k_lens)

    def seq_kw(n, src):
        """The dense call of sequence n: (1, H, len, X) slices of the packed tensors `src`."""
        qs, qe, ks, ke = cu_q[n], cu_q[n + 1], cu_k[n], cu_k[n + 1]
        kw = {name: None if t is None else _heads_view(t[qs:qe] if name in ("q", "q_ref") else t[ks:ke])
              for name, t in src.items()}
        for name, m in masks.items():
            if m is not None:
                kw[name] = _heads_view(m[qs:qe] if name == "row_mask" else m[ks:ke])
        return kw

    # the reference statistics, per sequence (as a caller would cache them): (Tq, Hr, 2)
    rs = None
    if ref_stats:
        rs = torch.full((tq, hr, 2), float("nan"))
        for n in range(len(q_lens)):
            if q_lens[n]:
                kw = seq_kw(n, base)
                st = reference.attention_kl(kw["q_ref"], kw["k_ref"], q_ref=kw["q_ref"], k_ref=kw["k_ref"],
                                            key_padding_mask=kw.get("key_padding_mask"),
                                            causal=opts.get("causal", True),
                                            exclude_self=opts.get("exclude_self", True)).stats
                rs[cu_q[n]:cu_q[n + 1]] = st[0].permute(1, 0, 2).float()

    # the reference per sequence (float64 and PyTorch in `dtype`), assembled in the packed layout
    want, same = {}, {}
    for target, cast_to in ((want, torch.float64), (same, dtype)):
        target.update(out=torch.zeros(1, heads, tq, v_head_dim, dtype=torch.float64) if v_head_dim else None,
                      div=torch.zeros((1, heads, tq) if each else (1, tq), dtype=torch.float64),
                      stats=torch.zeros(1, heads, tq, 2, dtype=torch.float64),
                      dq=torch.zeros(1, heads, tq, head_dim, dtype=torch.float64),
                      dk=torch.zeros(1, kv_heads, tk, head_dim, dtype=torch.float64),
                      dv=torch.zeros(1, kv_heads, tk, v_head_dim, dtype=torch.float64) if v_head_dim else None)
        for n in range(len(q_lens)):
            if q_lens[n] == 0:
                continue
            qs, qe, ks, ke = cu_q[n], cu_q[n + 1], cu_k[n], cu_k[n + 1]
            kw = seq_kw(n, {name: None if t is None else t.to(cast_to) for name, t in base.items()})
            if rs is not None:
                kw["ref_stats"] = _heads_view(rs[qs:qe])
            kw.update(opts)
            res = run(kw, "reference", _heads_view(dout[qs:qe]) if dout is not None else None,
                      _heads_view(ddiv[qs:qe]))
            for name in ("out", "stats", "dq"):
                if res[name] is not None:
                    target[name][:, :, qs:qe] = res[name]
            target["div"][..., qs:qe] = res["div"]
            target["dk"][:, :, ks:ke] += res["dk"]
            if res["dv"] is not None:
                target["dv"][:, :, ks:ke] += res["dv"]

    low = {name: None if t is None else _heads_view(t.to(dtype)) for name, t in base.items()}
    call = Call(low["q"], low["k"], low["v"], low["q_ref"], low["k_ref"], _heads_view(rs),
                _heads_view(masks["key_padding_mask"]), _heads_view(masks["row_mask"]),
                options(opts, head_dim, dr), seqs=packed_table(q_lens, k_lens),
                max_q_len=max(q_lens) + max_pad[0], max_k_len=max(k_lens) + max_pad[1])
    assert not call.q.is_contiguous() and call.q.data_ptr() == low["q"].data_ptr()
    got = run_call(call, _heads_view(dout), _heads_view(ddiv))
    assert_rule(got, want, same, dtype, f"packed q_lens={q_lens} k_lens={k_lens} {opts}")
    return got


LENS = [0, 1, 113, 7, 0, 64, 2, 65]

PACKED_OPTIONS = [  # covers the three divergences, both heads modes, causal and not, exclude_self and not
    dict(divergence="jsd", heads="mean", exclude_self=True, causal=True),
    dict(divergence="kl", heads="mean", exclude_self=False, causal=False),
    dict(divergence="reverse_kl", heads="mean", exclude_self=True, causal=False),
    dict(divergence="jsd", heads="each", exclude_self=True, causal=True),
    dict(divergence="kl", heads="each", exclude_self=True, causal=False),
    dict(divergence="reverse_kl", heads="each", exclude_self=False, causal=True),
]


def _oid(o):
    return "-".join([o["divergence"], o["heads"], "xself" if o["exclude_self"] else "self",
                     "causal" if o["causal"] else "full"])


@pytest.mark.parametrize("opts", PACKED_OPTIONS, ids=_oid)
def test_packed_fp16(emu, opts):
    packed_case(LENS, opts=opts, seed=1)
    # grids: the longest sequence's query tiles (113 rows: 2) x the table's units (8), whatever Tq is
    grids = [grid for grid, _, _ in launches(emu)]
    units, groups = len(LENS), 2 if opts["heads"] == "each" else 1
    assert grids[0] == grids[1] == (2, 2, units), grids        # stats: current, reference heads
    assert grids[2][:2] == (2, units * groups), grids           # divergence pass (x key splits)
    assert grids[3] == (1, units, 1), grids                     # finalize: rows of each unit
    assert grids[4][:2] == (2 * units, 1), grids                # backward: q tiles x units, B


@pytest.mark.parametrize("opts", PACKED_OPTIONS[::2], ids=_oid)
def test_packed_bf16(emu, opts):
    packed_case([3, 0, 70, 1, 41], opts=opts, dtype=BF16, seed=2)


@pytest.mark.parametrize("heads", ["mean", "each"])
def test_packed_more_keys_than_rows(emu, heads):
    """Sequences with k_len > q_len (a cached prefix), and a q_len = 0 sequence that has keys: row i
    of a sequence sits at key k_len - q_len + i; max_seqlen larger than the longest sequence."""
    packed_case([5, 0, 50, 1, 66], [9, 30, 90, 1, 130], opts=dict(divergence="jsd", heads=heads), seed=3,
                max_pad=(13, 70))


@pytest.mark.parametrize("divergence,heads", [("jsd", "mean"), ("reverse_kl", "each")])
def test_packed_gqa_mqa(emu, divergence, heads):
    opts = dict(divergence=divergence, heads=heads, exclude_self=True, causal=True)
    packed_case([33, 1, 0, 70], heads=4, kv_heads=2, ref_kv_heads=1, opts=opts, seed=4)
    packed_case([2, 77, 9], heads=4, kv_heads=1, ref_heads=4, ref_kv_heads=2, opts=opts, seed=5, dtype=BF16)


@pytest.mark.parametrize("divergence,dtype,ref", [("jsd", F16, (6, 3, 128)), ("kl", BF16, (1, 1, 80))])
def test_packed_teacher(emu, divergence, dtype, ref):
    """A reference of another head count and head dim (distillation), heads="mean"."""
    opts = dict(divergence=divergence, heads="mean", exclude_self=True, causal=True)
    packed_case([20, 0, 67, 1], heads=4, kv_heads=2, ref_heads=ref[0], ref_kv_heads=ref[1], ref_head_dim=ref[2],
                dtype=dtype, opts=opts, seed=6)


@pytest.mark.parametrize("opts", PACKED_OPTIONS[:4], ids=_oid)
def test_packed_masks_ref_stats(emu, opts):
    """ref_stats (strided (1, Hr, Tq, 2) view of a (Tq, Hr, 2) tensor), row_mask and key padding."""
    packed_case([0, 70, 1, 19, 40], head_dim=80, v_head_dim=48, opts=opts, row_mask=True, ref_stats=True,
                key_padding=True, dtype=BF16 if opts["heads"] == "each" else F16, seed=7)


def test_packed_without_v(emu):
    packed_case([30, 1, 66], v_head_dim=None, head_dim=96, opts=dict(divergence="kl", heads="mean"), seed=8)


@pytest.mark.parametrize("env", [dict(RAL_EMU_SCHEDULE="random:3", RAL_EMU_SMEM_OPTIN="60000"),
                                 dict(RAL_EMU_SCHEDULE="reverse", RAL_EMU_SMS="64", RAL_EMU_CP_ASYNC="early")],
                         ids=["one_stage", "many_splits"])
def test_packed_schedules(emu, monkeypatch, env):
    """One pipeline stage (little shared memory) and as many key splits as the longest sequence has key
    tiles (splits past a short sequence's last tile are empty)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    packed_case([0, 1, 113, 7, 130], opts=dict(divergence="jsd", heads="mean", causal=False), seed=9)


# ---- context-parallel chunks -------------------------------------------------------------------------

def zigzag_chunks(seq_len: int, ranks: int):
    """2P chunks as even as can be; rank r holds chunks r and 2P-1-r. Returns per rank [(start, len)] x 2."""
    bounds = [seq_len * c // (2 * ranks) for c in range(2 * ranks + 1)]
    chunk = [(bounds[c], bounds[c + 1] - bounds[c]) for c in range(2 * ranks)]
    return [[chunk[r], chunk[2 * ranks - 1 - r]] for r in range(ranks)]


@pytest.mark.parametrize("ranks,seq_len,batch,opts,dtype", [
    (2, 150, 1, dict(divergence="jsd", heads="mean", exclude_self=True, causal=True), F16),
    (3, 131, 2, dict(divergence="reverse_kl", heads="each", exclude_self=True, causal=True), F16),
    (2, 100, 2, dict(divergence="kl", heads="mean", exclude_self=False, causal=False), BF16),
], ids=["p2-jsd-mean", "p3-rkl-each-b2", "p2-kl-full-bf16"])
def test_context_parallel(emu, ranks, seq_len, batch, opts, dtype):
    """Rank r: the rows of chunks r and 2P-1-r (all heads; one unit per chunk and batch element,
    k_start 0, k_len S, q_pos = the chunk's start) with all keys. Its out, div and stats equal the full
    call's rows; dQ its rows of the full dQ; dK and dV summed over the ranks the full call's."""
    gen = torch.Generator().manual_seed(10 + ranks)
    heads, kv_heads, d = 4, 2, 64

    def rand(*shape, sd=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * sd

    base = dict(q=rand(batch, heads, seq_len, d), k=rand(batch, kv_heads, seq_len, d),
                v=rand(batch, kv_heads, seq_len, d), q_ref=rand(batch, heads, seq_len, d, sd=1.3),
                k_ref=rand(batch, kv_heads, seq_len, d))
    each = opts["heads"] == "each"
    dout = rand(batch, heads, seq_len, d)
    ddiv = rand(batch, heads, seq_len) if each else rand(batch, seq_len)
    want = run(dict(base, **opts), "reference", dout, ddiv)
    same = run(dict({n: t.to(dtype) for n, t in base.items()}, **opts), "reference", dout, ddiv)

    def rows_of(t, chunks, dim):
        return torch.cat([t.narrow(dim, start, n) for start, n in chunks], dim)

    dk = torch.zeros_like(want["dk"])
    dv = torch.zeros_like(want["dv"])
    for chunks in zigzag_chunks(seq_len, ranks):
        q, q_ref = (rows_of(base[n].to(dtype), chunks, 2) for n in ("q", "q_ref"))
        table = seq_table([(b, sum(n for _, n in chunks[:c]), chunks[c][1], 0, seq_len, chunks[c][0])
                           for b in range(batch) for c in range(2)])
        call = Call(q, base["k"].to(dtype), base["v"].to(dtype), q_ref, base["k_ref"].to(dtype), None, None, None,
                    options(opts, d, d), seqs=table, max_q_len=max(n for _, n in chunks), max_k_len=seq_len)
        got = run_call(call, rows_of(dout, chunks, 2), rows_of(ddiv, chunks, ddiv.dim() - 1))
        sub = lambda res: {"out": rows_of(res["out"], chunks, 2), "stats": rows_of(res["stats"], chunks, 2),  # noqa
                           "div": rows_of(res["div"], chunks, res["div"].dim() - 1),
                           "dq": rows_of(res["dq"], chunks, 2)}
        assert_rule(got, sub(want), sub(same), dtype, f"rank chunks {chunks}", names=("out", "div", "stats", "dq"))
        dk += got["dk"]
        dv += got["dv"]
    assert_rule(dict(dk=dk, dv=dv), want, same, dtype, f"dK / dV summed over {ranks} ranks", names=("dk", "dv"))


# ---- the table's header and bad entries --------------------------------------------------------------

def _small_call(table, max_q, max_k, tq=70, tk=70):
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, n, 64, generator=gen).to(F16) for n in (tq, tk, tk))
    return Call(q, k, v, q.clone(), k.clone(), None, None, None, options({}, 64, 64), seqs=table, max_q_len=max_q,
                max_k_len=max_k)


@pytest.mark.parametrize("num_seqs,max_q,max_k", [(0, 10, 10), (1, 0, 10), (1, 10, 0), (1, 71, 10), (1, 10, 71)])
def test_table_header_checked(emu, emu_module, num_seqs, max_q, max_k):
    """csrc/common/check.h: num_seqs > 0 and 0 < max_q_len <= Sq, 0 < max_k_len <= Sk with a table."""
    call = _small_call(seq_table([(0, 0, 10, 0, 10, 0)] * max(num_seqs, 1)), max_q, max_k)
    p, keep = _compiled.params(call)
    p.num_seqs = num_seqs
    p.div = p.stats = p.gbar = p.cbar = p.ref_stats_out = p.out = 16  # never written: the check throws first
    with pytest.raises(ValueError, match="sequence table"):
        emu_module.cuda_forward(p, 0)


def test_bad_entries_stay_in_bounds(emu):
    """Entries reaching outside the tensors (a batch index past B, a row or key range past Sq / Sk) are
    clipped by the kernels instead of read or written out of bounds (the emulator checks every
    cp.async source against the inputs' extents); the well-formed units' rows are unaffected."""
    table = seq_table([(0, 0, 40, 0, 40, 0), (3, 40, 10, 0, 10, 0), (0, 50, 30, 50, 40, 9), (-1, 60, 5, 0, 5, 0)])
    call = _small_call(table, 40, 40)
    good = _small_call(seq_table([(0, 0, 40, 0, 40, 0)]), 40, 40)
    gen = torch.Generator().manual_seed(12)
    dout, ddiv = torch.randn(1, 2, 70, 64, generator=gen), torch.randn(1, 70, generator=gen)
    got, want = run_call(call, dout, ddiv), run_call(good, dout, ddiv)
    for name in ("out", "div", "stats", "dq", "dk", "dv"):
        pick = (lambda t: t[:, :40]) if name == "div" else (lambda t: t[:, :, :40])
        torch.testing.assert_close(pick(got[name]), pick(want[name]), msg=name)
