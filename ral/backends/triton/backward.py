"""The backward kernel: dq, dk, dv from d`out` and d`div` (FlashAttention-2 style: everything is
recomputed from the row statistics; Delta comes from ral.ops).

Grid (``launch.backward_grid``): 1-D, cdiv(max_k_len, BLOCK_N) x units x Q_SPLITS programs for
heads="mean" | x units*Hkv x Q_SPLITS for "each". A program owns BLOCK_N keys of one unit and all kv
heads ("mean") or one kv head ("each"), and sweeps one of Q_SPLITS contiguous chunks of the query
blocks that see those keys. Per query block ("mean") it first rebuilds log pi, log rho and g on the
tile from all H + Hr heads (skipped when no row of the block has w != 0), then per kv head and query
head recomputes a = exp2(s - lse_A), dP = dO V^T, dS = a (dP - delta) + [k in P] w T and
accumulates dV += a^T dO, dK += dS^T Q, and dQ += dS K with fp32 atomics. Program ids run over the
key blocks slowest and ascending, then (unit, kv head), then the split: key block j is seen by the
query blocks from about j on, so under causal masking the heaviest programs start first. With a
sequence table, programs past their unit's last key return at once.

dK / dV go to zero-filled fp32 buffers: summed in registers over the chunk and stored once when
this program is the only writer of its keys (Q_SPLITS == 1, "each" or "mean" with Hkv == 1, no
sequence table), else added with fp32 atomics: split chunks, and units of a sequence table, which
may share keys (context parallel). "mean" with Hkv > 1 cannot hold Hkv accumulators in registers and
adds each query block's part with fp32 atomics. The kernel reads Q_SPLITS back from the grid size.
The chunks of a key block hold equal COUNTS of query blocks (differing by at most one): every query
block costs a key block the same (all heads, the same tile matmuls), so equal counts are equal work.
POLICY_STATS (docs/design.md, "Attention statistics"; csrc/common/params.h): the rows' weights
STATS_W = [w_E, w_0 .. w_{S-1}] and SEGS (the keys' segment ids) add g_stat = w_E (-log pi) + w_seg
to the divergence's g; GBAR then holds gbar_total, and T = (a / H) (w g + g_stat - gbar_total) / Z
("mean"), pi (w g + g_stat - gbar_total) ("each"), live on rows where any weight is nonzero; the
reference is only swept for tiles with a row of w != 0 (never for ral.ops.attention_stats).
Memory: no Sq x Sk buffer; no scratch beyond the fp32 gradient buffers. Every tensor's strides come
as one tuple (common.py: BATCH, HEAD, ROW / KEY, DIM / COL).
"""

from __future__ import annotations

from .common import (BATCH, COL, DIM, HEAD, KEY, LN2, ROW, any_row, at, div_terms, finite, key_ok, key_sets,
                     load_row, load_segments, load_tile, log_policy, log_zsum, matmul, model_bases, row_tile,
                     scores, stat_grad, sub_lse, times_g, tl, triton, work_unit)


@triton.jit
def split_range(mb_first, n_mblk, split, n_splits):
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
def flush(ptrs, acc, mask, sole_write):
    """Add an fp32 dk / dv partial sum into its zero-filled DK / DV tile: a plain store when this
    is the only write the tile ever gets (`sole_write`), else fp32 atomics."""
    if sole_write:
        tl.store(ptrs, acc, mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")


@triton.jit
def flush_kv(DKb, DVb, kv_head, offs_n, offs_d, offs_dv, stride_dk, stride_dv, dk_acc, dv_acc, kv_mask, v_mask,
             sole_write, HAS_V: tl.constexpr):
    """``flush`` of a key tile's dk (BLOCK_N, D_PAD) and, with v, dv (BLOCK_N, DV_PAD) partial sums into
    kv head `kv_head` of DK / DV (DKb, DVb: the unit's bases; offs_n: the tile's key rows)."""
    rows = offs_n[:, None].to(tl.int64)
    flush(DKb + kv_head * stride_dk[HEAD] + rows * stride_dk[KEY] + offs_d[None, :] * stride_dk[DIM], dk_acc,
          kv_mask, sole_write)
    if HAS_V:
        flush(DVb + kv_head * stride_dv[HEAD] + rows * stride_dv[KEY] + offs_dv[None, :] * stride_dv[DIM], dv_acc,
              v_mask, sole_write)


@triton.jit
def row_weights(w_ptr, g_ptr, sw_ptr, stride_w, stride_sw, offs_m, q_len, POLICY_STATS: tl.constexpr,
                NUM_SEG: tl.constexpr, NSTAT_PAD: tl.constexpr):
    """(w, gbar, sw, live) of the rows: w = d div, gbar (gbar_total with POLICY_STATS), sw the
    statistics' weights (BLOCK_M, NSTAT_PAD) [w_E, w_0 ..] (without POLICY_STATS: w again, unused),
    live the rows whose term is nonzero."""
    w = load_row(w_ptr, offs_m, stride_w[ROW], q_len, 0.0)
    gb = load_row(g_ptr, offs_m, stride_w[ROW], q_len, 0.0)
    live = w != 0.0
    if POLICY_STATS:
        ptrs, mask = row_tile(sw_ptr, offs_m, stride_sw, q_len, 1 + NUM_SEG, NSTAT_PAD)
        sw = tl.load(ptrs, mask=mask, other=0.0)
        live = live | (tl.sum((sw != 0.0).to(tl.int32), 1) > 0)
    else:
        sw = w
    return w, gb, sw, live


@triton.jit
def backward_kernel(
        Q, K, V, Q_REF, K_REF, REF_STATS, KEY_PAD, SEQS, SEGS, DOUT, DDIV, DELTA, STATS, GBAR, STATS_W, DQ, DK, DV,
        stride_q, stride_k, stride_v, stride_q_ref, stride_k_ref, stride_ref_stats, stride_key_pad, stride_seg,
        stride_dout, stride_ddiv, stride_delta, stride_stats, stride_stats_w, stride_dq, stride_dk, stride_dv,
        stride_seqs,
        n_units, n_heads, group, kv_heads, ref_heads, ref_group, max_q_len, max_k_len,
        head_dim, v_dim, ref_dim, scale, scale2, ref_scale2, len_bucket,
        DIVERGENCE: tl.constexpr, HEADS_EACH: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_V: tl.constexpr, HAS_KEY_PAD: tl.constexpr, HAS_SEQS: tl.constexpr,
        POLICY_STATS: tl.constexpr, NUM_SEG: tl.constexpr, NSTAT_PAD: tl.constexpr,
        ACC_IN_REGS: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
        DR_PAD: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_N keys of one unit, all kv heads ("mean") or kv head kvh ("each"), and
    one of n_splits contiguous chunks of the query blocks that see those keys (n_splits comes
    from the grid size, see launch.backward_grid). dS = a (dP - delta) + [k in P] T; DK / DV
    (fp32 dk / dv, zero-filled) get dS^T Q and a^T dO (stored when this program is their only
    writer, atomic adds otherwise), DQ (fp32 dq, zero-filled) gets dS K by atomic adds.
    DDIV (w) and GBAR share the strides stride_ddiv. POLICY_STATS: STATS_W (B,Sq,1+S) | (B,H,Sq,1+S)
    and SEGS (B,Sk) int32 (NUM_SEG = S > 0). n_units: B without a sequence table (SEQS), its row
    count with one; max_q_len, max_k_len: Sq, Sk without, the longest unit's with one."""
    n_nblk = (max_k_len + BLOCK_N - 1) // BLOCK_N
    if HEADS_EACH:
        n_groups = n_units * kv_heads
    else:
        n_groups = n_units
    n_splits = tl.num_programs(0) // (n_nblk * n_groups)
    # 1-D grid: key blocks slowest and ascending, i.e. heaviest first under causal masking (key
    # block j is seen by the query blocks from ~j on); then (unit, kv head), then the split.
    pid = tl.program_id(0)
    pid_n = pid // (n_groups * n_splits)
    pid_in = pid % (n_groups * n_splits)
    pid_bk = (pid_in // n_splits).to(tl.int64)
    split = pid_in % n_splits
    if HEADS_EACH:
        unit = pid_bk // kv_heads
        kv0 = pid_bk % kv_heads
        NKV = 1
    else:
        unit = pid_bk
        kv0 = pid_bk * 0
        NKV = kv_heads
    b, q_start, q_len, k_start, k_len, pos0 = work_unit(SEQS, stride_seqs, unit, max_q_len, max_k_len, HAS_SEQS)
    if HAS_SEQS:  # programs past their unit's end
        if pid_n * BLOCK_N >= k_len:
            return
    n_mblk = (q_len + BLOCK_M - 1) // BLOCK_M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    Qb, Kb, Vb, QRb, KRb, Sb, RSb, KPb, SEGb = model_bases(
        Q, K, V, Q_REF, K_REF, STATS, REF_STATS, KEY_PAD, SEGS, b, q_start, k_start, stride_q, stride_k, stride_v,
        stride_q_ref, stride_k_ref, stride_stats, stride_ref_stats, stride_key_pad, stride_seg, HAS_SEQS)
    DOb = at(DOUT, b, stride_dout[BATCH], q_start, stride_dout[ROW], HAS_SEQS)
    DLb = at(DELTA, b, stride_delta[BATCH], q_start, stride_delta[ROW], HAS_SEQS)
    Wb = at(DDIV, b, stride_ddiv[BATCH], q_start, stride_ddiv[ROW], HAS_SEQS)
    Gb = at(GBAR, b, stride_ddiv[BATCH], q_start, stride_ddiv[ROW], HAS_SEQS)
    SWb = at(STATS_W, b, stride_stats_w[BATCH], q_start, stride_stats_w[ROW], HAS_SEQS)
    DQb = at(DQ, b, stride_dq[BATCH], q_start, stride_dq[ROW], HAS_SEQS)
    DKb = at(DK, b, stride_dk[BATCH], k_start, stride_dk[KEY], HAS_SEQS)
    DVb = at(DV, b, stride_dv[BATCH], k_start, stride_dv[KEY], HAS_SEQS)
    keys_ok = key_ok(KPb, stride_key_pad, offs_n, k_len, HAS_KEY_PAD)
    if POLICY_STATS:
        seg = load_segments(SEGb, stride_seg, offs_n, k_len)
    if CAUSAL:
        mb_first = tl.maximum(pid_n * BLOCK_N - pos0, 0) // BLOCK_M
    else:
        mb_first = pid_n * 0
    if HAS_SEQS:
        mb_first = tl.minimum(mb_first, n_mblk)  # keys past the unit's last row position: no block
    mb_lo, mb_hi = split_range(mb_first, n_mblk, split, n_splits)
    if HAS_SEQS:
        sole_program = False  # units may share keys (context parallel): always add
    else:
        sole_program = n_splits == 1  # no other program writes dk / dv of these keys
    dk_acc = tl.full([BLOCK_N, D_PAD], 0.0, tl.float32)
    dv_acc = tl.full([BLOCK_N, DV_PAD], 0.0, tl.float32)
    keys_end = tl.where(mb_lo < mb_hi, k_len, 0)  # an empty chunk writes no dk / dv
    kv_mask = (offs_n[:, None] < keys_end) & (offs_d[None, :] < head_dim)
    v_mask = (offs_n[:, None] < keys_end) & (offs_dv[None, :] < v_dim)
    zero_tile = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for start_m in range(mb_lo * BLOCK_M, mb_hi * BLOCK_M, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < q_len
        att, sup = key_sets(offs_m, offs_n, keys_ok, q_len, pos0, CAUSAL, EXCLUDE_SELF)
        if not HEADS_EACH:
            # the divergence tile couples every head: log pi, log rho and g from all H + Hr heads
            w, gb, sw, live = row_weights(Wb, Gb, SWb, stride_ddiv, stride_stats_w, offs_m, q_len, POLICY_STATS,
                                          NUM_SEG, NSTAT_PAD)
            keep = sup & live[:, None]
            log_z = finite(log_zsum(Sb, stride_stats, kv0, n_heads, offs_m, q_len, BLOCK_M))
            lpi = zero_tile
            lrho = zero_tile
            g = zero_tile
            g_stat = zero_tile
            if any_row(live):
                lpi = log_policy(Qb, Kb, Sb, stride_q, stride_k, stride_stats, kv0, n_heads, group, offs_m, offs_n,
                                 q_len, k_len, head_dim, scale2, log_z, BLOCK_M, BLOCK_N, D_PAD, False, UPCAST, PREC)
                if POLICY_STATS:
                    g_stat = stat_grad(-lpi * LN2, seg, sw, NUM_SEG, NSTAT_PAD)
                    need_g = any_row(w != 0.0)
                else:
                    need_g = True  # live is w != 0
                if need_g:
                    log_zr = finite(log_zsum(RSb, stride_ref_stats, kv0, ref_heads, offs_m, q_len, BLOCK_M))
                    lrho = log_policy(QRb, KRb, RSb, stride_q_ref, stride_k_ref, stride_ref_stats, kv0, ref_heads,
                                      ref_group, offs_m, offs_n, q_len, k_len, ref_dim, ref_scale2, log_zr,
                                      BLOCK_M, BLOCK_N, DR_PAD, False, UPCAST, PREC)
                    f, g, pig = div_terms(lpi, lrho, DIVERGENCE)
        for kk in range(NKV):
            kvh = kv0 + kk
            k = load_tile(Kb + kvh * stride_k[HEAD], offs_n, offs_d, stride_k[KEY], stride_k[DIM], k_len, head_dim)
            if HAS_V:
                v = load_tile(Vb + kvh * stride_v[HEAD], offs_n, offs_dv, stride_v[KEY], stride_v[DIM], k_len, v_dim)
            if not ACC_IN_REGS:
                # this query block's part of dk / dv of kv head kvh, added into DK / DV below
                dk_acc = tl.full([BLOCK_N, D_PAD], 0.0, tl.float32)
                if HAS_V:
                    dv_acc = tl.full([BLOCK_N, DV_PAD], 0.0, tl.float32)
            for hh in range(group):
                h = kvh * group + hh
                q = load_tile(Qb + h * stride_q[HEAD], offs_m, offs_d, stride_q[ROW], stride_q[DIM], q_len, head_dim)
                s = matmul(q, tl.trans(k), UPCAST, PREC) * scale2
                la = finite(load_row(Sb + h * stride_stats[HEAD], offs_m, stride_stats[ROW], q_len, 0.0))
                log_a = sub_lse(s, la[:, None])
                a = tl.where(att, tl.exp2(log_a), 0.0)
                delta = load_row(DLb + h * stride_delta[HEAD], offs_m, stride_delta[ROW], q_len, 0.0)
                if HAS_V:
                    do = load_tile(DOb + h * stride_dout[HEAD], offs_m, offs_dv, stride_dout[ROW], stride_dout[DIM],
                                   q_len, v_dim)
                    dp = matmul(do, tl.trans(v), UPCAST, PREC)
                    ds = a * (dp - delta[:, None])
                    dv_acc += matmul(tl.trans(a.to(do.dtype)), do, UPCAST, PREC)
                else:
                    ds = -a * delta[:, None]
                if HEADS_EACH:
                    w, gb, sw, live = row_weights(Wb + h * stride_ddiv[HEAD], Gb + h * stride_ddiv[HEAD],
                                                  SWb + h * stride_stats_w[HEAD], stride_ddiv, stride_stats_w, offs_m,
                                                  q_len, POLICY_STATS, NUM_SEG, NSTAT_PAD)
                    keep = sup & live[:, None]
                    lp = finite(load_row(Sb + h * stride_stats[HEAD] + stride_stats[COL], offs_m, stride_stats[ROW],
                                         q_len, 0.0))
                    lpi = sub_lse(s, lp[:, None])
                    lrho = zero_tile
                    g = zero_tile
                    if POLICY_STATS:
                        g_stat = stat_grad(-lpi * LN2, seg, sw, NUM_SEG, NSTAT_PAD)
                        need_g = any_row(w != 0.0)
                    else:
                        need_g = True
                    if need_g:
                        lrp = finite(load_row(RSb + h * stride_ref_stats[HEAD] + stride_ref_stats[COL], offs_m,
                                              stride_ref_stats[ROW], q_len, 0.0))
                        sr = scores(QRb + h * stride_q_ref[HEAD], KRb + (h // ref_group) * stride_k_ref[HEAD],
                                    stride_q_ref, stride_k_ref, offs_m, offs_n, q_len, k_len, ref_dim, ref_scale2,
                                    DR_PAD, UPCAST, PREC)
                        lrho = sub_lse(sr, lrp[:, None])
                        f, g, pig = div_terms(lpi, lrho, DIVERGENCE)
                    lc = lpi  # T = pi (g - gbar)
                else:
                    lc = log_a - log_z[:, None]  # T = (a / H) (g - gbar) / Z
                if POLICY_STATS:  # g_total = w g + g_stat, gb = gbar_total
                    t = w[:, None] * times_g(lc, g, lpi, lrho, DIVERGENCE) + tl.exp2(lc) * (g_stat - gb[:, None])
                else:
                    t = w[:, None] * (times_g(lc, g, lpi, lrho, DIVERGENCE) - tl.exp2(lc) * gb[:, None])
                ds += tl.where(keep, t, 0.0)
                ds = ds * scale
                dk_acc += matmul(tl.trans(ds.to(q.dtype)), q, UPCAST, PREC)
                dq = matmul(ds.to(k.dtype), k, UPCAST, PREC)
                dq_ptrs = DQb + h * stride_dq[HEAD] + offs_m[:, None].to(tl.int64) * stride_dq[ROW] \
                    + offs_d[None, :] * stride_dq[DIM]
                tl.atomic_add(dq_ptrs, dq, mask=row_ok[:, None] & (offs_d[None, :] < head_dim), sem="relaxed")
            if not ACC_IN_REGS:  # one add per query block: atomics even without splits
                flush_kv(DKb, DVb, kvh, offs_n, offs_d, offs_dv, stride_dk, stride_dv, dk_acc, dv_acc, kv_mask,
                         v_mask, False, HAS_V)
    if ACC_IN_REGS:
        flush_kv(DKb, DVb, kv0, offs_n, offs_d, offs_dv, stride_dk, stride_dv, dk_acc, dv_acc, kv_mask, v_mask,
                 sole_program, HAS_V)
