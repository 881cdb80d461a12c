// CPU kernels (csrc/cpu). Both throw std::invalid_argument (-> Python ValueError) on bad params.
#pragma once
#include <cstdint>

#include "common/params.h"

namespace ral::cpu {

// Writes out (when has_v), div, stats, gbar, cbar and, without ref_stats, ref_stats_out.
void forward(const AttentionKLParams& p);
// Bytes of scratch the backward needs for these params (Python allocates it, uint8).
int64_t backward_scratch_bytes(const AttentionKLParams& p);
// Accumulates dq, dk (and dv) in fp32 into the zero-filled buffers of p.
void backward(const AttentionKLParams& p);

}  // namespace ral::cpu
