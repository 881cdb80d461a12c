// A small CPU emulator of the CUDA vocabulary csrc/cuda uses, so that the real kernels compile as
// host C++ (g++ -x c++ -include tests/cuda_emu/cuda_emu.h -DRAL_CUDA_EMULATE) and run on the CPU.
//
// Model (tests/cuda_emu/cuda_emu.cpp):
//   * blocks run one after another (order: RAL_EMU_BLOCK_ORDER or the schedule), the threads of a
//     block as cooperative coroutines on one OS thread; a thread runs until it blocks at
//     __syncthreads / __syncthreads_or (all threads of the block arrive) or at a warp collective
//     (mma.sync, ldmatrix, __shfl_xor_sync: the 32 lanes of the warp arrive, each deposits its
//     operands, the last one computes every lane's result from the PTX ISA fragment layouts);
//   * which runnable thread runs next: RAL_EMU_SCHEDULE = forward (lowest index), reverse
//     (highest), or random:<seed>; a missing barrier then shows up as a wrong result in some order;
//   * cp.async: copies are queued per thread and commit group and land at the latest moment the
//     program may rely on them (cp.async.wait_group N completes all but the N most recent committed
//     groups; the rest at thread exit), or at issue with RAL_EMU_CP_ASYNC=early; src-size < 16
//     zero-fills; addresses are checked (16-byte aligned, destination inside the dynamic smem);
//   * dynamic shared memory is exactly the launch's byte count, poisoned with 0xff (a NaN in fp16
//     and bf16) before each block, followed by a canary checked after it; ldmatrix and cp.async
//     check their shared addresses against it;
//   * a race check on the shared-memory accesses it sees (cp.async writes, ldmatrix reads; 16-byte
//     granules, epochs = the block's barriers): ldmatrix of bytes whose cp.async is still in flight
//     (no wait_group) or that another thread's copy wrote since the last __syncthreads, a cp.async
//     into bytes another warp read since the last __syncthreads, two copies in flight into the same
//     bytes: each is an error whatever the schedule. Plain loads / stores are not tracked;
//   * cp.async sources must lie inside the ranges registered with ral_emu_allow (the tests register
//     the extents of the input views), when any are;
//   * device queries: RAL_EMU_SMS multiprocessors (default 4), RAL_EMU_SMEM_OPTIN bytes of
//     opt-in shared memory per block (default 232448 as on H100; A100: 166912, sm_86/89: 101376),
//     compute capability 8.0.
// Not modelled: real concurrency and memory ordering (atomics are plain adds, one thread at a
// time), bank conflicts, timing, the exact rounding of the tensor cores' internal accumulation
// (fp32 sums, k in order), register limits and spills, global-memory bounds of plain loads / stores
// and atomics, races through plain shared-memory loads / stores (only the value checks see those),
// intra-warp divergence between collectives (lanes run one after another; __syncwarp is not needed
// and not provided), float2 atomics (the sm_90 branch is not compiled: __CUDA_ARCH__ is undefined).
// An emulator error (deadlock, divergent collective, bad address) aborts the launch and is
// reported by cudaGetLastError() / cudaGetErrorString() as a message. Global-memory bounds are
// checked by the sanitizer build instead (tests/cuda_emu/memcheck.py: ASan redzones around torch's
// tensors, the bytes past the launch's dynamic shared memory poisoned, UBSan).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __launch_bounds__(...)

namespace ral_emu {

struct ThreadCtx {
  uint3 thread_idx;
};
struct BlockCtx {
  uint3 block_idx;
  dim3 block_dim, grid_dim;
};
extern ThreadCtx* g_thread;  // the running coroutine
extern BlockCtx g_block;

// ---- barriers and warp collectives (all block / all lanes of the warp must call them) --------
void syncthreads();
int syncthreads_or(int pred);
float shfl_xor(uint32_t mask, float x, int lane_mask);
int shfl_xor(uint32_t mask, int x, int lane_mask);
// d = a (16x16 row) * b (16x8 col) + c; kind 1: f16, 2: bf16 (ral::DType codes)
void mma_m16n8k16(int kind, float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr, bool trans);
// ---- cp.async -----------------------------------------------------------------------------
void cp_async16(void* dst, const void* src, int src_size);
void cp_async_commit();
void cp_async_wait(int n);
// ---- launches -----------------------------------------------------------------------------
unsigned char* dynamic_smem();
struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  LaunchConfig(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr) : grid(g), block(b), smem(s), stream(st) {}
};
void run_grid(const void* kernel, const LaunchConfig& cfg, const std::function<void()>& body);

template <typename... P, typename... A>
void launch(void (*kernel)(P...), const LaunchConfig& cfg, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launch: argument count");
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);  // converted once, like a real launch
  run_grid(reinterpret_cast<const void*>(kernel), cfg, [&] { std::apply(kernel, params); });
}

}  // namespace ral_emu

// cuda_runtime.h has this C++ overload only under nvcc
template <class T>
inline cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}

#define threadIdx (::ral_emu::g_thread->thread_idx)
#define blockIdx (::ral_emu::g_block.block_idx)
#define blockDim (::ral_emu::g_block.block_dim)
#define gridDim (::ral_emu::g_block.grid_dim)

inline void __syncthreads() { ral_emu::syncthreads(); }
inline int __syncthreads_or(int pred) { return ral_emu::syncthreads_or(pred); }
inline float __shfl_xor_sync(unsigned mask, float x, int lane_mask, int width = 32) {
  (void)width;
  return ral_emu::shfl_xor(mask, x, lane_mask);
}
inline int __shfl_xor_sync(unsigned mask, int x, int lane_mask, int width = 32) {
  (void)width;
  return ral_emu::shfl_xor(mask, x, lane_mask);
}
inline float atomicAdd(float* address, float val) {  // one coroutine at a time: a plain add
  const float old = *address;
  *address = old + val;
  return old;
}
inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, sizeof(f));
  return f;
}
inline int __float_as_int(float x) {
  int i;
  std::memcpy(&i, &x, sizeof(i));
  return i;
}
inline size_t __cvta_generic_to_shared(const void* p) { return reinterpret_cast<uintptr_t>(p); }  // unused
using std::isfinite;
using std::isinf;
using std::isnan;
using std::max;
using std::min;
