// CUDA implementations of pool3d and pool_residual_add (forward and backward).
//
// Same structure as csrc/cpu/pool_ops_cpu.cpp, with the same window loops and index math from
// pool3d_common.h. Thread layout: a block is (round_up(d, 32), R) threads; threadIdx.x is the
// channel (reads and writes of a row are coalesced over d), threadIdx.y picks one of R rows;
// blocks stride over the rows (the dx gathers: over input lines, their threads looping over
// channels past 512). LayerNorm's row sums are block reductions (warp shuffles, then
// shared memory across the row's warps). In conv mode each block first copies the weights
// into shared memory, transposed to (K, d) so a warp's reads are consecutive (ConvWeights), and
// the window loops are unrolled (pool3d_common.h), so several taps' loads are in flight.
//
// Launches: pool3d forward 1; pool3d backward 2 (+1 in conv mode): rows (dp, arg-max, norm
// parameter partials), inputs (dx gathered from the covering outputs: no atomics, each dx
// written once), and in conv mode the weight gradient. pool_residual_add forward 1, backward 2.
// Parameter gradients (conv weight, norm weight/bias, scale) are reduced in each block's
// registers/shared memory and then added with one atomicAdd per block and channel into an
// fp32 (fp64 for double) buffer, cast to the parameter dtype at the end. Float atomics make
// the low bits order-dependent (not bitwise deterministic); the sums themselves are exact
// reductions in fp32, as the CPU's partial sums are.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>

#include "pool3d_common.h"
#include "pool_args.h"

#ifdef MVIT_CUDA_EMULATION
// The tests compile this file as C++ and run its kernels on the CPU, thread by thread
// (tests/cpp/cuda_emulation.h); the header provides launch_kernel and dynamic_smem there.
#include "cuda_emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

namespace mvit {
namespace {

// The block's dynamic shared memory (the launch's smem bytes) as an array of T.
template <class T>
__device__ T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  return reinterpret_cast<T*>(smem_raw);
}

template <class... Params, class... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  const cudaError_t err = cudaGetLastError();
  if (err == cudaErrorNoKernelImageForDevice) {
    int device = 0;
    cudaDeviceProp prop;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    TORCH_CHECK(false, "mvit_kernels: the CUDA extension has no code for this GPU (", prop.name,
                ", compute capability ", prop.major, ".", prop.minor,
                "). Rebuild it on this machine (pip install --no-build-isolation --no-deps -e . adds the "
                "GPUs it sees), or with TORCH_CUDA_ARCH_LIST naming ", prop.major, ".", prop.minor,
                "; MViT(fused=False) runs without it.");
  }
  C10_CUDA_CHECK(err);
}

}  // namespace
}  // namespace mvit
#endif

namespace mvit {
namespace {

constexpr int kThreadsPerBlock = 512;
// make_launch's blocks have round_up(d, 32) * max(1, 512 / round_up(d, 32)) threads: up to 1024
// (d up to 1024). The bound caps the registers at 64, so such a block can launch (65536
// registers per SM) and two of the usual 480-thread blocks share an SM (one did at 69-72
// registers). The two dx gathers spill at 64 (16-32 B of stack on sm_90): their blocks are
// kept to kGatherThreads instead.
#define MVIT_LAUNCH_BOUNDS __launch_bounds__(1024)

struct Launch {
  dim3 grid, block;
  size_t smem;
};

int multiprocessors() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// Block of (round_up(d, 32), R) threads with R rows per step; grid capped at a few waves.
template <class acc_t>
Launch make_launch(int64_t rows, int64_t d) {
  TORCH_CHECK(d >= 1 && d <= 1024, "mvit_kernels CUDA pooling ops support 1 to 1024 channels, got ", d);
  const int bx = static_cast<int>((d + 31) / 32 * 32);
  const int by = std::max(1, kThreadsPerBlock / bx);
  const int64_t steps = (rows + by - 1) / by;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(steps, static_cast<int64_t>(multiprocessors()) * 8));
  return {dim3(static_cast<unsigned>(blocks)), dim3(bx, by), static_cast<size_t>(by) * (bx / 32) * sizeof(acc_t)};
}

// The row index splitter of a launch over `rows` output rows (r < rows + one block's rows, the
// last grid-stride step) in 32-bit arithmetic, which needs r < 2^31.
OutputRowDivs output_rows(const PoolGeom& g, int64_t heads, int64_t rows, const Launch& l, const char* op) {
  TORCH_CHECK(rows + static_cast<int64_t>(l.block.y) <= INT32_MAX, op, ": at most 2^31 - ", l.block.y,
              " output rows (batch * heads * tokens) per call on CUDA, got ", rows);
  return OutputRowDivs(g, heads);
}

// Sum of v over the threads of this block row (threadIdx.y). Every thread of the block must
// call it (it synchronizes).
template <class T>
__device__ T row_sum(T v, T* smem) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int nwarps = blockDim.x / 32;
  if ((threadIdx.x & 31) == 0) smem[threadIdx.y * nwarps + threadIdx.x / 32] = v;
  __syncthreads();
  T s = 0;
  for (int i = 0; i < nwarps; ++i) s += smem[threadIdx.y * nwarps + i];
  __syncthreads();
  return s;
}

// Adds v, summed over the block's rows (threadIdx.y), to dst (each column's own address) with
// one atomic per column instead of one per thread. Every thread of the block must call it (it
// synchronizes); smem: blockDim.x * blockDim.y elements, free again when it returns.
template <class T>
__device__ void atomic_add_column_sum(T v, bool active, T* dst, T* smem) {
  smem[threadIdx.y * blockDim.x + threadIdx.x] = v;
  __syncthreads();
  if (threadIdx.y == 0 && active) {
    for (unsigned y = 1; y < blockDim.y; ++y) v += smem[y * blockDim.x + threadIdx.x];
    atomicAdd(dst, v);
  }
  __syncthreads();
}

// Elements of row_sum's scratch at the start of a block's shared memory: one per warp.
__device__ inline int row_scratch() { return blockDim.y * (blockDim.x / 32); }

// Dynamic shared memory a block may use without opting in.
constexpr size_t kMaxDynamicSmem = 48 * 1024;

// The conv weights, (d, K) in memory, as the kernels read them: weight(c, k). A warp's threads
// are consecutive channels, so reading w[c * K + k] in place touches 32 sectors K elements
// apart per load (for MViT's K = 27, ~14x the L1 wavefronts of the x load beside it, at every
// tap). Blocks therefore stage them transposed, (K, d) in acc_t, in shared memory when they fit
// (stage_conv_weights); otherwise they read w in place.
template <class scalar_t, class acc_t>
struct ConvWeights {
  const scalar_t* w = nullptr;  // (d, K); null outside conv mode
  int staged_at = -1;           // element offset of the (K, d) copy in dynamic shared memory, or -1
  int64_t K = 0, d = 0;

  // The staged copy is addressed through the shared-memory symbol, not a pointer chosen at run
  // time, so the compiler emits shared loads (LDS) instead of generic ones.
  __device__ acc_t operator()(int64_t c, int64_t k) const {
    return staged_at >= 0 ? dynamic_smem<acc_t>()[staged_at + k * d + c] : static_cast<acc_t>(w[c * K + k]);
  }
};

// Shared-memory bytes for staged conv weights of d channels, beside `used` bytes the kernel
// already takes; 0 (read in place) when not in conv mode or when they do not fit.
template <class acc_t>
size_t staged_weight_bytes(PoolMode mode, const PoolGeom& g, int64_t d, size_t used) {
  if (mode != kConv) return 0;
  const size_t bytes = static_cast<size_t>(g.kernel_volume() * d) * sizeof(acc_t);
  return used + bytes <= kMaxDynamicSmem ? bytes : 0;
}

// Copies w (d, K) into dynamic shared memory from element offset `at` on as (K, d) and
// synchronizes the block, when at >= 0 (the launcher's choice, the same for the whole block:
// every thread reaches the barrier or none does).
template <class scalar_t, class acc_t>
__device__ ConvWeights<scalar_t, acc_t> stage_conv_weights(const scalar_t* w, int64_t K, int64_t d, int at) {
  if (at < 0) return {w, -1, K, d};
  acc_t* smem = dynamic_smem<acc_t>() + at;
  const int n = static_cast<int>(K * d), K32 = static_cast<int>(K), d32 = static_cast<int>(d);
  for (int j = threadIdx.y * blockDim.x + threadIdx.x; j < n; j += blockDim.x * blockDim.y)
    smem[(j % K32) * d32 + j / K32] = static_cast<acc_t>(w[j]);  // coalesced reads; once per block
  __syncthreads();
  return {w, at, K, d};
}

// Pooled value of channel c of the output grid token row (its ot, oh, ow), with its arg-max
// for mode max.
template <class scalar_t, class acc_t>
__device__ acc_t pool_value(const scalar_t* xb, int64_t sN, const PoolGeom& g, const OutputRow& row, int64_t c,
                            PoolMode mode, const ConvWeights<scalar_t, acc_t>& weight, int32_t* argmax) {
  if (mode == kMax) {
    acc_t best = -INFINITY;
    int32_t idx = -1;
    for_each_window_input_at(g, row.ot, row.oh, row.ow, [&](int64_t, int64_t i) {
      const acc_t v = static_cast<acc_t>(xb[(g.cls + i) * sN + c]);
      if (max_takes(v, best) || idx < 0) {  // the first input always: see pool_ops_cpu.cpp
        best = v;
        idx = static_cast<int32_t>(i);
      }
    });
    if (argmax != nullptr) *argmax = idx;
    return best;
  }
  acc_t acc = 0;
  if (mode == kAvg) {
    for_each_window_input_at(g, row.ot, row.oh, row.ow,
                             [&](int64_t, int64_t i) { acc += static_cast<acc_t>(xb[(g.cls + i) * sN + c]); });
    return acc / static_cast<acc_t>(g.kernel_volume());  // count_include_pad=True, see the CPU file
  }
  for_each_window_input_at(g, row.ot, row.oh, row.ow, [&](int64_t k, int64_t i) {
    acc += weight(c, k) * static_cast<acc_t>(xb[(g.cls + i) * sN + c]);
  });
  return acc;
}

template <class scalar_t, class acc_t>
__global__ void MVIT_LAUNCH_BOUNDS
pool3d_forward_kernel(const scalar_t* __restrict__ x, int64_t sB, int64_t sH, int64_t sN, scalar_t* __restrict__ y,
                      int64_t rows, OutputRowDivs divs, int64_t d, PoolGeom g, PoolMode mode,
                      const scalar_t* __restrict__ w, bool stage_w, const scalar_t* __restrict__ nw,
                      const scalar_t* __restrict__ nb, acc_t eps) {
  acc_t* smem = dynamic_smem<acc_t>();  // row_sum's scratch, then the staged weights
  const auto weight = stage_conv_weights<scalar_t, acc_t>(w, g.kernel_volume(), d, stage_w ? row_scratch() : -1);
  const int64_t c = threadIdx.x;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows; base += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t r = base + threadIdx.y;
    const bool active = r < rows && c < d;
    acc_t v = 0;
    if (active) {
      const OutputRow row = divs(static_cast<uint32_t>(r));
      const scalar_t* xb = x + row.batch * sB + row.head * sH;
      v = row.is_cls ? static_cast<acc_t>(xb[c]) : pool_value<scalar_t, acc_t>(xb, sN, g, row, c, mode, weight, nullptr);
    }
    if (nw != nullptr) {
      const acc_t mean = row_sum<acc_t>(v, smem) / d;
      const acc_t diff = active ? v - mean : acc_t(0);
      const acc_t rstd = rsqrt(row_sum<acc_t>(diff * diff, smem) / d + eps);
      if (active) v = diff * rstd * static_cast<acc_t>(nw[c]) + static_cast<acc_t>(nb[c]);
    }
    if (active) y[r * d + c] = static_cast<scalar_t>(v);
  }
}

// Backward (1): per output row, dp = d loss / d pooled (LayerNorm backward when normed), the
// arg-max (mode max) and the norm parameter gradients.
template <class scalar_t, class acc_t>
__global__ void MVIT_LAUNCH_BOUNDS
pool3d_backward_rows_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x, int64_t sB, int64_t sH,
                            int64_t sN, acc_t* __restrict__ dp, int32_t* __restrict__ argmax, int64_t rows,
                            OutputRowDivs divs, int64_t heads, int64_t d, PoolGeom g, PoolMode mode,
                            const scalar_t* __restrict__ w, bool stage_w, const scalar_t* __restrict__ nw,
                            acc_t eps, acc_t* __restrict__ grad_nw, acc_t* __restrict__ grad_nb) {
  acc_t* smem = dynamic_smem<acc_t>();  // row_sum's scratch, then the staged weights
  const auto weight = stage_conv_weights<scalar_t, acc_t>(w, g.kernel_volume(), d, stage_w ? row_scratch() : -1);
  const int64_t c = threadIdx.x;
  // The pooled value is needed for the LayerNorm backward and for the arg-max only.
  const bool recompute = nw != nullptr || mode == kMax;
  const int64_t grid_out = g.out_grid();
  acc_t acc_nw = 0, acc_nb = 0;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows; base += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t r = base + threadIdx.y;
    const bool active = r < rows && c < d;
    acc_t v = 0, dy = 0;
    if (active) {
      const OutputRow row = divs(static_cast<uint32_t>(r));
      const int64_t slab = static_cast<int64_t>(row.batch) * heads + row.head;
      const scalar_t* xb = x + row.batch * sB + row.head * sH;
      int32_t* am = (mode == kMax && !row.is_cls) ? argmax + (slab * grid_out + row.n - g.cls) * d + c : nullptr;
      if (recompute)
        v = row.is_cls ? static_cast<acc_t>(xb[c]) : pool_value<scalar_t, acc_t>(xb, sN, g, row, c, mode, weight, am);
      dy = static_cast<acc_t>(gy[r * d + c]);
    }
    if (nw != nullptr) {
      const acc_t mean = row_sum<acc_t>(v, smem) / d;
      const acc_t diff = active ? v - mean : acc_t(0);
      const acc_t rstd = rsqrt(row_sum<acc_t>(diff * diff, smem) / d + eps);
      const acc_t xhat = diff * rstd;
      const acc_t gc = active ? dy * static_cast<acc_t>(nw[c]) : acc_t(0);
      const acc_t mean_g = row_sum<acc_t>(gc, smem) / d;
      const acc_t mean_gx = row_sum<acc_t>(gc * xhat, smem) / d;
      if (active) {
        dp[r * d + c] = layer_norm_grad(gc, xhat, rstd, mean_g, mean_gx);
        acc_nw += dy * xhat;
        acc_nb += dy;
      }
    } else if (active) {
      dp[r * d + c] = dy;
    }
  }
  if (nw != nullptr) {
    // After the grid-stride loop, one atomic per block and channel (the grid is capped at a few
    // waves, so about a thousand adds per channel).
    atomic_add_column_sum(acc_nw, c < d, grad_nw + c, smem);
    atomic_add_column_sum(acc_nb, c < d, grad_nb + c, smem);
  }
}

// Shared memory for atomic_add_column_sum in a launch of l's block shape.
template <class acc_t>
size_t column_sum_bytes(const Launch& l) {
  return static_cast<size_t>(l.block.x) * l.block.y * sizeof(acc_t);
}

// Input lines for the gathers below: the grid's (slab, it, ih) lines of W inputs, then one line
// per slab for its class token row. Returns whether `line` is a grid line, with its slab and its
// t/h covering ranges (computed once per line; the threads of a block then walk the line's w).
__device__ inline bool input_line(const PoolGeom& g, const LineDivs& divs, int64_t line, int64_t grid_lines,
                                  int64_t* slab, CoverLine* cover) {
  if (line >= grid_lines) {
    *slab = line - grid_lines;
    return false;
  }
  uint32_t bh, it, ih;
  divs(static_cast<uint32_t>(line), &bh, &it, &ih);
  *slab = bh;
  *cover = cover_line(g, it, ih);
  return true;
}

// The line splitter of a launch over `lines` lines (32-bit, see LineDivs).
LineDivs line_divs(int64_t lines, int64_t middle, int64_t inner, const char* op) {
  TORCH_CHECK(lines <= INT32_MAX, op, ": at most 2^31 - 1 token lines (batch * heads * t * h) per call on CUDA, got ",
              lines);
  return LineDivs(middle, inner);
}

// Grid for the gathers: one block per input line, capped at a few waves. Their threads loop
// over channels, so blocks stay within kGatherThreads whatever d (at their 96 registers a
// 1024-thread block could not launch; capping them at 64 with __launch_bounds__ spilled).
constexpr int kGatherThreads = 512;

template <class acc_t>
Launch line_launch(int64_t lines, int64_t d) {
  Launch l = make_launch<acc_t>(lines, std::min<int64_t>(d, kGatherThreads));
  l.grid = dim3(static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(lines, multiprocessors() * 8))));
  return l;
}

// Backward (2): dx of each input row, gathered from the outputs whose windows cover it. Blocks
// stride over input lines (input_line), the block's rows (threadIdx.y) over the line's W inputs.
// (Per input, the div/mod of a flat row index and three covering ranges had been most of this
// kernel's compiled instructions; now the t and h ranges come once per line.)
template <class scalar_t, class acc_t>
__global__ void pool3d_backward_input_kernel(const acc_t* __restrict__ dp, const int32_t* __restrict__ argmax,
                                             scalar_t* __restrict__ gx, int64_t slabs, int64_t N, int64_t d, PoolGeom g,
                                             PoolMode mode, const scalar_t* __restrict__ w, bool stage_w,
                                             LineDivs divs) {
  const int64_t n_out = g.cls + g.out_grid(), grid_out = g.out_grid(), K = g.kernel_volume();
  const auto weight = stage_conv_weights<scalar_t, acc_t>(w, K, d, stage_w ? 0 : -1);
  const int64_t grid_lines = slabs * g.T * g.H, lines = grid_lines + slabs * g.cls;
  for (int64_t line = blockIdx.x; line < lines; line += gridDim.x) {
    int64_t bh;
    CoverLine cover;
    const bool grid_line = input_line(g, divs, line, grid_lines, &bh, &cover);
    const acc_t* dpb = dp + bh * n_out * d;
    if (!grid_line) {  // the class token passes through
      if (threadIdx.y == 0)
        for (int64_t c = threadIdx.x; c < d; c += blockDim.x) gx[bh * N * d + c] = static_cast<scalar_t>(dpb[c]);
      continue;
    }
    const int32_t* amb = mode == kMax ? argmax + bh * grid_out * d : nullptr;
    const int64_t row0 = (cover.it * g.H + cover.ih) * g.W;  // grid index of the line's first input
    for (int64_t iw = threadIdx.y; iw < g.W; iw += blockDim.y) {
      const int64_t i = row0 + iw;
      for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
        acc_t acc = 0;
        for_each_covering_output_on_line(g, cover, iw, [&](int64_t k, int64_t o) {
          const acc_t v = dpb[(g.cls + o) * d + c];
          if (mode == kMax) {
            if (amb[o * d + c] == i) acc += v;
          } else if (mode == kAvg) {
            acc += v;
          } else {
            acc += v * weight(c, k);
          }
        });
        if (mode == kAvg) acc /= static_cast<acc_t>(K);
        gx[(bh * N + g.cls + i) * d + c] = static_cast<scalar_t>(acc);
      }
    }
  }
}

// Backward (3), conv mode: grad_w[c, k] = sum over grid outputs o of dp[o, c] * x[in(o, k), c].
// blockIdx.x is the kernel offset k, so the K blocks of a range of lines are launched side by side
// and read the same dp and x lines, from L2. (With k in blockIdx.y, each offset swept all of dp
// and x again: at MViT-B's block 1, batch 8, 27 passes over ~115 MB, which L2 cannot hold.)
// Blocks stride over output lines (batch*head, ot, oh) in steps of gridDim.y, the block's rows
// (threadIdx.y) over the line's outputs whose tap lies inside the input; the rows' sums meet in
// shared memory, then one atomic per channel.
template <class scalar_t, class acc_t>
__global__ void MVIT_LAUNCH_BOUNDS
pool3d_backward_weight_kernel(const acc_t* __restrict__ dp, const scalar_t* __restrict__ x, int64_t sB, int64_t sH,
                              int64_t sN, int64_t lines, LineDivs divs, FastDivmod heads, int64_t d, PoolGeom g,
                              acc_t* __restrict__ grad_w) {
  const int64_t c = threadIdx.x;
  const bool active = c < d;
  const int64_t k = blockIdx.x;
  const int64_t n_out = g.cls + g.out_grid(), K = g.kernel_volume();
  // Per block, in 32 bits (small numbers; 64-bit divisions are calls on the GPU): the offset's
  // (kt, kh, kw) and the outputs ow whose tap is inside the input, 0 <= ow * sW - pW + kw <= W - 1:
  // this thread's are ow0 + j * blockDim.y for j < n.
  const int kW = static_cast<int>(g.kW), kH = static_cast<int>(g.kH), sW = static_cast<int>(g.sW);
  const int kw = static_cast<int>(k) % kW, kh = (static_cast<int>(k) / kW) % kH, kt = static_cast<int>(k) / (kW * kH);
  const int before = static_cast<int>(g.pW) - kw, last = static_cast<int>(g.W - 1 + g.pW) - kw;
  const int ow_lo = before > 0 ? (before + sW - 1) / sW : 0;
  const int ow_hi = last < 0 ? 0 : (last / sW + 1 < g.Wo ? last / sW + 1 : static_cast<int>(g.Wo));
  const int ow0 = ow_lo + static_cast<int>(threadIdx.y), by = static_cast<int>(blockDim.y);
  const int n = ow0 < ow_hi ? (ow_hi - ow0 + by - 1) / by : 0;
  const int64_t x_step = by * g.sW * sN, dp_step = by * d;
  acc_t acc = 0;
  for (int64_t line = blockIdx.y; active && line < lines; line += gridDim.y) {
    uint32_t bh, ot, oh, batch, head;
    divs(static_cast<uint32_t>(line), &bh, &ot, &oh);
    const int64_t t = ot * g.sT - g.pT + kt, h = oh * g.sH - g.pH + kh;
    if (t < 0 || t >= g.T || h < 0 || h >= g.H) continue;  // this tap is in the padding for the whole line
    heads.divmod(bh, &batch, &head);
    const scalar_t* xp = x + batch * sB + head * sH +
                         (g.cls + (t * g.H + h) * g.W + static_cast<int64_t>(ow0) * g.sW - g.pW + kw) * sN + c;
    const acc_t* dpp = dp + (static_cast<int64_t>(bh) * n_out + g.cls + (ot * g.Ho + oh) * g.Wo + ow0) * d + c;
    MVIT_UNROLL(4)
    for (int j = 0; j < n; ++j, xp += x_step, dpp += dp_step) acc += *dpp * static_cast<acc_t>(*xp);
  }
  atomic_add_column_sum(acc, active, grad_w + c * K + k, dynamic_smem<acc_t>());
}

at::Tensor pool3d_cuda(const at::Tensor& x_in, at::IntArrayRef thw, at::IntArrayRef kernel, at::IntArrayRef stride,
                       at::IntArrayRef padding, c10::string_view mode_str, const c10::optional<at::Tensor>& weight,
                       bool has_cls, const c10::optional<at::Tensor>& norm_weight,
                       const c10::optional<at::Tensor>& norm_bias, double eps) {
  const PoolMode mode = parse_pool_mode(std::string(mode_str));
  at::Tensor x;
  const PoolGeom g = check_pool3d_args(x_in, thw, kernel, stride, padding, mode, weight, has_cls, norm_weight,
                                       norm_bias, eps, "mvit_kernels.pool3d", &x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), heads = x.size(1), d = x.size(3), n_out = out_tokens(g);
  at::Tensor y = at::empty({B, heads, n_out, d}, x.options());
  if (y.numel() == 0) return y;
  const bool norm = norm_weight.has_value() && norm_weight->defined();
  const at::Tensor w = mode == kConv ? weight->contiguous() : at::Tensor();
  const at::Tensor nw = norm ? norm_weight->contiguous() : at::Tensor();
  const at::Tensor nb = norm ? norm_bias->contiguous() : at::Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mvit_pool3d_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t rows = B * heads * n_out;
    const Launch l = make_launch<acc_t>(rows, d);
    const size_t staged = staged_weight_bytes<acc_t>(mode, g, d, l.smem);
    launch_kernel(pool3d_forward_kernel<scalar_t, acc_t>, l.grid, l.block, l.smem + staged, stream,
        x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2), y.data_ptr<scalar_t>(), rows,
        output_rows(g, heads, rows, l, "mvit_kernels.pool3d"), d, g, mode,
        w.defined() ? w.data_ptr<scalar_t>() : nullptr, staged > 0, norm ? nw.data_ptr<scalar_t>() : nullptr,
        norm ? nb.data_ptr<scalar_t>() : nullptr, static_cast<acc_t>(eps));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pool3d_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, at::IntArrayRef thw, at::IntArrayRef kernel,
    at::IntArrayRef stride, at::IntArrayRef padding, c10::string_view mode_str,
    const c10::optional<at::Tensor>& weight, bool has_cls, const c10::optional<at::Tensor>& norm_weight,
    const c10::optional<at::Tensor>& norm_bias, double eps) {
  const PoolMode mode = parse_pool_mode(std::string(mode_str));
  at::Tensor x;
  const PoolGeom g = check_pool3d_args(x_in, thw, kernel, stride, padding, mode, weight, has_cls, norm_weight,
                                       norm_bias, eps, "mvit_kernels.pool3d_backward", &x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), heads = x.size(1), N = x.size(2), d = x.size(3), n_out = out_tokens(g);
  const at::Tensor grad_y =
      check_grad(grad_y_in, {B, heads, n_out, d}, x, "grad_y", "mvit_kernels.pool3d_backward");
  const bool norm = norm_weight.has_value() && norm_weight->defined();
  const int64_t K = g.kernel_volume(), grid_out = g.out_grid();
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = x.options().dtype(acc_dtype);

  at::Tensor grad_x = at::empty({B, heads, N, d}, x.options());
  at::Tensor grad_w_acc = mode == kConv ? at::zeros({d, 1, g.kT, g.kH, g.kW}, acc_opts) : at::empty({0}, acc_opts);
  at::Tensor grad_nw_acc = norm ? at::zeros({d}, acc_opts) : at::empty({0}, acc_opts);
  at::Tensor grad_nb_acc = norm ? at::zeros({d}, acc_opts) : at::empty({0}, acc_opts);
  if (B * heads > 0 && d > 0) {  // else every gradient is empty or zero
    const at::Tensor w = mode == kConv ? weight->contiguous() : at::Tensor();
    const at::Tensor nw = norm ? norm_weight->contiguous() : at::Tensor();
    at::Tensor dp = at::empty({B, heads, n_out, d}, acc_opts);
    at::Tensor argmax = at::empty({mode == kMax ? B * heads * grid_out * d : 0}, x.options().dtype(at::kInt));
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mvit_pool3d_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* wp = w.defined() ? w.data_ptr<scalar_t>() : nullptr;
      const int64_t rows_out = B * heads * n_out;
      const Launch l1 = make_launch<acc_t>(rows_out, d);
      // Without a norm, conv and avg need no recomputed pooled value (dp = grad_y), nor weights.
      const size_t staged1 = norm ? staged_weight_bytes<acc_t>(mode, g, d, l1.smem) : 0;
      // With a norm its parameter gradients are summed over the block's rows at the end, in
      // shared memory (column_sum_bytes).
      const size_t smem1 = std::max(l1.smem + staged1, norm ? column_sum_bytes<acc_t>(l1) : 0);
      launch_kernel(pool3d_backward_rows_kernel<scalar_t, acc_t>, l1.grid, l1.block, smem1, stream,
          grad_y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2),
          dp.data_ptr<acc_t>(), mode == kMax ? argmax.data_ptr<int32_t>() : nullptr, rows_out,
          output_rows(g, heads, rows_out, l1, "mvit_kernels.pool3d_backward"), heads, d, g, mode, wp, staged1 > 0,
          norm ? nw.data_ptr<scalar_t>() : nullptr, static_cast<acc_t>(eps),
          norm ? grad_nw_acc.data_ptr<acc_t>() : nullptr, norm ? grad_nb_acc.data_ptr<acc_t>() : nullptr);
      const Launch l2 = line_launch<acc_t>(B * heads * (g.T * g.H + g.cls), d);
      const size_t staged2 = staged_weight_bytes<acc_t>(mode, g, d, 0);
      launch_kernel(pool3d_backward_input_kernel<scalar_t, acc_t>, l2.grid, l2.block, staged2, stream,
          dp.data_ptr<acc_t>(), mode == kMax ? argmax.data_ptr<int32_t>() : nullptr, grad_x.data_ptr<scalar_t>(),
          B * heads, N, d, g, mode, wp, staged2 > 0,
          line_divs(B * heads * (g.T * g.H + g.cls), g.T, g.H, "mvit_kernels.pool3d_backward"));
      if (mode == kConv) {
        const int64_t lines = B * heads * g.To * g.Ho;  // rows of Wo outputs
        // make_launch's block shape; the K kernel offsets (grid.x) side by side, times up to a
        // few waves of line ranges (grid.y) to fill the GPU; one partial sum per thread in
        // shared memory.
        Launch l3 = make_launch<acc_t>(lines, d);
        const int64_t per_offset = static_cast<int64_t>(multiprocessors()) * 8 / std::min<int64_t>(K, 8);
        l3.grid = dim3(static_cast<unsigned>(K), static_cast<unsigned>(std::max<int64_t>(1, std::min(lines, per_offset))));
        l3.smem = column_sum_bytes<acc_t>(l3);
        launch_kernel(pool3d_backward_weight_kernel<scalar_t, acc_t>, l3.grid, l3.block, l3.smem, stream,
            dp.data_ptr<acc_t>(), x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2), lines,
            line_divs(lines, g.To, g.Ho, "mvit_kernels.pool3d_backward"), FastDivmod(static_cast<uint32_t>(heads)), d,
            g, grad_w_acc.data_ptr<acc_t>());
      }
    });
  }
  return {grad_x, grad_w_acc.to(x.scalar_type()), grad_nw_acc.to(x.scalar_type()), grad_nb_acc.to(x.scalar_type())};
}

// ------------------------------------------------------------------------------------------
// pool_residual_add
// ------------------------------------------------------------------------------------------

template <class scalar_t, class acc_t>
__global__ void MVIT_LAUNCH_BOUNDS
pool_residual_add_forward_kernel(const scalar_t* __restrict__ x, int64_t sB, int64_t sN,
                                 const scalar_t* __restrict__ branch, const scalar_t* __restrict__ scale,
                                 scalar_t* __restrict__ out, int64_t rows, OutputRowDivs divs, int64_t C, PoolGeom g) {
  const int64_t c = threadIdx.x;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows; base += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t r = base + threadIdx.y;
    if (r >= rows || c >= C) continue;
    const OutputRow row = divs(static_cast<uint32_t>(r));  // one "head" per sample
    const scalar_t* xb = x + row.batch * sB;
    const acc_t skip = row.is_cls ? static_cast<acc_t>(xb[c])
                                  : pool_value<scalar_t, acc_t>(xb, sN, g, row, c, kMax, {}, nullptr);
    const acc_t s = scale != nullptr ? static_cast<acc_t>(scale[row.batch]) : acc_t(1);
    out[r * C + c] = static_cast<scalar_t>(skip + s * static_cast<acc_t>(branch[r * C + c]));
  }
}

template <class scalar_t, class acc_t>
__global__ void MVIT_LAUNCH_BOUNDS
pool_residual_add_backward_rows_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x, int64_t sB,
                                       int64_t sN, const scalar_t* __restrict__ branch,
                                       const scalar_t* __restrict__ scale, scalar_t* __restrict__ grad_branch,
                                       int32_t* __restrict__ argmax, acc_t* __restrict__ grad_scale, int64_t rows,
                                       OutputRowDivs divs, int64_t C, PoolGeom g) {
  const int64_t c = threadIdx.x;
  const int64_t grid_out = g.out_grid();
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows; base += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t r = base + threadIdx.y;
    const bool active = r < rows && c < C;
    const OutputRow row = divs(static_cast<uint32_t>(r));  // one "head" per sample; r < rows + blockDim.y
    const int64_t b = row.batch;
    acc_t dot = 0;
    if (active) {
      const acc_t gv = static_cast<acc_t>(grad[r * C + c]);
      const acc_t s = scale != nullptr ? static_cast<acc_t>(scale[b]) : acc_t(1);
      grad_branch[r * C + c] = static_cast<scalar_t>(s * gv);
      if (scale != nullptr) dot = gv * static_cast<acc_t>(branch[r * C + c]);
      if (!row.is_cls) {
        pool_value<scalar_t, acc_t>(x + b * sB, sN, g, row, c, kMax, {},
                                    argmax + (b * grid_out + row.n - g.cls) * C + c);
      }
    }
    if (scale != nullptr) {
      // All lanes of a warp are in the same row (blockDim.x is a multiple of 32): one atomic per warp.
      for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
      if ((threadIdx.x & 31) == 0 && r < rows) atomicAdd(grad_scale + b, dot);
    }
  }
}

// dx of pool_residual_add: the gradients of the outputs whose arg-max is this input, gathered
// over input lines like pool3d_backward_input_kernel (x viewed as one head per sample).
template <class scalar_t, class acc_t>
__global__ void pool_residual_add_backward_input_kernel(const scalar_t* __restrict__ grad,
                                                        const int32_t* __restrict__ argmax, scalar_t* __restrict__ gx,
                                                        int64_t B, int64_t N, int64_t C, PoolGeom g,
                                                        LineDivs divs) {
  const int64_t n_out = g.cls + g.out_grid(), grid_out = g.out_grid();
  const int64_t grid_lines = B * g.T * g.H, lines = grid_lines + B * g.cls;
  for (int64_t line = blockIdx.x; line < lines; line += gridDim.x) {
    int64_t b;
    CoverLine cover;
    const bool grid_line = input_line(g, divs, line, grid_lines, &b, &cover);
    const scalar_t* gb = grad + b * n_out * C;
    if (!grid_line) {  // the class token passes through
      if (threadIdx.y == 0)
        for (int64_t c = threadIdx.x; c < C; c += blockDim.x) gx[b * N * C + c] = gb[c];
      continue;
    }
    const int32_t* amb = argmax + b * grid_out * C;
    const int64_t row0 = (cover.it * g.H + cover.ih) * g.W;
    for (int64_t iw = threadIdx.y; iw < g.W; iw += blockDim.y) {
      const int64_t i = row0 + iw;
      for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
        acc_t acc = 0;
        for_each_covering_output_on_line(g, cover, iw, [&](int64_t, int64_t o) {
          if (amb[o * C + c] == i) acc += static_cast<acc_t>(gb[(g.cls + o) * C + c]);
        });
        gx[(b * N + g.cls + i) * C + c] = static_cast<scalar_t>(acc);
      }
    }
  }
}

at::Tensor pool_residual_add_cuda(const at::Tensor& x_in, at::IntArrayRef thw, at::IntArrayRef kernel,
                                  at::IntArrayRef stride, at::IntArrayRef padding, const at::Tensor& branch_in,
                                  const c10::optional<at::Tensor>& scale_in, bool has_cls) {
  const PoolGeom g = check_pool_residual_add_args(x_in, thw, kernel, stride, padding, branch_in, scale_in, has_cls,
                                                  "mvit_kernels.pool_residual_add");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();
  const at::Tensor branch = branch_in.contiguous();
  const bool has_scale = scale_in.has_value() && scale_in->defined();
  const at::Tensor scale = has_scale ? scale_in->contiguous() : at::Tensor();
  const int64_t B = x.size(0), C = x.size(2), n_out = out_tokens(g);
  at::Tensor out = at::empty({B, n_out, C}, x.options());
  if (out.numel() == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mvit_pool_residual_add_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t rows = B * n_out;
    const Launch l = make_launch<acc_t>(rows, C);
    launch_kernel(pool_residual_add_forward_kernel<scalar_t, acc_t>, l.grid, l.block, 0, stream,
        x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), branch.data_ptr<scalar_t>(),
        has_scale ? scale.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), rows,
        output_rows(g, 1, rows, l, "mvit_kernels.pool_residual_add"), C, g);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_residual_add_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, at::IntArrayRef thw, at::IntArrayRef kernel,
    at::IntArrayRef stride, at::IntArrayRef padding, const at::Tensor& branch_in,
    const c10::optional<at::Tensor>& scale_in, bool has_cls) {
  const char* op = "mvit_kernels.pool_residual_add_backward";
  const PoolGeom g =
      check_pool_residual_add_args(x_in, thw, kernel, stride, padding, branch_in, scale_in, has_cls, op);
  const at::Tensor grad = check_grad(grad_in, branch_in.sizes(), x_in, "grad_out", op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();
  const at::Tensor branch = branch_in.contiguous();
  const bool has_scale = scale_in.has_value() && scale_in->defined();
  const at::Tensor scale = has_scale ? scale_in->contiguous() : at::Tensor();
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), n_out = out_tokens(g);
  const auto acc_opts = x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor grad_x = at::empty({B, N, C}, x.options());
  at::Tensor grad_branch = at::empty({B, n_out, C}, x.options());
  at::Tensor grad_scale_acc = has_scale ? at::zeros({B}, acc_opts) : at::empty({0}, acc_opts);
  if (B > 0 && C > 0) {  // else every gradient is empty or zero
    at::Tensor argmax = at::empty({B * g.out_grid() * C}, x.options().dtype(at::kInt));
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mvit_pool_residual_add_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int64_t rows_out = B * n_out;
      const Launch l1 = make_launch<acc_t>(rows_out, C);
      launch_kernel(pool_residual_add_backward_rows_kernel<scalar_t, acc_t>, l1.grid, l1.block, 0, stream,
          grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), branch.data_ptr<scalar_t>(),
          has_scale ? scale.data_ptr<scalar_t>() : nullptr, grad_branch.data_ptr<scalar_t>(), argmax.data_ptr<int32_t>(),
          has_scale ? grad_scale_acc.data_ptr<acc_t>() : nullptr, rows_out,
          output_rows(g, 1, rows_out, l1, "mvit_kernels.pool_residual_add_backward"), C, g);
      const Launch l2 = line_launch<acc_t>(B * (g.T * g.H + g.cls), C);
      launch_kernel(pool_residual_add_backward_input_kernel<scalar_t, acc_t>, l2.grid, l2.block, 0, stream,
          grad.data_ptr<scalar_t>(), argmax.data_ptr<int32_t>(), grad_x.data_ptr<scalar_t>(), B, N, C, g,
          line_divs(B * (g.T * g.H + g.cls), g.T, g.H, "mvit_kernels.pool_residual_add_backward"));
    });
  }
  return {grad_x, grad_branch, grad_scale_acc.to(x.scalar_type())};
}

}  // namespace
}  // namespace mvit

#ifndef MVIT_CUDA_EMULATION
TORCH_LIBRARY_IMPL(mvit_kernels, CUDA, m) {
  m.impl("pool3d", &mvit::pool3d_cuda);
  m.impl("pool3d_backward", &mvit::pool3d_backward_cuda);
  m.impl("pool_residual_add", &mvit::pool_residual_add_cuda);
  m.impl("pool_residual_add_backward", &mvit::pool_residual_add_backward_cuda);
}
#endif
