// Unit test of the emulator itself (tests/test_cuda_emulated.py::test_emulator_selftest): one warp
// loads A (16x16) and B (16x8) from shared memory with ldmatrix (B both as B^T rows with the plain
// form and as B rows with .trans), runs mma.sync m16n8k16 on C, and its D fragment (PTX ISA C/D
// layout: lane 4g+t holds rows g, g+8 x cols 2t, 2t+1) must equal C + A B computed on the host;
// __shfl_xor_sync must return the partner lane's value. Built like the kernels (build.py).
#include <cmath>
#include <cstdio>
#include <string>

#include "cuda/kernel_utils.cuh"

namespace {

constexpr int kLd = 24;  // padded row of 16 halves + 8 (16-byte aligned rows)

template <typename T>
__global__ void selftest_kernel(const float* a, const float* b, const float* c, float* d, float* d_trans,
                                float* shfl) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sA = reinterpret_cast<T*>(smem_raw);  // [16][kLd]  A row-major
  T* sBt = sA + 16 * kLd;                  // [8][kLd]   B^T: row n holds B[0..15][n]
  T* sB = sBt + 8 * kLd;                   // [16][kLd]  B row-major (8 columns used)
  const int lane = threadIdx.x;
  for (int i = lane; i < 16 * 16; i += 32) {
    const int r = i / 16, col = i % 16;
    sA[r * kLd + col] = T(a[i]);
    if (r < 8) sBt[r * kLd + col] = T(b[col * 8 + r]);
    sB[r * kLd + col] = T(col < 8 ? b[r * 8 + col] : 0.f);
  }
  __syncthreads();
  uint32_t fa[4], fb[4], fbt[4];
  // A: matrices (rows 0-7 | 8-15) x (cols 0-7 | 8-15) in the order a0..a3 of the mma A fragment
  ral::cuda::ldmatrix_x4(fa, sA + (lane & 15) * kLd + (lane >> 4) * 8);
  // B^T rows 0-7, cols 0-7 then 8-15 (lanes 16-31 repeat the addresses)
  ral::cuda::ldmatrix_x4(fb, sBt + (lane & 7) * kLd + ((lane >> 3) & 1) * 8);
  // B rows 0-7 then 8-15 (.trans)
  ral::cuda::ldmatrix_x4_trans(fbt, sB + (lane & 15) * kLd);
  const int g = lane >> 2, t = lane & 3;
  float acc[4], acc2[4];
  for (int e = 0; e < 4; ++e) acc[e] = acc2[e] = c[(g + 8 * (e >> 1)) * 8 + 2 * t + (e & 1)];
  ral::cuda::mma16816<T>(acc, fa, fb[0], fb[1]);
  ral::cuda::mma16816<T>(acc2, fa, fbt[0], fbt[1]);
  for (int e = 0; e < 4; ++e) {
    d[(g + 8 * (e >> 1)) * 8 + 2 * t + (e & 1)] = acc[e];
    d_trans[(g + 8 * (e >> 1)) * 8 + 2 * t + (e & 1)] = acc2[e];
  }
  shfl[lane] = __shfl_xor_sync(0xffffffffu, float(lane) * 1.5f, 5);
}

template <typename T>
std::string run_one(const char* name) {
  float a[256], b[128], c[128], d[128], dt[128], shfl[32];
  for (int i = 0; i < 256; ++i) a[i] = float((i * 37) % 23 - 11) / 8.f;  // exact in fp16 and bf16
  for (int i = 0; i < 128; ++i) b[i] = float((i * 53) % 19 - 9) / 4.f, c[i] = float(i % 7) - 3.f;
  const size_t smem = (16 + 8 + 16) * kLd * sizeof(T);
  ::ral_emu::launch(selftest_kernel<T>, ::ral_emu::LaunchConfig(1, 32, smem, nullptr), a, b, c, d, dt, shfl);
  if (cudaGetLastError() != cudaSuccess) return std::string(name) + ": launch failed: " + cudaGetErrorString(cudaErrorLaunchFailure);
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      double want = c[i * 8 + j];
      for (int k = 0; k < 16; ++k) want += double(a[i * 16 + k]) * b[k * 8 + j];
      for (const float* got : {d, dt})
        if (std::fabs(got[i * 8 + j] - want) > 1e-4) {
          char msg[200];
          std::snprintf(msg, sizeof(msg), "%s: D[%d][%d] = %g, want %g (%s)", name, i, j, got[i * 8 + j], want,
                        got == d ? "ldmatrix" : "ldmatrix.trans");
          return msg;
        }
    }
  for (int l = 0; l < 32; ++l)
    if (shfl[l] != float(l ^ 5) * 1.5f) return std::string(name) + ": shfl_xor wrong at lane " + std::to_string(l);
  return "ok";
}

// The emulator's own checks: mode 0 is correct; 1 reads other threads' cp.async data with no wait
// and no barrier, 3 with a wait but no barrier (races), 2 lets lane 0 skip a warp collective and a
// barrier (deadlock).
__global__ void race_kernel(const __half* g, int mode) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __half* s = reinterpret_cast<__half*>(smem_raw);  // [32][8]
  const int lane = threadIdx.x;
  ral::cuda::cp_async16(s + lane * 8, g + lane * 8, true);
  ral::cuda::cp_async_commit();
  if (mode != 1) ral::cuda::cp_async_wait<0>();
  if (mode == 0 || mode == 2) __syncthreads();
  if (mode == 2 && lane == 0) return;
  uint32_t r[4];
  ral::cuda::ldmatrix_x4(r, s + (lane ^ 1) * 8);  // row lane ^ 1: another thread's copy
  if (mode == 2) __syncthreads();
}

}  // namespace

extern "C" __attribute__((visibility("default"))) const char* ral_emu_selftest_race(int mode) {
  alignas(16) static __half g[32 * 8];
  static std::string msg;
  ::ral_emu::launch(race_kernel, ::ral_emu::LaunchConfig(1, 32, 32 * 8 * sizeof(__half), nullptr), g, mode);
  msg = cudaGetLastError() == cudaSuccess ? "ok" : cudaGetErrorString(cudaErrorLaunchFailure);
  return msg.c_str();
}

extern "C" __attribute__((visibility("default"))) const char* ral_emu_selftest(void) {
  static std::string msg;
  msg = run_one<__half>("fp16");
  if (msg == "ok") msg = run_one<__nv_bfloat16>("bf16");
  return msg.c_str();
}
