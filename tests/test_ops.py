"""The public op: input checks (docs/design.md, "Bad input"), backend selection (docs/design.md, "Backends"), the torch.library
registration (opcheck, torch.compile fullgraph) and the ref_stats round trip."""

import pytest
import torch

import ral
from oracle import Problem, assert_compiled_matches_eager, cast
from ral import backends

CPU_BUILT = backends.unavailable_reason("cpu") is None


def good():
    """Valid float32 arguments: B=2, H=4, Hkv=2, Sq=5, Sk=7, D=8, Dv=6, Hr=3, Dr=4."""
    g = torch.Generator().manual_seed(0)
    return dict(q=torch.randn(2, 4, 5, 8, generator=g), k=torch.randn(2, 2, 7, 8, generator=g),
                v=torch.randn(2, 2, 7, 6, generator=g), q_ref=torch.randn(2, 3, 5, 4, generator=g),
                k_ref=torch.randn(2, 3, 7, 4, generator=g))


BAD = [  # (change to the valid call, exception, text the message must contain)
    (dict(q=None), TypeError, "q"),
    (dict(q=[[1.0]]), TypeError, "q"),
    (dict(q=torch.randn(4, 5, 8)), ValueError, "q"),
    (dict(k=torch.randn(2, 2, 7)), ValueError, "k"),
    (dict(v=torch.randn(2, 2, 7)), ValueError, "v"),
    (dict(q_ref=torch.randn(2, 3, 5)), ValueError, "q_ref"),
    (dict(k=torch.randn(3, 2, 7, 8)), ValueError, "k: batch"),
    (dict(q_ref=torch.randn(1, 3, 5, 4)), ValueError, "q_ref: batch"),
    (dict(k=torch.randn(2, 2, 7, 9)), ValueError, "k: head dim"),
    (dict(k=torch.randn(2, 3, 7, 8), v=torch.randn(2, 3, 7, 6)), ValueError, "multiple of k's Hkv=3"),
    (dict(v=torch.randn(2, 2, 6, 6)), ValueError, "v: key length"),
    (dict(v=torch.randn(2, 1, 7, 6)), ValueError, "v: kv heads"),
    (dict(q_ref=torch.randn(2, 3, 4, 4)), ValueError, "q_ref: query length"),
    (dict(k_ref=torch.randn(2, 3, 6, 4)), ValueError, "k_ref: key length"),
    (dict(k_ref=torch.randn(2, 3, 7, 5)), ValueError, "k_ref: head dim"),
    (dict(k_ref=torch.randn(2, 2, 7, 4)), ValueError, "Hr=3 must be a multiple"),
    (dict(heads="each"), ValueError, "heads='each'"),
    (dict(divergence="js"), ValueError, "divergence"),
    (dict(divergence=1), TypeError, "divergence"),
    (dict(heads="sum"), ValueError, "heads"),
    (dict(backend="gpu"), ValueError, "backend"),
    (dict(exclude_self=1), TypeError, "exclude_self"),
    (dict(causal="yes"), TypeError, "causal"),
    (dict(scale="0.1"), TypeError, "scale"),
    (dict(scale=-1.0), ValueError, "scale"),
    (dict(ref_scale=float("nan")), ValueError, "ref_scale"),
    (dict(q=torch.randn(2, 4, 5, 8).to(torch.int32)), TypeError, "q: dtype"),
    (dict(k=torch.randn(2, 2, 7, 8).half()), TypeError, "k: dtype"),
    (dict(v=torch.randn(2, 2, 7, 6).double()), TypeError, "v: dtype"),
    (dict(k_ref=torch.randn(2, 3, 7, 4).half()), TypeError, "k_ref: dtype"),
    (dict(key_padding_mask=torch.ones(2, 7)), TypeError, "key_padding_mask: dtype"),
    (dict(row_mask=torch.ones(2, 5, dtype=torch.int64)), TypeError, "row_mask: dtype"),
    (dict(key_padding_mask=torch.ones(2, 6, dtype=torch.bool)), ValueError, "key_padding_mask: key length"),
    (dict(row_mask=torch.ones(2, 7, dtype=torch.bool)), ValueError, "row_mask: query length"),
    (dict(key_padding_mask=torch.ones(2, 7, 1, dtype=torch.bool)), ValueError, "key_padding_mask"),
    (dict(ref_stats=torch.zeros(2, 4, 5, 2)), ValueError, "ref_stats: shape"),
    (dict(ref_stats=torch.zeros(2, 3, 5, 2, dtype=torch.float16)), TypeError, "ref_stats: dtype"),
    (dict(q=torch.randn(2, 4, 8, 8), q_ref=torch.randn(2, 3, 8, 4)), ValueError, "Sq <= Sk"),
    (dict(q=torch.randn(2, 4, 0, 8), q_ref=torch.randn(2, 3, 0, 4)), ValueError, "empty"),
    (dict(q=torch.randn(2, 4, 5, 8).double()), TypeError, "k: dtype"),
]


@pytest.mark.parametrize("change,error,text", BAD, ids=[t for _, _, t in BAD])
def test_bad_input_is_named(change, error, text):
    kw = {**good(), **change}
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)").replace("'", "'")):
        ral.attention_kl(**kw)


def test_different_devices_are_named():
    if not torch.cuda.is_available():
        meta = good()
        meta["k"] = meta["k"].to("meta")
        with pytest.raises(ValueError, match="k: must be on q's device"):
            ral.attention_kl(**meta)
    else:
        kw = good()
        kw["v"] = kw["v"].cuda()
        with pytest.raises(ValueError, match="v: must be on q's device"):
            ral.attention_kl(**kw)


def test_unavailable_backend_says_how_to_get_it():
    kw = good()
    with pytest.raises(ValueError, match="cuda"):
        ral.attention_kl(backend="cuda", **kw)
    with pytest.raises(TypeError, match="float64 is only supported by backend='reference'"):
        ral.attention_kl(backend="cpu", **{k: v.double() for k, v in kw.items()})


def test_auto_picks_the_compiled_cpu_kernel():
    assert CPU_BUILT, backends.unavailable_reason("cpu")
    call = ral.ops._checked_call(*[good()[n] for n in ("q", "k", "v", "q_ref", "k_ref")], None, "jsd", "mean",
                                 True, True, None, None, None, None, "auto")
    assert backends.resolve("auto", call) == "cpu"
    assert "cpu" in ral.available_backends() and "reference" in ral.available_backends()


def test_float64_runs_the_reference_under_auto():
    kw = {k: v.double() for k, v in good().items()}
    res = ral.attention_kl(**kw)
    assert res.div.dtype == torch.float64 and res.out.dtype == torch.float64


def test_ref_stats_round_trip():
    """stats of the reference model, passed back as ref_stats, give the same divergence."""
    kw = good()
    kw["key_padding_mask"] = torch.tensor([[False, True, True, True, True, True, True]] * 2)
    ref = ral.attention_kl(kw["q_ref"], kw["k_ref"], q_ref=kw["q_ref"], k_ref=kw["k_ref"],
                           key_padding_mask=kw["key_padding_mask"], backend="cpu")
    with_stats = ral.attention_kl(**kw, ref_stats=ref.stats, backend="cpu")
    without = ral.attention_kl(**kw, backend="cpu")
    torch.testing.assert_close(with_stats.div, without.div, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(with_stats.out, without.out)
    assert ref.out is None


def _custom_op_args(kw, backend="cpu"):
    return (kw["q"], kw["k"], kw["v"], kw["q_ref"], kw["k_ref"], None, None, None, "jsd", False, True, True,
            0.35, 0.5, backend)


def test_opcheck_forward_op():
    kw = {k: (v.requires_grad_(True) if k in ("q", "k", "v") else v) for k, v in good().items()}
    torch.library.opcheck(torch.ops.ral.attention_kl.default, _custom_op_args(kw),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("heads", ["mean", "each"])
def test_torch_compile_fullgraph(heads):
    """torch.compile traces a function that calls attention_kl, forward and backward."""
    kw = good()
    if heads == "each":
        kw["q_ref"], kw["k_ref"] = torch.randn(2, 4, 5, 4), torch.randn(2, 2, 7, 4)

    def loss_fn(q, k, v):
        res = ral.attention_kl(q, k, v, q_ref=kw["q_ref"], k_ref=kw["k_ref"], heads=heads, backend="cpu")
        return res.out.square().mean() + res.div.sum()

    assert_compiled_matches_eager(loss_fn, [kw[n] for n in ("q", "k", "v")])


def test_non_contiguous_inputs_are_not_a_problem():
    """(B, S, H, D) tensors viewed as (B, H, S, D) give the same numbers as contiguous ones."""
    problem = Problem(batch=2, heads=4, kv_heads=2, q_len=9, k_len=11, head_dim=16, seed=8)
    kw = cast(problem.make(), torch.float32)
    strided = {k: (v.transpose(1, 2).contiguous().transpose(1, 2) if k in ("q", "k", "v", "q_ref", "k_ref") else v)
               for k, v in kw.items()}
    assert not strided["q"].is_contiguous()
    a = ral.attention_kl(**kw, backend="cpu")
    b = ral.attention_kl(**strided, backend="cpu")
    torch.testing.assert_close(a.out, b.out)
    torch.testing.assert_close(a.div, b.div)


# ---- torch.use_deterministic_algorithms ------------------------------------------------------------

@pytest.fixture
def deterministic():
    """Sets torch.use_deterministic_algorithms(mode, warn_only=...) for the test, then restores it."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield torch.use_deterministic_algorithms
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_alert_follows_torch_rule(deterministic):
    """alert_not_deterministic: silent by default, a RuntimeError naming the computation under
    torch.use_deterministic_algorithms(True), a warning with warn_only=True."""
    backends.alert_not_deterministic("the thing")
    deterministic(True)
    with pytest.raises(RuntimeError, match="the thing adds fp32 partial sums with atomics"):
        backends.alert_not_deterministic("the thing")
    deterministic(True, warn_only=True)
    with pytest.warns(UserWarning, match="the thing"):
        backends.alert_not_deterministic("the thing")


@pytest.mark.parametrize("backend,phase", [("cuda", "forward"), ("cuda", "backward"), ("triton", "backward")])
def test_gpu_backends_refuse_deterministic_mode(deterministic, backend, phase):
    """Under torch.use_deterministic_algorithms(True) the GPU kernels that add fp32 partial sums with
    atomics (CUDA's forward and backward, Triton's backward) raise before they launch, as PyTorch's
    own such ops do; checked on CPU tensors, where the alert comes first."""
    try:
        module = backends.module(backend)
    except ImportError as err:  # triton not installed
        pytest.skip(str(err))
    kw = good()
    call = ral.ops._checked_call(kw["q"], kw["k"], kw["v"], kw["q_ref"], kw["k_ref"], None, "jsd", "mean", True,
                                 True, None, None, None, None, backend)
    args = (call,) if phase == "forward" else (call, None, None, None, None, None, None)
    deterministic(True)
    with pytest.raises(RuntimeError, match=f"ral's {'CUDA' if backend == 'cuda' else 'Triton'} {phase}"):
        getattr(module, phase)(*args)


@pytest.mark.skipif(not CPU_BUILT, reason="ral._C not built")
def test_cpu_backend_runs_in_deterministic_mode(deterministic):
    """The cpu backend is deterministic (tests/test_cpu.py: test_gradients_are_reproducible), so it
    runs under torch.use_deterministic_algorithms(True), forward and backward, and gives the same bits
    as without it."""
    kw = {k: v.requires_grad_(k in ("q", "k", "v")) for k, v in good().items()}

    def grads():
        res = ral.attention_kl(**kw, backend="cpu")
        return torch.autograd.grad(res.out.square().sum() + res.div.sum(), [kw["q"], kw["k"], kw["v"]])

    want = grads()
    deterministic(True)
    for got, ref in zip(grads(), want):
        assert torch.equal(got, ref)
