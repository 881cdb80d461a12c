"""Device helpers shared by the forward and backward kernels (``@triton.jit``, inlined at each call).

Everything here works in log2 units: the launchers fold log2(e) into the softmax scales
(``scale2 = scale * log2(e)``), so a score tile ``s`` is ready for ``tl.exp2``; the statistics the
kernels store are natural-log, converted with no rounding of their own (``lse_natural`` on the way
out, ``sub_lse`` on the way back in). Pointers handed to the helpers are
already at the right (batch, head) and, with a sequence table, at the unit's first row / key
(``at``); ``q_len`` / ``k_len`` are the unit's lengths and ``pos0`` the key position of its row 0.
Strides travel as one 4-tuple per tensor, indexed by the slots BATCH, HEAD, ROW / KEY, DIM / COL
(``launch.strides``; 0 where a tensor lacks the dimension).

Importing this module needs no GPU; without triton it imports a stub (``IMPORT_ERROR`` says why)
so that the package still imports and the backend reports itself unavailable.
"""

from __future__ import annotations

from typing import Optional

try:
    import triton
    import triton.language as tl
    IMPORT_ERROR: Optional[str] = None
except Exception as err:  # pragma: no cover - exercised only where triton is missing
    IMPORT_ERROR = f"triton is not importable ({type(err).__name__}: {err})"

    class _Stub:
        """Just enough of triton / triton.language for the kernel definitions to import."""

        constexpr = staticmethod(lambda x=None: x)

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _Stub()

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Each as its float32 value (HI) and the rest (LO): inside an fma x * HI is exact, so a conversion
# between natural and log2 units adds no rounding of its own (``lse_natural``, ``sub_lse``).
LOG2E_HI = tl.constexpr(1.4426950216293335)
LOG2E_LO = tl.constexpr(1.92596298909109e-08)
LN2_HI = tl.constexpr(0.6931471824645996)
LN2_LO = tl.constexpr(-1.904654323148236e-09)
NEG_INF = tl.constexpr(float("-inf"))

# Slots of a stride tuple: every tensor reaches the kernels with its strides as one 4-tuple
# (batch, head, row or key, feature or column), 0 where it lacks the dimension (launch.strides).
BATCH = tl.constexpr(0)
HEAD = tl.constexpr(1)
ROW = tl.constexpr(2)
KEY = tl.constexpr(2)
DIM = tl.constexpr(3)
COL = tl.constexpr(3)

# ----------------------------------------------------------------------------------------------
# Loads, matmuls, the work unit
# ----------------------------------------------------------------------------------------------


@triton.jit
def matmul(a, b, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """a @ b with fp32 accumulation; UPCAST (interpreter + bf16 only) computes in fp32."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def load_tile(base, offs_r, offs_c, stride_r, stride_c, n_r, n_c):
    """(len(offs_r), len(offs_c)) tile of a strided 2-D view, zero outside (n_r, n_c); int64 offsets."""
    ptrs = base + offs_r[:, None].to(tl.int64) * stride_r + offs_c[None, :].to(tl.int64) * stride_c
    return tl.load(ptrs, mask=(offs_r[:, None] < n_r) & (offs_c[None, :] < n_c), other=0.0)


@triton.jit
def load_row(base, offs, stride, n, other):
    """(len(offs),) fp32 vector of a strided 1-D view, `other` outside n."""
    return tl.load(base + offs.to(tl.int64) * stride, mask=offs < n, other=other).to(tl.float32)


@triton.jit
def at(base, batch, stride_b, start, stride, HAS_SEQS: tl.constexpr):
    """`base` moved to batch `batch` and, with a sequence table, to the unit's first row / key
    `start` (`stride`: the row or key stride). Without a table `start` is ignored."""
    if HAS_SEQS:
        res = base + batch * stride_b + start * stride
    else:
        res = base + batch * stride_b
    return res


@triton.jit
def load_unit(SEQS, stride_seqs, unit):
    """Work unit `unit` of a sequence table (int32 rows [batch, q_start, q_len, k_start, k_len,
    q_pos, 0, 0], csrc/common/params.h SeqRange) -> (batch, q_start, q_len, k_start, k_len,
    q_pos); batch and the starts as int64 (they multiply strides)."""
    row = SEQS + unit * stride_seqs
    batch = tl.load(row).to(tl.int64)
    q_start = tl.load(row + 1).to(tl.int64)
    q_len = tl.load(row + 2)
    k_start = tl.load(row + 3).to(tl.int64)
    k_len = tl.load(row + 4)
    q_pos = tl.load(row + 5)
    return batch, q_start, q_len, k_start, k_len, q_pos


@triton.jit
def model_bases(Q, K, V, Q_REF, K_REF, STATS, REF_STATS, KEY_PAD, SEGS, b, q_start, k_start, stride_q, stride_k,
                stride_v, stride_q_ref, stride_k_ref, stride_stats, stride_ref_stats, stride_key_pad, stride_seg,
                HAS_SEQS: tl.constexpr):
    """The unit's first row / key (see ``at``) of the inputs both passes read: q, k, v, q_ref,
    k_ref, stats, ref_stats, key_padding_mask and key_segments."""
    return (at(Q, b, stride_q[BATCH], q_start, stride_q[ROW], HAS_SEQS),
            at(K, b, stride_k[BATCH], k_start, stride_k[KEY], HAS_SEQS),
            at(V, b, stride_v[BATCH], k_start, stride_v[KEY], HAS_SEQS),
            at(Q_REF, b, stride_q_ref[BATCH], q_start, stride_q_ref[ROW], HAS_SEQS),
            at(K_REF, b, stride_k_ref[BATCH], k_start, stride_k_ref[KEY], HAS_SEQS),
            at(STATS, b, stride_stats[BATCH], q_start, stride_stats[ROW], HAS_SEQS),
            at(REF_STATS, b, stride_ref_stats[BATCH], q_start, stride_ref_stats[ROW], HAS_SEQS),
            at(KEY_PAD, b, stride_key_pad[BATCH], k_start, stride_key_pad[KEY], HAS_SEQS),
            at(SEGS, b, stride_seg[BATCH], k_start, stride_seg[KEY], HAS_SEQS))


@triton.jit
def work_unit(SEQS, stride_seqs, unit, max_q_len, max_k_len, HAS_SEQS: tl.constexpr):
    """(batch, q_start, q_len, k_start, k_len, q_pos) of work unit `unit`: its row of the sequence
    table, or without one (dense) batch `unit` with every row and key, q_pos = Sk - Sq."""
    if HAS_SEQS:
        b, q_start, q_len, k_start, k_len, pos0 = load_unit(SEQS, stride_seqs, unit)
    else:
        b, q_start, q_len, k_start, k_len = unit, 0, max_q_len, 0, max_k_len
        pos0 = max_k_len - max_q_len
    return b, q_start, q_len, k_start, k_len, pos0


# ----------------------------------------------------------------------------------------------
# Online softmax in log2 units, empty sets, key sets
# ----------------------------------------------------------------------------------------------


@triton.jit
def finite(x):
    """-inf (an empty set's LSE) -> 0, so that s - lse stays finite."""
    return tl.where(x == NEG_INF, 0.0, x)


@triton.jit
def any_row(mask):
    """Whether some row of the (BLOCK_M,) bool mask is set (a runtime branch condition)."""
    return tl.max(mask.to(tl.int32), 0) > 0


@triton.jit
def nonzero(l):
    """A softmax sum with 0 (an empty set) -> 1, so it can divide or go into log2; NaN passes."""
    return tl.where(l == 0.0, 1.0, l)


@triton.jit
def lse_natural(m, l):
    """The natural-log sum of a running max m and sum l in log2 units, rounded once: one fma takes
    m ln 2 exactly, plus the small rest (m (ln 2 - LN2_HI) + ln l); -inf for an empty set (l == 0),
    NaN for NaN. Stored as lse_A / lse_P: at |lse| ~ 50 one fp32 rounding is 2e-6 and every
    a = exp(s - lse) formed after carries it, so there is no second (m + log2 l, then times ln 2)."""
    mf = finite(m)
    return tl.where(l == 0.0, NEG_INF, tl.fma(mf, LN2_HI, mf * LN2_LO + tl.log2(nonzero(l)) * LN2))


@triton.jit
def sub_lse(s, lse):
    """s - lse log2(e): a score (or running max) in log2 units minus a finite natural-log statistic
    of its row (broadcast by the caller), with no rounding of lse log2(e) of its own (4e-6 at
    |lse| ~ 50): lse * LOG2E_HI is exact inside one explicit fma, which the compiler's fp
    contraction cannot split or fuse differently; lse * LOG2E_LO follows."""
    return tl.fma(-lse, LOG2E_HI, s) - lse * LOG2E_LO


@triton.jit
def lse2(m, l):
    """log2 sum from a running max and sum: -inf for an empty set (l == 0), NaN for NaN (a NaN input
    must not turn its row into an empty one)."""
    return tl.where(l == 0.0, NEG_INF, m + tl.log2(nonzero(l)))


@triton.jit
def online(m, l, x):
    """One tile of an online softmax in log2 units; x (BLOCK_M, BLOCK_N) is -inf off the set.
    -> (m_new, l_new, alpha, e, shift): shift = m_new, or 0 while the set is still empty;
    e = exp2(x - shift) and alpha = exp2(m - shift) rescales the sums carried so far."""
    m_new = tl.maximum(m, tl.max(x, 1))
    shift = tl.where(m_new == NEG_INF, 0.0, m_new)
    alpha = tl.exp2(m - shift)
    e = tl.exp2(x - shift[:, None])
    return m_new, l * alpha + tl.sum(e, 1), alpha, e, shift


@triton.jit
def key_ok(key_pad, stride_key_pad, offs_n, k_len, HAS_KEY_PAD: tl.constexpr):
    """(BLOCK_N,) bool: real keys (inside k_len and key_padding_mask True)."""
    ok = offs_n < k_len
    if HAS_KEY_PAD:
        ok = ok & (tl.load(key_pad + offs_n.to(tl.int64) * stride_key_pad[KEY], mask=ok, other=0) != 0)
    return ok


@triton.jit
def key_sets(offs_m, offs_n, keys_ok, q_len, pos0, CAUSAL: tl.constexpr, EXCLUDE_SELF: tl.constexpr):
    """Attended keys A and policy support P on a (BLOCK_M, BLOCK_N) tile; row i sits at key
    position pos0 + i (pos0 = Sk - Sq without a sequence table, the unit's q_pos with one)."""
    pos = offs_m + pos0
    att = (offs_m[:, None] < q_len) & keys_ok[None, :]
    if CAUSAL:
        att = att & (offs_n[None, :] <= pos[:, None])
    sup = att
    if EXCLUDE_SELF:
        sup = att & (offs_n[None, :] != pos[:, None])
    return att, sup


@triton.jit
def scores(q_ptr, k_ptr, stride_q, stride_k, offs_m, offs_n, q_len, k_len, head_dim, scale2,
           D_PAD: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """(BLOCK_M, BLOCK_N) scores of one head in log2 units: scale * log2(e) * q k^T."""
    offs_d = tl.arange(0, D_PAD)
    q = load_tile(q_ptr, offs_m, offs_d, stride_q[ROW], stride_q[DIM], q_len, head_dim)
    k = load_tile(k_ptr, offs_n, offs_d, stride_k[KEY], stride_k[DIM], k_len, head_dim)
    return matmul(q, tl.trans(k), UPCAST, PREC) * scale2


@triton.jit
def log_attention(q_ptr, k_ptr, stats, stride_q, stride_k, stride_s, h, group, offs_m, offs_n, q_len, k_len,
                  head_dim, scale2, D_PAD: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """log2 a_h = s_h - lse_A_h of head h (kv head h // group) on a (BLOCK_M, BLOCK_N) tile
    (meaningful on A only), from the natural-log statistics at `stats`."""
    s = scores(q_ptr + h * stride_q[HEAD], k_ptr + (h // group) * stride_k[HEAD], stride_q, stride_k,
               offs_m, offs_n, q_len, k_len, head_dim, scale2, D_PAD, UPCAST, PREC)
    la = finite(load_row(stats + h * stride_s[HEAD], offs_m, stride_s[ROW], q_len, 0.0))
    return sub_lse(s, la[:, None])


# ----------------------------------------------------------------------------------------------
# The policy and the reference on a tile, from the row statistics
# ----------------------------------------------------------------------------------------------


@triton.jit
def log_zsum(stats, stride_s, h0, n_heads, offs_m, q_len, BLOCK_M: tl.constexpr):
    """log2 sum_h Z_h over heads h0 .. h0+n_heads-1, Z_h = exp(lse_P - lse_A) read from the
    (natural-log) statistics at `stats`; (BLOCK_M,), -inf where the support is empty."""
    mx = tl.full([BLOCK_M], NEG_INF, tl.float32)
    sm = tl.full([BLOCK_M], 0.0, tl.float32)
    for hh in range(n_heads):
        h = h0 + hh
        la = finite(load_row(stats + h * stride_s[HEAD], offs_m, stride_s[ROW], q_len, 0.0))
        lp = load_row(stats + h * stride_s[HEAD] + stride_s[COL], offs_m, stride_s[ROW], q_len, NEG_INF)
        x = tl.where(lp == NEG_INF, NEG_INF, (lp - la) * LOG2E)  # log2 Z_h: the difference first
        m_new = tl.maximum(mx, x)
        m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
        sm = sm * tl.exp2(mx - m_use) + tl.exp2(x - m_use)
        mx = m_new
    return lse2(mx, sm)


@triton.jit
def log_policy(q_ptr, k_ptr, stats, stride_q, stride_k, stride_s, h0, n_heads, group, offs_m, offs_n, q_len, k_len,
               head_dim, scale2, log_z, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
               HEADS_EACH: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """log2 of the policy on a (BLOCK_M, BLOCK_N) tile (meaningful on P only); q_ptr / k_ptr /
    stats at the batch (and unit), heads by their strides.
    "each" (head h0): s - lse_P. "mean" (heads h0..h0+n_heads-1, kv head h // group):
    logsumexp_h(s_h - lse_A_h) - log_z, with log_z = log2 sum_h Z_h (the 1/H cancels)."""
    if HEADS_EACH:
        s = scores(q_ptr + h0 * stride_q[HEAD], k_ptr + (h0 // group) * stride_k[HEAD], stride_q, stride_k,
                   offs_m, offs_n, q_len, k_len, head_dim, scale2, D_PAD, UPCAST, PREC)
        lp = finite(load_row(stats + h0 * stride_s[HEAD] + stride_s[COL], offs_m, stride_s[ROW], q_len, 0.0))
        res = sub_lse(s, lp[:, None])
    else:
        mx = tl.full([BLOCK_M, BLOCK_N], NEG_INF, tl.float32)
        sm = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        for hh in range(n_heads):
            x = log_attention(q_ptr, k_ptr, stats, stride_q, stride_k, stride_s, h0 + hh, group, offs_m, offs_n,
                              q_len, k_len, head_dim, scale2, D_PAD, UPCAST, PREC)
            # online logsumexp with one exp2: the larger of (running max, x) costs nothing
            d = x - mx
            e = tl.exp2(-tl.abs(d))
            sm = tl.where(d > 0, sm * e + 1.0, sm + e)
            mx = tl.maximum(mx, x)
        res = mx + tl.log2(sm) - log_z[:, None]
    return res


# ----------------------------------------------------------------------------------------------
# Divergence terms
# ----------------------------------------------------------------------------------------------


@triton.jit
def jsd_logs(t2):
    """log(2 pi / (pi + rho)) and log(2 rho / (pi + rho)) (natural log) from t2 = log2 pi - log2 rho.
    The larger side is L(x) = log 2 - log(1 + exp(-x)) at x = |t| (natural), the other L - x: both
    exactly 0 at t = 0 and L accurate relative to its size, so that nearly equal distributions get
    a divergence of second order in t (docs/design.md, "The math"). Below x = 1/2 L is its Taylor
    series, x/2 - x^2/8 + x^4/192 - x^6/2880 + 17 x^8/645120 (truncation < 1e-8 relative, no
    transcendental call); above, log(1 + exp(-x)) no longer cancels against log 2."""
    x = tl.abs(t2) * LN2
    xx = x * x
    series = 0.5 * x - xx * (0.125 - xx * (1.0 / 192.0 - xx * (1.0 / 2880.0 - xx * (17.0 / 645120.0))))
    larger = tl.where(x < 0.5, series, (1.0 - tl.log2(1.0 + tl.exp2(-tl.abs(t2)))) * LN2)
    smaller = larger - x
    return tl.where(t2 >= 0, larger, smaller), tl.where(t2 >= 0, smaller, larger)


@triton.jit
def div_terms(lpi2, lrho2, DIVERGENCE: tl.constexpr):
    """Elementwise f(pi, rho), g = df/dpi and pi*g (natural log) from log2 pi and log2 rho.
    DIVERGENCE: 0 jsd, 1 kl(pi || rho), 2 reverse_kl = kl(rho || pi). reverse_kl's g = -rho / pi
    overflows to -inf where pi is below rho by more than 2^128 (scale 2.0 at D = 128 gets there);
    no kernel reads it: its products go through times_g, in log space."""
    pi = tl.exp2(lpi2)
    rho = tl.exp2(lrho2)
    if DIVERGENCE == 0:  # jsd: m = (pi + rho) / 2, dp = log(pi / m), dr = log(rho / m)
        dp, dr = jsd_logs(lpi2 - lrho2)
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
def times_g(lc2, g, lpi2, lrho2, DIVERGENCE: tl.constexpr):
    """c * g for c = exp2(lc2) <= pi (up to the head count); for reverse_kl in log space,
    -exp2(lc2 + lrho2 - lpi2), so that a tiny pi never makes inf * 0."""
    if DIVERGENCE == 2:
        res = -tl.exp2(lc2 + lrho2 - lpi2)
    else:
        res = tl.exp2(lc2) * g
    return res


# ----------------------------------------------------------------------------------------------
# Statistics of the policy (docs/design.md, "Attention statistics")
# ----------------------------------------------------------------------------------------------


@triton.jit
def load_segments(segs, stride_seg, offs_n, k_len):
    """(BLOCK_N,) int32 segment ids of the keys (-1 past k_len)."""
    return tl.load(segs + offs_n.to(tl.int64) * stride_seg[KEY], mask=offs_n < k_len, other=-1)


@triton.jit
def stat_sums(x, neg_log_pi, seg, keep, NUM_SEG: tl.constexpr, NSTAT_PAD: tl.constexpr):
    """(BLOCK_M, NSTAT_PAD) row sums over `keep` of x * [-log pi, [seg = 0], .., [seg = S-1]]:
    column 0 the entropy term, column 1 + s segment s, 0 beyond 1 + NUM_SEG. x = pi gives the row's
    entropy and masses; x = a_h (heads="mean") the u_h of every statistic's c_h."""
    cols = tl.arange(0, NSTAT_PAD)[None, :]
    res = tl.where(cols == 0, tl.sum(tl.where(keep, x * neg_log_pi, 0.0), 1)[:, None], 0.0)
    for s in tl.static_range(NUM_SEG):
        mass = tl.sum(tl.where(keep & (seg[None, :] == s), x, 0.0), 1)
        res += tl.where(cols == 1 + s, mass[:, None], 0.0)
    return res


@triton.jit
def stat_grad(neg_log_pi, seg, weights, NUM_SEG: tl.constexpr, NSTAT_PAD: tl.constexpr):
    """The statistics' part of g on a (BLOCK_M, BLOCK_N) tile, w_E (-log pi_j) + w_seg(j), from the
    rows' weights (BLOCK_M, NSTAT_PAD) = [w_E, w_0 .. w_{S-1}]."""
    cols = tl.arange(0, NSTAT_PAD)[None, :]
    w_e = tl.sum(tl.where(cols == 0, weights, 0.0), 1)
    g = w_e[:, None] * neg_log_pi
    for s in tl.static_range(NUM_SEG):
        w_s = tl.sum(tl.where(cols == 1 + s, weights, 0.0), 1)
        g += tl.where(seg[None, :] == s, w_s[:, None], 0.0)
    return g


@triton.jit
def row_tile(base, offs_m, stride, q_len, n_cols, NSTAT_PAD: tl.constexpr):
    """Pointers and mask of a (BLOCK_M, NSTAT_PAD) tile of per-row columns 0 .. n_cols-1 at `base`
    (rows by stride[ROW], columns by stride[COL])."""
    cols = tl.arange(0, NSTAT_PAD)
    ptrs = base + offs_m[:, None].to(tl.int64) * stride[ROW] + cols[None, :] * stride[COL]
    return ptrs, (offs_m[:, None] < q_len) & (cols[None, :] < n_cols)
