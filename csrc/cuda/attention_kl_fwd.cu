// Forward of attention_kl on sm_80+ (docs/design.md, "The math"), three kernels on one stream:
//
//   1. stats_kernel  (per head, per 64-row query tile): online softmax over the key tiles ->
//      stats = [lse_A, lse_P] and, with v, out = softmax_A(s) v.  Run for the current heads and,
//      without ref_stats, once more for the reference heads (no v) -> ref_stats_out.
//   2. div_kernel    (per 64-row query tile, all heads for "mean" / one head for "each", key tiles
//      optionally split across blocks): recomputes the score tiles head by head to get log pi and
//      log rho per element, then f, g -> div, gbar and u_h = sum_P a_hj g_j / (H Z), accumulated
//      with atomics into div, gbar, cbar (zeroed first).
//   3. finalize_kernel (per row): c_h = H (u_h - gbar Z_h / (H Z)) ("mean"); zeros on dead rows.
// With policy_stats (params.h) pass 2 also sums the policy's entropy and segment masses and ("mean")
// the statistics' u sums, and pass 3 turns the latter into cstats; with no_reference there is no
// reference sweep in either pass and div, gbar, cbar stay 0.
//
// Non-finite inputs (docs/design.md, "Bad input"): a row is dead (div = gbar = cbar = 0) only by row_mask or an
// empty P, both read from the masks; pass 1 writes lse = -inf for an empty set and NaN for a
// non-empty one whose scores are non-finite, so NaN stays in the rows it touches.
//
// Every kernel works on units (kernel_utils.cuh, work_unit): the batch elements, or the entries of
// the sequence table (params.h: packed sequences, context-parallel chunks), each its own rows, keys
// and row positions; row-indexed outputs are written only for the unit's rows (plain stores of out
// and stats, atomics into div / gbar / cbar), so units never collide.
//
// Tiles: 64 query rows x 64 keys, 4 warps (16 rows each), mma.sync m16n8k16 with fp32
// accumulation; key-side tiles (and in pass 2 the query-side tiles) are double-buffered with
// cp.async when two stages fit in shared memory.
#include "cuda/kernel_utils.cuh"
#include "cuda/launch.cuh"

namespace ral::cuda {
namespace {

// ------------------------------------------------------------------------------------------------
// Pass 1. Grid (q tiles, heads, units): units are the batch elements, or the entries of the sequence
// table (kernel_utils.cuh, work_unit); q tiles cover the longest unit, blocks past their unit's rows
// exit. smem: sQ [64][ld] + stages x (sK [64][ld] + sV [64][ldv]).
// DVP: 0 (no v) or the width (64, 128) of the out columns [c_off, c_off + DVP) this launch
// computes; Dv > 128 takes two launches (c_off = 0, 128), the second with write_stats = false.
// ------------------------------------------------------------------------------------------------
template <typename T, int DVP, bool kSeqs>
__global__ void __launch_bounds__(kThreads, 1) stats_kernel(const AttentionKLParams p, const bool ref, const int stages,
                                                            const int vec, const int c_off, const bool write_stats) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr bool kHasV = DVP > 0;
  constexpr int kChunks = kHasV ? DVP / 64 : 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane & 3;
  const int64_t tile0 = int64_t(blockIdx.x) * kBlockM, h = blockIdx.y;
  const Unit<kSeqs> u = work_unit<kSeqs>(p, blockIdx.z);
  const int64_t q0 = u.q_begin() + tile0;
  const auto b = u.batch();
  if (kSeqs && q0 >= u.q_end()) return;  // past the unit's rows (block-uniform, before any barrier)

  const View& qv = ref ? p.q_ref : p.q;
  const View& kv = ref ? p.k_ref : p.k;
  const int64_t n_heads = ref ? p.ref_heads : p.heads;
  const int64_t kvh = h / (n_heads / (ref ? p.ref_kv_heads : p.kv_heads));
  const int dim = int(ref ? p.ref_head_dim : p.head_dim), dim16 = round_up16(dim);
  const int dv_all = kHasV ? int(p.v_head_dim) : 0;
  const int dv = kHasV ? min(dv_all - c_off, DVP) : 0, dv16 = round_up16(dv);  // this launch's columns
  const float scale2 = (ref ? p.ref_scale : p.scale) * kLog2e;  // scores in log2 units
  const int ld = dim16 + 8, ldv = kHasV ? dv16 + 8 : 0;
  const bool vq = vec & (ref ? kVecQRef : kVecQ), vk = vec & (ref ? kVecKRef : kVecK), vv = vec & kVecV;

  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBlockM * ld;              // [stages][64][ld]
  T* sV = sK + stages * kBlockN * ld;     // [stages][64][ldv]

  const T* gq = reinterpret_cast<const T*>(qv.ptr) + b * qv.stride[0] + h * qv.stride[1] + q0 * qv.stride[2];
  const T* gk = reinterpret_cast<const T*>(kv.ptr) + b * kv.stride[0] + kvh * kv.stride[1];
  const T* gv =
      kHasV ? reinterpret_cast<const T*>(p.v.ptr) + b * p.v.stride[0] + kvh * p.v.stride[1] + c_off : nullptr;

  int64_t jb, je;
  key_tile_range(p, u, q0, 0, 1, jb, je);
  const RowPos rp = row_pos(u, q0, warp, lane);

  auto issue = [&](int64_t step, int buf) {
    const int64_t j0 = u.k_begin() + (jb + step) * kBlockN;
    load_tile(sK + buf * kBlockN * ld, ld, gk + j0 * kv.stride[2], kv.stride[2], int(min64(u.k_end() - j0, 64)),
              dim, dim16, vk);
    if (kHasV)
      load_tile(sV + buf * kBlockN * ldv, ldv, gv + j0 * p.v.stride[2], p.v.stride[2],
                int(min64(u.k_end() - j0, 64)), dv, dv16, vv);
  };
  load_tile(sQ, ld, gq, qv.stride[2], int(min64(u.q_end() - q0, 64)), dim, dim16, vq);
  Pipeline pipe{stages, 0, je - jb};
  pipe.start(issue);  // sQ rides in the first group

  // Row statistics, per row half r, in log2 units. P = A minus the self key (exclude_self), so P
  // and A differ by at most that one key: the P sum keeps its own running max mp (lse_P never
  // comes from the A sum, which may be all self), and A's max is ma = max(mp, self score).
  //   lp = sum_P exp2(s - mp),   la = sum_A exp2(s - ma) = lp exp2(mp - ma) + exp2(s_self - ma)
  // One exp per element: P keys take exp2(s - mp) (scaled by f = exp2(mp - ma) for o and la), the
  // self key exp2(s - ma). o accumulates with base ma. Emptiness comes from the masks (`seen`),
  // never from a zero sum: a non-empty set whose sum is 0 or NaN (non-finite inputs) gets NaN.
  float ma[2] = {neg_inf(), neg_inf()}, mp[2] = {neg_inf(), neg_inf()};
  float la[2] = {0.f, 0.f}, lp[2] = {0.f, 0.f};
  uint32_t seen = 0;  // bit r: row half r has an A key (this lane); bit 2 + r: a P key
  float o[kChunks][8][4];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) zero(o[c]);
  // key positions of this warp's rows: [pos_lo, pos_lo + 15]
  const int64_t pos_lo = u.pos_off() + q0 + warp * 16;

  for (int64_t j = jb; j < je; ++j) {
    const int buf = pipe.begin(issue);
    float s[8][4];
    gemm_abt<T>(s, sQ, sK + buf * kBlockN * ld, ld, dim16 / 16, warp, lane);
    const int64_t j0 = u.k_begin() + j * kBlockN;
    const TileMask tm = tile_mask(p, rp, key_bits(p, u, j0, lane), j0, lane);
    seen |= ((tm.a & 0x33333333u) ? 1u : 0u) | ((tm.a & 0xccccccccu) ? 2u : 0u) |
            ((tm.p & 0x33333333u) ? 4u : 0u) | ((tm.p & 0xccccccccu) ? 8u : 0u);
    // warp-uniform: may this tile hold the self key of one of the warp's rows?
    const bool diag = p.exclude_self && pos_lo <= j0 + kBlockN - 1 && pos_lo + 15 >= j0;
    const uint32_t self_bits = tm.a & ~tm.p;
    float sv[2] = {0.f, 0.f}, sn[2] = {0.f, 0.f};  // self score (log2 units) and its count, this lane
    if (diag) {
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if ((self_bits >> (4 * nb + e)) & 1u) {
            sv[e >> 1] = s[nb][e] * scale2;
            sn[e >> 1] = 1.f;
          }
    }
    float mx[2] = {mp[0], mp[1]};
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nb][e] = ((tm.p >> (4 * nb + e)) & 1u) ? s[nb][e] * scale2 : neg_inf();  // P keys only
        mx[e >> 1] = fmaxf(mx[e >> 1], s[nb][e]);
      }
    float mu_p[2], mu_a[2], f[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = quad_max(mx[r]);
      float ma_new = fmaxf(ma[r], mx[r]);
      if (diag) {
        const float ssum = quad_sum(sv[r]), scnt = quad_sum(sn[r]);  // NaN-preserving (a sum)
        if (scnt > 0.f) ma_new = fmaxf(ma_new, ssum);                  // a NaN self score: see below
        sv[r] = ssum;
        sn[r] = scnt;
      }
      mu_p[r] = mx[r] == neg_inf() ? 0.f : mx[r];
      mu_a[r] = ma_new == neg_inf() ? 0.f : ma_new;
      lp[r] *= exp2f(mp[r] - mu_p[r]);  // 0 while P was empty
      const float corr = exp2f(ma[r] - mu_a[r]);
      la[r] *= corr;
#pragma unroll
      for (int c = 0; c < kChunks; ++c)
#pragma unroll
        for (int nb = 0; nb < 8; ++nb) {
          o[c][nb][2 * r] *= corr;
          o[c][nb][2 * r + 1] *= corr;
        }
      f[r] = exp2f(mx[r] - mu_a[r]);  // exp2(mp - ma) <= 1 (0 while P is empty)
      mp[r] = mx[r];
      ma[r] = ma_new;
    }
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const float pe = exp2f(s[nb][e] - mu_p[r]);  // non-P keys: exp2(-inf) = 0
        lp[r] += pe;
        s[nb][e] = pe * f[r];
        la[r] += s[nb][e];
      }
    if (diag) {  // the self key: weight exp2(s_self - ma) in la and o (a NaN score gives NaN)
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if ((self_bits >> (4 * nb + e)) & 1u) {
            const float w = exp2f(sv[e >> 1] - mu_a[e >> 1]);
            la[e >> 1] += w;
            s[nb][e] = w;
          }
    }
    if constexpr (kHasV) {
      const T* sVb = sV + buf * kBlockN * ldv;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) gemm_c_v<T>(o[c], s, sVb, ldv, c * 64, dv16, lane);
    }
    pipe.end(issue);
  }
  cp_async_wait<0>();  // nothing in flight at exit (empty key range: sQ's group)

  float* stats = reinterpret_cast<float*>(ref ? p.ref_stats_out : p.stats);
  const float nan = __int_as_float(0x7fc00000);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sa = quad_sum(la[r]), sp = quad_sum(lp[r]);
    const float any_a = quad_sum(float((seen >> r) & 1u)), any_p = quad_sum(float((seen >> (2 + r)) & 1u));
    const int64_t row = q0 + warp * 16 + (lane >> 2) + 8 * r;
    if (!rp.valid[r]) continue;
    if (t == 0 && write_stats) {
      // sa, sp >= 1 for a non-empty set of finite scores (its max contributes exp2(0))
      const float lse_a = any_a == 0.f ? neg_inf() : sa > 0.f ? (ma[r] + log2f(sa)) * kLn2 : nan;
      const float lse_p = any_p == 0.f ? neg_inf() : sp > 0.f ? (mp[r] + log2f(sp)) * kLn2 : nan;
      *reinterpret_cast<float2*>(stats + ((b * n_heads + h) * p.q_len + row) * 2) = make_float2(lse_a, lse_p);
    }
    if constexpr (kHasV) {
      const float inv = any_a == 0.f ? 0.f : 1.f / sa;  // empty rows: out = 0; a zero sum: NaN
      T* out = reinterpret_cast<T*>(p.out) + ((b * n_heads + h) * p.q_len + row) * dv_all + c_off;
#pragma unroll
      for (int c = 0; c < kChunks; ++c)
#pragma unroll
        for (int nb = 0; nb < 8; ++nb) {
          const int col = c * 64 + nb * 8 + 2 * t;
          if (col < dv)
            *reinterpret_cast<uint32_t*>(out + col) =
                Dtype<T>::pack(o[c][nb][2 * r] * inv, o[c][nb][2 * r + 1] * inv);
        }
    }
  }
}

// Step kinds of pass 2 / the backward within one key tile.
enum StepKind : int { kRefStep = 0, kCurStep = 1, kLastStep = 2 };

// ------------------------------------------------------------------------------------------------
// Pass 2. Grid (q tiles, units x G, splits) with G = 1 ("mean") or H ("each": one head per block).
// Steps per key tile: "mean": Hr ref + H cur (log-sum over heads) + H last (u_h); "each": ref, cur.
// kStats (policy_stats): the same sweep also sums, per live row, the entropy -pi log pi and the
// segment masses of pi into entropy / mass, and ("mean") per head the statistics' u sums into cstats
// (finalized by pass 3); with no_reference the ref steps are skipped and div, gbar, cbar stay 0.
// The row sums of entropy and mass run per key tile in registers, then in thread-private shared
// memory (sSum) across the tiles (registers are at the spill edge).
// smem: stages x (sA [64][ld] + sB [64][ld]) (+ sSum fp32 [18][128] with statistics),
// ld = max(D16, Dr16) + 8.
// ------------------------------------------------------------------------------------------------
template <typename T, bool kSeqs, bool kStats>
__global__ void __launch_bounds__(kThreads, 1)
    div_kernel(const AttentionKLParams p, const int stages, const int nsplit, const int vec) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane & 3;
  const bool each = p.heads_each;
  const int64_t H = p.heads, Hr = p.ref_heads;
  const int64_t groups = each ? H : 1;
  const int64_t tile0 = int64_t(blockIdx.x) * kBlockM;
  const Unit<kSeqs> u = work_unit<kSeqs>(p, blockIdx.y / groups);
  const int64_t q0 = u.q_begin() + tile0, he = blockIdx.y % groups;
  const auto b = u.batch();
  if (kSeqs && q0 >= u.q_end()) return;  // past the unit's rows
  const int kind = p.divergence;
  const int d16 = round_up16(int(p.head_dim)), dr16 = round_up16(int(p.ref_head_dim));
  const int ld = max(d16, dr16) + 8;
  T* sA = reinterpret_cast<T*>(smem_raw);   // [stages][64][ld]
  T* sB = sA + stages * kBlockM * ld;       // [stages][64][ld]
  float* sSum = reinterpret_cast<float*>(sB + stages * kBlockN * ld) + threadIdx.x;  // kStats: [18] at stride 128

  int64_t jb, je;
  key_tile_range(p, u, q0, blockIdx.z, nsplit, jb, je);
  const RowPos rp = row_pos(u, q0, warp, lane);
  const bool ref = !kStats || !p.no_reference;  // the reference's steps (and the divergence) run
  const int64_t n_ref = kStats && !ref ? 0 : Hr;  // "mean": ref steps per key tile
  const int64_t spj = each ? (ref ? 2 : 1) : n_ref + 2 * H;  // steps per key tile

  auto decode = [&](int64_t tt, int& k, int64_t& head) {
    if (each) { k = ref && tt == 0 ? kRefStep : kCurStep; head = he; return; }
    if (tt < n_ref) { k = kRefStep; head = tt; }
    else if (tt < n_ref + H) { k = kCurStep; head = tt - n_ref; }
    else { k = kLastStep; head = tt - n_ref - H; }
  };
  auto issue = [&](int64_t step, int buf) {
    const int64_t j0 = u.k_begin() + (jb + step / spj) * kBlockN;
    int k; int64_t head;
    decode(step % spj, k, head);
    load_qk_tiles(p, u, k == kRefStep, head, q0, j0, sA + buf * kBlockM * ld, sB + buf * kBlockN * ld, ld, d16, dr16,
                  vec);
  };

  // ---- per-row constants: the log normalisers of pi and rho, and whether the row is live
  const float* stats = reinterpret_cast<const float*>(p.stats);
  const float* rstats = reinterpret_cast<const float*>(p.has_ref_stats ? p.ref_stats_in.ptr : p.ref_stats_out);
  const int64_t rs0 = p.has_ref_stats ? p.ref_stats_in.stride[0] : Hr * p.q_len * 2;
  const int64_t rs1 = p.has_ref_stats ? p.ref_stats_in.stride[1] : p.q_len * 2;
  const int64_t rs2 = p.has_ref_stats ? p.ref_stats_in.stride[2] : 2;
  const int64_t rs3 = p.has_ref_stats ? p.ref_stats_in.stride[3] : 1;
  const uint8_t* rmask = reinterpret_cast<const uint8_t*>(p.row_mask.ptr);
  int64_t row[2];
  float lz[2], lzr[2];   // "mean": log(H Z), log(Hr Zr); "each": lse_P of head he (current, reference)
  bool live[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row[r] = q0 + warp * 16 + (lane >> 2) + 8 * r;
    lz[r] = lzr[r] = neg_inf();
    live[r] = false;
    if (!rp.valid[r]) continue;
    const float* st = stats + (b * H * p.q_len + row[r]) * 2;
    const float* rst = rstats + b * rs0 + row[r] * rs2;
    if (each) {
      lz[r] = st[he * p.q_len * 2 + 1];
      if (ref) lzr[r] = rst[he * rs1 + rs3];
    } else {
      lz[r] = log_hz(st, p.q_len * 2, 1, H);
      if (ref) lzr[r] = log_hz(rst, rs1, rs3, Hr);
    }
    live[r] = lz[r] != neg_inf() &&
              (!p.has_row_mask || rmask[b * p.row_mask.stride[0] + row[r] * p.row_mask.stride[1]] != 0);
  }

  Pipeline pipe{stages, 0, (je - jb) * spj};
  pipe.start(issue);
  float dacc[2] = {0.f, 0.f}, gacc[2] = {0.f, 0.f};
  float gl[8][4];   // log rho, then g (or log rho/pi for reverse_kl), per element of the tile
  const int n_stat = kStats ? int(1 + p.num_segments) : 0;
  StatSums policy;  // kStats: entropy and masses of this lane's elements of both row halves, one key tile
  if constexpr (kStats)
    for (int k = 0; k < 2 * (1 + kMaxSegments); ++k) sSum[k * kThreads] = 0.f;  // thread-private: no barrier
  for (int64_t j = jb; j < je; ++j) {
    const int64_t j0 = u.k_begin() + j * kBlockN;
    TileMask tm = tile_mask(p, rp, key_bits(p, u, j0, lane), j0, lane);
    tm.p &= (live[0] ? 0x33333333u : 0u) | (live[1] ? 0xccccccccu : 0u);  // only live rows count
    KeySegs segs{{0u, 0u}};
    if constexpr (kStats) segs = key_segs(p, u, j0, lane);
    float s[8][4];
    if (each) {
      int buf;
      if (ref) {
        buf = pipe.begin(issue);
        gemm_abt<T>(s, sA + buf * kBlockM * ld, sB + buf * kBlockN * ld, ld, dr16 / 16, warp, lane);
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) gl[nb][e] = s[nb][e] * p.ref_scale - lzr[e >> 1];
        pipe.end(issue);
      }
      buf = pipe.begin(issue);
      gemm_abt<T>(s, sA + buf * kBlockM * ld, sB + buf * kBlockN * ld, ld, d16 / 16, warp, lane);
      if constexpr (kStats) policy.zero();
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (!((tm.p >> (4 * nb + e)) & 1u)) continue;
          const float lpi = s[nb][e] * p.scale - lz[e >> 1];
          if constexpr (kStats) policy.add(e >> 1, fexp(lpi), lpi, segs(nb, e & 1));
          if (!ref) continue;
          const float lrho = gl[nb][e];
          const DivergenceTerm dt = divergence_term(kind, lpi, lrho);
          dacc[e >> 1] += dt.f;
          gacc[e >> 1] += weighted_g(kind, lpi, g_or_log_ratio(kind, lpi, lrho, dt.g));
        }
      if constexpr (kStats) policy.add_to(sSum, n_stat);
      pipe.end(issue);
      continue;
    }
    // "mean": log rho = logsumexp_hr(s_ref - lse_A,hr) - log(Hr Zr), likewise log pi
    float em[8][4], el[8][4];
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) { em[nb][e] = neg_inf(); el[nb][e] = 0.f; }
    // (em, el) += each of `heads` pipeline steps' s * scale - lse_A, lse_A of the step's head h and
    // the row at lse[first + h * head_stride + row * row_stride]
    auto push_heads = [&](int64_t heads, int dim16, float scale, const float* lse, int64_t first,
                          int64_t head_stride, int64_t row_stride) {
      for (int64_t h = 0; h < heads; ++h) {
        const int buf = pipe.begin(issue);
        gemm_abt<T>(s, sA + buf * kBlockM * ld, sB + buf * kBlockN * ld, ld, dim16 / 16, warp, lane);
        float lse_a[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) lse_a[r] = rp.valid[r] ? lse[first + h * head_stride + row[r] * row_stride] : 0.f;
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if ((tm.p >> (4 * nb + e)) & 1u) lse_push(em[nb][e], el[nb][e], s[nb][e] * scale - lse_a[e >> 1]);
        pipe.end(issue);
      }
    };
    push_heads(n_ref, dr16, p.ref_scale, rstats, b * rs0, rs1, rs2);
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        gl[nb][e] = lse_value(em[nb][e], el[nb][e]) - lzr[e >> 1];
        em[nb][e] = neg_inf();
        el[nb][e] = 0.f;
      }
    push_heads(H, d16, p.scale, stats, b * H * p.q_len * 2, p.q_len * 2, 2);
    if constexpr (kStats) policy.zero();
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (!((tm.p >> (4 * nb + e)) & 1u)) continue;
        const float lpi = lse_value(em[nb][e], el[nb][e]) - lz[e >> 1];
        if constexpr (kStats) {
          policy.add(e >> 1, fexp(lpi), lpi, segs(nb, e & 1));
          em[nb][e] = lpi;  // kept for the statistics' u sums below
        }
        if (!ref) continue;
        const float lrho = gl[nb][e];
        const DivergenceTerm dt = divergence_term(kind, lpi, lrho);
        gl[nb][e] = g_or_log_ratio(kind, lpi, lrho, dt.g);
        dacc[e >> 1] += dt.f;
        gacc[e >> 1] += weighted_g(kind, lpi, gl[nb][e]);
      }
    if constexpr (kStats) policy.add_to(sSum, n_stat);
    // u_h = sum_P a_hj g_j / (H Z), one head at a time, into cbar (finalized by finalize_kernel);
    // normalised by H Z per element (never 1/Z afterwards: Z may underflow when a row attends
    // almost only to itself). kStats: likewise the statistics' u sums (g = -log pi, [seg = s]) into cstats.
    for (int64_t h = 0; h < H; ++h) {
      const int buf = pipe.begin(issue);
      gemm_abt<T>(s, sA + buf * kBlockM * ld, sB + buf * kBlockN * ld, ld, d16 / 16, warp, lane);
      float x[2], uh[2] = {0.f, 0.f};  // exp(s - x) = a_hj / (H Z)
      StatSums us;
      if constexpr (kStats) us.zero();
#pragma unroll
      for (int r = 0; r < 2; ++r) x[r] = rp.valid[r] ? stats[((b * H + h) * p.q_len + row[r]) * 2] + lz[r] : 0.f;
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (!((tm.p >> (4 * nb + e)) & 1u)) continue;
          const float lw = s[nb][e] * p.scale - x[e >> 1];
          if (ref) uh[e >> 1] += weighted_g(kind, lw, gl[nb][e]);
          if constexpr (kStats) us.add(e >> 1, fexp(lw), em[nb][e], segs(nb, e & 1));
        }
      pipe.end(issue);
      if (ref) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          uh[r] = quad_sum(uh[r]);
          if (t == 0 && live[r]) atomicAdd(reinterpret_cast<float*>(p.cbar) + (b * H + h) * p.q_len + row[r], uh[r]);
        }
      }
      if constexpr (kStats) {  // cstats (B, H, Sq, 1 + S)
        float* cstats = reinterpret_cast<float*>(p.cstats) + (b * H + h) * p.q_len * n_stat;
        us.flush(n_stat, live, [&](int r, int k) { return cstats + row[r] * n_stat + k; }, lane);
      }
    }
  }
  cp_async_wait<0>();
  float* div = reinterpret_cast<float*>(p.div);
  float* gbar = reinterpret_cast<float*>(p.gbar);
  if (ref) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float d = quad_sum(dacc[r]), g = quad_sum(gacc[r]);
      if (t == 0 && live[r] && je > jb) {
        const int64_t idx = (b * groups + he) * p.q_len + row[r];
        atomicAdd(div + idx, d);
        atomicAdd(gbar + idx, g);
      }
    }
  }
  if constexpr (kStats) {  // entropy (B, G, Sq), mass (B, G, Sq, S)
    const int64_t n_seg = p.num_segments, idx0 = (b * groups + he) * p.q_len;
    float* entropy = reinterpret_cast<float*>(p.entropy);
    float* mass = reinterpret_cast<float*>(p.mass);
    const bool write[2] = {live[0] && je > jb, live[1] && je > jb};
    policy.load(sSum, n_stat);
    policy.flush(n_stat, write, [&](int r, int k) {
      return k == 0 ? entropy + idx0 + row[r] : mass + (idx0 + row[r]) * n_seg + k - 1;
    }, lane);
  }
}

// ------------------------------------------------------------------------------------------------
// Pass 3, one thread per row (b, i) ("mean") or (b, h, i) ("each") of a unit, grid (G x rows / 256,
// units) with rows = the longest unit's (threads past their unit's rows exit): dead rows (row_mask False or
// empty P) get div = gbar = 0 (and cbar = 0); live "mean" rows get
// c_h = (sum_P a_hj g_j - gbar Z_h) / Z = H (u_h - gbar Z_h / (H Z)) with u_h = sum_P a_hj g_j / (H Z),
// and with policy_stats likewise cstats[h][k] = H (u_hk - stat_k Z_h / (H Z)) for stat = [entropy,
// mass_0 ..]. Liveness: row_mask and the emptiness of P (lse_P = -inf exactly for an empty P; a NaN
// row stays live). Dead rows keep their zeroed entropy, mass and cstats.
// ------------------------------------------------------------------------------------------------
template <bool kSeqs>
__global__ void finalize_kernel(const AttentionKLParams p, const int64_t max_rows) {
  const int64_t H = p.heads, groups = p.heads_each ? H : 1;
  const Unit<kSeqs> u = work_unit<kSeqs>(p, blockIdx.y);
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // he * max_rows + row in the unit
  const int64_t he = i / max_rows, row = u.q_begin() + (i - he * max_rows);
  const int64_t b = u.batch();
  if (he >= groups || row >= u.q_end()) return;
  const int64_t idx = (b * groups + he) * p.q_len + row;
  const float* stats = reinterpret_cast<const float*>(p.stats) + (b * H * p.q_len + row) * 2;
  float* div = reinterpret_cast<float*>(p.div);
  float* gbar = reinterpret_cast<float*>(p.gbar);
  float* cbar = reinterpret_cast<float*>(p.cbar) + b * H * p.q_len + row;
  const uint8_t* rmask = reinterpret_cast<const uint8_t*>(p.row_mask.ptr);
  bool live = !p.has_row_mask || rmask[b * p.row_mask.stride[0] + row * p.row_mask.stride[1]] != 0;
  const float lz = p.heads_each ? stats[he * p.q_len * 2 + 1] : log_hz(stats, p.q_len * 2, 1, H);
  live = live && lz != neg_inf();
  if (!live) {
    div[idx] = 0.f;
    gbar[idx] = 0.f;
    if (!p.heads_each)
      for (int64_t h = 0; h < H; ++h) cbar[h * p.q_len] = 0.f;
    return;
  }
  if (p.heads_each) return;  // cbar stays 0 (zero-filled)
  const float gb = gbar[idx];
  const int64_t n_stat = p.policy_stats ? 1 + p.num_segments : 0;
  const float* entropy = reinterpret_cast<const float*>(p.entropy);
  const float* mass = reinterpret_cast<const float*>(p.mass);
  float* cstats = reinterpret_cast<float*>(p.cstats) + (b * H * p.q_len + row) * n_stat;
  for (int64_t h = 0; h < H; ++h) {
    const float lse_a = stats[h * p.q_len * 2], lse_p = stats[h * p.q_len * 2 + 1];
    const float zn = fexp(lse_p - lse_a - lz);  // Z_h / (H Z)
    cbar[h * p.q_len] = float(H) * (cbar[h * p.q_len] - gb * zn);
    float* c = cstats + h * p.q_len * n_stat;
    for (int64_t k = 0; k < n_stat; ++k) {
      const float stat = k == 0 ? entropy[idx] : mass[idx * p.num_segments + k - 1];
      c[k] = float(H) * (c[k] - stat * zn);
    }
  }
}

int64_t bucket(int64_t d) { return d <= 64 ? 64 : d <= 128 ? 128 : 256; }

// pass 1 (elements are 2 bytes: fp16 / bf16): sQ [64][ld] + stages x (sK [64][ld] + sV [64][ldv])
SmemPlan stats_smem(const AttentionKLParams& p, bool ref, int dvp, int c_off) {
  const int64_t dim16 = round_up16(int(ref ? p.ref_head_dim : p.head_dim));
  const int64_t ldv = dvp > 0 ? round_up16(int(min64(p.v_head_dim - c_off, dvp))) + 8 : 0, ld = dim16 + 8;
  return SmemPlan{int64_t(kBlockM) * ld * 2, int64_t(kBlockN) * (ld + ldv) * 2};
}
// pass 2: stages x (sA [64][ld] + sB [64][ld]) (+ sSum with statistics)
SmemPlan div_smem(const AttentionKLParams& p) {
  const int64_t ld = max(round_up16(int(p.head_dim)), round_up16(int(p.ref_head_dim))) + 8;
  return SmemPlan{p.policy_stats ? kStatSumsSmem : 0, 2 * int64_t(kBlockM) * ld * 2};
}

template <typename Kernel>
cudaError_t set_smem(Kernel kernel, int64_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

template <typename T, int DVP>
cudaError_t launch_stats(const AttentionKLParams& p, bool ref, cudaStream_t stream, const DeviceInfo& dev,
                         int c_off = 0, bool write_stats = true) {
  static_assert(sizeof(T) == 2, "stats_smem counts 2-byte elements");
  const SmemPlan plan = stats_smem(p, ref, DVP, c_off);
  const int stages = plan.stages(dev);
  const int64_t bytes = plan.bytes(stages);
  auto kernel = p.seqs ? stats_kernel<T, DVP, true> : stats_kernel<T, DVP, false>;
  cudaError_t err = set_smem(kernel, bytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned((max_rows(p) + kBlockM - 1) / kBlockM), unsigned(ref ? p.ref_heads : p.heads),
                  unsigned(num_units(p)));
  kernel<<<grid, kThreads, bytes, stream>>>(p, ref, stages, vec_bits(p), c_off, write_stats);
  return cudaGetLastError();
}

}  // namespace

int64_t forward_min_smem(const AttentionKLParams& p) {
  int64_t bytes = div_smem(p).bytes(1);
  if (!p.has_ref_stats) bytes = max(bytes, stats_smem(p, true, 0, 0).bytes(1));
  if (!p.has_v) return max(bytes, stats_smem(p, false, 0, 0).bytes(1));
  const int dvp = int(min64(bucket(p.v_head_dim), 128));
  bytes = max(bytes, stats_smem(p, false, dvp, 0).bytes(1));
  return p.v_head_dim > 128 ? max(bytes, stats_smem(p, false, 128, 128).bytes(1)) : bytes;
}

template <typename T>
cudaError_t launch_forward(const AttentionKLParams& p, cudaStream_t stream, const DeviceInfo& dev) {
  const int64_t units = num_units(p);
  if (p.heads > 65535 || p.ref_heads > 65535 || units > 65535 || units * p.heads > 65535)
    return cudaErrorInvalidConfiguration;
  // pass 1: current heads (with out), then the reference heads unless their stats were given
  cudaError_t err;
  if (!p.has_v) err = launch_stats<T, 0>(p, false, stream, dev);
  else if (bucket(p.v_head_dim) == 64) err = launch_stats<T, 64>(p, false, stream, dev);
  else if (bucket(p.v_head_dim) == 128) err = launch_stats<T, 128>(p, false, stream, dev);
  else if ((err = launch_stats<T, 128>(p, false, stream, dev)) == cudaSuccess)
    err = launch_stats<T, 128>(p, false, stream, dev, 128, false);  // out columns 128 .. Dv
  if (err != cudaSuccess) return err;
  if (!p.has_ref_stats && (err = launch_stats<T, 0>(p, true, stream, dev)) != cudaSuccess) return err;

  // pass 2: div, gbar and u_h accumulate atomically into zeroed buffers
  // (and with policy_stats entropy, mass and the u sums of cstats)
  const int64_t groups = p.heads_each ? p.heads : 1;
  const int64_t rows = p.batch * groups * p.q_len;
  auto zero = [&](uintptr_t ptr, int64_t floats) {
    return cudaMemsetAsync(reinterpret_cast<void*>(ptr), 0, floats * sizeof(float), stream);
  };
  if ((err = zero(p.div, rows)) || (err = zero(p.gbar, rows)) || (err = zero(p.cbar, p.batch * p.heads * p.q_len)))
    return err;
  if (p.policy_stats &&
      ((err = zero(p.entropy, rows)) || (p.num_segments && (err = zero(p.mass, rows * p.num_segments))) ||
       (!p.heads_each && (err = zero(p.cstats, p.batch * p.heads * p.q_len * (1 + p.num_segments))))))
    return err;
  const SmemPlan plan = div_smem(p);
  const int stages = plan.stages(dev);
  const int64_t q_tiles = (max_rows(p) + kBlockM - 1) / kBlockM;
  const int nsplit = key_splits(p, q_tiles * units * groups, dev);
  auto kernel = p.policy_stats ? (p.seqs ? div_kernel<T, true, true> : div_kernel<T, false, true>)
                               : (p.seqs ? div_kernel<T, true, false> : div_kernel<T, false, false>);
  if ((err = set_smem(kernel, plan.bytes(stages))) != cudaSuccess) return err;
  kernel<<<dim3(unsigned(q_tiles), unsigned(units * groups), unsigned(nsplit)), kThreads, plan.bytes(stages), stream>>>(
      p, stages, nsplit, vec_bits(p));
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  // pass 3
  const int threads = 256;
  const dim3 grid3(unsigned((groups * max_rows(p) + threads - 1) / threads), unsigned(units));
  auto finalize = p.seqs ? finalize_kernel<true> : finalize_kernel<false>;
  finalize<<<grid3, threads, 0, stream>>>(p, max_rows(p));
  return cudaGetLastError();
}

template cudaError_t launch_forward<__half>(const AttentionKLParams&, cudaStream_t, const DeviceInfo&);
template cudaError_t launch_forward<__nv_bfloat16>(const AttentionKLParams&, cudaStream_t, const DeviceInfo&);

}  // namespace ral::cuda
