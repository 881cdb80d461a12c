// CPU forward: attention output, row statistics and the divergence (docs/design.md, "The math").
//
// Per work item (a unit's block of BM = Geometry::block_m query rows, every head; tiles.h):
//   pass 1 over key blocks: per head an online softmax over the support P, with the self key
//          kept aside, gives lse_P, lse_A = logaddexp(lse_P, s_self) and out (P V, then the self
//          row added with its own weight, so lse_P never comes from 1 - a_self); the same for
//          the reference heads unless ref_stats is given. A tile's exponentials are taken
//          against the tile's own maximum m_tile (exponentiate_row), so that pass 2 can form
//          them again, bit for bit, from the tile alone. While a tile is worked on, the next
//          tile's keys and values are prefetched a few lines per softmax row (TilePrefetcher);
//   pass 2 over key blocks: per head the exponentials e = exp(s - m_tile) of both models (read
//          back from the score cache when the caller gives one, else scored and exponentiated
//          again); heads="mean" mixes them linearly, pi_j = exp(offset) sum_h w_h e_hj with one
//          weight per head and row (mixture_weights), so that a key costs one log per model and
//          no exponential; lanes that mixture cannot carry (kLinearFloor) take the log-space
//          route from the raw scores. heads="each" works from the raw scores: log pi = s - lse_P.
//          Accumulates div = sum_P f, gbar = sum_P pi g / sum_P pi and c_h = u_h - gbar z_h (write_divergence);
//          with policy_stats also the entropy, the segment masses and their per-head u sums (params.h).
// Memory: per thread O((H + Hr) * BM * (kBlockN + D + Dv) + Hkv * kBlockN * (D + Dv)) floats of
// tiles, plus (H + 1) * BM * (1 + S) * kLanes accumulators with policy_stats (and, with a
// key_padding_mask, one count per key of the unit); the optional score cache (p.scratch,
// Python-allocated) holds at most (H + Hr) * BM * (L + L / kBlockN) floats per thread, L the
// longest unit's key count; nothing grows with Sq x Sk.
#include <cmath>
#include <vector>

#include "common/check.h"
#include "cpu/api.h"
#include "cpu/tiles.h"

namespace ral::cpu {
namespace {

// Per head and row, the online softmax state over the support (m, l) and the self score.
struct SoftmaxState {
  float* max;   // (heads, BM)
  float* sum;   // (heads, BM): sum_P exp(s - max)
  float* self;  // (heads, BM): the self key's score, -inf when it is not attended / not excluded

  void reset(int64_t n) {
    std::fill(max, max + n, -kInf);
    std::fill(sum, sum + n, 0.f);
    std::fill(self, self + n, -kInf);
  }
};

// One row of a key tile: the scores `in`, masked to -inf outside the row's support P unless `full`
// (into `e`, which may be `in`), become e = exp(s - m), m the row's largest support score in this
// tile; returns m (-inf when no key of the tile is in P; e is 0 there) and the lane sums of e.
// Both passes exponentiate a tile through here, so pass 2's recomputed e has pass 1's bits.
RAL_VECTOR_INLINE float exponentiate_row(const AttentionKLParams& p, const KeyBlock& kb, bool full, int64_t pos,
                                         const float* in, float* e, vfloat& sum) {
  if (!full) {
    for (int64_t c = 0; c < kBlockN; c += kLanes)
      vstore(e + c, vselect(lane_masks(p, kb, c, pos, true).support, vload(in + c), vbroadcast(-kInf)));
    in = e;
  }
  vfloat tile_max = vbroadcast(-kInf);
  for (int64_t c = 0; c < kBlockN; c += kLanes) tile_max = vmax(tile_max, vload(in + c));
  const float m = hmax(tile_max);
  const float shift = m == -kInf ? 0.f : m;
  vfloat total{};
  for (int64_t c = 0; c < kBlockN; c += kLanes) {
    const vfloat x = vexp_nonpositive(vload(in + c) - shift);
    vstore(e + c, x);
    total += x;
  }
  sum = total;
  return m;
}

// One key tile of pass 1's online softmax, rows of one head: e = exp(s - m_tile) per row
// (exponentiate_row) into `e` (which may be `src`), m_tile into `tile_max` when given, and the state
// updated. With `keep` / `add` given, each row's factors for the output, o = keep o + add (e V): the
// old rows rescaled to the new running maximum, this tile's e weighted from m_tile to it (the P V
// GEMM applies them in its store, RowScale). The self score is read before `e` overwrites `src`.
// The state update runs kLanes rows at a time (rows past qb.rows, up to a multiple of kLanes, as
// an empty tile); `scratch` holds 2 * BM floats (the tile maxima without `tile_max`, the tile sums).
// Each row steps `prefetch` (the next tile's keys and values) once.
void softmax_tile(const AttentionKLParams& p, const QueryBlock& qb, const KeyBlock& kb, bool full, const float* src,
                  float* e, float* tile_max, float* row_max, float* row_sum, float* self, float* keep, float* add,
                  float* scratch, TilePrefetcher& prefetch) {
  float* m_tile = tile_max ? tile_max : scratch;
  float* tile_sum = scratch + qb.block_m;
  for (int64_t r = 0; r < qb.rows; ++r) {
    const float* in = src + r * kBlockN;
    const int64_t pos = qb.first_pos + r;
    if (!full) {
      const int64_t self_col = pos - kb.start;
      if (p.exclude_self && self_col >= 0 && self_col < kBlockN && kb.valid[self_col]) self[r] = in[self_col];
    }
    prefetch.step();
    vfloat total;
    m_tile[r] = exponentiate_row(p, kb, full, pos, in, e + r * kBlockN, total);
    tile_sum[r] = hsum(total);
  }
  const int64_t rows = round_up(qb.rows, kLanes);
  std::fill(m_tile + qb.rows, m_tile + rows, -kInf);
  std::fill(tile_sum + qb.rows, tile_sum + rows, 0.f);
  const vfloat minus_inf = vbroadcast(-kInf);
  for (int64_t r = 0; r < rows; r += kLanes) {
    const vfloat m = vload(m_tile + r), old_max = vload(row_max + r);
    const vfloat new_max = vmax(old_max, m);
    const vfloat shift = vselect(new_max == minus_inf, vfloat{}, new_max);
    const vfloat alpha = vexp_nonpositive(old_max - shift);
    // this tile's e relative to the running max
    const vfloat beta = vselect(m == minus_inf, vfloat{}, vexp_nonpositive(m - shift));
    vstore(row_sum + r, vload(row_sum + r) * alpha + vload(tile_sum + r) * beta);
    vstore(row_max + r, new_max);
    if (keep) {
      vstore(keep + r, alpha);
      vstore(add + r, beta);
    }
  }
}

// lse_P and lse_A of each (head, row) from the final softmax state.
void finish_stats(const SoftmaxState& st, int64_t n, float* lse_a, float* lse_p) {
  for (int64_t i = 0; i < n; ++i) {
    // an empty support has sum 0; a NaN score makes sum NaN (with max possibly still -inf)
    const float lp = st.sum[i] == 0.f ? -kInf : st.max[i] + std::log(st.sum[i]);
    lse_p[i] = lp;
    if (st.self[i] == -kInf)
      lse_a[i] = lp;
    else if (std::isnan(lp) || std::isnan(st.self[i]))
      lse_a[i] = lp + st.self[i];  // NaN
    else
      lse_a[i] = logaddexp(lp, st.self[i]);
  }
}

// The optional score cache (p.scratch): per thread, one slot per key tile for the first key
// tiles of a unit, (BM, kBlockN) per head of the policy's H heads and, when pass 1 computes them
// (no ref_stats), of the reference's Hr heads. With heads="mean" a slot holds pass 1's exponentials
// e = exp(s - m_tile) (exponentiate_row) and, after the heads' planes, each head's m_tile per row:
// pass 2 builds both models' head mixtures from them with no exponential of its own. With
// heads="each" it holds the raw scores (pass 2 needs s - lse_P, not e). Tiles past the cache are
// scored and exponentiated again in pass 2, the same bits either way. The scratch is split evenly
// between the threads; any size works (0: no cache), forward_scratch_bytes() caches every tile of
// the longest unit.
// Whether pass 1 sweeps the reference too (for its lse_A, lse_P): not with ref_stats given, nor
// without a reference.
inline bool reference_in_pass1(const AttentionKLParams& p) { return !p.has_ref_stats && !p.no_reference; }
inline int64_t cached_heads(const AttentionKLParams& p) {
  return p.heads + (reference_in_pass1(p) ? p.ref_heads : 0);
}
inline int64_t score_slot_floats(const AttentionKLParams& p, const Geometry& geo) {
  return cached_heads(p) * (head_plane(geo.block_m) + (p.heads_each ? 0 : geo.block_m));
}
inline int64_t key_tiles(const AttentionKLParams& p) { return (max_unit_keys(p) + kBlockN - 1) / kBlockN; }

// Below this, pass 2 does not trust a lane's linear head mixture sum_h w_h e_h (max w_h = 1): the e
// that vexp flushed to 0 (below e^-87 each) could be up to 2^-45 of it per head. Such lanes (far below
// every head's tile maximum) take the log-space route from the raw scores.
constexpr float kLinearFloor = 0x1p-80f;

class Forward : UnitSweep {
 public:
  // cache: this thread's `cache_tiles` slots of score_slot_floats() (0: no cache).
  Forward(const AttentionKLParams& p, const Geometry& geo, float* cache, int64_t cache_tiles)
      : UnitSweep(p, geo),
        slot_floats_(score_slot_floats(p, geo)),
        cache_tiles_(cache ? cache_tiles : 0),
        cache_(cache),
        q_(heads_ * bm_ * geo_.dp),
        q_ref_(ref_heads_ * bm_ * geo_.drp),
        k_rows_(kBlockN * std::max({geo_.dp, geo_.drp})),
        k_t_(p.kv_heads * geo_.dp * kBlockN),
        k_ref_t_(p.ref_kv_heads * geo_.drp * kBlockN),
        v_(p.kv_heads * kBlockN * std::max<int64_t>(geo_.dvp, 1)),
        s_tile_(heads_ * plane_),
        s_ref_tile_(ref_heads_ * plane_),
        tile_max_((heads_ + ref_heads_) * bm_),
        o_(heads_ * bm_ * std::max<int64_t>(geo_.dvp, 1)),
        v_self_(std::max<int64_t>(geo_.dvp, 1)),
        state_(3 * heads_ * bm_),
        ref_state_(3 * ref_heads_ * bm_),
        row_scale_(2 * bm_),
        softmax_rows_(2 * bm_),
        lse_(2 * heads_ * bm_),
        ref_lse_(2 * ref_heads_ * bm_),
        row_(6 * bm_),
        acc_(bm_ * (5 * heads_ + 3) * kLanes),
        sacc_(bm_ * (heads_ + 1) * nstat_ * kLanes),
        weights_(3 * round_up(std::max(heads_, ref_heads_), kLanes), 0.f),
        g_row_(kBlockN),
        lanes_((heads_ + ref_heads_) * kLanes),
        live_(bm_) {}

  void run(const QueryBlock& qb) {
    counts_.update(p_, qb);
    load_queries(qb);
    pass_statistics(qb);
    pass_divergence(qb);
  }

 private:
  // The score cache (score_slot_floats): pass 1 writes the scores of a cached tile into its
  // slot, pass 2 reads them back (and overwrites them with its exponentials).
  bool in_cache(int64_t key0) const { return key0 / kBlockN < cache_tiles_; }
  float* cache_slot(int64_t key0) const { return cache_ + (key0 / kBlockN) * slot_floats_; }

  // Calls tile(full) for every key tile of qb's unit that holds a real key, with kb_ set to the
  // tile and s_ pointing at the policy's scores (H, BM, kBlockN): its cache slot, else s_tile_.
  // In pass 1 (pass2 false) and for tiles past the cache, the tile's keys are packed into k_t_
  // (Hkv, Dp, kBlockN) and the scores computed. full: the tile needs no masking (tile_is_full).
  template <class Tile>
  void sweep_keys(const QueryBlock& qb, bool pass2, Tile&& tile) {
    const int64_t key_end = qb.key_end(p_);
    for (int64_t key0 = 0; key0 < key_end; key0 += kBlockN) {
      kb_.init(p_, qb, key0);
      if (!kb_.any_valid) continue;
      cached_ = in_cache(key0);
      s_ = cached_ ? cache_slot(key0) : s_tile_.get();
      if (!pass2) prefetch_next_tile(qb, key0 + kBlockN, key_end);
      if (!(pass2 && cached_)) {
        load_policy_keys(qb);
        scores(q_, k_t_, heads_, geo_.group, p_.head_dim, geo_.dp, qb.rows, s_);
      }
      tile(tile_is_full(p_, qb, kb_));
    }
  }

  // Points s_ref_ at the reference's scores of the current key tile (Hr, BM, kBlockN): its cache
  // slot when the cache holds them (pass 1 computes the reference's scores and the tile is
  // cached), else s_ref_tile_; computes them unless pass 2 finds them cached. Returns whether the
  // slot holds them.
  bool score_reference(const QueryBlock& qb, bool pass2) {
    const bool cached = cached_ && reference_in_pass1(p_);
    s_ref_ = cached ? cache_slot(kb_.start) + heads_ * plane_ : s_ref_tile_.get();
    if (pass2 && cached) return true;
    load_reference_keys(qb);
    scores(q_ref_, k_ref_t_, ref_heads_, geo_.ref_group, p_.ref_head_dim, geo_.drp, qb.rows, s_ref_);
    return cached;
  }

  // Each head's m_tile per row in a cache slot (heads="mean"): the policy's H rows of BM, then the
  // reference's Hr.
  float* slot_tile_max(int64_t key0) const { return cache_slot(key0) + cached_heads(p_) * plane_; }

  // Pass 1: queues the keys (both models) and values of the tile at next0 (none past key_end) in
  // prefetch_, paced over this tile's softmax rows (softmax_tile steps it once a head and row).
  void prefetch_next_tile(const QueryBlock& qb, int64_t next0, int64_t key_end) {
    prefetch_.clear();
    if (next0 >= key_end) return;
    const int64_t abs = qb.k_start + next0, rows = std::min(kBlockN, qb.k_len - next0);
    prefetch_.add(p_.k, p_.dtype, qb.b, p_.kv_heads, abs, rows, p_.head_dim);
    if (p_.has_v) prefetch_.add(p_.v, p_.dtype, qb.b, p_.kv_heads, abs, rows, p_.v_head_dim);
    const bool need_ref = reference_in_pass1(p_);
    if (need_ref) prefetch_.add(p_.k_ref, p_.ref_dtype, qb.b, p_.ref_kv_heads, abs, rows, p_.ref_head_dim);
    prefetch_.pace((heads_ + (need_ref ? ref_heads_ : 0)) * qb.rows);
  }

  // K^T of the current key tile for both models (k_t_, k_ref_t_), packed once per tile: pass 2
  // packs a cached tile's keys only when a lane falls back to the raw scores.
  struct PackedTile {
    int64_t b = -1, abs = -1, count = -1;
    bool holds(const QueryBlock& qb, const KeyBlock& kb) const { return b == qb.b && abs == kb.abs && count == kb.count; }
    void set(const QueryBlock& qb, const KeyBlock& kb) { b = qb.b, abs = kb.abs, count = kb.count; }
  };
  void load_policy_keys(const QueryBlock& qb) {
    if (k_t_tile_.holds(qb, kb_)) return;
    load_transposed(p_.k, p_.dtype, p_.kv_heads, p_.head_dim, geo_.dp, qb, kb_, k_rows_, 0, k_t_);
    k_t_tile_.set(qb, kb_);
  }
  void load_reference_keys(const QueryBlock& qb) {
    if (k_ref_t_tile_.holds(qb, kb_)) return;
    load_transposed(p_.k_ref, p_.ref_dtype, p_.ref_kv_heads, p_.ref_head_dim, geo_.drp, qb, kb_, k_rows_, 0,
                    k_ref_t_);
    k_ref_t_tile_.set(qb, kb_);
  }

  // Writes [lse_A, lse_P] of `heads` heads for qb's rows into a (B, heads, Sq, 2) statistics
  // buffer; `lse` holds lse_A of every head, then lse_P of every head, bm_ floats each.
  void store_stats(const float* lse, int64_t heads, const QueryBlock& qb, uintptr_t out) const {
    float* stats = reinterpret_cast<float*>(out);
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t r = 0; r < qb.rows; ++r) {
        float* dst = stats + ((qb.b * heads + h) * p_.q_len + qb.start + r) * 2;
        dst[0] = lse[h * bm_ + r];
        dst[1] = lse[(heads + h) * bm_ + r];
      }
  }
  float* lse_a(int64_t h) { return lse_ + h * bm_; }
  float* lse_p(int64_t h) { return lse_ + (heads_ + h) * bm_; }
  float* ref_lse_a(int64_t h) { return ref_lse_ + h * bm_; }
  float* ref_lse_p(int64_t h) { return ref_lse_ + (ref_heads_ + h) * bm_; }
  // normaliser()'s M' and log sum_h w'_h per row, of the policy (model 0) and the reference (1)
  float* norm_max(int model) { return row_ + (2 + 2 * model) * bm_; }
  float* norm_log(int model) { return row_ + (3 + 2 * model) * bm_; }

  void load_queries(const QueryBlock& qb) {
    for (int64_t h = 0; h < heads_; ++h)
      load_tile(p_.q, p_.dtype, qb.b, h, qb.start, bm_, qb.rows, p_.head_dim, p_.scale,
                q_ + h * bm_ * geo_.dp, geo_.dp);
    for (int64_t h = 0; h < ref_heads_; ++h)
      load_tile(p_.q_ref, p_.ref_dtype, qb.b, h, qb.start, bm_, qb.rows, p_.ref_head_dim, p_.ref_scale,
                q_ref_ + h * bm_ * geo_.drp, geo_.drp);
  }

  // scores (heads x BM x kBlockN) = Q K^T for the block's rows (scale folded into Q).
  void scores(const float* q, const float* k_t, int64_t heads, int64_t group, int64_t dim,
                     int64_t dim_padded, int64_t rows, float* s) {
    for (int64_t h = 0; h < heads; ++h)
      gemm<false, false, /*kSplitK=*/true>(s + h * plane_, kBlockN, {q + h * bm_ * dim_padded, dim_padded, 1},
                                           k_t + (h / group) * dim_padded * kBlockN, kBlockN, rows, kBlockN, dim);
  }

  // ---- pass 1: lse_A, lse_P (both models) and out -------------------------------------------
  void pass_statistics(const QueryBlock& qb) {
    const bool need_ref = reference_in_pass1(p_);
    const int64_t n = heads_ * bm_, n_ref = ref_heads_ * bm_;
    SoftmaxState st{state_, state_ + n, state_ + 2 * n};
    SoftmaxState ref{ref_state_, ref_state_ + n_ref, ref_state_ + 2 * n_ref};
    st.reset(n);
    ref.reset(n_ref);
    if (p_.has_v) std::fill(o_.get(), o_ + heads_ * bm_ * geo_.dvp, 0.f);

    sweep_keys(qb, /*pass2=*/false, [&](bool full) {
      if (p_.has_v)
        for (int64_t h = 0; h < p_.kv_heads; ++h)
          load_tile(p_.v, p_.dtype, qb.b, h, kb_.abs, kBlockN, kb_.count, p_.v_head_dim, 1.f,
                    v_ + h * kBlockN * geo_.dvp, geo_.dvp);
      // "mean" keeps a cached tile's exponentials (and m_tile) in its slot, else they go to the tile
      const bool keep = cached_ && !p_.heads_each;
      float* tile_max = keep ? slot_tile_max(kb_.start) : nullptr;
      float* keep_o = p_.has_v ? row_scale_.get() : nullptr;
      float* add_o = p_.has_v ? row_scale_ + bm_ : nullptr;
      for (int64_t h = 0; h < heads_; ++h) {
        float* src = s_ + h * plane_;
        float* e = keep ? src : s_tile_ + h * plane_;
        softmax_tile(p_, qb, kb_, full, src, e, keep ? tile_max + h * bm_ : nullptr, st.max + h * bm_,
                     st.sum + h * bm_, st.self + h * bm_, keep_o, add_o, softmax_rows_.get(), prefetch_);
        if (p_.has_v)
          gemm<false, true>(o_ + h * bm_ * geo_.dvp, geo_.dvp, {e, kBlockN, 1},
                            v_ + (h / geo_.group) * kBlockN * geo_.dvp, geo_.dvp, qb.rows, geo_.dvp, kb_.count,
                            {keep_o, add_o});
      }
      if (need_ref) {
        const bool keep_ref = score_reference(qb, /*pass2=*/false) && !p_.heads_each;
        for (int64_t h = 0; h < ref_heads_; ++h) {
          float* src = s_ref_ + h * plane_;
          softmax_tile(p_, qb, kb_, full, src, keep_ref ? src : s_ref_tile_ + h * plane_,
                       keep_ref ? tile_max + (heads_ + h) * bm_ : nullptr, ref.max + h * bm_, ref.sum + h * bm_,
                       ref.self + h * bm_, nullptr, nullptr, softmax_rows_.get(), prefetch_);
        }
      }
    });

    finish_stats(st, n, lse_, lse_ + n);
    store_stats(lse_, heads_, qb, p_.stats);
    if (p_.has_v) write_out(qb, st);

    if (need_ref) {
      finish_stats(ref, n_ref, ref_lse_, ref_lse_ + n_ref);
      store_stats(ref_lse_, ref_heads_, qb, p_.ref_stats_out);
    } else {
      const View& in = p_.ref_stats_in;
      const float* base = reinterpret_cast<const float*>(in.ptr);
      for (int64_t h = 0; h < ref_heads_; ++h)
        for (int64_t r = 0; r < qb.rows; ++r) {
          const float* src = base + qb.b * in.stride[0] + h * in.stride[1] + (qb.start + r) * in.stride[2];
          ref_lse_a(h)[r] = src[0];
          ref_lse_p(h)[r] = src[in.stride[3]];
        }
    }
  }

  // out = (P V + e_self v_self) / (l + e_self), P V and l relative to the support's running max m,
  // e_self = exp(s_self - m); formed relative to M = max(m, s_self). The weights sum to 1 to fp32's
  // rounding: the backward's delta = rowsum(dout * out) meets the a = exp(s - lse_A) it recomputes
  // without the rounding of lse_P - lse_A (|lse| ~ 100 rounds by 4e-6, and a peaked row's
  // dS = a (dP - delta) would carry that error times delta).
  void write_out(const QueryBlock& qb, const SoftmaxState& st) {
    const int64_t dv = p_.v_head_dim, bytes = dtype_bytes(p_.dtype);
    for (int64_t h = 0; h < heads_; ++h)
      for (int64_t r = 0; r < qb.rows; ++r) {
        const int64_t i = h * bm_ + r;
        const float m = st.max[i], self = st.self[i];
        const float top = std::max(m, self);  // -inf: no key attended (out = 0); NaN propagates
        const float to_top = st.sum[i] == 0.f ? 0.f : std::exp(m - top);  // P V and l are relative to m
        const float e_self = self == -kInf ? 0.f : std::exp(self - top);
        const float total = to_top * st.sum[i] + e_self;
        const float w_support = to_top == 0.f ? 0.f : to_top / total;
        float* o = o_ + i * geo_.dvp;
        for (int64_t d = 0; d < dv; ++d) o[d] *= w_support;
        if (self != -kInf) {
          const float w_self = e_self / total;
          load_row(row_address(p_.v, p_.dtype, qb.b, h / geo_.group, qb.k_start + qb.first_pos + r), p_.dtype,
                   dv, 1.f, v_self_);
          for (int64_t d = 0; d < dv; ++d) o[d] += w_self * v_self_[d];
        }
        char* dst = reinterpret_cast<char*>(p_.out) + bytes * ((qb.b * heads_ + h) * p_.q_len + qb.start + r) * dv;
        store_row(dst, p_.dtype, o, dv);
      }
  }

  // ---- pass 2: div, gbar, cbar -------------------------------------------------------------
  void pass_divergence(const QueryBlock& qb) {
    // live rows: row_mask True and a non-empty support
    char* live = live_.data();
    bool any_live = false;
    const uint8_t* row_mask = reinterpret_cast<const uint8_t*>(p_.row_mask.ptr);
    for (int64_t r = 0; r < qb.rows; ++r) {
      live[r] = counts_.support_nonempty(p_, qb.first_pos + r) &&
                (!p_.has_row_mask ||
                 row_mask[qb.b * p_.row_mask.stride[0] + (qb.start + r) * p_.row_mask.stride[1]] != 0);
      any_live = any_live || live[r];
    }
    // per row ("mean"): log Z and log Z_ref, and both models' normaliser()
    float* log_z = row_;
    float* log_z_ref = row_ + bm_;
    if (!p_.heads_each)
      for (int64_t r = 0; r < qb.rows; ++r) {
        if (!live[r]) {
          log_z[r] = log_z_ref[r] = 0.f;
          continue;
        }
        log_z[r] = log_support_mass(lse_a(0) + r, lse_p(0) + r, heads_, bm_, geo_.log_heads);
        log_z_ref[r] = log_support_mass(ref_lse_a(0) + r, ref_lse_p(0) + r, ref_heads_, bm_, geo_.log_ref_heads);
        norm_max(0)[r] = normaliser(lse_p(0), lse_a(0), heads_, r, norm_log(0) + r);
        if (!p_.no_reference) norm_max(1)[r] = normaliser(ref_lse_p(0), ref_lse_a(0), ref_heads_, r, norm_log(1) + r);
      }
    const int64_t acc_rows = p_.heads_each ? heads_ : 1, row_sums = acc_rows * bm_ * kLanes;
    sums_.div = acc_;                      // (acc_rows, BM, kLanes) each
    sums_.gbar = sums_.div + row_sums;
    sums_.mass = sums_.gbar + row_sums;
    sums_.u = sums_.mass + row_sums;        // (BM, heads, kLanes) each, "mean"
    sums_.z = sums_.u + bm_ * heads_ * kLanes;
    std::fill(acc_.get(), sums_.z + bm_ * heads_ * kLanes, 0.f);
    if (nstat_) std::fill(sacc_.get(), sacc_ + bm_ * (heads_ + 1) * nstat_ * kLanes, 0.f);

    if (any_live) {
      sweep_keys(qb, /*pass2=*/true, [&](bool full) {
        if (!p_.heads_each) {
          tile_exponentials(qb, full);
          if (p_.no_reference)  // statistics only: no reference, no divergence
            divergence_tile_mean<true, false>(qb, full, log_z, log_z_ref);
          else if (nstat_)
            divergence_tile_mean<true>(qb, full, log_z, log_z_ref);
          else
            divergence_tile_mean<false>(qb, full, log_z, log_z_ref);
          return;
        }
        if (p_.no_reference) {
          divergence_tile_each<true, false>(qb, full);
          return;
        }
        score_reference(qb, /*pass2=*/true);
        if (nstat_)
          divergence_tile_each<true>(qb, full);
        else
          divergence_tile_each<false>(qb, full);
      });
    }
    write_divergence(qb, log_z);
    if (nstat_) write_policy_stats(qb);
  }

  // Statistics accumulators (kLanes floats each): "mean": per row [entropy, mass_0 ..] at
  // row_stats(r), then per row and head [u^E_h / Z, u^s_h / Z ..] at head_stats(r, h);
  // "each": per head and row [entropy, mass_0 ..] at row_stats(h * BM + r).
  float* row_stats(int64_t i) { return sacc_ + i * nstat_ * kLanes; }
  float* head_stats(int64_t r, int64_t h) { return sacc_ + (bm_ + r * heads_ + h) * nstat_ * kLanes; }

  // Adds pi's entropy term and segment masses of lanes [c, c + kLanes) into acc (entropy, mass_0 ..).
  void accumulate_policy_stats(float* acc, vfloat log_pi, vfloat pi, bool full, vmask support, int64_t c) {
    vfloat ent = -(pi * log_pi);
    if (!full) {
      ent = vselect(support, ent, vfloat{});
      pi = vselect(support, pi, vfloat{});
    }
    vstore(acc, vload(acc) + ent);
    if (nstat_ > 1) {
      vmask seg;
      memcpy(&seg, kb_.seg + c, sizeof(seg));
      for (int64_t s = 0; s + 1 < nstat_; ++s) {
        float* m = acc + (1 + s) * kLanes;
        vstore(m, vload(m) + vselect(seg == (vmask{} + static_cast<int32_t>(s)), pi, vfloat{}));
      }
    }
  }

  // Adds the support's f, pi g and pi of one lane group to a row's div, gbar and mass sums.
  static void add_divergence(const VDivergenceTerm& t, bool full, vmask support, vfloat& div_sum, vfloat& gbar_sum,
                             vfloat& mass_sum) {
    div_sum += full ? t.f : vselect(support, t.f, vfloat{});
    gbar_sum += full ? t.pi_g : vselect(support, t.pi_g, vfloat{});
    mass_sum += full ? t.pi : vselect(support, t.pi, vfloat{});
  }

  // heads="mean" statistics of lanes [c, c + kLanes) of row r: pi's (accumulate_policy_stats), then
  // per head u^E_h / Z += (a_hj / Z) (-log pi_j) and u^s_h / Z += (a_hj / Z) [seg(j) = s], with
  // a_hj / Z = share(h).
  template <class Share>
  void accumulate_mean_stats(int64_t r, int64_t c, vfloat log_pi, vfloat pi, bool full, vmask support, Share&& share) {
    accumulate_policy_stats(row_stats(r), log_pi, pi, full, support, c);
    vfloat neg_log_pi = -log_pi;
    if (!full) neg_log_pi = vselect(support, neg_log_pi, vfloat{});
    vmask seg{};
    if (nstat_ > 1) memcpy(&seg, kb_.seg + c, sizeof(seg));
    for (int64_t h = 0; h < heads_; ++h) {
      vfloat a = share(h);
      if (!full) a = vselect(support, a, vfloat{});
      float* u = head_stats(r, h);
      vstore(u, vload(u) + a * neg_log_pi);
      for (int64_t k = 0; k + 1 < nstat_; ++k) {
        float* m = u + (1 + k) * kLanes;
        vstore(m, vload(m) + vselect(seg == (vmask{} + static_cast<int32_t>(k)), a, vfloat{}));
      }
    }
  }

  // Pass 2, heads="mean": points policy_max_ / ref_max_ at the tile's m_tile rows and leaves both
  // models' exponentials e = exp(s - m_tile) in s_ / s_ref_: read from the cache slot, or scored
  // again (sweep_keys, score_reference) and exponentiated here (live rows only).
  void tile_exponentials(const QueryBlock& qb, bool full) {
    if (cached_) {
      policy_max_ = slot_tile_max(kb_.start);
    } else {
      policy_max_ = tile_max_;
      exponentiate_tile(qb, full, s_, heads_, policy_max_);
    }
    if (p_.no_reference) return;
    if (score_reference(qb, /*pass2=*/true)) {
      ref_max_ = slot_tile_max(kb_.start) + heads_ * bm_;
    } else {
      ref_max_ = tile_max_ + heads_ * bm_;
      exponentiate_tile(qb, full, s_ref_, ref_heads_, ref_max_);
    }
  }
  void exponentiate_tile(const QueryBlock& qb, bool full, float* s, int64_t heads, float* tile_max) {
    vfloat sum;
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t r = 0; r < qb.rows; ++r) {
        if (!live_[r]) continue;
        float* row = s + h * plane_ + r * kBlockN;
        tile_max[h * bm_ + r] = exponentiate_row(p_, kb_, full, qb.first_pos + r, row, row, sum);
      }
  }

  // A model's head mixture on row r of the tile: with d_h = m_tile_h - lse_A_h and M = max_h d_h,
  // abar_j = (1/H) sum_h exp(d_h) e_hj = exp(M - log H) sum_h w_h e_hj, w_h = exp(d_h - M) in
  // w[0:heads] (at most 1, one of them 1). Returns M: -inf when no key of the tile is in the row's
  // support (w then 0), NaN when a statistic is. With `share`, also a_hj / Z = share[h] e_hj,
  // share[h] = exp(d_h - log Z). w and share hold round_up(heads, kLanes) floats.
  float mixture_weights(const float* tile_max, const float* lse_a, int64_t heads, int64_t r, float* w,
                        float* share = nullptr, float log_z = 0.f) const {
    // the maximum branch-free (which head holds it is data), over lanes padded with -inf
    const int64_t padded = round_up(heads, kLanes);
    for (int64_t h = 0; h < heads; ++h) w[h] = tile_max[h * bm_ + r] - lse_a[h * bm_ + r];
    std::fill(w + heads, w + padded, -kInf);
    vfloat d_max = vbroadcast(-kInf);
    for (int64_t h = 0; h < padded; h += kLanes) d_max = vmax_nan(d_max, vload(w + h));
    const float m = hmax(d_max);
    if (m == -kInf || m != m) {
      std::fill(w, w + heads, m == -kInf ? 0.f : m);
      return m;
    }
    for (int64_t h = 0; h < heads; h += kLanes) {
      const vfloat d = vload(w + h);
      if (share) vstore(share + h, vexp(d - log_z));
      vstore(w + h, vexp(d - m));
    }
    return m;
  }

  // sum_h w_h e_h of one lane group, accumulated in head order.
  static vfloat mix_lanes(const float* e, int64_t plane, const float* w, int64_t heads) {
    vfloat sum{};
    for (int64_t h = 0; h < heads; ++h) sum = vfma(vload(e + h * plane), vbroadcast(w[h]), sum);
    return sum;
  }

  // A row's normaliser in the linear route's own arithmetic: log(H Z) = M' + log(sum_h w'_h), with
  // d'_h = lse_P_h - lse_A_h, M' = max_h d'_h and w'_h = exp(d'_h - M') formed and summed as
  // mixture_weights and mix_lanes form a lane's. A key that is a row's whole support has
  // m_tile = lse_P in every head, hence the same sum bit for bit, and log pi = 0 exactly.
  // Returns M' with log(sum_h w'_h) in *log_sum.
  float normaliser(const float* lse_p, const float* lse_a, int64_t heads, int64_t r, float* log_sum) {
    float ones[kLanes];
    std::fill(ones, ones + kLanes, 1.f);
    float* w = weights_.data();
    const float m = mixture_weights(lse_p, lse_a, heads, r, w);
    *log_sum = vlog(mix_lanes(ones, 0, w, heads))[0];  // e = 1 in every head: a one-key support's lane
    return m;
  }

  // Raw scores of row r at keys [c, c + kLanes) of the current tile, every head of a model, into
  // out (heads, kLanes), for the lanes that leave the linear route: the GEMM micro-kernel on one
  // row and one vector, so that they have the bits pass 1's scores had (lse_A and lse_P came from
  // those; a score off by an ulp would shift the row's pi against its normalisation).
  void lane_scores(const float* q, const float* k_t, int64_t heads, int64_t group, int64_t dim, int64_t dim_padded,
                   int64_t r, int64_t c, float* out) const {
    for (int64_t h = 0; h < heads; ++h)
      micro_gemm<1, 1, false, false, /*kSplitK=*/true>(out + h * kLanes, kLanes,
                                                       {q + (h * bm_ + r) * dim_padded, dim_padded, 1},
                                                       k_t + (h / group) * dim_padded * kBlockN + c, kBlockN, dim);
  }

  // heads="mean", linear route: per row, pi_j = exp(offset) * sum_h w_h e_hj from the tile's
  // exponentials (mixture_weights, offset from normaliser()) and rho_j likewise, log pi and log rho
  // by one log each (jsd's own two logarithms then come from their difference, vjsd_logs). Accumulates f, pi g and u_h / Z = sum_P (a_hj / Z) g_j (per head, as
  // share[h] * sum_j e_hj g_j) per row, and (kStats) the statistics; without kDiv only those: no
  // reference, div and gbar stay 0. Lanes whose mixtures fall under kLinearFloor go the log-space
  // route instead (divergence_lanes_from_scores).
  template <bool kStats, bool kDiv = true>
  void divergence_tile_mean(const QueryBlock& qb, bool full, const float* log_z, const float* log_z_ref) {
    const int64_t padded = static_cast<int64_t>(weights_.size()) / 3;
    float* w = weights_.data();
    float* share = w + padded;
    float* w_ref = share + padded;
    const bool ratio = p_.divergence == kReverseKL;
    for (int64_t r = 0; r < qb.rows; ++r) {
      if (!live_[r]) continue;
      // log pi_j = (log(sum_h w_h e_hj) - log sum_h w'_h) + (M - M'), normaliser()'s M' and w'
      const float m = mixture_weights(policy_max_, lse_a(0), heads_, r, w, share, log_z[r]);
      if (m == -kInf) continue;  // no key of this tile in the row's support
      const float log_norm = norm_log(0)[r], shift = m - norm_max(0)[r];
      const float scale = std::exp(shift - log_norm);
      float log_norm_ref = 0.f, shift_ref = 0.f, scale_ref = 0.f;
      if constexpr (kDiv) {
        shift_ref = mixture_weights(ref_max_, ref_lse_a(0), ref_heads_, r, w_ref) - norm_max(1)[r];
        log_norm_ref = norm_log(1)[r];
        scale_ref = std::exp(shift_ref - log_norm_ref);
      }
      vfloat div_sum = vload(sums_.div + r * kLanes), gbar_sum = vload(sums_.gbar + r * kLanes);
      vfloat mass_sum = vload(sums_.mass + r * kLanes);
      float* u_row = sums_.u + r * heads_ * kLanes;
      float* z_row = sums_.z + r * heads_ * kLanes;
      const float* e = s_ + r * kBlockN;
      const float* e_ref = s_ref_ + r * kBlockN;
      float* g_row = g_row_;
      for (int64_t c = 0; c < kBlockN; c += kLanes) {
        vmask support = vmask{} - 1;
        if (!full) support = lane_masks(p_, kb_, c, qb.first_pos + r, true).support;
        const vfloat sum = mix_lanes(e + c, plane_, w, heads_);
        vfloat sum_ref{};
        vmask low = sum < kLinearFloor;
        if constexpr (kDiv) {
          sum_ref = mix_lanes(e_ref + c, plane_, w_ref, ref_heads_);
          low |= sum_ref < kLinearFloor;
        }
        if (any(low & support)) {
          if constexpr (kDiv) vstore(g_row + c, vfloat{});
          divergence_lanes_from_scores<kStats, kDiv>(qb, r, c, full, support, log_z[r], log_z_ref[r], div_sum,
                                                     gbar_sum, mass_sum, u_row);
          continue;
        }
        const vfloat log_pi = (vlog(sum) - log_norm) + shift;
        const vfloat pi = sum * scale;
        if constexpr (kDiv) {
          const vfloat rho = sum_ref * scale_ref;
          const vfloat log_rho = (vlog(sum_ref) - log_norm_ref) + shift_ref;
          const VDivergenceTerm t = vdivergence_term(p_.divergence, log_pi, pi, log_rho, rho);
          // u_h's summand over e_hj: g_j with factor share[h], or for reverse_kl (a_hj / Z) g_j / e_hj =
          // -H w_h rho_j / sum_j, finite where pi_j underflows
          vfloat g = ratio ? -rho / sum : t.g;
          if (!full) g = vselect(support, g, vfloat{});
          add_divergence(t, full, support, div_sum, gbar_sum, mass_sum);
          vstore(g_row + c, g);
        }
        if constexpr (kStats)
          accumulate_mean_stats(r, c, log_pi, pi, full, support,
                                [&](int64_t h) { return vload(e + h * plane_ + c) * share[h]; });
      }
      for (int64_t h = 0; h < heads_; ++h) {  // e_h is 0 outside P, and so is g
        vfloat even{}, odd{}, mass_even{}, mass_odd{};
        for (int64_t c = 0; c < kBlockN; c += 2 * kLanes) {
          const vfloat e0 = vload(e + h * plane_ + c), e1 = vload(e + h * plane_ + c + kLanes);
          mass_even += e0;
          mass_odd += e1;
          if constexpr (kDiv) {
            even += e0 * vload(g_row + c);
            odd += e1 * vload(g_row + c + kLanes);
          }
        }
        vstore(z_row + h * kLanes, vload(z_row + h * kLanes) + (mass_even + mass_odd) * share[h]);
        if constexpr (kDiv) {
          const float factor = ratio ? static_cast<float>(heads_) * w[h] : share[h];
          vstore(u_row + h * kLanes, vload(u_row + h * kLanes) + (even + odd) * factor);
        }
      }
      vstore(sums_.div + r * kLanes, div_sum);
      vstore(sums_.gbar + r * kLanes, gbar_sum);
      vstore(sums_.mass + r * kLanes, mass_sum);
    }
  }

  // heads="mean", log-space route for lanes [c, c + kLanes) of row r, from the raw scores:
  // log pi_j = logsumexp_h(s_hj - lse_A_h) - log H - log Z (likewise log rho), so that a lane far
  // below every head's tile maximum keeps a finite log pi. Adds to the same sums as the linear
  // route, and (a_hj / Z) g_j into u_row directly.
  template <bool kStats, bool kDiv>
  void divergence_lanes_from_scores(const QueryBlock& qb, int64_t r, int64_t c, bool full, vmask support, float log_z,
                                    float log_z_ref, vfloat& div_sum, vfloat& gbar_sum, vfloat& mass_sum,
                                    float* u_row) {
    float* e = lanes_;
    load_policy_keys(qb);
    lane_scores(q_, k_t_, heads_, geo_.group, p_.head_dim, geo_.dp, r, c, e);
    // e_h = exp(x_h - max_h x) in place of the scores, x_h = s_h - lse_A_h
    const LogMixture mix = log_mixture(e, kLanes, lse_a(0) + r, bm_, heads_, e);
    const vfloat x_max = mix.max, log_pi = x_max + mix.log_sum - (geo_.log_heads + log_z);
    // a_hj / Z = e_h * exp(x_max - log Z): the factor is at most H * pi_j, never overflows
    const vfloat a_over_z = vexp(x_max - log_z);
    vfloat pi;
    if constexpr (kDiv) {
      float* s_ref = lanes_ + heads_ * kLanes;
      load_reference_keys(qb);
      lane_scores(q_ref_, k_ref_t_, ref_heads_, geo_.ref_group, p_.ref_head_dim, geo_.drp, r, c, s_ref);
      const LogMixture ref = log_mixture(s_ref, kLanes, ref_lse_a(0) + r, bm_, ref_heads_);
      const vfloat log_rho = ref.max + ref.log_sum - (geo_.log_ref_heads + log_z_ref);

      const VDivergenceTerm t = vdivergence_term(p_.divergence, log_pi, log_rho);
      vfloat g_scaled = vweighted_grad(p_.divergence, x_max - log_z, a_over_z, log_pi, log_rho);  // (a_hj / Z) g_j / e_h
      if (!full) g_scaled = vselect(support, g_scaled, vfloat{});
      add_divergence(t, full, support, div_sum, gbar_sum, mass_sum);
      for (int64_t h = 0; h < heads_; ++h) {
        vfloat term = vload(e + h * kLanes) * g_scaled;
        if (!full) term = vselect(support, term, vfloat{});
        vstore(u_row + h * kLanes, vload(u_row + h * kLanes) + term);
      }
      pi = t.pi;
    } else {
      pi = vexp(log_pi);
    }
    if constexpr (kStats)
      accumulate_mean_stats(r, c, log_pi, pi, full, support, [&](int64_t h) { return vload(e + h * kLanes) * a_over_z; });
  }

  // heads="each": log pi = s - lse_P, log rho = s_ref - lse_P_ref, per head.
  template <bool kStats, bool kDiv = true>
  void divergence_tile_each(const QueryBlock& qb, bool full) {
    for (int64_t h = 0; h < heads_; ++h)
      for (int64_t r = 0; r < qb.rows; ++r) {
        if (!live_[r]) continue;
        const int64_t i = h * bm_ + r, at = h * plane_ + r * kBlockN;
        vfloat div_sum = vload(sums_.div + i * kLanes), gbar_sum = vload(sums_.gbar + i * kLanes);
        vfloat mass_sum = vload(sums_.mass + i * kLanes);
        const float* s = s_ + at;
        const float* sr = s_ref_ + at;
        for (int64_t c = 0; c < kBlockN; c += kLanes) {
          const vfloat log_pi = vload(s + c) - lse_p(h)[r];
          vmask support{};
          if (!full) support = lane_masks(p_, kb_, c, qb.first_pos + r, true).support;
          if constexpr (!kDiv) {
            accumulate_policy_stats(row_stats(i), log_pi, vexp(log_pi), full, support, c);
            continue;
          }
          const VDivergenceTerm t = vdivergence_term(p_.divergence, log_pi, vload(sr + c) - ref_lse_p(h)[r]);
          if constexpr (kStats) accumulate_policy_stats(row_stats(i), log_pi, t.pi, full, support, c);
          add_divergence(t, full, support, div_sum, gbar_sum, mass_sum);
        }
        vstore(sums_.div + i * kLanes, div_sum);
        vstore(sums_.gbar + i * kLanes, gbar_sum);
        vstore(sums_.mass + i * kLanes, mass_sum);
      }
  }

  // gbar = sum_P pi g / sum_P pi, both sums over the pi this forward formed (and the backward forms
  // again): their sum is 1 only to the rounding of lse_P (and log Z), a relative error that
  // sum_P pi_j (g_j - gbar) would otherwise carry as that error times gbar, large where the
  // divergence is (kl of two peaked distributions: gbar = kl + 1). Likewise c_h = u_h - gbar z_h with
  // the accumulated z_h = sum_P a_hj / Z, not Z_h / Z from the statistics.
  static float weighted_mean(float sum, float mass) { return mass > 0.f ? sum / mass : sum; }

  void write_divergence(const QueryBlock& qb, const float* log_z) {
    float* div = reinterpret_cast<float*>(p_.div);
    float* gbar = reinterpret_cast<float*>(p_.gbar);
    float* cbar = reinterpret_cast<float*>(p_.cbar);
    for (int64_t r = 0; r < qb.rows; ++r) {
      const int64_t i = qb.start + r;
      if (p_.heads_each) {
        for (int64_t h = 0; h < heads_; ++h) {
          const int64_t out = (qb.b * heads_ + h) * p_.q_len + i, acc = (h * bm_ + r) * kLanes;
          div[out] = live_[r] ? hsum(vload(sums_.div + acc)) : 0.f;
          gbar[out] = live_[r] ? weighted_mean(hsum(vload(sums_.gbar + acc)), hsum(vload(sums_.mass + acc))) : 0.f;
          cbar[out] = 0.f;
        }
        continue;
      }
      const float g =
          live_[r] ? weighted_mean(hsum(vload(sums_.gbar + r * kLanes)), hsum(vload(sums_.mass + r * kLanes))) : 0.f;
      div[qb.b * p_.q_len + i] = live_[r] ? hsum(vload(sums_.div + r * kLanes)) : 0.f;
      gbar[qb.b * p_.q_len + i] = g;
      // c_h = sum_P (a_hj / Z) (g_j - gbar) = u_h - gbar z_h, both accumulated over P
      for (int64_t h = 0; h < heads_; ++h) {
        const int64_t acc = (r * heads_ + h) * kLanes;
        cbar[(qb.b * heads_ + h) * p_.q_len + i] =
            live_[r] ? hsum(vload(sums_.u + acc)) - g * hsum(vload(sums_.z + acc)) : 0.f;
      }
    }
  }

  // Writes entropy, mass and ("mean") cstats of qb's rows; 0 on dead rows.
  void write_policy_stats(const QueryBlock& qb) {
    float* entropy = reinterpret_cast<float*>(p_.entropy);
    float* mass = reinterpret_cast<float*>(p_.mass);
    float* cstats = reinterpret_cast<float*>(p_.cstats);
    const int64_t n_seg = nstat_ - 1;
    float value[9];
    for (int64_t r = 0; r < qb.rows; ++r) {
      const int64_t i = qb.start + r;
      const bool live = live_[r];
      const int64_t n_each = p_.heads_each ? heads_ : 1;
      for (int64_t h = 0; h < n_each; ++h) {
        const float* acc = row_stats(p_.heads_each ? h * bm_ + r : r);
        for (int64_t t = 0; t < nstat_; ++t) value[t] = live ? hsum(vload(acc + t * kLanes)) : 0.f;
        const int64_t out = (qb.b * n_each + h) * p_.q_len + i;
        entropy[out] = value[0];
        for (int64_t s = 0; s < n_seg; ++s) mass[out * n_seg + s] = value[1 + s];
      }
      if (p_.heads_each) continue;
      // c_h = u_h / Z - stat * z_h, z_h = sum_P a_hj / Z as accumulated (write_divergence)
      for (int64_t h = 0; h < heads_; ++h) {
        const float z_ratio = live ? hsum(vload(sums_.z + (r * heads_ + h) * kLanes)) : 0.f;
        const float* u = head_stats(r, h);
        float* dst = cstats + ((qb.b * heads_ + h) * p_.q_len + i) * nstat_;
        for (int64_t t = 0; t < nstat_; ++t) dst[t] = live ? hsum(vload(u + t * kLanes)) - value[t] * z_ratio : 0.f;
      }
    }
  }

  const int64_t slot_floats_;    // floats per cache slot: (H or H + Hr) * head_plane(BM)
  const int64_t cache_tiles_;    // key tiles cached (the first ones of each unit); 0: no cache
  float* const cache_;           // (cache_tiles_, slot_floats_) or nullptr
  Floats q_, q_ref_;             // (H, BM, Dp), (Hr, BM, Drp): scaled queries
  Floats k_rows_;                // (kBlockN, max(Dp, Drp)): a key tile before transposition
  Floats k_t_, k_ref_t_;         // (Hkv, Dp, kBlockN), (Hrkv, Drp, kBlockN)
  Floats v_;                     // (Hkv, kBlockN, Dvp)
  Floats s_tile_, s_ref_tile_;   // (H | Hr, BM, kBlockN), heads head_plane(BM) apart: scores or exponentials
  bool cached_ = false;          // whether the current key tile has a cache slot
  float* s_ = nullptr;           // the current tile's policy scores: a cache slot or s_tile_
  float* s_ref_ = nullptr;       // the current tile's reference scores: a cache slot or s_ref_tile_
  Floats tile_max_;              // (H + Hr, BM): pass 2's m_tile of a tile past the cache
  float* policy_max_ = nullptr;  // (H, BM): the current tile's m_tile, policy (a slot's or tile_max_)
  float* ref_max_ = nullptr;     // (Hr, BM): the same, reference
  PackedTile k_t_tile_, k_ref_t_tile_;  // the key tiles k_t_ and k_ref_t_ hold
  TilePrefetcher prefetch_;      // pass 1: the next key tile's rows (prefetch_next_tile)
  Floats o_, v_self_;            // (H, BM, Dvp) output accumulator; (Dvp,)
  Floats state_, ref_state_;     // SoftmaxState of both models
  Floats row_scale_;             // (2, BM): softmax_tile's keep and add of one head, for P V
  Floats softmax_rows_;          // (2, BM): softmax_tile's scratch
  Floats lse_, ref_lse_;         // (2, H, BM): lse_A then lse_P; likewise (2, Hr, BM)
  Floats row_;                   // (6, BM): log Z, log Z_ref, then norm_max / norm_log of both models
  Floats acc_;                   // pass-2 accumulators: div, gbar, mass (and u_h, z_h for "mean"): sums_
  // Pass 2's sums in acc_, kLanes lanes each (pass_divergence): per row ("mean") or per head and row
  // ("each") div = sum_P f, gbar = sum_P pi g and mass = sum_P pi; "mean" also per row and head
  // u = sum_P (a_hj / Z) g_j and z = sum_P a_hj / Z.
  struct Sums {
    float *div, *gbar, *mass, *u, *z;
  } sums_{};
  Floats sacc_;                  // pass-2 statistics accumulators (row_stats, head_stats)
  std::vector<float> weights_;   // 3 x round_up(max(H, Hr), kLanes): mixture_weights' w, share, w_ref
  Floats g_row_;                 // (kBlockN,): g on one row of a tile (0 outside P)
  Floats lanes_;                 // (H + Hr, kLanes): raw scores of one lane group
  std::vector<char> live_;       // (BM,): row_mask True and a non-empty support
  KeyCounts counts_;
};

}  // namespace

int vector_lanes() { return kLanes; }

int64_t forward_scratch_bytes(const AttentionKLParams& p) {
  check_host_call(p, /*backward=*/false);
  const Geometry geo(p);
  return static_cast<int64_t>(sizeof(float)) * worker_count(p, geo) * key_tiles(p) * score_slot_floats(p, geo);
}

void forward(const AttentionKLParams& p) {
  check_host_call(p, /*backward=*/false);
  const Geometry geo(p);
  const int n_threads = worker_count(p, geo);
  // the scratch split evenly between the threads, in whole slots, at most one per key tile
  const int64_t slot_floats = score_slot_floats(p, geo);
  const int64_t cache_tiles =
      std::min(key_tiles(p), p.scratch_bytes / static_cast<int64_t>(sizeof(float)) / n_threads / slot_floats);
  float* cache = cache_tiles > 0 ? reinterpret_cast<float*>(p.scratch) : nullptr;
  if (cache) advise_huge_pages(p.scratch, p.scratch_bytes);
  const Schedule schedule(p, geo);
  WorkQueue queue(schedule.size());
  run_threads(n_threads, [&](int t) {
    Forward kernel(p, geo, cache ? cache + t * cache_tiles * slot_floats : nullptr, cache_tiles);
    int64_t item;
    while (queue.pop(item)) kernel.run(schedule.block(item));
  });
}

}  // namespace ral::cpu
