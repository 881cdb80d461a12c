// Backward of attention_kl on sm_80+ (params.h; docs/design.md, "Gradient"): everything is recomputed tile
// by tile from q, k, v, q_ref, k_ref and the row statistics; nothing grows as Sq x Sk.
//
// Grid (q tiles, B, key splits), with a sequence table (q tiles x units, B, key splits); a block owns
// 64 query rows of every head of its unit (the "mean" policy couples all heads of a row) and a range
// of its key tiles. Units are the batch elements or the table's entries (kernel_utils.cuh,
// work_unit); q tiles and key splits are sized from the longest unit, blocks past their unit's rows
// exit. Units may share keys (context parallel): every dK / dV (and dQ) write is an fp32 atomic add.
// Per key tile j:
//   "mean": Hr ref steps  S_ref = q_ref k_ref^T -> log rho (log-sum over ref heads, per element)
//           H  cur steps  S = q k^T            -> log pi; then per element the coefficient
//                          gl = g (or log rho/pi for reverse_kl) on P for rows with w != 0
//           H  full steps  per head h: S, P = exp(S - lse_A), dP = dO v^T,
//                          dS = P (dP - delta) + [P, w != 0] w (exp(S - lse_A - log HZ) (g - gbar))
//   "each": per head: ref step (log rho = S_ref - lse_P,ref) then the full step, where
//           log pi = S - lse_P and the divergence term is pi (g - gbar).
// The full step writes P and dS (input dtype) to shared memory and adds, with fp32 atomics,
//   dQ[rows] += scale dS K                           (warp w: its 16 rows, dS from registers),
//   dV[keys] += P^T dO,  dK[keys] += scale dS^T Q  (warp w: keys 16w..16w+15),
// into the zero-filled fp32 buffers of params.h, 64 output columns at a time. dS is 0 (a select)
// off A(i), so a non-finite dP there stays out of the sums.
//
// Statistics (kStats, params.h policy_stats): w T uses g_total = w g + w_E (-log pi) + w_seg and
// gbar_total (in gbar) in place of w g and w gbar: per element T = c (g_total - gbar_total) with
// c = a_h / (H Z) ("mean") or pi_h ("each"). A row's term is live when any of its weights is nonzero;
// the reference's steps run only when some row of the block has w != 0. The statistics kernels keep
// the per-element g (gl) and statistics' g (sG) in thread-private shared memory (TileVals), not in
// registers: "mean" forms sG = w_E (-log pi) + w_seg in the cur steps, "each" sG = w_seg per head at
// the start of the full step (its w_E (-log pi_h) is formed in place).
//
// Registers: the kernel is templated on the heads mode, the "mean" head reductions run on half a
// key tile at a time, and the score gemms unroll their k loop by 2; together they keep both modes
// under 255 registers with no spill on sm_80 and sm_90a (ptxas -v).
//
// Non-finite inputs: a row's divergence term is selected by w != 0 (the Python layer zeroes w only
// on dead rows: row_mask False or empty P); log(H Z) keeps NaN (log_hz), so NaN stays in its rows.
//
// smem: stages x (sA [64][ld] + sB [64][ld] + sV [64][ldv] + sdO [64][ldv]) + sP, sdS [64][72]
// (+ with statistics gl and sG: fp32 [32][128] each), ld = max(D16, Dr16) + 8, ldv = Dv16 + 8;
// two stages when they fit (D <= 128 on A100/H100).
//
// This header is compiled once per dtype: attention_kl_bwd.cu (fp16) and attention_kl_bwd_bf16.cu
// (bf16) each instantiate launch_backward for theirs, so the two halves of the build's longest
// compile run in parallel.
#pragma once
#include "cuda/kernel_utils.cuh"
#include "cuda/launch.cuh"

namespace ral::cuda {
namespace {

constexpr int kLdP = kBlockN + 8;

enum BwdStep : int { kBwdRef = 0, kBwdCur = 1, kBwdFull = 2 };

// kEach: heads="each" (a compile-time split: one kernel for both modes needs more than 255
// registers and spills). kStats: policy_stats. kSeqs: units from the sequence table (work_unit).
template <typename T, bool kEach, bool kStats, bool kSeqs>
__global__ void __launch_bounds__(kThreads, 1)
    bwd_kernel(const AttentionKLParams p, const int stages, const int nsplit, const int vec) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane & 3, g = lane >> 2;
  constexpr bool each = kEach;
  // the full step's score gemms unroll their k loop by 2; by 1 with a table (its unit's rows and keys
  // take the registers) or statistics (ptxas -v, no spill either way)
  constexpr int kUnroll = kSeqs || kStats ? 1 : 2;
  const bool has_v = p.has_v;
  const int64_t H = p.heads, Hr = p.ref_heads, Sq = p.q_len, Sk = p.k_len;  // tensor extents
  // Grid (q tiles, B, splits); with a table (q tiles x units, B, splits): blockIdx.x = unit x q tiles
  // + tile. The batch index is blockIdx.y in both, and a block whose b is not its unit's exits: a
  // value read from the table would take regular registers (and so would every address derived from
  // it) where blockIdx stays in the uniform datapath; the "mean" backward then spills (ptxas -v).
  // The extra blocks (B > 1 only) exit at once.
  const unsigned q_tiles = kSeqs ? unsigned((p.max_q_len + kBlockM - 1) / kBlockM) : 1u;
  const int64_t tile0 = int64_t(kSeqs ? blockIdx.x % q_tiles : blockIdx.x) * kBlockM;
  const Unit<kSeqs> u = work_unit<kSeqs>(p, kSeqs ? blockIdx.x / q_tiles : blockIdx.y);
  const int64_t q0 = u.q_begin() + tile0, b = blockIdx.y;
  if (kSeqs && (q0 >= u.q_end() || b != u.batch())) return;  // block-uniform, before any barrier
  const int64_t q_end = kSeqs ? u.q_end() : Sq, k_end = kSeqs ? u.k_end() : Sk;  // the unit's rows / keys end
  const int kind = p.divergence;
  const int dim = int(p.head_dim), dv = has_v ? int(p.v_head_dim) : 0;
  const int d16 = round_up16(dim), dr16 = round_up16(int(p.ref_head_dim)), dv16 = round_up16(dv);
  const int ld = max(d16, dr16) + 8, ldv = has_v ? dv16 + 8 : 0;
  const int stage_elems = 2 * kBlockM * ld + 2 * kBlockM * ldv;
  T* smem = reinterpret_cast<T*>(smem_raw);
  T* sP = smem + stages * stage_elems;  // [64][kLdP]
  T* sdS = sP + kBlockM * kLdP;         // [64][kLdP]
  float* sStat = reinterpret_cast<float*>(sdS + kBlockM * kLdP) + threadIdx.x;  // kStats: gl, then sG
  const TileVals<true> sG{sStat + 32 * kThreads};

  int64_t jb, je;
  key_tile_range(p, u, q0, blockIdx.z, nsplit, jb, je);
  const RowPos rp = row_pos(u, q0, warp, lane);
  const float* w_in = reinterpret_cast<const float*>(p.ddiv);
  const float* sw_in = reinterpret_cast<const float*>(p.stats_w);  // (B, G, Sq, 1 + S), kStats
  const int n_stat = kStats ? int(1 + p.num_segments) : 0;
  // Does any row of the block carry a divergence gradient (any_w), or a statistics one? If neither,
  // only the full steps run; the reference's steps run only with some w != 0.
  bool any_w = false, any_stat = false;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (!rp.valid[r]) continue;
    const int64_t row = q0 + warp * 16 + g + 8 * r;
    if (each) {
      for (int64_t h = 0; h < H && !any_w; ++h) any_w = w_in[(b * H + h) * Sq + row] != 0.f;
      if constexpr (kStats)
        for (int64_t h = 0; h < H && !any_stat; ++h)
          any_stat = stats_row_live(sw_in + ((b * H + h) * Sq + row) * n_stat, n_stat);
    } else {
      any_w = any_w || w_in[b * Sq + row] != 0.f;
      if constexpr (kStats) any_stat = any_stat || stats_row_live(sw_in + (b * Sq + row) * n_stat, n_stat);
    }
  }
  const bool div_on = __syncthreads_or(any_w || any_stat) != 0;
  const bool ref_on = kStats ? __syncthreads_or(any_w) != 0 : div_on;
  const int64_t n_ref = kStats && !ref_on ? 0 : each ? H : Hr;  // ref steps per key tile (with div_on)
  const int64_t spj = !div_on ? H : n_ref + (each ? H : 2 * H);  // steps per key tile

  auto decode = [&](int64_t tt, int& k, int64_t& head) {
    if (!div_on || (each && !ref_on)) { k = kBwdFull; head = tt; return; }
    if (each) { k = (tt & 1) ? kBwdFull : kBwdRef; head = tt >> 1; return; }
    if (tt < n_ref) { k = kBwdRef; head = tt; }
    else if (tt < n_ref + H) { k = kBwdCur; head = tt - n_ref; }
    else { k = kBwdFull; head = tt - n_ref - H; }
  };
  // The Q/K tile issue stays inline here rather than going through load_qk_tiles (as div_kernel
  // does): that call costs 2-5 registers in this kernel (measured with ptxas), and the "mean"
  // backward has 3 of 255 to spare before it spills.
  auto issue = [&](int64_t step, int buf) {
    const int64_t j0 = u.k_begin() + (jb + step / spj) * kBlockN;
    int k; int64_t head;
    decode(step % spj, k, head);
    const bool r = k == kBwdRef;
    const View& qv = r ? p.q_ref : p.q;
    const View& kv = r ? p.k_ref : p.k;
    const int64_t kvh = r ? head / (Hr / p.ref_kv_heads) : head / (H / p.kv_heads);
    const int d = int(r ? p.ref_head_dim : p.head_dim), dpad = r ? dr16 : d16;
    const int qrows = int(min64(q_end - q0, 64)), krows = int(min64(k_end - j0, 64));
    T* st = smem + buf * stage_elems;
    const T* gq = reinterpret_cast<const T*>(qv.ptr) + b * qv.stride[0] + head * qv.stride[1] + q0 * qv.stride[2];
    const T* gk = reinterpret_cast<const T*>(kv.ptr) + b * kv.stride[0] + kvh * kv.stride[1] + j0 * kv.stride[2];
    load_tile(st, ld, gq, qv.stride[2], qrows, d, dpad, vec & (r ? kVecQRef : kVecQ));
    load_tile(st + kBlockM * ld, ld, gk, kv.stride[2], krows, d, dpad, vec & (r ? kVecKRef : kVecK));
    if (k == kBwdFull && has_v) {
      const T* gv = reinterpret_cast<const T*>(p.v.ptr) + b * p.v.stride[0] + kvh * p.v.stride[1] + j0 * p.v.stride[2];
      const T* gdo = reinterpret_cast<const T*>(p.dout) + ((b * H + head) * Sq + q0) * dv;
      load_tile(st + 2 * kBlockM * ld, ldv, gv, p.v.stride[2], krows, dv, dv16, vec & kVecV);
      load_tile(st + 2 * kBlockM * ld + kBlockM * ldv, ldv, gdo, int64_t(dv), qrows, dv, dv16, vec & kVecDout);
    }
  };

  // ---- per-row constants
  const float* stats = reinterpret_cast<const float*>(p.stats);
  const float* rstats = reinterpret_cast<const float*>(p.has_ref_stats ? p.ref_stats_in.ptr : p.ref_stats_out);
  const int64_t rs0 = p.has_ref_stats ? p.ref_stats_in.stride[0] : Hr * Sq * 2;
  const int64_t rs1 = p.has_ref_stats ? p.ref_stats_in.stride[1] : Sq * 2;
  const int64_t rs2 = p.has_ref_stats ? p.ref_stats_in.stride[2] : 2;
  const int64_t rs3 = p.has_ref_stats ? p.ref_stats_in.stride[3] : 1;
  const float* gbar_in = reinterpret_cast<const float*>(p.gbar);
  const float* delta_in = reinterpret_cast<const float*>(p.delta);
  int64_t row[2];
  float lz[2], lzr[2], w[2], gb[2];  // "mean" only: log(H Z), log(Hr Zr), w, gbar
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row[r] = q0 + warp * 16 + g + 8 * r;
    lz[r] = lzr[r] = neg_inf();
    w[r] = gb[r] = 0.f;
    if (!rp.valid[r] || each) continue;
    lz[r] = log_hz(stats + (b * H * Sq + row[r]) * 2, Sq * 2, 1, H);  // NaN stays NaN (live row)
    if (!kStats || !p.no_reference) lzr[r] = log_hz(rstats + b * rs0 + row[r] * rs2, rs1, rs3, Hr);
    w[r] = w_in[b * Sq + row[r]];
    gb[r] = gbar_in[b * Sq + row[r]];
  }
  // "mean": rows whose divergence term is on (select, never multiply by a zero w), and (kStats) rows
  // whose term is on at all
  const uint32_t mean_rows = (w[0] != 0.f ? 0x33333333u : 0u) | (w[1] != 0.f ? 0xccccccccu : 0u);
  uint32_t mean_live = mean_rows;
  if constexpr (kStats)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (rp.valid[r] && !each && stats_row_live(sw_in + (b * Sq + row[r]) * n_stat, n_stat))
        mean_live |= r ? 0xccccccccu : 0x33333333u;

  TileVals<kStats> gl;  // log rho, then the per-element g (or log rho/pi for reverse_kl)
  if constexpr (kStats) gl.col = sStat;
  float s[8][4], ds[8][4];

  // One full step for head h: P, dP, dS -> dV, dK, dQ. `act`: elements with a divergence term (w != 0),
  // `live`: (kStats) elements with any term; for "each", gl holds log rho and the terms are built here.
  auto full_step = [&](int64_t h, int buf, const TileMask& tm, uint32_t act, uint32_t live, int64_t j0) {
    const T* sQ = smem + buf * stage_elems;
    const T* sK = sQ + kBlockM * ld;
    const T* sV = sK + kBlockN * ld;
    const T* sdO = sV + kBlockN * ldv;
    float w_e[2] = {0.f, 0.f};  // kStats, "each": the rows' w_E of head h
    uint32_t stat_p = 0;        // kStats, "each": the P elements of rows with a statistics weight
    if constexpr (kStats) {
      if (each) {  // before the gemms, while registers are free: sG = w_seg of head h's rows
        const float* swh[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          swh[r] = sw_in + ((b * H + h) * Sq + row[r]) * n_stat;
          if (!rp.valid[r]) continue;
          w_e[r] = swh[r][0];
          if (stats_row_live(swh[r], n_stat)) stat_p |= tm.p & (r ? 0xccccccccu : 0x33333333u);
        }
        if (stat_p) {  // the key tile's segment ids only where a row of this thread has a weight
          const KeySegs segs = key_segs(p, u, j0, lane);
#pragma unroll
          for (int nb = 0; nb < 8; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              if ((stat_p >> (4 * nb + e)) & 1u) sG(nb, e) = seg_weight(swh[e >> 1], p.num_segments, segs(nb, e & 1));
        }
      }
    }
    gemm_abt<T, kUnroll>(s, sQ, sK, ld, d16 / 16, warp, lane);
    if (has_v) gemm_abt<T, kUnroll>(ds, sdO, sV, ldv, dv16 / 16, warp, lane);
    else zero(ds);
    float lse_a[2], x[2], delta[2], wh[2], gbh[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t i = (b * H + h) * Sq + row[r];
      const bool v = rp.valid[r];
      lse_a[r] = v ? stats[i * 2] : 0.f;
      delta[r] = v ? delta_in[i] : 0.f;
      if (each) {
        x[r] = v ? stats[i * 2 + 1] : 0.f;  // log Z_h + lse_A: exp(S - x) = pi_h
        wh[r] = v ? w_in[i] : 0.f;
        gbh[r] = v ? gbar_in[i] : 0.f;
      } else {
        x[r] = lse_a[r] + lz[r];           // exp(S - x) = a_h / (H Z)
        wh[r] = w[r];
        gbh[r] = gb[r];
      }
    }
    if (each) {  // gl: log rho -> g (or log rho/pi), with log pi_h = S - lse_P,h
      act = tm.p & ((wh[0] != 0.f ? 0x33333333u : 0u) | (wh[1] != 0.f ? 0xccccccccu : 0u));
      if constexpr (kStats) live = act | stat_p;
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (!((act >> (4 * nb + e)) & 1u)) continue;
          const float lpi = s[nb][e] * p.scale - x[e >> 1];
          gl(nb, e) = g_or_log_ratio(kind, lpi, gl(nb, e), divergence_term(kind, lpi, gl(nb, e)).g);
        }
    }
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const float sc = s[nb][e] * p.scale;
        const bool in_a = (tm.a >> (4 * nb + e)) & 1u;
        const float pa = in_a ? fexp(sc - lse_a[r]) : 0.f;
        float d = in_a ? pa * (ds[nb][e] - delta[r]) : 0.f;  // select: a non-finite dP off A stays out
        if constexpr (kStats) {  // c (w_E (-log pi) + w_seg - gbar_total) + w c g
          if ((live >> (4 * nb + e)) & 1u) {
            const float lw = sc - x[r];  // "each": log pi_h
            const float gs = each ? sG(nb, e) - w_e[r] * lw : sG(nb, e);
            d += fexp(lw) * (gs - gbh[r]);
            if ((act >> (4 * nb + e)) & 1u) d += wh[r] * weighted_g(kind, lw, gl(nb, e));
          }
        } else if ((act >> (4 * nb + e)) & 1u) {
          const float lw = sc - x[r];
          d += wh[r] * (weighted_g(kind, lw, gl(nb, e)) - gbh[r] * fexp(lw));
        }
        s[nb][e] = pa;
        ds[nb][e] = d;
      }
    // P and dS -> shared (rows 16 warp + g (+8), keys 8nb + 2t)
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int off = (warp * 16 + g + 8 * r) * kLdP + nb * 8 + 2 * t;
        *reinterpret_cast<uint32_t*>(sP + off) = Dtype<T>::pack(s[nb][2 * r], s[nb][2 * r + 1]);
        *reinterpret_cast<uint32_t*>(sdS + off) = Dtype<T>::pack(ds[nb][2 * r], ds[nb][2 * r + 1]);
      }
    __syncthreads();
    const int64_t kvh = h / (H / p.kv_heads);
    float acc[8][4];
    // dQ[i][c] += scale sum_key dS[i][key] K[key][c]   (dS from registers, this warp's rows;
    // first, so that ds is dead in the dV / dK loops)
    float* dqg = reinterpret_cast<float*>(p.dq) + (b * H + h) * Sq * dim;
    for (int c0 = 0; c0 < dim; c0 += 64) {
      zero(acc);
      gemm_c_v<T>(acc, ds, sK, ld, c0, d16, lane);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (!rp.valid[r]) continue;
#pragma unroll
        for (int nb = 0; nb < 8; ++nb) {
          const int col = c0 + nb * 8 + 2 * t;
          if (col < dim)
            atomic_add2(dqg + row[r] * dim + col, acc[nb][2 * r] * p.scale, acc[nb][2 * r + 1] * p.scale);
        }
      }
    }
    // grad[key][c] += factor sum_i X[i][key] Y[i][c] for this warp's 16 keys, c < width: the key
    // gradients (dV from P and dO, dK from dS and Q)
    auto add_key_grads = [&](float* grad, const T* sX, const T* sY, int ldy, int width, int width16, float factor) {
      for (int c0 = 0; c0 < width; c0 += 64) {
        zero(acc);
        gemm_at_b<T>(acc, sX, kLdP, sY, ldy, c0, width16, warp, lane);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int64_t key = j0 + warp * 16 + g + 8 * r;
          if (key >= k_end) continue;
#pragma unroll
          for (int nb = 0; nb < 8; ++nb) {
            const int col = c0 + nb * 8 + 2 * t;
            if (col < width)
              atomic_add2(grad + key * width + col, acc[nb][2 * r] * factor, acc[nb][2 * r + 1] * factor);
          }
        }
      }
    };
    // dV[key][c] += sum_i P[i][key] dO[i][c]
    const int64_t kv_row0 = (b * p.kv_heads + kvh) * Sk;
    if (has_v) add_key_grads(reinterpret_cast<float*>(p.dv) + kv_row0 * dv, sP, sdO, ldv, dv, dv16, 1.f);
    // dK[key][c] += scale sum_i dS[i][key] Q[i][c]
    add_key_grads(reinterpret_cast<float*>(p.dk) + kv_row0 * dim, sdS, sQ, ld, dim, d16, p.scale);
  };

  Pipeline pipe{stages, 0, (je - jb) * spj};
  pipe.start(issue);
  for (int64_t j = jb; j < je; ++j) {
    const int64_t j0 = u.k_begin() + j * kBlockN;
    const TileMask tm = tile_mask(p, rp, key_bits(p, u, j0, lane), j0, lane);
    if (!div_on) {  // out gradient only (no weight on any row of the block)
      for (int64_t h = 0; h < H; ++h) {
        const int buf = pipe.begin(issue);
        full_step(h, buf, tm, 0u, 0u, j0);
        pipe.end(issue);
      }
      continue;
    }
    if (each) {
      for (int64_t h = 0; h < H; ++h) {
        if (kStats && !ref_on) {  // statistics terms only
          const int buf = pipe.begin(issue);
          full_step(h, buf, tm, 0u, 0u, j0);
          pipe.end(issue);
          continue;
        }
        int buf = pipe.begin(issue);
        gemm_abt<T, 2>(s, smem + buf * stage_elems, smem + buf * stage_elems + kBlockM * ld, ld, dr16 / 16, warp, lane);
        float lse_p[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) lse_p[r] = rp.valid[r] ? rstats[b * rs0 + h * rs1 + row[r] * rs2 + rs3] : 0.f;
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) gl(nb, e) = s[nb][e] * p.ref_scale - lse_p[e >> 1];
        pipe.end(issue);
        buf = pipe.begin(issue);
        full_step(h, buf, tm, 0u, 0u, j0);
        pipe.end(issue);
      }
      continue;
    }
    const uint32_t act = tm.p & mean_rows, live = tm.p & mean_live;
    {
      float em[8][4], el[8][4];
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) { em[nb][e] = neg_inf(); el[nb][e] = 0.f; }
      // The reference-head and current-head folds below are twins (stats source, scale, head dim
      // differ). Merged into one lambda they cost this kernel 3 registers on sm_90a (255: at the
      // spill edge, measured with ptxas), so they stay written out.
      for (int64_t hr = 0; hr < n_ref; ++hr) {
        const int buf = pipe.begin(issue);
        float lse_a[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) lse_a[r] = rp.valid[r] ? rstats[b * rs0 + hr * rs1 + row[r] * rs2] : 0.f;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {  // half a key tile at a time (register pressure)
          float sh[4][4];
          gemm_abt_half<T>(sh, smem + buf * stage_elems, smem + buf * stage_elems + kBlockM * ld, ld, dr16 / 16, warp,
                           lane, hf);
#pragma unroll
          for (int nb = 0; nb < 4; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              if ((act >> (4 * (4 * hf + nb) + e)) & 1u)
                lse_push(em[4 * hf + nb][e], el[4 * hf + nb][e], sh[nb][e] * p.ref_scale - lse_a[e >> 1]);
        }
        pipe.end(issue);
      }
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          gl(nb, e) = lse_value(em[nb][e], el[nb][e]) - lzr[e >> 1];
          em[nb][e] = neg_inf();
          el[nb][e] = 0.f;
        }
      for (int64_t h = 0; h < H; ++h) {
        const int buf = pipe.begin(issue);
        float lse_a[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) lse_a[r] = rp.valid[r] ? stats[((b * H + h) * Sq + row[r]) * 2] : 0.f;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          float sh[4][4];
          gemm_abt_half<T>(sh, smem + buf * stage_elems, smem + buf * stage_elems + kBlockM * ld, ld, d16 / 16, warp,
                           lane, hf);
#pragma unroll
          for (int nb = 0; nb < 4; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              if ((live >> (4 * (4 * hf + nb) + e)) & 1u)
                lse_push(em[4 * hf + nb][e], el[4 * hf + nb][e], sh[nb][e] * p.scale - lse_a[e >> 1]);
        }
        pipe.end(issue);
      }
      KeySegs segs{{0u, 0u}};
      if constexpr (kStats) segs = key_segs(p, u, j0, lane);
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (!((live >> (4 * nb + e)) & 1u)) continue;
          const float lpi = lse_value(em[nb][e], el[nb][e]) - lz[e >> 1], lrho = gl(nb, e);
          if constexpr (kStats)
            sG(nb, e) = stats_g(sw_in + (b * Sq + row[e >> 1]) * n_stat, p.num_segments, lpi, segs(nb, e & 1));
          if ((act >> (4 * nb + e)) & 1u)
            gl(nb, e) = g_or_log_ratio(kind, lpi, lrho, divergence_term(kind, lpi, lrho).g);
        }
    }
    for (int64_t h = 0; h < H; ++h) {
      const int buf = pipe.begin(issue);
      full_step(h, buf, tm, act, live, j0);
      pipe.end(issue);
    }
  }
  cp_async_wait<0>();
}

// stages x (sA [64][ld] + sB [64][ld] + sV [64][ldv] + sdO [64][ldv]) + sP, sdS [64][kLdP] (2-byte elements)
// + gl, sG (statistics)
SmemPlan bwd_smem(const AttentionKLParams& p) {
  const int64_t ld = max(round_up16(int(p.head_dim)), round_up16(int(p.ref_head_dim))) + 8;
  const int64_t ldv = p.has_v ? round_up16(int(p.v_head_dim)) + 8 : 0;
  const int64_t stats = p.policy_stats ? 2 * kTileValsSmem : 0;
  return SmemPlan{2 * int64_t(kBlockM) * kLdP * 2 + stats, 2 * int64_t(kBlockM) * (ld + ldv) * 2};
}

template <typename T, bool kSeqs>
auto bwd_kernel_for(const AttentionKLParams& p) {
  return p.heads_each ? (p.policy_stats ? bwd_kernel<T, true, true, kSeqs> : bwd_kernel<T, true, false, kSeqs>)
                      : (p.policy_stats ? bwd_kernel<T, false, true, kSeqs> : bwd_kernel<T, false, false, kSeqs>);
}

}  // namespace

template <typename T>
cudaError_t launch_backward(const AttentionKLParams& p, cudaStream_t stream, const DeviceInfo& dev) {
  const int64_t units = num_units(p);
  if (p.batch > 65535 || (max_rows(p) + kBlockM - 1) / kBlockM * units > INT32_MAX)
    return cudaErrorInvalidConfiguration;
  static_assert(sizeof(T) == 2, "bwd_smem counts 2-byte elements");
  const SmemPlan plan = bwd_smem(p);
  const int stages = plan.stages(dev);
  const int64_t bytes = plan.bytes(stages);
  auto kernel = p.seqs ? bwd_kernel_for<T, true>(p) : bwd_kernel_for<T, false>(p);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (err != cudaSuccess) return err;
  const int64_t q_tiles = (max_rows(p) + kBlockM - 1) / kBlockM;
  const int nsplit = key_splits(p, q_tiles * units, dev);
  // with a table the grid also spans the batch (the kernel's batch index is blockIdx.y)
  const dim3 grid = p.seqs ? dim3(unsigned(q_tiles * units), unsigned(p.batch), unsigned(nsplit))
                           : dim3(unsigned(q_tiles), unsigned(p.batch), unsigned(nsplit));
  kernel<<<grid, kThreads, bytes, stream>>>(
      p, stages, nsplit, vec_bits(p));
  return cudaGetLastError();
}

}  // namespace ral::cuda
