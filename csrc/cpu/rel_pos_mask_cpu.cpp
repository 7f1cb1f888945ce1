// CPU implementation of rel_pos_mask: query rows of MViTv2's decomposed rel-pos bias, written as
// SDPA's additive mask, straight from the pooled q and the axes' tables (inference; the Python
// caller, mvit_kernels/pooling_attention.py, passes chunks of rows through one buffer).
//
// Per query row (b, head, n), grid coordinates (qt, qh, qw): the axes' terms
// tt[a] = q . Rt[qt, a], th[b] = q . Rh[qh, b], tw[c] = q . Rw[qw, c] (22-36 dot products of
// length d; for float rows vectorized over keys, key_block_dots), then the row
// mask[(a, b, c)] = tt[a] + (th[b] + tw[c]), zero on the class token's row and column. One pass
// over the mask, q read once: the torch version (three einsums, then a broadcast add out= the
// mask) made a copy of q per axis and wrote the mask with a 7-14-wide inner loop.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"

namespace mvit {
namespace {

// out[k] = sum_c q[c] * table[k * d + c] for k < K. The reduction's lanes reassociate only under
// `omp simd` (no -ffast-math in this build); without OpenMP the loop is scalar and still right.
// The double path's dot products (float rows take key_block_dots).
template <class acc_t>
MVIT_FORCE_INLINE inline void axis_terms(const acc_t* __restrict__ q, const acc_t* __restrict__ table, int64_t d,
                                         int64_t K, acc_t* __restrict__ out) {
  for (int64_t k = 0; k < K; ++k) {
    const acc_t* r = table + k * d;
    acc_t s = acc_t(0);
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < d; ++c) s += q[c] * r[c];
    out[k] = s;
  }
}

// Float rows: the dot products of all three axes at once, vectorized over keys. Each axis' table
// at one query coordinate is stored as blocks of 8 keys, (d, 8) each, padded with zero keys
// (AxisTables::blocks), and block j's sums are one f32x8: sum_c q[c] * block_j[c]. Sums across lanes
// (one per dot product, from a store and scalar adds) took most of the op's time at MViTv2's
// 393-key blocks; these sums need none. Two accumulators per block (even and odd c) halve the
// chains of dependent adds. kMaxKeyBlocks: the 12 accumulators leave AVX2 registers for loads.
constexpr int kMaxKeyBlocks = 6;

template <int NB>
MVIT_FORCE_INLINE inline void key_block_dots(const float* __restrict__ q, int64_t d, const float* const* blocks,
                                             float* __restrict__ out) {
  f32x8 even[NB], odd[NB];
  for (int j = 0; j < NB; ++j) even[j] = odd[j] = f32x8{};
  int64_t c = 0;
  for (; c + 2 <= d; c += 2) {
    const float q0 = q[c], q1 = q[c + 1];
    for (int j = 0; j < NB; ++j) {
      even[j] += q0 * load8(blocks[j] + c * kF32x8);
      odd[j] += q1 * load8(blocks[j] + (c + 1) * kF32x8);
    }
  }
  if (c < d)
    for (int j = 0; j < NB; ++j) even[j] += q[c] * load8(blocks[j] + c * kF32x8);
  for (int j = 0; j < NB; ++j) store8(out + j * kF32x8, even[j] + odd[j]);
}

struct MaskGeom {
  int64_t qt, qh, qw;  // query grid
  int64_t kt, kh, kw;  // key grid
  int64_t cls;         // 1 with a class token (row 0 and column 0 of the mask are zero)
  int64_t d;
};

// The gathered tables (Q_a, K_a, d) of the three axes (nullptr where absent), and for float
// rows the same as key blocks: blocks[a] + ((x * nblocks[a] + j) * d + c) * 8 + l holds
// R_a[x, 8 j + l, c], zero for 8 j + l >= K_a.
template <class acc_t>
struct AxisTables {
  const acc_t* rows[3];
  const float* blocks[3];
  int64_t nblocks[3];
};

// One mask row for grid query g (scratch: d + kt + kh + kw + kh * kw + 8 kMaxKeyBlocks values).
// Absent tables contribute zero terms.
template <class scalar_t, class acc_t>
MVIT_FORCE_INLINE inline void mask_row_impl(const MaskGeom& m, int64_t g, const scalar_t* __restrict__ q, int64_t sd,
                                            const AxisTables<acc_t>& tab, acc_t* __restrict__ scratch,
                                            scalar_t* __restrict__ out) {
  acc_t* terms[3] = {scratch + m.d, scratch + m.d + m.kt, scratch + m.d + m.kt + m.kh};  // tt, th, tw
  acc_t* hw = terms[2] + m.kw;
  acc_t* sums = hw + m.kh * m.kw;
  const acc_t* qv = scratch;  // q's row as acc_t: read in place where it already is one
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (sd == 1) qv = q;
  }
  if (qv == scratch)
    for (int64_t c = 0; c < m.d; ++c) scratch[c] = static_cast<acc_t>(q[c * sd]);
  const int64_t coord[3] = {g / (m.qh * m.qw), g / m.qw % m.qh, g % m.qw};
  const int64_t keys[3] = {m.kt, m.kh, m.kw};
  for (int a = 0; a < 3; ++a)
    for (int64_t k = 0; k < keys[a]; ++k) terms[a][k] = acc_t(0);
  bool done = false;
  if constexpr (std::is_same_v<acc_t, float>) {
    const int64_t nb = tab.nblocks[0] + tab.nblocks[1] + tab.nblocks[2];
    if (nb <= kMaxKeyBlocks) {
      const float* blocks[kMaxKeyBlocks];
      int n = 0;
      for (int a = 0; a < 3; ++a)
        for (int64_t j = 0; j < tab.nblocks[a]; ++j)
          blocks[n++] = tab.blocks[a] + (coord[a] * tab.nblocks[a] + j) * m.d * kF32x8;
      switch (n) {
        case 1: key_block_dots<1>(qv, m.d, blocks, sums); break;
        case 2: key_block_dots<2>(qv, m.d, blocks, sums); break;
        case 3: key_block_dots<3>(qv, m.d, blocks, sums); break;
        case 4: key_block_dots<4>(qv, m.d, blocks, sums); break;
        case 5: key_block_dots<5>(qv, m.d, blocks, sums); break;
        default: key_block_dots<6>(qv, m.d, blocks, sums); break;
      }
      const float* from = sums;
      for (int a = 0; a < 3; ++a) {
        if (tab.nblocks[a] == 0) continue;
        for (int64_t k = 0; k < keys[a]; ++k) terms[a][k] = from[k];
        from += tab.nblocks[a] * kF32x8;
      }
      done = true;
    }
  }
  if (!done)
    for (int a = 0; a < 3; ++a)
      if (tab.rows[a] != nullptr) axis_terms(qv, tab.rows[a] + coord[a] * keys[a] * m.d, m.d, keys[a], terms[a]);
  const acc_t *tt = terms[0], *th = terms[1], *tw = terms[2];
  const int64_t khw = m.kh * m.kw;
  for (int64_t b = 0; b < m.kh; ++b)
    for (int64_t c = 0; c < m.kw; ++c) hw[b * m.kw + c] = th[b] + tw[c];
  if (m.cls) out[0] = scalar_t(0);
  scalar_t* grid = out + m.cls;
  for (int64_t a = 0; a < m.kt; ++a) {
    const acc_t base = tt[a];
    scalar_t* dst = grid + a * khw;
    for (int64_t j = 0; j < khw; ++j) dst[j] = static_cast<scalar_t>(base + hw[j]);
  }
}

MVIT_DEFINE_DISPATCH(mask_row, mask_row_impl)

// A gathered table (Q_a, K_a, d) as contiguous acc_t, or an undefined tensor.
at::Tensor table_arg(const c10::optional<at::Tensor>& table, const char* name, int64_t q_size, int64_t k_size,
                     int64_t d, at::ScalarType acc) {
  if (!table.has_value() || !table->defined()) return at::Tensor();
  TORCH_CHECK(table->device().is_cpu(), "rel_pos_mask: ", name, " must be a CPU tensor, got ", table->device());
  // Another floating dtype than q's is read in q's accumulation type (autocast leaves the tables float32).
  TORCH_CHECK(at::isFloatingType(table->scalar_type()), "rel_pos_mask: ", name,
              " must be float32, float64, bfloat16 or float16, got ", table->scalar_type());
  TORCH_CHECK(table->dim() == 3 && table->size(0) == q_size && table->size(1) == k_size && table->size(2) == d,
              "rel_pos_mask: ", name, " must be the gathered table (", q_size, ", ", k_size, ", ", d, "), got ",
              table->sizes());
  return table->to(acc).contiguous();
}

int64_t grid_size(at::IntArrayRef thw, const char* name) {
  TORCH_CHECK(thw.size() == 3, "rel_pos_mask: ", name, " must have 3 sizes (T, H, W), got ", thw.size());
  int64_t grid = 1;  // bounded as it is formed: (2^62, 2, 2) wrapped to 0
  for (int64_t s : thw) {
    TORCH_CHECK(s >= 1, "rel_pos_mask: ", name, " sizes must be >= 1, got ", thw);
    TORCH_CHECK(s <= INT32_MAX / grid, "rel_pos_mask: ", name, " must hold at most 2^31 - 1 positions, got ", thw);
    grid *= s;
  }
  return grid;
}

// A gathered float table (Q_a, K_a, d) as key blocks (AxisTables::blocks); empty without a table.
std::vector<float> key_blocks(const at::Tensor& table, int64_t d) {
  std::vector<float> blocks;
  if (!table.defined()) return blocks;
  const int64_t Q = table.size(0), K = table.size(1), nb = (K + kF32x8 - 1) / kF32x8;
  const float* r = table.const_data_ptr<float>();
  blocks.assign(Q * nb * d * kF32x8, 0.f);
  for (int64_t x = 0; x < Q; ++x)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = 0; c < d; ++c)
        blocks[((x * nb + k / kF32x8) * d + c) * kF32x8 + k % kF32x8] = r[(x * K + k) * d + c];
  return blocks;
}

}  // namespace

void rel_pos_mask_cpu(const at::Tensor& q, const c10::optional<at::Tensor>& table_t,
                      const c10::optional<at::Tensor>& table_h, const c10::optional<at::Tensor>& table_w,
                      at::IntArrayRef thw_q, at::IntArrayRef thw_kv, bool has_cls, int64_t row0, const at::Tensor& out) {
  TORCH_CHECK(q.dim() == 4, "rel_pos_mask: q must be (B, heads, N_q, d), got ", q.sizes());
  TORCH_CHECK(out.dim() == 4, "rel_pos_mask: out must be (B, heads, rows, N_kv), got ", out.sizes());
  TORCH_CHECK(q.device().is_cpu() && out.device().is_cpu(), "rel_pos_mask: q and out must be CPU tensors");
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "rel_pos_mask: q must be float32, float64, bfloat16 or float16, got ",
              q.scalar_type());
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), "rel_pos_mask: out must have q's dtype ", q.scalar_type(),
              ", got ", out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), "rel_pos_mask: out must be contiguous");
  const int64_t cls = has_cls ? 1 : 0;
  const int64_t n_q = q.size(2), d = q.size(3), rows = out.size(2);
  TORCH_CHECK(n_q == cls + grid_size(thw_q, "thw_q"), "rel_pos_mask: q has ", n_q, " tokens, thw_q ", thw_q,
              has_cls ? " plus the class token" : "", " asks for ", cls + grid_size(thw_q, "thw_q"));
  const int64_t n_kv = cls + grid_size(thw_kv, "thw_kv");
  TORCH_CHECK(out.size(0) == q.size(0) && out.size(1) == q.size(1) && out.size(3) == n_kv,
              "rel_pos_mask: out must be (", q.size(0), ", ", q.size(1), ", rows, ", n_kv, "), got ", out.sizes());
  TORCH_CHECK(row0 >= 0 && row0 + rows <= n_q, "rel_pos_mask: rows [", row0, ", ", row0 + rows, ") outside the ", n_q,
              " query rows");
  TORCH_CHECK(table_h.has_value() == table_w.has_value(), "rel_pos_mask: table_h and table_w come together");
  TORCH_CHECK(table_t.has_value() || table_h.has_value(), "rel_pos_mask: needs table_t or table_h and table_w");
  if (out.numel() == 0) return;
  const MaskGeom m{thw_q[0], thw_q[1], thw_q[2], thw_kv[0], thw_kv[1], thw_kv[2], cls, d};
  const int64_t heads = q.size(1), total = q.size(0) * heads * rows;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rel_pos_mask", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor Rt = table_arg(table_t, "table_t", m.qt, m.kt, d, acc);
    const at::Tensor Rh = table_arg(table_h, "table_h", m.qh, m.kh, d, acc);
    const at::Tensor Rw = table_arg(table_w, "table_w", m.qw, m.kw, d, acc);
    const at::Tensor* R[3] = {&Rt, &Rh, &Rw};
    AxisTables<acc_t> tab{};
    std::vector<float> blocks[3];
    for (int a = 0; a < 3; ++a) {
      tab.rows[a] = R[a]->defined() ? R[a]->const_data_ptr<acc_t>() : nullptr;
      if constexpr (std::is_same_v<acc_t, float>) {
        blocks[a] = key_blocks(*R[a], d);
        tab.blocks[a] = blocks[a].data();
        tab.nblocks[a] = R[a]->defined() ? (R[a]->size(1) + kF32x8 - 1) / kF32x8 : 0;
      }
    }
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t sB = q.stride(0), sH = q.stride(1), sN = q.stride(2), sd = q.stride(3);
    // ~d * (kt + kh + kw) multiply-adds and N_kv writes a row: 16 rows are enough to split on.
    at::parallel_for(0, total, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(d + m.kt + m.kh + m.kw + m.kh * m.kw + kMaxKeyBlocks * kF32x8);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t bh = i / rows, n = row0 + i % rows;
        scalar_t* dst = op + i * n_kv;
        if (n < cls) {  // the class token's row
          for (int64_t j = 0; j < n_kv; ++j) dst[j] = scalar_t(0);
          continue;
        }
        const scalar_t* qrow = qp + (bh / heads) * sB + (bh % heads) * sH + n * sN;
        mask_row<scalar_t, acc_t>(m, n - cls, qrow, sd, tab, scratch.data(), dst);
      }
    });
  });
}

}  // namespace mvit

TORCH_LIBRARY_IMPL(mvit_kernels, CPU, m) {
  m.impl("rel_pos_mask", &mvit::rel_pos_mask_cpu);
}
