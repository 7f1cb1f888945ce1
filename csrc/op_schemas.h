// The schemas of the pooling ops, as strings: registered for mvit_kernels by ops.cpp, and for
// the test-only library that runs the CUDA kernels on the CPU (tests/cpp/cuda_emulated_ops.cpp),
// so both take exactly the same arguments.
#pragma once

namespace mvit {

// y = LayerNorm(cat(cls, pool(grid))) in the (B, heads, N, d) layout. The backward returns
// (grad_x, grad_weight, grad_norm_weight, grad_norm_bias); a gradient whose input is absent
// (weight outside conv mode, norm params without norm) comes back as an empty tensor.
constexpr const char* kPool3dSchema =
    "pool3d(Tensor x, int[] thw, int[] kernel, int[] stride, int[] padding, str mode, Tensor? weight, "
    "bool has_cls, Tensor? norm_weight, Tensor? norm_bias, float eps) -> Tensor";
constexpr const char* kPool3dBackwardSchema =
    "pool3d_backward(Tensor grad_y, Tensor x, int[] thw, int[] kernel, int[] stride, int[] padding, str mode, "
    "Tensor? weight, bool has_cls, Tensor? norm_weight, Tensor? norm_bias, float eps) "
    "-> (Tensor, Tensor, Tensor, Tensor)";
// out = maxpool_skip(x) + scale[:, None, None] * branch; the backward returns
// (grad_x, grad_branch, grad_scale), grad_scale empty when scale is None.
constexpr const char* kPoolResidualAddSchema =
    "pool_residual_add(Tensor x, int[] thw, int[] kernel, int[] stride, int[] padding, Tensor branch, "
    "Tensor? scale, bool has_cls) -> Tensor";
constexpr const char* kPoolResidualAddBackwardSchema =
    "pool_residual_add_backward(Tensor grad_out, Tensor x, int[] thw, int[] kernel, int[] stride, "
    "int[] padding, Tensor branch, Tensor? scale, bool has_cls) -> (Tensor, Tensor, Tensor)";

}  // namespace mvit
