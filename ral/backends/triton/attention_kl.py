"""backend="triton": fused attention + attention-divergence kernels in Triton (SPEC sections 2-4).

Implements the backend interface of ``ral.backends`` (``unavailable_reason``, ``unsupported_reason``,
``forward``, ``backward``); kernels and their launchers sit side by side below.

Forward, one launch, a 1-D grid of cdiv(Sq, BLOCK_M) x B programs for heads="mean" | x B*H for "each"
(axis 0 because axis 1 stops at 65535). Program ids run over the query blocks slowest and in
descending order, (batch, head) fastest: pid 0 takes the LAST query block, which under causal
masking sweeps the most keys, so the heaviest programs start first (see Occupancy below).
A program owns BLOCK_M query rows of one batch and every head of the row ("mean": the policy
couples all heads) or one head ("each": head h of both models).
heads="each" with kl / reverse_kl: ONE key sweep (``_each_one_sweep``). Per key tile: s = q k^T and
  s_ref = q_ref k_ref^T; online softmax of s over A (-> lse_A, `out`) and over P (-> lse_P, its own
  running max, so Z never comes from 1 - a_self), of s_ref over A and P (-> ref_stats_out; with
  ref_stats given, lse_RP is read and serves as the reference's fixed shift), and the divergence sum
  carried by online rescaling, weighted by the distribution the divergence averages over:
    kl:         T = sum_P e^(s-m) [(s-m) - (s_ref-m_r)]          div = T/l - log l + log l_r
    reverse_kl: T = sum_P e^(s_ref-m_r) [(s_ref-m_r) - (s-m)]    div = T/l_r - log l_r + log l
  (m, l / m_r, l_r: running max and sum over P of the model / the reference; with ref_stats,
  m_r = lse_RP and l_r = sum_P rho, and the log l_r of kl is 0.) Every term is relative to the
  running maxes, so no difference of two large log-normalisers appears; when a max moves, T gets
  alpha (T + l_old (shift change)). gbar = div + 1 (kl: sum_P pi (log pi/rho + 1)), gbar = -sum_P rho
  (reverse_kl: -1 on a non-empty row), cbar = 0.
jsd (either heads mode) and heads="mean" (any divergence): two sweeps inside the launch, because the
  divergence of a key needs the row's normalisers (jsd: log((pi + rho)/2); "mean": log sum_h Z_h).
  pass 1, per head, one key sweep: online softmax in log2 units -> lse_A, lse_P (over the support,
          with its own running max, so it never comes from 1 - a_self) and `out`; the same for the
          reference heads unless ref_stats is given. Statistics are written to `stats` /
          `ref_stats_out` and read back after a barrier (no register file of H rows needed).
  pass 2, one key sweep: per key tile, log pi = logsumexp_h(s_h - lse_A_h) - log sum_h Z_h (an
          online logsumexp over the heads, one exp2 per element and head) and log rho likewise;
          f and g of the divergence -> div, gbar; then ("mean") a second loop over the heads
          recomputes a_h and accumulates u_h = sum_P a_h g in a (BLOCK_M, H_PAD) register tile,
          giving cbar_h = (u_h - gbar Z_h) / Z at the end.
Row rules (both paths): rows with row_mask False or an empty support get div = gbar = cbar = 0 (a
block without live rows skips pass 2); a NaN input gives NaN statistics and div in the rows it
touches (an empty set is l == 0, not "l > 0 fails").
Backward (FlashAttention-2 style: recompute from the LSE; Delta comes from ral.ops), one launch,
1-D grid of cdiv(Sk, BLOCK_N) x B x Q_SPLITS programs for "mean" | x B*Hkv x Q_SPLITS for "each".
A program owns BLOCK_N keys of one batch and all kv heads ("mean") or one kv head ("each"), and
sweeps one of Q_SPLITS contiguous chunks of the query blocks that see them: per query block
("mean") it first rebuilds log pi, log rho and g on the tile from all H + Hr heads (skipped when no
row of the block has w != 0), then per kv head and query head recomputes a = exp2(s - lse_A),
dP = dO V^T, dS = a (dP - delta) + [k in P] w T and accumulates dV += a^T dO, dK += dS^T Q, and
dQ += dS K with fp32 atomics. dK / dV go to the zero-filled fp32 buffers: summed in registers
over the chunk and stored once when Q_SPLITS == 1, added with fp32 atomics when Q_SPLITS > 1
("each", and "mean" with Hkv == 1); "mean" with Hkv > 1 cannot hold Hkv accumulators in registers
and adds each query block's part with fp32 atomics (before the splits this was a load + store per
query block, program-exclusive; atomics need no load or barrier, and ptxas spills nothing where the
load / store version spilled 16-20 B on sm_80 at bf16, head dim 128, first config). Program ids run over the key blocks slowest and
ascending, then (batch, kv head), then the split: key block j is seen by the query blocks from about
j on, so under causal masking the heaviest programs start first.
Q_SPLITS (``_q_splits``, the one place it is chosen; the kernel reads it back from the grid size):
RAL_TRITON_Q_SPLITS=n forces n (tests, A/B timings); else on CUDA the fewest splits that make the
grid _BWD_MIN_WAVES = 3 waves of the device's SMs (torch's multi_processor_count), 1 on CPU; never
more than the query blocks. Each autotune config gets its own count (the grid depends on its
BLOCK_N / BLOCK_M). The chunks of a key block hold equal COUNTS of query blocks (differing
by at most one): every query block costs a key block the same (all heads, the same tile matmuls;
masking saves no matmul), so equal counts are equal work; the imbalance between key blocks is left
to the heavy-first order, whose many small last programs fill the gaps (a fixed chunk length for
all key blocks balanced worse in the model below: 0.72-0.88 vs 0.89-0.98 at S = 4096).

Occupancy (a model, not a measurement: no GPU has run these kernels). ptxas gives the backward
170-255 registers x 256 threads (one program per SM at a time) and the forward 175-255 (likewise).
Model: programs dispatched in id order to the first free SM (what CUDA's block scheduler does in
practice; not a documented guarantee), every (query block, key block) tile of
a program the same cost; efficiency = total work / (SMs x makespan). Target shape B = 1, H = 28,
Hkv = 4, D = 128, causal, 132 SMs (H100 / H200), backward tiles 16 x 32, forward 32 x 64:
  backward "mean" S = 4096:  before 128 programs (< 1 wave, 256 : 1 work spread): 0.49;
                             now Q_SPLITS = 4, 512 programs: 0.98 -> predicted ~2x faster backward
  backward "mean" S = 16384: 512 programs, Q_SPLITS = 1 (already >= 3 waves): 0.99 before and now
  backward "each" (B*Hkv = 4): S = 4096 512 programs, Q_SPLITS = 1: 0.98 -> 0.99 (order only)
  forward "mean" S = 4096:   128 programs (< 1 wave): 0.49 before and now; the order cannot help a
                             grid smaller than the GPU: that needs a split of the key sweep (its
                             online-softmax and divergence partial sums combined), not done here
  forward "mean" S = 16384:  512 programs: 0.79 (light first) -> 0.99 (heavy first)
  forward "each": 3584 / 14336 programs: 0.96 / 0.99 -> 1.00
The split's price: per split program and kv head one BLOCK_N x (D + Dv) fp32 atomic add (v4 on
sm_90) instead of a store, small next to the dQ atomics every query block already makes
(H x BLOCK_M x D per tile); the model leaves memory traffic and atomic throughput out.

Cost, counted in (BLOCK_M x BLOCK_N x head dim) tile matmuls per head and key tile, with H = Hr and
v given (without v drop the P V and dP, dV terms; causal halves every path alike). SDPA flash:
forward 2 (QK^T, PV) + backward 5 (QK^T, dO V^T, dV, dK, dQ) = 7.
  path                              forward                     backward                      total  / SDPA
  "each" kl / reverse_kl (1 sweep)  3: QK, PV, QrKr             6: QK, QrKr, dOV, dV, dK, dQ  9      1.29x
  "each" jsd                        5: QK, PV, QrKr | QK, QrKr  6                             11     1.57x
    with ref_stats                  4                           6                             10     1.43x
  "mean", any divergence            6: pass 1 QK, PV, QrKr |    7: per query block QK, QrKr   13     1.86x
                                       pass 2 QK, QrKr, QK (u_h)   (div tile) + QK, dOV, dV,
                                                                   dK, dQ
    with ref_stats                  5                           7                             12     1.71x
(before the single sweep, "each" kl / reverse_kl took the jsd path: 11, 1.57x.) These are counts, not
GPU timings; the exp2s (one per element and online softmax: up to 4 per element in the single sweep,
A and P of both models, with exclude_self and no ref_stats) are extra cost that the count leaves out.

Memory: no Sq x Sk buffer. Beyond inputs and outputs: the fp32 gradient buffers dq (B,H,Sq,D),
dk (B,Hkv,Sk,D), dv (B,Hkv,Sk,Dv) (zero-filled, summed into by atomics as above, cast to the
input dtypes at the end; the autotuner's reset_to_zero re-zeroes all three between benchmark
runs). No other scratch: the query splits add programs, not memory.

Interpreter: triton decides at *decoration* time whether ``@triton.jit`` builds a compiled or an
interpreted function (``TRITON_INTERPRET``, read through ``triton.knobs.runtime.interpret``), and
``import triton`` already decorated triton.language.standard (tl.sum, tl.max, tl.zeros, ...). So
(1) the kernels call only triton builtins (tl.reduce with combine functions chosen per mode, tl.full)
and this module's own jit functions; (2) this module records the mode it was built in, and when a
launch happens under the other mode the launchers use a private copy of this module executed under
the current mode (``_kernels()``). The backend is then right whether TRITON_INTERPRET was set before
or after triton or this module was first imported (one pytest process can run interpreted CPU tests
and compiled CUDA tests). Under the interpreter one small fixed config runs (no autotuning), and bf16
operands are upcast to fp32 before ``tl.dot`` (triton 3.9's interpreter computes bf16 dots wrongly,
SPEC section 5).

GPU configs: autotuned over a few (BLOCK_M, BLOCK_N, warps, stages) per head-dim class (_FWD_TABLE,
_BWD_TABLE), all checked to compile and fit sm_80 / sm_90a shared memory without a GPU by
tests/test_triton_compile.py; RAL_TRITON_AUTOTUNE=0 takes the first of the class (the one with
the fewest register spills), with no benchmarking. ``forward_launch`` / ``backward_launch`` build
a launch without running it (that test compiles exactly those arguments).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Callable, NamedTuple, Optional

import torch

try:
    import triton
    import triton.language as tl
    _IMPORT_ERROR: Optional[str] = None
except Exception as err:  # pragma: no cover - exercised only where triton is missing
    _IMPORT_ERROR = f"triton is not importable ({type(err).__name__}: {err})"

    class _Stub:
        """Just enough of triton / triton.language for this module's definitions to import."""

        constexpr = staticmethod(lambda x=None: x)

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _Stub()

from ral.backends.call import Call

MAX_HEAD_DIM = 256
_DIVERGENCE_CODES = {"jsd": 0, "kl": 1, "reverse_kl": 2}

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
NEG_INF = tl.constexpr(float("-inf"))


def _interpreting() -> bool:
    """Whether a @triton.jit decorated now would give an interpreted kernel."""
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older triton: the environment variable
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_BUILT_INTERPRETED = _IMPORT_ERROR is None and _interpreting()


def _import_code_generator() -> None:
    """triton 3.9 imports triton.compiler.code_generator (and gluon) at the first compile, and that
    import asserts that triton.language.standard was built compiled unless the interpreter is on.
    When `import triton` ran under TRITON_INTERPRET=1, import it now with the interpreter on, so
    that compiled kernels still work in this process once TRITON_INTERPRET is unset."""
    std = getattr(tl, "standard", None)
    if std is None or "triton.compiler.code_generator" in sys.modules:
        return
    from triton.runtime.jit import JITFunction
    if isinstance(std.cdiv, JITFunction):
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        importlib.import_module("triton.compiler.code_generator")
    except Exception:  # pragma: no cover - best effort
        pass
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


if _IMPORT_ERROR is None:
    _import_code_generator()


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _add_combine(a, b):
    return a + b


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


if _BUILT_INTERPRETED:
    # The interpreter reduces with numpy when it recognises triton's own combine functions
    # (they are never called, so it does not matter in which mode `import triton` built them).
    _SUM_COMBINE = tl.standard._sum_combine
    _MAX_COMBINE = tl.standard._elementwise_max
else:
    # Compiled: our own combine functions, built in this mode even if triton.language.standard's
    # were built for the interpreter (TRITON_INTERPRET set when triton was imported).
    _SUM_COMBINE = _add_combine
    _MAX_COMBINE = _max_combine


@triton.jit
def _rsum(x, axis: tl.constexpr):
    """tl.sum(x, axis) through the core builtin tl.reduce: the kernels call no jit function of
    triton.language.standard (tl.sum, tl.max, tl.zeros), which triton builds for one interpret
    mode at import time; see _kernels()."""
    return tl.reduce(x, axis, _SUM_COMBINE)


@triton.jit
def _rmax(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _MAX_COMBINE)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """a @ b with fp32 accumulation; UPCAST (interpreter + bf16 only) computes in fp32."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _load_tile(base, offs_r, offs_c, stride_r, stride_c, n_r, n_c):
    """(len(offs_r), len(offs_c)) tile of a strided 2-D view, zero outside (n_r, n_c); int64 offsets."""
    ptrs = base + offs_r[:, None].to(tl.int64) * stride_r + offs_c[None, :].to(tl.int64) * stride_c
    return tl.load(ptrs, mask=(offs_r[:, None] < n_r) & (offs_c[None, :] < n_c), other=0.0)


@triton.jit
def _load_row(base, offs, stride, n, other):
    """(len(offs),) fp32 vector of a strided 1-D view, `other` outside n."""
    return tl.load(base + offs.to(tl.int64) * stride, mask=offs < n, other=other).to(tl.float32)


@triton.jit
def _finite(x):
    """-inf (an empty set's LSE) -> 0, so that s - lse stays finite."""
    return tl.where(x == NEG_INF, 0.0, x)


@triton.jit
def _nonzero(l):
    """A softmax sum with 0 (an empty set) -> 1, so it can divide or go into log2; NaN passes."""
    return tl.where(l == 0.0, 1.0, l)


@triton.jit
def _lse2(m, l):
    """log2 sum from a running max and sum: -inf for an empty set (l == 0), NaN for NaN (a NaN input
    must not turn its row into an empty one)."""
    return tl.where(l == 0.0, NEG_INF, m + tl.log2(_nonzero(l)))


@triton.jit
def _key_ok(KPM_b, stride_kpn, offs_n, Sk, HAS_KPM: tl.constexpr):
    """(BLOCK_N,) bool: real keys (inside Sk and key_padding_mask True)."""
    ok = offs_n < Sk
    if HAS_KPM:
        ok = ok & (tl.load(KPM_b + offs_n.to(tl.int64) * stride_kpn, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _key_sets(offs_m, offs_n, key_ok, Sq, Sk, CAUSAL: tl.constexpr, EXCLUDE_SELF: tl.constexpr):
    """Attended keys A and policy support P on a (BLOCK_M, BLOCK_N) tile; row i sits at Sk - Sq + i."""
    pos = offs_m + (Sk - Sq)
    att = (offs_m[:, None] < Sq) & key_ok[None, :]
    if CAUSAL:
        att = att & (offs_n[None, :] <= pos[:, None])
    sup = att
    if EXCLUDE_SELF:
        sup = att & (offs_n[None, :] != pos[:, None])
    return att, sup


@triton.jit
def _scores(Qh, Kh, sqm, sqd, skn, skd, offs_m, offs_n, Sq, Sk, D, scale2,
            D_PAD: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """(BLOCK_M, BLOCK_N) scores of one head in log2 units: scale * log2(e) * q k^T."""
    offs_d = tl.arange(0, D_PAD)
    q = _load_tile(Qh, offs_m, offs_d, sqm, sqd, Sq, D)
    k = _load_tile(Kh, offs_n, offs_d, skn, skd, Sk, D)
    return _dot(q, tl.trans(k), UPCAST, PREC) * scale2


@triton.jit
def _head_softmax(Qh, Kh, Vh, Oh, sqm, sqd, skn, skd, svn, svd, som, sod, KPM_b, skpn,
                  offs_m, Sq, Sk, D, DV, scale2, n_end,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                  DV_PAD: tl.constexpr, HAS_V: tl.constexpr, HAS_KPM: tl.constexpr,
                  CAUSAL: tl.constexpr, EXCLUDE_SELF: tl.constexpr, UPCAST: tl.constexpr,
                  PREC: tl.constexpr):
    """Pass 1 for one head: one sweep over keys [0, n_end). Returns (lse_A, lse_P), (BLOCK_M,) each
    in log2 units (-inf for an empty set), and writes out = softmax_A(s) v (0 for an empty A)."""
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = _load_tile(Qh, offs_m, offs_d, sqm, sqd, Sq, D)
    m_a = tl.full([BLOCK_M], NEG_INF, tl.float32)
    l_a = tl.full([BLOCK_M], 0.0, tl.float32)
    m_p = tl.full([BLOCK_M], NEG_INF, tl.float32)
    l_p = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, DV_PAD], 0.0, tl.float32)
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(Kh, offs_n, offs_d, skn, skd, Sk, D)
        s = _dot(q, tl.trans(k), UPCAST, PREC) * scale2
        att, sup = _key_sets(offs_m, offs_n, _key_ok(KPM_b, skpn, offs_n, Sk, HAS_KPM), Sq, Sk,
                             CAUSAL, EXCLUDE_SELF)
        s_a = tl.where(att, s, NEG_INF)
        m_new = tl.maximum(m_a, _rmax(s_a, 1))
        m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
        alpha = tl.exp2(m_a - m_use)
        p = tl.exp2(s_a - m_use[:, None])
        l_a = l_a * alpha + _rsum(p, 1)
        if HAS_V:
            v = _load_tile(Vh, offs_n, offs_dv, svn, svd, Sk, DV)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, PREC)
        m_a = m_new
        if EXCLUDE_SELF:
            s_p = tl.where(sup, s, NEG_INF)
            mp_new = tl.maximum(m_p, _rmax(s_p, 1))
            mp_use = tl.where(mp_new == NEG_INF, 0.0, mp_new)
            l_p = l_p * tl.exp2(m_p - mp_use) + _rsum(tl.exp2(s_p - mp_use[:, None]), 1)
            m_p = mp_new
    lse_a = _lse2(m_a, l_a)
    if EXCLUDE_SELF:
        lse_p = _lse2(m_p, l_p)
    else:
        lse_p = lse_a
    if HAS_V:
        o = acc / _nonzero(l_a)[:, None]
        ptrs = Oh + offs_m[:, None].to(tl.int64) * som + offs_dv[None, :].to(tl.int64) * sod
        tl.store(ptrs, o.to(Oh.dtype.element_ty), mask=(offs_m[:, None] < Sq) & (offs_dv[None, :] < DV))
    return lse_a, lse_p


@triton.jit
def _log_zsum(Sb, ssh, ssm, ssc, h0, NH, offs_m, Sq, BLOCK_M: tl.constexpr):
    """log2 sum_h Z_h over heads h0 .. h0+NH-1, Z_h = exp(lse_P - lse_A) read from the (natural-log)
    statistics at Sb; (BLOCK_M,), -inf where the support is empty."""
    mx = tl.full([BLOCK_M], NEG_INF, tl.float32)
    sm = tl.full([BLOCK_M], 0.0, tl.float32)
    for hh in range(NH):
        h = h0 + hh
        la = _load_row(Sb + h * ssh, offs_m, ssm, Sq, 0.0) * LOG2E
        lp = _load_row(Sb + h * ssh + ssc, offs_m, ssm, Sq, NEG_INF) * LOG2E
        x = tl.where(lp == NEG_INF, NEG_INF, lp - la)
        m_new = tl.maximum(mx, x)
        m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
        sm = sm * tl.exp2(mx - m_use) + tl.exp2(x - m_use)
        mx = m_new
    return _lse2(mx, sm)


@triton.jit
def _log_policy(Qb, Kb, Sb, sqh, sqm, sqd, skh, skn, skd, ssh, ssm, ssc, h0, NH, G,
                offs_m, offs_n, Sq, Sk, D, scale2, log_z,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                HEADS_EACH: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """log2 of the policy on a (BLOCK_M, BLOCK_N) tile (meaningful on P only).
    "each" (head h0): s - lse_P. "mean" (heads h0..h0+NH-1, kv head h // G):
    logsumexp_h(s_h - lse_A_h) - log_z, with log_z = log2 sum_h Z_h (the 1/H cancels)."""
    if HEADS_EACH:
        s = _scores(Qb + h0 * sqh, Kb + (h0 // G) * skh, sqm, sqd, skn, skd, offs_m, offs_n,
                    Sq, Sk, D, scale2, D_PAD, UPCAST, PREC)
        lp = _load_row(Sb + h0 * ssh + ssc, offs_m, ssm, Sq, 0.0) * LOG2E
        res = s - _finite(lp)[:, None]
    else:
        mx = tl.full([BLOCK_M, BLOCK_N], NEG_INF, tl.float32)
        sm = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        for hh in range(NH):
            h = h0 + hh
            s = _scores(Qb + h * sqh, Kb + (h // G) * skh, sqm, sqd, skn, skd, offs_m, offs_n,
                        Sq, Sk, D, scale2, D_PAD, UPCAST, PREC)
            la = _load_row(Sb + h * ssh, offs_m, ssm, Sq, 0.0) * LOG2E
            x = s - _finite(la)[:, None]
            # online logsumexp with one exp2: the larger of (running max, x) costs nothing
            d = x - mx
            e = tl.exp2(-tl.abs(d))
            sm = tl.where(d > 0, sm * e + 1.0, sm + e)
            mx = tl.maximum(mx, x)
        res = mx + tl.log2(sm) - log_z[:, None]
    return res


@triton.jit
def _div_terms(lpi2, lrho2, DIVERGENCE: tl.constexpr):
    """Elementwise f(pi, rho), g = df/dpi and pi*g (natural log) from log2 pi and log2 rho."""
    pi = tl.exp2(lpi2)
    rho = tl.exp2(lrho2)
    if DIVERGENCE == 0:  # jsd: m = (pi + rho) / 2
        lm2 = tl.maximum(lpi2, lrho2) + tl.log2(1.0 + tl.exp2(-tl.abs(lpi2 - lrho2))) - 1.0
        dp = (lpi2 - lm2) * LN2
        dr = (lrho2 - lm2) * LN2
        f = 0.5 * (pi * dp + rho * dr)
        g = 0.5 * dp
        pig = pi * g
    elif DIVERGENCE == 1:  # kl(pi || rho)
        d = (lpi2 - lrho2) * LN2
        f = pi * d
        g = d + 1.0
        pig = pi * g
    else:  # reverse kl: kl(rho || pi)
        d = (lrho2 - lpi2) * LN2
        f = rho * d
        g = -tl.exp2(lrho2 - lpi2)
        pig = -rho
    return f, g, pig


@triton.jit
def _times_g(lc2, g, lpi2, lrho2, DIVERGENCE: tl.constexpr):
    """c * g for c = exp2(lc2) <= pi (up to the head count); for reverse_kl in log space,
    -exp2(lc2 + lrho2 - lpi2), so that a tiny pi never makes inf * 0."""
    if DIVERGENCE == 2:
        res = -tl.exp2(lc2 + lrho2 - lpi2)
    else:
        res = tl.exp2(lc2) * g
    return res


# ----------------------------------------------------------------------------------------------
# Forward, heads="each" with kl / reverse_kl: one key sweep
# ----------------------------------------------------------------------------------------------

@triton.jit
def _online(m, l, x):
    """One tile of an online softmax in log2 units; x (BLOCK_M, BLOCK_N) is -inf off the set.
    -> (m_new, l_new, alpha, e, shift): shift = m_new, or 0 while the set is still empty;
    e = exp2(x - shift) and alpha = exp2(m - shift) rescales the sums carried so far."""
    m_new = tl.maximum(m, _rmax(x, 1))
    shift = tl.where(m_new == NEG_INF, 0.0, m_new)
    alpha = tl.exp2(m - shift)
    e = tl.exp2(x - shift[:, None])
    return m_new, l * alpha + _rsum(e, 1), alpha, e, shift


@triton.jit
def _each_one_sweep(Qh, Kh, Vh, Oh, QRh, KRh, Sh, RSh, KPMb, RMb,
                    sqm, sqd, skn, skd, svn, svd, srqm, srqd, srkn, srkd, som, sod,
                    ssm, ssc, srsm, srsc, skpn, srmm, offs_m, Sq, Sk, D, DV, DR,
                    scale2, ref_scale2, n_end,
                    DIVERGENCE: tl.constexpr, EXCLUDE_SELF: tl.constexpr, CAUSAL: tl.constexpr,
                    HAS_V: tl.constexpr, HAS_REF_STATS: tl.constexpr, HAS_KPM: tl.constexpr,
                    HAS_RM: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                    DR_PAD: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """heads="each", kl / reverse_kl: everything in one key sweep of head h (pointers at the head).
    Online softmax of s over A (-> lse_A, out) and over P (-> lse_P), of s_ref over A and P (unless
    ref_stats gives lse_RP; then its shift is that constant), and the divergence sum carried with
    the weights of the distribution that weighs it, in shifted log space (log2 units):
      kl:         T = sum_P e^(s - m) [(s - m) - (s_ref - m_r)],   weights pi:  div = T / l - log l + log l_r
      reverse_kl: T = sum_P e^(s_ref - m_r) [(s_ref - m_r) - (s - m)], weights rho:
                  div = T / l_r - log l_r + log l   (with ref_stats: m_r = lse_RP, l_r = sum rho ~ 1)
    m, l / m_r, l_r: the running max and sum over P of the current model / reference; every term is
    relative to the running maxes (never s - lse of two large numbers), and when a max moves the
    carried T gets alpha * l_old * (shift change) besides the rescale alpha. gbar = div + 1 (kl),
    -sum_P rho (reverse_kl: -1 on non-empty rows); cbar = 0. Returns (div, gbar, live) in natural log,
    0 on rows that are not live (row_mask False or an empty P)."""
    offs_d = tl.arange(0, D_PAD)
    offs_dr = tl.arange(0, DR_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    row_ok = offs_m < Sq
    q = _load_tile(Qh, offs_m, offs_d, sqm, sqd, Sq, D)
    qr = _load_tile(QRh, offs_m, offs_dr, srqm, srqd, Sq, DR)
    zero = tl.full([BLOCK_M], 0.0, tl.float32)
    ninf = tl.full([BLOCK_M], NEG_INF, tl.float32)
    m_a = ninf
    l_a = zero
    m_p = ninf
    l_p = zero
    m_ra = ninf
    l_ra = zero
    l_r = zero
    t = zero
    acc = tl.full([BLOCK_M, DV_PAD], 0.0, tl.float32)
    if HAS_REF_STATS:
        # the given normaliser is the reference's fixed shift: e^(s_ref - m_r) = rho exactly
        m_r = _finite(_load_row(RSh + srsc, offs_m, srsm, Sq, NEG_INF) * LOG2E)
    else:
        m_r = ninf
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        att, sup = _key_sets(offs_m, offs_n, _key_ok(KPMb, skpn, offs_n, Sk, HAS_KPM), Sq, Sk,
                             CAUSAL, EXCLUDE_SELF)
        k = _load_tile(Kh, offs_n, offs_d, skn, skd, Sk, D)
        s = _dot(q, tl.trans(k), UPCAST, PREC) * scale2
        kr = _load_tile(KRh, offs_n, offs_dr, srkn, srkd, Sk, DR)
        sr = _dot(qr, tl.trans(kr), UPCAST, PREC) * ref_scale2
        # current model over A (and out)
        p_old = _finite(m_p)
        lp_old = l_p
        m_a, l_a, alpha_a, e_a, sh_a = _online(m_a, l_a, tl.where(att, s, NEG_INF))
        if HAS_V:
            v = _load_tile(Vh, offs_n, offs_dv, svn, svd, Sk, DV)
            acc = acc * alpha_a[:, None] + _dot(e_a.to(v.dtype), v, UPCAST, PREC)
        # current model over P
        if EXCLUDE_SELF:
            m_p, l_p, alpha_p, e_p, sh_p = _online(m_p, l_p, tl.where(sup, s, NEG_INF))
        else:
            m_p, l_p, alpha_p, e_p, sh_p = m_a, l_a, alpha_a, e_a, sh_a
        # reference over A and P (only the P shift / sums when ref_stats is given)
        r_old = _finite(m_r)
        lr_old = l_r
        if HAS_REF_STATS:
            sh_r = m_r
            if DIVERGENCE == 2:
                e_r = tl.exp2(tl.where(sup, sr, NEG_INF) - sh_r[:, None])
                alpha_r = tl.full([BLOCK_M], 1.0, tl.float32)
                l_r = l_r + _rsum(e_r, 1)
        else:
            m_ra, l_ra, alpha_ra, e_ra, sh_ra = _online(m_ra, l_ra, tl.where(att, sr, NEG_INF))
            if EXCLUDE_SELF:
                m_r, l_r, alpha_r, e_r, sh_r = _online(m_r, l_r, tl.where(sup, sr, NEG_INF))
            else:
                m_r, l_r, alpha_r, e_r, sh_r = m_ra, l_ra, alpha_ra, e_ra, sh_ra
        # the divergence sum, weighted by pi (kl) or rho (reverse_kl)
        if DIVERGENCE == 1:
            x = (s - sh_p[:, None]) - (sr - sh_r[:, None])
            t = alpha_p * (t + lp_old * ((p_old - sh_p) + (sh_r - r_old))) \
                + _rsum(tl.where(sup, e_p * x, 0.0), 1)
        else:
            x = (sr - sh_r[:, None]) - (s - sh_p[:, None])
            t = alpha_r * (t + lr_old * ((r_old - sh_r) + (sh_p - p_old))) \
                + _rsum(tl.where(sup, e_r * x, 0.0), 1)

    lse_a = _lse2(m_a, l_a)
    lse_p = _lse2(m_p, l_p)
    tl.store(Sh + offs_m.to(tl.int64) * ssm, lse_a * LN2, mask=row_ok)
    tl.store(Sh + offs_m.to(tl.int64) * ssm + ssc, lse_p * LN2, mask=row_ok)
    if not HAS_REF_STATS:
        lse_ra = _lse2(m_ra, l_ra)
        lse_rp = _lse2(m_r, l_r)
        tl.store(RSh + offs_m.to(tl.int64) * srsm, lse_ra * LN2, mask=row_ok)
        tl.store(RSh + offs_m.to(tl.int64) * srsm + srsc, lse_rp * LN2, mask=row_ok)
    if HAS_V:
        o = acc / _nonzero(l_a)[:, None]
        ptrs = Oh + offs_m[:, None].to(tl.int64) * som + offs_dv[None, :].to(tl.int64) * sod
        tl.store(ptrs, o.to(Oh.dtype.element_ty), mask=(offs_m[:, None] < Sq) & (offs_dv[None, :] < DV))

    live = row_ok & (lse_p != NEG_INF)
    if HAS_RM:
        live = live & (tl.load(RMb + offs_m.to(tl.int64) * srmm, mask=row_ok, other=0) != 0)
    l_safe = _nonzero(l_p)
    if DIVERGENCE == 1:
        if HAS_REF_STATS:
            ref_off = zero  # log(sum_P e^(s_ref - lse_RP)) = 0: the reference enters through m_r
        else:
            ref_off = tl.log2(_nonzero(l_r))
        div = (t / l_safe - tl.log2(l_safe) + ref_off) * LN2
        gbar = div + 1.0
    else:
        lr_safe = _nonzero(l_r)
        if HAS_REF_STATS:
            div = (t + tl.log2(l_safe)) * LN2  # the weights e^(s_ref - lse_RP) are rho already
            gbar = -l_r
        else:
            div = (t / lr_safe - tl.log2(lr_safe) + tl.log2(l_safe)) * LN2
            gbar = -l_r / lr_safe
    return tl.where(live, div, 0.0), tl.where(live, gbar, 0.0)



# ----------------------------------------------------------------------------------------------
# Forward kernel
# ----------------------------------------------------------------------------------------------

@triton.jit
def _fwd_kernel(Q, K, V, QR, KR, RS, KPM, RM, OUT, STATS, DIV, GBAR, CBAR,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                srqb, srqh, srqm, srqd, srkb, srkh, srkn, srkd, srsb, srsh, srsm, srsc,
                skpb, skpn, srmb, srmm, sob, soh, som, sod, ssb, ssh, ssm, ssc,
                sdb, sdh, sdm, scb, sch, scm,
                H, G, HR, GR, Sq, Sk, D, DV, DR, scale2, ref_scale2, len_bucket,
                DIVERGENCE: tl.constexpr, HEADS_EACH: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_V: tl.constexpr, HAS_REF_STATS: tl.constexpr,
                HAS_KPM: tl.constexpr, HAS_RM: tl.constexpr, D_PAD: tl.constexpr,
                DV_PAD: tl.constexpr, DR_PAD: tl.constexpr, H_PAD: tl.constexpr,
                UPCAST: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M query rows of batch b, all heads ("mean") or head h ("each").
    Writes OUT (B,H,Sq,Dv), STATS (B,H,Sq,2), RS (B,Hr,Sq,2) unless HAS_REF_STATS (then read),
    DIV/GBAR (B,Sq) | (B,H,Sq) and CBAR (B,H,Sq)."""
    n_mblk = (Sq + BLOCK_M - 1) // BLOCK_M
    n_groups = tl.num_programs(0) // n_mblk  # B ("mean") or B*H ("each")
    pid = tl.program_id(0)  # 1-D grid (see _grid): heaviest first, the last query block at pid 0
    pid_m = n_mblk - 1 - pid // n_groups
    pid_bh = (pid % n_groups).to(tl.int64)
    if HEADS_EACH:
        b = pid_bh // H
        h0 = pid_bh % H
        NH = 1
        NHR = 1
    else:
        b = pid_bh
        h0 = pid_bh * 0
        NH = H
        NHR = HR
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Sq
    if CAUSAL:
        n_end = tl.minimum(Sk, Sk - Sq + (pid_m + 1) * BLOCK_M)
    else:
        n_end = Sk
    Qb = Q + b * sqb
    Kb = K + b * skb
    Vb = V + b * svb
    QRb = QR + b * srqb
    KRb = KR + b * srkb
    Sb = STATS + b * ssb
    RSb = RS + b * srsb
    KPMb = KPM + b * skpb
    Ob = OUT + b * sob

    if HEADS_EACH and DIVERGENCE != 0:
        div, gbar = _each_one_sweep(
            Qb + h0 * sqh, Kb + (h0 // G) * skh, Vb + (h0 // G) * svh, Ob + h0 * soh,
            QRb + h0 * srqh, KRb + (h0 // GR) * srkh, Sb + h0 * ssh, RSb + h0 * srsh, KPMb, RM + b * srmb,
            sqm, sqd, skn, skd, svn, svd, srqm, srqd, srkn, srkd, som, sod,
            ssm, ssc, srsm, srsc, skpn, srmm, offs_m, Sq, Sk, D, DV, DR, scale2, ref_scale2, n_end,
            DIVERGENCE, EXCLUDE_SELF, CAUSAL, HAS_V, HAS_REF_STATS, HAS_KPM, HAS_RM, D_PAD, DV_PAD,
            DR_PAD, UPCAST, PREC, BLOCK_M, BLOCK_N)
        rows = offs_m.to(tl.int64) * sdm
        tl.store(DIV + b * sdb + h0 * sdh + rows, div, mask=row_ok)
        tl.store(GBAR + b * sdb + h0 * sdh + rows, gbar, mask=row_ok)
        tl.store(CBAR + b * scb + h0 * sch + offs_m.to(tl.int64) * scm, tl.full([BLOCK_M], 0.0, tl.float32),
                 mask=row_ok)
    else:
        # ---- pass 1: row statistics (and out) per head ---------------------------------------
        for hh in range(NH):
            h = h0 + hh
            lse_a, lse_p = _head_softmax(Qb + h * sqh, Kb + (h // G) * skh, Vb + (h // G) * svh, Ob + h * soh,
                                         sqm, sqd, skn, skd, svn, svd, som, sod, KPMb, skpn, offs_m, Sq, Sk,
                                         D, DV, scale2, n_end, BLOCK_M, BLOCK_N, D_PAD, DV_PAD, HAS_V,
                                         HAS_KPM, CAUSAL, EXCLUDE_SELF, UPCAST, PREC)
            ptrs = Sb + h * ssh + offs_m.to(tl.int64) * ssm
            tl.store(ptrs, lse_a * LN2, mask=row_ok)
            tl.store(ptrs + ssc, lse_p * LN2, mask=row_ok)
        if not HAS_REF_STATS:
            for rr in range(NHR):
                r = h0 + rr
                lse_a, lse_p = _head_softmax(QRb + r * srqh, KRb + (r // GR) * srkh, QRb, QRb,
                                             srqm, srqd, srkn, srkd, 0, 0, 0, 0, KPMb, skpn, offs_m, Sq,
                                             Sk, DR, 0, ref_scale2, n_end, BLOCK_M, BLOCK_N, DR_PAD, 16,
                                             False, HAS_KPM, CAUSAL, EXCLUDE_SELF, UPCAST, PREC)
                ptrs = RSb + r * srsh + offs_m.to(tl.int64) * srsm
                tl.store(ptrs, lse_a * LN2, mask=row_ok)
                tl.store(ptrs + srsc, lse_p * LN2, mask=row_ok)
        tl.debug_barrier()  # pass 2 reads the statistics that other threads of this program wrote

        # ---- pass 2: policy, reference, divergence -------------------------------------------
        log_z = _log_zsum(Sb, ssh, ssm, ssc, h0, NH, offs_m, Sq, BLOCK_M)
        log_zr = _log_zsum(RSb, srsh, srsm, srsc, h0, NHR, offs_m, Sq, BLOCK_M)
        live = row_ok & (log_z != NEG_INF)
        if HAS_RM:
            live = live & (tl.load(RM + b * srmb + offs_m.to(tl.int64) * srmm, mask=row_ok, other=0) != 0)
        log_z = tl.where(live, log_z, 0.0)
        log_zr = _finite(log_zr)
        n_end2 = tl.where(_rmax(live.to(tl.int32), 0) > 0, n_end, 0)
        div = tl.full([BLOCK_M], 0.0, tl.float32)
        gbar = tl.full([BLOCK_M], 0.0, tl.float32)
        u = tl.full([BLOCK_M, H_PAD], 0.0, tl.float32)
        cols = tl.arange(0, H_PAD)
        for start_n in range(0, n_end2, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            att, sup = _key_sets(offs_m, offs_n, _key_ok(KPMb, skpn, offs_n, Sk, HAS_KPM), Sq, Sk,
                                 CAUSAL, EXCLUDE_SELF)
            keep = sup & live[:, None]
            lpi = _log_policy(Qb, Kb, Sb, sqh, sqm, sqd, skh, skn, skd, ssh, ssm, ssc, h0, NH, G,
                              offs_m, offs_n, Sq, Sk, D, scale2, log_z,
                              BLOCK_M, BLOCK_N, D_PAD, HEADS_EACH, UPCAST, PREC)
            lrho = _log_policy(QRb, KRb, RSb, srqh, srqm, srqd, srkh, srkn, srkd, srsh, srsm, srsc, h0,
                               NHR, GR, offs_m, offs_n, Sq, Sk, DR, ref_scale2, log_zr,
                               BLOCK_M, BLOCK_N, DR_PAD, HEADS_EACH, UPCAST, PREC)
            f, g, pig = _div_terms(lpi, lrho, DIVERGENCE)
            div += _rsum(tl.where(keep, f, 0.0), 1)
            gbar += _rsum(tl.where(keep, pig, 0.0), 1)
            if not HEADS_EACH:
                for hh in range(NH):
                    h = h0 + hh
                    s = _scores(Qb + h * sqh, Kb + (h // G) * skh, sqm, sqd, skn, skd, offs_m, offs_n,
                                Sq, Sk, D, scale2, D_PAD, UPCAST, PREC)
                    la = _load_row(Sb + h * ssh, offs_m, ssm, Sq, 0.0) * LOG2E
                    ag = _times_g(s - _finite(la)[:, None], g, lpi, lrho, DIVERGENCE)
                    uh = _rsum(tl.where(keep, ag, 0.0), 1)
                    u += tl.where(cols[None, :] == hh, uh[:, None], 0.0)

        div = tl.where(live, div, 0.0)
        gbar = tl.where(live, gbar, 0.0)
        rows = offs_m.to(tl.int64) * sdm
        tl.store(DIV + b * sdb + h0 * sdh + rows, div, mask=row_ok)
        tl.store(GBAR + b * sdb + h0 * sdh + rows, gbar, mask=row_ok)
        crow = CBAR + b * scb + offs_m.to(tl.int64) * scm
        if HEADS_EACH:
            tl.store(crow + h0 * sch, tl.full([BLOCK_M], 0.0, tl.float32), mask=row_ok)
        else:
            inv_z = H * tl.exp2(-log_z)  # 1 / Z, Z = (1/H) sum_h Z_h
            for hh in range(NH):
                h = h0 + hh
                uh = _rsum(tl.where(cols[None, :] == hh, u, 0.0), 1)
                la = _load_row(Sb + h * ssh, offs_m, ssm, Sq, 0.0) * LOG2E
                lp = _load_row(Sb + h * ssh + ssc, offs_m, ssm, Sq, NEG_INF) * LOG2E
                z_h = tl.where(lp == NEG_INF, 0.0, tl.exp2(lp - _finite(la)))
                c = (uh - gbar * z_h) * inv_z
                tl.store(crow + h * sch, tl.where(live, c, 0.0), mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Backward kernel
# ----------------------------------------------------------------------------------------------

@triton.jit
def _split_range(mb_first, n_mblk, split, n_splits):
    """Query blocks [mb_lo, mb_hi) of chunk `split` of [mb_first, n_mblk) cut into n_splits
    contiguous chunks whose counts differ by at most one (every query block of a key block costs
    the same, so equal counts are equal work); no product that could overflow int32."""
    n_own = n_mblk - mb_first
    per = n_own // n_splits
    extra = n_own % n_splits
    mb_lo = mb_first + split * per + tl.minimum(split, extra)
    mb_hi = mb_lo + per + (split < extra).to(tl.int32)
    return mb_lo, mb_hi


@triton.jit
def _flush(ptrs, acc, mask, sole_write):
    """Add an fp32 dk / dv partial sum into its zero-filled GK / GV tile: a plain store when this
    is the only write the tile ever gets (`sole_write`), else fp32 atomics."""
    if sole_write:
        tl.store(ptrs, acc, mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")


@triton.jit
def _bwd_kernel(Q, K, V, QR, KR, RS, KPM, DO, W, DELTA, STATS, GBAR, GQ, GK, GV,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                srqb, srqh, srqm, srqd, srkb, srkh, srkn, srkd, srsb, srsh, srsm, srsc,
                skpb, skpn, sdob, sdoh, sdom, sdod, swb, swh, swm, sdlb, sdlh, sdlm,
                ssb, ssh, ssm, ssc, sdqb, sdqh, sdqm, sdqd, sdkb, sdkh, sdkn, sdkd,
                sdvb, sdvh, sdvn, sdvd,
                B, H, G, HKV, HR, GR, Sq, Sk, D, DV, DR, scale, scale2, ref_scale2, len_bucket,
                DIVERGENCE: tl.constexpr, HEADS_EACH: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_V: tl.constexpr, HAS_KPM: tl.constexpr,
                ACC_IN_REGS: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                DR_PAD: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_N keys of batch b, all kv heads ("mean") or kv head kvh ("each"), and
    one of n_splits contiguous chunks of the query blocks that see those keys (n_splits comes
    from the grid size, see _bwd_grid). dS = a (dP - delta) + [k in P] w T; GK/GV (fp32 dk/dv,
    zero-filled) get dS^T Q and a^T dO (stored when n_splits == 1, atomic adds otherwise), GQ
    (fp32 dq, zero-filled) gets dS K by atomic adds."""
    n_nblk = (Sk + BLOCK_N - 1) // BLOCK_N
    n_mblk = (Sq + BLOCK_M - 1) // BLOCK_M
    if HEADS_EACH:
        n_groups = B * HKV
    else:
        n_groups = B
    n_splits = tl.num_programs(0) // (n_nblk * n_groups)
    # 1-D grid (see _bwd_grid): key blocks slowest and ascending, i.e. heaviest first under causal
    # masking (key block j is seen by the query blocks from ~j on); then (batch, kv head), split.
    pid = tl.program_id(0)
    pid_n = pid // (n_groups * n_splits)
    pid_in = pid % (n_groups * n_splits)
    pid_bk = (pid_in // n_splits).to(tl.int64)
    split = pid_in % n_splits
    if HEADS_EACH:
        b = pid_bk // HKV
        kv0 = pid_bk % HKV
        NKV = 1
    else:
        b = pid_bk
        kv0 = pid_bk * 0
        NKV = HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    Qb = Q + b * sqb
    Kb = K + b * skb
    Vb = V + b * svb
    QRb = QR + b * srqb
    KRb = KR + b * srkb
    Sb = STATS + b * ssb
    RSb = RS + b * srsb
    DOb = DO + b * sdob
    DLb = DELTA + b * sdlb
    Wb = W + b * swb
    Gb = GBAR + b * swb
    DQb = GQ + b * sdqb
    DKb = GK + b * sdkb
    DVb = GV + b * sdvb
    key_ok = _key_ok(KPM + b * skpb, skpn, offs_n, Sk, HAS_KPM)
    if CAUSAL:
        mb_first = tl.maximum(pid_n * BLOCK_N - (Sk - Sq), 0) // BLOCK_M
    else:
        mb_first = pid_n * 0
    mb_lo, mb_hi = _split_range(mb_first, n_mblk, split, n_splits)
    sole_program = n_splits == 1  # no other program writes dk / dv of these keys
    dk_acc = tl.full([BLOCK_N, D_PAD], 0.0, tl.float32)
    dv_acc = tl.full([BLOCK_N, DV_PAD], 0.0, tl.float32)
    keys_end = tl.where(mb_lo < mb_hi, Sk, 0)  # an empty chunk writes no dk / dv
    kv_mask = (offs_n[:, None] < keys_end) & (offs_d[None, :] < D)
    v_mask = (offs_n[:, None] < keys_end) & (offs_dv[None, :] < DV)
    for start_m in range(mb_lo * BLOCK_M, mb_hi * BLOCK_M, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Sq
        att, sup = _key_sets(offs_m, offs_n, key_ok, Sq, Sk, CAUSAL, EXCLUDE_SELF)
        if not HEADS_EACH:
            # the divergence tile couples every head: log pi, log rho and g from all H + Hr heads
            w = _load_row(Wb, offs_m, swm, Sq, 0.0)
            gb = _load_row(Gb, offs_m, swm, Sq, 0.0)
            keep = sup & (w != 0.0)[:, None]
            log_z = _finite(_log_zsum(Sb, ssh, ssm, ssc, kv0, H, offs_m, Sq, BLOCK_M))
            if _rmax((w != 0.0).to(tl.int32), 0) > 0:
                log_zr = _finite(_log_zsum(RSb, srsh, srsm, srsc, kv0, HR, offs_m, Sq, BLOCK_M))
                lpi = _log_policy(Qb, Kb, Sb, sqh, sqm, sqd, skh, skn, skd, ssh, ssm, ssc, kv0, H, G,
                                  offs_m, offs_n, Sq, Sk, D, scale2, log_z,
                                  BLOCK_M, BLOCK_N, D_PAD, False, UPCAST, PREC)
                lrho = _log_policy(QRb, KRb, RSb, srqh, srqm, srqd, srkh, srkn, srkd, srsh, srsm, srsc,
                                   kv0, HR, GR, offs_m, offs_n, Sq, Sk, DR, ref_scale2, log_zr,
                                   BLOCK_M, BLOCK_N, DR_PAD, False, UPCAST, PREC)
                f, g, pig = _div_terms(lpi, lrho, DIVERGENCE)
            else:
                lpi = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
                lrho = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
                g = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        for kk in range(NKV):
            kvh = kv0 + kk
            k = _load_tile(Kb + kvh * skh, offs_n, offs_d, skn, skd, Sk, D)
            if HAS_V:
                v = _load_tile(Vb + kvh * svh, offs_n, offs_dv, svn, svd, Sk, DV)
            if not ACC_IN_REGS:
                # this query block's part of dk / dv of kv head kvh, added into GK / GV below
                dk_acc = tl.full([BLOCK_N, D_PAD], 0.0, tl.float32)
                if HAS_V:
                    dv_acc = tl.full([BLOCK_N, DV_PAD], 0.0, tl.float32)
            for hh in range(G):
                h = kvh * G + hh
                q = _load_tile(Qb + h * sqh, offs_m, offs_d, sqm, sqd, Sq, D)
                s = _dot(q, tl.trans(k), UPCAST, PREC) * scale2
                la = _finite(_load_row(Sb + h * ssh, offs_m, ssm, Sq, 0.0) * LOG2E)
                a = tl.where(att, tl.exp2(s - la[:, None]), 0.0)
                delta = _load_row(DLb + h * sdlh, offs_m, sdlm, Sq, 0.0)
                if HAS_V:
                    do = _load_tile(DOb + h * sdoh, offs_m, offs_dv, sdom, sdod, Sq, DV)
                    dp = _dot(do, tl.trans(v), UPCAST, PREC)
                    ds = a * (dp - delta[:, None])
                    dv_acc += _dot(tl.trans(a.to(do.dtype)), do, UPCAST, PREC)
                else:
                    ds = -a * delta[:, None]
                if HEADS_EACH:
                    w = _load_row(Wb + h * swh, offs_m, swm, Sq, 0.0)
                    gb = _load_row(Gb + h * swh, offs_m, swm, Sq, 0.0)
                    keep = sup & (w != 0.0)[:, None]
                    lp = _finite(_load_row(Sb + h * ssh + ssc, offs_m, ssm, Sq, 0.0) * LOG2E)
                    lrp = _finite(_load_row(RSb + h * srsh + srsc, offs_m, srsm, Sq, 0.0) * LOG2E)
                    sr = _scores(QRb + h * srqh, KRb + (h // GR) * srkh, srqm, srqd, srkn, srkd,
                                 offs_m, offs_n, Sq, Sk, DR, ref_scale2, DR_PAD, UPCAST, PREC)
                    lpi = s - lp[:, None]
                    lrho = sr - lrp[:, None]
                    f, g, pig = _div_terms(lpi, lrho, DIVERGENCE)
                    lc = lpi  # T = pi (g - gbar)
                else:
                    lc = s - la[:, None] - log_z[:, None]  # T = (a / H) (g - gbar) / Z
                t = _times_g(lc, g, lpi, lrho, DIVERGENCE) - tl.exp2(lc) * gb[:, None]
                ds += tl.where(keep, w[:, None] * t, 0.0)
                ds = ds * scale
                dk_acc += _dot(tl.trans(ds.to(q.dtype)), q, UPCAST, PREC)
                dq = _dot(ds.to(k.dtype), k, UPCAST, PREC)
                dq_ptrs = DQb + h * sdqh + offs_m[:, None].to(tl.int64) * sdqm + offs_d[None, :] * sdqd
                tl.atomic_add(dq_ptrs, dq, mask=row_ok[:, None] & (offs_d[None, :] < D), sem="relaxed")
            if not ACC_IN_REGS:  # one add per query block: atomics even without splits
                dk_ptrs = DKb + kvh * sdkh + offs_n[:, None].to(tl.int64) * sdkn + offs_d[None, :] * sdkd
                _flush(dk_ptrs, dk_acc, kv_mask, False)
                if HAS_V:
                    dv_ptrs = DVb + kvh * sdvh + offs_n[:, None].to(tl.int64) * sdvn + offs_dv[None, :] * sdvd
                    _flush(dv_ptrs, dv_acc, v_mask, False)
    if ACC_IN_REGS:
        dk_ptrs = DKb + kv0 * sdkh + offs_n[:, None].to(tl.int64) * sdkn + offs_d[None, :] * sdkd
        _flush(dk_ptrs, dk_acc, kv_mask, sole_program)
        if HAS_V:
            dv_ptrs = DVb + kv0 * sdvh + offs_n[:, None].to(tl.int64) * sdvn + offs_dv[None, :] * sdvd
            _flush(dv_ptrs, dv_acc, v_mask, sole_program)


# ----------------------------------------------------------------------------------------------
# Configs: autotuned on GPU (sm_80 / sm_90), one small fixed config under the interpreter
# ----------------------------------------------------------------------------------------------

_INTERPRETER_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16)


def _head_dim(args: dict) -> int:
    return max(int(args.get("D_PAD", 16)), int(args.get("DV_PAD", 16)), int(args.get("DR_PAD", 16)))


def _size_class(args: dict) -> int:
    """64, 128, 256 (the largest padded head dim, at least 64), doubled for fp32 operands (PREC
    "ieee"), whose staged tiles take twice the shared memory and registers: 512 is fp32 at 256."""
    size = max(64, _head_dim(args))
    return size * 2 if args.get("PREC") == "ieee" else size


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per size class, first = the one RAL_TRITON_AUTOTUNE=0
# runs. Chosen by compiling every kernel variant for sm_80 and sm_90a with triton 3.9's ptxas
# (tests/test_triton_compile.py; RAL_TRITON_COMPILE_ALL=1 sweeps them all): every config fits the
# opt-in shared memory of both (163 / 227 KB). In 16-bit types at head dims <= 128 the first
# spills no registers, or a few dozen bytes in some variants (ptxas is not monotone in the tile
# size there); the others may spill a few hundred bytes and are left to the autotuner. Dropped:
# BLOCK_M = 64 with 4 warps, 128 x 64, and the backward's 32 x 32 .. 64 x 64 tiles with 4 warps
# at head dim >= 128, which spill 0.3-24 KB per thread; at head dim 256 the old first forward
# config (64 x 64, 4 warps) needed 172 KB / 262 KB of shared memory for heads="each" kl /
# reverse_kl, over both limits. Known: the backward at head dim 256 spills with every tile tried
# (16 x 16 .. 64 x 64, 4 or 8 warps; its dk/dv accumulators, BLOCK_N x 256 fp32 each, stay in
# registers): the first config 16-360 B, up to ~1 KB for "mean" with GQA; fp32 spills more at
# head dim >= 128 (fp32 is the accuracy path, not the fast one). Not timed on hardware yet (no
# GPU in the sessions that chose them).
_FWD_TABLE = {
    64: [(32, 64, 8, 2), (64, 32, 8, 2), (64, 64, 8, 2)],
    128: [(32, 64, 8, 2), (16, 64, 4, 2), (64, 64, 8, 2)],
    256: [(32, 32, 8, 2), (16, 32, 4, 2), (32, 64, 8, 2)],
    512: [(16, 32, 4, 2), (32, 32, 8, 1)],
}
_BWD_TABLE = {
    64: [(16, 64, 8, 1), (16, 32, 8, 2), (32, 32, 8, 2)],
    128: [(16, 32, 8, 1), (16, 32, 8, 2), (16, 64, 8, 1)],
    256: [(16, 32, 8, 1), (16, 16, 4, 1)],
    512: [(16, 16, 4, 1), (16, 32, 8, 1)],
}


def _shape(cfg) -> tuple:
    return (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages)


def _pruner(table: dict):
    def prune(configs, named_args, **kwargs):
        """The configs of this call's size class, in the table's order; RAL_TRITON_AUTOTUNE=0
        keeps only the first (no benchmarking: each config takes seconds to tens of seconds to
        compile)."""
        by_shape = {_shape(cfg): cfg for cfg in configs}
        kept = [by_shape[shape] for shape in table[_size_class({**named_args, **kwargs})]]
        if os.environ.get("RAL_TRITON_AUTOTUNE", "1") in ("0", ""):
            kept = kept[:1]
        return kept
    return prune


def _configs(table: dict) -> list:
    shapes = list(dict.fromkeys(shape for shapes in table.values() for shape in shapes))
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in shapes]


_FWD_KEY = ["H", "HR", "G", "GR", "D", "DV", "DR", "len_bucket", "DIVERGENCE", "HEADS_EACH",
            "EXCLUDE_SELF", "CAUSAL", "HAS_V", "HAS_REF_STATS"]
_BWD_KEY = ["H", "HR", "G", "GR", "D", "DV", "DR", "len_bucket", "DIVERGENCE", "HEADS_EACH",
            "EXCLUDE_SELF", "CAUSAL", "HAS_V"]

if _IMPORT_ERROR is None and not _BUILT_INTERPRETED:
    _fwd = triton.autotune(_configs(_FWD_TABLE), key=_FWD_KEY,
                           prune_configs_by={"early_config_prune": _pruner(_FWD_TABLE)})(_fwd_kernel)
    _bwd = triton.autotune(_configs(_BWD_TABLE), key=_BWD_KEY, reset_to_zero=["GQ", "GK", "GV"],
                           prune_configs_by={"early_config_prune": _pruner(_BWD_TABLE)})(_bwd_kernel)
else:
    _fwd, _bwd = _fwd_kernel, _bwd_kernel


_SIBLINGS: dict = {}


def _kernels():
    """This module if its kernels were built in the current interpret mode, else a private copy
    of it executed under the current mode (see the module docstring)."""
    mode = _interpreting()
    if mode == _BUILT_INTERPRETED:
        return sys.modules[__name__]
    sibling = _SIBLINGS.get(mode)
    if sibling is None:
        name = f"{__name__}._interpreted" if mode else f"{__name__}._compiled"
        spec = importlib.util.spec_from_file_location(name, __file__)
        sibling = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sibling)
        _SIBLINGS[mode] = sibling
    return sibling


# ----------------------------------------------------------------------------------------------
# Backend interface (ral.backends)
# ----------------------------------------------------------------------------------------------

def unavailable_reason() -> Optional[str]:
    return _IMPORT_ERROR


def unsupported_reason(call: Call) -> Optional[str]:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    device = call.q.device
    if device.type == "cpu":
        if not _interpreting():
            return ("CPU tensors run only under the Triton interpreter: set TRITON_INTERPRET=1 "
                    "(slow; meant for tests), or use CUDA tensors")
    elif device.type != "cuda":
        return f"needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
    dims = {"D (q.shape[3])": call.q.shape[3], "Dr (q_ref.shape[3])": call.q_ref.shape[3]}
    if call.v is not None:
        dims["Dv (v.shape[3])"] = call.v.shape[3]
    for name, dim in dims.items():
        if dim > MAX_HEAD_DIM:
            return f"head dim {name} = {dim} is above the Triton kernels' limit of {MAX_HEAD_DIM}"
    for name, t in (("q", call.q), ("q_ref", call.q_ref)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"{name}: dtype must be float32, float16 or bfloat16, got {t.dtype}"
    return None


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


def _s(t, n: int = 4) -> list:
    """The first n strides of t (0 for a missing tensor)."""
    return list(t.stride()) if t is not None else [0] * n


def _flags(call: Call, interp: bool) -> dict:
    q, q_ref = call.q, call.q_ref
    dtypes = (q.dtype, q_ref.dtype)
    return dict(
        D_PAD=_pad(q.shape[3]), DV_PAD=_pad(call.v.shape[3] if call.v is not None else 16),
        DR_PAD=_pad(q_ref.shape[3]),
        UPCAST=bool(interp and torch.bfloat16 in dtypes),
        PREC="ieee" if torch.float32 in dtypes else "tf32",
    )


def _interpret_call(call: Call) -> bool:
    """Whether this call runs interpreted (CPU tensors, or TRITON_INTERPRET set)."""
    return call.q.device.type == "cpu" or _interpreting()


def _blocks(kern) -> dict:
    """The fixed tile sizes when `kern` is not autotuned (the interpreter)."""
    return {} if hasattr(kern, "configs") else dict(_INTERPRETER_BLOCKS)


def _mask_u8(mask):
    """A bool mask viewed as uint8 (no copy), or a dummy."""
    return mask.view(torch.uint8) if mask is not None else None


def _device_guard(t):
    return torch.cuda.device(t.device) if t.is_cuda else _NullContext()


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class Launch(NamedTuple):
    """One kernel launch as the launchers build it: ``kernel[grid](*args, **kwargs)``.
    kernel: the autotuned kernel (compiled mode; BLOCK_M / BLOCK_N / warps / stages come from its
    configs) or the plain jit function (interpreter; kwargs carry the fixed tile sizes);
    outputs: the tensors the launch fills, as forward() / backward() return them.
    tests/test_triton_compile.py compiles exactly these arguments for sm_80 / sm_90."""

    kernel: object
    grid: Callable
    args: list
    kwargs: dict
    outputs: tuple


def _grid(n_rows: int, block: str, n_programs: int):
    """1-D grid of cdiv(n_rows, meta[block]) x n_programs: axis 0 takes 2^31 - 1 programs (axis 1
    only 65535, which B * H of a large batch exceeds); the kernel recovers n_programs from the
    grid size with the same cdiv."""
    return lambda meta: (triton.cdiv(n_rows, meta[block]) * n_programs,)


# The backward's grid aims at this many waves (programs per SM; ptxas gives the backward 170-255
# registers x 256 threads, so one program fits an SM at a time). See "Occupancy" at the top.
_BWD_MIN_WAVES = 3


def _q_splits(n_programs: int, n_query_blocks: int, device: torch.device) -> int:
    """Query splits of the backward: into how many chunks each key block's query sweep is cut.
    RAL_TRITON_Q_SPLITS=n forces n (tests, A/B timing); else on CUDA the fewest that give the
    grid _BWD_MIN_WAVES waves of the device's SMs, and 1 on CPU (the interpreter). Never above
    the query block count (a chunk holds at least one block of the heaviest key block)."""
    forced = os.environ.get("RAL_TRITON_Q_SPLITS", "")
    if forced:
        splits = int(forced)
    elif device.type == "cuda":
        n_sm = torch.cuda.get_device_properties(device).multi_processor_count
        splits = triton.cdiv(_BWD_MIN_WAVES * n_sm, n_programs)
    else:
        splits = 1
    return max(1, min(splits, n_query_blocks))


def _bwd_grid(k_len: int, q_len: int, n_groups: int, device: torch.device):
    """1-D grid of cdiv(k_len, BLOCK_N) x n_groups x Q_SPLITS (n_groups = B or B * Hkv); the
    kernel recovers Q_SPLITS from the grid size."""
    def grid(meta):
        n_programs = triton.cdiv(k_len, meta["BLOCK_N"]) * n_groups
        return (n_programs * _q_splits(n_programs, triton.cdiv(q_len, meta["BLOCK_M"]), device),)
    return grid


def forward_launch(call: Call, interp: Optional[bool] = None) -> Launch:
    """The forward launch for `call`: kernels of the current interpret mode (see _kernels());
    interp (default: CPU tensors or TRITON_INTERPRET) picks the interpreter-only flags."""
    q, k, v, q_ref, k_ref = call.q, call.k, call.v, call.q_ref, call.k_ref
    interp = _interpret_call(call) if interp is None else interp
    opts = call.options
    batch, n_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    ref_heads, ref_kv_heads, ref_dim = q_ref.shape[1], k_ref.shape[1], q_ref.shape[3]
    f32 = dict(dtype=torch.float32, device=q.device)
    each = opts.heads_each
    row_shape = (batch, n_heads, q_len) if each else (batch, q_len)
    out = (torch.empty((batch, n_heads, q_len, v.shape[3]), dtype=q.dtype, device=q.device)
           if v is not None else q.new_empty((0,)))
    div, gbar = torch.empty(row_shape, **f32), torch.empty(row_shape, **f32)
    stats = torch.empty((batch, n_heads, q_len, 2), **f32)
    cbar = torch.empty((batch, n_heads, q_len), **f32)
    has_ref_stats = call.ref_stats is not None
    ref_stats_out = (q.new_empty((0,), dtype=torch.float32) if has_ref_stats
                     else torch.empty((batch, ref_heads, q_len, 2), **f32))
    rs = call.ref_stats if has_ref_stats else ref_stats_out
    kpm, rm = _mask_u8(call.key_padding_mask), _mask_u8(call.row_mask)
    row_strides = list(div.stride()) if each else [div.stride(0), 0, div.stride(1)]

    kern = _kernels()._fwd
    flags = _flags(call, interp)
    flags.update(_blocks(kern))
    h_pad = 1 if each else triton.next_power_of_2(n_heads)
    args = [
        q, k, v if v is not None else q, q_ref, k_ref, rs,
        kpm if kpm is not None else stats, rm if rm is not None else stats,
        out if v is not None else q, stats, div, gbar, cbar,
        *_s(q), *_s(k), *_s(v), *_s(q_ref), *_s(k_ref), *_s(rs),
        *_s(kpm, 2), *_s(rm, 2), *_s(out if v is not None else None), *_s(stats),
        *row_strides, *_s(cbar, 3),
        n_heads, n_heads // kv_heads, ref_heads, ref_heads // ref_kv_heads, q_len, k_len,
        head_dim, v.shape[3] if v is not None else 0, ref_dim,
        opts.scale * 1.4426950408889634, opts.ref_scale * 1.4426950408889634,
        triton.next_power_of_2(max(q_len, k_len)),
    ]
    kwargs = dict(
        DIVERGENCE=_DIVERGENCE_CODES[opts.divergence], HEADS_EACH=each,
        EXCLUDE_SELF=opts.exclude_self, CAUSAL=opts.causal, HAS_V=v is not None,
        HAS_REF_STATS=has_ref_stats, HAS_KPM=kpm is not None, HAS_RM=rm is not None,
        H_PAD=h_pad, **flags)
    grid = _grid(q_len, "BLOCK_M", batch * (n_heads if each else 1))
    return Launch(kern, grid, args, kwargs, (out, div, stats, ref_stats_out, gbar, cbar))


def forward(call: Call):
    """-> out (B,H,Sq,Dv)|(0,), div, stats (B,H,Sq,2), ref_stats_out (B,Hr,Sq,2)|(0,), gbar, cbar (B,H,Sq).
    div and gbar are (B,Sq) for "mean" and (B,H,Sq) for "each"; all fp32 but out."""
    launch = forward_launch(call)
    with _device_guard(call.q):
        launch.kernel[launch.grid](*launch.args, **launch.kwargs)
    return launch.outputs


def backward_launch(call: Call, dout, ddiv, delta, stats, ref_stats, gbar,
                    interp: Optional[bool] = None) -> Launch:
    """The backward launch for `call` (arguments as backward()); outputs: the fp32 (dq, dk, dv|None)."""
    q, k, v, q_ref, k_ref = call.q, call.k, call.v, call.q_ref, call.k_ref
    interp = _interpret_call(call) if interp is None else interp
    opts = call.options
    batch, n_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    ref_heads, ref_kv_heads, ref_dim = q_ref.shape[1], k_ref.shape[1], q_ref.shape[3]
    each = opts.heads_each
    f32 = dict(dtype=torch.float32, device=q.device)
    dq = torch.zeros(q.shape, **f32)
    dk = torch.zeros(k.shape, **f32)
    dv = torch.zeros(v.shape, **f32) if v is not None else None
    w, gbar = ddiv.to(torch.float32).contiguous(), gbar.to(torch.float32).contiguous()
    row_strides = list(w.stride()) if each else [w.stride(0), 0, w.stride(1)]
    kpm = _mask_u8(call.key_padding_mask)

    kern = _kernels()._bwd
    flags = _flags(call, interp)
    flags.update(_blocks(kern))
    acc_in_regs = each or kv_heads == 1
    args = [
        q, k, v if v is not None else q, q_ref, k_ref, ref_stats,
        kpm if kpm is not None else stats, dout if v is not None else q, w, delta, stats, gbar,
        dq, dk, dv if v is not None else dk,
        *_s(q), *_s(k), *_s(v), *_s(q_ref), *_s(k_ref), *_s(ref_stats), *_s(kpm, 2),
        *_s(dout if v is not None else None), *row_strides, *_s(delta, 3), *_s(stats),
        *_s(dq), *_s(dk), *_s(dv),
        batch, n_heads, n_heads // kv_heads, kv_heads, ref_heads, ref_heads // ref_kv_heads, q_len, k_len,
        head_dim, v.shape[3] if v is not None else 0, ref_dim, opts.scale,
        opts.scale * 1.4426950408889634, opts.ref_scale * 1.4426950408889634,
        triton.next_power_of_2(max(q_len, k_len)),
    ]
    kwargs = dict(
        DIVERGENCE=_DIVERGENCE_CODES[opts.divergence], HEADS_EACH=each,
        EXCLUDE_SELF=opts.exclude_self, CAUSAL=opts.causal, HAS_V=v is not None,
        HAS_KPM=kpm is not None, ACC_IN_REGS=acc_in_regs, **flags)
    grid = _bwd_grid(k_len, q_len, batch * (kv_heads if each else 1), q.device)
    return Launch(kern, grid, args, kwargs, (dq, dk, dv))


def backward(call: Call, dout, ddiv, delta, stats, ref_stats, gbar):
    """-> dq (B,H,Sq,D), dk (B,Hkv,Sk,D), dv (B,Hkv,Sk,Dv)|(0,) in the input dtypes.
    ddiv (w) and gbar like div; delta (B,H,Sq) = rowsum(dout*out) + w*cbar/H; stats (B,H,Sq,2);
    ref_stats (B,Hr,Sq,2): the reference statistics the forward used."""
    launch = backward_launch(call, dout, ddiv, delta, stats, ref_stats, gbar)
    with _device_guard(call.q):
        launch.kernel[launch.grid](*launch.args, **launch.kwargs)
    dq, dk, dv = launch.outputs
    q, k, v = call.q, call.k, call.v
    return (dq.to(q.dtype), dk.to(k.dtype),
            dv.to(v.dtype) if v is not None else q.new_empty((0,)))
