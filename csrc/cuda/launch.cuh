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

// The launch grid's work units (params.h: the sequence table, or the batch when there is none) and
// the longest unit's rows / keys: kernels size their grids from these and exit past a unit's end.
inline int64_t num_units(const AttentionKLParams& p) { return p.seqs ? p.num_seqs : p.batch; }
inline int64_t max_rows(const AttentionKLParams& p) { return p.seqs ? p.max_q_len : p.q_len; }
inline int64_t max_keys(const AttentionKLParams& p) { return p.seqs ? p.max_k_len : p.k_len; }

// Which 16-byte-aligned views may use cp.async (bit per view).
enum VecBits : int { kVecQ = 1, kVecK = 2, kVecV = 4, kVecQRef = 8, kVecKRef = 16, kVecDout = 32 };
int vec_bits(const AttentionKLParams& p);

// Key splits of a query tile (of the longest unit's key tiles) so that the grid fills the device
// about twice; `blocks`: the grid's blocks without splits.
int key_splits(const AttentionKLParams& p, int64_t blocks, const DeviceInfo& dev);

// Shared memory of a kernel launch: `fixed` bytes plus `stage` bytes per pipeline stage (1 or 2;
// two when they fit the device). The launchers and supports() (api.cu) use the same numbers.
struct SmemPlan {
  int64_t fixed = 0, stage = 0;
  int64_t bytes(int stages) const { return fixed + stages * stage; }
  int stages(const DeviceInfo& dev) const { return bytes(2) <= dev.smem_optin ? 2 : 1; }
};
// The most shared memory one block of any forward / backward kernel needs with one stage.
int64_t forward_min_smem(const AttentionKLParams& p);
int64_t backward_min_smem(const AttentionKLParams& p);

template <typename T>
cudaError_t launch_forward(const AttentionKLParams& p, cudaStream_t stream, const DeviceInfo& dev);
template <typename T>
cudaError_t launch_backward(const AttentionKLParams& p, cudaStream_t stream, const DeviceInfo& dev);

}  // namespace ral::cuda
