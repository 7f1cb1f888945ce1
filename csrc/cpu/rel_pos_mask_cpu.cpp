// CPU implementation of rel_pos_mask: query rows of MViTv2's decomposed rel-pos bias, written as
// SDPA's additive mask, straight from the pooled q and the axes' tables (inference; the Python
// caller, mvit_kernels/pooling_attention.py, passes chunks of rows through one buffer).
//
// Per query row (b, head, n), grid coordinates (qt, qh, qw): the axes' terms
// tt[a] = q . Rt[qt, a], th[b] = q . Rh[qh, b], tw[c] = q . Rw[qw, c] (22-36 dot products of
// length d), then the row mask[(a, b, c)] = tt[a] + (th[b] + tw[c]), zero on the class token's
// row and column. One pass over the mask, q read once: the torch version (three einsums, then a
// broadcast add out= the mask) made a copy of q per axis and wrote the mask with a 7-14-wide
// inner loop.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu_isa.h"

namespace mvit {
namespace {

// out[k] = sum_c q[c] * table[k * d + c] for k < K. The reduction's lanes reassociate only under
// `omp simd` (no -ffast-math in this build); without OpenMP the loop is scalar and still right.
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

struct MaskGeom {
  int64_t qt, qh, qw;  // query grid
  int64_t kt, kh, kw;  // key grid
  int64_t cls;         // 1 with a class token (row 0 and column 0 of the mask are zero)
  int64_t d;
};

// One mask row for grid query g (scratch: d + kt + kh + kw + kh * kw values). Absent tables
// (nullptr) contribute zero terms.
template <class scalar_t, class acc_t>
MVIT_FORCE_INLINE inline void mask_row_impl(const MaskGeom& m, int64_t g, const scalar_t* __restrict__ q, int64_t sd,
                                            const acc_t* Rt, const acc_t* Rh, const acc_t* Rw, acc_t* __restrict__ scratch,
                                            scalar_t* __restrict__ out) {
  acc_t* qv = scratch;
  acc_t* tt = qv + m.d;
  acc_t* th = tt + m.kt;
  acc_t* tw = th + m.kh;
  acc_t* hw = tw + m.kw;
  for (int64_t c = 0; c < m.d; ++c) qv[c] = static_cast<acc_t>(q[c * sd]);
  const int64_t gt = g / (m.qh * m.qw), gh = g / m.qw % m.qh, gw = g % m.qw;
  for (int64_t a = 0; a < m.kt; ++a) tt[a] = acc_t(0);
  for (int64_t b = 0; b < m.kh; ++b) th[b] = acc_t(0);
  for (int64_t c = 0; c < m.kw; ++c) tw[c] = acc_t(0);
  if (Rt != nullptr) axis_terms(qv, Rt + gt * m.kt * m.d, m.d, m.kt, tt);
  if (Rh != nullptr) axis_terms(qv, Rh + gh * m.kh * m.d, m.d, m.kh, th);
  if (Rw != nullptr) axis_terms(qv, Rw + gw * m.kw * m.d, m.d, m.kw, tw);
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
  TORCH_CHECK(table->dim() == 3 && table->size(0) == q_size && table->size(1) == k_size && table->size(2) == d,
              "rel_pos_mask: ", name, " must be the gathered table (", q_size, ", ", k_size, ", ", d, "), got ",
              table->sizes());
  return table->to(acc).contiguous();
}

int64_t grid_size(at::IntArrayRef thw, const char* name) {
  TORCH_CHECK(thw.size() == 3, "rel_pos_mask: ", name, " must have 3 sizes (T, H, W), got ", thw.size());
  for (int64_t s : thw) TORCH_CHECK(s >= 1, "rel_pos_mask: ", name, " sizes must be >= 1, got ", thw);
  return thw[0] * thw[1] * thw[2];
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
    const acc_t* rt = Rt.defined() ? Rt.const_data_ptr<acc_t>() : nullptr;
    const acc_t* rh = Rh.defined() ? Rh.const_data_ptr<acc_t>() : nullptr;
    const acc_t* rw = Rw.defined() ? Rw.const_data_ptr<acc_t>() : nullptr;
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t sB = q.stride(0), sH = q.stride(1), sN = q.stride(2), sd = q.stride(3);
    // ~d * (kt + kh + kw) multiply-adds and N_kv writes a row: 16 rows are enough to split on.
    at::parallel_for(0, total, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(d + m.kt + m.kh + m.kw + m.kh * m.kw);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t bh = i / rows, n = row0 + i % rows;
        scalar_t* dst = op + i * n_kv;
        if (n < cls) {  // the class token's row
          for (int64_t j = 0; j < n_kv; ++j) dst[j] = scalar_t(0);
          continue;
        }
        const scalar_t* qrow = qp + (bh / heads) * sB + (bh % heads) * sH + n * sN;
        mask_row<scalar_t, acc_t>(m, n - cls, qrow, sd, rt, rh, rw, scratch.data(), dst);
      }
    });
  });
}

}  // namespace mvit

TORCH_LIBRARY_IMPL(mvit_kernels, CPU, m) {
  m.impl("rel_pos_mask", &mvit::rel_pos_mask_cpu);
}
