// The schemas of the C++ ops, as strings: registered for mvit_kernels by ops.cpp, and the pooling
// ops' also for the test-only library that runs the CUDA kernels on the CPU
// (tests/cpp/cuda_emulated_ops.cpp), so both take exactly the same arguments.
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

// Query rows row0 .. row0 + out.size(2) of MViTv2's rel-pos bias as SDPA's additive mask, written
// into out (B, heads, rows, N_kv): q (B, heads, N_q, d) the pooled queries, table_a the axis'
// table interpolated and indexed by (query, key) coordinate, (Q_a, K_a, d)
// (mvit_kernels.reference.rel_pos_tables); zero on the class token's row and column. CPU only
// (inference; the CUDA path writes the mask in torch).
constexpr const char* kRelPosMaskSchema =
    "rel_pos_mask(Tensor q, Tensor? table_t, Tensor? table_h, Tensor? table_w, int[] thw_q, int[] thw_kv, "
    "bool has_cls, int row0, Tensor(a!) out) -> ()";

}  // namespace mvit
