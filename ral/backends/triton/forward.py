"""The forward kernel: out, div, stats (and the reference's stats), gbar, cbar and, with policy
statistics, entropy, mass and cstats, in one launch.

Grid (``launch.forward_grid``): 1-D, cdiv(max_q_len, BLOCK_M) x units for heads="mean" | x units*H
for "each" (axis 0, because axis 1 stops at 65535). A unit is a batch row without a sequence table
and one row of the table with one. Program ids run over the query blocks slowest and in descending
order, (unit, head) fastest: pid 0 takes the LAST query block, which under causal masking sweeps
the most keys, so the heaviest programs start first. A program owns BLOCK_M query rows of one unit
and every head of the row ("mean": the policy couples all heads) or one head ("each": head h of
both models); with a table, programs past their unit's last row return at once.

``forward_kernel`` runs one of two schedules (the constexpr ONE_SWEEP):

one sweep (``one_sweep``), heads="each" with kl / reverse_kl and no statistics. Per key tile:
  s = q k^T and s_ref = q_ref k_ref^T; online softmax of s over A (-> lse_A, `out`) and over P
  (-> lse_P, its own running max, so Z never comes from 1 - a_self), of s_ref over A and P
  (-> ref_stats_out; with ref_stats given, lse_RP is read and serves as the reference's fixed
  shift), and the divergence sum carried by online rescaling, weighted by the distribution the
  divergence averages over:
    kl:         T = sum_P e^(s-m) [(s-m) - (s_ref-m_r)]          div = T/l - log l + log l_r
    reverse_kl: T = sum_P e^(s_ref-m_r) [(s_ref-m_r) - (s-m)]    div = T/l_r - log l_r + log l
  (m, l / m_r, l_r: running max and sum over P of the model / the reference; with ref_stats,
  m_r = lse_RP in log2 units, its float32 part, whose exact rest r_lo enters div.) Every term is relative to the
  running maxes, so no difference of two large log-normalisers appears; when a max moves, T gets
  alpha (T + l_old (shift change)). gbar = div + 1 (kl), gbar = -sum_P rho (reverse_kl), each as the
  mean under the pi the backward forms from the stored statistics (one_sweep), cbar = 0.

two sweeps, every other call (jsd, heads="mean", policy statistics), because the divergence of a
  key needs the row's normalisers (jsd: log((pi + rho)/2); "mean": log sum_h Z_h).
  pass 1, per head, one key sweep (``head_softmax``): online softmax -> lse_A, lse_P and `out`;
          the same for the reference heads unless ref_stats is given. The statistics go to
          `stats` / `ref_stats_out` and are read back after a barrier (no register file of H rows).
  pass 2, one key sweep: per key tile, log pi = logsumexp_h(s_h - lse_A_h) - log sum_h Z_h (an
          online logsumexp over the heads, one exp2 per element and head) and log rho likewise;
          f and g of the divergence -> div, gbar = sum_P pi g / sum_P pi (normalised by the sum of
          the very pi formed here, which misses 1 by the statistics' rounding); then ("mean") a
          second loop over the heads recomputes a_h and accumulates u_h = sum_P a_h g and
          z_h = sum_P a_h in (BLOCK_M, H_PAD) register tiles, giving cbar_h = (u_h - gbar z_h) / Z.
  POLICY_STATS (docs/design.md, "Attention statistics"): pass 2 also sums, per row, the entropy
          -sum_P pi log pi and the mass of each of the NUM_SEG key segments (SEGS, the keys' ids)
          in a (BLOCK_M, NSTAT_PAD) tile [entropy, mass_0 ..] and, for "mean", per head the same
          sums weighted by a_h instead of pi in a (BLOCK_M, H_PAD, NSTAT_PAD) tile, giving
          cstats_h = (u_h - stat Z_h) / Z per statistic. NO_REF (ral.ops.attention_stats): the
          reference is never read, div = gbar = cbar = 0.

Row rules: rows with row_mask False or an empty support get div = gbar = cbar = 0 and zero
statistics (a block without live rows skips pass 2); a NaN input gives NaN statistics and div in
the rows it touches (an empty set is l == 0, not "l > 0 fails"). Memory: no Sq x Sk buffer, no
scratch. Every tensor's strides come as one tuple (common.py: BATCH, HEAD, ROW / KEY, DIM / COL).
"""

from __future__ import annotations

from .common import (BATCH, COL, DIM, HEAD, KEY, LN2, NEG_INF, ROW, any_row, at, div_terms, finite, key_ok, key_sets,
                     load_row, load_segments, load_tile, log_attention, log_policy, log_zsum, lse_natural, matmul,
                     model_bases, nonzero, online, row_tile, stat_sums, sub_lse, times_g, tl, triton, work_unit)


@triton.jit
def attend_tile(m, l, acc, s, att, v_ptr, offs_n, offs_dv, stride_v, k_len, v_dim, HAS_V: tl.constexpr,
                UPCAST: tl.constexpr, PREC: tl.constexpr):
    """One key tile of the online softmax over A(i) (s: (BLOCK_M, BLOCK_N) scores in log2 units, att:
    the attended mask): the running max m and sum l, and with v the output accumulator acc
    (BLOCK_M, DV_PAD). Returns m, l, acc and online()'s alpha, e, shift for the caller's own sums."""
    m, l, alpha, e, shift = online(m, l, tl.where(att, s, NEG_INF))
    if HAS_V:
        v = load_tile(v_ptr, offs_n, offs_dv, stride_v[KEY], stride_v[DIM], k_len, v_dim)
        acc = acc * alpha[:, None] + matmul(e.to(v.dtype), v, UPCAST, PREC)
    return m, l, acc, alpha, e, shift


@triton.jit
def head_softmax(q_ptr, k_ptr, v_ptr, out_ptr, stride_q, stride_k, stride_v, stride_out, key_pad, stride_key_pad,
                 offs_m, q_len, k_len, pos0, head_dim, v_dim, scale2, n_end,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                 HAS_V: tl.constexpr, HAS_KEY_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                 EXCLUDE_SELF: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Pass 1 for one head: one sweep over keys [0, n_end). Returns (lse_A, lse_P), (BLOCK_M,) each
    in natural log as stored (``lse_natural``; -inf for an empty set), and writes out = softmax_A(s) v
    (0 for an empty A)."""
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = load_tile(q_ptr, offs_m, offs_d, stride_q[ROW], stride_q[DIM], q_len, head_dim)
    m_a = tl.full([BLOCK_M], NEG_INF, tl.float32)
    l_a = tl.full([BLOCK_M], 0.0, tl.float32)
    m_p = tl.full([BLOCK_M], NEG_INF, tl.float32)
    l_p = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, DV_PAD], 0.0, tl.float32)
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(k_ptr, offs_n, offs_d, stride_k[KEY], stride_k[DIM], k_len, head_dim)
        s = matmul(q, tl.trans(k), UPCAST, PREC) * scale2
        att, sup = key_sets(offs_m, offs_n, key_ok(key_pad, stride_key_pad, offs_n, k_len, HAS_KEY_PAD),
                            q_len, pos0, CAUSAL, EXCLUDE_SELF)
        m_a, l_a, acc, _, _, _ = attend_tile(m_a, l_a, acc, s, att, v_ptr, offs_n, offs_dv, stride_v, k_len, v_dim,
                                             HAS_V, UPCAST, PREC)
        if EXCLUDE_SELF:
            m_p, l_p, _, _, _ = online(m_p, l_p, tl.where(sup, s, NEG_INF))
    lse_a = lse_natural(m_a, l_a)
    if EXCLUDE_SELF:
        lse_p = lse_natural(m_p, l_p)
    else:
        lse_p = lse_a
    if HAS_V:
        o = acc / nonzero(l_a)[:, None]
        ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_out[ROW] + offs_dv[None, :].to(tl.int64) * stride_out[DIM]
        tl.store(ptrs, o.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < q_len) & (offs_dv[None, :] < v_dim))
    return lse_a, lse_p


@triton.jit
def store_lse(ptr, stride, offs_m, row_ok, lse_a, lse_p):
    """[lse_A, lse_P] (natural log, ``lse_natural``) of one head's rows into a statistics tensor."""
    ptrs = ptr + offs_m.to(tl.int64) * stride[ROW]
    tl.store(ptrs, lse_a, mask=row_ok)
    tl.store(ptrs + stride[COL], lse_p, mask=row_ok)


@triton.jit
def forward_program(max_q_len, n_heads, BLOCK_M: tl.constexpr, HEADS_EACH: tl.constexpr):
    """This program's (query block, unit, first head): the 1-D grid of launch.forward_grid, the last
    query block first. "mean": all heads from 0; "each": one head."""
    n_mblk = (max_q_len + BLOCK_M - 1) // BLOCK_M
    n_groups = tl.num_programs(0) // n_mblk  # units ("mean") or units * H ("each")
    pid = tl.program_id(0)
    pid_m = n_mblk - 1 - pid // n_groups
    pid_bh = (pid % n_groups).to(tl.int64)
    if HEADS_EACH:
        unit = pid_bh // n_heads
        h0 = pid_bh % n_heads
    else:
        unit = pid_bh
        h0 = pid_bh * 0
    return pid_m, unit, h0


@triton.jit
def live_rows(row_mask, stride_row_mask, offs_m, row_ok, nonempty, HAS_ROW_MASK: tl.constexpr):
    """(BLOCK_M,) rows that carry a divergence and statistics: inside the unit, a non-empty support
    and row_mask True (row_mask at the unit's first row)."""
    live = row_ok & nonempty
    if HAS_ROW_MASK:
        live = live & (tl.load(row_mask + offs_m.to(tl.int64) * stride_row_mask[ROW], mask=row_ok, other=0) != 0)
    return live


@triton.jit
def one_sweep(q_ptr, k_ptr, v_ptr, q_ref_ptr, k_ref_ptr, stats_ptr, ref_stats_ptr, out_ptr, key_pad,
              stride_q, stride_k, stride_v, stride_q_ref, stride_k_ref, stride_stats, stride_ref_stats, stride_out,
              stride_key_pad, offs_m, q_len, k_len, pos0, n_end, head_dim, v_dim, ref_dim, scale2, ref_scale2,
              DIVERGENCE: tl.constexpr, EXCLUDE_SELF: tl.constexpr, CAUSAL: tl.constexpr, HAS_V: tl.constexpr,
              HAS_REF_STATS: tl.constexpr, HAS_KEY_PAD: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
              DR_PAD: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The one-sweep schedule (heads="each" with kl / reverse_kl) for one head, the pointers at that
    head (kv head h // group, reference kv head h // ref_group). Online softmax of s over A
    (-> lse_A, out) and over P (-> lse_P), of s_ref over A and P (unless ref_stats gives lse_RP;
    then its shift is that constant), and the divergence sum carried with the weights of the
    distribution that weighs it, in shifted log space (log2 units):
      kl:         T = sum_P e^(s - m) [(s - m) - (s_ref - m_r)],   weights pi:  div = T / l - log l + log l_r
      reverse_kl: T = sum_P e^(s_ref - m_r) [(s_ref - m_r) - (s - m)], weights rho:
                  div = T / l_r - log l_r + log l   (with ref_stats: m_r = lse_RP, l_r = sum rho ~ 1)
    m, l / m_r, l_r: the running max and sum over P of the current model / reference; every term is
    relative to the running maxes (never s - lse of two large numbers), and when a max moves the
    carried T gets alpha * l_old * (shift change) besides the rescale alpha. Writes out, stats and
    (unless HAS_REF_STATS) ref_stats of the head; returns (div, gbar, lse_P) per row (lse_P natural, as stored),
    gbar the mean of g under the pi the backward forms from the stored statistics: div + 1 (kl),
    -sum_P rho / sum_P pi (reverse_kl), each corrected by those statistics' rounding (delta below);
    dead rows are not zeroed."""
    row_ok = offs_m < q_len
    offs_d = tl.arange(0, D_PAD)
    offs_dr = tl.arange(0, DR_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = load_tile(q_ptr, offs_m, offs_d, stride_q[ROW], stride_q[DIM], q_len, head_dim)
    qr = load_tile(q_ref_ptr, offs_m, offs_dr, stride_q_ref[ROW], stride_q_ref[DIM], q_len, ref_dim)
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
        # the given normaliser in log2 units is m_r + r_lo exactly: m_r (a float32 near it, formed by
        # sub_lse so that s_ref - m_r is never contracted into an fma of its own) is the reference's
        # fixed shift, and rho = e^(s_ref - m_r) 2^(-r_lo), as the backward forms it (sub_lse)
        lse_rp = finite(load_row(ref_stats_ptr + stride_ref_stats[COL], offs_m, stride_ref_stats[ROW], q_len, 0.0))
        m_r = -sub_lse(zero, lse_rp)
        r_lo = -sub_lse(m_r, lse_rp)
    else:
        m_r = ninf
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        att, sup = key_sets(offs_m, offs_n, key_ok(key_pad, stride_key_pad, offs_n, k_len, HAS_KEY_PAD),
                            q_len, pos0, CAUSAL, EXCLUDE_SELF)
        k = load_tile(k_ptr, offs_n, offs_d, stride_k[KEY], stride_k[DIM], k_len, head_dim)
        s = matmul(q, tl.trans(k), UPCAST, PREC) * scale2
        kr = load_tile(k_ref_ptr, offs_n, offs_dr, stride_k_ref[KEY], stride_k_ref[DIM], k_len, ref_dim)
        sr = matmul(qr, tl.trans(kr), UPCAST, PREC) * ref_scale2
        # current model over A (and out)
        p_old = finite(m_p)
        lp_old = l_p
        m_a, l_a, acc, alpha_a, e_a, sh_a = attend_tile(m_a, l_a, acc, s, att, v_ptr, offs_n, offs_dv, stride_v,
                                                        k_len, v_dim, HAS_V, UPCAST, PREC)
        # current model over P
        if EXCLUDE_SELF:
            m_p, l_p, alpha_p, e_p, sh_p = online(m_p, l_p, tl.where(sup, s, NEG_INF))
        else:
            m_p, l_p, alpha_p, e_p, sh_p = m_a, l_a, alpha_a, e_a, sh_a
        # reference over A and P (only the P shift / sums when ref_stats is given)
        r_old = finite(m_r)
        lr_old = l_r
        if HAS_REF_STATS:
            sh_r = m_r
            if DIVERGENCE == 2:
                e_r = tl.exp2(tl.where(sup, sr, NEG_INF) - sh_r[:, None])
                alpha_r = tl.full([BLOCK_M], 1.0, tl.float32)
                l_r = l_r + tl.sum(e_r, 1)
        else:
            m_ra, l_ra, alpha_ra, e_ra, sh_ra = online(m_ra, l_ra, tl.where(att, sr, NEG_INF))
            if EXCLUDE_SELF:
                m_r, l_r, alpha_r, e_r, sh_r = online(m_r, l_r, tl.where(sup, sr, NEG_INF))
            else:
                m_r, l_r, alpha_r, e_r, sh_r = m_ra, l_ra, alpha_ra, e_ra, sh_ra
        # the divergence sum, weighted by pi (kl) or rho (reverse_kl)
        if DIVERGENCE == 1:
            x = (s - sh_p[:, None]) - (sr - sh_r[:, None])
            t = alpha_p * (t + lp_old * ((p_old - sh_p) + (sh_r - r_old))) \
                + tl.sum(tl.where(sup, e_p * x, 0.0), 1)
        else:
            x = (sr - sh_r[:, None]) - (s - sh_p[:, None])
            t = alpha_r * (t + lr_old * ((r_old - sh_r) + (sh_p - p_old))) \
                + tl.sum(tl.where(sup, e_r * x, 0.0), 1)

    lse_p = lse_natural(m_p, l_p)
    store_lse(stats_ptr, stride_stats, offs_m, row_ok, lse_natural(m_a, l_a), lse_p)
    if not HAS_REF_STATS:
        lse_rp = lse_natural(m_r, l_r)
        store_lse(ref_stats_ptr, stride_ref_stats, offs_m, row_ok, lse_natural(m_ra, l_ra), lse_rp)
    if HAS_V:
        o = acc / nonzero(l_a)[:, None]
        ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_out[ROW] + offs_dv[None, :].to(tl.int64) * stride_out[DIM]
        tl.store(ptrs, o.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < q_len) & (offs_dv[None, :] < v_dim))

    l_safe = nonzero(l_p)
    # The backward forms pi = exp2(s - lp) and rho = exp2(s_ref - lr) with lp, lr the stored lse_P's
    # in log2 (``sub_lse``): over P they sum to exp2(delta), exp2(delta_r), delta = m + log2 l - lp,
    # not to 1. gbar is the mean of g under those pi (docs/design.md, "Gradient"), so that the
    # backward's sum_P pi (g - gbar) vanishes: for kl div + 1 + (delta - delta_r) ln 2, for
    # reverse_kl -sum_P rho / sum_P pi. With ref_stats the backward's rho is the one below (delta_r = 0).
    delta = sub_lse(finite(m_p), finite(lse_p)) + tl.log2(l_safe)  # 0 on empty rows
    if HAS_REF_STATS:
        delta_r = zero
    else:
        delta_r = sub_lse(finite(m_r), finite(lse_rp)) + tl.log2(nonzero(l_r))
    if DIVERGENCE == 1:
        if HAS_REF_STATS:
            ref_off = r_lo  # log rho = (s_ref - m_r) - r_lo
        else:
            ref_off = tl.log2(nonzero(l_r))
        div = (t / l_safe - tl.log2(l_safe) + ref_off) * LN2
        gbar = div + 1.0 + (delta - delta_r) * LN2
    else:
        lr_safe = nonzero(l_r)
        if HAS_REF_STATS:
            # rho = e_r 2^(-r_lo) with e_r = e^(s_ref - m_r), sum_P e_r = l_r (1 up to the rounding of lse_RP)
            div = tl.exp2(-r_lo) * (t + l_r * (tl.log2(l_safe) - r_lo)) * LN2
            gbar = -l_r * tl.exp2(-delta - r_lo)
        else:
            div = (t / lr_safe - tl.log2(lr_safe) + tl.log2(l_safe)) * LN2
            gbar = -tl.exp2(delta_r - delta)
    return div, gbar, lse_p


@triton.jit
def forward_kernel(
        Q, K, V, Q_REF, K_REF, REF_STATS, KEY_PAD, ROW_MASK, SEQS, SEGS,
        OUT, STATS, DIV, GBAR, CBAR, ENTROPY, MASS, CSTATS,
        stride_q, stride_k, stride_v, stride_q_ref, stride_k_ref, stride_ref_stats, stride_key_pad,
        stride_row_mask, stride_seg, stride_out, stride_stats, stride_div, stride_cbar, stride_mass,
        stride_cstats, stride_seqs,
        n_heads, group, ref_heads, ref_group, max_q_len, max_k_len, head_dim, v_dim, ref_dim,
        scale2, ref_scale2, len_bucket,
        DIVERGENCE: tl.constexpr, HEADS_EACH: tl.constexpr, ONE_SWEEP: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_V: tl.constexpr, HAS_REF_STATS: tl.constexpr, NO_REF: tl.constexpr,
        HAS_KEY_PAD: tl.constexpr, HAS_ROW_MASK: tl.constexpr, HAS_SEQS: tl.constexpr,
        POLICY_STATS: tl.constexpr, NUM_SEG: tl.constexpr, NSTAT_PAD: tl.constexpr,
        D_PAD: tl.constexpr, DV_PAD: tl.constexpr, DR_PAD: tl.constexpr, H_PAD: tl.constexpr,
        UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """BLOCK_M query rows of one unit, all heads ("mean") or head h ("each"). Writes OUT (B,H,Sq,Dv),
    STATS (B,H,Sq,2), REF_STATS (B,Hr,Sq,2) unless HAS_REF_STATS (then read), DIV / GBAR (B,Sq) |
    (B,H,Sq) and CBAR (B,H,Sq); with POLICY_STATS also ENTROPY (like DIV, with DIV's strides),
    MASS (B,Sq,S) | (B,H,Sq,S) when NUM_SEG = S > 0 (SEGS (B,Sk) int32 ids) and, for "mean", CSTATS
    (B,H,Sq,1+S). ONE_SWEEP: the one-sweep schedule (HEADS_EACH, kl / reverse_kl, no statistics).
    max_q_len, max_k_len: Sq, Sk without a sequence table (SEQS), the longest unit's with one."""
    pid_m, unit, h0 = forward_program(max_q_len, n_heads, BLOCK_M, HEADS_EACH)
    b, q_start, q_len, k_start, k_len, pos0 = work_unit(SEQS, stride_seqs, unit, max_q_len, max_k_len, HAS_SEQS)
    if HAS_SEQS:  # programs past their unit's end
        if pid_m * BLOCK_M >= q_len:
            return
    if HEADS_EACH:
        NH = 1
        NHR = 1
    else:
        NH = n_heads
        NHR = ref_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < q_len
    if CAUSAL:
        n_end = tl.minimum(k_len, pos0 + (pid_m + 1) * BLOCK_M)
    else:
        n_end = k_len
    Qb, Kb, Vb, QRb, KRb, Sb, RSb, KPb, SEGb = model_bases(
        Q, K, V, Q_REF, K_REF, STATS, REF_STATS, KEY_PAD, SEGS, b, q_start, k_start, stride_q, stride_k, stride_v,
        stride_q_ref, stride_k_ref, stride_stats, stride_ref_stats, stride_key_pad, stride_seg, HAS_SEQS)
    Ob = at(OUT, b, stride_out[BATCH], q_start, stride_out[ROW], HAS_SEQS)
    RMb = at(ROW_MASK, b, stride_row_mask[BATCH], q_start, stride_row_mask[ROW], HAS_SEQS)
    rows = offs_m.to(tl.int64) * stride_div[ROW]

    if ONE_SWEEP:
        div, gbar, lse_p = one_sweep(
            Qb + h0 * stride_q[HEAD], Kb + (h0 // group) * stride_k[HEAD], Vb + (h0 // group) * stride_v[HEAD],
            QRb + h0 * stride_q_ref[HEAD], KRb + (h0 // ref_group) * stride_k_ref[HEAD],
            Sb + h0 * stride_stats[HEAD], RSb + h0 * stride_ref_stats[HEAD], Ob + h0 * stride_out[HEAD], KPb,
            stride_q, stride_k, stride_v, stride_q_ref, stride_k_ref, stride_stats, stride_ref_stats, stride_out,
            stride_key_pad, offs_m, q_len, k_len, pos0, n_end, head_dim, v_dim, ref_dim, scale2, ref_scale2,
            DIVERGENCE, EXCLUDE_SELF, CAUSAL, HAS_V, HAS_REF_STATS, HAS_KEY_PAD, D_PAD, DV_PAD, DR_PAD, UPCAST,
            PREC, BLOCK_M, BLOCK_N)
        live = live_rows(RMb, stride_row_mask, offs_m, row_ok, lse_p != NEG_INF, HAS_ROW_MASK)
    else:
        # ---- pass 1: row statistics (and out) per head ---------------------------------------
        for hh in range(NH):
            h = h0 + hh
            lse_a, lse_p = head_softmax(
                Qb + h * stride_q[HEAD], Kb + (h // group) * stride_k[HEAD], Vb + (h // group) * stride_v[HEAD],
                Ob + h * stride_out[HEAD], stride_q, stride_k, stride_v, stride_out, KPb, stride_key_pad,
                offs_m, q_len, k_len, pos0, head_dim, v_dim, scale2, n_end, BLOCK_M, BLOCK_N, D_PAD, DV_PAD,
                HAS_V, HAS_KEY_PAD, CAUSAL, EXCLUDE_SELF, UPCAST, PREC)
            store_lse(Sb + h * stride_stats[HEAD], stride_stats, offs_m, row_ok, lse_a, lse_p)
        if not HAS_REF_STATS:
            if not NO_REF:
                for rr in range(NHR):
                    r = h0 + rr
                    lse_a, lse_p = head_softmax(
                        QRb + r * stride_q_ref[HEAD], KRb + (r // ref_group) * stride_k_ref[HEAD], QRb, QRb,
                        stride_q_ref, stride_k_ref, stride_q_ref, stride_q_ref, KPb, stride_key_pad, offs_m,
                        q_len, k_len, pos0, ref_dim, 0, ref_scale2, n_end, BLOCK_M, BLOCK_N, DR_PAD, 16, False,
                        HAS_KEY_PAD, CAUSAL, EXCLUDE_SELF, UPCAST, PREC)
                    store_lse(RSb + r * stride_ref_stats[HEAD], stride_ref_stats, offs_m, row_ok, lse_a, lse_p)
        tl.debug_barrier()  # pass 2 reads the statistics that other threads of this program wrote

        # ---- pass 2: policy, reference, divergence, statistics -------------------------------
        log_z = log_zsum(Sb, stride_stats, h0, NH, offs_m, q_len, BLOCK_M)
        live = live_rows(RMb, stride_row_mask, offs_m, row_ok, log_z != NEG_INF, HAS_ROW_MASK)
        log_z = tl.where(live, log_z, 0.0)
        if not NO_REF:
            log_zr = finite(log_zsum(RSb, stride_ref_stats, h0, NHR, offs_m, q_len, BLOCK_M))
        n_end2 = tl.where(any_row(live), n_end, 0)
        div = tl.full([BLOCK_M], 0.0, tl.float32)
        gbar = tl.full([BLOCK_M], 0.0, tl.float32)
        mass = tl.full([BLOCK_M], 0.0, tl.float32)                        # sum_P pi
        u = tl.full([BLOCK_M, H_PAD], 0.0, tl.float32)
        z_acc = tl.full([BLOCK_M, H_PAD], 0.0, tl.float32)               # sum_P a_h per head ("mean")
        heads = tl.arange(0, H_PAD)
        pstat = tl.full([BLOCK_M, NSTAT_PAD], 0.0, tl.float32)           # [entropy, mass_0 ..] per row
        ustat = tl.full([BLOCK_M, H_PAD, NSTAT_PAD], 0.0, tl.float32)    # their u_h per head ("mean")
        for start_n in range(0, n_end2, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            att, sup = key_sets(offs_m, offs_n, key_ok(KPb, stride_key_pad, offs_n, k_len, HAS_KEY_PAD),
                                q_len, pos0, CAUSAL, EXCLUDE_SELF)
            keep = sup & live[:, None]
            lpi = log_policy(Qb, Kb, Sb, stride_q, stride_k, stride_stats, h0, NH, group, offs_m, offs_n, q_len,
                             k_len, head_dim, scale2, log_z, BLOCK_M, BLOCK_N, D_PAD, HEADS_EACH, UPCAST, PREC)
            if not NO_REF:
                lrho = log_policy(QRb, KRb, RSb, stride_q_ref, stride_k_ref, stride_ref_stats, h0, NHR, ref_group,
                                  offs_m, offs_n, q_len, k_len, ref_dim, ref_scale2, log_zr,
                                  BLOCK_M, BLOCK_N, DR_PAD, HEADS_EACH, UPCAST, PREC)
                f, g, pig = div_terms(lpi, lrho, DIVERGENCE)
                div += tl.sum(tl.where(keep, f, 0.0), 1)
                gbar += tl.sum(tl.where(keep, pig, 0.0), 1)
                mass += tl.sum(tl.where(keep, tl.exp2(lpi), 0.0), 1)
            if POLICY_STATS:
                seg = load_segments(SEGb, stride_seg, offs_n, k_len)
                neg_log_pi = -lpi * LN2
                pstat += stat_sums(tl.exp2(lpi), neg_log_pi, seg, keep, NUM_SEG, NSTAT_PAD)
            if not HEADS_EACH:
                for hh in range(NH):
                    log_a = log_attention(Qb, Kb, Sb, stride_q, stride_k, stride_stats, h0 + hh, group, offs_m,
                                          offs_n, q_len, k_len, head_dim, scale2, D_PAD, UPCAST, PREC)
                    zh = tl.sum(tl.where(keep, tl.exp2(log_a), 0.0), 1)
                    z_acc += tl.where(heads[None, :] == hh, zh[:, None], 0.0)
                    if not NO_REF:
                        uh = tl.sum(tl.where(keep, times_g(log_a, g, lpi, lrho, DIVERGENCE), 0.0), 1)
                        u += tl.where(heads[None, :] == hh, uh[:, None], 0.0)
                    if POLICY_STATS:
                        sh = stat_sums(tl.exp2(log_a), neg_log_pi, seg, keep, NUM_SEG, NSTAT_PAD)
                        ustat += tl.where(heads[None, :, None] == hh, sh[:, None, :], 0.0)

        # gbar = sum_P pi g / sum_P pi over the pi formed here (and again by the backward): their sum
        # misses 1 by the rounding of the statistics, and sum_P pi (g - gbar) would carry that error
        # times gbar (large for kl far from the reference); c_h below uses the accumulated sum_P a_h.
        gbar = tl.where(mass > 0.0, gbar / tl.where(mass > 0.0, mass, 1.0), gbar)
        if not HEADS_EACH:
            # c_h = (u_h - gbar z_h) / Z per head, z_h = sum_P a_h as accumulated; likewise per statistic
            inv_z = n_heads * tl.exp2(-log_z)  # 1 / Z, Z = (1/H) sum_h Z_h
            crow = at(CBAR, b, stride_cbar[BATCH], q_start, stride_cbar[ROW], HAS_SEQS) \
                + offs_m.to(tl.int64) * stride_cbar[ROW]
            CSb = at(CSTATS, b, stride_cstats[BATCH], q_start, stride_cstats[ROW], HAS_SEQS)
            for hh in range(NH):
                h = h0 + hh
                z_h = tl.sum(tl.where(heads[None, :] == hh, z_acc, 0.0), 1)
                uh = tl.sum(tl.where(heads[None, :] == hh, u, 0.0), 1)
                tl.store(crow + h * stride_cbar[HEAD], tl.where(live, (uh - gbar * z_h) * inv_z, 0.0), mask=row_ok)
                if POLICY_STATS:
                    ush = tl.sum(tl.where(heads[None, :, None] == hh, ustat, 0.0), 1)
                    c = (ush - pstat * z_h[:, None]) * inv_z[:, None]
                    ptrs, mask = row_tile(CSb + h * stride_cstats[HEAD], offs_m, stride_cstats, q_len, 1 + NUM_SEG,
                                          NSTAT_PAD)
                    tl.store(ptrs, tl.where(live[:, None], c, 0.0), mask=mask)
        if POLICY_STATS:
            pstat = tl.where(live[:, None], pstat, 0.0)
            cols = tl.arange(0, NSTAT_PAD)[None, :]
            entropy = tl.sum(tl.where(cols == 0, pstat, 0.0), 1)
            ENTb = at(ENTROPY, b, stride_div[BATCH], q_start, stride_div[ROW], HAS_SEQS)
            tl.store(ENTb + h0 * stride_div[HEAD] + rows, entropy, mask=row_ok)
            if NUM_SEG > 0:  # mass s is column 1 + s
                MSb = at(MASS, b, stride_mass[BATCH], q_start, stride_mass[ROW], HAS_SEQS) + h0 * stride_mass[HEAD]
                ptrs, mask = row_tile(MSb - stride_mass[COL], offs_m, stride_mass, q_len, 1 + NUM_SEG, NSTAT_PAD)
                tl.store(ptrs, pstat, mask=mask & (cols >= 1))

    DIVb = at(DIV, b, stride_div[BATCH], q_start, stride_div[ROW], HAS_SEQS) + h0 * stride_div[HEAD]
    GBARb = at(GBAR, b, stride_div[BATCH], q_start, stride_div[ROW], HAS_SEQS) + h0 * stride_div[HEAD]
    tl.store(DIVb + rows, tl.where(live, div, 0.0), mask=row_ok)
    tl.store(GBARb + rows, tl.where(live, gbar, 0.0), mask=row_ok)
    if HEADS_EACH:
        tl.store(at(CBAR, b, stride_cbar[BATCH], q_start, stride_cbar[ROW], HAS_SEQS) + h0 * stride_cbar[HEAD]
                 + offs_m.to(tl.int64) * stride_cbar[ROW], tl.full([BLOCK_M], 0.0, tl.float32), mask=row_ok)
