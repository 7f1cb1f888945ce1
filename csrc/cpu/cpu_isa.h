// The CPU kernels' hot loops, compiled twice and picked at run time: a default version (the
// extension is built without -march flags, so SSE2 only) and, on x86, an AVX2+FMA one.
// MVIT_DEFINE_DISPATCH(name, impl) turns an always-inline body impl<scalar_t, acc_t>(args...)
// into name<scalar_t, acc_t>(args...), which calls the AVX2 copy where the CPU has it.
// Also the f32x8 value type their float loops keep sums in. Used by pool_ops_cpu.cpp and
// rel_pos_mask_cpu.cpp.
#pragma once

#include <cstdint>
#include <cstdlib>

#include "pool3d_common.h"  // MVIT_FORCE_INLINE: the bodies must inline into each compilation

namespace mvit {

#if defined(__GNUC__) && defined(__x86_64__)
#define MVIT_CPU_AVX2 1
#define MVIT_TARGET_AVX2 __attribute__((target("avx2,fma")))
// MVIT_KERNELS_CPU_AVX2=0 forces the default versions (tests run both; read once).
inline bool cpu_has_avx2() {
  static const bool has = [] {
    const char* env = std::getenv("MVIT_KERNELS_CPU_AVX2");
    if (env != nullptr && env[0] == '0') return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}
#endif

// Eight floats as one value (GCC/Clang vector extension; unaligned, may alias the tensor data).
// Sums kept in such values stay in registers across a loop. Kept in an array of floats indexed
// by channel, GCC left them in memory: every add then waited on the store before it (store
// forwarding): about 10 GFLOP/s in pool3d's conv at MViT-B's K/V shapes on a core that runs a
// float32 matrix product at 60 (2-core VM, 2026-12-06).
typedef float f32x8 __attribute__((vector_size(32), aligned(4), __may_alias__));
constexpr int64_t kF32x8 = 8;

MVIT_FORCE_INLINE inline f32x8 load8(const float* p) { return *reinterpret_cast<const f32x8*>(p); }
MVIT_FORCE_INLINE inline void store8(float* p, f32x8 v) { *reinterpret_cast<f32x8*>(p) = v; }

}  // namespace mvit

// One implementation, two compilations: Impl is a generic callable wrapping the always-inline
// body, so both copies come from the same source.
#define MVIT_DEFINE_DISPATCH(name, impl)                                      \
  template <class scalar_t, class acc_t, class... Args>                       \
  void name##_default(Args... args) {                                         \
    impl<scalar_t, acc_t>(args...);                                           \
  }                                                                           \
  MVIT_DEFINE_AVX2(name, impl)                                                \
  template <class scalar_t, class acc_t, class... Args>                       \
  void name(Args... args) {                                                   \
    MVIT_CALL_AVX2(name, args)                                                \
    name##_default<scalar_t, acc_t>(args...);                                 \
  }

#ifdef MVIT_CPU_AVX2
#define MVIT_DEFINE_AVX2(name, impl)                                          \
  template <class scalar_t, class acc_t, class... Args>                       \
  MVIT_TARGET_AVX2 void name##_avx2(Args... args) {                           \
    impl<scalar_t, acc_t>(args...);                                           \
  }
#define MVIT_CALL_AVX2(name, args)                                            \
  if (cpu_has_avx2()) return name##_avx2<scalar_t, acc_t>(args...);
#else
#define MVIT_DEFINE_AVX2(name, impl)
#define MVIT_CALL_AVX2(name, args)
#endif
