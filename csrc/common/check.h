// Re-checks, at every compiled entry point, what the kernels rely on. The Python layer has
// already checked everything with clear messages; this guards against direct misuse of ral._C.
#pragma once
#include <stdexcept>
#include <string>

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
  require(!p.causal || p.q_len <= p.k_len, "causal needs Sq <= Sk");
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
  // The sequence table's header (its entries live in device memory on CUDA: the kernels size their
  // grids from max_q_len / max_k_len and clip every entry to the tensors; the Python layer checks
  // the entries before the call).
  if (p.seqs) {
    require(p.num_seqs > 0, "a sequence table needs num_seqs > 0");
    require(p.max_q_len > 0 && p.max_q_len <= p.q_len && p.max_k_len > 0 && p.max_k_len <= p.k_len,
            "a sequence table needs 0 < max_q_len <= Sq and 0 < max_k_len <= Sk");
  }
  if (backward) {
    require(p.ddiv && p.delta && p.dq && p.dk, "ddiv, delta, dq and dk need addresses");
    require(!p.has_v || (p.dout && p.dv), "dout and dv need addresses when v is given");
    require(p.scratch_bytes == 0 || p.scratch, "scratch needs an address");
  }
}

}  // namespace ral
