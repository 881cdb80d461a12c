"""The forward kernels: out, div, stats (and the reference's stats), gbar, cbar in one launch.

Grid (``launch.forward_grid``): 1-D, cdiv(max_q_len, BLOCK_M) x units for heads="mean" | x units*H
for "each" (axis 0, because axis 1 stops at 65535). A unit is a batch row without a sequence table
and one row of the table with one. Program ids run over the query blocks slowest and in descending
order, (unit, head) fastest: pid 0 takes the LAST query block, which under causal masking sweeps
the most keys, so the heaviest programs start first. A program owns BLOCK_M query rows of one unit
and every head of the row ("mean": the policy couples all heads) or one head ("each": head h of
both models); with a table, programs past their unit's last row return at once.

Two kernels:

``forward_each_kernel``, heads="each" with kl / reverse_kl: ONE key sweep. Per key tile:
  s = q k^T and s_ref = q_ref k_ref^T; online softmax of s over A (-> lse_A, `out`) and over P
  (-> lse_P, its own running max, so Z never comes from 1 - a_self), of s_ref over A and P
  (-> ref_stats_out; with ref_stats given, lse_RP is read and serves as the reference's fixed
  shift), and the divergence sum carried by online rescaling, weighted by the distribution the
  divergence averages over:
    kl:         T = sum_P e^(s-m) [(s-m) - (s_ref-m_r)]          div = T/l - log l + log l_r
    reverse_kl: T = sum_P e^(s_ref-m_r) [(s_ref-m_r) - (s-m)]    div = T/l_r - log l_r + log l
  (m, l / m_r, l_r: running max and sum over P of the model / the reference; with ref_stats,
  m_r = lse_RP and l_r = sum_P rho, and the log l_r of kl is 0.) Every term is relative to the
  running maxes, so no difference of two large log-normalisers appears; when a max moves, T gets
  alpha (T + l_old (shift change)). gbar = div + 1 (kl), gbar = -sum_P rho (reverse_kl), cbar = 0.

``forward_kernel``, jsd (either heads mode) and heads="mean" (any divergence): two sweeps, because
  the divergence of a key needs the row's normalisers (jsd: log((pi + rho)/2); "mean": log sum_h Z_h).
  pass 1, per head, one key sweep: online softmax -> lse_A, lse_P and `out`; the same for the
          reference heads unless ref_stats is given. The statistics go to `stats` /
          `ref_stats_out` and are read back after a barrier (no register file of H rows needed).
  pass 2, one key sweep: per key tile, log pi = logsumexp_h(s_h - lse_A_h) - log sum_h Z_h (an
          online logsumexp over the heads, one exp2 per element and head) and log rho likewise;
          f and g of the divergence -> div, gbar; then ("mean") a second loop over the heads
          recomputes a_h and accumulates u_h = sum_P a_h g in a (BLOCK_M, H_PAD) register tile,
          giving cbar_h = (u_h - gbar Z_h) / Z at the end.

Row rules (both kernels): rows with row_mask False or an empty support get div = gbar = cbar = 0
(a block without live rows skips pass 2); a NaN input gives NaN statistics and div in the rows it
touches (an empty set is l == 0, not "l > 0 fails"). Memory: no Sq x Sk buffer, no scratch.
"""

from __future__ import annotations

from .common import (LN2, LOG2E, NEG_INF, at, div_terms, finite, key_ok, key_sets, load_row, load_tile,
                     model_bases, work_unit, log_policy, log_zsum, lse2, matmul, nonzero, online, scores, times_g, tl,
                     triton)


@triton.jit
def head_softmax(q_ptr, k_ptr, v_ptr, out_ptr, stride_q_m, stride_q_d, stride_k_n, stride_k_d,
                 stride_v_n, stride_v_d, stride_out_m, stride_out_d, key_pad, stride_key_pad_n,
                 offs_m, q_len, k_len, pos0, head_dim, v_dim, scale2, n_end,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                 HAS_V: tl.constexpr, HAS_KEY_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                 EXCLUDE_SELF: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Pass 1 for one head: one sweep over keys [0, n_end). Returns (lse_A, lse_P), (BLOCK_M,) each
    in log2 units (-inf for an empty set), and writes out = softmax_A(s) v (0 for an empty A)."""
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = load_tile(q_ptr, offs_m, offs_d, stride_q_m, stride_q_d, q_len, head_dim)
    m_a = tl.full([BLOCK_M], NEG_INF, tl.float32)
    l_a = tl.full([BLOCK_M], 0.0, tl.float32)
    m_p = tl.full([BLOCK_M], NEG_INF, tl.float32)
    l_p = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, DV_PAD], 0.0, tl.float32)
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(k_ptr, offs_n, offs_d, stride_k_n, stride_k_d, k_len, head_dim)
        s = matmul(q, tl.trans(k), UPCAST, PREC) * scale2
        att, sup = key_sets(offs_m, offs_n, key_ok(key_pad, stride_key_pad_n, offs_n, k_len, HAS_KEY_PAD),
                            q_len, pos0, CAUSAL, EXCLUDE_SELF)
        m_a, l_a, alpha, p, _ = online(m_a, l_a, tl.where(att, s, NEG_INF))
        if HAS_V:
            v = load_tile(v_ptr, offs_n, offs_dv, stride_v_n, stride_v_d, k_len, v_dim)
            acc = acc * alpha[:, None] + matmul(p.to(v.dtype), v, UPCAST, PREC)
        if EXCLUDE_SELF:
            m_p, l_p, _, _, _ = online(m_p, l_p, tl.where(sup, s, NEG_INF))
    lse_a = lse2(m_a, l_a)
    if EXCLUDE_SELF:
        lse_p = lse2(m_p, l_p)
    else:
        lse_p = lse_a
    if HAS_V:
        o = acc / nonzero(l_a)[:, None]
        ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_out_m + offs_dv[None, :].to(tl.int64) * stride_out_d
        tl.store(ptrs, o.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < q_len) & (offs_dv[None, :] < v_dim))
    return lse_a, lse_p


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
def forward_kernel(
        Q, K, V, Q_REF, K_REF, REF_STATS, KEY_PAD, ROW_MASK, SEQS, OUT, STATS, DIV, GBAR, CBAR,
        stride_q_b, stride_q_h, stride_q_m, stride_q_d,
        stride_k_b, stride_k_h, stride_k_n, stride_k_d,
        stride_v_b, stride_v_h, stride_v_n, stride_v_d,
        stride_q_ref_b, stride_q_ref_h, stride_q_ref_m, stride_q_ref_d,
        stride_k_ref_b, stride_k_ref_h, stride_k_ref_n, stride_k_ref_d,
        stride_ref_stats_b, stride_ref_stats_h, stride_ref_stats_m, stride_ref_stats_c,
        stride_key_pad_b, stride_key_pad_n, stride_row_mask_b, stride_row_mask_m,
        stride_out_b, stride_out_h, stride_out_m, stride_out_d,
        stride_stats_b, stride_stats_h, stride_stats_m, stride_stats_c,
        stride_div_b, stride_div_h, stride_div_m, stride_cbar_b, stride_cbar_h, stride_cbar_m,
        stride_seqs,
        n_heads, group, ref_heads, ref_group, max_q_len, max_k_len, head_dim, v_dim, ref_dim,
        scale2, ref_scale2, len_bucket,
        DIVERGENCE: tl.constexpr, HEADS_EACH: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_V: tl.constexpr, HAS_REF_STATS: tl.constexpr,
        HAS_KEY_PAD: tl.constexpr, HAS_ROW_MASK: tl.constexpr, HAS_SEQS: tl.constexpr,
        D_PAD: tl.constexpr, DV_PAD: tl.constexpr, DR_PAD: tl.constexpr, H_PAD: tl.constexpr,
        UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Two sweeps (jsd, and heads="mean"): BLOCK_M query rows of one unit, all heads ("mean") or
    head h ("each"). Writes OUT (B,H,Sq,Dv), STATS (B,H,Sq,2), REF_STATS (B,Hr,Sq,2) unless
    HAS_REF_STATS (then read), DIV / GBAR (B,Sq) | (B,H,Sq) and CBAR (B,H,Sq).
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
    Qb, Kb, Vb, QRb, KRb, Sb, RSb = model_bases(
        Q, K, V, Q_REF, K_REF, STATS, REF_STATS, b, q_start, k_start, stride_q_b, stride_q_m, stride_k_b, stride_k_n,
        stride_v_b, stride_v_n, stride_q_ref_b, stride_q_ref_m, stride_k_ref_b, stride_k_ref_n, stride_stats_b,
        stride_stats_m, stride_ref_stats_b, stride_ref_stats_m, HAS_SEQS)
    KPb = at(KEY_PAD, b, stride_key_pad_b, k_start, stride_key_pad_n, HAS_SEQS)
    Ob = at(OUT, b, stride_out_b, q_start, stride_out_m, HAS_SEQS)

    # ---- pass 1: row statistics (and out) per head -------------------------------------------
    for hh in range(NH):
        h = h0 + hh
        lse_a, lse_p = head_softmax(
            Qb + h * stride_q_h, Kb + (h // group) * stride_k_h, Vb + (h // group) * stride_v_h,
            Ob + h * stride_out_h, stride_q_m, stride_q_d, stride_k_n, stride_k_d, stride_v_n, stride_v_d,
            stride_out_m, stride_out_d, KPb, stride_key_pad_n, offs_m, q_len, k_len, pos0,
            head_dim, v_dim, scale2, n_end, BLOCK_M, BLOCK_N, D_PAD, DV_PAD, HAS_V,
            HAS_KEY_PAD, CAUSAL, EXCLUDE_SELF, UPCAST, PREC)
        ptrs = Sb + h * stride_stats_h + offs_m.to(tl.int64) * stride_stats_m
        tl.store(ptrs, lse_a * LN2, mask=row_ok)
        tl.store(ptrs + stride_stats_c, lse_p * LN2, mask=row_ok)
    if not HAS_REF_STATS:
        for rr in range(NHR):
            r = h0 + rr
            lse_a, lse_p = head_softmax(
                QRb + r * stride_q_ref_h, KRb + (r // ref_group) * stride_k_ref_h, QRb, QRb,
                stride_q_ref_m, stride_q_ref_d, stride_k_ref_n, stride_k_ref_d, 0, 0, 0, 0,
                KPb, stride_key_pad_n, offs_m, q_len, k_len, pos0, ref_dim, 0, ref_scale2, n_end,
                BLOCK_M, BLOCK_N, DR_PAD, 16, False, HAS_KEY_PAD, CAUSAL, EXCLUDE_SELF, UPCAST, PREC)
            ptrs = RSb + r * stride_ref_stats_h + offs_m.to(tl.int64) * stride_ref_stats_m
            tl.store(ptrs, lse_a * LN2, mask=row_ok)
            tl.store(ptrs + stride_ref_stats_c, lse_p * LN2, mask=row_ok)
    tl.debug_barrier()  # pass 2 reads the statistics that other threads of this program wrote

    # ---- pass 2: policy, reference, divergence -----------------------------------------------
    log_z = log_zsum(Sb, stride_stats_h, stride_stats_m, stride_stats_c, h0, NH, offs_m, q_len, BLOCK_M)
    log_zr = log_zsum(RSb, stride_ref_stats_h, stride_ref_stats_m, stride_ref_stats_c, h0, NHR, offs_m,
                      q_len, BLOCK_M)
    live = row_ok & (log_z != NEG_INF)
    if HAS_ROW_MASK:
        RMb = at(ROW_MASK, b, stride_row_mask_b, q_start, stride_row_mask_m, HAS_SEQS)
        live = live & (tl.load(RMb + offs_m.to(tl.int64) * stride_row_mask_m, mask=row_ok, other=0) != 0)
    log_z = tl.where(live, log_z, 0.0)
    log_zr = finite(log_zr)
    n_end2 = tl.where(tl.max(live.to(tl.int32), 0) > 0, n_end, 0)
    div = tl.full([BLOCK_M], 0.0, tl.float32)
    gbar = tl.full([BLOCK_M], 0.0, tl.float32)
    u = tl.full([BLOCK_M, H_PAD], 0.0, tl.float32)
    cols = tl.arange(0, H_PAD)
    for start_n in range(0, n_end2, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        att, sup = key_sets(offs_m, offs_n, key_ok(KPb, stride_key_pad_n, offs_n, k_len, HAS_KEY_PAD),
                            q_len, pos0, CAUSAL, EXCLUDE_SELF)
        keep = sup & live[:, None]
        lpi = log_policy(Qb, Kb, Sb, stride_q_h, stride_q_m, stride_q_d, stride_k_h, stride_k_n, stride_k_d,
                         stride_stats_h, stride_stats_m, stride_stats_c, h0, NH, group,
                         offs_m, offs_n, q_len, k_len, head_dim, scale2, log_z,
                         BLOCK_M, BLOCK_N, D_PAD, HEADS_EACH, UPCAST, PREC)
        lrho = log_policy(QRb, KRb, RSb, stride_q_ref_h, stride_q_ref_m, stride_q_ref_d,
                          stride_k_ref_h, stride_k_ref_n, stride_k_ref_d,
                          stride_ref_stats_h, stride_ref_stats_m, stride_ref_stats_c, h0, NHR, ref_group,
                          offs_m, offs_n, q_len, k_len, ref_dim, ref_scale2, log_zr,
                          BLOCK_M, BLOCK_N, DR_PAD, HEADS_EACH, UPCAST, PREC)
        f, g, pig = div_terms(lpi, lrho, DIVERGENCE)
        div += tl.sum(tl.where(keep, f, 0.0), 1)
        gbar += tl.sum(tl.where(keep, pig, 0.0), 1)
        if not HEADS_EACH:
            for hh in range(NH):
                h = h0 + hh
                s = scores(Qb + h * stride_q_h, Kb + (h // group) * stride_k_h, stride_q_m, stride_q_d,
                           stride_k_n, stride_k_d, offs_m, offs_n, q_len, k_len, head_dim, scale2,
                           D_PAD, UPCAST, PREC)
                la = load_row(Sb + h * stride_stats_h, offs_m, stride_stats_m, q_len, 0.0) * LOG2E
                ag = times_g(s - finite(la)[:, None], g, lpi, lrho, DIVERGENCE)
                uh = tl.sum(tl.where(keep, ag, 0.0), 1)
                u += tl.where(cols[None, :] == hh, uh[:, None], 0.0)

    div = tl.where(live, div, 0.0)
    gbar = tl.where(live, gbar, 0.0)
    rows = offs_m.to(tl.int64) * stride_div_m
    DIVb = at(DIV, b, stride_div_b, q_start, stride_div_m, HAS_SEQS)
    GBARb = at(GBAR, b, stride_div_b, q_start, stride_div_m, HAS_SEQS)
    tl.store(DIVb + h0 * stride_div_h + rows, div, mask=row_ok)
    tl.store(GBARb + h0 * stride_div_h + rows, gbar, mask=row_ok)
    crow = at(CBAR, b, stride_cbar_b, q_start, stride_cbar_m, HAS_SEQS) + offs_m.to(tl.int64) * stride_cbar_m
    if HEADS_EACH:
        tl.store(crow + h0 * stride_cbar_h, tl.full([BLOCK_M], 0.0, tl.float32), mask=row_ok)
    else:
        inv_z = n_heads * tl.exp2(-log_z)  # 1 / Z, Z = (1/H) sum_h Z_h
        for hh in range(NH):
            h = h0 + hh
            uh = tl.sum(tl.where(cols[None, :] == hh, u, 0.0), 1)
            la = load_row(Sb + h * stride_stats_h, offs_m, stride_stats_m, q_len, 0.0) * LOG2E
            lp = load_row(Sb + h * stride_stats_h + stride_stats_c, offs_m, stride_stats_m, q_len, NEG_INF) * LOG2E
            z_h = tl.where(lp == NEG_INF, 0.0, tl.exp2(lp - finite(la)))
            c = (uh - gbar * z_h) * inv_z
            tl.store(crow + h * stride_cbar_h, tl.where(live, c, 0.0), mask=row_ok)


@triton.jit
def forward_each_kernel(
        Q, K, V, Q_REF, K_REF, REF_STATS, KEY_PAD, ROW_MASK, SEQS, OUT, STATS, DIV, GBAR, CBAR,
        stride_q_b, stride_q_h, stride_q_m, stride_q_d,
        stride_k_b, stride_k_h, stride_k_n, stride_k_d,
        stride_v_b, stride_v_h, stride_v_n, stride_v_d,
        stride_q_ref_b, stride_q_ref_h, stride_q_ref_m, stride_q_ref_d,
        stride_k_ref_b, stride_k_ref_h, stride_k_ref_n, stride_k_ref_d,
        stride_ref_stats_b, stride_ref_stats_h, stride_ref_stats_m, stride_ref_stats_c,
        stride_key_pad_b, stride_key_pad_n, stride_row_mask_b, stride_row_mask_m,
        stride_out_b, stride_out_h, stride_out_m, stride_out_d,
        stride_stats_b, stride_stats_h, stride_stats_m, stride_stats_c,
        stride_div_b, stride_div_h, stride_div_m, stride_cbar_b, stride_cbar_h, stride_cbar_m,
        stride_seqs,
        n_heads, group, ref_heads, ref_group, max_q_len, max_k_len, head_dim, v_dim, ref_dim,
        scale2, ref_scale2, len_bucket,
        DIVERGENCE: tl.constexpr, HEADS_EACH: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_V: tl.constexpr, HAS_REF_STATS: tl.constexpr,
        HAS_KEY_PAD: tl.constexpr, HAS_ROW_MASK: tl.constexpr, HAS_SEQS: tl.constexpr,
        D_PAD: tl.constexpr, DV_PAD: tl.constexpr, DR_PAD: tl.constexpr, H_PAD: tl.constexpr,
        UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One sweep (heads="each" with kl / reverse_kl; the arguments of forward_kernel, HEADS_EACH
    True): BLOCK_M query rows of head h of one unit. Online softmax of s over A (-> lse_A, out)
    and over P (-> lse_P), of s_ref over A and P (unless ref_stats gives lse_RP; then its shift is
    that constant), and the divergence sum carried with the weights of the distribution that
    weighs it, in shifted log space (log2 units):
      kl:         T = sum_P e^(s - m) [(s - m) - (s_ref - m_r)],   weights pi:  div = T / l - log l + log l_r
      reverse_kl: T = sum_P e^(s_ref - m_r) [(s_ref - m_r) - (s - m)], weights rho:
                  div = T / l_r - log l_r + log l   (with ref_stats: m_r = lse_RP, l_r = sum rho ~ 1)
    m, l / m_r, l_r: the running max and sum over P of the current model / reference; every term is
    relative to the running maxes (never s - lse of two large numbers), and when a max moves the
    carried T gets alpha * l_old * (shift change) besides the rescale alpha. gbar = div + 1 (kl),
    -sum_P rho (reverse_kl: -1 on non-empty rows); cbar = 0. div and gbar are 0 on rows that are
    not live (row_mask False or an empty P)."""
    pid_m, unit, h = forward_program(max_q_len, n_heads, BLOCK_M, True)
    b, q_start, q_len, k_start, k_len, pos0 = work_unit(SEQS, stride_seqs, unit, max_q_len, max_k_len, HAS_SEQS)
    if HAS_SEQS:  # programs past their unit's end
        if pid_m * BLOCK_M >= q_len:
            return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < q_len
    if CAUSAL:
        n_end = tl.minimum(k_len, pos0 + (pid_m + 1) * BLOCK_M)
    else:
        n_end = k_len
    # pointers at head h (kv head h // group, reference kv head h // ref_group)
    Qb, Kb, Vb, QRb, KRb, Sb, RSb = model_bases(
        Q, K, V, Q_REF, K_REF, STATS, REF_STATS, b, q_start, k_start, stride_q_b, stride_q_m, stride_k_b, stride_k_n,
        stride_v_b, stride_v_n, stride_q_ref_b, stride_q_ref_m, stride_k_ref_b, stride_k_ref_n, stride_stats_b,
        stride_stats_m, stride_ref_stats_b, stride_ref_stats_m, HAS_SEQS)
    Qh, Kh, Vh = Qb + h * stride_q_h, Kb + (h // group) * stride_k_h, Vb + (h // group) * stride_v_h
    QRh, KRh = QRb + h * stride_q_ref_h, KRb + (h // ref_group) * stride_k_ref_h
    Sh, RSh = Sb + h * stride_stats_h, RSb + h * stride_ref_stats_h
    Oh = at(OUT, b, stride_out_b, q_start, stride_out_m, HAS_SEQS) + h * stride_out_h
    KPb = at(KEY_PAD, b, stride_key_pad_b, k_start, stride_key_pad_n, HAS_SEQS)

    offs_d = tl.arange(0, D_PAD)
    offs_dr = tl.arange(0, DR_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = load_tile(Qh, offs_m, offs_d, stride_q_m, stride_q_d, q_len, head_dim)
    qr = load_tile(QRh, offs_m, offs_dr, stride_q_ref_m, stride_q_ref_d, q_len, ref_dim)
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
        m_r = finite(load_row(RSh + stride_ref_stats_c, offs_m, stride_ref_stats_m, q_len, NEG_INF) * LOG2E)
    else:
        m_r = ninf
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        att, sup = key_sets(offs_m, offs_n, key_ok(KPb, stride_key_pad_n, offs_n, k_len, HAS_KEY_PAD),
                            q_len, pos0, CAUSAL, EXCLUDE_SELF)
        k = load_tile(Kh, offs_n, offs_d, stride_k_n, stride_k_d, k_len, head_dim)
        s = matmul(q, tl.trans(k), UPCAST, PREC) * scale2
        kr = load_tile(KRh, offs_n, offs_dr, stride_k_ref_n, stride_k_ref_d, k_len, ref_dim)
        sr = matmul(qr, tl.trans(kr), UPCAST, PREC) * ref_scale2
        # current model over A (and out)
        p_old = finite(m_p)
        lp_old = l_p
        m_a, l_a, alpha_a, e_a, sh_a = online(m_a, l_a, tl.where(att, s, NEG_INF))
        if HAS_V:
            v = load_tile(Vh, offs_n, offs_dv, stride_v_n, stride_v_d, k_len, v_dim)
            acc = acc * alpha_a[:, None] + matmul(e_a.to(v.dtype), v, UPCAST, PREC)
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

    lse_a = lse2(m_a, l_a)
    lse_p = lse2(m_p, l_p)
    tl.store(Sh + offs_m.to(tl.int64) * stride_stats_m, lse_a * LN2, mask=row_ok)
    tl.store(Sh + offs_m.to(tl.int64) * stride_stats_m + stride_stats_c, lse_p * LN2, mask=row_ok)
    if not HAS_REF_STATS:
        lse_ra = lse2(m_ra, l_ra)
        lse_rp = lse2(m_r, l_r)
        tl.store(RSh + offs_m.to(tl.int64) * stride_ref_stats_m, lse_ra * LN2, mask=row_ok)
        tl.store(RSh + offs_m.to(tl.int64) * stride_ref_stats_m + stride_ref_stats_c, lse_rp * LN2, mask=row_ok)
    if HAS_V:
        o = acc / nonzero(l_a)[:, None]
        ptrs = Oh + offs_m[:, None].to(tl.int64) * stride_out_m + offs_dv[None, :].to(tl.int64) * stride_out_d
        tl.store(ptrs, o.to(Oh.dtype.element_ty), mask=(offs_m[:, None] < q_len) & (offs_dv[None, :] < v_dim))

    live = row_ok & (lse_p != NEG_INF)
    if HAS_ROW_MASK:
        RMb = at(ROW_MASK, b, stride_row_mask_b, q_start, stride_row_mask_m, HAS_SEQS)
        live = live & (tl.load(RMb + offs_m.to(tl.int64) * stride_row_mask_m, mask=row_ok, other=0) != 0)
    l_safe = nonzero(l_p)
    if DIVERGENCE == 1:
        if HAS_REF_STATS:
            ref_off = zero  # log(sum_P e^(s_ref - lse_RP)) = 0: the reference enters through m_r
        else:
            ref_off = tl.log2(nonzero(l_r))
        div = (t / l_safe - tl.log2(l_safe) + ref_off) * LN2
        gbar = div + 1.0
    else:
        lr_safe = nonzero(l_r)
        if HAS_REF_STATS:
            div = (t + tl.log2(l_safe)) * LN2  # the weights e^(s_ref - lse_RP) are rho already
            gbar = -l_r
        else:
            div = (t / lr_safe - tl.log2(lr_safe) + tl.log2(l_safe)) * LN2
            gbar = -l_r / lr_safe
    div = tl.where(live, div, 0.0)
    gbar = tl.where(live, gbar, 0.0)
    rows = offs_m.to(tl.int64) * stride_div_m
    tl.store(at(DIV, b, stride_div_b, q_start, stride_div_m, HAS_SEQS) + h * stride_div_h + rows, div, mask=row_ok)
    tl.store(at(GBAR, b, stride_div_b, q_start, stride_div_m, HAS_SEQS) + h * stride_div_h + rows, gbar, mask=row_ok)
    tl.store(at(CBAR, b, stride_cbar_b, q_start, stride_cbar_m, HAS_SEQS) + h * stride_cbar_h
             + offs_m.to(tl.int64) * stride_cbar_m, tl.full([BLOCK_M], 0.0, tl.float32), mask=row_ok)
