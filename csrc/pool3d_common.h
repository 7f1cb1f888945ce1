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

// Unroll the next loop n times in GPU code (the CPU kernels vectorize over channels instead).
#if defined(__CUDA_ARCH__)
#define MVIT_PRAGMA(x) _Pragma(#x)
#define MVIT_UNROLL(n) MVIT_PRAGMA(unroll n)
#else
#define MVIT_UNROLL(n)
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

// Calls f(a, b, c) for every point of the box [a0, a1) x [b0, b1) x [c0, c1) in row-major order
// (c fastest), as one flat loop with branch-free counters, unrolled on the GPU. The loop shape
// the GPU kernels use (see for_each_in_box); tests/cpp/index_math_test.cpp checks it on the host.
template <class F>
MVIT_HD MVIT_FORCE_INLINE inline void for_each_in_box_flat(int a0, int a1, int b0, int b1, int c0, int c1, F&& f) {
  if (a1 <= a0 || b1 <= b0 || c1 <= c0) return;
  const int n = (a1 - a0) * (b1 - b0) * (c1 - c0);
  int a = a0, b = b0, c = c0;
  MVIT_UNROLL(4)
  for (int j = 0; j < n; ++j) {
    f(a, b, c);
    const bool next_b = ++c == c1;
    c = next_b ? c0 : c;
    b += next_b;
    const bool next_a = b == b1;
    b = next_a ? b0 : b;
    a += next_a;
  }
}

// Calls f(a, b, c) for every point of the box [a_lo, a_hi) x [b_lo, b_hi) x [c_lo, c_hi) in
// row-major order (c fastest), with 32-bit coordinates (the boxes are windows and covering
// ranges: a few elements per axis). GPU code (and its CPU emulation in the tests) takes the flat
// loop: as three nested loops of runtime length (MViT's windows are 3 wide) the compiler ran
// the taps one after another, each load waiting for the one before. The CPU kernels vectorize
// f's channel loop instead, which the nested loops keep (flat, max pooling ran 12x slower).
template <class F>
MVIT_HD MVIT_FORCE_INLINE inline void for_each_in_box(int64_t a_lo, int64_t a_hi, int64_t b_lo, int64_t b_hi,
                                                      int64_t c_lo, int64_t c_hi, F&& f) {
  const int a0 = static_cast<int>(a_lo), a1 = static_cast<int>(a_hi), b0 = static_cast<int>(b_lo),
            b1 = static_cast<int>(b_hi), c0 = static_cast<int>(c_lo), c1 = static_cast<int>(c_hi);
#if defined(__CUDA_ARCH__) || defined(MVIT_CUDA_EMULATION)
  for_each_in_box_flat(a0, a1, b0, b1, c0, c1, f);
#else
  for (int a = a0; a < a1; ++a)
    for (int b = b0; b < b1; ++b)
      for (int c = c0; c < c1; ++c) f(a, b, c);
#endif
}

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
  // Kernel offsets whose position is inside the input, per axis.
  const auto lo = [](int64_t start) { return start < 0 ? -start : int64_t{0}; };
  const auto hi = [](int64_t start, int64_t k, int64_t size) { return size - start < k ? size - start : k; };
  // k and i in 32 bits (make_pool_geom checks the grid size), from the window's first position.
  const int kH = static_cast<int>(g.kH), kW = static_cast<int>(g.kW), H = static_cast<int>(g.H),
            W = static_cast<int>(g.W);
  const int i0 = static_cast<int>((t0 * g.H + h0) * g.W + w0);  // may lie in the padding; i0 + offset does not
  for_each_in_box(lo(t0), hi(t0, g.kT, g.T), lo(h0), hi(h0, g.kH, g.H), lo(w0), hi(w0, g.kW, g.W),
                  [&](int kt, int kh, int kw) MVIT_FORCE_INLINE {
                    f((kt * kH + kh) * kW + kw, i0 + (kt * H + kh) * W + kw);
                  });
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

// A line index of a (slabs, M, I) space split into (slab, m, i) with fast dividers: the CUDA
// gathers' input lines (M, I = T, H) and the weight gradient's output lines (To, Ho). Valid for
// lines < 2^31, which the launchers check.
struct LineDivs {
  FastDivmod middle, inner;

  LineDivs() = default;
  LineDivs(int64_t middle_, int64_t inner_)
      : middle(static_cast<uint32_t>(middle_)), inner(static_cast<uint32_t>(inner_)) {}

  MVIT_HD void operator()(uint32_t line, uint32_t* slab, uint32_t* m, uint32_t* i) const {
    uint32_t q;
    inner.divmod(line, &q, i);
    middle.divmod(q, slab, m);
  }
};

// Range of outputs along one axis whose window covers input position i: [lo, hi].
MVIT_HD MVIT_FORCE_INLINE inline void covering_range(int64_t i, int64_t k, int64_t s, int64_t p, int64_t n_out, int64_t* lo,
                                   int64_t* hi) {
  // o covers i  <=>  o*s - p <= i <= o*s - p + k - 1. In 32 bits (an axis is far shorter than
  // 2^31, see make_pool_geom): on the GPU a 64-bit division is a call of ~70 instructions.
  const int a = static_cast<int>(i + p - k + 1);  // o*s >= a
  const int s32 = static_cast<int>(s);
  const int l = a <= 0 ? 0 : (a - 1) / s32 + 1;  // ceil(a / s); a + s - 1 could pass 2^31
  int h = static_cast<int>(i + p) / s32;  // i + p >= 0 always
  if (h > n_out - 1) h = static_cast<int>(n_out - 1);
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
  // In 32 bits: a sample's output grid is smaller than its input grid (see make_pool_geom).
  const int kH = static_cast<int>(g.kH), kW = static_cast<int>(g.kW), Ho = static_cast<int>(g.Ho),
            Wo = static_cast<int>(g.Wo), sT = static_cast<int>(g.sT), sH = static_cast<int>(g.sH),
            sW = static_cast<int>(g.sW);
  const int t_at = static_cast<int>(line.it + g.pT), h_at = static_cast<int>(line.ih + g.pH),
            w_at = static_cast<int>(iw + g.pW);
  for_each_in_box(line.t_lo, line.t_hi + 1, line.h_lo, line.h_hi + 1, w_lo, w_hi + 1,
                  [&](int ot, int oh, int ow) MVIT_FORCE_INLINE {
                    const int kt = t_at - ot * sT, kh = h_at - oh * sH, kw = w_at - ow * sW;
                    f((kt * kH + kh) * kW + kw, (ot * Ho + oh) * Wo + ow);
                  });
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
