// Portable SIMD for the CPU kernels: GCC/Clang vector extensions (AVX-512 / AVX2 / SSE, whatever
// -march allows), with the vectorized exp/log the per-element math needs. Lane-wise, every
// function here computes what its scalar counterpart in common/math.h computes.
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/math.h"

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

// The per-element math is inlined everywhere: a call would make the caller spill its live vector
// registers (all of them are caller-saved).
#define RAL_VECTOR_INLINE inline __attribute__((always_inline))

// exp(x), ~1 ulp on [-87, 88.7]; below -87 gives 0 (no subnormal results), above 88.72 inf, NaN stays NaN.
RAL_VECTOR_INLINE vfloat vexp(vfloat x) {
  const vfloat clamped = vmin(vmax(x, vbroadcast(-87.f)), vbroadcast(88.72f));
  // n = round(x log2 e) via the 1.5 * 2^23 trick; r = x - n ln 2 in two parts (Cody-Waite)
  const vfloat shifter = vbroadcast(12582912.f);
  const vfloat n = (clamped * kLog2e + shifter) - shifter;
  vfloat r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vfloat poly = vbroadcast(1.9875691500e-4f);
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * (r * r) + r + 1.f;
  // 2^n as 2 * 2^(n-1): n-1 in [-127, 127] keeps the biased exponent in [0, 254]
  const vmask biased = (__builtin_convertvector(n, vmask) + 126) << 23;
  vfloat power;
  memcpy(&power, &biased, sizeof(power));
  vfloat y = (poly + poly) * power;
  y = vselect(x < -87.f, vfloat{}, y);
  return vselect(x > 88.72f, vbroadcast(std::numeric_limits<float>::infinity()), y);
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

// log(1 + t) for t >= 0, accurate for tiny t: log(u) * t / (u - 1) with u = 1 + t.
RAL_VECTOR_INLINE vfloat vlog1p(vfloat t) {
  const vfloat u = t + 1.f;
  const vfloat d = u - 1.f;
  return vselect(d == 0.f, t, vlog(u) * (t / vselect(d == 0.f, vbroadcast(1.f), d)));
}

// log(exp(a) + exp(b)) (ral::logaddexp).
RAL_VECTOR_INLINE vfloat vlogaddexp(vfloat a, vfloat b) {
  const vfloat hi = vmax(a, b), lo = vmin(a, b);
  const vfloat y = hi + vlog1p(vexp(lo - hi));
  return vselect(hi == -std::numeric_limits<float>::infinity(), hi, y);
}

// Lane-wise ral::divergence_term: f(pi, rho), g = df/dpi and pi, from log pi and log rho.
struct VDivergenceTerm {
  vfloat f, g, pi;
};

RAL_VECTOR_INLINE VDivergenceTerm vdivergence_term(int32_t kind, vfloat log_pi, vfloat log_rho) {
  VDivergenceTerm t;
  t.pi = vexp(log_pi);
  if (kind == kKL) {
    const vfloat d = log_pi - log_rho;
    t.f = t.pi * d;
    t.g = d + 1.f;
  } else if (kind == kReverseKL) {
    const vfloat d = log_rho - log_pi;
    t.f = vexp(log_rho) * d;
    t.g = -vexp(d);
  } else {
    const vfloat log_mid = vlogaddexp(log_pi, log_rho) - kLn2;
    t.f = 0.5f * (t.pi * (log_pi - log_mid) + vexp(log_rho) * (log_rho - log_mid));
    t.g = 0.5f * (log_pi - log_mid);
  }
  return t;
}

// g only (the backward needs no f); pi only where `kind` needs it for g.
RAL_VECTOR_INLINE vfloat vdivergence_grad(int32_t kind, vfloat log_pi, vfloat log_rho) {
  if (kind == kKL) return log_pi - log_rho + 1.f;
  if (kind == kReverseKL) return -vexp(log_rho - log_pi);
  return 0.5f * (log_pi - (vlogaddexp(log_pi, log_rho) - kLn2));
}

}  // namespace ral::cpu
