"""Shared test machinery: random problems, running a backend forward + backward, and the
FlashAttention-style accuracy rule against the float64 reference.

The rule: for every output and gradient, a backend's max error against the float64 reference
is at most ``FACTOR`` times the error of plain PyTorch (ral.reference) run on the same
low-precision inputs, plus a small per-dtype floor scaled by the reference's magnitude.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

import ral
from ral import reference
from ral.backends import Options
from ral.lm_head import logits

FACTOR = 2.0
# absolute floor, relative to max|reference|, for when PyTorch's own error is ~0
FLOOR = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}
NAMES = ("out", "div", "stats", "dq", "dk", "dv")
STATS_NAMES = NAMES + ("entropy", "mass")  # with key segments (docs/design.md, "Attention statistics")


@dataclass
class Problem:
    """A random attention_kl call. Shapes follow ral.ops.attention_kl."""

    dtype: torch.dtype = torch.float32
    batch: int = 2
    heads: int = 4
    kv_heads: int = 4
    head_dim: int = 16
    v_head_dim: Optional[int] = 16       # None: no v
    q_len: int = 17
    k_len: int = 17
    ref_heads: Optional[int] = None      # default: heads
    ref_kv_heads: Optional[int] = None   # default: ref_heads
    ref_head_dim: Optional[int] = None   # default: head_dim
    left_pad: tuple = ()                 # per batch: number of padded keys on the left
    right_pad: tuple = ()                # per batch: number of padded keys on the right
    row_mask: bool = False               # mask a random subset of rows
    with_ref_stats: bool = False         # pass the reference's stats as ref_stats
    seed: int = 0
    options: dict = field(default_factory=dict)  # divergence, heads, exclude_self, causal, scale...
    segments: int = 0                    # > 0: random key_segments with num_segments = segments

    def make(self, device="cpu") -> dict:
        """Keyword arguments for attention_kl, in float64 on `device` (cast with `cast`)."""
        gen = torch.Generator().manual_seed(self.seed)
        hr = self.ref_heads or self.heads
        hrkv = self.ref_kv_heads or hr
        dr = self.ref_head_dim or self.head_dim

        def rand(*shape, sd=1.0):
            return (torch.randn(*shape, generator=gen, dtype=torch.float64) * sd).to(device)

        kw = dict(q=rand(self.batch, self.heads, self.q_len, self.head_dim),
                  k=rand(self.batch, self.kv_heads, self.k_len, self.head_dim),
                  v=(rand(self.batch, self.kv_heads, self.k_len, self.v_head_dim)
                     if self.v_head_dim else None),
                  q_ref=rand(self.batch, hr, self.q_len, dr, sd=1.3),
                  k_ref=rand(self.batch, hrkv, self.k_len, dr))
        if self.left_pad or self.right_pad:
            mask = torch.ones(self.batch, self.k_len, dtype=torch.bool)
            for b, n in enumerate(self.left_pad):
                mask[b, :n] = False
            for b, n in enumerate(self.right_pad):
                if n:
                    mask[b, self.k_len - n:] = False
            kw["key_padding_mask"] = mask.to(device)
        if self.row_mask:
            kw["row_mask"] = (torch.rand(self.batch, self.q_len, generator=gen) > 0.3).to(device)
        if self.segments:
            kw["key_segments"] = torch.randint(0, self.segments, (self.batch, self.k_len), generator=gen).to(device)
            kw["num_segments"] = self.segments
        opts = dict(self.options)
        if self.with_ref_stats:
            ref_kw = {key: kw[key] for key in ("key_padding_mask",) if key in kw}
            for key in ("exclude_self", "causal"):
                if key in opts:
                    ref_kw[key] = opts[key]
            kw["ref_stats"] = reference.attention_kl(
                kw["q_ref"], kw["k_ref"], q_ref=kw["q_ref"], k_ref=kw["k_ref"], scale=opts.get("ref_scale"),
                **ref_kw).stats.float()
        kw.update(opts)
        return kw


def cast(kw: dict, dtype: torch.dtype, device=None) -> dict:
    """Cast the float tensors of q, k, v, q_ref, k_ref to dtype (masks and ref_stats untouched)."""
    out = dict(kw)
    for key in ("q", "k", "v", "q_ref", "k_ref"):
        if out.get(key) is not None:
            out[key] = out[key].to(device=device or out[key].device, dtype=dtype)
    for key in ("key_padding_mask", "row_mask", "ref_stats", "cu_seqlens_q", "cu_seqlens_k", "key_segments"):
        if out.get(key) is not None and device is not None:
            out[key] = out[key].to(device)
    return out


def upstream(kw: dict, seed: int = 1):
    """Random upstream gradients (dout, ddiv) for the call `kw`, float64 on CPU."""
    gen = torch.Generator().manual_seed(seed)
    q = kw["q"]
    batch, heads, q_len = q.shape[:3]
    dout = (torch.randn(batch, heads, q_len, kw["v"].shape[-1], generator=gen, dtype=torch.float64)
            if kw.get("v") is not None else None)
    each = kw.get("heads", "mean") == "each"
    ddiv = torch.randn(*((batch, heads, q_len) if each else (batch, q_len)), generator=gen,
                       dtype=torch.float64)
    return dout, ddiv


def stats_upstream(kw: dict, seed: int = 2):
    """Random upstream gradients (dentropy, dmass) of the policy statistics for the call `kw` (dense
    (B, H, Sq, D) or packed (T, H, D) q), float64 on CPU; dmass None without key_segments."""
    gen = torch.Generator().manual_seed(seed)
    q = kw["q"]
    each = kw.get("heads", "mean") == "each"
    if q.dim() == 4:
        shape = (q.shape[0], q.shape[1], q.shape[2]) if each else (q.shape[0], q.shape[2])
    else:
        shape = (q.shape[0], q.shape[1]) if each else (q.shape[0],)
    dentropy = torch.randn(*shape, generator=gen, dtype=torch.float64)
    dmass = (torch.randn(*shape, kw["num_segments"], generator=gen, dtype=torch.float64)
             if kw.get("key_segments") is not None else None)
    return dentropy, dmass


def run(kw: dict, backend: str, dout=None, ddiv=None, op=None, dstats=None) -> dict:
    """Forward + backward of attention_kl (or `op`, e.g. ral.ops.attention_kl_varlen or
    ral.ops.attention_stats). Returns float64 CPU copies of out, div, stats, dq, dk, dv, and entropy and
    mass when the result has them; dstats = (dentropy, dmass) weights them in the loss."""
    kw = dict(kw)
    for key in ("q", "k", "v"):
        if kw.get(key) is not None:
            kw[key] = kw[key].detach().clone().requires_grad_(True)
    res = (op or ral.attention_kl)(backend=backend, **kw)
    div, entropy, mass = (getattr(res, name, None) for name in ("div", "entropy", "mass"))
    loss = 0
    if dout is not None and res.out is not None:
        loss = loss + (res.out.double() * dout.to(res.out.device)).sum()
    if ddiv is not None and div is not None:
        loss = loss + (div.double() * ddiv.to(div.device)).sum()
    if dstats is not None:
        for t, w in zip((entropy, mass), dstats):
            if t is not None and w is not None:
                loss = loss + (t.double() * w.to(t.device)).sum()
    loss.backward()
    grads = {name: (kw[key].grad if kw.get(key) is not None else None)
             for name, key in (("dq", "q"), ("dk", "k"), ("dv", "v"))}
    got = dict(out=res.out, div=div, stats=res.stats, entropy=entropy, mass=mass, **grads)
    return {name: (None if t is None else t.detach().double().cpu()) for name, t in got.items()}


def _err(a, b) -> float:
    """Max abs error, with matching infinities (empty-set statistics) counted as exact."""
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    diff = torch.where(both_inf, torch.zeros_like(a), (a - b).abs())
    return float(diff.max()) if diff.numel() else 0.0


def check(problem: Problem, backend: str, device="cpu", names=NAMES, factor: float = FACTOR) -> dict:
    """Assert the accuracy rule for `backend` on `problem`; returns the errors for reporting."""
    base = problem.make()
    dout, ddiv = upstream(base)
    dstats = stats_upstream(base) if base.get("key_segments") is not None else None
    want = run(base, "reference", dout, ddiv, dstats=dstats)                              # float64 oracle
    torch_same = run(cast(base, problem.dtype), "reference", dout, ddiv, dstats=dstats)   # PyTorch in the same dtype
    got = run(cast(base, problem.dtype, device), backend, dout, ddiv, dstats=dstats)
    return compare(want, torch_same, got, problem.dtype, names, factor, f"{backend} for {problem}")


class AccuracyError(AssertionError):
    """The accuracy rule broken by one output: its `name`, the backend's error `err`, the `bound`,
    PyTorch's error `err_torch` and the reference's largest finite magnitude `scale`."""

    def __init__(self, message: str, name: str, err: float, bound: float, err_torch: float, scale: float):
        super().__init__(message)
        self.name, self.err, self.bound, self.err_torch, self.scale = name, err, bound, err_torch, scale


def compare(want: dict, torch_same: dict, got: dict, dtype: torch.dtype, names=NAMES, factor: float = FACTOR,
            what: str = "backend") -> dict:
    """The accuracy rule on results already computed (dicts of float64 CPU tensors, as `run`
    returns): float64 oracle `want`, PyTorch in `dtype` `torch_same`, the kernel's `got`."""
    errors = {}
    for name in names:
        if want[name] is None:
            assert got[name] is None, f"{name}: expected None"
            continue
        assert got[name] is not None, f"{name}: backend returned None"
        assert got[name].shape == want[name].shape, f"{name}: shape {got[name].shape} != {want[name].shape}"
        nan_want, nan_got = torch.isnan(want[name]), torch.isnan(got[name])
        assert torch.equal(nan_want, nan_got), f"{name}: NaN pattern differs from the reference"
        finite = torch.isfinite(want[name])
        scale = float(want[name][finite].abs().max()) if finite.any() else 1.0
        err_backend = _err(got[name], want[name])
        err_torch = _err(torch_same[name], want[name])
        bound = factor * err_torch + FLOOR[dtype] * max(scale, 1e-3)
        errors[name] = (err_backend, err_torch, bound)
        if not err_backend <= bound:
            raise AccuracyError(f"{name}: error {err_backend:.3g} > bound {bound:.3g} (PyTorch {dtype} error "
                                f"{err_torch:.3g}, |ref| max {scale:.3g}): {what}", name, err_backend, bound,
                                err_torch, scale)
    return errors



def check_stats(problem: Problem, backend: str, with_div: bool = True, device="cpu"):
    """The accuracy rule with upstream weights on out, entropy, mass and (with_div) div; the backend
    runs on `device`, the references on the CPU."""
    base = problem.make()
    dout, ddiv = upstream(base)
    ddiv = ddiv if with_div else None
    dstats = stats_upstream(base)
    results = [run(kw, be, dout, ddiv, dstats=dstats)
               for kw, be in ((base, "reference"), (cast(base, problem.dtype), "reference"),
                              (cast(base, problem.dtype, device), backend))]
    return compare(*results, problem.dtype, STATS_NAMES, what=f"{backend} for {problem}")


def check_dead_rows_give_zero(backend: str, heads: str, dtype=torch.float32, device=None) -> None:
    """exclude_self's first row, rows before the first real key, a fully padded batch element and
    row_mask False rows: entropy 0 and mass 0, never NaN; gradients finite (the backend on `device`)."""
    problem = Problem(batch=3, heads=4, kv_heads=2, q_len=12, k_len=12, left_pad=(3, 12, 0), segments=3,
                      options=dict(heads=heads))
    kw = cast(problem.make(), dtype, device)
    kw["row_mask"] = torch.ones(3, 12, dtype=torch.bool, device=device)
    kw["row_mask"][2, 5] = False
    got = run(kw, backend, *upstream(kw), dstats=stats_upstream(kw))
    for name in ("entropy", "mass", "div", "dq", "dk", "dv"):
        assert not torch.isnan(got[name]).any(), name
    dead = [(0, slice(0, 4)), (1, slice(None)), (2, 0), (2, 5)]  # (batch, rows) with empty P or masked
    for b, rows in dead:
        index = (b, rows) if heads == "mean" else (b, slice(None), rows)
        assert (got["entropy"][index] == 0).all() and (got["mass"][index] == 0).all()
    assert (got["entropy"][0, ..., 5:] > 0).all() if heads == "mean" else (got["entropy"][0, :, 5:] > 0).all()
    assert (got["dq"][1] == 0).all()  # a fully padded element gets no gradient at all


def check_attention_stats(backend: str, heads: str, segments: int, dtype=torch.float32, device=None, seq: int = 30,
                          k_len: Optional[int] = None, causal: bool = True) -> None:
    """ral.ops.attention_stats (no reference) on `backend` (on `device`, in `dtype`) under the accuracy
    rule, with upstream weights on out, entropy and (segments > 0) mass; its entropy equals
    attention_kl's against any reference. seq query rows, k_len keys (default seq)."""
    k_len = k_len or seq
    problem = Problem(batch=2, heads=4, kv_heads=2, q_len=seq, k_len=k_len, left_pad=(2, 0), row_mask=True,
                      segments=segments, seed=7, options=dict(heads=heads, exclude_self=True, causal=causal))
    base = problem.make()
    for name in ("q_ref", "k_ref", "heads"):
        base.pop(name)
    base["heads"] = heads
    dout, _ = upstream(base)
    dentropy = stats_upstream(dict(base, key_segments=None))[0]
    dmass = stats_upstream(base)[1] if segments else None

    def stats_op(q, k, v=None, **kw):
        return ral.ops.attention_stats(q, k, v, **kw)

    results = [run(kw, be, dout, None, op=stats_op, dstats=(dentropy, dmass))
               for kw, be in ((base, "reference"), (cast(base, dtype), "reference"),
                              (cast(base, dtype, device), backend))]
    names = ("out", "stats", "entropy", "dq", "dk", "dv") + (("mass",) if segments else ())
    compare(*results, dtype, names, what=f"attention_stats ({heads}, {segments} segments) on {backend}")
    assert (results[2]["mass"] is None) == (segments == 0)
    # the same numbers as attention_kl's statistics against any reference
    kw = dict(base)
    key_segments = kw.pop("key_segments", torch.zeros(2, k_len, dtype=torch.long))
    kw.pop("num_segments", None)
    with_ref = ral.attention_kl(**kw, q_ref=torch.randn_like(kw["q"]), k_ref=torch.randn_like(kw["k"]),
                                key_segments=key_segments, num_segments=segments or 1, backend="reference")
    torch.testing.assert_close(with_ref.entropy, results[0]["entropy"])


@dataclass
class PackedProblem:
    """A random attention_kl_varlen call: sequences of q_lens rows and k_lens keys, packed."""

    q_lens: tuple = (5, 0, 1, 17)
    k_lens: Optional[tuple] = None       # default: q_lens
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    v_head_dim: Optional[int] = 16
    ref_heads: Optional[int] = None
    ref_kv_heads: Optional[int] = None
    ref_head_dim: Optional[int] = None
    dtype: torch.dtype = torch.float32
    row_mask: bool = False
    with_ref_stats: bool = False
    seed: int = 0
    options: dict = field(default_factory=dict)
    segments: int = 0                    # > 0: random packed key_segments (Tk,) with num_segments

    def make(self, device="cpu") -> dict:
        """Keyword arguments for attention_kl_varlen in float64 (cast the floats with `cast`)."""
        gen = torch.Generator().manual_seed(self.seed)
        k_lens = self.k_lens or self.q_lens
        tq, tk = sum(self.q_lens), sum(k_lens)
        hr = self.ref_heads or self.heads
        hrkv = self.ref_kv_heads or hr
        dr = self.ref_head_dim or self.head_dim

        def rand(*shape, sd=1.0):
            return (torch.randn(*shape, generator=gen, dtype=torch.float64) * sd).to(device)

        def cu(lens):
            return torch.tensor([0] + [sum(lens[:n + 1]) for n in range(len(lens))], dtype=torch.int32,
                                device=device)

        kw = dict(q=rand(tq, self.heads, self.head_dim), k=rand(tk, self.kv_heads, self.head_dim),
                  v=rand(tk, self.kv_heads, self.v_head_dim) if self.v_head_dim else None,
                  q_ref=rand(tq, hr, dr, sd=1.3), k_ref=rand(tk, hrkv, dr),
                  cu_seqlens_q=cu(self.q_lens), cu_seqlens_k=cu(k_lens),
                  max_seqlen_q=max(self.q_lens), max_seqlen_k=max(k_lens))
        if self.row_mask:
            kw["row_mask"] = (torch.rand(tq, generator=gen) > 0.3).to(device)
        if self.segments:
            kw["key_segments"] = torch.randint(0, self.segments, (tk,), generator=gen).to(device)
            kw["num_segments"] = self.segments
        opts = dict(self.options)
        if self.with_ref_stats:
            ref_kw = {key: opts[key] for key in ("exclude_self", "causal") if key in opts}
            kw["ref_stats"] = ral.ops.attention_kl_varlen(
                kw["q_ref"], kw["k_ref"], q_ref=kw["q_ref"], k_ref=kw["k_ref"], scale=opts.get("ref_scale"),
                cu_seqlens_q=kw["cu_seqlens_q"], cu_seqlens_k=kw["cu_seqlens_k"], max_seqlen_q=kw["max_seqlen_q"],
                max_seqlen_k=kw["max_seqlen_k"], **ref_kw).stats.float()
        kw.update(opts)
        return kw


def packed_upstream(kw: dict, seed: int = 1):
    """Random upstream gradients (dout (Tq, H, Dv), ddiv (Tq,) or (Tq, H)) for a packed call."""
    gen = torch.Generator().manual_seed(seed)
    tq, heads = kw["q"].shape[:2]
    dout = (torch.randn(tq, heads, kw["v"].shape[-1], generator=gen, dtype=torch.float64)
            if kw.get("v") is not None else None)
    ddiv = torch.randn(*((tq, heads) if kw.get("heads", "mean") == "each" else (tq,)), generator=gen,
                       dtype=torch.float64)
    return dout, ddiv


def check_packed(problem: PackedProblem, backend: str, device="cpu", names=NAMES, factor: float = FACTOR) -> dict:
    """The accuracy rule for attention_kl_varlen on `backend` against the float64 oracle."""
    base = problem.make()
    dout, ddiv = packed_upstream(base)
    dstats = stats_upstream(base) if base.get("key_segments") is not None else None
    op = ral.ops.attention_kl_varlen
    want = run(base, "reference", dout, ddiv, op=op, dstats=dstats)
    torch_same = run(cast(base, problem.dtype), "reference", dout, ddiv, op=op, dstats=dstats)
    got = run(cast(base, problem.dtype, device), backend, dout, ddiv, op=op, dstats=dstats)
    return compare(want, torch_same, got, problem.dtype, names, factor, f"{backend} for {problem}")


def option_grid():
    """divergence x heads x exclude_self x causal: the 24 combinations of docs/design.md, "The op"."""
    for divergence in ("jsd", "kl", "reverse_kl"):
        for heads in ("mean", "each"):
            for exclude_self in (True, False):
                for causal in (True, False):
                    yield dict(divergence=divergence, heads=heads, exclude_self=exclude_self, causal=causal)


def option_id(opts: dict) -> str:
    return "-".join([opts["divergence"], opts["heads"], "xself" if opts["exclude_self"] else "self",
                     "causal" if opts["causal"] else "full"])


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)


def seq_table(rows) -> Tensor:
    """A kernel Call's sequence table: int32 (N, 8) from rows (batch, q_start, q_len, k_start, k_len, q_pos)."""
    return torch.tensor([list(r) + [0, 0] for r in rows], dtype=torch.int32).reshape(-1, 8)


def options(opts: dict, head_dim: int, ref_head_dim: int) -> Options:
    """A kernel Call's Options from an option_grid dict (default scales 1/sqrt(d) unless opts give them)."""
    return Options(divergence=opts.get("divergence", "jsd"), heads_each=opts.get("heads", "mean") == "each",
                   exclude_self=opts.get("exclude_self", True), causal=opts.get("causal", True),
                   scale=opts.get("scale") or default_scale(head_dim),
                   ref_scale=opts.get("ref_scale") or default_scale(ref_head_dim))


class SelfPeakedProblem(Problem):
    """k = q (each kv head the first query head of its group): at a large scale every row's self
    score is far above the rest, so with exclude_self the support's share Z falls below fp32's range
    in many rows and lse_P must be its own log-sum."""

    def make(self, device="cpu") -> dict:
        kw = super().make(device)
        kw["k"] = kw["q"][:, ::self.heads // self.kv_heads].clone()
        return kw


# (Sq, Sk, causal) of near one-hot rows for peaked_row_errors: one query over few keys, a causal
# square, one query over many keys
PEAKED_SHAPES = ((3, 9, False), (70, 70, True), (1, 130, False))


def peaked_row_errors(backend: str, dtype: torch.dtype, q_len: int, k_len: int, causal: bool,
                      seeds=range(4), device="cpu", others=("eager", "peer")) -> dict:
    """Errors of dq, dk, dv from out's gradient alone on near one-hot rows (B = 2, H = 4, D = Dv = 64,
    scale 2.0: scores of tens), in `dtype`, against float64 of the same rounded inputs, pooled over
    `seeds`: {who: {"dq" | "dk" | "dv": (rms, max-abs)}} for who in "backend", "fused" and `others`:

    - "backend": `backend` through ral.attention_kl (out only; the divergence gets no gradient);
    - "fused": PyTorch's fused SDPA kernel (SDPBackend.FLASH_ATTENTION) in `dtype`;
    - "eager": transformers' eager recipe (scores and a·V in `dtype`, softmax in fp32 then cast);
    - "peer": the suite's peer in `dtype` (ral.reference, which computes in fp32 whatever the dtype;
      `check` holds kernels to it).

    A near one-hot row's exact dS = a (dP - delta) cancels, and what is left carries delta's
    rounding (from out rounded to `dtype`, in the kernels as in the fused one) and, in fp32, the
    scores' own (docs/design.md, "Accuracy"). Raises RuntimeError when PyTorch has no fused kernel for
    these tensors on `device`."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=2.0, is_causal=causal)

    def eager(q, k, v):
        scores = (q @ k.transpose(-1, -2)) * 2.0
        if causal:
            scores = scores.masked_fill(torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).triu(1), -math.inf)
        return torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype) @ v

    def attention_kl(name):
        return lambda q, k, v: ral.attention_kl(q, k, v, q_ref=q.detach(), k_ref=k.detach(), scale=2.0,
                                                causal=causal, backend=name).out

    def grads(fn, q, k, v, dout):
        q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        (fn(q, k, v).double() * dout).sum().backward()
        return q.grad.double(), k.grad.double(), v.grad.double()

    providers = dict(eager=eager, peer=attention_kl("reference"))
    sums: dict = {}
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        q, k, v, dout = (torch.randn(2, 4, n, 64, generator=gen, dtype=torch.float64).to(device)
                         for n in (q_len, k_len, k_len, q_len))
        q, k, v = (t.to(dtype) for t in (q, k, v))
        with sdpa_kernel(SDPBackend.MATH):
            want = grads(sdpa, q.double(), k.double(), v.double(), dout)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            fused = grads(sdpa, q, k, v, dout)
        results = dict(backend=grads(attention_kl(backend), q, k, v, dout), fused=fused,
                       **{who: grads(providers[who], q, k, v, dout) for who in others})
        for who, got in results.items():
            for name, g, w in zip(("dq", "dk", "dv"), got, want):
                square, count, worst = sums.setdefault(who, {}).get(name, (0.0, 0, 0.0))
                err = (g - w).abs()
                sums[who][name] = (square + float(err.pow(2).sum()), count + err.numel(), max(worst, float(err.max())))
    return {who: {name: (math.sqrt(square / count), worst) for name, (square, count, worst) in cell.items()}
            for who, cell in sums.items()}


def check_peaked_rows_against_fused(backend: str, dtype: torch.dtype, shape: tuple, device="cpu",
                                    factor: float = 1.6) -> None:
    """On peaked_row_errors' near one-hot rows, dq, dk and dv from out's gradient have an rms error
    within `factor` x that of PyTorch's fused SDPA kernel in the same dtype. In fp16 / bf16 the suite's
    own peer, which computes in fp32, is 2-5x more exact than the fused kernel there, so `check` cannot
    hold a kernel to it on such rows; a delta summed in the dtype instead of fp32 gives 1.9-2.5x, and
    the cpu kernels' scores summed as one fp32 chain over D gave up to 2.1x in fp32. Skips where
    PyTorch has no fused kernel for these tensors."""
    import pytest

    try:
        errors = peaked_row_errors(backend, dtype, *shape, device=device, others=())
    except RuntimeError as err:
        if "No available kernel" not in str(err):
            raise
        pytest.skip(f"PyTorch has no fused SDPA kernel for {dtype} on {device}")
    for name in ("dq", "dk", "dv"):
        rms, fused = errors["backend"][name][0], errors["fused"][name][0]
        assert rms <= factor * fused, (f"{name}: rms error {rms:.3g} > {factor} x PyTorch's fused kernel's "
                                       f"{fused:.3g} ({backend}, {dtype}, (Sq, Sk, causal) = {shape})")


def check_peaky_self_attention(backend: str, divergence: str, heads: str, q_len: int, device="cpu") -> None:
    """The self score beats every other key by far more than 87 nats in many rows (scale 8, fp16
    inputs): lse_P exact and finite (never 1 - a_self, never underflowed through lse_A's max), div
    finite, and the accuracy rule on every output and gradient (`backend` on `device`)."""
    opts = dict(divergence=divergence, heads=heads, exclude_self=True, causal=True, scale=8.0)
    problem = SelfPeakedProblem(batch=1, heads=2, kv_heads=2, q_len=q_len, k_len=q_len, head_dim=64,
                                v_head_dim=64, dtype=torch.float16, options=opts)
    kw = cast(problem.make(), torch.float16, device)
    res = ral.attention_kl(backend=backend, **kw)
    want = ral.attention_kl(backend="reference", **cast(kw, torch.float64))
    gap = (want.stats[..., 0] - want.stats[..., 1])[:, :, 1:]
    assert float(gap.max()) > 100.0, "the problem is not peaky enough to test the lse_P underflow"
    assert torch.isfinite(res.stats[..., 1][:, :, 1:]).all() and torch.isfinite(res.div[..., 1:]).all()
    torch.testing.assert_close(res.stats.double().cpu(), want.stats.cpu(), rtol=1e-4, atol=1e-3)
    check(problem, backend, device)


class NearReferenceProblem(Problem):
    """The policy a step away from the reference, as at the start of RL training: q_ref = q + eps * noise,
    k_ref = k, so that t = log pi - log rho is of order eps at every key and jsd of order eps^2."""

    eps: float = 1e-3

    def make(self, device="cpu") -> dict:
        kw = super().make(device)
        gen = torch.Generator().manual_seed(self.seed + 1)
        kw["q_ref"] = kw["q"] + self.eps * torch.randn(kw["q"].shape, generator=gen, dtype=torch.float64).to(device)
        kw["k_ref"] = kw["k"].clone()
        return kw


def check_near_reference(backend: str, heads: str, dtype=torch.float32, device="cpu", q_len: int = 70) -> None:
    """jsd where policy and reference nearly agree (docs/design.md, "The math"): div is second order in t,
    and a kernel that rounds log((pi + rho) / 2) to first order (as PyTorch's fp32 does, error ~5e-8 per
    row against a div of ~1e-7 here) misses it; the kernels' div must be within 2e-3 of max |div|.
    Then the accuracy rule on every output and gradient."""
    problem = NearReferenceProblem(batch=1, heads=4, kv_heads=2, q_len=q_len, k_len=q_len, head_dim=64, v_head_dim=64,
                                   dtype=dtype, options=dict(divergence="jsd", heads=heads, exclude_self=False,
                                                             causal=True))
    kw = cast(problem.make(), dtype, device)
    got = ral.attention_kl(backend=backend, **kw).div.double().cpu()
    want = ral.attention_kl(backend="reference", **cast(kw, torch.float64)).div.cpu()
    assert float(want.abs().max()) < 1e-5, "the problem is not near enough to the reference"
    err = float((got - want).abs().max())
    assert err <= 2e-3 * float(want.abs().max()), f"div error {err:.3e} against max |div| {float(want.abs().max()):.3e}"
    check(problem, backend, device)


def far_from_reference_problem(heads: str, exclude_self: bool, q_len: int, seed: int,
                               dtype=torch.float32) -> Problem:
    """kl, causal, a policy peaked by scale 2.0 on D = 16 (scores of tens) against a reference at the
    default scale: kl of a few to tens per row. B = 1, H = 4 on 2 kv heads, no v, Sk = Sq."""
    return Problem(dtype=dtype, batch=1, heads=4, kv_heads=2, head_dim=16, v_head_dim=None, q_len=q_len,
                   k_len=q_len, seed=seed, options=dict(divergence="kl", heads=heads, exclude_self=exclude_self,
                                                        causal=True, scale=2.0))


def check_far_from_reference(backend: str, heads: str, exclude_self: bool, dtype=torch.float32, device="cpu",
                             q_len: int = 80, factor: float = FACTOR) -> None:
    """kl between a policy peaked by a large scale (2.0 on D = 16: scores of tens) and a reference at
    the default scale: kl of tens per row, gbar = kl + 1 as large. The backward's
    sum_P pi_j (g_j - gbar) is 0 only if gbar is the pi-weighted mean of g under the very pi the
    kernels form, whose sum misses 1 by the rounding of lse (a few 1e-6 at |lse| ~ 50); a gbar of
    sum_P pi g alone puts that error, times gbar, into every dS (benchmarks/RESULTS.md, 2026-12-07),
    and the accuracy rule's floor hides it. So dq and dk must be within `factor` x PyTorch's error
    with no floor; then the accuracy rule on everything."""
    for seed in (0, 1):
        problem = far_from_reference_problem(heads, exclude_self, q_len, seed, dtype)
        errors = check(problem, backend, device)
        for name in ("dq", "dk"):
            err, err_torch, _ = errors[name]
            assert err <= factor * err_torch, (f"{name}: error {err:.3g} > {factor} x PyTorch's {err_torch:.3g} "
                                               f"({backend} for {problem})")


def check_out_weights_sum_to_one(backend: str, exclude_self: bool, device="cpu") -> None:
    """With v = 1 every attended row's out is sum_A a = 1: the output's weights must sum to 1 within
    1e-6 even where scores are large (scale 2.0 on D = 64: |lse| ~ 100, whose fp32 ulp is 8e-6), since
    the backward's delta = rowsum(dout * out) enters dS = a (dP - delta) of a peaked row times a weight
    near 1. Weighing the support by exp(lse_P - lse_A) / l misses by 2e-6 here (PyTorch's own fp32
    softmax by 2.1e-6; benchmarks/RESULTS.md, 2026-12-07)."""
    for seed in range(3):
        kw = cast(Problem(batch=1, heads=4, kv_heads=2, q_len=100, k_len=100, head_dim=64, v_head_dim=8, seed=seed,
                          options=dict(exclude_self=exclude_self, causal=True, scale=2.0)).make(), torch.float32, device)
        kw["v"] = torch.ones_like(kw["v"])
        out = ral.attention_kl(backend=backend, **kw).out.double()
        err = float((out - 1).abs().max())
        assert err <= 1e-6, f"max |out - 1| = {err:.3g} with v = 1 ({backend}, exclude_self={exclude_self}, seed {seed})"


def check_nan_stays_in_its_row(backend: str, heads: str, dtype=torch.float32, device="cpu", q_len: int = 50,
                               head_dim: int = 16, tol: float = 1e-5) -> None:
    """docs/design.md, "Bad input": a NaN in one query row of one head gives NaN in that row's out, stats, div
    and dq, and nowhere else (batch element 0 never sees it, gradients included)."""
    problem = Problem(batch=2, heads=4, kv_heads=2, q_len=q_len, k_len=q_len, head_dim=head_dim,
                      v_head_dim=head_dim, options=dict(heads=heads, causal=True))
    kw = cast(problem.make(), dtype, device)
    dout, ddiv = upstream(kw)
    clean = run(kw, backend, dout, ddiv)
    row = q_len // 2
    kw["q"] = kw["q"].clone()
    kw["q"][1, 2, row] = float("nan")
    got = run(kw, backend, dout, ddiv)
    assert torch.isnan(got["stats"][1, 2, row]).all() and torch.isnan(got["out"][1, 2, row]).all()
    assert torch.isnan(got["div"][(1, 2, row) if heads == "each" else (1, row)]).all()
    for name in ("out", "stats", "div", "dq"):
        t, ref = got[name].clone(), clean[name].clone()
        if name == "div":
            touched = (1, 2, row) if heads == "each" else (1, row)
        elif name in ("out", "stats") or heads == "each":
            touched = (1, 2, row)
        else:  # "mean": the row's heads are coupled, so every head's dq of that row may be NaN
            touched = (1, slice(None), row)
        t[touched], ref[touched] = 0, 0
        assert not torch.isnan(t).any(), f"{name}: NaN outside the touched row"
        torch.testing.assert_close(t, ref, rtol=tol, atol=tol, msg=name)
    for name in ("dk", "dv"):
        torch.testing.assert_close(got[name][0], clean[name][0], rtol=tol, atol=tol)


def reverse_kl_full(h_student: Tensor, w_student: Tensor, h_teacher: Tensor, w_teacher: Tensor, *,
                    b_student: Optional[Tensor] = None, b_teacher: Optional[Tensor] = None,
                    temperature: float = 1.0) -> Tensor:
    """The same as :func:`chunked_reverse_kl`, materialised (N x V) under plain autograd: the oracle."""
    lps = torch.log_softmax(logits(h_student, w_student, b_student, temperature), -1)
    with torch.no_grad():
        lpt = torch.log_softmax(logits(h_teacher.to(w_teacher.dtype), w_teacher, b_teacher, temperature), -1)
    return (lps.exp() * (lps - lpt)).sum(-1)


def attention_distill_div(q: Tensor, k: Tensor, v: Optional[Tensor] = None, *, q_teacher: Tensor,
                          k_teacher: Tensor, teacher_stats: Optional[Tensor] = None,
                          key_padding_mask: Optional[Tensor] = None, row_mask: Optional[Tensor] = None,
                          backend: str = "auto"):
    """JSD(student attention || teacher attention) per row: ``ral.ops.attention_kl`` with the teacher
    as the reference, heads="mean" (teacher and student head counts / dims may differ), self dropped.

    Returns the op's AttentionKL(out, div (B, Sq), stats).
    """
    return ral.ops.attention_kl(q, k, v, q_ref=q_teacher, k_ref=k_teacher, ref_stats=teacher_stats,
                        divergence="jsd", heads="mean", exclude_self=True, causal=True,
                        key_padding_mask=key_padding_mask, row_mask=row_mask, backend=backend)


def assert_compiled_matches_eager(loss_fn, inputs) -> None:
    """torch.compile(fullgraph=True) of `loss_fn(*inputs)` gives the eager loss and input gradients."""
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager)
