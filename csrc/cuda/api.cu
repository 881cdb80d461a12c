// Entry points of csrc/cuda/api.h: re-check the params, query the current device, dispatch on dtype.
// Nothing here touches CUDA before the first call (the module must import without a GPU).
#include <stdexcept>

#include "common/check.h"
#include "cuda/api.h"
#include "cuda/kernel_utils.cuh"
#include "cuda/launch.cuh"

namespace ral::cuda {

namespace {

bool dim_ok(int64_t d) { return d > 0 && d <= kMaxHeadDim && d % 8 == 0; }

cudaError_t device_info(DeviceInfo& dev) {
  cudaError_t err = cudaGetDevice(&dev.id);
  if (err != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&dev.sms, cudaDevAttrMultiProcessorCount, dev.id)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&dev.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev.id)))
    return err;
  int major = 0;
  if ((err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev.id))) return err;
  return major >= 8 ? cudaSuccess : cudaErrorNoKernelImageForDevice;
}

// With no_reference (statistics only) q_ref / k_ref are placeholders that are never read: any head dim.
bool shapes_ok(const AttentionKLParams& p) {
  return (p.dtype == kFloat16 || p.dtype == kBFloat16) && p.ref_dtype == p.dtype && dim_ok(p.head_dim) &&
         (p.no_reference || dim_ok(p.ref_head_dim)) && (!p.has_v || dim_ok(p.v_head_dim));
}

// Whether one block of every kernel fits the device's opt-in shared memory (sm_86 / sm_89 have
// 99 KB: the backward's tiles do not fit there for D = Dv = 160 and above).
bool fits(const AttentionKLParams& p, const DeviceInfo& dev) {
  return forward_min_smem(p) <= dev.smem_optin && backward_min_smem(p) <= dev.smem_optin;
}

// The entry points' re-check: params, what the kernels take, then the current device (queried
// once into dev). Throws std::invalid_argument for a call the kernels do not take.
cudaError_t prepare(const AttentionKLParams& p, bool backward, DeviceInfo& dev) {
  check_params(p, backward);
  require(shapes_ok(p), "the CUDA kernels take float16/bfloat16 (q_ref in q's dtype) and head dims D, Dr, "
                        "Dv that are multiples of 8 up to 256");
  const cudaError_t err = device_info(dev);
  if (err != cudaSuccess) return err;
  require(fits(p, dev), "the CUDA kernels' tiles for these head dims do not fit this device's shared memory "
                        "per block (99 KB on sm_86 / sm_89: D, Dv <= 144 or so; statistics take 32 KB "
                        "more in the backward)");
  return cudaSuccess;
}

}  // namespace

int vec_bits(const AttentionKLParams& p) {
  int bits = 0;
  if (view_vec_ok(p.q, 2)) bits |= kVecQ;
  if (view_vec_ok(p.k, 2)) bits |= kVecK;
  if (p.has_v && view_vec_ok(p.v, 2)) bits |= kVecV;
  if (view_vec_ok(p.q_ref, 2)) bits |= kVecQRef;
  if (view_vec_ok(p.k_ref, 2)) bits |= kVecKRef;
  if (p.dout % 16 == 0) bits |= kVecDout;  // contiguous (B, H, Sq, Dv) with Dv % 8 == 0
  return bits;
}

int key_splits(const AttentionKLParams& p, int64_t blocks, const DeviceInfo& dev) {
  const int64_t k_tiles = (max_keys(p) + kBlockN - 1) / kBlockN;
  const int64_t want = (2 * int64_t(dev.sms) + blocks - 1) / blocks;
  return int(want < 1 ? 1 : want > k_tiles ? k_tiles : want > 65535 ? 65535 : want);
}

bool supports(const AttentionKLParams& p) {
  if (!shapes_ok(p)) return false;
  DeviceInfo dev;
  return device_info(dev) != cudaSuccess || fits(p, dev);  // no device: the launch reports the error
}

std::vector<int> head_dims() {
  std::vector<int> dims;
  for (int d = 8; d <= kMaxHeadDim; d += 8) dims.push_back(d);
  return dims;
}

namespace {

// prepare(), then launch(T{}, stream, dev) with T the call's element type.
template <typename Launch>
int run(const AttentionKLParams& p, uintptr_t stream, bool backward, Launch&& launch) {
  DeviceInfo dev;
  const cudaError_t err = prepare(p, backward, dev);
  if (err != cudaSuccess) return int(err);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  return int(p.dtype == kFloat16 ? launch(__half{}, s, dev) : launch(__nv_bfloat16{}, s, dev));
}

}  // namespace

int forward(const AttentionKLParams& p, uintptr_t stream) {
  return run(p, stream, false, [&](auto t, cudaStream_t s, const DeviceInfo& dev) {
    return launch_forward<decltype(t)>(p, s, dev);
  });
}

int64_t backward_scratch_bytes(const AttentionKLParams&) { return 0; }  // no scratch: atomics into dq/dk/dv

int backward(const AttentionKLParams& p, uintptr_t stream) {
  return run(p, stream, true, [&](auto t, cudaStream_t s, const DeviceInfo& dev) {
    return launch_backward<decltype(t)>(p, s, dev);
  });
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace ral::cuda
