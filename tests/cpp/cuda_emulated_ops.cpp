// The CUDA pooling ops (csrc/cuda/pool_ops_cuda.cu, launchers and kernels unchanged) compiled
// for the CPU through tests/cpp/cuda_emulation.h, registered as the test-only library
// mvit_cuda_emulated with mvit_kernels' schemas. tests/test_cuda_emulated.py builds it and
// compares it with the CPU ops. A few small kernels here check the emulator itself.
#define MVIT_CUDA_EMULATION
#include "pool_ops_cuda.cu"

#include "op_schemas.h"

namespace mvit {
namespace {

void configure(int64_t multiprocessors, bool reverse_order) {
  TORCH_CHECK(multiprocessors >= 1, "multiprocessors must be >= 1");
  cuda_emulation::config().multiprocessors = static_cast<int>(multiprocessors);
  cuda_emulation::config().reverse_order = reverse_order;
}

// Emulator checks. row_sums: each block row sums its x row with pool_ops_cuda.cu's row_sum
// (warp shuffles, then shared memory), over a grid-stride loop.
__global__ void row_sums_kernel(const float* x, float* out, int64_t rows, int64_t d) {
  float* smem = dynamic_smem<float>();
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows;
       base += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t r = base + threadIdx.y;
    const bool active = r < rows && threadIdx.x < d;
    const float s = row_sum<float>(active ? x[r * d + threadIdx.x] : 0.0f, smem);
    if (active && threadIdx.x == 0) out[r] = s;
  }
}

at::Tensor row_sums(const at::Tensor& x_in) {
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "row_sums: a 2-D float32 tensor");
  at::Tensor out = at::empty({x.size(0)}, x.options());
  const Launch l = make_launch<float>(x.size(0), x.size(1));
  launch_kernel(row_sums_kernel, l.grid, l.block, l.smem, nullptr, x.data_ptr<float>(), out.data_ptr<float>(),
                x.size(0), x.size(1));
  return out;
}

// Broken kernels: each must fail in the emulator as it would misbehave on a GPU.
__global__ void early_exit_before_sync_kernel(float* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void divergent_shuffle_kernel(float* out) {
  float v = threadIdx.x;
  if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

void broken_kernel(c10::string_view which) {
  at::Tensor out = at::zeros({64}, at::kFloat);
  if (which == "early_exit_before_sync") {
    launch_kernel(early_exit_before_sync_kernel, dim3(1), dim3(64), 0, nullptr, out.data_ptr<float>());
  } else if (which == "divergent_shuffle") {
    launch_kernel(divergent_shuffle_kernel, dim3(1), dim3(64), 0, nullptr, out.data_ptr<float>());
  } else if (which == "too_many_threads") {
    launch_kernel(early_exit_before_sync_kernel, dim3(1), dim3(64, 32), 0, nullptr, out.data_ptr<float>());
  } else {
    TORCH_CHECK(false, "broken_kernel: unknown kernel ", which);
  }
}

}  // namespace
}  // namespace mvit

TORCH_LIBRARY(mvit_cuda_emulated, m) {
  m.def(mvit::kPool3dSchema);
  m.def(mvit::kPool3dBackwardSchema);
  m.def(mvit::kPoolResidualAddSchema);
  m.def(mvit::kPoolResidualAddBackwardSchema);
  m.def("configure(int multiprocessors, bool reverse_order) -> ()", &mvit::configure);
  m.def("row_sums(Tensor x) -> Tensor", &mvit::row_sums);
  m.def("broken_kernel(str which) -> ()", &mvit::broken_kernel);
}

TORCH_LIBRARY_IMPL(mvit_cuda_emulated, CPU, m) {
  m.impl("pool3d", &mvit::pool3d_cuda);
  m.impl("pool3d_backward", &mvit::pool3d_backward_cuda);
  m.impl("pool_residual_add", &mvit::pool_residual_add_cuda);
  m.impl("pool_residual_add_backward", &mvit::pool_residual_add_backward_cuda);
}
