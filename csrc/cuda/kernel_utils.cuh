// CUDA-only building blocks of the attention_kl kernels: mma.sync m16n8k16 (fp16/bf16 in, fp32
// accumulate), ldmatrix, cp.async, tile loads into shared memory, the per-element masks, and the
// pieces of the policy statistics shared by the forward and the backward (key segments, row sums).
//
// Conventions used by every kernel here (sm_80+):
//   * a block has 4 warps (128 threads) and owns a tile of kBlockM = 64 query rows; warp w owns
//     rows 16w .. 16w+15 of the tile; a key tile has kBlockN = 64 keys.
//   * an S fragment float s[8][4] is the warp's 16 x 64 tile in mma C layout: with lane = 4g + t,
//     s[nb][0..1] = rows g,   keys 8nb + 2t + {0,1};  s[nb][2..3] = row g+8, same keys.
//   * shared tiles are row-major [64][ld] in the input dtype, ld = padded width + 8 halves (16 B),
//     which makes every ldmatrix of 8 rows x 16 B conflict-free.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/math.h"
#include "common/params.h"
#include "cuda/launch.cuh"

namespace ral::cuda {

constexpr int kBlockM = 64;   // query rows per block
constexpr int kBlockN = 64;   // keys per key tile
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxHeadDim = 256;

__host__ __device__ constexpr int round_up16(int x) { return (x + 15) / 16 * 16; }
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- dtype traits -------------------------------------------------------------------------------
template <typename T> struct Dtype;
template <> struct Dtype<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
};
template <> struct Dtype<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
};

// c (16x8 fp32) += a (16x16, row) * b (16x8, col)
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(RAL_CUDA_EMULATE)  // tests/cuda_emu: the PTX ops of this file run on the CPU emulator
  ral_emu::mma_m16n8k16(std::is_same_v<T, __half> ? 1 : 2, c, a, b0, b1);
#else
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lanes 8m..8m+7 give the row addresses of matrix m, and lane 4g+t gets
// (row g, cols 2t, 2t+1) of matrix m in r[m] (.trans: (rows 2t, 2t+1, col g)).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
#if defined(RAL_CUDA_EMULATE)
  ral_emu::ldmatrix_x4(r, p, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
#if defined(RAL_CUDA_EMULATE)
  ral_emu::ldmatrix_x4(r, p, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
#endif
}

// 16-byte global -> shared copy; zero-fills the destination when !valid (nothing is read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#if defined(RAL_CUDA_EMULATE)
  ral_emu::cp_async16(dst, src, valid ? 16 : 0);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
#endif
}
#if defined(RAL_CUDA_EMULATE)
__device__ __forceinline__ void cp_async_commit() { ral_emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { ral_emu::cp_async_wait(N); }
#else
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
#endif

__device__ __forceinline__ float fexp(float x) { return exp2f(x * kLog2e); }

// sum / max over the 4 lanes of a quad (the lanes holding one row of an mma C fragment)
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// ---- work units (params.h: the sequence table) -------------------------------------------------
// What one block works on, in tensor coordinates: batch b, rows [q_begin, q_end) and keys
// [k_begin, k_end) of the (B, H, Sq, ...) / (B, Hkv, Sk, ...) tensors, and tensor row r at key
// position r + pos_off (a tensor key index, so that it compares with keys k_begin.. directly).
// Row-indexed outputs keep the tensors' extents: index them with p.q_len (Sq), p.k_len (Sk).
//
// Unit<false> (no table): unit u is batch u with rows 0..Sq, keys 0..Sk and pos_off = Sk - Sq, read
// from p (constant bank) and blockIdx where they are used, so that the dense kernels compile as they
// did before the table (same registers for every kernel, ptxas -v).
// Unit<true>: entry u of the table p.seqs (SeqRange: row q_start + i sits at key position
// k_start + q_pos + i), held in int32 registers. The table is trusted for the grid (max_q_len /
// max_k_len), not for addresses: an entry reaching outside the tensors (bad batch, negative start
// or length) is empty and its row / key ranges are clipped to Sq / Sk, so a bad table never reads
// or writes out of bounds (the Python layer rejects such tables before the call). The backward
// takes its batch index from the grid instead (attention_kl_bwd.cuh).
template <bool kSeqs>
struct Unit;

template <>
struct Unit<false> {
  const AttentionKLParams& p;
  int64_t b;
  __device__ __forceinline__ int64_t batch() const { return b; }
  __device__ __forceinline__ int64_t q_begin() const { return 0; }
  __device__ __forceinline__ int64_t q_end() const { return p.q_len; }
  __device__ __forceinline__ int64_t k_begin() const { return 0; }
  __device__ __forceinline__ int64_t k_end() const { return p.k_len; }
  __device__ __forceinline__ int64_t pos_off() const { return p.k_len - p.q_len; }
};

template <>
struct Unit<true> {  // int32, as in SeqRange: registers are scarce in the backward
  int32_t b, qb, qe, kb, ke, po;
  __device__ __forceinline__ int64_t batch() const { return b; }
  __device__ __forceinline__ int64_t q_begin() const { return qb; }
  __device__ __forceinline__ int64_t q_end() const { return qe; }
  __device__ __forceinline__ int64_t k_begin() const { return kb; }
  __device__ __forceinline__ int64_t k_end() const { return ke; }
  __device__ __forceinline__ int64_t pos_off() const { return po; }
};

// The unit of a block: batch element u, or entry u of the sequence table.
template <bool kSeqs>
__device__ __forceinline__ Unit<kSeqs> work_unit(const AttentionKLParams& p, int64_t u) {
  if constexpr (!kSeqs) {
    return Unit<false>{p, u};
  } else {
    const SeqRange s = reinterpret_cast<const SeqRange*>(p.seqs)[u];
    const bool ok = s.batch >= 0 && s.batch < p.batch && s.q_start >= 0 && s.q_len >= 0 && s.k_start >= 0 &&
                    s.k_len >= 0;
    const int64_t q_begin = s.q_start, k_begin = s.k_start;
    const int64_t q_end = ok ? min64(min64(q_begin + s.q_len, p.q_len), INT32_MAX) : q_begin;  // <= q_begin: no rows
    const int64_t k_end = ok ? min64(min64(k_begin + s.k_len, p.k_len), INT32_MAX) : k_begin;
    return Unit<true>{ok ? s.batch : 0, s.q_start, int32_t(q_end), s.k_start,
                      int32_t(k_end < k_begin ? k_begin : k_end), int32_t(k_begin + s.q_pos - q_begin)};
  }
}

// ---- tile loads -----------------------------------------------------------------------------------
// Rows 0..63 of a strided global tile -> shared s[64][ld]: row r (r < rows) comes from
// g + r * row_stride, columns [0, cols) (cols % 8 == 0); columns [cols, cols_pad) and rows >= rows
// are zero-filled. `vec`: g and row_stride allow 16-byte cp.async; otherwise plain loads (synchronous).
template <typename T>
__device__ __forceinline__ void load_tile(T* s, int ld, const T* g, int64_t row_stride, int rows, int cols,
                                          int cols_pad, bool vec) {
  const int chunks = cols_pad / 8;
  for (int idx = threadIdx.x; idx < kBlockM * chunks; idx += kThreads) {
    const int r = idx / chunks, c = (idx - r * chunks) * 8;
    const bool valid = r < rows && c < cols;
    T* dst = s + r * ld + c;
    const T* src = valid ? g + r * row_stride + c : g;
    if (vec) {
      cp_async16(dst, src, valid);
    } else {
      uint16_t v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = valid ? reinterpret_cast<const uint16_t*>(src)[e] : uint16_t(0);
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(v);
    }
  }
}

// The Q and K tiles of one score step -> shared sq, sk ([64][ld]): q_ref, k_ref (`ref`) or q, k of
// head `head` of the unit's batch (K: the head's GQA kv head), query rows q0.. (up to the unit's
// end), keys j0.. (likewise); columns padded to dr16 (ref) or d16. `vec`: VecBits. Returns the kv head.
template <typename T, bool kSeqs>
__device__ __forceinline__ int64_t load_qk_tiles(const AttentionKLParams& p, const Unit<kSeqs>& u, bool ref,
                                                 int64_t head, int64_t q0, int64_t j0, T* sq, T* sk, int ld, int d16,
                                                 int dr16, int vec) {
  const auto b = u.batch();
  const View& qv = ref ? p.q_ref : p.q;
  const View& kv = ref ? p.k_ref : p.k;
  const int64_t kvh = ref ? head / (p.ref_heads / p.ref_kv_heads) : head / (p.heads / p.kv_heads);
  const int dim = int(ref ? p.ref_head_dim : p.head_dim), dim16 = ref ? dr16 : d16;
  const T* gq = reinterpret_cast<const T*>(qv.ptr) + b * qv.stride[0] + head * qv.stride[1] + q0 * qv.stride[2];
  const T* gk = reinterpret_cast<const T*>(kv.ptr) + b * kv.stride[0] + kvh * kv.stride[1] + j0 * kv.stride[2];
  load_tile(sq, ld, gq, qv.stride[2], int(min64(u.q_end() - q0, 64)), dim, dim16, vec & (ref ? kVecQRef : kVecQ));
  load_tile(sk, ld, gk, kv.stride[2], int(min64(u.k_end() - j0, 64)), dim, dim16, vec & (ref ? kVecKRef : kVecK));
  return kvh;
}

// Whether a view's base and row strides allow 16-byte vector loads of rows (last dim contiguous).
inline bool view_vec_ok(const View& v, int64_t elem_bytes) {
  if (v.ptr % 16) return false;
  for (int d = 0; d < 3; ++d)
    if ((v.stride[d] * elem_bytes) % 16) return false;
  return true;
}

// ---- S = A * B^T for one warp ---------------------------------------------------------------------
// sA: [64][ld] rows of the query side, sB: [64][ld] rows of the key side; ksteps = padded dim / 16.
// acc = the warp's 16 x 64 tile (rows 16*warp ..), in C layout. kUnroll: 0 lets the compiler unroll
// the k loop as it likes; the backward asks for 2 (a deeper unroll there costs spills).
template <typename T>
__device__ __forceinline__ void gemm_abt_kstep(float (&acc)[8][4], const T* pa, const T* pb, int ld) {
  uint32_t a[4];
  ldmatrix_x4(a, pa);
#pragma unroll
  for (int np = 0; np < 4; ++np) {
    uint32_t b[4];
    ldmatrix_x4(b, pb + np * 16 * ld);
    mma16816<T>(acc[2 * np], a, b[0], b[1]);
    mma16816<T>(acc[2 * np + 1], a, b[2], b[3]);
  }
}

template <typename T, int kUnroll = 0>
__device__ __forceinline__ void gemm_abt(float (&acc)[8][4], const T* sA, const T* sB, int ld, int ksteps,
                                         int warp, int lane) {
#pragma unroll
  for (int nb = 0; nb < 8; ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.f;
  const T* pa = sA + (warp * 16 + (lane & 15)) * ld + (lane >> 4) * 8;
  const T* pb = sB + ((lane & 7) + ((lane >> 4) << 3)) * ld + ((lane >> 3) & 1) * 8;
  if constexpr (kUnroll == 0) {
    for (int ks = 0; ks < ksteps; ++ks) gemm_abt_kstep<T>(acc, pa + ks * 16, pb + ks * 16, ld);
  } else {
#pragma unroll kUnroll
    for (int ks = 0; ks < ksteps; ++ks) gemm_abt_kstep<T>(acc, pa + ks * 16, pb + ks * 16, ld);
  }
}

// Half of gemm_abt: keys 32 hf .. 32 hf + 31 of the tile, acc[nb] = acc's n-block 4 hf + nb (used
// where the full 16 x 64 accumulator would not fit next to other per-element state).
template <typename T>
__device__ __forceinline__ void gemm_abt_half(float (&acc)[4][4], const T* sA, const T* sB, int ld, int ksteps,
                                              int warp, int lane, int hf) {
#pragma unroll
  for (int nb = 0; nb < 4; ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.f;
  const T* pa = sA + (warp * 16 + (lane & 15)) * ld + (lane >> 4) * 8;
  const T* pb = sB + (32 * hf + (lane & 7) + ((lane >> 4) << 3)) * ld + ((lane >> 3) & 1) * 8;
  for (int ks = 0; ks < ksteps; ++ks) {
    uint32_t a[4];
    ldmatrix_x4(a, pa + ks * 16);
#pragma unroll
    for (int np = 0; np < 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, pb + np * 16 * ld + ks * 16);
      mma16816<T>(acc[2 * np], a, b[0], b[1]);
      mma16816<T>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// A fragment (16 x 16, k = keys 16kk..16kk+15) from a C-layout fp32 tile held in registers.
template <typename T>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&x)[8][4], int kk) {
  a[0] = Dtype<T>::pack(x[2 * kk][0], x[2 * kk][1]);
  a[1] = Dtype<T>::pack(x[2 * kk][2], x[2 * kk][3]);
  a[2] = Dtype<T>::pack(x[2 * kk + 1][0], x[2 * kk + 1][1]);
  a[3] = Dtype<T>::pack(x[2 * kk + 1][2], x[2 * kk + 1][3]);
}

// acc[16 x 64 cols c0..c0+63] += X (warp's 16 rows x 64 keys, registers) * sV[keys][c0 ..]
// (sV row-major [64 keys][ld]); column pairs at or beyond `cols16` (a multiple of 16) are skipped.
template <typename T>
__device__ __forceinline__ void gemm_c_v(float (&acc)[8][4], const float (&x)[8][4], const T* sV, int ld, int c0,
                                         int cols16, int lane) {
  const T* pv = sV + ((lane & 7) + (((lane >> 3) & 1) << 3)) * ld + c0 + (lane >> 4) * 8;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    uint32_t a[4];
    c_to_a<T>(a, x, kk);
#pragma unroll
    for (int dp = 0; dp < 4; ++dp) {
      if (c0 + dp * 16 < cols16) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, pv + kk * 16 * ld + dp * 16);
        mma16816<T>(acc[2 * dp], a, b[0], b[1]);
        mma16816<T>(acc[2 * dp + 1], a, b[2], b[3]);
      }
    }
  }
}

// acc[16 keys (16*warp ..) x 64 cols c0 ..] += sX^T * sY: sX row-major [64 queries][ldx] (keys in
// columns), sY row-major [64 queries][ldy]; the sum runs over the 64 queries.
template <typename T>
__device__ __forceinline__ void gemm_at_b(float (&acc)[8][4], const T* sX, int ldx, const T* sY, int ldy, int c0,
                                          int cols16, int warp, int lane) {
  const T* px = sX + ((lane & 7) + ((lane >> 4) << 3)) * ldx + warp * 16 + ((lane >> 3) & 1) * 8;
  const T* py = sY + ((lane & 7) + (((lane >> 3) & 1) << 3)) * ldy + c0 + (lane >> 4) * 8;
#pragma unroll
  for (int kq = 0; kq < 4; ++kq) {
    uint32_t a[4];
    ldmatrix_x4_trans(a, px + kq * 16 * ldx);
#pragma unroll
    for (int dp = 0; dp < 4; ++dp) {
      if (c0 + dp * 16 < cols16) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, py + kq * 16 * ldy + dp * 16);
        mma16816<T>(acc[2 * dp], a, b[0], b[1]);
        mma16816<T>(acc[2 * dp + 1], a, b[2], b[3]);
      }
    }
  }
}

__device__ __forceinline__ void zero(float (&acc)[8][4]) {
#pragma unroll
  for (int nb = 0; nb < 8; ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.f;
}

// ---- masks ----------------------------------------------------------------------------------------
// Per thread: the 16 keys it holds in a key tile (key = j0 + 8nb + 2t + e, bit 2nb + e) that exist
// and are not padding.
template <bool kSeqs>
__device__ __forceinline__ uint32_t key_bits(const AttentionKLParams& p, const Unit<kSeqs>& u, int64_t j0, int lane) {
  const auto b = u.batch();
  const int t = lane & 3;
  const uint8_t* kpm = reinterpret_cast<const uint8_t*>(p.key_padding_mask.ptr);
  uint32_t bits = 0;
#pragma unroll
  for (int nb = 0; nb < 8; ++nb) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int64_t key = j0 + nb * 8 + 2 * t + e;
      bool ok = key < u.k_end();
      if (ok && p.has_key_padding_mask)
        ok = kpm[b * p.key_padding_mask.stride[0] + key * p.key_padding_mask.stride[1]] != 0;
      bits |= uint32_t(ok) << (2 * nb + e);
    }
  }
  return bits;
}

// Per row: its key position (dense: Sk - Sq + i; a tensor key index) and whether it exists.
struct RowPos {
  int64_t pos[2];
  bool valid[2];
};

template <bool kSeqs>
__device__ __forceinline__ RowPos row_pos(const Unit<kSeqs>& u, int64_t q0, int warp, int lane) {
  RowPos r;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t row = q0 + warp * 16 + (lane >> 2) + 8 * h;
    r.pos[h] = u.pos_off() + row;
    r.valid[h] = row < u.q_end();
  }
  return r;
}

// Element masks of a key tile: bit (4nb + e) for element s[nb][e] (row half e >> 1).
struct TileMask {
  uint32_t a;  // in A(i): attended
  uint32_t p;  // in P(i): policy support
};

__device__ __forceinline__ TileMask tile_mask(const AttentionKLParams& p, const RowPos& rp, uint32_t kbits,
                                              int64_t j0, int lane) {
  const int t = lane & 3;
  int rel[2];  // row position relative to the tile's first key, clamped to [-1, 64]
#pragma unroll
  for (int h = 0; h < 2; ++h) rel[h] = int(rp.pos[h] - j0 < -1 ? -1 : rp.pos[h] - j0 > 64 ? 64 : rp.pos[h] - j0);
  TileMask m{0u, 0u};
#pragma unroll
  for (int nb = 0; nb < 8; ++nb) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int h = e >> 1, key = nb * 8 + 2 * t + (e & 1);
      const bool in_a = ((kbits >> (2 * nb + (e & 1))) & 1u) && rp.valid[h] && (!p.causal || key <= rel[h]);
      const bool in_p = in_a && !(p.exclude_self && key == rel[h]);
      m.a |= uint32_t(in_a) << (4 * nb + e);
      m.p |= uint32_t(in_p) << (4 * nb + e);
    }
  }
  return m;
}

// Key tiles [j_begin, j_end) that a query tile starting at row q0 reads, split z of nsplit; tile j
// holds keys u.k_begin() + 64 j ...
template <bool kSeqs>
__device__ __forceinline__ void key_tile_range(const AttentionKLParams& p, const Unit<kSeqs>& u, int64_t q0, int z,
                                               int nsplit, int64_t& j_begin, int64_t& j_end) {
  int64_t n = (u.k_end() - u.k_begin() + kBlockN - 1) / kBlockN;
  if (p.causal) {  // the key (counted from k_begin) of the tile's last row
    const int64_t last_key = u.pos_off() - u.k_begin() + min64(q0 + kBlockM, u.q_end()) - 1;
    n = last_key < 0 ? 0 : min64(n, last_key / kBlockN + 1);
  }
  const int64_t per = (n + nsplit - 1) / nsplit;
  j_begin = min64(n, per * z);
  j_end = min64(n, j_begin + per);
}

// logsumexp_h (lse_P - lse_A) over the heads of a stats tensor: log(H Z) for "mean" (H Z_h summed),
// -inf for an empty P. `st` points at head 0's lse_A of the row; head h's pair is at st + h * s_head,
// its lse_P at offset `p_off`. lse_P is -inf exactly when P is empty (pass 1 derives emptiness from the
// masks, never from the values), so any other non-finite term (NaN / inf inputs) makes the result NaN:
// the row stays live and its NaN reaches div and the gradients (docs/design.md, "Bad input").
__device__ __forceinline__ float log_hz(const float* st, int64_t s_head, int64_t p_off, int64_t n_heads) {
  float m = neg_inf(), l = 0.f;
  bool bad = false;
  for (int64_t h = 0; h < n_heads; ++h) {
    const float lse_a = st[h * s_head], lse_p = st[h * s_head + p_off];
    if (lse_p == neg_inf()) continue;
    const float x = lse_p - lse_a;
    if (!isfinite(x)) bad = true;
    else lse_push(m, l, x);
  }
  return bad ? __int_as_float(0x7fc00000) : lse_value(m, l);
}

// exp(lw) * g_j where pi may underflow: `gl` holds g_j (jsd, kl) or log(rho_j / pi_j) (reverse_kl,
// whose g = -rho/pi would overflow), so that the product is -exp(lw + gl) there.
__device__ __forceinline__ float weighted_g(int32_t kind, float lw, float gl) {
  return kind == kReverseKL ? -fexp(lw + gl) : fexp(lw) * gl;
}
// What weighted_g expects in `gl`, from log pi, log rho and g.
__device__ __forceinline__ float g_or_log_ratio(int32_t kind, float lpi, float lrho, float g) {
  return kind == kReverseKL ? lrho - lpi : g;
}

// ---- statistics of the current policy (params.h: policy_stats) --------------------------------------
constexpr int kMaxSegments = 8;
constexpr int kNoSegment = 15;  // the id of a key past the unit's end, or of a call without segments
constexpr int kStatSumsSmem = 2 * (1 + kMaxSegments) * kThreads * 4;  // StatSums::add_to's thread-private sums

// The segment ids of the 16 keys a thread holds in a key tile (key j0 + 8nb + 2t + e, as key_bits),
// 4 bits each: key (nb, e) in bits 4 (2 (nb & 3) + e) of word nb >> 2.
struct KeySegs {
  uint32_t w[2];
  __device__ __forceinline__ int operator()(int nb, int e) const {
    return int((w[nb >> 2] >> (4 * (2 * (nb & 3) + e))) & 15u);
  }
};

// Ids outside [0, S) (checked by the Python layer and check_params' callers) count in no segment.
template <bool kSeqs>
__device__ __forceinline__ KeySegs key_segs(const AttentionKLParams& p, const Unit<kSeqs>& u, int64_t j0, int lane) {
  KeySegs s{{~0u, ~0u}};
  if (p.num_segments == 0) return s;
  const int32_t* ids = reinterpret_cast<const int32_t*>(p.key_segments.ptr) + u.batch() * p.key_segments.stride[0];
  const int t = lane & 3;
#pragma unroll
  for (int nb = 0; nb < 8; ++nb)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int64_t key = j0 + nb * 8 + 2 * t + e;
      const int32_t id = key < u.k_end() ? ids[key * p.key_segments.stride[1]] : kNoSegment;
      const uint32_t bits = id >= 0 && id < p.num_segments ? uint32_t(id) : uint32_t(kNoSegment);
      const int shift = 4 * (2 * (nb & 3) + e);
      s.w[nb >> 2] = (s.w[nb >> 2] & ~(15u << shift)) | (bits << shift);
    }
  return s;
}

// Per-thread sums over the elements of both row halves r: v[r][0] = sum c (-log pi), v[r][1 + s] =
// sum over keys of segment s of c. With c = pi: the row's entropy and masses; with c = a_hj / (H Z):
// u^E_h and u^s_h / (H Z) of the statistics' c_h (params.h, cstats).
struct StatSums {
  float v[2][1 + kMaxSegments];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int s = 0; s <= kMaxSegments; ++s) v[r][s] = 0.f;
  }
  __device__ __forceinline__ void add(int r, float c, float log_pi, int seg) {
    v[r][0] -= c * log_pi;
#pragma unroll
    for (int s = 0; s < kMaxSegments; ++s)
      if (seg == s) v[r][1 + s] += c;
  }
  // Thread-private running sums in shared memory, priv[k * kThreads] for k < 2 (1 + kMaxSegments):
  // priv += v (the first n sums of each row half), and v = priv.
  __device__ __forceinline__ void add_to(float* priv, int n) const {
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int s = 0; s <= kMaxSegments; ++s)
        if (s < n) priv[(r * (1 + kMaxSegments) + s) * kThreads] += v[r][s];
  }
  __device__ __forceinline__ void load(const float* priv, int n) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int s = 0; s <= kMaxSegments; ++s) v[r][s] = s < n ? priv[(r * (1 + kMaxSegments) + s) * kThreads] : 0.f;
  }
  // Sums the quad's lanes (every lane of the warp calls this), then lane t == 0 adds the n = 1 + S
  // sums of each row half r with live[r] to dst(r, k), k = 0 .. n - 1 (float*).
  template <typename Dst>
  __device__ __forceinline__ void flush(int n, const bool (&live)[2], Dst&& dst, int lane) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int s = 0; s <= kMaxSegments; ++s)
        if (s < n) v[r][s] = quad_sum(v[r][s]);
    if ((lane & 3) != 0) return;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (!live[r]) continue;
#pragma unroll
      for (int s = 0; s <= kMaxSegments; ++s)
        if (s < n) atomicAdd(dst(r, s), v[r][s]);
    }
  }
};

// The statistics' part of g_total (params.h): w_E (-log pi) + w_seg of one element, from its row's
// weights sw = [w_E, w_0 .. w_{S-1}]; seg_weight: w_seg alone.
__device__ __forceinline__ float seg_weight(const float* sw, int64_t num_segments, int seg) {
  return seg < num_segments ? sw[1 + seg] : 0.f;
}
__device__ __forceinline__ float stats_g(const float* sw, int64_t num_segments, float log_pi, int seg) {
  return sw[0] * -log_pi + seg_weight(sw, num_segments, seg);
}

// Whether a row carries any statistics weight (sw: its n = 1 + S weights).
__device__ __forceinline__ bool stats_row_live(const float* sw, int64_t n) {
  bool live = false;
  for (int64_t s = 0; s < n; ++s) live = live || sw[s] != 0.f;
  return live;
}

// Per-element values of a key tile (this thread's 32 elements of the warp's 16 x 64 C layout):
// registers, or (kShared) this thread's column of a thread-private fp32 [32][kThreads] shared buffer,
// element (nb, e) at col[(4 nb + e) kThreads] (consecutive threads, consecutive banks).
template <bool kShared>
struct TileVals {
  float v[8][4];
  __device__ __forceinline__ float& operator()(int nb, int e) { return v[nb][e]; }
};
template <>
struct TileVals<true> {
  float* col;
  __device__ __forceinline__ float& operator()(int nb, int e) const { return col[(4 * nb + e) * kThreads]; }
};
constexpr int kTileValsSmem = 32 * kThreads * 4;  // bytes of one TileVals<true> buffer

// dst[0..1] += (a, b) for 8-byte aligned dst (one vector atomic on sm_90)
__device__ __forceinline__ void atomic_add2(float* dst, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(a, b));
#else
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
#endif
}

// Step pipeline over shared-memory stages (1 or 2): begin() waits for step s's tiles (and with
// two stages first issues step s+1's into the other buffer), end() releases the buffer.
struct Pipeline {
  int stages;
  int64_t s, n;
  template <typename Issue>
  __device__ __forceinline__ void start(Issue&& issue) {
    if (n > 0) issue(int64_t(0), 0);
    cp_async_commit();
  }
  template <typename Issue>
  __device__ __forceinline__ int begin(Issue&& issue) {
    if (stages == 2) {
      if (s + 1 < n) issue(s + 1, int((s + 1) & 1));
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    return stages == 2 ? int(s & 1) : 0;
  }
  template <typename Issue>
  __device__ __forceinline__ void end(Issue&& issue) {
    __syncthreads();
    if (stages == 1 && s + 1 < n) {
      issue(s + 1, 0);
      cp_async_commit();
    }
    ++s;
  }
};

}  // namespace ral::cuda
