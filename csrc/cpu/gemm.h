// Register-blocked fp32 GEMM for the small tiles of the CPU kernels.
//
//   C (M x N) = or += A (M x K) * B (K x N), or C = keep[i] C + add[i] (A B) row by row (RowScale)
//
// B is row-major with N contiguous (N a multiple of kLanes); A is read one scalar at a time
// through (a_row, a_col) strides, so the same kernel does Q K^T (A = Q, B = K^T packed),
// P V, dS K, and dS^T Q (A = dS read transposed: a_row = 1, a_col = BN).
// The micro-kernel keeps an RM x (NV * kLanes) block of C in registers and streams K.
#pragma once
#include <cstdint>

#include "cpu/simd.h"

namespace ral::cpu {

// Register block of the micro-kernel: kGemmRows x (kGemmVectors * kLanes) accumulators.
// AVX-512 has 32 vector registers (6 x 4 = 24 accumulators); AVX2 has 16 (6 x 2 = 12, with two B
// vectors and one broadcast A: the 6 x 16 block of BLIS's Haswell kernel); SSE 4 x 2.
constexpr int kGemmRows = kLanes == 4 ? 4 : 6;
constexpr int kGemmVectors = kLanes == 16 ? 4 : 2;

struct MatA {
  const float* ptr;
  int64_t row;  // stride between rows of A (the M index)
  int64_t col;  // stride between columns of A (the K index)
};

// Per row i of C, with kRowScale: C[i] = keep[i] * C[i] + add[i] * (A B)[i] (the online softmax's
// rescale of the output and the weight of a tile's exponentials, in the GEMM's own store).
struct RowScale {
  const float* keep = nullptr;
  const float* add = nullptr;
  RowScale rows_from(int64_t row) const { return {keep ? keep + row : nullptr, add ? add + row : nullptr}; }
};

// acc (RM x NV vectors) += A[:, :k_len] B[:k_len, :], one fma chain per element; advances a_ptr and b
// past the k_len steps taken. Always inlined: called out of line, acc would live in memory.
template <int RM, int NV>
RAL_VECTOR_INLINE void accumulate_k(vfloat (&acc)[RM][NV], const float*& a_ptr, int64_t a_row, int64_t a_col,
                                    const float* __restrict__& b, int64_t ldb, int64_t k_len) {
  for (int64_t k = 0; k < k_len; ++k, a_ptr += a_col, b += ldb) {
    vfloat b_vec[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b_vec[v] = vload(b + v * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < RM; ++r) {
      const vfloat a_val = vbroadcast(a_ptr[r * a_row]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = vfma(a_val, b_vec[v], acc[r][v]);
    }
  }
}

// Shortest K that micro_gemm's kSplitK sums as two halves; below it, one chain.
constexpr int64_t kSplitMinK = 16;

// C (RM x NV vectors) = or += A B (RowScale: see above) from one fma chain per element. With
// kSplitK, C = A B sums K in two halves, each its own chain, added at the end: an fp32 chain's
// rounding grows with its length and its partial sums; a score's rounding is what lse and every
// exp(s - lse) carry, and a near one-hot row's dS = a (dP - delta) cancels down to the rounding of
// dP. The kernels form every score (Q K^T: both passes, the lanes recomputed one by one, the
// backward) and the backward's dP = dO V^T with kSplitK, so a score has the same bits wherever it is
// formed. At D = 64 and scores of tens the lse error drops from 5.0e-6 to 2.9e-6 rms, and the fp32
// gradient errors of near one-hot rows nearly halve (benchmarks/RESULTS.md, twelfth entry). The
// other products keep one chain.
template <int RM, int NV, bool kAccumulate, bool kRowScale = false, bool kSplitK = false>
inline void micro_gemm(float* __restrict__ c, int64_t ldc, MatA a, const float* __restrict__ b,
                       int64_t ldb, int64_t k_len, RowScale scale = {}) {
  static_assert(!(kAccumulate && kRowScale), "RowScale already reads C");
  static_assert(!kSplitK || !(kAccumulate || kRowScale), "kSplitK sets C");
  vfloat acc[RM][NV];
#pragma GCC unroll 8
  for (int r = 0; r < RM; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = kAccumulate ? vload(c + r * ldc + v * kLanes) : vfloat{};
  const float* a_ptr = a.ptr;
  if (kSplitK && k_len >= kSplitMinK) {
    accumulate_k<RM, NV>(acc, a_ptr, a.row, a.col, b, ldb, k_len / 2);
#pragma GCC unroll 8
    for (int r = 0; r < RM; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        vstore(c + r * ldc + v * kLanes, acc[r][v]);
        acc[r][v] = vfloat{};
      }
    // The first half's sums now live in C only: without this barrier GCC keeps them in registers too
    // and spills them around the second chain (the accumulators fill most of the vector registers).
    asm volatile("" ::: "memory");
    accumulate_k<RM, NV>(acc, a_ptr, a.row, a.col, b, ldb, k_len - k_len / 2);
#pragma GCC unroll 8
    for (int r = 0; r < RM; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) vstore(c + r * ldc + v * kLanes, vload(c + r * ldc + v * kLanes) + acc[r][v]);
    return;
  }
  accumulate_k<RM, NV>(acc, a_ptr, a.row, a.col, b, ldb, k_len);
#pragma GCC unroll 8
  for (int r = 0; r < RM; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* out = c + r * ldc + v * kLanes;
      if constexpr (kRowScale)
        vstore(out, vload(out) * scale.keep[r] + acc[r][v] * scale.add[r]);
      else
        vstore(out, acc[r][v]);
    }
}

namespace detail {

// With 16 vector registers (AVX2, SSE) the accumulators fit only in a frame of their own: inlined
// into a caller that keeps other vectors live (pass 1's softmax, around P V), GCC spilled them to
// the stack (benchmarks/RESULTS.md, 2026-12-06).
#if defined(__AVX512F__)
#define RAL_GEMM_ROWS_INLINE inline
#else
#define RAL_GEMM_ROWS_INLINE __attribute__((noinline))
#endif

template <int RM, bool kAccumulate, bool kRowScale, bool kSplitK>
RAL_GEMM_ROWS_INLINE void gemm_rows(float* c, int64_t ldc, MatA a, const float* b, int64_t ldb, int64_t n,
                                    int64_t k_len, RowScale scale) {
  int64_t col = 0;
  for (; col + kGemmVectors * kLanes <= n; col += kGemmVectors * kLanes)
    micro_gemm<RM, kGemmVectors, kAccumulate, kRowScale, kSplitK>(c + col, ldc, a, b + col, ldb, k_len, scale);
  switch ((n - col) / kLanes) {
    case 3: micro_gemm<RM, 3, kAccumulate, kRowScale, kSplitK>(c + col, ldc, a, b + col, ldb, k_len, scale); break;
    case 2: micro_gemm<RM, 2, kAccumulate, kRowScale, kSplitK>(c + col, ldc, a, b + col, ldb, k_len, scale); break;
    case 1: micro_gemm<RM, 1, kAccumulate, kRowScale, kSplitK>(c + col, ldc, a, b + col, ldb, k_len, scale); break;
    default: break;
  }
}

}  // namespace detail

// C (m x n, row stride ldc) = or += A (m x k_len) * B (k_len x n, row stride ldb); n % kLanes == 0.
// With kRowScale (kAccumulate false): C = keep[i] C + add[i] (A B), row by row. kSplitK: see micro_gemm.
template <bool kAccumulate, bool kRowScale = false, bool kSplitK = false>
inline void gemm(float* c, int64_t ldc, MatA a, const float* b, int64_t ldb, int64_t m, int64_t n,
                 int64_t k_len, RowScale scale = {}) {
  constexpr int kRM = kGemmRows;
  static_assert(kRM <= 6, "the row tail below handles up to 5 rows");
  int64_t row = 0;
  for (; row + kRM <= m; row += kRM)
    detail::gemm_rows<kRM, kAccumulate, kRowScale, kSplitK>(c + row * ldc, ldc, {a.ptr + row * a.row, a.row, a.col},
                                                            b, ldb, n, k_len, scale.rows_from(row));
  const MatA rest{a.ptr + row * a.row, a.row, a.col};
  const RowScale rest_scale = scale.rows_from(row);
  float* c_rest = c + row * ldc;
  switch (m - row) {
    case 5: detail::gemm_rows<5, kAccumulate, kRowScale, kSplitK>(c_rest, ldc, rest, b, ldb, n, k_len, rest_scale); break;
    case 4: detail::gemm_rows<4, kAccumulate, kRowScale, kSplitK>(c_rest, ldc, rest, b, ldb, n, k_len, rest_scale); break;
    case 3: detail::gemm_rows<3, kAccumulate, kRowScale, kSplitK>(c_rest, ldc, rest, b, ldb, n, k_len, rest_scale); break;
    case 2: detail::gemm_rows<2, kAccumulate, kRowScale, kSplitK>(c_rest, ldc, rest, b, ldb, n, k_len, rest_scale); break;
    case 1: detail::gemm_rows<1, kAccumulate, kRowScale, kSplitK>(c_rest, ldc, rest, b, ldb, n, k_len, rest_scale); break;
    default: break;
  }
}

}  // namespace ral::cpu
