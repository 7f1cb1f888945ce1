// The schemas of the mvit_kernels C++/CUDA ops, registered once. The CPU and CUDA backends
// live in csrc/cpu and csrc/cuda; autograd, fake tensors and FLOP formulas are registered from
// Python (mvit_kernels/pool3d.py, mvit_kernels/pool_residual_add.py,
// mvit_kernels/pooling_attention.py).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "op_schemas.h"

namespace mvit {

static bool built_with_cuda() {
#ifdef MVIT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Whether at::parallel_for splits the CPU kernels over torch's intra-op threads: only where this
// extension was compiled with OpenMP (setup.py) or torch uses its native thread pool.
static bool built_with_cpu_threads() {
#ifdef INTRA_OP_PARALLEL
  return true;
#else
  return false;
#endif
}

}  // namespace mvit

TORCH_LIBRARY(mvit_kernels, m) {
  m.def("built_with_cuda() -> bool", &mvit::built_with_cuda);
  m.def("built_with_cpu_threads() -> bool", &mvit::built_with_cpu_threads);
  m.def(mvit::kPool3dSchema);
  m.def(mvit::kPool3dBackwardSchema);
  m.def(mvit::kPoolResidualAddSchema);
  m.def(mvit::kPoolResidualAddBackwardSchema);
  m.def(mvit::kRelPosMaskSchema);
}
