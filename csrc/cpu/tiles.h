// Shared machinery of the CPU forward and backward: work units, block geometry, strided tile
// loads with dtype conversion, key-block masks, per-row statistics and the thread pool.
//
// Work unit = one batch element (dense call) or one entry of the sequence table (params.h,
// SeqRange: a packed sequence or a context-parallel chunk). Work item = (unit, query block of
// Geometry::block_m rows of that unit), all heads of the row together (heads="mean" couples
// them). Key blocks of kBlockN keys of the unit are swept inside the item. Head dims are padded
// to a multiple of kLanes with zeros in the packed fp32 tiles, so every GEMM is vector-aligned.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <limits>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/math.h"
#include "common/params.h"
#include "cpu/gemm.h"
#include "cpu/simd.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace ral::cpu {

constexpr int64_t kBlockN = 64;  // keys per tile (a multiple of kLanes)
constexpr float kInf = std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// Floats between two heads' (rows x kBlockN) score tiles: one cache line more than the tile, so that
// the same row of consecutive heads (read together by the per-element loops of "mean") falls in
// different L1 sets and does not alias at 4 KiB (block_m x kBlockN floats is a multiple of 4 KiB).
inline int64_t head_plane(int64_t block_m) { return block_m * kBlockN + 16; }

// ---- work units ------------------------------------------------------------------------------
// Rows [q_start, q_start + q_len) and keys [k_start, k_start + k_len) of batch element `batch`;
// row i sits at key position q_pos + i, counted from k_start (masks work in these unit-local key
// positions, loads and stores at the absolute rows).
struct Unit {
  int64_t batch, q_start, q_len, k_start, k_len, q_pos;
};

inline int64_t unit_count(const AttentionKLParams& p) { return p.seqs ? p.num_seqs : p.batch; }

// Unit s: the table's entry s, or batch element s of a dense call.
inline Unit unit_at(const AttentionKLParams& p, int64_t s) {
  if (!p.seqs) return {s, 0, p.q_len, 0, p.k_len, p.k_len - p.q_len};
  const SeqRange& r = reinterpret_cast<const SeqRange*>(p.seqs)[s];
  return {r.batch, r.q_start, r.q_len, r.k_start, r.k_len, r.q_pos};
}

// Query blocks of `block_m` rows in unit u.
inline int64_t unit_blocks(const Unit& u, int64_t block_m) {
  return (std::max<int64_t>(u.q_len, 0) + block_m - 1) / block_m;
}

// The most keys one unit reads: Sk for a dense call, max_k_len with a table.
inline int64_t max_unit_keys(const AttentionKLParams& p) { return p.seqs ? p.max_k_len : p.k_len; }

// ---- geometry -------------------------------------------------------------------------------
// Work items for query blocks of `rows` rows: each unit's q_len split into blocks.
inline int64_t count_items(const AttentionKLParams& p, int64_t rows) {
  if (!p.seqs) return p.batch * ((p.q_len + rows - 1) / rows);
  int64_t items = 0;
  for (int64_t s = 0; s < p.num_seqs; ++s) items += unit_blocks(unit_at(p, s), rows);
  return items;
}

// Query rows per work item: the largest of 128, 64, 32 that still gives every thread a few work
// items (and, with a table, that the longest unit needs: no half-empty tiles for short units).
// Larger blocks stream each key tile once for more rows (and K^T is packed once per tile).
inline int64_t choose_block_m(const AttentionKLParams& p) {
  for (int64_t rows : {128, 64}) {
    if (p.seqs && 2 * p.max_q_len <= rows) continue;
    if (count_items(p, rows) >= 4 * static_cast<int64_t>(p.num_threads)) return rows;
  }
  return 32;
}

struct Geometry {
  int64_t block_m;           // query rows per work item
  int64_t group, ref_group;  // query heads per kv head: H / Hkv, Hr / Hrkv
  int64_t dp, dvp, drp;      // D, Dv, Dr padded to a multiple of kLanes (dvp = 0 without v)
  int64_t m_blocks;          // query blocks per batch element (dense calls)
  int64_t items;             // work items: (unit, query block) pairs
  float log_heads, log_ref_heads;

  explicit Geometry(const AttentionKLParams& p)
      : block_m(choose_block_m(p)),
        group(p.heads / p.kv_heads),
        ref_group(p.ref_heads / p.ref_kv_heads),
        dp(round_up(p.head_dim, kLanes)),
        dvp(p.has_v ? round_up(p.v_head_dim, kLanes) : 0),
        drp(round_up(p.ref_head_dim, kLanes)),
        m_blocks((p.q_len + block_m - 1) / block_m),
        items(count_items(p, block_m)),
        log_heads(std::log(static_cast<float>(p.heads))),
        log_ref_heads(std::log(static_cast<float>(p.ref_heads))) {}
};

// Threads actually used: no more than work items.
inline int worker_count(const AttentionKLParams& p, const Geometry& geo) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(p.num_threads, geo.items)));
}
inline int worker_count(const AttentionKLParams& p) { return worker_count(p, Geometry(p)); }

// ---- scratch from Python ------------------------------------------------------------------------
// Asks Linux for transparent huge pages on the 2 MiB-aligned part of a fresh (not yet touched)
// scratch buffer: first-touching tens of MiB in 4 KiB pages costs about 0.5 ms per MiB of page
// faults, in 2 MiB pages about a fifth of that. Best effort: where THP is off (or not Linux) the
// call does nothing.
inline void advise_huge_pages(uintptr_t address, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (address + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (address + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)address;
  (void)bytes;
#endif
}

// ---- aligned fp32 buffers ---------------------------------------------------------------------
class Floats {
 public:
  explicit Floats(int64_t n) {
    const size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(n, 1) * 4, 64));
    data_ = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (!data_) throw std::bad_alloc();
  }
  ~Floats() { std::free(data_); }
  Floats(const Floats&) = delete;
  Floats& operator=(const Floats&) = delete;
  float* get() const { return data_; }
  operator float*() const { return data_; }

 private:
  float* data_ = nullptr;
};

// ---- strided loads / stores with dtype conversion ---------------------------------------------
inline int64_t dtype_bytes(int32_t dtype) { return dtype == kFloat32 ? 4 : 2; }

// Address of row (i0, i1, i2, :) of a strided 4-d view.
inline const char* row_address(const View& v, int32_t dtype, int64_t i0, int64_t i1, int64_t i2) {
  return reinterpret_cast<const char*>(v.ptr) +
         dtype_bytes(dtype) * (i0 * v.stride[0] + i1 * v.stride[1] + i2 * v.stride[2]);
}

// dst[0:n] = scale * src[0:n] in fp32.
inline void load_row(const char* src, int32_t dtype, int64_t n, float scale, float* dst) {
  if (dtype == kFloat32) {
    const float* s = reinterpret_cast<const float*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = s[i] * scale;
  } else {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    if (dtype == kFloat16)
      for (int64_t i = 0; i < n; ++i) dst[i] = fp16_bits_to_float(s[i]) * scale;
    else
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(s[i]) * scale;
  }
}

// dst[0:n] (in `dtype`) = src[0:n], rounding to nearest even.
inline void store_row(char* dst, int32_t dtype, const float* src, int64_t n) {
  if (dtype == kFloat32) {
    std::copy(src, src + n, reinterpret_cast<float*>(dst));
  } else {
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
    if (dtype == kFloat16)
      for (int64_t i = 0; i < n; ++i) d[i] = float_to_fp16_bits(src[i]);
    else
      for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16_bits(src[i]);
  }
}

// A (rows x dim) slice of head (b, h) of a (B, Hx, S, dim) view, rows [row0, row0 + rows) of
// which the first `valid` exist, into dst (rows x ld, ld >= dim), scaled. Missing rows and the
// columns past dim are zero.
inline void load_tile(const View& v, int32_t dtype, int64_t b, int64_t h, int64_t row0, int64_t rows,
                      int64_t valid, int64_t dim, float scale, float* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    float* out = dst + r * ld;
    if (r < valid) {
      load_row(row_address(v, dtype, b, h, row0 + r), dtype, dim, scale, out);
      std::fill(out + dim, out + ld, 0.f);
    } else {
      std::fill(out, out + ld, 0.f);
    }
  }
}

// Prefetches the rows of the next key tile a few cache lines at a time, from inside the work on the
// current one. A key tile's keys and values are read again for every query block, and at long
// lengths they come from memory (the score cache fills the L3); copied when the tile starts, each
// line is a wait. Asked for all at once, the requests would queue behind the few misses a core keeps
// in flight and stall the same way; spread over the tile's rows (step), they overlap its arithmetic.
class TilePrefetcher {
 public:
  // Forgets what was queued.
  void clear() { spans_ = 0, span_ = 0, head_ = 0, row_ = 0, line_ = 0, queued_ = 0, per_step_ = 0; }

  // Queues rows [row0, row0 + rows) of heads [0, heads) of batch element b of a (B, heads, S, dim)
  // view (at most kMaxSpans views).
  void add(const View& v, int32_t dtype, int64_t b, int64_t heads, int64_t row0, int64_t rows, int64_t dim) {
    if (spans_ == kMaxSpans || heads <= 0 || rows <= 0 || dim <= 0) return;
    const int64_t bytes = dtype_bytes(dtype), lines = (dim * bytes + kLine - 1) / kLine;
    spans_of_[spans_++] = {row_address(v, dtype, b, 0, row0), bytes * v.stride[1], bytes * v.stride[2], heads, rows,
                           lines};
    queued_ += heads * rows * lines;
  }

  // Spreads the queued lines evenly over `steps` calls of step().
  void pace(int64_t steps) { per_step_ = (queued_ + std::max<int64_t>(steps, 1) - 1) / std::max<int64_t>(steps, 1); }

  // Asks for the next queued lines (pace()'s share; fewer when the queue runs out).
  RAL_VECTOR_INLINE void step() {
    for (int64_t n = per_step_; n > 0 && span_ < spans_; --n) {
      const Span& s = spans_of_[span_];
      __builtin_prefetch(s.base + head_ * s.head_stride + row_ * s.row_stride + line_ * kLine, 0, 3);
      if (++line_ < s.lines) continue;
      line_ = 0;
      if (++row_ < s.rows) continue;
      row_ = 0;
      if (++head_ < s.heads) continue;
      head_ = 0;
      ++span_;
    }
  }

 private:
  static constexpr int kMaxSpans = 4;
  static constexpr int64_t kLine = 64;
  struct Span {
    const char* base;  // row row0 of head 0
    int64_t head_stride, row_stride, heads, rows, lines;
  };
  Span spans_of_[kMaxSpans];
  int spans_ = 0, span_ = 0;
  int64_t head_ = 0, row_ = 0, line_ = 0, queued_ = 0, per_step_ = 0;
};

// The transpose of load_tile's result: dst[d * ld + r] (ld >= rows), from the packed rows `tile`;
// kLanes x kLanes blocks through registers (transpose_block), the rows past a multiple of kLanes
// one element at a time.
inline void transpose_tile(const float* tile, int64_t rows, int64_t dim_padded, float* dst, int64_t ld) {
  const int64_t block_rows = rows - rows % kLanes;
  vfloat block[kLanes];
  for (int64_t r = 0; r < block_rows; r += kLanes)
    for (int64_t d = 0; d < dim_padded; d += kLanes) {
      for (int i = 0; i < kLanes; ++i) block[i] = vload(tile + (r + i) * dim_padded + d);
      transpose_block(block);
      for (int i = 0; i < kLanes; ++i) vstore(dst + (d + i) * ld + r, block[i]);
    }
  for (int64_t d = 0; d < dim_padded; ++d)
    for (int64_t r = block_rows; r < rows; ++r) dst[d * ld + r] = tile[r * dim_padded + d];
}

// ---- query and key blocks --------------------------------------------------------------------
// Query block `block` of a unit: its rows [start, start + rows) of batch element b (absolute rows;
// rows <= block_m, the tile has block_m), and the unit's keys [k_start, k_start + k_len).
struct QueryBlock {
  int64_t b, start, rows, block_m;
  int64_t first_pos, last_pos;  // key positions (unit-local) of the first and last row
  int64_t k_start, k_len;

  QueryBlock(const Unit& u, int64_t block, int64_t block_m_)
      : b(u.batch),
        start(u.q_start + block * block_m_),
        rows(std::min(block_m_, u.q_len - block * block_m_)),
        block_m(block_m_),
        first_pos(u.q_pos + block * block_m_),
        last_pos(first_pos + rows - 1),
        k_start(u.k_start),
        k_len(u.k_len) {}
  // One past the last (unit-local) key any row of the block attends.
  int64_t key_end(const AttentionKLParams& p) const {
    return p.causal ? std::clamp<int64_t>(last_pos + 1, 0, k_len) : k_len;
  }
  // Key tiles the block sweeps: kBlockN keys each from the unit's first, up to key_end.
  int64_t key_tiles(const AttentionKLParams& p) const { return (key_end(p) + kBlockN - 1) / kBlockN; }
};

// Keys [start, start + kBlockN) of a query block's unit (unit-local positions; absolute row
// k_start + start). valid[n] = -1 for a real (existing, unpadded) key, 0 otherwise.
// With key segments (params.num_segments > 0), seg[n] is key n's segment id (0 for missing keys).
struct KeyBlock {
  int64_t start = 0, abs = 0, count = 0;  // count: keys of the unit that exist (< k_len)
  bool all_valid = false, any_valid = false;
  alignas(64) int32_t valid[kBlockN];
  alignas(64) int32_t seg[kBlockN];

  void init(const AttentionKLParams& p, const QueryBlock& qb, int64_t key0) {
    start = key0;
    abs = qb.k_start + key0;
    count = std::min(kBlockN, qb.k_len - key0);
    all_valid = count == kBlockN;
    any_valid = false;
    const uint8_t* mask = reinterpret_cast<const uint8_t*>(p.key_padding_mask.ptr);
    for (int64_t n = 0; n < kBlockN; ++n) {
      bool ok = n < count;
      if (ok && p.has_key_padding_mask)
        ok = mask[qb.b * p.key_padding_mask.stride[0] + (abs + n) * p.key_padding_mask.stride[1]] != 0;
      valid[n] = ok ? -1 : 0;
      all_valid = all_valid && ok;
      any_valid = any_valid || ok;
    }
    if (p.num_segments > 0) load_segments(p, qb);
  }

 private:
  void load_segments(const AttentionKLParams& p, const QueryBlock& qb) {
    const int32_t* ids = reinterpret_cast<const int32_t*>(p.key_segments.ptr);
    for (int64_t n = 0; n < kBlockN; ++n) {
      seg[n] = n < count ? ids[qb.b * p.key_segments.stride[0] + (abs + n) * p.key_segments.stride[1]] : 0;
      if (seg[n] < 0 || seg[n] >= p.num_segments)
        throw std::invalid_argument("ral._C: key_segments must hold ids in [0, num_segments=" +
                                    std::to_string(p.num_segments) + "), got " + std::to_string(seg[n]));
    }
  }
};

// The key block of every head of a (B, heads, S, dim) view, transposed: dst + h * dim_padded *
// kBlockN holds head h's K^T (dim_padded x kBlockN). Head h's rows (kBlockN x dim_padded, zero past
// the block's keys and past dim) go through rows + h * rows_step: a step of 0 reuses one scratch
// tile, kBlockN * dim_padded keeps every head's rows (the backward's dQ = dS K reads them).
inline void load_transposed(const View& x, int32_t dtype, int64_t heads, int64_t dim, int64_t dim_padded,
                            const QueryBlock& qb, const KeyBlock& kb, float* rows, int64_t rows_step, float* dst) {
  for (int64_t h = 0; h < heads; ++h) {
    float* head_rows = rows + h * rows_step;
    load_tile(x, dtype, qb.b, h, kb.abs, kBlockN, kb.count, dim, 1.f, head_rows, dim_padded);
    transpose_tile(head_rows, kBlockN, dim_padded, dst + h * dim_padded * kBlockN, kBlockN);
  }
}

// What the forward and the backward worker share: the call, its geometry, the query rows per
// work item, the head counts of both models, the statistics columns, and the key tile in hand.
struct UnitSweep {
  UnitSweep(const AttentionKLParams& p, const Geometry& geo)
      : p_(p),
        geo_(geo),
        bm_(geo.block_m),
        plane_(head_plane(geo.block_m)),
        heads_(p.heads),
        ref_heads_(p.ref_heads),
        nstat_(p.policy_stats ? 1 + p.num_segments : 0) {}

  const AttentionKLParams& p_;
  const Geometry& geo_;
  const int64_t bm_;     // query rows per work item
  const int64_t plane_;  // floats between heads in a (heads, BM, kBlockN) score tile: head_plane(bm_)
  const int64_t heads_, ref_heads_;
  const int64_t nstat_;  // 1 + S with policy_stats (entropy, S masses), else 0
  KeyBlock kb_;
};

// Whether every element of the (query block, key block) tile is in every row's support P(i),
// so that the tile needs no masking (a partial query block always takes the masked path).
inline bool tile_is_full(const AttentionKLParams& p, const QueryBlock& qb, const KeyBlock& kb) {
  const int64_t key_last = kb.start + kBlockN - 1;
  if (!kb.all_valid || qb.rows < qb.block_m) return false;
  if (p.causal && key_last > qb.first_pos) return false;
  if (p.exclude_self && kb.start <= qb.last_pos && key_last >= qb.first_pos) return false;
  return true;
}

// The order in which work items are handed out. Dense: per batch element, heavy (late, causal)
// blocks first. With a table, Order::kHeaviestFirst: every (unit, block) pair sorted by its work
// (rows x keys swept), heaviest first, so that the items left at the end are the small ones;
// Order::kByUnit: the units by their total work, heaviest first, and each unit's blocks last to
// first, as in a dense call (the backward's order of additions into dk / dv, backward.cpp, needs a
// unit's blocks together and in that order).
class Schedule {
 public:
  enum class Order { kHeaviestFirst, kByUnit };

  Schedule(const AttentionKLParams& p, const Geometry& geo, Order order = Order::kHeaviestFirst)
      : p_(p), geo_(geo) {
    if (!p.seqs) return;
    struct Entry {
      int64_t cost, unit, block;
    };
    std::vector<Entry> entries;
    entries.reserve(static_cast<size_t>(geo.items));
    std::vector<int64_t> unit_cost(static_cast<size_t>(p.num_seqs), 0);
    for (int64_t s = 0; s < p.num_seqs; ++s) {
      const Unit u = unit_at(p, s);
      const size_t first = entries.size();
      for (int64_t blk = 0; blk < unit_blocks(u, geo.block_m); ++blk) {
        const QueryBlock qb(u, blk, geo.block_m);
        entries.push_back({qb.rows * std::max<int64_t>(qb.key_end(p), 1), s, blk});
        unit_cost[static_cast<size_t>(s)] += entries.back().cost;
      }
      if (order == Order::kByUnit) std::reverse(entries.begin() + static_cast<std::ptrdiff_t>(first), entries.end());
    }
    if (order == Order::kByUnit)
      for (Entry& e : entries) e.cost = unit_cost[static_cast<size_t>(e.unit)];
    std::stable_sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) { return a.cost > b.cost; });
    order_.reserve(entries.size());
    for (const Entry& e : entries) order_.push_back({e.unit, e.block});
  }

  int64_t size() const { return geo_.items; }

  // Item -> (unit, block of the unit).
  std::pair<int64_t, int64_t> unit_block(int64_t item) const {
    if (!p_.seqs) return {item / geo_.m_blocks, geo_.m_blocks - 1 - item % geo_.m_blocks};
    return order_[static_cast<size_t>(item)];
  }

  QueryBlock block(int64_t item) const {
    const auto [unit, blk] = unit_block(item);
    return QueryBlock(unit_at(p_, unit), blk, geo_.block_m);
  }

 private:
  const AttentionKLParams& p_;
  const Geometry& geo_;
  std::vector<std::pair<int64_t, int64_t>> order_;  // (unit, block), with a table
};

// Lanes [c, c + kLanes) of a key block, for the query row at key position `pos`: which keys are
// attended (A) and in the support (P).
struct LaneMasks {
  vmask attended, support;
};

inline LaneMasks lane_masks(const AttentionKLParams& p, const KeyBlock& kb, int64_t c, int64_t pos,
                            bool row_exists) {
  vmask valid;
  memcpy(&valid, kb.valid + c, sizeof(valid));
  const vmask key = iota() + static_cast<int32_t>(kb.start + c);
  const int32_t pos32 = static_cast<int32_t>(std::clamp<int64_t>(pos, -1, std::numeric_limits<int32_t>::max()));
  LaneMasks m;
  m.attended = row_exists ? valid : vmask{};
  if (p.causal) m.attended &= key <= pos32;
  m.support = p.exclude_self ? (m.attended & (key != pos32)) : m.attended;
  return m;
}

// Per unit: prefix[j] = number of real keys among the unit's keys [0, j). Gives each row's
// support size without touching the scores (a row with an empty P gets div 0, never NaN).
// Without a key_padding_mask every key is real and no prefix is built.
struct KeyCounts {
  int64_t batch = -1, k_start = -1, k_len = -1;
  std::vector<int64_t> prefix;

  void update(const AttentionKLParams& p, const QueryBlock& qb) {
    if (qb.b == batch && qb.k_start == k_start && qb.k_len == k_len) return;
    batch = qb.b;
    k_start = qb.k_start;
    k_len = qb.k_len;
    if (!p.has_key_padding_mask) return;
    prefix.assign(k_len + 1, 0);
    const uint8_t* mask = reinterpret_cast<const uint8_t*>(p.key_padding_mask.ptr);
    for (int64_t j = 0; j < k_len; ++j) {
      const bool ok = mask[batch * p.key_padding_mask.stride[0] + (k_start + j) * p.key_padding_mask.stride[1]] != 0;
      prefix[j + 1] = prefix[j] + (ok ? 1 : 0);
    }
  }
  int64_t real_before(const AttentionKLParams& p, int64_t end) const { return p.has_key_padding_mask ? prefix[end] : end; }
  // |P(i)| > 0 for the row at (unit-local) key position pos.
  bool support_nonempty(const AttentionKLParams& p, int64_t pos) const {
    const int64_t end = p.causal ? std::clamp<int64_t>(pos + 1, 0, k_len) : k_len;
    int64_t n = real_before(p, end);
    if (p.exclude_self && pos >= 0 && pos < k_len && real_before(p, pos + 1) != real_before(p, pos)) n -= 1;
    return n > 0;
  }
};

// log Z = logsumexp_h(lse_P[h] - lse_A[h]) - log H: the support's share of the head-mean attention.
inline float log_support_mass(const float* lse_a, const float* lse_p, int64_t heads, int64_t stride,
                              float log_heads) {
  float m = neg_inf(), l = 0.f;
  for (int64_t h = 0; h < heads; ++h) lse_push(m, l, lse_p[h * stride] - lse_a[h * stride]);
  return lse_value(m, l) - log_heads;
}

// One lane group's head mixture in log space: with x_h = s_h - lse_A_h (s_h at s + h * stride,
// lse_A_h at lse_a + h * lse_stride), returns max_h x_h and log sum_h exp(x_h - max); with `e`,
// also exp(x_h - max) there (same stride, may be s). log abar = max + log_sum - log H.
struct LogMixture {
  vfloat max, log_sum;
};
RAL_VECTOR_INLINE LogMixture log_mixture(const float* s, int64_t stride, const float* lse_a, int64_t lse_stride,
                                         int64_t heads, float* e = nullptr) {
  vfloat x_max = vbroadcast(-kInf);
  for (int64_t h = 0; h < heads; ++h) x_max = vmax(x_max, vload(s + h * stride) - lse_a[h * lse_stride]);
  vfloat e_sum{};
  for (int64_t h = 0; h < heads; ++h) {
    const vfloat x = vexp_nonpositive(vload(s + h * stride) - lse_a[h * lse_stride] - x_max);
    if (e) vstore(e + h * stride, x);
    e_sum += x;
  }
  return {x_max, vlog(e_sum)};
}

// ---- threads ----------------------------------------------------------------------------------
// Runs worker(thread_index) on n_threads threads (the caller is thread 0); rethrows the first
// exception any of them threw.
template <class Worker>
void run_threads(int n_threads, Worker&& worker) {
  std::exception_ptr error;
  std::mutex error_lock;
  auto guarded = [&](int t) {
    try {
      worker(t);
    } catch (...) {
      std::lock_guard<std::mutex> hold(error_lock);
      if (!error) error = std::current_exception();
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(n_threads - 1);
  for (int t = 1; t < n_threads; ++t) threads.emplace_back(guarded, t);
  guarded(0);
  for (auto& th : threads) th.join();
  if (error) std::rethrow_exception(error);
}

// Hands out work items 0, 1, ... to whichever thread asks first.
class WorkQueue {
 public:
  explicit WorkQueue(int64_t n_items) : n_items_(n_items) {}
  bool pop(int64_t& item) {
    item = next_.fetch_add(1, std::memory_order_relaxed);
    return item < n_items_;
  }

 private:
  std::atomic<int64_t> next_{0};
  int64_t n_items_;
};

}  // namespace ral::cpu
