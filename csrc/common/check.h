// Re-checks, at every compiled entry point, what the kernels rely on. The Python layer has
// already checked everything with clear messages; this guards against direct misuse of ral._C.
#pragma once
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/params.h"

namespace ral {

inline void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("ral._C: " + what);
}

inline void check_params(const AttentionKLParams& p, bool backward) {
  require(p.batch > 0 && p.heads > 0 && p.kv_heads > 0 && p.q_len > 0 && p.k_len > 0 && p.head_dim > 0,
          "B, H, Hkv, Sq, Sk and D must be positive");
  require(p.ref_heads > 0 && p.ref_kv_heads > 0 && p.ref_head_dim > 0, "Hr, Hrkv and Dr must be positive");
  require(p.heads % p.kv_heads == 0, "H must be a multiple of Hkv");
  require(p.ref_heads % p.ref_kv_heads == 0, "Hr must be a multiple of Hrkv");
  require(!p.heads_each || p.ref_heads == p.heads, "heads='each' needs Hr == H");
  require(p.seqs || !p.causal || p.q_len <= p.k_len, "causal needs Sq <= Sk");  // per unit with a table
  // The sequence table's header. Its entries live in device memory on CUDA, where the kernels size
  // their grids from max_q_len / max_k_len and clip every entry to the tensors; the Python layer
  // checks the entries before the call, and the CPU entry points again (check_seq_table).
  if (p.seqs) {
    require(p.num_seqs > 0, "a sequence table (seqs) needs num_seqs > 0, got " + std::to_string(p.num_seqs));
    require(p.max_q_len > 0 && p.max_q_len <= p.q_len, "a sequence table needs max_q_len in (0, Sq=" +
                                                         std::to_string(p.q_len) + "], got " + std::to_string(p.max_q_len));
    require(p.max_k_len > 0 && p.max_k_len <= p.k_len, "a sequence table needs max_k_len in (0, Sk=" +
                                                         std::to_string(p.k_len) + "], got " + std::to_string(p.max_k_len));
  } else {
    require(p.num_seqs == 0, "num_seqs must be 0 without a sequence table (seqs), got " + std::to_string(p.num_seqs));
  }
  require(p.dtype >= kFloat32 && p.dtype <= kBFloat16 && p.ref_dtype >= kFloat32 && p.ref_dtype <= kBFloat16,
          "dtype codes must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  require(p.divergence >= kJSD && p.divergence <= kReverseKL, "divergence code must be 0, 1 or 2");
  require(p.q.ptr && p.k.ptr && p.q_ref.ptr && p.k_ref.ptr, "q, k, q_ref and k_ref need addresses");
  require(!p.has_v || (p.v.ptr && p.v_head_dim > 0), "v needs an address and Dv > 0");
  require(!p.has_ref_stats || p.ref_stats_in.ptr, "ref_stats needs an address");
  require(!p.has_key_padding_mask || p.key_padding_mask.ptr, "key_padding_mask needs an address");
  require(!p.has_row_mask || p.row_mask.ptr, "row_mask needs an address");
  require(p.div && p.stats && p.gbar && p.cbar && (p.has_ref_stats || p.ref_stats_out),
          "div, stats, gbar, cbar (and ref_stats_out without ref_stats) need addresses");
  require(!p.has_v || p.out, "out needs an address when v is given");
  require(p.num_threads > 0, "num_threads must be positive");
  require(p.num_segments >= 0 && p.num_segments <= 8, "num_segments must be in 0..8, got " + std::to_string(p.num_segments));
  require(p.policy_stats || p.num_segments == 0, "num_segments > 0 needs policy_stats");
  require(!p.no_reference || (p.policy_stats && p.has_ref_stats), "no_reference needs policy_stats and ref_stats");
  require(p.num_segments == 0 || p.key_segments.ptr, "key_segments needs an address when num_segments > 0");
  if (p.policy_stats && !backward)
    require(p.entropy && (p.num_segments == 0 || p.mass) && (p.heads_each || p.cstats),
            "policy_stats needs entropy, mass (with segments) and cstats (\"mean\") addresses");
  if (p.policy_stats && backward) require(p.stats_w, "policy_stats needs stats_w in the backward");
  if (backward) {
    require(p.ddiv && p.delta && p.dq && p.dk, "ddiv, delta, dq and dk need addresses");
    require(!p.has_v || (p.dout && p.dv), "dout and dv need addresses when v is given");
    require(p.scratch_bytes == 0 || p.scratch, "scratch needs an address");
  }
}

// The sequence table, entry by entry, when it is in host memory (the CPU backend; a device
// table is the device code's to check). Every unit lies inside the tensors' extents
// (batch < B, q_start + q_len <= Sq, k_start + k_len <= Sk, nothing negative), within
// max_q_len / max_k_len, with q_pos + q_len <= k_len when causal, and no two units share a row.
// Call after check_params.
inline void check_seq_table(const AttentionKLParams& p) {
  if (!p.seqs) return;
  const SeqRange* table = reinterpret_cast<const SeqRange*>(p.seqs);
  auto entry = [](int64_t s, const SeqRange& u) {
    return "seqs[" + std::to_string(s) + "] = {batch " + std::to_string(u.batch) + ", q_start " +
           std::to_string(u.q_start) + ", q_len " + std::to_string(u.q_len) + ", k_start " +
           std::to_string(u.k_start) + ", k_len " + std::to_string(u.k_len) + ", q_pos " +
           std::to_string(u.q_pos) + "}";
  };
  std::vector<int64_t> order;  // units with rows, to check that no two share one
  for (int64_t s = 0; s < p.num_seqs; ++s) {
    const SeqRange& u = table[s];
    const int64_t q_end = int64_t{u.q_start} + u.q_len, k_end = int64_t{u.k_start} + u.k_len;
    if (u.batch < 0 || u.batch >= p.batch)
      require(false, entry(s, u) + ": batch must be in [0, B=" + std::to_string(p.batch) + ")");
    if (u.q_start < 0 || u.q_len < 0 || u.k_start < 0 || u.k_len < 0)
      require(false, entry(s, u) + ": starts and lengths must be >= 0");
    if (q_end > p.q_len || k_end > p.k_len)
      require(false, entry(s, u) + ": rows past Sq=" + std::to_string(p.q_len) + " or keys past Sk=" +
                         std::to_string(p.k_len));
    if (u.q_len > p.max_q_len || u.k_len > p.max_k_len)
      require(false, entry(s, u) + ": q_len / k_len above max_q_len=" + std::to_string(p.max_q_len) +
                         " / max_k_len=" + std::to_string(p.max_k_len));
    if (p.causal && int64_t{u.q_pos} + u.q_len > u.k_len)
      require(false, entry(s, u) + ": causal needs q_pos + q_len <= k_len");
    if (u.q_len > 0) order.push_back(s);
  }
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return table[a].batch != table[b].batch ? table[a].batch < table[b].batch : table[a].q_start < table[b].q_start;
  });
  for (size_t n = 1; n < order.size(); ++n) {
    const SeqRange& prev = table[order[n - 1]];
    const SeqRange& next = table[order[n]];
    if (prev.batch == next.batch && int64_t{prev.q_start} + prev.q_len > next.q_start)
      require(false, entry(order[n - 1], prev) + " and " + entry(order[n], next) + " share query rows");
  }
}

// The CPU entry points' check: the params, then the table (in host memory there).
inline void check_host_call(const AttentionKLParams& p, bool backward) {
  check_params(p, backward);
  check_seq_table(p);
}

}  // namespace ral
