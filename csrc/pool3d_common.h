// Index math and window loops shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels of
// pool3d and pool_residual_add. Everything here is __host__ __device__, so the CPU tests run the
// same arithmetic the GPU kernels run.
//
// Layout: tokens of one (batch, head) are rows of d channels; a row index n counts the class
// token (if any) first, then the T*H*W grid in (t, h, w) row-major order. "Grid index" below
// means the index into that grid, without the class token.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MVIT_HD __host__ __device__
#define MVIT_FORCE_INLINE
#else
#define MVIT_HD
// The CPU kernels call the window loops from functions compiled for AVX2 (target attribute);
// forcing them inline lets the loop bodies be vectorized for that target.
#if defined(__GNUC__)
#define MVIT_FORCE_INLINE __attribute__((always_inline))
#else
#define MVIT_FORCE_INLINE
#endif
#endif

namespace mvit {

enum PoolMode : int { kMax = 0, kAvg = 1, kConv = 2 };

MVIT_HD inline int64_t pool_out_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding) {
  return (size + 2 * padding - kernel) / stride + 1;  // floor (ceil_mode=False); arguments are validated
}

struct PoolGeom {
  int64_t T, H, W;        // input grid
  int64_t To, Ho, Wo;     // output grid
  int64_t kT, kH, kW;
  int64_t sT, sH, sW;
  int64_t pT, pH, pW;
  int64_t cls;            // 1 with a class token, else 0

  MVIT_HD int64_t kernel_volume() const { return kT * kH * kW; }
  MVIT_HD int64_t in_grid() const { return T * H * W; }
  MVIT_HD int64_t out_grid() const { return To * Ho * Wo; }
};

// Calls f(k, i) for every window position of output grid index o that falls inside the input:
// k is the flat kernel offset ((kt * kH + kh) * kW + kw, the layout of a (d, 1, kT, kH, kW)
// conv weight), i the input grid index. Positions in the padding are skipped: for max they are
// -inf and never win, for avg they count in the divisor (count_include_pad=True), for conv they
// multiply zeros. Iteration order is increasing i, so "first maximum wins" matches PyTorch.
// for_each_window_input_at is the same with o given as its (ot, oh, ow) coordinates.
template <class F>
MVIT_HD MVIT_FORCE_INLINE inline void for_each_window_input_at(const PoolGeom& g, int64_t ot, int64_t oh, int64_t ow,
                                                                F&& f) {
  const int64_t t0 = ot * g.sT - g.pT, h0 = oh * g.sH - g.pH, w0 = ow * g.sW - g.pW;
  for (int64_t kt = 0; kt < g.kT; ++kt) {
    const int64_t t = t0 + kt;
    if (t < 0 || t >= g.T) continue;
    for (int64_t kh = 0; kh < g.kH; ++kh) {
      const int64_t h = h0 + kh;
      if (h < 0 || h >= g.H) continue;
      for (int64_t kw = 0; kw < g.kW; ++kw) {
        const int64_t w = w0 + kw;
        if (w < 0 || w >= g.W) continue;
        f((kt * g.kH + kh) * g.kW + kw, (t * g.H + h) * g.W + w);
      }
    }
  }
}

template <class F>
MVIT_HD MVIT_FORCE_INLINE inline void for_each_window_input(const PoolGeom& g, int64_t o, F&& f) {
  for_each_window_input_at(g, o / (g.Wo * g.Ho), (o / g.Wo) % g.Ho, o % g.Wo, f);
}

// Division by a divisor fixed at launch, as a multiply-high, an add and a shift (Granlund and
// Montgomery; the scheme of ATen's IntDivider). The CUDA kernels split every output row index
// into (batch, head, token, t, h, w): with 64-bit '/' and '%' that was 7 divisions per row, each
// a call of ~70 compiled instructions. Valid for divisors in [1, 2^31) and n < 2^31, which the
// launchers check (tests/cpp/index_math_test.cpp checks the arithmetic).
struct FastDivmod {
  uint32_t divisor = 1, magic = 1, shift = 0;

  FastDivmod() = default;
  explicit FastDivmod(uint32_t d) : divisor(d) {
    while ((uint64_t{1} << shift) < d) ++shift;
    magic = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }
  MVIT_HD uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(n, magic);
#else
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(n) * magic) >> 32);
#endif
    return static_cast<uint32_t>((static_cast<uint64_t>(hi) + n) >> shift);
  }
  MVIT_HD void divmod(uint32_t n, uint32_t* q, uint32_t* r) const {
    *q = div(n);
    *r = n - *q * divisor;
  }
};

// An output row r of a (slabs, heads, n_out) row space: slab = batch * heads + head, token n
// (class token first), and for grid tokens their (ot, oh, ow).
struct OutputRow {
  uint32_t batch, head, n;
  bool is_cls;
  uint32_t ot, oh, ow;
};

struct OutputRowDivs {
  FastDivmod n_out, heads, Wo, Ho;
  uint32_t cls;

  OutputRowDivs() = default;
  OutputRowDivs(const PoolGeom& g, int64_t heads_)
      : n_out(static_cast<uint32_t>(g.cls + g.out_grid())),
        heads(static_cast<uint32_t>(heads_)),
        Wo(static_cast<uint32_t>(g.Wo)),
        Ho(static_cast<uint32_t>(g.Ho)),
        cls(static_cast<uint32_t>(g.cls)) {}

  MVIT_HD OutputRow operator()(uint32_t r) const {
    OutputRow row{};
    uint32_t slab, q;
    n_out.divmod(r, &slab, &row.n);
    heads.divmod(slab, &row.batch, &row.head);
    row.is_cls = row.n < cls;
    if (!row.is_cls) {
      Wo.divmod(row.n - cls, &q, &row.ow);
      Ho.divmod(q, &row.ot, &row.oh);
    }
    return row;
  }
};

// Range of outputs along one axis whose window covers input position i: [lo, hi].
MVIT_HD MVIT_FORCE_INLINE inline void covering_range(int64_t i, int64_t k, int64_t s, int64_t p, int64_t n_out, int64_t* lo,
                                   int64_t* hi) {
  // o covers i  <=>  o*s - p <= i <= o*s - p + k - 1
  const int64_t a = i + p - k + 1;  // o*s >= a
  int64_t l = a <= 0 ? 0 : (a + s - 1) / s;
  int64_t h = (i + p) / s;  // i + p >= 0 always
  if (h > n_out - 1) h = n_out - 1;
  *lo = l;
  *hi = h;
}

// The outputs whose windows cover one input line (it, ih) along t and h: [t_lo, t_hi] x
// [h_lo, h_hi]. Computed once per line by the CUDA gathers, whose threads then walk the line's w.
struct CoverLine {
  int64_t it, ih, t_lo, t_hi, h_lo, h_hi;
};

MVIT_HD MVIT_FORCE_INLINE inline CoverLine cover_line(const PoolGeom& g, int64_t it, int64_t ih) {
  CoverLine l{it, ih, 0, 0, 0, 0};
  covering_range(it, g.kT, g.sT, g.pT, g.To, &l.t_lo, &l.t_hi);
  covering_range(ih, g.kH, g.sH, g.pH, g.Ho, &l.h_lo, &l.h_hi);
  return l;
}

// Calls f(k, o) for every output grid index o whose window contains input (line.it, line.ih, iw),
// with k the kernel offset at which it does.
template <class F>
MVIT_HD MVIT_FORCE_INLINE inline void for_each_covering_output_on_line(const PoolGeom& g, const CoverLine& line, int64_t iw,
                                                                        F&& f) {
  int64_t w_lo, w_hi;
  covering_range(iw, g.kW, g.sW, g.pW, g.Wo, &w_lo, &w_hi);
  for (int64_t ot = line.t_lo; ot <= line.t_hi; ++ot) {
    const int64_t kt = line.it + g.pT - ot * g.sT;
    for (int64_t oh = line.h_lo; oh <= line.h_hi; ++oh) {
      const int64_t kh = line.ih + g.pH - oh * g.sH;
      for (int64_t ow = w_lo; ow <= w_hi; ++ow) {
        const int64_t kw = iw + g.pW - ow * g.sW;
        f((kt * g.kH + kh) * g.kW + kw, (ot * g.Ho + oh) * g.Wo + ow);
      }
    }
  }
}

// Calls f(k, o) for every output grid index o whose window contains input grid index i, with
// k the kernel offset at which it does. This is the transpose of for_each_window_input: the
// backward passes gather with it, so each input gradient is written once, without atomics.
template <class F>
MVIT_HD MVIT_FORCE_INLINE inline void for_each_covering_output(const PoolGeom& g, int64_t i, F&& f) {
  const int64_t iw = i % g.W;
  const int64_t ih = (i / g.W) % g.H;
  const int64_t it = i / (g.W * g.H);
  for_each_covering_output_on_line(g, cover_line(g, it, ih), iw, f);
}

// Max pooling's comparison, as PyTorch's kernels make it: a NaN always wins (and propagates),
// otherwise only a strictly larger value replaces the current maximum, so ties keep the first.
template <class T>
MVIT_HD inline bool max_takes(T candidate, T best) {
  return candidate > best || candidate != candidate;
}

// LayerNorm backward for one channel, given the row means of g = dy * gamma and of g * xhat:
// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
template <class T>
MVIT_HD inline T layer_norm_grad(T g, T xhat, T rstd, T mean_g, T mean_gx) {
  return rstd * (g - mean_g - xhat * mean_gx);
}

}  // namespace mvit
