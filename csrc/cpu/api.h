// CPU kernels (csrc/cpu). Both throw std::invalid_argument (-> Python ValueError) on bad params.
#pragma once
#include <cstdint>

#include "common/params.h"

namespace ral::cpu {

// Writes out (when has_v), div, stats, gbar, cbar and, without ref_stats, ref_stats_out. With
// p.scratch_bytes > 0 it keeps pass 1's scores of as many key tiles as p.scratch holds for pass 2.
void forward(const AttentionKLParams& p);
// Bytes of a score cache that holds every key tile (Python allocates any part of it, uint8).
int64_t forward_scratch_bytes(const AttentionKLParams& p);
// Bytes of scratch the backward needs for these params (Python allocates it, uint8).
int64_t backward_scratch_bytes(const AttentionKLParams& p);
// Accumulates dq, dk (and dv) in fp32 into the zero-filled buffers of p.
void backward(const AttentionKLParams& p);
// Floats per vector register the kernels were built for (simd.h): 16 AVX-512, 8 AVX2, 4 SSE.
int vector_lanes();

}  // namespace ral::cpu
