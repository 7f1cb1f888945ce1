// Host-side argument handling shared by the CPU and CUDA implementations of the pooling ops
// (declared in pool_args.h). The schemas that use them are registered in ops.cpp.
#include "pool_args.h"

#include <algorithm>
#include <cmath>

namespace mvit {

PoolMode parse_pool_mode(const std::string& mode) {
  if (mode == "max") return kMax;
  if (mode == "avg") return kAvg;
  if (mode == "conv") return kConv;
  TORCH_CHECK(false, "mvit_kernels.pool3d: mode must be one of 'max', 'avg', 'conv', got '", mode, "'");
}

PoolGeom make_pool_geom(at::IntArrayRef thw, at::IntArrayRef kernel, at::IntArrayRef stride,
                        at::IntArrayRef padding, bool has_cls, int64_t num_tokens, const char* op) {
  TORCH_CHECK(thw.size() == 3, op, ": thw must have 3 entries (t, h, w), got ", thw.size());
  TORCH_CHECK(kernel.size() == 3, op, ": kernel must have 3 entries (t, h, w), got ", kernel.size());
  TORCH_CHECK(stride.size() == 3, op, ": stride must have 3 entries (t, h, w), got ", stride.size());
  TORCH_CHECK(padding.size() == 3, op, ": padding must have 3 entries (t, h, w), got ", padding.size());
  const char* axes = "thw";
  // Products bounded as they are formed: thw = (2^32, 2^32, 1) wrapped to 0 tokens in int64, and
  // a kernel of 2^61 reached the 32-bit window loops as 0 (a division by zero).
  int64_t grid = 1, taps = 1;
  for (int a = 0; a < 3; ++a) {
    TORCH_CHECK(thw[a] >= 1, op, ": thw must be positive, got ", thw);
    TORCH_CHECK(thw[a] <= INT32_MAX / grid, op, ": thw must hold at most 2^31 - 1 positions, got ", thw);
    grid *= thw[a];
    TORCH_CHECK(kernel[a] >= 1, op, ": kernel[", axes[a], "] must be >= 1, got ", kernel[a]);
    TORCH_CHECK(kernel[a] <= INT32_MAX / taps, op, ": kernel must have at most 2^31 - 1 taps, got ", kernel);
    taps *= kernel[a];
    TORCH_CHECK(stride[a] >= 1 && stride[a] <= INT32_MAX, op, ": stride[", axes[a], "] must be in [1, 2^31 - 1], got ",
                stride[a]);
    TORCH_CHECK(padding[a] >= 0 && 2 * padding[a] <= kernel[a], op, ": padding[", axes[a],
                "] must be in [0, kernel//2], got ", padding[a]);
    TORCH_CHECK(thw[a] + 2 * padding[a] >= kernel[a], op, ": kernel[", axes[a],
                "] is larger than the padded input");
  }
  // The window loops form offsets from a window's first position, which may lie in the padding,
  // in 32 bits: the padded grid bounds them all. (A kernel of 2^21 padded by 2^20 on a 64 x 64
  // frame overflowed them.)
  int64_t padded = 1;
  for (int a = 0; a < 3; ++a) {
    const int64_t extent = thw[a] + 2 * padding[a];
    TORCH_CHECK(extent <= INT32_MAX / padded, op, ": the padded input must hold at most 2^31 - 1 positions, got thw=",
                thw, " and padding=", padding);
    padded *= extent;
  }
  PoolGeom g;
  g.T = thw[0]; g.H = thw[1]; g.W = thw[2];
  g.kT = kernel[0]; g.kH = kernel[1]; g.kW = kernel[2];
  // A stride past the padded axis leaves one output, whose window does not depend on it. Clamped
  // to the axis, a stride never meets the 32-bit arithmetic near 2^31.
  g.sT = std::min<int64_t>(stride[0], g.T + 2 * padding[0]);
  g.sH = std::min<int64_t>(stride[1], g.H + 2 * padding[1]);
  g.sW = std::min<int64_t>(stride[2], g.W + 2 * padding[2]);
  g.pT = padding[0]; g.pH = padding[1]; g.pW = padding[2];
  g.To = pool_out_size(g.T, g.kT, g.sT, g.pT);
  g.Ho = pool_out_size(g.H, g.kH, g.sH, g.pH);
  g.Wo = pool_out_size(g.W, g.kW, g.sW, g.pW);
  g.cls = has_cls ? 1 : 0;
  // The window loops (pool3d_common.h) index a sample's grid in 32 bits.
  TORCH_CHECK(g.in_grid() + g.cls <= INT32_MAX, op, ": at most 2^31 - 1 tokens per sample, thw=", thw, " has ",
              g.in_grid());
  TORCH_CHECK(num_tokens == g.in_grid() + g.cls, op, ": x has ", num_tokens, " tokens but thw=", thw,
              has_cls ? " + 1 class token" : "", " implies ", g.in_grid() + g.cls);
  return g;
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has dtype ", x.scalar_type());
}

static void check_float(const at::Tensor& x, const char* op) {
  const auto s = x.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf, op,
              ": x must be float32, float64, bfloat16 or float16, got ", s);
}

at::Tensor check_pool3d_tensors(const at::Tensor& x, PoolMode mode, const c10::optional<at::Tensor>& weight,
                                const PoolGeom& g, const c10::optional<at::Tensor>& norm_weight,
                                const c10::optional<at::Tensor>& norm_bias, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D tensor (B, heads, N, d), got ", x.sizes());
  check_float(x, op);
  const int64_t d = x.size(3);
  if (mode == kConv) {
    TORCH_CHECK(weight.has_value() && weight->defined(), op, ": mode='conv' needs weight of shape (d, 1, kT, kH, kW)");
    const std::vector<int64_t> expected{d, 1, g.kT, g.kH, g.kW};
    TORCH_CHECK(weight->sizes() == at::IntArrayRef(expected), op, ": weight must have shape ", at::IntArrayRef(expected),
                " (d, 1, *kernel), got ", weight->sizes());
    check_like(*weight, x, "weight", op);
  } else {
    TORCH_CHECK(!(weight.has_value() && weight->defined()), op, ": weight is only used with mode='conv'");
  }
  const bool has_w = norm_weight.has_value() && norm_weight->defined();
  const bool has_b = norm_bias.has_value() && norm_bias->defined();
  TORCH_CHECK(has_w == has_b, op, ": norm_weight and norm_bias must be given together");
  if (has_w) {
    TORCH_CHECK(norm_weight->dim() == 1 && norm_weight->size(0) == d, op, ": norm_weight must have shape (", d,
                ",) to normalize over d, got ", norm_weight->sizes());
    TORCH_CHECK(norm_bias->dim() == 1 && norm_bias->size(0) == d, op, ": norm_bias must have shape (", d,
                ",) to normalize over d, got ", norm_bias->sizes());
    check_like(*norm_weight, x, "norm_weight", op);
    check_like(*norm_bias, x, "norm_bias", op);
  }
  // The kernels index rows through the strides of B, heads and N (so q/k/v sliced out of the
  // qkv projection are read in place) but need the channels contiguous.
  return x.stride(3) == 1 ? x : x.contiguous();
}

void check_pool_residual_add_tensors(const at::Tensor& x, const at::Tensor& branch,
                                     const c10::optional<at::Tensor>& scale, const PoolGeom& g, const char* op) {
  TORCH_CHECK(x.dim() == 3, op, ": x must be a 3-D tensor (B, N, C), got ", x.sizes());
  check_float(x, op);
  const std::vector<int64_t> expected{x.size(0), out_tokens(g), x.size(2)};
  TORCH_CHECK(branch.sizes() == at::IntArrayRef(expected), op, ": branch must have shape ", at::IntArrayRef(expected),
              " (the pooled x), got ", branch.sizes());
  check_like(branch, x, "branch", op);
  if (scale.has_value() && scale->defined()) {
    TORCH_CHECK(scale->dim() == 1 && scale->size(0) == x.size(0), op, ": scale must have shape (", x.size(0),
                ",) (one factor per sample), got ", scale->sizes());
    check_like(*scale, x, "scale", op);
  }
}

PoolGeom check_pool3d_args(const at::Tensor& x_in, at::IntArrayRef thw, at::IntArrayRef kernel,
                           at::IntArrayRef stride, at::IntArrayRef padding, PoolMode mode,
                           const c10::optional<at::Tensor>& weight, bool has_cls,
                           const c10::optional<at::Tensor>& norm_weight,
                           const c10::optional<at::Tensor>& norm_bias, double eps, const char* op, at::Tensor* x) {
  TORCH_CHECK(x_in.dim() == 4, op, ": x must be a 4-D tensor (B, heads, N, d), got ", x_in.sizes());
  const PoolGeom g = make_pool_geom(thw, kernel, stride, padding, has_cls, x_in.size(2), op);
  TORCH_CHECK(mode != kAvg || (g.T >= g.kT && g.H >= g.kH && g.W >= g.kW), op,
              ": mode='avg' needs thw at least the kernel on every axis (as torch's avg_pool3d), got thw (", g.T,
              ", ", g.H, ", ", g.W, ") and kernel (", g.kT, ", ", g.kH, ", ", g.kW, ")");
  *x = check_pool3d_tensors(x_in, mode, weight, g, norm_weight, norm_bias, op);
  // A negative eps makes var + eps negative: NaN rows, not an error, without this check.
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ", eps);
  return g;
}

PoolGeom check_pool_residual_add_args(const at::Tensor& x, at::IntArrayRef thw, at::IntArrayRef kernel,
                                      at::IntArrayRef stride, at::IntArrayRef padding, const at::Tensor& branch,
                                      const c10::optional<at::Tensor>& scale, bool has_cls, const char* op) {
  TORCH_CHECK(x.dim() == 3, op, ": x must be a 3-D tensor (B, N, C), got ", x.sizes());
  const PoolGeom g = make_pool_geom(thw, kernel, stride, padding, has_cls, x.size(1), op);
  check_pool_residual_add_tensors(x, branch, scale, g, op);
  return g;
}

at::Tensor check_grad(const at::Tensor& grad, at::IntArrayRef expected, const at::Tensor& x, const char* name,
                      const char* op) {
  TORCH_CHECK(grad.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", grad.sizes());
  check_like(grad, x, name, op);
  return grad.contiguous();
}

}  // namespace mvit
