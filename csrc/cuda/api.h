// CUDA kernels (csrc/cuda), compiled by nvcc when setup.py finds it (RAL_WITH_CUDA defined).
// They run on the stream the Python layer passes (torch's current stream) and use only buffers
// that the Python layer allocated. Each returns a cudaError_t as int: 0 on success.
#pragma once
#include <cstdint>
#include <vector>

#include "common/params.h"

namespace ral::cuda {

int forward(const AttentionKLParams& p, uintptr_t stream);
int64_t backward_scratch_bytes(const AttentionKLParams& p);
int backward(const AttentionKLParams& p, uintptr_t stream);
const char* error_string(int code);
// Which dtypes / head dims these kernels take on the current device (their tiles must fit its
// shared memory per block); other calls are routed elsewhere by Python (backend="auto" sends
// them to Triton; an explicit backend="cuda" raises ValueError).
bool supports(const AttentionKLParams& p);
// The head dims (D, and Dr) the kernels are built for, e.g. {64, 80, 96, 128, 256}.
std::vector<int> head_dims();

}  // namespace ral::cuda
