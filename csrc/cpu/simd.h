// Portable SIMD for the CPU kernels: GCC/Clang vector extensions (AVX-512 / AVX2 / SSE, whatever
// -march allows), with the vectorized exp/log the per-element math needs. Lane-wise, every
// function here computes what its scalar counterpart in common/math.h computes.
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/math.h"

#if defined(__FMA__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ral::cpu {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif

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

inline float hsum(vfloat v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
inline float hmax(vfloat v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = (m < v[i] || v[i] != v[i]) ? v[i] : m;
  return m;
}
inline bool any(vmask m) {
  for (int i = 0; i < kLanes; ++i)
    if (m[i]) return true;
  return false;
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
#if defined(__AVX512F__)
  return _mm512_fmadd_ps(a, b, c);
#elif defined(__FMA__) && defined(__AVX__)
  return _mm256_fmadd_ps(a, b, c);
#elif defined(__FMA__)
  return _mm_fmadd_ps(a, b, c);
#else
  return a * b + c;
#endif
}

// The per-element math is inlined everywhere: a call would make the caller spill its live vector
// registers (all of them are caller-saved).
#define RAL_VECTOR_INLINE inline __attribute__((always_inline))

namespace detail {
// x = n ln 2 + r, |r| <= ln 2 / 2 (x in [-87, 88.72]: the callers clamp): returns exp(r) - 1 and
// 2^(n-1) in half_power.
RAL_VECTOR_INLINE vfloat expm1_reduced(vfloat x, vfloat& half_power) {
  // n = round(x log2 e) via the 1.5 * 2^23 trick; r = x - n ln 2 in two parts (Cody-Waite)
  const vfloat shifter = vbroadcast(12582912.f);
  const vfloat n = (x * kLog2e + shifter) - shifter;
  vfloat r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vfloat poly = vbroadcast(1.9875691500e-4f);
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  // 2^n as 2 * 2^(n-1): n-1 in [-127, 127] keeps the biased exponent in [0, 254]
  const vmask biased = (__builtin_convertvector(n, vmask) + 126) << 23;
  memcpy(&half_power, &biased, sizeof(half_power));
  return poly * (r * r) + r;
}

// exp(x) for x in [-87, 88.72] (the callers clamp), ~1 ulp.
RAL_VECTOR_INLINE vfloat exp_in_range(vfloat x) {
  vfloat half_power;
  const vfloat poly = expm1_reduced(x, half_power) + 1.f;
  return (poly + poly) * half_power;
}
}  // namespace detail

// exp(x), ~1 ulp on [-87, 88.7]; below -87 gives 0 (no subnormal results), above 88.72 inf, NaN stays NaN.
RAL_VECTOR_INLINE vfloat vexp(vfloat x) {
  const vfloat y = vselect(x < -87.f, vfloat{}, detail::exp_in_range(vmin(vmax(x, vbroadcast(-87.f)), vbroadcast(88.72f))));
  return vselect(x > 88.72f, vbroadcast(std::numeric_limits<float>::infinity()), y);
}

// vexp for x <= 0 (a score minus a maximum at least as large; -inf and NaN as vexp): one clamp and
// one select fewer. The same bits as vexp there.
RAL_VECTOR_INLINE vfloat vexp_nonpositive(vfloat x) {
  return vselect(x < -87.f, vfloat{}, detail::exp_in_range(vmax(x, vbroadcast(-87.f))));
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
  vfloat half_power;
  const vfloat q = detail::expm1_reduced(vmax(x, vbroadcast(-87.f)), half_power);
  const vfloat power = half_power + half_power;
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
