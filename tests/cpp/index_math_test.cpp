// Host checks of the index arithmetic in csrc/pool3d_common.h that only the CUDA kernels use
// (FastDivmod, OutputRowDivs): compared with plain division over many divisors and values, and
// over every row of several geometries. Built and run by tests/test_index_math.py.
#include <cinttypes>
#include <cstdio>
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
  std::printf("%ld checks, %ld failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
