// CPU backward: dq, dk, dv of attention + divergence (docs/design.md, "Gradient"; params.h).
//
// Per work item (a unit's block of BM query rows, every head; tiles.h) and key block of the
// unit, recompute the scores
// of both models and form, per head h,
//   a   = exp(s - lse_A)                          (0 outside A)
//   dS  = a (dP - delta) + [k in P] w T,          dP = dout v^T, delta from Python,
//   T   = (a / H) (g - gbar) / Z   ("mean"),   pi_h (g_h - gbar_h)   ("each"),
// skipping T (select) on rows with w == 0; then dq += scale dS k, dk += dS^T (scale q),
// dv += a^T dout. The reference's scores are only recomputed for blocks with a row of w != 0.
// With policy_stats (params.h), w T uses g_total = w g + w_E (-log pi) + w_seg and gbar_total in
// place of w g and w gbar; a row's term is live when any of its weights is nonzero, and g (so the
// reference) is only evaluated on rows with w != 0.
//
// Scratch (Python-allocated, backward_scratch_bytes): per thread, two key tiles' fp32 dK and dV,
// 2 x ((Hkv, kBlockN, Dp) + (Hkv, kBlockN, Dvp)) floats (D, Dv padded to kLanes): independent of the
// sequence length. Each tile's dK / dV (summed over the query heads of each kv head) is added into
// dk / dv row by row, each row's additions in the schedule's order of the work items (KeyRowTurns;
// a tile whose rows are not free yet waits in its slot while the worker goes on with the next one),
// so units that share keys (context-parallel chunks, threads on one batch element) add, never store,
// and dk / dv do not depend on the threads' timing (the thread count sets the query block size,
// Geometry::block_m, and so the partial sums). dq rows belong to one item: written directly. Beyond
// the scratch: one int32 turn counter per (batch element, key).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <thread>
#include <utility>
#include <vector>

#include "common/check.h"
#include "cpu/api.h"
#include "cpu/tiles.h"

namespace ral::cpu {
namespace {

int64_t tile_grad_floats(const AttentionKLParams& p, const Geometry& geo) {
  return p.kv_heads * kBlockN * (geo.dp + geo.dvp);
}
constexpr int kGradSlots = 2;  // key tiles' dK / dV a worker may hold until their rows' turn
// The whole scratch: kGradSlots tile_grad_floats() slots per worker.
int64_t scratch_bytes(const AttentionKLParams& p, const Geometry& geo) {
  return static_cast<int64_t>(sizeof(float)) * worker_count(p, geo) * kGradSlots * tile_grad_floats(p, geo);
}

// Key rows [0, n) of its unit that block `blk` sweeps (Backward::run): its key tiles, the last one
// cut at the unit's k_len.
int64_t swept_keys(const AttentionKLParams& p, const Unit& u, int64_t blk, int64_t block_m) {
  return std::min(QueryBlock(u, blk, block_m).key_tiles(p) * kBlockN, u.k_len);
}

// The order of the additions into dk / dv. Every work item adds into each key row it sweeps exactly
// once (rows of padded keys get nothing from any item and keep no turn), and the items that sweep a
// row add in the order the schedule hands them out (Schedule::Order::kByUnit): the item of rank n
// waits until the row has received n additions. So no sum depends on the threads' timing, and the
// earliest unfinished item never waits (nothing can deadlock). An item's rank at a row, the number of
// items handed out before it that sweep the row: the later blocks of its own unit (handed out last to
// first; under causal masking a later block sweeps every key an earlier one does) and, for every
// unit handed out before its own with keys in the same rows (context-parallel chunks of one
// sequence), that unit's blocks that sweep the row.
class KeyRowTurns {
 public:
  struct Abandoned {};  // thrown to a waiting worker after another one failed

  KeyRowTurns(const AttentionKLParams& p, const Geometry& geo, const Schedule& schedule)
      : p_(p), bm_(geo.block_m), done_(static_cast<size_t>(p.batch * p.k_len)) {
    for (auto& d : done_) d.store(0, std::memory_order_relaxed);
    if (p.seqs) find_earlier_overlaps(schedule);
  }

  // What an item's rank at a row is made of: its unit and the blocks of that unit after it.
  struct Item {
    int64_t unit;
    int32_t later_blocks;
  };
  Item item(const Schedule& schedule, int64_t index) const {
    const auto [unit, blk] = schedule.unit_block(index);
    return {unit, static_cast<int32_t>(blocks(unit_at(p_, unit)) - 1 - blk)};
  }

  // The rank of `item` at key row `row` (absolute): the additions that row gets before the item's.
  int32_t rank(const Item& item, int64_t row) const {
    int32_t n = item.later_blocks;
    if (!earlier_.empty())
      for (int64_t i = earlier_start_[item.unit]; i < earlier_start_[item.unit + 1]; ++i)
        n += blocks_sweeping(earlier_[i], row);
    return n;
  }
  // Whether row `row` of batch element b has had its first `rank` additions.
  bool ready(int64_t b, int64_t row, int32_t rank) const {
    return done_[static_cast<size_t>(b * p_.k_len + row)].load(std::memory_order_acquire) == rank;
  }
  void wait(int64_t b, int64_t row, int32_t rank) const {
    for (int spins = 0; !ready(b, row, rank); ++spins) {
      if (abandoned_.load(std::memory_order_relaxed)) throw Abandoned{};
      if (spins < 64)
        pause();
      else
        std::this_thread::yield();
    }
  }
  void release(int64_t b, int64_t row, int32_t rank) {
    done_[static_cast<size_t>(b * p_.k_len + row)].store(rank + 1, std::memory_order_release);
  }
  void abandon() { abandoned_.store(true, std::memory_order_relaxed); }

 private:
  int64_t blocks(const Unit& u) const { return unit_blocks(u, bm_); }

  // Blocks of unit s that sweep the absolute key row `row`.
  int32_t blocks_sweeping(int64_t s, int64_t row) const {
    const Unit u = unit_at(p_, s);
    const int64_t key = row - u.k_start, n = blocks(u);
    if (key < 0 || key >= u.k_len) return 0;
    int64_t lo = 0, hi = n;  // the first block whose swept keys reach past `key` (they grow with the block)
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (swept_keys(p_, u, mid, bm_) > key)
        hi = mid;
      else
        lo = mid + 1;
    }
    return static_cast<int32_t>(n - lo);
  }

  // earlier_[earlier_start_[s] ..]: the units handed out before unit s whose swept keys share rows of
  // its batch element with its own.
  void find_earlier_overlaps(const Schedule& schedule) {
    const int64_t units = p_.num_seqs;
    std::vector<int64_t> position(static_cast<size_t>(units), -1), sorted;
    for (int64_t i = 0, next = 0; i < schedule.size(); ++i) {
      const int64_t s = schedule.unit_block(i).first;
      if (position[s] < 0) position[s] = next++;
    }
    for (int64_t s = 0; s < units; ++s)
      if (position[s] >= 0) sorted.push_back(s);
    auto rows = [&](int64_t s) {  // [first, end) of the rows unit s sweeps
      const Unit u = unit_at(p_, s);
      return std::pair<int64_t, int64_t>(u.k_start, u.k_start + swept_keys(p_, u, blocks(u) - 1, bm_));
    };
    std::sort(sorted.begin(), sorted.end(), [&](int64_t a, int64_t b) {
      return std::make_pair(unit_at(p_, a).batch, rows(a).first) < std::make_pair(unit_at(p_, b).batch, rows(b).first);
    });
    std::vector<std::vector<int64_t>> lists(static_cast<size_t>(units));
    std::vector<int64_t> open;  // units of the current batch element whose rows may still overlap
    for (size_t i = 0; i < sorted.size(); ++i) {
      const int64_t s = sorted[i];
      if (i > 0 && unit_at(p_, sorted[i - 1]).batch != unit_at(p_, s).batch) open.clear();
      const auto [first, end] = rows(s);
      open.erase(std::remove_if(open.begin(), open.end(), [&](int64_t o) { return rows(o).second <= first; }),
                 open.end());
      if (first >= end) continue;
      for (int64_t o : open) {
        if (position[o] < position[s])
          lists[s].push_back(o);
        else
          lists[o].push_back(s);
      }
      open.push_back(s);
    }
    earlier_start_.assign(static_cast<size_t>(units) + 1, 0);
    for (int64_t s = 0; s < units; ++s) earlier_start_[s + 1] = earlier_start_[s] + static_cast<int64_t>(lists[s].size());
    if (earlier_start_[units] == 0) return;
    for (const auto& list : lists) earlier_.insert(earlier_.end(), list.begin(), list.end());
  }

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }

  const AttentionKLParams& p_;
  const int64_t bm_;
  std::vector<std::atomic<int32_t>> done_;    // (B, Sk): additions each key row has received
  std::vector<int64_t> earlier_start_, earlier_;  // per unit, the units before it sharing its rows (tables)
  std::atomic<bool> abandoned_{false};
};

// A key tile's dK / dV in the scratch, until its rows' turn: the rows abs + j (j < count) of batch
// element b whose key is valid (bit j of `valid`) get them; ranks[j] is the item's rank at row abs + j.
// A padded key's rows get no addition from any item (their dK and dV are 0), so they keep no turn.
struct TileGrads {
  float* dk = nullptr;  // (Hkv, kBlockN, Dp)
  float* dv = nullptr;  // (Hkv, kBlockN, Dvp)
  int64_t b = 0, abs = 0, count = 0;
  uint64_t valid = 0;
  bool waiting = false;
  int32_t ranks[kBlockN];
};
static_assert(kBlockN <= 64, "TileGrads::valid has a bit per key of the tile");

class Backward : UnitSweep {
 public:
  Backward(const AttentionKLParams& p, const Geometry& geo, float* tile_grads, KeyRowTurns& turns)
      : UnitSweep(p, geo),
        turns_(turns),
        q_(heads_ * bm_ * geo_.dp),
        dout_(heads_ * bm_ * std::max<int64_t>(geo_.dvp, 1)),
        q_ref_(ref_heads_ * bm_ * geo_.drp),
        k_(p.kv_heads * kBlockN * geo_.dp),
        k_t_(p.kv_heads * geo_.dp * kBlockN),
        v_t_(p.kv_heads * std::max<int64_t>(geo_.dvp, 1) * kBlockN),
        k_ref_t_(p.ref_kv_heads * geo_.drp * kBlockN),
        rows_tmp_(kBlockN * std::max({geo_.dvp, geo_.drp, int64_t{1}})),
        s_(heads_ * plane_),
        s_ref_(ref_heads_ * plane_),
        ds_(heads_ * plane_),
        dq_(heads_ * bm_ * geo_.dp),
        row_(bm_ * (6 * heads_ + 2 * ref_heads_ + 2)),
        stats_w_(heads_ * bm_ * nstat_),
        w_live_(heads_ * bm_) {
    for (int i = 0; i < kGradSlots; ++i) {
      slots_[i].dk = tile_grads + i * tile_grad_floats(p, geo);
      slots_[i].dv = slots_[i].dk + p.kv_heads * kBlockN * geo_.dp;
    }
  }

  // The work item `item` (its query block qb): key tiles first to last, each row of dk / dv in its
  // turn (KeyRowTurns). A tile's dK / dV goes into the slot of the tile before last, which is
  // added first if it still waits; then whatever is free is added.
  void run(const QueryBlock& qb, const KeyRowTurns::Item& item) {
    load_rows(qb);
    const int64_t tiles = qb.key_tiles(p_);
    for (int64_t t = 0, used = 0; t < tiles; ++t) {
      kb_.init(p_, qb, t * kBlockN);
      if (!kb_.any_valid) continue;
      TileGrads& slot = slots_[used++ % kGradSlots];
      if (slot.waiting) add_tile_grads(slot, /*block=*/true);
      slot.b = qb.b;
      slot.abs = kb_.abs;
      slot.count = kb_.count;
      slot.valid = 0;
      for (int64_t j = 0; j < kb_.count; ++j) {
        if (!kb_.valid[j]) continue;
        slot.valid |= uint64_t{1} << j;
        slot.ranks[j] = turns_.rank(item, kb_.abs + j);
      }
      slot.waiting = true;
      tile(qb, slot);
    }
    for (TileGrads& slot : slots_)
      if (slot.waiting) add_tile_grads(slot, /*block=*/true);
    float* dq = reinterpret_cast<float*>(p_.dq);
    for (int64_t h = 0; h < heads_; ++h)
      for (int64_t r = 0; r < qb.rows; ++r) {
        const float* src = dq_ + (h * bm_ + r) * geo_.dp;
        float* dst = dq + ((qb.b * heads_ + h) * p_.q_len + qb.start + r) * p_.head_dim;
        for (int64_t d = 0; d < p_.head_dim; ++d) dst[d] = p_.scale * src[d];
      }
  }

 private:
  // per (head, row) scalars, each (heads, BM)
  float* lse_a() { return row_; }
  float* lse_p() { return row_ + heads_ * bm_; }
  float* delta() { return row_ + 2 * heads_ * bm_; }
  float* w() { return row_ + 3 * heads_ * bm_; }     // (BM) "mean" | (heads, BM) "each"
  float* gbar() { return row_ + 4 * heads_ * bm_; }  // likewise
  float* ref_lse_a() { return row_ + 5 * heads_ * bm_; }
  float* ref_lse_p() { return ref_lse_a() + ref_heads_ * bm_; }
  float* log_z() { return ref_lse_p() + ref_heads_ * bm_; }  // (BM), "mean"
  float* log_z_ref() { return log_z() + bm_; }

  void load_rows(const QueryBlock& qb) {
    const int64_t n_each = p_.heads_each ? heads_ : 1;
    for (int64_t h = 0; h < heads_; ++h)
      load_tile(p_.q, p_.dtype, qb.b, h, qb.start, bm_, qb.rows, p_.head_dim, p_.scale,
                q_ + h * bm_ * geo_.dp, geo_.dp);
    if (p_.has_v) {
      View dout;
      dout.ptr = p_.dout;
      dout.stride[0] = heads_ * p_.q_len * p_.v_head_dim;
      dout.stride[1] = p_.q_len * p_.v_head_dim;
      dout.stride[2] = p_.v_head_dim;
      dout.stride[3] = 1;
      for (int64_t h = 0; h < heads_; ++h)
        load_tile(dout, p_.dtype, qb.b, h, qb.start, bm_, qb.rows, p_.v_head_dim, 1.f,
                  dout_ + h * bm_ * geo_.dvp, geo_.dvp);
    }
    std::fill(row_.get(), row_ + bm_ * (6 * heads_ + 2 * ref_heads_ + 2), 0.f);
    const float* stats = reinterpret_cast<const float*>(p_.stats);
    const float* delta_in = reinterpret_cast<const float*>(p_.delta);
    const float* w_in = reinterpret_cast<const float*>(p_.ddiv);
    const float* gbar_in = reinterpret_cast<const float*>(p_.gbar);
    for (int64_t h = 0; h < heads_; ++h)
      for (int64_t r = 0; r < qb.rows; ++r) {
        const int64_t row = (qb.b * heads_ + h) * p_.q_len + qb.start + r;
        lse_a()[h * bm_ + r] = stats[2 * row];
        lse_p()[h * bm_ + r] = stats[2 * row + 1];
        delta()[h * bm_ + r] = delta_in[row];
      }
    for (int64_t h = 0; h < n_each; ++h)
      for (int64_t r = 0; r < qb.rows; ++r) {
        const int64_t row = (qb.b * n_each + h) * p_.q_len + qb.start + r;
        w()[h * bm_ + r] = w_in[row];
        gbar()[h * bm_ + r] = gbar_in[row];
      }
    const View& ref = p_.ref_stats_in;
    const float* ref_base = reinterpret_cast<const float*>(ref.ptr);
    for (int64_t h = 0; h < ref_heads_; ++h)
      for (int64_t r = 0; r < qb.rows; ++r) {
        const float* src = ref_base + qb.b * ref.stride[0] + h * ref.stride[1] + (qb.start + r) * ref.stride[2];
        ref_lse_a()[h * bm_ + r] = src[0];
        ref_lse_p()[h * bm_ + r] = src[ref.stride[3]];
      }
    // rows whose divergence term is live: w != 0 (Python already zeroed w on dead rows), or,
    // with policy statistics, any of their weights; the reference is needed where w != 0
    if (nstat_) {
      const float* sw = reinterpret_cast<const float*>(p_.stats_w);
      for (int64_t h = 0; h < n_each; ++h)
        for (int64_t r = 0; r < qb.rows; ++r)
          for (int64_t t = 0; t < nstat_; ++t)
            stats_w_[(h * bm_ + r) * nstat_ + t] = sw[((qb.b * n_each + h) * p_.q_len + qb.start + r) * nstat_ + t];
    }
    need_div_ = need_ref_ = false;
    for (int64_t h = 0; h < n_each; ++h)
      for (int64_t r = 0; r < bm_; ++r) {
        const bool has_w = r < qb.rows && w()[h * bm_ + r] != 0.f;
        bool live = has_w;
        for (int64_t t = 0; t < nstat_ && r < qb.rows; ++t) live = live || stats_w_[(h * bm_ + r) * nstat_ + t] != 0.f;
        w_live_[h * bm_ + r] = live;
        need_div_ = need_div_ || live;
        need_ref_ = need_ref_ || has_w;
      }
    if (!p_.heads_each)
      for (int64_t r = 0; r < qb.rows; ++r)
        if (w_live_[r]) {
          log_z()[r] = log_support_mass(lse_a() + r, lse_p() + r, heads_, bm_, geo_.log_heads);
          log_z_ref()[r] = log_support_mass(ref_lse_a() + r, ref_lse_p() + r, ref_heads_, bm_,
                                            geo_.log_ref_heads);
        }
    if (need_ref_)
      for (int64_t h = 0; h < ref_heads_; ++h)
        load_tile(p_.q_ref, p_.ref_dtype, qb.b, h, qb.start, bm_, qb.rows, p_.ref_head_dim, p_.ref_scale,
                  q_ref_ + h * bm_ * geo_.drp, geo_.drp);
    // rows past Sq never get written by the GEMMs below: keep their a and dS at 0
    for (int64_t h = 0; h < heads_; ++h) {
      const int64_t tile = h * plane_;
      std::fill(s_ + tile + qb.rows * kBlockN, s_ + tile + bm_ * kBlockN, 0.f);
      std::fill(ds_ + tile + qb.rows * kBlockN, ds_ + tile + bm_ * kBlockN, 0.f);
    }
    std::fill(dq_.get(), dq_ + heads_ * bm_ * geo_.dp, 0.f);
  }

  // Scores, dS and this tile's dK / dV (into `slot`), the waiting tiles added, dq += dS K.
  void tile(const QueryBlock& qb, TileGrads& slot) {
    const bool full = tile_is_full(p_, qb, kb_);
    load_transposed(p_.k, p_.dtype, p_.kv_heads, p_.head_dim, geo_.dp, qb, kb_, k_, kBlockN * geo_.dp, k_t_);
    if (p_.has_v)
      load_transposed(p_.v, p_.dtype, p_.kv_heads, p_.v_head_dim, geo_.dvp, qb, kb_, rows_tmp_, 0, v_t_);
    for (int64_t h = 0; h < heads_; ++h) {
      const int64_t kv = h / geo_.group;
      gemm<false, false, /*kSplitK=*/true>(s_ + h * plane_, kBlockN, {q_ + h * bm_ * geo_.dp, geo_.dp, 1},
                                           k_t_ + kv * geo_.dp * kBlockN, kBlockN, qb.rows, kBlockN, p_.head_dim);
      if (p_.has_v)
        gemm<false, false, /*kSplitK=*/true>(ds_ + h * plane_, kBlockN, {dout_ + h * bm_ * geo_.dvp, geo_.dvp, 1},
                                             v_t_ + kv * geo_.dvp * kBlockN, kBlockN, qb.rows, kBlockN,
                                             p_.v_head_dim);
      else
        std::fill(ds_ + h * plane_, ds_ + h * plane_ + qb.rows * kBlockN, 0.f);
    }
    if (need_ref_) {
      load_transposed(p_.k_ref, p_.ref_dtype, p_.ref_kv_heads, p_.ref_head_dim, geo_.drp, qb, kb_, rows_tmp_, 0,
                      k_ref_t_);
      for (int64_t h = 0; h < ref_heads_; ++h)
        gemm<false, false, /*kSplitK=*/true>(s_ref_ + h * plane_, kBlockN, {q_ref_ + h * bm_ * geo_.drp, geo_.drp, 1},
                                             k_ref_t_ + (h / geo_.ref_group) * geo_.drp * kBlockN, kBlockN, qb.rows,
                                             kBlockN, p_.ref_head_dim);
    }

    // s_ <- a, ds_ <- dS
    if (p_.heads_each) {
      if (nstat_)
        grad_tile_each<true>(qb, full);
      else
        grad_tile_each<false>(qb, full);
    } else {
      if (nstat_)
        grad_tile_mean<true>(qb, full);
      else
        grad_tile_mean<false>(qb, full);
    }

    // dV and dK of a kv head sum over the rows of its query heads, one head's tile after the other
    // (the same order of additions as one GEMM over the stacked rows); then into dv / dk.
    for (int64_t h = 0; h < heads_; ++h) {
      const int64_t kv = h / geo_.group;
      const bool first = h % geo_.group == 0;
      if (p_.has_v)
        set_or_add(first, slot.dv + kv * kBlockN * geo_.dvp, geo_.dvp, {s_ + h * plane_, 1, kBlockN},
                   dout_ + h * bm_ * geo_.dvp, geo_.dvp, kb_.count, geo_.dvp, bm_);
      set_or_add(first, slot.dk + kv * kBlockN * geo_.dp, geo_.dp, {ds_ + h * plane_, 1, kBlockN},
                 q_ + h * bm_ * geo_.dp, geo_.dp, kb_.count, geo_.dp, bm_);
    }
    add_waiting_tiles(slot);
    for (int64_t h = 0; h < heads_; ++h)
      gemm<true>(dq_ + h * bm_ * geo_.dp, geo_.dp, {ds_ + h * plane_, kBlockN, 1},
                 k_ + (h / geo_.group) * kBlockN * geo_.dp, geo_.dp, qb.rows, geo_.dp, kb_.count);
  }

  // C = A B (set) or C += A B.
  static void set_or_add(bool set, float* c, int64_t ldc, MatA a, const float* b, int64_t ldb, int64_t m, int64_t n,
                         int64_t k_len) {
    if (set)
      gemm<false>(c, ldc, a, b, ldb, m, n, k_len);
    else
      gemm<true>(c, ldc, a, b, ldb, m, n, k_len);
  }

  // Adds the waiting slots whose rows are free, the older (the other) one first, `current` last.
  void add_waiting_tiles(TileGrads& current) {
    static_assert(kGradSlots == 2, "the other slot is the older one");
    TileGrads& other = &current == &slots_[0] ? slots_[1] : slots_[0];
    if (other.waiting) add_tile_grads(other, /*block=*/false);
    add_tile_grads(current, /*block=*/false);
  }

  // dk / dv rows of `slot` += its tile's, once each of those rows has had the additions that come
  // before this item's: waiting for them (`block`), or leaving the slot waiting if one has not.
  void add_tile_grads(TileGrads& slot, bool block) {
    for (int64_t j = 0; j < slot.count; ++j) {
      if (!(slot.valid >> j & 1)) continue;
      if (block)
        turns_.wait(slot.b, slot.abs + j, slot.ranks[j]);
      else if (!turns_.ready(slot.b, slot.abs + j, slot.ranks[j]))
        return;
    }
    add_rows(slot, slot.dk, geo_.dp, reinterpret_cast<float*>(p_.dk), p_.head_dim);
    if (p_.has_v) add_rows(slot, slot.dv, geo_.dvp, reinterpret_cast<float*>(p_.dv), p_.v_head_dim);
    for (int64_t j = 0; j < slot.count; ++j)
      if (slot.valid >> j & 1) turns_.release(slot.b, slot.abs + j, slot.ranks[j]);
    slot.waiting = false;
  }

  void add_rows(const TileGrads& slot, const float* tile, int64_t ld, float* grad, int64_t dim) {
    for (int64_t kv = 0; kv < p_.kv_heads; ++kv)
      for (int64_t j = 0; j < slot.count; ++j) {
        if (!(slot.valid >> j & 1)) continue;
        const float* src = tile + (kv * kBlockN + j) * ld;
        float* dst = grad + ((slot.b * p_.kv_heads + kv) * p_.k_len + slot.abs + j) * dim;
        int64_t d = 0;
        for (; d + kLanes <= dim; d += kLanes) vstore(dst + d, vload(dst + d) + vload(src + d));
        for (; d < dim; ++d) dst[d] += src[d];
      }
  }

  // heads="mean". With x_h = s_h - lse_A_h and e_h = exp(x_h - max_h x):
  //   a_h = e_h exp(max x),  log pi = max x + log sum_h e_h - log H - log Z,
  //   w T_h = e_h * w exp(max x - log H - log Z) (g - gbar)   (the factor is <= pi, never overflows).
  template <bool kStats>
  void grad_tile_mean(const QueryBlock& qb, bool full) {
    for (int64_t r = 0; r < qb.rows; ++r) {
      const int64_t pos = qb.first_pos + r;
      float* s_row = s_ + r * kBlockN;
      float* ds_row = ds_ + r * kBlockN;
      if (!w_live_[r]) {
        for (int64_t c = 0; c < kBlockN; c += kLanes) {
          const vmask attended = full ? vmask{} : lane_masks(p_, kb_, c, pos, true).attended;
          for (int64_t h = 0; h < heads_; ++h) {
            const int64_t at = h * plane_ + c;
            vfloat a = vexp_nonpositive(vload(s_row + at) - lse_a()[h * bm_ + r]);
            if (!full) a = vselect(attended, a, vfloat{});
            vstore(s_row + at, a);
            vstore(ds_row + at, a * (vload(ds_row + at) - delta()[h * bm_ + r]));
          }
        }
        continue;
      }
      const float log_norm = geo_.log_heads + log_z()[r], log_norm_ref = geo_.log_ref_heads + log_z_ref()[r];
      const float w_row = w()[r], gbar_row = gbar()[r];
      const bool with_g = !kStats || w_row != 0.f;
      for (int64_t c = 0; c < kBlockN; c += kLanes) {
        // e_h = exp(x_h - max_h x) in place of s, x_h = s_h - lse_A_h
        const LogMixture mix = log_mixture(s_row + c, plane_, lse_a() + r, bm_, heads_, s_row + c);
        const vfloat x_max = mix.max, log_pi = x_max + mix.log_sum - log_norm;
        // coef = exp(x_max - log H - log Z) (g_total - gbar), its w g part as vweighted_grad
        const vfloat log_factor = x_max - log_norm, factor = vexp(log_factor);
        vfloat wg{};
        if (with_g) {
          const LogMixture ref = log_mixture(s_ref_ + r * kBlockN + c, plane_, ref_lse_a() + r, bm_, ref_heads_);
          const vfloat log_rho = ref.max + ref.log_sum - log_norm_ref;
          wg = w_row * vweighted_grad(p_.divergence, log_factor, factor, log_pi, log_rho);
        }
        vfloat coef;
        if constexpr (kStats)
          coef = factor * (stats_g(r, c, log_pi) - gbar_row) + wg;
        else
          coef = wg - w_row * factor * gbar_row;
        const vfloat a_scale = vexp(x_max);
        LaneMasks mask{};
        if (!full) mask = lane_masks(p_, kb_, c, pos, true);
        for (int64_t h = 0; h < heads_; ++h) {
          const int64_t at = h * plane_ + c;
          const vfloat e = vload(s_row + at);
          vfloat a = e * a_scale, term = e * coef;
          if (!full) {
            a = vselect(mask.attended, a, vfloat{});
            term = vselect(mask.support, term, vfloat{});
          }
          vstore(s_row + at, a);
          vstore(ds_row + at, a * (vload(ds_row + at) - delta()[h * bm_ + r]) + term);
        }
      }
    }
  }

  // g_total - w g = w_E (-log pi) + w_seg of lanes [c, c + kLanes), from the stats_w of row i
  // (index h * BM + r); the w g part is added by the caller (vweighted_grad).
  vfloat stats_g(int64_t i, int64_t c, vfloat log_pi) const {
    const float* sw = stats_w_ + i * nstat_;
    vfloat total = sw[0] * -log_pi;
    if (nstat_ > 1) {
      vmask seg;
      memcpy(&seg, kb_.seg + c, sizeof(seg));
      vfloat w_seg{};
      for (int64_t s = 0; s + 1 < nstat_; ++s)
        w_seg = vselect(seg == (vmask{} + static_cast<int32_t>(s)), vbroadcast(sw[1 + s]), w_seg);
      total += w_seg;
    }
    return total;
  }

  // heads="each": w T = w pi (g - gbar_h) with log pi = s - lse_P, log rho = s_ref - lse_P_ref.
  template <bool kStats>
  void grad_tile_each(const QueryBlock& qb, bool full) {
    for (int64_t h = 0; h < heads_; ++h)
      for (int64_t r = 0; r < qb.rows; ++r) {
        const int64_t i = h * bm_ + r, pos = qb.first_pos + r, at = h * plane_ + r * kBlockN;
        float* s_row = s_ + at;
        float* ds_row = ds_ + at;
        const float* sr_row = s_ref_ + at;
        const bool live = w_live_[i];
        for (int64_t c = 0; c < kBlockN; c += kLanes) {
          LaneMasks mask{};
          if (!full) mask = lane_masks(p_, kb_, c, pos, true);
          const vfloat s = vload(s_row + c);
          vfloat a = vexp_nonpositive(s - lse_a()[i]);
          if (!full) a = vselect(mask.attended, a, vfloat{});
          vfloat ds = a * (vload(ds_row + c) - delta()[i]);
          if (live) {
            const vfloat log_pi = s - lse_p()[i], pi = vexp_nonpositive(log_pi);
            // pi (g_total - gbar), its w pi g part as vweighted_grad
            vfloat term;
            if constexpr (kStats) {
              term = pi * (stats_g(i, c, log_pi) - gbar()[i]);
              if (w()[i] != 0.f)
                term += w()[i] * vweighted_grad(p_.divergence, log_pi, pi, log_pi, vload(sr_row + c) - ref_lse_p()[i]);
            } else {
              const vfloat log_rho = vload(sr_row + c) - ref_lse_p()[i];
              term = w()[i] * (vweighted_grad(p_.divergence, log_pi, pi, log_pi, log_rho) - pi * gbar()[i]);
            }
            if (!full) term = vselect(mask.support, term, vfloat{});
            ds += term;
          }
          vstore(s_row + c, a);
          vstore(ds_row + c, ds);
        }
      }
  }

  KeyRowTurns& turns_;
  TileGrads slots_[kGradSlots];  // key tiles' dK / dV, in the scratch
  Floats q_, dout_, q_ref_;    // (H, BM, Dp) scaled, (H, BM, Dvp), (Hr, BM, Drp) scaled
  Floats k_, k_t_, v_t_;       // (Hkv, kBlockN, Dp), (Hkv, Dp, kBlockN), (Hkv, Dvp, kBlockN)
  Floats k_ref_t_, rows_tmp_;  // (Hrkv, Drp, kBlockN); a tile before transposition
  Floats s_, s_ref_, ds_;      // (H | Hr, BM, kBlockN), heads head_plane(BM) apart: scores, then a; dP, then dS
  Floats dq_;                  // (H, BM, Dp) unscaled dq accumulator
  Floats row_;                 // per-row scalars (see the accessors)
  Floats stats_w_;             // (heads | 1, BM, 1 + S): [w_E, w_0 ..] per row, with policy_stats
  std::vector<char> w_live_;   // (heads, BM): the row's divergence (or statistics) term is live
  bool need_div_ = false;      // some row's term is live
  bool need_ref_ = false;      // some row has w != 0: the reference's scores are needed
};

}  // namespace

int64_t backward_scratch_bytes(const AttentionKLParams& p) {
  check_host_call(p, /*backward=*/false);
  const Geometry geo(p);
  return scratch_bytes(p, geo);
}

void backward(const AttentionKLParams& p) {
  check_host_call(p, /*backward=*/true);
  const Geometry geo(p);
  require(p.scratch_bytes >= scratch_bytes(p, geo), "scratch_bytes is smaller than backward_scratch_bytes()");
  const Schedule schedule(p, geo, Schedule::Order::kByUnit);
  KeyRowTurns turns(p, geo, schedule);
  WorkQueue queue(schedule.size());
  float* scratch = reinterpret_cast<float*>(p.scratch);
  run_threads(worker_count(p, geo), [&](int t) {
    try {
      Backward kernel(p, geo, scratch + t * kGradSlots * tile_grad_floats(p, geo), turns);
      int64_t item;
      while (queue.pop(item)) kernel.run(schedule.block(item), turns.item(schedule, item));
    } catch (const KeyRowTurns::Abandoned&) {
      // another worker failed: its error is the one run_threads rethrows
    } catch (...) {
      turns.abandon();
      throw;
    }
  });
}

}  // namespace ral::cpu
