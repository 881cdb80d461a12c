// Portable SIMD for the CPU kernels: GCC/Clang vector extensions (AVX-512 / AVX2 / SSE, whatever
// -march allows), with the vectorized exp/log the per-element math needs. Lane-wise, every
// function here computes what its scalar counterpart in common/math.h computes.
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

#include "common/math.h"

#if defined(__FMA__) || defined(__AVX512F__) || defined(__AVX__) || defined(__SSE4_1__)
#include <immintrin.h>
#endif

namespace ral::cpu {

// Floats per vector: the target's widest (16 with AVX-512, 8 with AVX, 4 otherwise), or RAL_CPU_LANES
// (4, 8 or 16) on any target. The intrinsics below are used where the target has them at this width
// and portable code stands in elsewhere, so a forced width builds anywhere: 8 on an AVX-512 machine
// is the AVX2 code path, and 16 on an AVX2 machine runs AVX-512's lane logic (GCC lowers each vector
// to two), which is how tests/test_cpu_lanes.py checks every width on one host.
#if defined(RAL_CPU_LANES)
#define RAL_LANES RAL_CPU_LANES
#elif defined(__AVX512F__)
#define RAL_LANES 16
#elif defined(__AVX__)
#define RAL_LANES 8
#else
#define RAL_LANES 4
#endif
static_assert(RAL_LANES == 4 || RAL_LANES == 8 || RAL_LANES == 16, "RAL_CPU_LANES must be 4, 8 or 16");
constexpr int kLanes = RAL_LANES;

typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vmask __attribute__((vector_size(kLanes * sizeof(int32_t))));  // lanes: 0 or -1

inline vfloat vload(const float* p) {
  vfloat v;
  memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(float* p, vfloat v) { memcpy(p, &v, sizeof(v)); }
// x - 0 == x exactly (unlike 0 + x for x = -0), so this folds to a plain broadcast.
inline vfloat vbroadcast(float x) { return x - vfloat{}; }
inline vfloat vselect(vmask keep, vfloat a, vfloat b) { return keep ? a : b; }
// NaN-propagating in `a` (the comparisons are false for NaN).
inline vfloat vmax(vfloat a, vfloat b) { return a < b ? b : a; }
inline vfloat vmin(vfloat a, vfloat b) { return a > b ? b : a; }
// The larger per lane, NaN where either is.
inline vfloat vmax_nan(vfloat a, vfloat b) { return b != b ? b : vmax(a, b); }

namespace detail {
// A constant two-source shuffle: lane j of the result is lane Index::at(j) of a (indices below
// kLanes) or lane Index::at(j) - kLanes of b.
template <class Index, int... kJ>
inline vfloat shuffle_lanes(vfloat a, vfloat b, std::integer_sequence<int, kJ...>) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  return __builtin_shufflevector(a, b, Index::at(kJ)...);
#else
  const vmask index = {Index::at(kJ)...};
  return __builtin_shuffle(a, b, index);
#endif
}
template <class Index>
inline vfloat shuffle_lanes(vfloat a, vfloat b) {
  return shuffle_lanes<Index>(a, b, std::make_integer_sequence<int, kLanes>{});
}

// Lane j <- lane j ^ kBit.
template <int kBit>
struct Exchange {
  static constexpr int at(int j) { return j ^ kBit; }
};
// One butterfly step over lanes kBit apart, then the steps below it: every lane ends up holding
// combine over all of them.
template <int kBit, class Combine>
inline vfloat reduce_lanes(vfloat v, Combine combine) {
  v = combine(v, shuffle_lanes<Exchange<kBit>>(v, v));
  if constexpr (kBit > 1) v = reduce_lanes<kBit / 2>(v, combine);
  return v;
}

// A transpose step for rows a (row index bit kBit clear) and b (set): a keeps its lanes with that
// bit clear and takes b's lanes with it clear in the others; b takes a's lanes with it set and keeps
// its own with it set.
template <int kBit>
struct BlockLow {
  static constexpr int at(int j) { return (j & kBit) ? kLanes + (j ^ kBit) : j; }
};
template <int kBit>
struct BlockHigh {
  static constexpr int at(int j) { return (j & kBit) ? kLanes + j : (j ^ kBit); }
};
// Stages kBit, kBit / 2, .. 1, each exchanging one bit of the row index with the same bit of the
// lane index.
template <int kBit>
inline void transpose_stages(vfloat* rows) {
  for (int i = 0; i < kLanes; ++i)
    if (!(i & kBit)) {
      const vfloat a = rows[i], b = rows[i | kBit];
      rows[i] = shuffle_lanes<BlockLow<kBit>>(a, b);
      rows[i | kBit] = shuffle_lanes<BlockHigh<kBit>>(a, b);
    }
  if constexpr (kBit > 1) transpose_stages<kBit / 2>(rows);
}
}  // namespace detail

// rows[i][j] <- rows[j][i] for kLanes rows: log2(kLanes) butterfly stages of two-source shuffles.
inline void transpose_block(vfloat* rows) { detail::transpose_stages<kLanes / 2>(rows); }

// The lane sum, as a tree (pairs kLanes / 2 apart first).
inline float hsum(vfloat v) {
  return detail::reduce_lanes<kLanes / 2>(v, [](vfloat a, vfloat b) { return a + b; })[0];
}
// The largest lane; NaN when any lane is NaN. Branch-free: which lane holds the maximum is data,
// and a scalar loop's compare-and-branch mispredicted on it (benchmarks/RESULTS.md, 2026-12-06).
inline float hmax(vfloat v) {
  return detail::reduce_lanes<kLanes / 2>(v, [](vfloat a, vfloat b) { return vmax_nan(a, b); })[0];
}
// Whether any lane is set: one test instruction where the target has one.
inline bool any(vmask m) {
#if RAL_LANES == 16 && defined(__AVX512F__)
  return _mm512_test_epi32_mask(reinterpret_cast<__m512i>(m), reinterpret_cast<__m512i>(m)) != 0;
#elif RAL_LANES == 8 && defined(__AVX__)
  return !_mm256_testz_si256(reinterpret_cast<__m256i>(m), reinterpret_cast<__m256i>(m));
#elif RAL_LANES == 4 && defined(__SSE4_1__)
  return !_mm_testz_si128(reinterpret_cast<__m128i>(m), reinterpret_cast<__m128i>(m));
#else
  for (int i = 0; i < kLanes; ++i)
    if (m[i]) return true;
  return false;
#endif
}
inline vmask iota() {
  vmask v;
  for (int i = 0; i < kLanes; ++i) v[i] = i;
  return v;
}

// a * b + c, rounded once where the target has FMA. The GEMM micro-kernel accumulates through this,
// so every instance of it forms the same bits: left to the compiler, contraction is a heuristic
// per loop (GCC's Zen tunings keep some accumulation chains as separate multiply and add).
inline vfloat vfma(vfloat a, vfloat b, vfloat c) {
#if RAL_LANES == 16 && defined(__AVX512F__)
  return _mm512_fmadd_ps(a, b, c);
#elif RAL_LANES == 8 && defined(__FMA__)
  return _mm256_fmadd_ps(a, b, c);
#elif RAL_LANES == 4 && defined(__FMA__)
  return _mm_fmadd_ps(a, b, c);
#elif defined(__FMA__)  // 16 lanes without AVX-512: fused lane by lane, still one rounding
  vfloat r;
  for (int i = 0; i < kLanes; ++i) r[i] = __builtin_fmaf(a[i], b[i], c[i]);
  return r;
#else
  return a * b + c;
#endif
}

// The per-element math is inlined everywhere: a call would make the caller spill its live vector
// registers (all of them are caller-saved).
#define RAL_VECTOR_INLINE inline __attribute__((always_inline))

namespace detail {
// x = n ln 2 + r, |r| <= ln 2 / 2, for x in [-87, 88.72] (the callers clamp, or select other lanes
// away): returns exp(r) - 1, and n << 23 in n_field (n in a float's exponent field, unbiased).
RAL_VECTOR_INLINE vfloat expm1_reduced(vfloat x, vmask& n_field) {
  // n = round(x log2 e) via the 1.5 * 2^23 trick: the sum's lowest mantissa bits are n itself, so
  // that shifting them into the exponent field needs no conversion; r = x - n ln 2 in two parts
  // (Cody-Waite)
  const vfloat shifter = vbroadcast(12582912.f);
  const vfloat shifted = vfma(x, vbroadcast(kLog2e), shifter);
  const vfloat n = shifted - shifter;
  vfloat r = vfma(n, vbroadcast(-0.693359375f), x);
  r = vfma(n, vbroadcast(2.12194440e-4f), r);
  vfloat poly = vbroadcast(1.9875691500e-4f);
  poly = vfma(poly, r, vbroadcast(1.3981999507e-3f));
  poly = vfma(poly, r, vbroadcast(8.3334519073e-3f));
  poly = vfma(poly, r, vbroadcast(4.1665795894e-2f));
  poly = vfma(poly, r, vbroadcast(1.6666665459e-1f));
  poly = vfma(poly, r, vbroadcast(5.0000001201e-1f));
  vmask bits;
  memcpy(&bits, &shifted, sizeof(bits));
  n_field = bits << 23;  // the shifter's own bits leave the word
  return vfma(poly, r * r, r);
}

// 2^(n + bias) from expm1_reduced's n_field; n + bias in [-126, 127].
RAL_VECTOR_INLINE vfloat power_of_two(vmask n_field, int32_t bias) {
  const vmask biased = n_field + ((127 + bias) << 23);
  vfloat power;
  memcpy(&power, &biased, sizeof(power));
  return power;
}
}  // namespace detail

// exp(x), ~1 ulp on [-87, 88.7]; below -87 gives 0 (no subnormal results), above 88.72 inf, NaN stays NaN.
RAL_VECTOR_INLINE vfloat vexp(vfloat x) {
  vmask n_field;
  const vfloat q = detail::expm1_reduced(vmin(vmax(x, vbroadcast(-87.f)), vbroadcast(88.72f)), n_field) + 1.f;
  // 2^n as 2 * 2^(n-1): n = 128 at the top of the range
  const vfloat y = vselect(x < -87.f, vfloat{}, (q + q) * detail::power_of_two(n_field, -1));
  return vselect(x > 88.72f, vbroadcast(std::numeric_limits<float>::infinity()), y);
}

// vexp for x <= 88 (a score minus a maximum or a log-sum-exp at least as large, with room for
// rounding; -inf and NaN as vexp; lanes above 88 come out wrong and must be selected away by the
// caller, as masked keys are): n <= 127, so 2^n is formed directly, with one clamp and one select
// fewer. The same bits as vexp on [-87 + 2^-6, 88].
RAL_VECTOR_INLINE vfloat vexp_nonpositive(vfloat x) {
  vmask n_field;
  const vfloat q = detail::expm1_reduced(vmax(x, vbroadcast(-87.f)), n_field) + 1.f;
  return vselect(x < -87.f, vfloat{}, q * detail::power_of_two(n_field, 0));
}

// log(x), ~1 ulp for normal x; 0 and subnormals give -inf, negatives NaN, inf inf, NaN NaN.
RAL_VECTOR_INLINE vfloat vlog(vfloat x) {
  vmask bits;
  memcpy(&bits, &x, sizeof(bits));
  // x = m * 2^e with m in [sqrt(1/2), sqrt(2))
  vmask e = ((bits >> 23) & 0xff) - 126;
  const vmask mantissa_bits = (bits & 0x007fffff) | 0x3f000000;  // m in [0.5, 1)
  vfloat m;
  memcpy(&m, &mantissa_bits, sizeof(m));
  const vmask small = m < 0.70710678118654752f;
  e = e + small;  // small lanes: e - 1
  m = vselect(small, m + m, m) - 1.f;
  const vfloat z = m * m;
  vfloat poly = vbroadcast(7.0376836292e-2f);
  poly = poly * m - 1.1514610310e-1f;
  poly = poly * m + 1.1676998740e-1f;
  poly = poly * m - 1.2420140846e-1f;
  poly = poly * m + 1.4249322787e-1f;
  poly = poly * m - 1.6668057665e-1f;
  poly = poly * m + 2.0000714765e-1f;
  poly = poly * m - 2.4999993993e-1f;
  poly = poly * m + 3.3333331174e-1f;
  const vfloat fe = __builtin_convertvector(e, vfloat);
  vfloat y = poly * m * z + fe * -2.12194440e-4f - 0.5f * z;
  y = m + y + fe * 0.693359375f;
  constexpr float inf = std::numeric_limits<float>::infinity();
  y = vselect(x < std::numeric_limits<float>::min(), vbroadcast(-inf), y);
  y = vselect(x < 0.f || x != x, vbroadcast(std::numeric_limits<float>::quiet_NaN()), y);
  return vselect(x == inf, vbroadcast(inf), y);
}

// exp(x) - 1 for x <= 0 (NaN stays NaN), with relative accuracy near 0: 2^n (exp(r) - 1) + (2^n - 1)
// from vexp's reduction, which is exp(r) - 1 itself for |x| <= ln 2 / 2 (n = 0); below -87, -1.
RAL_VECTOR_INLINE vfloat vexpm1_nonpositive(vfloat x) {
  vmask n_field;
  const vfloat q = detail::expm1_reduced(vmax(x, vbroadcast(-87.f)), n_field);
  const vfloat power = detail::power_of_two(n_field, 0);
  return vselect(x < -87.f, vbroadcast(-1.f), q * power + (power - 1.f));
}

// log(1 + t) for t > -1, accurate for tiny t: log(u) * t / (u - 1) with u = 1 + t.
RAL_VECTOR_INLINE vfloat vlog1p(vfloat t) {
  const vfloat u = t + 1.f;
  const vfloat d = u - 1.f;
  return vselect(d == 0.f, t, vlog(u) * (t / vselect(d == 0.f, vbroadcast(1.f), d)));
}

// JSD's two logarithms from t = log pi - log rho: (log(2 pi / (pi + rho)), log(2 rho / (pi + rho))).
// With u = -|t| the larger side's is -log(1 + expm1(u) / 2) in [0, ln 2] and the smaller side's that
// plus u; both are exactly 0 at t = 0 and within an ulp of t / 2 in size near it, so that the
// divergence of two nearly equal distributions, second order in t, is not buried under a
// first-order rounding (as log(pi + rho) - ln 2 would bury it).
struct VJsdLogs {
  vfloat pi_side, rho_side;
};
RAL_VECTOR_INLINE VJsdLogs vjsd_logs(vfloat t) {
  const vfloat u = vmin(t, -t);
  const vfloat larger = -vlog1p(0.5f * vexpm1_nonpositive(u)), smaller = larger + u;
  const vmask pi_larger = t >= 0.f;
  return {vselect(pi_larger, larger, smaller), vselect(pi_larger, smaller, larger)};
}

// Lane-wise ral::divergence_term: f(pi, rho), g = df/dpi and pi, from log pi, pi, log rho and rho.
// The linear values only weigh terms: where one underflows while its log is finite, its term is
// below fp32's reach anyway.
struct VDivergenceTerm {
  vfloat f, g, pi, pi_g;  // pi_g = pi * g, formed as -rho for reverse_kl (whose g = -rho/pi overflows where pi underflows)
};

RAL_VECTOR_INLINE VDivergenceTerm vdivergence_term(int32_t kind, vfloat log_pi, vfloat pi, vfloat log_rho,
                                                   vfloat rho) {
  VDivergenceTerm t;
  t.pi = pi;
  if (kind == kKL) {
    const vfloat d = log_pi - log_rho;
    t.f = pi * d;
    t.g = d + 1.f;
    t.pi_g = pi * t.g;
  } else if (kind == kReverseKL) {
    const vfloat d = log_rho - log_pi;
    t.f = rho * d;
    t.g = -vexp(d);
    t.pi_g = -rho;
  } else {
    const VJsdLogs l = vjsd_logs(log_pi - log_rho);
    t.f = 0.5f * (pi * l.pi_side + rho * l.rho_side);
    t.g = 0.5f * l.pi_side;
    t.pi_g = pi * t.g;
  }
  return t;
}

// The same from log pi and log rho alone.
RAL_VECTOR_INLINE VDivergenceTerm vdivergence_term(int32_t kind, vfloat log_pi, vfloat log_rho) {
  const vfloat rho = kind == kKL ? vfloat{} : vexp(log_rho);
  return vdivergence_term(kind, log_pi, vexp(log_pi), log_rho, rho);
}

// w * g for a weight w = exp(log_w) that shrinks with pi (w <= H pi: a / Z, pi), as the backward
// needs it (no f): reverse_kl's g = -rho/pi overflows where pi underflows, so its product is formed as
// -exp(log_w + log rho - log pi).
RAL_VECTOR_INLINE vfloat vweighted_grad(int32_t kind, vfloat log_w, vfloat w, vfloat log_pi, vfloat log_rho) {
  if (kind == kReverseKL) return -vexp(log_w + log_rho - log_pi);
  if (kind == kKL) return w * (log_pi - log_rho + 1.f);
  return w * (0.5f * vjsd_logs(log_pi - log_rho).pi_side);
}

}  // namespace ral::cpu
