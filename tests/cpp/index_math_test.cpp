// Host checks of the index arithmetic in csrc/pool3d_common.h: FastDivmod, OutputRowDivs and LineDivs (used
// by the CUDA kernels only), compared with plain division over many divisors and values and over
// every row of several geometries; the window and covering loops, compared with brute force,
// and the GPU's flat box loop with nested loops. Built and run by tests/test_index_math.py, once
// as the CPU kernels compile the header and once with MVIT_CUDA_EMULATION (the GPU loop shape).
#include <cinttypes>
#include <cstdio>
#include <tuple>
#include <utility>
#include <vector>

#include "pool3d_common.h"

using mvit::FastDivmod;
using mvit::OutputRow;
using mvit::OutputRowDivs;
using mvit::PoolGeom;

static long checks = 0, failures = 0;

static void expect(bool ok, const char* what, int64_t a, int64_t b) {
  ++checks;
  if (!ok && failures++ < 20) std::printf("FAIL %s (%" PRId64 ", %" PRId64 ")\n", what, a, b);
}

static void check_divisor(uint32_t d) {
  const FastDivmod f(d);
  const uint32_t top = 0x7fffffffu;  // the largest n the launchers allow
  std::vector<uint32_t> ns;
  for (uint32_t n = 0; n < 3000; ++n) ns.push_back(n);
  for (uint32_t k : {1u, 2u, 3u, 1000u, top / d - 1, top / d}) {
    const uint64_t m = static_cast<uint64_t>(k) * d;
    for (int64_t delta = -2; delta <= 2; ++delta) {
      const int64_t n = static_cast<int64_t>(m) + delta;
      if (n >= 0 && n <= top) ns.push_back(static_cast<uint32_t>(n));
    }
  }
  for (uint32_t n = top - 3000; n != top; ++n) ns.push_back(n);
  ns.push_back(top);
  for (uint32_t n : ns) {
    uint32_t q, r;
    f.divmod(n, &q, &r);
    expect(q == n / d && r == n % d, "divmod", n, d);
  }
}

static void check_rows(PoolGeom g, int64_t batch, int64_t heads) {
  g.To = mvit::pool_out_size(g.T, g.kT, g.sT, g.pT);
  g.Ho = mvit::pool_out_size(g.H, g.kH, g.sH, g.pH);
  g.Wo = mvit::pool_out_size(g.W, g.kW, g.sW, g.pW);
  const OutputRowDivs divs(g, heads);
  const int64_t n_out = g.cls + g.out_grid();
  for (int64_t r = 0; r < batch * heads * n_out; ++r) {
    const OutputRow row = divs(static_cast<uint32_t>(r));
    const int64_t n = r % n_out, slab = r / n_out;
    expect(row.batch == slab / heads && row.head == slab % heads && row.n == n, "row slab/token", r, n_out);
    expect(row.is_cls == (n < g.cls), "row is_cls", r, n);
    if (n >= g.cls) {
      const int64_t o = n - g.cls;
      expect(row.ow == o % g.Wo && row.oh == (o / g.Wo) % g.Ho && row.ot == o / (g.Wo * g.Ho), "row coords", r, o);
    }
  }
}

// LineDivs splits every line of a (slabs, M, I) space as division does.
static void check_lines(int64_t slabs, int64_t M, int64_t I) {
  const mvit::LineDivs divs(M, I);
  for (int64_t line = 0; line < slabs * M * I; ++line) {
    uint32_t slab, m, i;
    divs(static_cast<uint32_t>(line), &slab, &m, &i);
    expect(slab == line / (M * I) && m == (line / I) % M && i == line % I, "line split", line, M * I);
  }
}

static PoolGeom with_output_sizes(PoolGeom g) {
  g.To = mvit::pool_out_size(g.T, g.kT, g.sT, g.pT);
  g.Ho = mvit::pool_out_size(g.H, g.kH, g.sH, g.pH);
  g.Wo = mvit::pool_out_size(g.W, g.kW, g.sW, g.pW);
  return g;
}

// for_each_window_input (every output's (k, i) pairs, in order) and for_each_covering_output
// (every input's (k, o) pairs, in order) against brute force over every kernel offset.
static void check_windows(PoolGeom g) {
  g = with_output_sizes(g);
  using Pairs = std::vector<std::pair<int64_t, int64_t>>;
  std::vector<Pairs> covering(g.in_grid());
  for (int64_t o = 0; o < g.out_grid(); ++o) {
    const int64_t ot = o / (g.Ho * g.Wo), oh = (o / g.Wo) % g.Ho, ow = o % g.Wo;
    Pairs want, got;
    for (int64_t kt = 0; kt < g.kT; ++kt)
      for (int64_t kh = 0; kh < g.kH; ++kh)
        for (int64_t kw = 0; kw < g.kW; ++kw) {
          const int64_t t = ot * g.sT - g.pT + kt, h = oh * g.sH - g.pH + kh, w = ow * g.sW - g.pW + kw;
          if (t < 0 || t >= g.T || h < 0 || h >= g.H || w < 0 || w >= g.W) continue;
          const int64_t k = (kt * g.kH + kh) * g.kW + kw, i = (t * g.H + h) * g.W + w;
          want.emplace_back(k, i);
          covering[i].emplace_back(k, o);
        }
    mvit::for_each_window_input(g, o, [&](int64_t k, int64_t i) { got.emplace_back(k, i); });
    expect(got == want, "window pairs", o, static_cast<int64_t>(got.size()));
  }
  for (int64_t i = 0; i < g.in_grid(); ++i) {
    Pairs got;
    mvit::for_each_covering_output(g, i, [&](int64_t k, int64_t o) { got.emplace_back(k, o); });
    expect(got == covering[i], "covering pairs", i, static_cast<int64_t>(got.size()));
  }
}

// The flat loop visits the box's points in the nested loops' order, empty boxes included.
static void check_flat_box_loop() {
  for (int a0 = -1; a0 <= 1; ++a0)
    for (int na = -1; na <= 3; ++na)
      for (int nb = -1; nb <= 4; ++nb)
        for (int nc = -1; nc <= 5; ++nc) {
          const int b0 = 2, c0 = -3;
          std::vector<std::tuple<int, int, int>> want, got;
          for (int a = a0; a < a0 + na; ++a)
            for (int b = b0; b < b0 + nb; ++b)
              for (int c = c0; c < c0 + nc; ++c) want.emplace_back(a, b, c);
          mvit::for_each_in_box_flat(a0, a0 + na, b0, b0 + nb, c0, c0 + nc,
                                     [&](int a, int b, int c) { got.emplace_back(a, b, c); });
          expect(got == want, "flat box loop", na * 100 + nb * 10 + nc, static_cast<int64_t>(got.size()));
        }
}

int main() {
  for (uint32_t d = 1; d <= 1200; ++d) check_divisor(d);
  for (uint32_t d : {1021u, 1024u, 4096u, 6273u, 25089u, 65535u, 65536u, 65537u, 1u << 20, 1000000007u, 0x40000000u,
                     0x40000001u, 0x7ffffffeu, 0x7fffffffu})
    check_divisor(d);
  // T, H, W, To, Ho, Wo (filled in), kT, kH, kW, sT, sH, sW, pT, pH, pW, cls
  check_rows({8, 56, 56, 0, 0, 0, 3, 3, 3, 1, 2, 2, 1, 1, 1, 1}, 2, 2);  // MViT-B block 1 q pooling
  check_rows({8, 56, 56, 0, 0, 0, 3, 3, 3, 1, 8, 8, 1, 1, 1, 1}, 1, 1);  // block 0 k/v pooling
  check_rows({3, 5, 7, 0, 0, 0, 3, 3, 3, 2, 2, 1, 1, 1, 1, 0}, 3, 5);    // odd sizes, no class token
  check_rows({1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1}, 2, 3);    // a one-token grid
  check_flat_box_loop();
  check_lines(64, 8, 56);  // input lines (T, H) of MViT-B's first stage, 64 slabs
  check_lines(3, 7, 1);
  check_lines(5, 1, 9);
  check_lines(2, 1, 1);
  check_windows({8, 14, 14, 0, 0, 0, 3, 3, 3, 1, 2, 2, 1, 1, 1, 0});   // MViT q pooling, a smaller grid
  check_windows({8, 16, 16, 0, 0, 0, 3, 3, 3, 1, 8, 8, 1, 1, 1, 0});   // k/v pooling: most inputs unread
  check_windows({3, 5, 7, 0, 0, 0, 3, 3, 3, 2, 2, 1, 1, 1, 1, 0});     // odd sizes
  check_windows({4, 7, 6, 0, 0, 0, 2, 4, 3, 3, 1, 2, 1, 2, 0, 0});     // even kernels, stride > kernel
  check_windows({1, 9, 9, 0, 0, 0, 1, 3, 3, 1, 2, 2, 0, 1, 1, 0});     // images: T = 1
  check_windows({2, 3, 3, 0, 0, 0, 2, 3, 3, 1, 1, 1, 1, 1, 1, 0});     // kernel as large as the padded grid
  std::printf("%ld checks, %ld failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
