// Per-element math shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels: the online
// logsumexp update, the divergence terms f(pi, rho) and their derivatives g = df/dpi, and the
// dtype conversions. Everything is fp32 and works in log space (docs/design.md, "The math").
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/params.h"

#if defined(__CUDACC__)
#define RAL_HD __host__ __device__ __forceinline__
#else
#define RAL_HD inline
#endif

namespace ral {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

RAL_HD float neg_inf() { return -INFINITY; }

// Online logsumexp with one exp per element. State: m (running max, -inf when empty) and
// l = sum exp(x - m). Push only elements that belong to the set (never a masked -inf).
RAL_HD void lse_push(float& m, float& l, float x) {
  if (x > m) {
    l = l * expf(m - x) + 1.f;  // m == -inf: l * 0 + 1
    m = x;
  } else {
    l += expf(x - m);           // NaN x lands here and propagates
  }
}

// Merge two (m, l) states.
RAL_HD void lse_merge(float& m, float& l, float m2, float l2) {
  if (m2 == neg_inf()) return;
  if (m == neg_inf()) { m = m2; l = l2; return; }
  if (m2 > m) { l = l * expf(m - m2) + l2; m = m2; } else { l += l2 * expf(m2 - m); }
}

// log of the sum: -inf for an empty set.
RAL_HD float lse_value(float m, float l) { return m == neg_inf() ? neg_inf() : m + logf(l); }

// log(exp(a) + exp(b)); NaN in, NaN out (fmaxf alone would drop it).
RAL_HD float logaddexp(float a, float b) {
  if (a != a || b != b) return a + b;
  float hi = fmaxf(a, b), lo = fminf(a, b);
  if (hi == neg_inf()) return neg_inf();
  return hi + log1pf(expf(lo - hi));
}

// f(pi, rho) and g = df/dpi from log pi and log rho (natural log), docs/design.md, "The math":
//   kl:         f = pi log(pi/rho),                          g = log(pi/rho) + 1
//   reverse_kl: f = rho log(rho/pi),                         g = -rho/pi
//   jsd:        f = ½ pi log(2pi/(pi+rho)) + ½ rho log(2rho/(pi+rho)),  g = ½ log(2pi/(pi+rho))
struct DivergenceTerm {
  float f;
  float g;
};

RAL_HD DivergenceTerm divergence_term(int32_t kind, float log_pi, float log_rho) {
  const float pi = expf(log_pi), rho = expf(log_rho);
  DivergenceTerm t;
  if (kind == kKL) {
    const float d = log_pi - log_rho;
    t.f = pi * d;
    t.g = d + 1.f;
  } else if (kind == kReverseKL) {
    const float d = log_rho - log_pi;
    t.f = rho * d;
    t.g = -expf(d);
  } else {
    // log(2 pi / (pi + rho)) and log(2 rho / (pi + rho)) from t = log pi - log rho: -log(1 + expm1(-|t|)/2)
    // for the larger side, that minus |t| for the other; both exactly 0 at t = 0, so that nearly
    // equal distributions get a divergence of second order in t (docs/design.md, "The math")
    const float d = log_pi - log_rho, u = -fabsf(d);
    const float larger = -log1pf(0.5f * expm1f(u)), smaller = larger + u;
    const float pi_side = d >= 0.f ? larger : smaller, rho_side = d >= 0.f ? smaller : larger;
    t.f = 0.5f * (pi * pi_side + rho * rho_side);
    t.g = 0.5f * pi_side;
  }
  return t;
}

// ---- dtype conversions (host side; CUDA code uses cuda_fp16.h / cuda_bf16.h intrinsics) -----
RAL_HD float bf16_bits_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &bits, sizeof(f));
  return f;
}

RAL_HD float fp16_bits_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1fu) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf / NaN
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;  // signed zero
  } else {        // subnormal: value = mantissa * 2^-24
    float f = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    memcpy(&bits, &f, sizeof(bits));
    bits |= sign;
  }
  float f;
  memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round-to-nearest-even fp32 -> bf16 bits (NaN stays NaN).
RAL_HD uint16_t float_to_bf16_bits(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Round-to-nearest-even fp32 -> fp16 bits: overflow gives inf, NaN stays a (quiet) NaN, values
// below the normal range become fp16 subnormals (or signed zero).
RAL_HD uint16_t float_to_fp16_bits(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof(bits));
  const uint32_t sign = (bits >> 16) & 0x8000u, magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu));
  if (magnitude >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (magnitude >= 0x38800000u) {                                               // normal fp16
    const uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
    return static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13));      // rebias 127 -> 15
  }
  const uint32_t exponent = magnitude >> 23;
  if (exponent < 102u) return static_cast<uint16_t>(sign);                      // < 2^-25: rounds to 0
  // subnormal fp16: count of 2^-24 units = mantissa (with its implicit bit) >> (126 - exponent)
  const uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u, shift = 126u - exponent;
  uint32_t units = mantissa >> shift;
  const uint32_t rest = mantissa & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rest > half || (rest == half && (units & 1u))) ++units;
  return static_cast<uint16_t>(sign | units);
}

}  // namespace ral
