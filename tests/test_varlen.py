"""ral.ops.attention_kl_varlen: packed sequences (docs/design.md, "Packed sequences").

The float64 reference of a packed call is the dense reference on each sequence alone; every
kernel backend meets the accuracy rule of tests/oracle.py against it, values and gradients, over
lengths including 0, 1 and 113, both heads modes, every divergence, GQA/MQA, a teacher with other
heads / head dim, ref_stats and row_mask. Bad cu_seqlens raise a ValueError naming the argument.
The Triton and emulated-CUDA kernels run the same table through tests/test_triton_seqs.py and
tests/test_seqs_cuda_emulated.py.
"""

import pytest
import torch

import ral
from oracle import PackedProblem, assert_compiled_matches_eager, check_packed, option_grid, option_id, packed_upstream, run
from ral import backends

CPU = pytest.mark.skipif(backends.unavailable_reason("cpu") is not None, reason="ral._C not built")
# (1, 2, 1), not (1, 1, 1): an all-ones batch has exactly-zero dq, where the floor of the accuracy rule
# (relative to max|reference|) vanishes (the same reason tests/test_cpu.py tests Sq = Sk = 1 as (1, 2))
LENGTHS = [(5, 0, 1, 17), (113,), (1, 2, 1), (0, 9, 0, 31, 2)]


def test_reference_equals_the_dense_op_per_sequence():
    """The packed oracle is the dense oracle on each sequence: values and gradients."""
    problem = PackedProblem(q_lens=(7, 0, 1, 12), heads=4, kv_heads=2, row_mask=True, options=dict(heads="mean"))
    kw = problem.make()
    dout, ddiv = packed_upstream(kw)
    packed = run(kw, "reference", dout, ddiv, op=ral.ops.attention_kl_varlen)
    cu = kw["cu_seqlens_q"].tolist()
    for n in range(len(cu) - 1):
        rows = slice(cu[n], cu[n + 1])
        if rows.start == rows.stop:
            continue
        dense = {key: kw[key][rows].transpose(0, 1)[None] for key in ("q", "k", "v", "q_ref", "k_ref")}
        got = run(dict(dense, row_mask=kw["row_mask"][rows][None], heads="mean"), "reference",
                  dout[rows].transpose(0, 1)[None], ddiv[rows][None])
        for name in ("out", "stats", "dq", "dk", "dv"):
            torch.testing.assert_close(packed[name][rows], got[name][0].transpose(0, 1), msg=name)
        torch.testing.assert_close(packed["div"][rows], got["div"][0])


@CPU
@pytest.mark.parametrize("opts", list(option_grid()), ids=option_id)
def test_cpu_option_grid(opts):
    k_lens = None if opts["causal"] else (7, 3, 1, 20)      # non-causal: other key lengths, one shorter
    check_packed(PackedProblem(q_lens=(5, 0, 1, 17), k_lens=k_lens, options=opts), "cpu")


@CPU
@pytest.mark.parametrize("q_lens", LENGTHS, ids=lambda lens: "-".join(map(str, lens)))
def test_cpu_lengths(q_lens):
    check_packed(PackedProblem(q_lens=q_lens, heads=6, kv_heads=2, row_mask=True, seed=3), "cpu")


@CPU
@pytest.mark.parametrize("case", ["mqa", "teacher", "ref_stats", "no_v", "fp16"])
def test_cpu_shapes(case):
    fields = dict(mqa=dict(heads=4, kv_heads=1), teacher=dict(ref_heads=6, ref_kv_heads=3, ref_head_dim=24),
                  ref_stats=dict(with_ref_stats=True, options=dict(heads="each", divergence="kl")),
                  no_v=dict(v_head_dim=None), fp16=dict(dtype=torch.float16))[case]
    check_packed(PackedProblem(q_lens=(9, 1, 30), seed=5, **fields), "cpu")


def test_torch_compile_fullgraph():
    problem = PackedProblem(q_lens=(4, 6), options=dict(heads="mean"))
    kw = {key: (value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value)
          for key, value in problem.make().items()}

    def loss_fn(q, k, v):
        res = ral.ops.attention_kl_varlen(q, k, v, **{key: kw[key] for key in kw if key not in ("q", "k", "v")})
        return res.out.square().mean() + res.div.sum()

    assert_compiled_matches_eager(loss_fn, [kw[name] for name in ("q", "k", "v")])


def _call(**changes):
    kw = PackedProblem(q_lens=(3, 4)).make()
    kw = {key: (value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value)
          for key, value in kw.items()}
    kw.update(changes)
    return lambda: ral.ops.attention_kl_varlen(**kw)


@pytest.mark.parametrize("changes,error,match", [
    (dict(cu_seqlens_q=torch.tensor([0, 3, 7])), TypeError, "cu_seqlens_q: dtype must be torch.int32"),
    (dict(cu_seqlens_q=torch.tensor([[0, 3, 7]], dtype=torch.int32)), ValueError, r"cu_seqlens_q must have shape"),
    (dict(cu_seqlens_q=torch.tensor([1, 3, 7], dtype=torch.int32)), ValueError, r"cu_seqlens_q\[0\] must be 0"),
    (dict(cu_seqlens_q=torch.tensor([0, 5, 3, 7], dtype=torch.int32),
          cu_seqlens_k=torch.tensor([0, 3, 5, 7], dtype=torch.int32)), ValueError, "non-decreasing"),
    (dict(cu_seqlens_k=torch.tensor([0, 3, 6], dtype=torch.int32)), ValueError, r"cu_seqlens_k\[-1\] must equal"),
    (dict(cu_seqlens_k=torch.tensor([0, 7], dtype=torch.int32)), ValueError, "as many sequences"),
    (dict(cu_seqlens_k=torch.tensor([0, 2, 7], dtype=torch.int32)), ValueError, "causal attention needs each"),
    (dict(max_seqlen_q=3), ValueError, "max_seqlen_q must be at least the longest sequence"),
    (dict(max_seqlen_k=4.0), TypeError, "max_seqlen_k must be an int"),
    (dict(q=torch.randn(1, 7, 4, 16)), ValueError, r"q must have 3 dimensions"),
    (dict(q_ref=torch.randn(6, 4, 16)), ValueError, r"q_ref: packed length Tq"),
    (dict(row_mask=torch.ones(7, 1, dtype=torch.bool)), ValueError, "row_mask must have 1 dimensions"),
    (dict(cu_seqlens_q=[0, 3, 7]), TypeError, "cu_seqlens_q must be a torch.Tensor"),
])
def test_bad_input(changes, error, match):
    with pytest.raises(error, match=match):
        _call(**changes)()
