// Host-side launchers shared by the .cu files of csrc/cuda (internal; api.h is the public face).
#pragma once
#include <cuda_runtime.h>

#include "common/params.h"

namespace ral::cuda {

struct DeviceInfo {
  int id = 0;
  int sms = 1;          // multiprocessors
  int smem_optin = 0;   // max dynamic shared memory per block (bytes)
};

// Which 16-byte-aligned views may use cp.async (bit per view).
enum VecBits : int { kVecQ = 1, kVecK = 2, kVecV = 4, kVecQRef = 8, kVecKRef = 16, kVecDout = 32 };
int vec_bits(const AttentionKLParams& p);

// Key splits of a query tile so that the grid fills the device about twice.
int key_splits(const AttentionKLParams& p, int64_t blocks, const DeviceInfo& dev);

template <typename T>
cudaError_t launch_forward(const AttentionKLParams& p, cudaStream_t stream, const DeviceInfo& dev);
template <typename T>
cudaError_t launch_backward(const AttentionKLParams& p, cudaStream_t stream, const DeviceInfo& dev);

}  // namespace ral::cuda
