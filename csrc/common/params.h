// The one description of a call that the Python layer hands to every compiled kernel.
//
// The Python layer (ral/_compiled.py) checks every tensor, allocates every output and scratch
// buffer with torch, and fills this struct with raw device/host addresses, shapes and element
// strides. Kernels never allocate. Entry points re-check what they rely on (check_params).
#pragma once
#include <cstdint>

namespace ral {

enum DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum Divergence : int32_t { kJSD = 0, kKL = 1, kReverseKL = 2 };

// A strided view: element (i0, i1, i2, i3) lives at ptr + sum(i_n * stride[n]) elements.
// The last dimension of q, k, v, q_ref, k_ref, out, dout is contiguous (stride 1).
struct View {
  uintptr_t ptr = 0;
  int64_t stride[4] = {0, 0, 0, 0};
};

// One work unit of a call with a sequence table (see AttentionKLParams::seqs). 32 bytes, int32.
struct SeqRange {
  int32_t batch = 0;
  int32_t q_start = 0, q_len = 0;
  int32_t k_start = 0, k_len = 0;
  int32_t q_pos = 0;  // key position of row 0, counted from k_start
  int32_t pad[2] = {0, 0};
};
static_assert(sizeof(SeqRange) == 32, "SeqRange is read as int32[8] by the Python layer and Triton");

struct AttentionKLParams {
  // ---- shapes -------------------------------------------------------------------------------
  int64_t batch = 0;          // B
  int64_t heads = 0;          // H     (query heads of the current model)
  int64_t kv_heads = 0;       // Hkv   (H % Hkv == 0; query head h reads kv head h / (H / Hkv))
  int64_t q_len = 0;          // Sq
  int64_t k_len = 0;          // Sk    (Sq <= Sk when causal; row i sits at key position Sk - Sq + i)
  int64_t head_dim = 0;       // D
  int64_t v_head_dim = 0;     // Dv    (0 when there is no v)
  int64_t ref_heads = 0;      // Hr
  int64_t ref_kv_heads = 0;   // Hrkv
  int64_t ref_head_dim = 0;   // Dr
  // ---- options ------------------------------------------------------------------------------
  int32_t dtype = kFloat32;      // of q, k, v, out, dout
  int32_t ref_dtype = kFloat32;  // of q_ref, k_ref
  int32_t divergence = kJSD;
  bool heads_each = false;       // false: one policy per row from the head mean ("mean")
  bool exclude_self = true;
  bool causal = true;
  bool has_v = false;
  bool has_ref_stats = false;    // true: ref_stats_in holds the reference's [lse_A, lse_P]
  bool has_key_padding_mask = false;
  bool has_row_mask = false;
  float scale = 1.f;
  float ref_scale = 1.f;
  int32_t num_threads = 1;       // CPU only
  // ---- sequences (packed varlen batches and context-parallel chunks) -------------------------
  // seqs == 0 (dense): work unit b is batch b, with rows 0..q_len, keys 0..k_len and row i at key
  // position k_len - q_len + i.
  // seqs != 0: the call has num_seqs work units, one SeqRange each (device memory on CUDA). Unit s
  // reads batch seqs[s].batch, rows seqs[s].q_start .. q_start + q_len - 1 and keys
  // seqs[s].k_start .. k_start + k_len - 1 of the tensors above, whose extents stay (B, Sq, Sk):
  // for a packed batch B = 1 and Sq, Sk are the packed totals Tq, Tk. Row i of the unit sits at key
  // position seqs[s].q_pos + i (key positions count from k_start); causal masking and
  // exclude_self use that position. Every row-indexed tensor (q, q_ref, out, div, stats, gbar,
  // cbar, delta, dq, ref_stats, row_mask) is addressed at (batch, q_start + i) and every
  // key-indexed one (k, v, k_ref, dk, dv, key_padding_mask) at (batch, k_start + j), so a dense
  // call is the table {b, 0, Sq, 0, Sk, Sk - Sq} for b < B. Units never overlap in their rows;
  // they may share keys (context parallel: a rank's two chunks read all keys), so the backward's
  // dk / dv must add, never store. max_q_len / max_k_len bound every unit's q_len / k_len
  // (grid sizes).
  uintptr_t seqs = 0;            // const SeqRange*, num_seqs entries
  int64_t num_seqs = 0;
  int64_t max_q_len = 0;
  int64_t max_k_len = 0;
  // ---- inputs (strided) ---------------------------------------------------------------------
  View q, k, v, q_ref, k_ref;    // (B,H,Sq,D) (B,Hkv,Sk,D) (B,Hkv,Sk,Dv) (B,Hr,Sq,Dr) (B,Hrkv,Sk,Dr)
  View ref_stats_in;             // (B,Hr,Sq,2) fp32, when has_ref_stats
  View key_padding_mask;         // (B,Sk) uint8/bool, nonzero = real key   (uses stride[0], stride[1])
  View row_mask;                 // (B,Sq) uint8/bool, zero = row gets div 0 (uses stride[0], stride[1])
  // ---- forward outputs (contiguous, allocated by Python) ------------------------------------
  uintptr_t out = 0;             // (B,H,Sq,Dv) in `dtype`, when has_v
  uintptr_t div = 0;             // (B,Sq) "mean" | (B,H,Sq) "each", fp32
  uintptr_t stats = 0;           // (B,H,Sq,2) fp32: [lse_A, lse_P] per head
  uintptr_t ref_stats_out = 0;   // (B,Hr,Sq,2) fp32, written when !has_ref_stats
  uintptr_t gbar = 0;            // (B,Sq) "mean" | (B,H,Sq) "each", fp32: sum_P pi_j g_j
  uintptr_t cbar = 0;            // (B,H,Sq) fp32: c_h of docs/design.md, "The math" (0 for "each")
  // Rows with row_mask False or an empty policy support get div = gbar = cbar = 0 (written).
  // ---- backward (contiguous, allocated by Python) -------------------------------------------
  // The backward reads q, k, v, q_ref, k_ref, stats, gbar and the reference statistics
  // (ref_stats_in when has_ref_stats, else ref_stats_out) again. Per head h and row i:
  //   dS[h,i,k] = a[h,i,k] * (dP[h,i,k] - delta[h,i])  +  [k in P(i)] * w_i * dS_div[h,i,k]
  //   dS_div = (a[h,i,k] / H) * G_k  ("mean"),  a[h,i,k] * G^h_k = pi[h,i,k] * (g - gbar)  ("each")
  // where the Python layer already folded the c_h term into delta (delta += w * c_h / H).
  uintptr_t dout = 0;            // (B,H,Sq,Dv) in `dtype`, when has_v
  uintptr_t ddiv = 0;            // w: like div, fp32; 0 on rows with row_mask False or empty P.
                                 //    Kernels skip a row's divergence term where w == 0 (select, not multiply).
  uintptr_t delta = 0;           // (B,H,Sq) fp32: rowsum(dout * out) + w * c_h / H
  uintptr_t dq = 0;              // (B,H,Sq,D) fp32
  uintptr_t dk = 0;              // (B,Hkv,Sk,D) fp32, zero-filled by Python
  uintptr_t dv = 0;              // (B,Hkv,Sk,Dv) fp32, zero-filled by Python, when has_v
  uintptr_t scratch = 0;         // backend-specific bounded scratch (documented by the backend)
  int64_t scratch_bytes = 0;
  // ---- statistics of the current policy (docs/design.md, "Attention statistics") ------------
  // Forward, when policy_stats: per live row entropy = -sum_P pi log pi and, when num_segments > 0,
  // mass[s] = sum_{P, seg(j) = s} pi_j; for "mean" also, per head, cstats[h] = the c_h of
  // docs/design.md, "Gradient" for g_j = -log pi_j (column 0) and g_j = [seg(j) = s] (column 1 + s):
  // (u_h - stat * Z_h) / Z, u_h = sum_P a_hj g_j. Dead rows (row_mask False, empty P) get 0.
  // Backward, when policy_stats: stats_w holds per row [w_E, w_0 .. w_{S-1}] (0 on dead rows) and
  // gbar holds gbar_total = w gbar + w_E entropy + sum_s w_s mass_s; the kernel forms
  //   g_total_j = w g_j + w_E (-log pi_j) + w_seg(j),  dS_div from (g_total - gbar_total) with weight 1
  // (the w of ddiv is already inside g_total), and the row's term is live when any weight is nonzero.
  bool policy_stats = false;
  int32_t num_segments = 0;      // S, 0..8 (0: entropy only)
  View key_segments;             // (B,Sk) int32 ids in [0, S), when num_segments > 0 (stride[0], stride[1])
  uintptr_t entropy = 0;         // (B,Sq) "mean" | (B,H,Sq) "each", fp32
  uintptr_t mass = 0;            // (B,Sq,S) "mean" | (B,H,Sq,S) "each", fp32, when num_segments > 0
  uintptr_t cstats = 0;          // (B,H,Sq,1+S) fp32, "mean"
  uintptr_t stats_w = 0;         // backward: (B,Sq,1+S) "mean" | (B,H,Sq,1+S) "each", fp32
  // Forward, with policy_stats: no reference model (ral.ops.attention_stats). q_ref / k_ref /
  // ref_stats_in are placeholders that are never swept; div, gbar and cbar are written 0, and
  // the backward gets w = 0 (so it never reads the reference either).
  bool no_reference = false;
};

}  // namespace ral
