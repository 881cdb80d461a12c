"""backend="triton" with a sequence table (Call.seqs, docs/design.md "Packed sequences"): packed
batches and context-parallel chunks, against the float64 reference called on dense slices, under
tests/oracle.py's accuracy rule (max error <= FACTOR x PyTorch's own error in the same dtype + a floor):
(a) packed batches (lengths 0, 1, 113 and odd mixes; causal or not, GQA / MQA, teachers with other
head counts and dims, ref_stats, row_mask, the three divergences, both heads modes) against the
dense op on each sequence; (b) context-parallel zigzag chunks against the full sequence's call;
(c) the trivial table of a dense batch gives exactly the dense call's numbers.

The table reaches the kernels the way it will from ral.ops: the call that ral.ops checks and builds
for the dense tensors (``_checked_call``, then the custom op's ``Call``) gets ``seqs``, ``max_q_len``
and ``max_k_len`` by ``dataclasses.replace`` in the backend's ``forward`` / ``backward`` (see
``table``), so the forward, the saved tensors, ddiv's masking and delta all take ral.ops' own path.

Interpreted: these tests run only in a process started with TRITON_INTERPRET=1 (like
tests/test_triton.py): ``TRITON_INTERPRET=1 python -m pytest -q tests/test_triton_seqs.py``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from oracle import NAMES, Problem, cast, run, upstream
from oracle import compare as oracle_compare

triton = pytest.importorskip("triton")

from ral import backends, reference  # noqa: E402
from ral.backends.triton import launch  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not launch.INTERPRETED, reason="CPU kernels need the Triton interpreter: run "
                       "TRITON_INTERPRET=1 python -m pytest tests/test_triton_seqs.py in its own process"),
    # The interpreter evaluates masked-out lanes too (exp2 overflow, inf * 0) before tl.where drops them.
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]


def seq_table(q_starts, q_lens, k_starts, k_lens, q_pos) -> dict:
    """The Call fields of a sequence table: int32 (N, 8) rows [batch 0, q_start, q_len, k_start,
    k_len, q_pos, 0, 0] and the longest lengths."""
    rows = [[0, qs, ql, ks, kl, qp, 0, 0] for qs, ql, ks, kl, qp in zip(q_starts, q_lens, k_starts, k_lens, q_pos)]
    return dict(seqs=torch.tensor(rows, dtype=torch.int32), max_q_len=max(q_lens), max_k_len=max(k_lens))


def from_cu_seqlens(q_lens, k_lens) -> dict:
    """The table of a packed batch (FlashAttention's cu_seqlens; q_pos = k_len - q_len: causal is
    bottom-right within each sequence)."""
    cu_q = [0] + torch.tensor(q_lens).cumsum(0).tolist()
    cu_k = [0] + torch.tensor(k_lens).cumsum(0).tolist()
    return seq_table(cu_q[:-1], q_lens, cu_k[:-1], k_lens, [kl - ql for ql, kl in zip(q_lens, k_lens)])


@pytest.fixture
def table(monkeypatch):
    """table(fields, q_layout=None): every call the triton backend gets from now on carries the
    sequence table `fields`; q_layout, when given, is the stride q must reach the kernel with."""
    mod = backends.module("triton")
    forward, backward = mod.forward, mod.backward
    seen = []

    def install(fields: dict, q_stride=None):
        def with_table(call):
            if q_stride is not None:
                assert call.q.stride() == q_stride, "the packed q was copied"
            seen.append(call.q.shape)
            return dataclasses.replace(call, **fields)

        monkeypatch.setattr(mod, "forward", lambda call: forward(with_table(call)))
        monkeypatch.setattr(mod, "backward", lambda call, *args: backward(with_table(call), *args))
        return seen
    return install


def compare(got: dict, want: dict, same: dict, dtype, label: str) -> None:
    """tests/oracle.py's accuracy rule on assembled results (float64 CPU tensors by name)."""
    oracle_compare(want, same, got, dtype, what=label)


def packed(t: torch.Tensor) -> torch.Tensor:
    """A packed (T, H, D) tensor as the (1, H, T, D) view the op takes (permuted, not copied)."""
    return t.permute(1, 0, 2).unsqueeze(0)


def ref_stats_of(q_ref, k_ref, opts, ref_scale=None):
    """The reference's own statistics, as a caller would cache them (float32)."""
    return reference.attention_kl(q_ref, k_ref, q_ref=q_ref, k_ref=k_ref, scale=ref_scale,
                                  exclude_self=opts["exclude_self"], causal=opts["causal"]).stats.float()


# ----------------------------------------------------------------------------------------------
# (a) A packed batch: every sequence against the dense op on its own slice
# ----------------------------------------------------------------------------------------------

# (name, q lengths, extra keys per sequence (k_len - q_len), options, shape fields)
PACKED_CASES = [
    ("jsd-mean-mqa-teacher-rowmask", (5, 0, 1, 37, 19), (0, 0, 0, 0, 3),
     dict(divergence="jsd", heads="mean", exclude_self=True, causal=True),
     dict(heads=2, kv_heads=1, ref_heads=3, ref_kv_heads=1, ref_dim=24, dtype=torch.float32, row_mask=True)),
    ("kl-each-mqa-refstats", (1, 113, 0, 17, 2), (0, 7, 3, 0, 0),
     dict(divergence="kl", heads="each", exclude_self=True, causal=True),
     dict(heads=2, kv_heads=1, ref_kv_heads=2, ref_dim=32, dtype=torch.float16, ref_stats=True)),
    ("rkl-mean-gqa-full-nov", (1, 0, 24, 9, 30), (4, 9, 0, 11, 0),
     dict(divergence="reverse_kl", heads="mean", exclude_self=False, causal=False),
     dict(heads=4, kv_heads=2, v_dim=None, dtype=torch.float32, ref_stats=True)),
    ("jsd-each-full-rowmask", (0, 21, 2, 40, 1), (5, 0, 6, 1, 0),
     dict(divergence="jsd", heads="each", exclude_self=True, causal=False),
     dict(heads=2, kv_heads=2, dtype=torch.float16, row_mask=True)),
    ("kl-mean-mqa-teacher", (3, 113, 0, 1), (0, 2, 0, 0),
     dict(divergence="kl", heads="mean", exclude_self=True, causal=True),
     dict(heads=2, kv_heads=1, ref_heads=1, ref_dim=16, dtype=torch.float16)),
    ("rkl-each-gqa-self-rowmask-refstats", (17, 0, 1, 50), (0, 0, 4, 13),
     dict(divergence="reverse_kl", heads="each", exclude_self=False, causal=True),
     dict(heads=4, kv_heads=2, dtype=torch.float32, row_mask=True, ref_stats=True)),
]


def make_packed(q_lens, k_lens, opts, heads, kv_heads, ref_heads=None, ref_kv_heads=None, head_dim=16,
                v_dim=16, ref_dim=None, row_mask=False, ref_stats=False, seed=0, **_) -> dict:
    """attention_kl keyword arguments (float64) for the packed batch: q (1, H, Tq, D) etc."""
    gen = torch.Generator().manual_seed(seed)
    ref_heads = ref_heads or heads
    ref_kv_heads = ref_kv_heads or ref_heads
    ref_dim = ref_dim or head_dim
    tq, tk = sum(q_lens), sum(k_lens)

    def rand(*shape, sd=1.0):
        return packed(torch.randn(*shape, generator=gen, dtype=torch.float64) * sd)

    kw = dict(q=rand(tq, heads, head_dim), k=rand(tk, kv_heads, head_dim),
              v=rand(tk, kv_heads, v_dim) if v_dim else None,
              q_ref=rand(tq, ref_heads, ref_dim, sd=1.3), k_ref=rand(tk, ref_kv_heads, ref_dim), **opts)
    if row_mask:
        kw["row_mask"] = torch.rand(1, tq, generator=gen) > 0.3
    if ref_stats:
        kw["ref_stats"] = torch.cat([ref_stats_of(q_ref, k_ref, opts) if q_ref.shape[2] else
                                     torch.zeros(1, ref_heads, 0, 2) for q_ref, k_ref in
                                     zip(slices(kw["q_ref"], q_lens), slices(kw["k_ref"], k_lens))], dim=2)
    return kw


def slices(t: torch.Tensor, lens, dim: int = 2):
    starts = [0] + torch.tensor(lens).cumsum(0).tolist()
    return [t.narrow(dim, s, n) for s, n in zip(starts, lens)]


def per_sequence(kw: dict, q_lens, k_lens, dout, ddiv, dtype) -> dict:
    """The reference on each sequence alone (its dense slices), in `dtype` (float64: the oracle),
    assembled in the packed layout. Sequences without rows contribute zero dk / dv."""
    parts = []
    div_dim = 2 if kw["heads"] == "each" else 1
    rows = {key: slices(kw[key], q_lens, 1 if key == "row_mask" else 2)
            for key in ("q", "q_ref", "row_mask", "ref_stats") if kw.get(key) is not None}
    keys = {key: slices(kw[key], k_lens) for key in ("k", "v", "k_ref") if kw.get(key) is not None}
    douts = slices(dout, q_lens) if dout is not None else [None] * len(q_lens)
    ddivs = slices(ddiv, q_lens, div_dim)
    for n, (ql, kl) in enumerate(zip(q_lens, k_lens)):
        if ql == 0:
            k, v = keys["k"][n], keys.get("v", [None] * len(k_lens))[n]
            parts.append(dict(out=None, div=None, stats=None, dq=None, dk=torch.zeros(k.shape, dtype=torch.float64),
                              dv=None if v is None else torch.zeros(v.shape, dtype=torch.float64)))
            continue
        seq = dict(kw, **{key: val[n] for key, val in {**rows, **keys}.items()})
        parts.append(run(cast(seq, dtype), "reference", douts[n], ddivs[n]))
    got = {}
    for name in NAMES:
        pieces = [p[name] for p in parts if p[name] is not None]
        dim = div_dim if name == "div" else 2
        got[name] = torch.cat(pieces, dim=dim) if pieces else None
    return got


@pytest.mark.parametrize("name,q_lens,k_extra,opts,fields", PACKED_CASES, ids=[c[0] for c in PACKED_CASES])
def test_packed_batch(table, name, q_lens, k_extra, opts, fields):
    k_lens = [ql + extra for ql, extra in zip(q_lens, k_extra)]
    kw = make_packed(q_lens, k_lens, opts, seed=len(name), **fields)
    dtype = fields["dtype"]
    dout, ddiv = upstream(kw)
    want = per_sequence(kw, q_lens, k_lens, dout, ddiv, torch.float64)
    same = per_sequence(kw, q_lens, k_lens, dout, ddiv, dtype)
    low = cast(kw, dtype)
    seen = table(from_cu_seqlens(q_lens, k_lens), q_stride=low["q"].stride())
    got = run(low, "triton", dout, ddiv)
    assert len(seen) == 2  # the forward and the backward both ran with the table
    compare(got, want, same, dtype, name)


# ----------------------------------------------------------------------------------------------
# (b) Context parallel: zigzag chunks of one sequence, each rank's rows against the full call
# ----------------------------------------------------------------------------------------------

CP_CASES = [
    ("jsd-mean-gqa", dict(divergence="jsd", heads="mean", exclude_self=True, causal=True),
     dict(heads=4, kv_heads=2, ref_heads=2, ref_kv_heads=1, dtype=torch.float32, row_mask=True)),
    ("kl-each-mqa-refstats", dict(divergence="kl", heads="each", exclude_self=True, causal=True),
     dict(heads=2, kv_heads=1, dtype=torch.float16, ref_stats=True)),
]


@pytest.mark.parametrize("name,opts,fields", CP_CASES, ids=[c[0] for c in CP_CASES])
def test_context_parallel_zigzag(table, name, opts, fields):
    """P = 2 ranks, 2P = 4 chunks of C = 13 rows: rank r holds chunks r and 2P-1-r, packed, with
    every key (k_start 0, k_len S) and q_pos = the chunk's start. Each rank's rows equal the full
    call's rows; dk / dv summed over the ranks equal the full call's (the two units of a rank
    share their keys: dk / dv are added, not stored)."""
    ranks, chunk = 2, 13
    length = 2 * ranks * chunk
    dtype = fields["dtype"]
    kw = make_packed([length], [length], opts, seed=len(name), **fields)
    dout, ddiv = upstream(kw)
    want = run(kw, "reference", dout, ddiv)
    same = run(cast(kw, dtype), "reference", dout, ddiv)
    div_dim = 2 if opts["heads"] == "each" else 1

    got = {name: torch.zeros_like(want[name]) if want[name] is not None else None for name in NAMES}
    for rank in range(ranks):
        chunks = (rank, 2 * ranks - 1 - rank)
        idx = torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in chunks])
        mine = dict(kw)
        for key in ("q", "q_ref", "ref_stats"):
            if kw.get(key) is not None:
                mine[key] = kw[key][:, :, idx]
        if kw.get("row_mask") is not None:
            mine["row_mask"] = kw["row_mask"][:, idx]
        table(seq_table([0, chunk], [chunk, chunk], [0, 0], [length, length], [c * chunk for c in chunks]))
        res = run(cast(mine, dtype), "triton", dout[:, :, idx] if dout is not None else None,
                  ddiv.index_select(div_dim, idx))
        for key in ("out", "stats", "dq"):
            if res[key] is not None:
                got[key][:, :, idx] = res[key]
        got["div"].index_copy_(div_dim, idx, res["div"])
        for key in ("dk", "dv"):
            if res[key] is not None:
                got[key] += res[key]
    compare(got, want, same, dtype, name)


# ----------------------------------------------------------------------------------------------
# (c) The trivial table of a dense batch ({b, 0, Sq, 0, Sk, Sk - Sq} for b < B) is the dense call
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [dict(divergence="jsd", heads="mean", exclude_self=True, causal=True),
                                  dict(divergence="kl", heads="each", exclude_self=True, causal=True)],
                         ids=["jsd-mean", "kl-each"])
def test_trivial_table_is_the_dense_call(table, opts):
    """B = 2 (units read batch 1 too), key_padding_mask and row_mask through the table's offsets,
    Sq < Sk: the same numbers as without a table (dk / dv then by atomics into zeros: exact)."""
    batch, q_len, k_len = 2, 13, 21
    problem = Problem(batch=batch, heads=2, kv_heads=1, q_len=q_len, k_len=k_len, left_pad=(0, 4),
                      right_pad=(3, 0), row_mask=True, options=opts, seed=9)
    kw = cast(problem.make(), torch.float32)
    dout, ddiv = upstream(kw)
    dense = run(kw, "triton", dout, ddiv)
    rows = [[b, 0, q_len, 0, k_len, k_len - q_len, 0, 0] for b in range(batch)]
    table(dict(seqs=torch.tensor(rows, dtype=torch.int32), max_q_len=q_len, max_k_len=k_len))
    tabled = run(kw, "triton", dout, ddiv)
    for name in NAMES:
        assert torch.equal(tabled[name], dense[name]), name
