// Host-side argument handling shared by the CPU and CUDA implementations of the pooling ops.
// The Python wrappers validate everything first (mvit_kernels/checks.py, the same checks the
// reference runs); these TORCH_CHECKs are the second line of defence for direct torch.ops calls.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "pool3d_common.h"

namespace mvit {

// Parses "max" | "avg" | "conv".
PoolMode parse_pool_mode(const std::string& mode);

// Validates the window and the token count against thw and returns the geometry.
PoolGeom make_pool_geom(at::IntArrayRef thw, at::IntArrayRef kernel, at::IntArrayRef stride,
                        at::IntArrayRef padding, bool has_cls, int64_t num_tokens, const char* op);

// Checks that t is a floating tensor on x's device with x's dtype (optional tensors may be undefined).
void check_like(const at::Tensor& t, const at::Tensor& x, const char* name, const char* op);

// Checks pool3d's tensors; returns x with a unit stride over d (other strides are kept).
at::Tensor check_pool3d_tensors(const at::Tensor& x, PoolMode mode, const c10::optional<at::Tensor>& weight,
                                const PoolGeom& g, const c10::optional<at::Tensor>& norm_weight,
                                const c10::optional<at::Tensor>& norm_bias, const char* op);

// Checks pool_residual_add's tensors (x (B, N, C), branch (B, N', C), scale (B,) or none).
void check_pool_residual_add_tensors(const at::Tensor& x, const at::Tensor& branch,
                                     const c10::optional<at::Tensor>& scale, const PoolGeom& g, const char* op);

inline int64_t out_tokens(const PoolGeom& g) { return g.cls + g.out_grid(); }

// All of pool3d's argument checks (forward and backward take the same ones): rank, window,
// tensors. Returns the geometry; *x receives x_in with a unit stride over d.
PoolGeom check_pool3d_args(const at::Tensor& x_in, at::IntArrayRef thw, at::IntArrayRef kernel,
                           at::IntArrayRef stride, at::IntArrayRef padding, PoolMode mode,
                           const c10::optional<at::Tensor>& weight, bool has_cls,
                           const c10::optional<at::Tensor>& norm_weight,
                           const c10::optional<at::Tensor>& norm_bias, double eps, const char* op, at::Tensor* x);

// All of pool_residual_add's argument checks (forward and backward); returns the geometry.
PoolGeom check_pool_residual_add_args(const at::Tensor& x, at::IntArrayRef thw, at::IntArrayRef kernel,
                                      at::IntArrayRef stride, at::IntArrayRef padding, const at::Tensor& branch,
                                      const c10::optional<at::Tensor>& scale, bool has_cls, const char* op);

// Checks an incoming gradient against the shape it must have and x's device and dtype;
// returns it contiguous.
at::Tensor check_grad(const at::Tensor& grad, at::IntArrayRef expected, const at::Tensor& x, const char* name,
                      const char* op);

}  // namespace mvit
