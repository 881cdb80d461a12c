// The backward's fp16 kernels and its host-side size query (the kernels: attention_kl_bwd.cuh; bf16:
// attention_kl_bwd_bf16.cu, a translation unit of its own so that the two compile in parallel).
#include "cuda/attention_kl_bwd.cuh"

namespace ral::cuda {

int64_t backward_min_smem(const AttentionKLParams& p) { return bwd_smem(p).bytes(1); }

template cudaError_t launch_backward<__half>(const AttentionKLParams&, cudaStream_t, const DeviceInfo&);

}  // namespace ral::cuda
