// The backward's bf16 kernels (attention_kl_bwd.cuh), in a translation unit of their own so that
// they compile in parallel with the fp16 ones (attention_kl_bwd.cu).
#include "cuda/attention_kl_bwd.cuh"

namespace ral::cuda {

template cudaError_t launch_backward<__nv_bfloat16>(const AttentionKLParams&, cudaStream_t, const DeviceInfo&);

}  // namespace ral::cuda
