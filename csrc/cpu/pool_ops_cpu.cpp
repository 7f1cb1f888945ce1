// CPU implementations of pool3d and pool_residual_add (forward and backward).
//
// Structure (the CUDA file csrc/cuda/pool_ops_cuda.cu has the same one):
// - forward: one pass over output rows (parallel, in columns along t), the window loop from
//   pool3d_common.h (or, for conv windows wholly inside the input, precomputed tap offsets),
//   sums over the d contiguous channels in vector registers, LayerNorm on the row in
//   registers/cache, one write;
// - backward: (1) over output rows: recompute the pooled row (and its arg-max), LayerNorm
//   backward -> dp, the gradient w.r.t. the pooled values, plus per-chunk partial sums of the
//   norm/conv parameter gradients; (2) over input rows: gather dx from the dp of the outputs
//   whose windows cover the row (no atomics, each dx written once); (3) sum the partials.
// Accumulation is in at::opmath_type (float for half/bfloat16/float, double for double).
// The loops split over torch's intra-op threads through at::parallel_for, which needs this file
// compiled with OpenMP (setup.py; torch.ops.mvit_kernels.built_with_cpu_threads() says).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "pool3d_common.h"
#include "pool_args.h"

namespace mvit {
namespace {

// Rows of a (B, heads, N, d) tensor with unit channel stride.
struct Rows {
  int64_t sB, sH, sN;

  // Offset of slab bh (= batch * heads + head) of a tensor with `heads` heads.
  int64_t slab(int64_t bh, int64_t heads) const { return (bh / heads) * sB + (bh % heads) * sH; }
};

// Splits [0, n) into nchunks contiguous ranges processed in parallel; f(chunk, lo, hi).
template <class F>
void parallel_chunks(int64_t n, int64_t nchunks, const F& f) {
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t ch = cb; ch < ce; ++ch) f(ch, n * ch / nchunks, n * (ch + 1) / nchunks);
  });
}

int64_t num_chunks(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(n, 4 * at::get_num_threads()));
}

// Walk order of the row loops: within each (batch, head) slab, the grid rows in (h, w, t)
// order, t innermost. Consecutive steps then share most of their window rows (the t-neighbours),
// and the rows a band of h needs across all t stay in L2, so each input row is read from
// memory about once instead of once per t-window. With a kernel of 1 along t there is nothing
// to share, and the plain order streams better (kT == 1: identity). Returns the row for step j.
inline int64_t t_inner_row(int64_t j, int64_t rows_per_slab, int64_t cls, int64_t kT, int64_t T, int64_t H, int64_t W) {
  if (kT == 1) return j;
  const int64_t slab = j / rows_per_slab, k = j % rows_per_slab;
  if (k < cls) return j;
  const int64_t q = k - cls;
  return slab * rows_per_slab + cls + (q % T) * (H * W) + q / T;
}

// Software prefetch for the row loops. They walk windows in an order the hardware prefetcher
// cannot follow (rows strided by the qkv layout, t-inner jumps between windows), so without it
// each window's loads wait on memory one after another (the forward of block 1's Q pooling ran
// 1.7x slower). Each loop asks, kPrefetchAhead steps early, for the rows the step will read.
constexpr int64_t kPrefetchAhead = 2;

// Every 64-byte line of the row of n elements at p.
template <class T>
inline void prefetch_row(const T* p, int64_t n) {
  const int64_t step = 64 / static_cast<int64_t>(sizeof(T));
  for (int64_t c = 0; c < n; c += step) __builtin_prefetch(p + c);
}

// The row loops' step j + kPrefetchAhead (walked in t_inner_row order over slabs of rows_per_slab
// rows): its row r, or -1 past the end. For an output loop, window(slab, grid_index) is called to
// prefetch what that row reads; the caller prefetches any per-row buffers from r.
template <class Window>
inline int64_t prefetch_step(int64_t j, int64_t end, int64_t rows_per_slab, int64_t cls, int64_t kT, int64_t T,
                             int64_t H, int64_t W, const Window& window) {
  if (j + kPrefetchAhead >= end) return -1;
  const int64_t r = t_inner_row(j + kPrefetchAhead, rows_per_slab, cls, kT, T, H, W);
  const int64_t n = r % rows_per_slab;
  if (n >= cls) window(r / rows_per_slab, n - cls);
  return r;
}

// The input rows of output grid row o's window, in slab xb, that the step before did not read:
// in t-inner order (kT > 1) that step was the output one t earlier, whose window covers all but
// o's last sT planes (the same geometry with the first planes cut off the kernel and padding).
template <class scalar_t>
inline void prefetch_window(const scalar_t* xb, int64_t sN, const PoolGeom& g, int64_t o, int64_t d) {
  PoolGeom lead = g;
  if (g.kT > 1 && g.sT < g.kT && o >= g.Wo * g.Ho) {
    lead.kT = g.sT;
    lead.pT = g.pT - (g.kT - g.sT);
  }
  for_each_window_input(lead, o, [&](int64_t, int64_t i) { prefetch_row(xb + (g.cls + i) * sN, d); });
}

// Row offsets, in elements, of a window's K taps from its first row (kernel offset order, as
// for_each_window_input gives them), for windows wholly inside the input.
inline std::vector<int64_t> tap_offsets(const PoolGeom& g, int64_t sN) {
  std::vector<int64_t> taps;
  taps.reserve(g.kernel_volume());
  for (int64_t kt = 0; kt < g.kT; ++kt)
    for (int64_t kh = 0; kh < g.kH; ++kh)
      for (int64_t kw = 0; kw < g.kW; ++kw) taps.push_back(((kt * g.H + kh) * g.W + kw) * sN);
  return taps;
}

// The output grid of one slab as columns (see pool3d_cpu): per_slab columns of len outputs,
// output ot of column c at grid row c + ot * step. With kT > 1 a column is one (oh, ow) and
// its To outputs; with kT == 1 every output is a column of its own.
struct OutputColumns {
  int64_t per_slab, len, step;
  bool prefetching;

  // Software prefetch pays where a slab's rows outgrow L2 (MViT-B's block-1 and block-3 Q
  // pooling: 10-17% faster with it); where they fit, the t-inner walk finds its rows in L2 and
  // the prefetches only cost issue slots (blocks 4-15: 10-15% slower with them).
  static constexpr int64_t kPrefetchSlabBytes = int64_t{1} << 20;

  OutputColumns(const PoolGeom& g, int64_t d, int64_t elem_bytes)
      : per_slab(g.kT > 1 ? g.Ho * g.Wo : g.out_grid()),
        len(g.kT > 1 ? g.To : 1),
        step(g.Ho * g.Wo),
        prefetching(g.in_grid() * d * elem_bytes > kPrefetchSlabBytes) {}

  // (ot, oh, ow) of the first output of column c (of a slab).
  void first_coords(const PoolGeom& g, int64_t c, int64_t* t, int64_t* h, int64_t* w) const {
    *t = c / step;
    *h = (c % step) / g.Wo;
    *w = c % g.Wo;
  }

  // Calls window(slab, grid row) for the output kPrefetchAhead steps after output ot of column
  // col (in walk order, within columns [.., end)), if there is one.
  template <class Window>
  void prefetch(int64_t col, int64_t ot, int64_t end, const Window& window) const {
    if (!prefetching) return;
    int64_t c = col, t = ot + kPrefetchAhead;
    if (t >= len) {
      c += t / len;
      t %= len;
      if (c >= end) return;
    }
    window(c / per_slab, c % per_slab + t * step);
  }
};

// Conv pooling, channels [c0, c0 + 8 kVec) of kOut outputs (float rows): taps(f) calls f(k, row)
// for every tap k of output 0's window, row its input row; output p reads row + p * next. The
// sums stay in registers (kOut = 2, kVec = 6: 12 of AVX2's 16).
template <int64_t kOut, int64_t kVec, class Taps>
MVIT_FORCE_INLINE inline void conv_block_f32(const Taps& taps, int64_t d, int64_t next, const float* __restrict__ wT,
                                             int64_t c0, float* const* acc) {
  f32x8 s[kOut][kVec];
  for (int64_t p = 0; p < kOut; ++p)
    for (int64_t v = 0; v < kVec; ++v) s[p][v] = f32x8{};
  taps([&](int64_t k, const float* row) MVIT_FORCE_INLINE {
    const float* xk = row + c0;
    const float* wk = wT + k * d + c0;
    for (int64_t v = 0; v < kVec; ++v) {
      const f32x8 w = load8(wk + v * kF32x8);
      for (int64_t p = 0; p < kOut; ++p) s[p][v] += w * load8(xk + p * next + v * kF32x8);
    }
  });
  for (int64_t p = 0; p < kOut; ++p)
    for (int64_t v = 0; v < kVec; ++v) store8(acc[p] + c0 + v * kF32x8, s[p][v]);
}

// Conv pooling of kOut outputs one t apart into acc[0], ..., acc[kOut - 1], over the taps that
// taps(f) visits (see conv_block_f32). With kOut > 1 each output must have its whole t window
// inside the input (pool3d_cpu's `pair`), so they use the same taps and each tap's weights are
// loaded once for all (the forward's t-inner walk visits them one after the other). Float rows
// in blocks of 48, 16 and 8 channels; the rest (and other dtypes) one channel at a time.
template <int64_t kOut, class scalar_t, class acc_t, class Taps>
MVIT_FORCE_INLINE inline void conv_taps(const Taps& taps, int64_t d, int64_t next, const acc_t* __restrict__ wT,
                                        acc_t* const* acc) {
  int64_t c0 = 0;
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    for (; c0 + 6 * kF32x8 <= d; c0 += 6 * kF32x8) conv_block_f32<kOut, 6>(taps, d, next, wT, c0, acc);
    for (; c0 + 2 * kF32x8 <= d; c0 += 2 * kF32x8) conv_block_f32<kOut, 2>(taps, d, next, wT, c0, acc);
    for (; c0 + kF32x8 <= d; c0 += kF32x8) conv_block_f32<kOut, 1>(taps, d, next, wT, c0, acc);
  }
  if (c0 == d) return;
  for (int64_t p = 0; p < kOut; ++p)
    for (int64_t c = c0; c < d; ++c) acc[p][c] = acc_t(0);
  taps([&](int64_t k, const scalar_t* row) MVIT_FORCE_INLINE {
    const acc_t* wk = wT + k * d;
    for (int64_t p = 0; p < kOut; ++p)
      for (int64_t c = c0; c < d; ++c) acc[p][c] += wk[c] * static_cast<acc_t>(row[p * next + c]);
  });
}

// conv_taps over grid row o's window in slab xb (and the next kOut - 1 outputs along t), taps
// from the window loop of pool3d_common.h (padding skipped).
template <int64_t kOut, class scalar_t, class acc_t>
MVIT_FORCE_INLINE inline void conv_rows(const scalar_t* __restrict__ xb, int64_t sN, const PoolGeom& g, int64_t o,
                                        int64_t d, const acc_t* __restrict__ wT, acc_t* const* acc) {
  const auto taps = [&](auto&& f) MVIT_FORCE_INLINE {
    for_each_window_input(g, o, [&](int64_t k, int64_t i) MVIT_FORCE_INLINE { f(k, xb + (g.cls + i) * sN); });
  };
  conv_taps<kOut, scalar_t>(taps, d, g.sT * g.H * g.W * sN, wT, acc);
}

// conv_taps over a window wholly inside the input whose first row is xw, from precomputed tap
// offsets (taps[k]: the row offset of tap k from xw) instead of the per-tap index arithmetic of
// for_each_window_input, which cost as much as the taps' arithmetic itself.
template <int64_t kOut, class scalar_t, class acc_t>
MVIT_FORCE_INLINE inline void conv_inside(const scalar_t* __restrict__ xw, int64_t next, const int64_t* __restrict__ taps,
                                          int64_t K, int64_t d, const acc_t* __restrict__ wT, acc_t* const* acc) {
  const auto visit = [&](auto&& f) MVIT_FORCE_INLINE {
    for (int64_t k = 0; k < K; ++k) f(k, xw + taps[k]);
  };
  conv_taps<kOut, scalar_t>(visit, d, next, wT, acc);
}

// conv_inside for one output (acc1 == nullptr) or two one t apart (the dispatchers want the
// <scalar_t, acc_t> template shape).
template <class scalar_t, class acc_t>
MVIT_FORCE_INLINE inline void conv_inside_rows_impl(const scalar_t* __restrict__ xw, int64_t next,
                                                    const int64_t* __restrict__ taps, int64_t K, int64_t d,
                                                    const acc_t* __restrict__ wT, acc_t* acc0, acc_t* acc1) {
  if (acc1 == nullptr) {
    acc_t* rows[1] = {acc0};
    conv_inside<1>(xw, next, taps, K, d, wT, rows);
  } else {
    acc_t* rows[2] = {acc0, acc1};
    conv_inside<2>(xw, next, taps, K, d, wT, rows);
  }
}

// Pools one output grid row o of one (batch, head) slab xb into acc[0:d]; with idx, also the
// arg-max input grid index per channel (mode max).
template <class scalar_t, class acc_t>
MVIT_FORCE_INLINE inline void pool_row_impl(const scalar_t* __restrict__ xb, int64_t sN, const PoolGeom& g, int64_t o,
                                            int64_t d, PoolMode mode, const acc_t* __restrict__ wT,
                                            acc_t* __restrict__ acc, int32_t* __restrict__ idx) {
  if (mode == kMax) {
    for (int64_t c = 0; c < d; ++c) acc[c] = -std::numeric_limits<acc_t>::infinity();
    if (idx != nullptr) {
      for (int64_t c = 0; c < d; ++c) idx[c] = -1;
      for_each_window_input(g, o, [&](int64_t, int64_t i) MVIT_FORCE_INLINE {
        const scalar_t* xi = xb + (g.cls + i) * sN;
        for (int64_t c = 0; c < d; ++c) {
          // Branch-free select, so the loop over d vectorizes. The first input is always taken,
          // as by torch's max pooling: a window of -inf values then routes its gradient to it.
          const acc_t v = static_cast<acc_t>(xi[c]);
          const bool take = max_takes(v, acc[c]) | (idx[c] < 0);
          acc[c] = take ? v : acc[c];
          idx[c] = take ? static_cast<int32_t>(i) : idx[c];
        }
      });
    } else {
      for_each_window_input(g, o, [&](int64_t, int64_t i) MVIT_FORCE_INLINE {
        const scalar_t* xi = xb + (g.cls + i) * sN;
        for (int64_t c = 0; c < d; ++c) {
          const acc_t v = static_cast<acc_t>(xi[c]);
          acc[c] = max_takes(v, acc[c]) ? v : acc[c];
        }
      });
    }
  } else if (mode == kAvg) {
    for (int64_t c = 0; c < d; ++c) acc[c] = acc_t(0);
    for_each_window_input(g, o, [&](int64_t, int64_t i) MVIT_FORCE_INLINE {
      const scalar_t* xi = xb + (g.cls + i) * sN;
      for (int64_t c = 0; c < d; ++c) acc[c] += static_cast<acc_t>(xi[c]);
    });
    // count_include_pad=True: with padding <= kernel/2 and floor rounding every window lies
    // inside the padded input, so the divisor is always the kernel volume.
    const acc_t inv = acc_t(1) / static_cast<acc_t>(g.kernel_volume());
    for (int64_t c = 0; c < d; ++c) acc[c] *= inv;
  } else {
    acc_t* rows[1] = {acc};
    conv_rows<1>(xb, sN, g, o, d, wT, rows);
  }
}

// The hot loops, compiled twice (cpu_isa.h).
MVIT_DEFINE_DISPATCH(pool_row, pool_row_impl)

// conv_rows for two outputs (the dispatchers want the <scalar_t, acc_t> template shape).
template <class scalar_t, class acc_t>
MVIT_FORCE_INLINE inline void conv_pair_impl(const scalar_t* __restrict__ xb, int64_t sN, const PoolGeom& g, int64_t o,
                                             int64_t d, const acc_t* __restrict__ wT, acc_t* acc0, acc_t* acc1) {
  acc_t* rows[2] = {acc0, acc1};
  conv_rows<2>(xb, sN, g, o, d, wT, rows);
}

MVIT_DEFINE_DISPATCH(conv_pair, conv_pair_impl)
MVIT_DEFINE_DISPATCH(conv_inside_rows, conv_inside_rows_impl)

// dx of input grid row i of one (batch, head) slab: sum over the outputs whose windows cover
// it of dp (max: only where this row is the arg-max; avg: /K applied by the caller; conv:
// times the weight tap).
template <class scalar_t, class acc_t>
MVIT_FORCE_INLINE inline void gather_dx_row_impl(const PoolGeom& g, int64_t i, int64_t d, PoolMode mode,
                                                 const acc_t* __restrict__ dpb, const int32_t* __restrict__ amb,
                                                 const acc_t* __restrict__ wT, acc_t* __restrict__ acc) {
  for (int64_t c = 0; c < d; ++c) acc[c] = acc_t(0);
  for_each_covering_output(g, i, [&](int64_t k, int64_t o) MVIT_FORCE_INLINE {
    const acc_t* dpo = dpb + (g.cls + o) * d;
    if (mode == kMax) {
      const int32_t* idx = amb + o * d;
      for (int64_t c = 0; c < d; ++c) acc[c] += idx[c] == i ? dpo[c] : acc_t(0);
    } else if (mode == kAvg) {
      for (int64_t c = 0; c < d; ++c) acc[c] += dpo[c];
    } else {
      const acc_t* wk = wT + k * d;
      for (int64_t c = 0; c < d; ++c) acc[c] += dpo[c] * wk[c];
    }
  });
}

// pool_residual_add's dx of input grid row i of sample slab gb (grad rows) / amb (arg-max).
template <class scalar_t, class acc_t>
MVIT_FORCE_INLINE inline void gather_max_grad_row_impl(const PoolGeom& g, int64_t i, int64_t C,
                                                       const scalar_t* __restrict__ gb,
                                                       const int32_t* __restrict__ amb, acc_t* __restrict__ acc) {
  for (int64_t c = 0; c < C; ++c) acc[c] = acc_t(0);
  for_each_covering_output(g, i, [&](int64_t, int64_t o) MVIT_FORCE_INLINE {
    const scalar_t* go = gb + (g.cls + o) * C;
    const int32_t* idx = amb + o * C;
    for (int64_t c = 0; c < C; ++c) acc[c] += idx[c] == i ? static_cast<acc_t>(go[c]) : acc_t(0);
  });
}

MVIT_DEFINE_DISPATCH(gather_dx_row, gather_dx_row_impl)
MVIT_DEFINE_DISPATCH(gather_max_grad_row, gather_max_grad_row_impl)

// The depthwise weight (d, 1, kT, kH, kW) as (K, d) in acc_t, so window loops read it along d.
template <class scalar_t, class acc_t>
std::vector<acc_t> transpose_weight(const c10::optional<at::Tensor>& weight, int64_t d, int64_t K) {
  std::vector<acc_t> wT;
  if (!weight.has_value() || !weight->defined()) return wT;
  const at::Tensor w = weight->contiguous();
  const scalar_t* wp = w.data_ptr<scalar_t>();
  wT.resize(K * d);
  for (int64_t c = 0; c < d; ++c)
    for (int64_t k = 0; k < K; ++k) wT[k * d + c] = static_cast<acc_t>(wp[c * K + k]);
  return wT;
}

// The per-sample branch scale of pool_residual_add as acc_t, 1 for every sample without one.
template <class scalar_t, class acc_t>
std::vector<acc_t> sample_scales(const c10::optional<at::Tensor>& scale, int64_t B) {
  std::vector<acc_t> s(B, acc_t(1));
  if (scale.has_value() && scale->defined()) {
    const at::Tensor sc = scale->contiguous();
    for (int64_t b = 0; b < B; ++b) s[b] = static_cast<acc_t>(sc.data_ptr<scalar_t>()[b]);
  }
  return s;
}

// sum over c < d of f(c), in kLanes independent partial sums. A single running sum is a chain
// of dependent adds the compiler may not reorder (no -ffast-math), one add latency per channel:
// with the LayerNorm's other loops, 15% of block 1's Q pooling forward. The lanes vectorize.
constexpr int64_t kLanes = 8;

template <class acc_t, class F>
MVIT_FORCE_INLINE inline acc_t lane_sum(int64_t d, F&& f) {
  acc_t part[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= d; c += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) part[j] += f(c + j);
  acc_t s = 0;
  for (; c < d; ++c) s += f(c);
  for (int64_t j = 0; j < kLanes; ++j) s += part[j];
  return s;
}

// sum over c < d of f(c) for a float row, f giving f32x8 blocks (fv) and single channels (f1),
// in two vector partial sums.
template <class FV, class F1>
MVIT_FORCE_INLINE inline float lane_sum_f32(int64_t d, FV&& fv, F1&& f1) {
  f32x8 s0{}, s1{};
  int64_t c = 0;
  for (; c + 2 * kF32x8 <= d; c += 2 * kF32x8) {
    s0 += fv(c);
    s1 += fv(c + kF32x8);
  }
  for (; c + kF32x8 <= d; c += kF32x8) s0 += fv(c);
  s0 += s1;
  float s = 0;
  for (; c < d; ++c) s += f1(c);
  for (int64_t j = 0; j < kF32x8; ++j) s += s0[j];
  return s;
}

// row_moments of a float row with f32x8 partial sums (lane_sum's float partials stayed scalar:
// as f32x8 values the pooled row's LayerNorm took a third of the time).
MVIT_FORCE_INLINE inline void row_moments_f32(const float* v, int64_t d, double eps, float* mean, float* rstd) {
  const float m = lane_sum_f32(
      d, [&](int64_t c) MVIT_FORCE_INLINE { return load8(v + c); }, [&](int64_t c) MVIT_FORCE_INLINE { return v[c]; }) / d;
  const float q = lane_sum_f32(
      d,
      [&](int64_t c) MVIT_FORCE_INLINE {
        const f32x8 e = load8(v + c) - m;
        return e * e;
      },
      [&](int64_t c) MVIT_FORCE_INLINE { return (v[c] - m) * (v[c] - m); });
  *mean = m;
  *rstd = 1.0f / std::sqrt(q / d + static_cast<float>(eps));
}

// Mean and 1 / sqrt(variance + eps) of the row v[0:d].
template <class acc_t>
MVIT_FORCE_INLINE inline void row_moments(const acc_t* v, int64_t d, double eps, acc_t* mean, acc_t* rstd) {
  if constexpr (std::is_same_v<acc_t, float>) return row_moments_f32(v, d, eps, mean, rstd);
  const acc_t m = lane_sum<acc_t>(d, [&](int64_t c) MVIT_FORCE_INLINE { return v[c]; }) / d;
  const acc_t q = lane_sum<acc_t>(d, [&](int64_t c) MVIT_FORCE_INLINE { return (v[c] - m) * (v[c] - m); });
  *mean = m;
  *rstd = acc_t(1) / std::sqrt(q / d + static_cast<acc_t>(eps));
}

// One output row from its pooled values acc: LayerNorm'ed with gamma/beta when norm, cast to
// the output dtype.
template <class scalar_t, class acc_t>
MVIT_FORCE_INLINE inline void write_row_impl(const acc_t* __restrict__ acc, int64_t d, bool norm, double eps,
                                             const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta,
                                             scalar_t* __restrict__ yr) {
  if (norm) {
    acc_t mean, rstd;
    row_moments(acc, d, eps, &mean, &rstd);
    for (int64_t c = 0; c < d; ++c) yr[c] = static_cast<scalar_t>((acc[c] - mean) * rstd * gamma[c] + beta[c]);
  } else {
    for (int64_t c = 0; c < d; ++c) yr[c] = static_cast<scalar_t>(acc[c]);
  }
}

MVIT_DEFINE_DISPATCH(write_row, write_row_impl)

// Rows a backward chunk adds into its acc_t parameter partials before moving them into double:
// each float partial then holds at most this many terms (relative error ~kFlushRows * 2^-24).
constexpr int64_t kFlushRows = 16;

// Backward of one output row r (step (1) of pool3d_backward_cpu): recompute the pooled row (and
// its arg-max), LayerNorm backward -> dp row, and add this row's terms to the chunk's acc_t
// partials of the LayerNorm parameters and of the conv weight (pw, (K, d)), which the caller
// flushes into double every kFlushRows rows. v, gx: scratch rows of d.
template <class scalar_t, class acc_t>
MVIT_FORCE_INLINE inline void backward_row_impl(const scalar_t* __restrict__ xb, int64_t sN, const PoolGeom& g,
                                                int64_t n, int64_t d, PoolMode mode, const acc_t* __restrict__ wT,
                                                const scalar_t* __restrict__ gr, const acc_t* __restrict__ gamma,
                                                bool norm, double eps, acc_t* __restrict__ dpr,
                                                int32_t* __restrict__ idx, acc_t* __restrict__ v,
                                                acc_t* __restrict__ gx, acc_t* __restrict__ pnw,
                                                acc_t* __restrict__ pnb, acc_t* __restrict__ pw) {
  if (n < g.cls) {
    for (int64_t c = 0; c < d; ++c) v[c] = static_cast<acc_t>(xb[c]);
  } else {
    pool_row_impl<scalar_t, acc_t>(xb, sN, g, n - g.cls, d, mode, wT, v, idx);
  }
  if (norm) {
    acc_t mean, rstd;
    row_moments(v, d, eps, &mean, &rstd);
    for (int64_t c = 0; c < d; ++c) {  // no cross-channel sums in this loop, so it vectorizes
      const acc_t dy = static_cast<acc_t>(gr[c]);
      const acc_t xhat = (v[c] - mean) * rstd;
      const acc_t gc = dy * gamma[c];
      v[c] = xhat;
      gx[c] = gc;
      pnw[c] += dy * xhat;
      pnb[c] += dy;
    }
    const acc_t mean_g = lane_sum<acc_t>(d, [&](int64_t c) MVIT_FORCE_INLINE { return gx[c]; }) / d;
    const acc_t mean_gx = lane_sum<acc_t>(d, [&](int64_t c) MVIT_FORCE_INLINE { return gx[c] * v[c]; }) / d;
    for (int64_t c = 0; c < d; ++c) dpr[c] = layer_norm_grad(gx[c], v[c], rstd, mean_g, mean_gx);
  } else {
    for (int64_t c = 0; c < d; ++c) dpr[c] = static_cast<acc_t>(gr[c]);
  }
  if (mode == kConv && n >= g.cls) {
    for_each_window_input(g, n - g.cls, [&](int64_t k, int64_t i) MVIT_FORCE_INLINE {
      const scalar_t* xi = xb + (g.cls + i) * sN;
      acc_t* pk = pw + k * d;
      for (int64_t c = 0; c < d; ++c) pk[c] += dpr[c] * static_cast<acc_t>(xi[c]);
    });
  }
}

MVIT_DEFINE_DISPATCH(backward_row, backward_row_impl)

at::Tensor pool3d_cpu(const at::Tensor& x_in, at::IntArrayRef thw, at::IntArrayRef kernel, at::IntArrayRef stride,
                      at::IntArrayRef padding, c10::string_view mode_str, const c10::optional<at::Tensor>& weight,
                      bool has_cls, const c10::optional<at::Tensor>& norm_weight,
                      const c10::optional<at::Tensor>& norm_bias, double eps) {
  const PoolMode mode = parse_pool_mode(std::string(mode_str));
  at::Tensor x;
  const PoolGeom g = check_pool3d_args(x_in, thw, kernel, stride, padding, mode, weight, has_cls, norm_weight,
                                       norm_bias, eps, "mvit_kernels.pool3d", &x);
  const int64_t B = x.size(0), heads = x.size(1), d = x.size(3), n_out = out_tokens(g);
  at::Tensor y = at::empty({B, heads, n_out, d}, x.options());
  if (y.numel() == 0) return y;
  const bool norm = norm_weight.has_value() && norm_weight->defined();
  const Rows xr{x.stride(0), x.stride(1), x.stride(2)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mvit_pool3d_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t K = g.kernel_volume();
    const std::vector<acc_t> wT = transpose_weight<scalar_t, acc_t>(weight, d, K);
    std::vector<acc_t> gamma(d, acc_t(1)), beta(d, acc_t(0));
    if (norm) {
      const at::Tensor nw = norm_weight->contiguous(), nb = norm_bias->contiguous();
      for (int64_t c = 0; c < d; ++c) {
        gamma[c] = static_cast<acc_t>(nw.data_ptr<scalar_t>()[c]);
        beta[c] = static_cast<acc_t>(nb.data_ptr<scalar_t>()[c]);
      }
    }
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t slabs = B * heads;
    // The class-token rows: a copy (and LayerNorm) of d values each.
    std::vector<acc_t> cls_row(g.cls ? d : 0);
    for (int64_t bh = 0; bh < slabs && g.cls; ++bh) {
      const scalar_t* xb = xp + xr.slab(bh, heads);
      for (int64_t c = 0; c < d; ++c) cls_row[c] = static_cast<acc_t>(xb[c]);
      write_row<scalar_t, acc_t>(cls_row.data(), d, norm, eps, gamma.data(), beta.data(), yp + bh * n_out * d);
    }
    // The grid rows, as columns: a column is the outputs at one (slab, oh, ow) for every ot, walked
    // in ot order (t-inner: consecutive outputs share kT - sT input planes, and the planes a band
    // of oh needs for every t stay in L2). With a kernel of 1 along t there is nothing to share,
    // and every column is one output in the plain order (streams better).
    const OutputColumns cols(g, d, sizeof(scalar_t));
    const std::vector<int64_t> taps = mode == kConv ? tap_offsets(g, xr.sN) : std::vector<int64_t>();
    const int64_t next = g.sT * g.H * g.W * xr.sN;  // from a window's first row to the next t's
    at::parallel_for(0, slabs * cols.per_slab, std::max<int64_t>(1, 4096 / (cols.len * K * d) + 1),
                     [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(d), acc_next(d);
      const auto prefetch = [&](int64_t col, int64_t ot) {
        cols.prefetch(col, ot, end, [&](int64_t bh_a, int64_t o_a) {
          prefetch_window(xp + xr.slab(bh_a, heads), xr.sN, g, o_a, d);
        });
      };
      for (int64_t col = begin; col < end; ++col) {
        const int64_t bh = col / cols.per_slab, c = col % cols.per_slab;
        const scalar_t* xb = xp + xr.slab(bh, heads);
        scalar_t* yb = yp + (bh * n_out + g.cls) * d;
        int64_t t_first, oh, ow;
        cols.first_coords(g, c, &t_first, &oh, &ow);
        const int64_t h0 = oh * g.sH - g.pH, w0 = ow * g.sW - g.pW;
        const bool hw_inside = h0 >= 0 && h0 + g.kH <= g.H && w0 >= 0 && w0 + g.kW <= g.W;
        for (int64_t ot = 0; ot < cols.len; ++ot) {
          const int64_t o = c + ot * cols.step, t0 = (t_first + ot) * g.sT - g.pT;
          prefetch(col, ot);
          // Outputs one t apart are visited one after the other (t-inner): conv pools two at a time
          // where both windows use the same taps, loading each tap's weights once.
          const bool pair = mode == kConv && ot + 1 < cols.len && t0 >= 0 && t0 + g.sT + g.kT <= g.T;
          if (pair) prefetch(col, ot + 1);
          if (mode == kConv && hw_inside && t0 >= 0 && t0 + g.kT <= g.T) {
            const scalar_t* xw = xb + (g.cls + (t0 * g.H + h0) * g.W + w0) * xr.sN;
            conv_inside_rows<scalar_t, acc_t>(xw, next, taps.data(), K, d, wT.data(), acc.data(),
                                              pair ? acc_next.data() : nullptr);
          } else if (pair) {
            conv_pair<scalar_t, acc_t>(xb, xr.sN, g, o, d, wT.data(), acc.data(), acc_next.data());
          } else {
            pool_row<scalar_t, acc_t>(xb, xr.sN, g, o, d, mode, wT.data(), acc.data(), nullptr);
          }
          write_row<scalar_t, acc_t>(acc.data(), d, norm, eps, gamma.data(), beta.data(), yb + o * d);
          if (pair) {
            write_row<scalar_t, acc_t>(acc_next.data(), d, norm, eps, gamma.data(), beta.data(),
                                       yb + (o + cols.step) * d);
            ++ot;
          }
        }
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pool3d_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, at::IntArrayRef thw, at::IntArrayRef kernel,
    at::IntArrayRef stride, at::IntArrayRef padding, c10::string_view mode_str,
    const c10::optional<at::Tensor>& weight, bool has_cls, const c10::optional<at::Tensor>& norm_weight,
    const c10::optional<at::Tensor>& norm_bias, double eps) {
  const PoolMode mode = parse_pool_mode(std::string(mode_str));
  at::Tensor x;
  const PoolGeom g = check_pool3d_args(x_in, thw, kernel, stride, padding, mode, weight, has_cls, norm_weight,
                                       norm_bias, eps, "mvit_kernels.pool3d_backward", &x);
  const int64_t B = x.size(0), heads = x.size(1), N = x.size(2), d = x.size(3), n_out = out_tokens(g);
  const at::Tensor grad_y =
      check_grad(grad_y_in, {B, heads, n_out, d}, x, "grad_y", "mvit_kernels.pool3d_backward");
  const bool norm = norm_weight.has_value() && norm_weight->defined();
  const int64_t K = g.kernel_volume();

  at::Tensor grad_x = at::empty({B, heads, N, d}, x.options());
  at::Tensor grad_w = mode == kConv ? at::zeros_like(*weight, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
  at::Tensor grad_nw = norm ? at::zeros({d}, x.options()) : at::empty({0}, x.options());
  at::Tensor grad_nb = norm ? at::zeros({d}, x.options()) : at::empty({0}, x.options());
  if (B * heads == 0 || d == 0) return {grad_x, grad_w, grad_nw, grad_nb};  // empty or zero
  const Rows xr{x.stride(0), x.stride(1), x.stride(2)};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mvit_pool3d_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> wT = transpose_weight<scalar_t, acc_t>(weight, d, K);
    std::vector<acc_t> gamma(d, acc_t(1));
    if (norm) {
      const at::Tensor nw = norm_weight->contiguous();
      for (int64_t c = 0; c < d; ++c) gamma[c] = static_cast<acc_t>(nw.data_ptr<scalar_t>()[c]);
    }
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad_y.data_ptr<scalar_t>();
    const int64_t rows_out = B * heads * n_out, grid_out = g.out_grid();
    // Scratch written in full by step (1) before step (2) reads it: uninitialized buffers (a
    // zero-filled std::vector cost an extra pass over them).
    const std::unique_ptr<acc_t[]> dp_buf(new acc_t[rows_out * d]);
    const std::unique_ptr<int32_t[]> argmax_buf(new int32_t[mode == kMax ? B * heads * grid_out * d : 0]);
    acc_t* const dp = dp_buf.get();
    int32_t* const argmax = argmax_buf.get();

    // (1) dp and the parameter-gradient partials, per chunk of output rows.
    const int64_t nchunks = num_chunks(rows_out);
    const int64_t part = (mode == kConv ? K * d : 0) + (norm ? 2 * d : 0);
    // Parameter gradients sum over every output row (thousands of terms): the partials are
    // double so that float32 gradients keep float32 accuracy whatever the chunking. Rows add
    // into acc_t partials (8 float lanes per instruction, no conversions; in double the
    // accumulation was half of this step), flushed into double every kFlushRows rows.
    std::vector<double> partials(nchunks * part, 0.0);
    parallel_chunks(rows_out, nchunks, [&](int64_t ch, int64_t lo, int64_t hi) {
      std::vector<acc_t> v(d), gx(d), recent(part, acc_t(0));
      acc_t* pw = recent.data();
      acc_t* pnw = pw + (mode == kConv ? K * d : 0);
      acc_t* pnb = pnw + d;
      double* total = partials.data() + ch * part;
      const auto flush = [&] {
        for (int64_t i = 0; i < part; ++i) {
          total[i] += static_cast<double>(recent[i]);
          recent[i] = acc_t(0);
        }
      };
      for (int64_t j = lo; j < hi; ++j) {
        const int64_t rp = prefetch_step(j, hi, n_out, g.cls, g.kT, g.To, g.Ho, g.Wo, [&](int64_t bh, int64_t o) {
          prefetch_window(xp + xr.slab(bh, heads), xr.sN, g, o, d);
        });
        if (rp >= 0) prefetch_row(gp + rp * d, d);
        const int64_t r = t_inner_row(j, n_out, g.cls, g.kT, g.To, g.Ho, g.Wo);
        const int64_t n = r % n_out, bh = r / n_out;
        const scalar_t* xb = xp + xr.slab(bh, heads);
        int32_t* idx = (mode == kMax && n >= g.cls) ? argmax + (bh * grid_out + n - g.cls) * d : nullptr;
        backward_row<scalar_t, acc_t>(xb, xr.sN, g, n, d, mode, wT.data(), gp + r * d, gamma.data(), norm, eps,
                                      dp + r * d, idx, v.data(), gx.data(), pnw, pnb, pw);
        if ((j - lo + 1) % kFlushRows == 0) flush();
      }
      flush();
    });

    // (2) dx by gathering over the outputs that cover each input row.
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    const acc_t inv_k = acc_t(1) / static_cast<acc_t>(K);
    at::parallel_for(0, B * heads * N, std::max<int64_t>(1, 4096 / (K * d) + 1), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(d);
      for (int64_t j = begin; j < end; ++j) {
        // The dp (and arg-max) rows of the outputs covering the input row two steps ahead.
        prefetch_step(j, end, N, g.cls, g.kT, g.T, g.H, g.W, [&](int64_t bh, int64_t i) {
          for_each_covering_output(g, i, [&](int64_t, int64_t o) {
            prefetch_row(dp + (bh * n_out + g.cls + o) * d, d);
            if (mode == kMax) prefetch_row(argmax + (bh * grid_out + o) * d, d);
          });
        });
        const int64_t r = t_inner_row(j, N, g.cls, g.kT, g.T, g.H, g.W);
        const int64_t n = r % N, bh = r / N;
        scalar_t* out = gxp + r * d;
        const acc_t* dpb = dp + bh * n_out * d;
        if (n < g.cls) {
          for (int64_t c = 0; c < d; ++c) out[c] = static_cast<scalar_t>(dpb[c]);
          continue;
        }
        const int32_t* amb = mode == kMax ? argmax + bh * grid_out * d : nullptr;
        gather_dx_row<scalar_t, acc_t>(g, n - g.cls, d, mode, dpb, amb, wT.data(), acc.data());
        const acc_t f = mode == kAvg ? inv_k : acc_t(1);
        for (int64_t c = 0; c < d; ++c) out[c] = static_cast<scalar_t>(acc[c] * f);
      }
    });

    // (3) parameter gradients: sum the per-chunk partials (fixed order: deterministic).
    if (part > 0) {
      std::vector<double> total(part, 0.0);
      for (int64_t ch = 0; ch < nchunks; ++ch)
        for (int64_t j = 0; j < part; ++j) total[j] += partials[ch * part + j];
      if (mode == kConv) {
        scalar_t* gw = grad_w.data_ptr<scalar_t>();
        for (int64_t c = 0; c < d; ++c)
          for (int64_t k = 0; k < K; ++k) gw[c * K + k] = static_cast<scalar_t>(total[k * d + c]);
      }
      if (norm) {
        const double* tn = total.data() + (mode == kConv ? K * d : 0);
        scalar_t* gnw = grad_nw.data_ptr<scalar_t>();
        scalar_t* gnb = grad_nb.data_ptr<scalar_t>();
        for (int64_t c = 0; c < d; ++c) {
          gnw[c] = static_cast<scalar_t>(tn[c]);
          gnb[c] = static_cast<scalar_t>(tn[d + c]);
        }
      }
    }
  });
  return {grad_x, grad_w, grad_nw, grad_nb};
}

// ------------------------------------------------------------------------------------------
// pool_residual_add: x (B, N, C) viewed as one head; the pooled skip is never materialized.
// ------------------------------------------------------------------------------------------

at::Tensor pool_residual_add_cpu(const at::Tensor& x_in, at::IntArrayRef thw, at::IntArrayRef kernel,
                                 at::IntArrayRef stride, at::IntArrayRef padding, const at::Tensor& branch_in,
                                 const c10::optional<at::Tensor>& scale_in, bool has_cls) {
  const PoolGeom g = check_pool_residual_add_args(x_in, thw, kernel, stride, padding, branch_in, scale_in, has_cls,
                                                  "mvit_kernels.pool_residual_add");
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();
  const at::Tensor branch = branch_in.contiguous();
  const int64_t B = x.size(0), C = x.size(2), n_out = out_tokens(g);
  at::Tensor out = at::empty({B, n_out, C}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mvit_pool_residual_add_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> s = sample_scales<scalar_t, acc_t>(scale_in, B);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* bp = branch.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t sB = x.stride(0), sN = x.stride(1);
    at::parallel_for(0, B * n_out, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(C);
      for (int64_t j = begin; j < end; ++j) {
        prefetch_step(j, end, n_out, g.cls, g.kT, g.To, g.Ho, g.Wo,
                      [&](int64_t b, int64_t o) { prefetch_window(xp + b * sB, sN, g, o, C); });
        const int64_t r = t_inner_row(j, n_out, g.cls, g.kT, g.To, g.Ho, g.Wo);
        const int64_t b = r / n_out, n = r % n_out;
        const scalar_t* xb = xp + b * sB;
        if (n < g.cls) {
          for (int64_t c = 0; c < C; ++c) acc[c] = static_cast<acc_t>(xb[c]);
        } else {
          pool_row<scalar_t, acc_t>(xb, sN, g, n - g.cls, C, kMax, nullptr, acc.data(), nullptr);
        }
        const scalar_t* br = bp + r * C;
        scalar_t* orow = op + r * C;
        const acc_t sb = s[b];
        for (int64_t c = 0; c < C; ++c) orow[c] = static_cast<scalar_t>(acc[c] + sb * static_cast<acc_t>(br[c]));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_residual_add_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, at::IntArrayRef thw, at::IntArrayRef kernel,
    at::IntArrayRef stride, at::IntArrayRef padding, const at::Tensor& branch_in,
    const c10::optional<at::Tensor>& scale_in, bool has_cls) {
  const char* op = "mvit_kernels.pool_residual_add_backward";
  const PoolGeom g =
      check_pool_residual_add_args(x_in, thw, kernel, stride, padding, branch_in, scale_in, has_cls, op);
  const at::Tensor grad = check_grad(grad_in, branch_in.sizes(), x_in, "grad_out", op);
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();
  const at::Tensor branch = branch_in.contiguous();
  const bool has_scale = scale_in.has_value() && scale_in->defined();
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), n_out = out_tokens(g), grid_out = g.out_grid();
  at::Tensor grad_x = at::empty({B, N, C}, x.options());
  at::Tensor grad_branch = at::empty({B, n_out, C}, x.options());
  at::Tensor grad_scale = has_scale ? at::zeros({B}, x.options()) : at::empty({0}, x.options());
  if (B == 0) return {grad_x, grad_branch, grad_scale};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mvit_pool_residual_add_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> s = sample_scales<scalar_t, acc_t>(scale_in, B);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* bp = branch.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* gbp = grad_branch.data_ptr<scalar_t>();
    const int64_t sB = x.stride(0), sN = x.stride(1);
    const std::unique_ptr<int32_t[]> argmax_buf(new int32_t[B * grid_out * C]);  // written in full by step (1)
    int32_t* const argmax = argmax_buf.get();

    // (1) per output row: grad_branch = scale * g, arg-max of the window, grad_scale partials.
    const int64_t rows_out = B * n_out;
    const int64_t nchunks = num_chunks(rows_out);
    std::vector<double> partials(has_scale ? nchunks * B : 0, 0.0);  // sums over N*C terms
    parallel_chunks(rows_out, nchunks, [&](int64_t ch, int64_t lo, int64_t hi) {
      std::vector<acc_t> tmp(C);
      for (int64_t j = lo; j < hi; ++j) {
        const int64_t rp = prefetch_step(j, hi, n_out, g.cls, g.kT, g.To, g.Ho, g.Wo,
                                         [&](int64_t b, int64_t o) { prefetch_window(xp + b * sB, sN, g, o, C); });
        if (rp >= 0) {
          prefetch_row(gp + rp * C, C);
          if (has_scale) prefetch_row(bp + rp * C, C);
        }
        const int64_t r = t_inner_row(j, n_out, g.cls, g.kT, g.To, g.Ho, g.Wo);
        const int64_t b = r / n_out, n = r % n_out;
        const scalar_t* gr = gp + r * C;
        const acc_t sb = s[b];
        for (int64_t c = 0; c < C; ++c) gbp[r * C + c] = static_cast<scalar_t>(sb * static_cast<acc_t>(gr[c]));
        if (has_scale) {
          const scalar_t* br = bp + r * C;
          acc_t dot = 0;
          for (int64_t c = 0; c < C; ++c) dot += static_cast<acc_t>(gr[c]) * static_cast<acc_t>(br[c]);
          partials[ch * B + b] += static_cast<double>(dot);
        }
        if (n >= g.cls) {
          pool_row<scalar_t, acc_t>(xp + b * sB, sN, g, n - g.cls, C, kMax, nullptr, tmp.data(),
                                    argmax + (b * grid_out + n - g.cls) * C);
        }
      }
    });

    // (2) dx: gather the gradients of the outputs whose arg-max is this row.
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, B * N, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(C);
      for (int64_t j = begin; j < end; ++j) {
        // The gradient and arg-max rows of the outputs covering the input row two steps ahead.
        prefetch_step(j, end, N, g.cls, g.kT, g.T, g.H, g.W, [&](int64_t b, int64_t i) {
          for_each_covering_output(g, i, [&](int64_t, int64_t o) {
            prefetch_row(gp + (b * n_out + g.cls + o) * C, C);
            prefetch_row(argmax + (b * grid_out + o) * C, C);
          });
        });
        const int64_t r = t_inner_row(j, N, g.cls, g.kT, g.T, g.H, g.W);
        const int64_t b = r / N, n = r % N;
        scalar_t* out = gxp + r * C;
        const scalar_t* gb = gp + b * n_out * C;
        if (n < g.cls) {
          for (int64_t c = 0; c < C; ++c) out[c] = gb[c];
          continue;
        }
        gather_max_grad_row<scalar_t, acc_t>(g, n - g.cls, C, gb, argmax + b * grid_out * C, acc.data());
        for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(acc[c]);
      }
    });

    if (has_scale) {
      scalar_t* gsp = grad_scale.data_ptr<scalar_t>();
      for (int64_t b = 0; b < B; ++b) {
        double t = 0;
        for (int64_t ch = 0; ch < nchunks; ++ch) t += partials[ch * B + b];
        gsp[b] = static_cast<scalar_t>(t);
      }
    }
  });
  return {grad_x, grad_branch, grad_scale};
}

}  // namespace
}  // namespace mvit

TORCH_LIBRARY_IMPL(mvit_kernels, CPU, m) {
  m.impl("pool3d", &mvit::pool3d_cpu);
  m.impl("pool3d_backward", &mvit::pool3d_backward_cpu);
  m.impl("pool_residual_add", &mvit::pool_residual_add_cpu);
  m.impl("pool_residual_add_backward", &mvit::pool_residual_add_backward_cpu);
}
