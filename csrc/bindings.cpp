// ral._C: the pybind11 module over the CPU kernels (always) and the CUDA kernels (when built
// with nvcc, RAL_WITH_CUDA). No libtorch: Python hands over an AttentionKLParams of raw
// addresses, shapes and strides (csrc/common/params.h). Kernels run with the GIL released;
// std::invalid_argument from the parameter re-checks becomes ValueError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "common/check.h"
#include "common/params.h"
#include "cpu/api.h"
#if defined(RAL_WITH_CUDA)
#include "cuda/api.h"
#endif

namespace py = pybind11;
using ral::AttentionKLParams;
using ral::View;

namespace {

std::vector<int64_t> get_stride(const View& v) { return {v.stride, v.stride + 4}; }

void set_stride(View& v, const std::vector<int64_t>& stride) {
  if (stride.size() > 4) throw std::invalid_argument("View.stride: at most 4 strides, got " + std::to_string(stride.size()));
  for (size_t i = 0; i < 4; ++i) v.stride[i] = i < stride.size() ? stride[i] : 0;
}

#if defined(RAL_WITH_CUDA)
void cuda_check(int code) {
  if (code != 0) throw std::runtime_error(std::string("ral._C (CUDA): ") + ral::cuda::error_string(code));
}
#endif

}  // namespace

// RAL_MODULE_NAME: the test build of tests/cuda_emu compiles this file into another module; the
// classes are module-local so that both modules can live in one process.
#if !defined(RAL_MODULE_NAME)
#define RAL_MODULE_NAME _C
#endif

PYBIND11_MODULE(RAL_MODULE_NAME, m) {
  m.doc() = "ral compiled kernels: fused attention + attention-divergence (see csrc/common/params.h)";

  py::class_<View>(m, "View", "A strided view: element (i0..i3) at ptr + sum(i_n * stride[n]) elements.",
                   py::module_local())
      .def(py::init<>())
      .def_readwrite("ptr", &View::ptr)
      .def_property("stride", &get_stride, &set_stride);

  py::class_<AttentionKLParams> params(m, "AttentionKLParams", "One kernel call (csrc/common/params.h).",
                                       py::module_local());
  params.def(py::init<>());
#define RAL_FIELD(name) params.def_readwrite(#name, &AttentionKLParams::name)
  RAL_FIELD(batch); RAL_FIELD(heads); RAL_FIELD(kv_heads); RAL_FIELD(q_len); RAL_FIELD(k_len);
  RAL_FIELD(head_dim); RAL_FIELD(v_head_dim); RAL_FIELD(ref_heads); RAL_FIELD(ref_kv_heads);
  RAL_FIELD(ref_head_dim);
  RAL_FIELD(dtype); RAL_FIELD(ref_dtype); RAL_FIELD(divergence); RAL_FIELD(heads_each);
  RAL_FIELD(exclude_self); RAL_FIELD(causal); RAL_FIELD(has_v); RAL_FIELD(has_ref_stats);
  RAL_FIELD(has_key_padding_mask); RAL_FIELD(has_row_mask); RAL_FIELD(scale); RAL_FIELD(ref_scale);
  RAL_FIELD(num_threads);
  RAL_FIELD(q); RAL_FIELD(k); RAL_FIELD(v); RAL_FIELD(q_ref); RAL_FIELD(k_ref);
  RAL_FIELD(ref_stats_in); RAL_FIELD(key_padding_mask); RAL_FIELD(row_mask);
  RAL_FIELD(out); RAL_FIELD(div); RAL_FIELD(stats); RAL_FIELD(ref_stats_out); RAL_FIELD(gbar); RAL_FIELD(cbar);
  RAL_FIELD(dout); RAL_FIELD(ddiv); RAL_FIELD(delta); RAL_FIELD(dq); RAL_FIELD(dk); RAL_FIELD(dv);
  RAL_FIELD(scratch); RAL_FIELD(scratch_bytes);
  RAL_FIELD(seqs); RAL_FIELD(num_seqs); RAL_FIELD(max_q_len); RAL_FIELD(max_k_len);
  RAL_FIELD(policy_stats); RAL_FIELD(num_segments); RAL_FIELD(key_segments); RAL_FIELD(entropy); RAL_FIELD(mass);
  RAL_FIELD(cstats); RAL_FIELD(stats_w); RAL_FIELD(no_reference);
#undef RAL_FIELD

  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def("cpu_forward", &ral::cpu::forward, py::arg("p"), release,
        "Writes out, div, stats, gbar, cbar (and ref_stats_out without ref_stats); with scratch, caches "
        "the scores of pass 1 for pass 2 (as many key tiles as it holds).");
  m.def("cpu_forward_scratch_bytes", &ral::cpu::forward_scratch_bytes, py::arg("p"),
        "Bytes of a score cache for cpu_forward that holds every key tile: per thread, both models' "
        "scores of a query block against every key of its unit. Any smaller scratch caches fewer tiles.");
  m.def("cpu_backward", &ral::cpu::backward, py::arg("p"), release,
        "Accumulates fp32 dq, dk (and dv) into the zero-filled buffers of p.");
  m.def("cpu_backward_scratch_bytes", &ral::cpu::backward_scratch_bytes, py::arg("p"),
        "Bytes of scratch cpu_backward needs: per thread, one key tile's fp32 dK/dV.");
  m.attr("cpu_lanes") = ral::cpu::vector_lanes();  // 16 AVX-512, 8 AVX2, 4 SSE (csrc/cpu/simd.h)

#if defined(RAL_WITH_CUDA)
  m.attr("has_cuda") = true;
  m.def(
      "cuda_forward",
      [](const AttentionKLParams& p, uintptr_t stream) {
        ral::check_params(p, /*backward=*/false);
        cuda_check(ral::cuda::forward(p, stream));
      },
      py::arg("p"), py::arg("stream"), release);
  m.def(
      "cuda_backward",
      [](const AttentionKLParams& p, uintptr_t stream) {
        ral::check_params(p, /*backward=*/true);
        cuda_check(ral::cuda::backward(p, stream));
      },
      py::arg("p"), py::arg("stream"), release);
  m.def(
      "cuda_backward_scratch_bytes",
      [](const AttentionKLParams& p) {
        ral::check_params(p, /*backward=*/false);
        return ral::cuda::backward_scratch_bytes(p);
      },
      py::arg("p"));
  m.def("cuda_supports", &ral::cuda::supports, py::arg("p"));
  m.def("cuda_head_dims", &ral::cuda::head_dims);
#else
  m.attr("has_cuda") = false;
#endif
}
