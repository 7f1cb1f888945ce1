// Runs CUDA kernels on the CPU, for tests on machines without a GPU. csrc/cuda/pool_ops_cuda.cu
// includes this header in place of the CUDA runtime when compiled as C++ with
// MVIT_CUDA_EMULATION defined (tests/cpp/cuda_emulated_ops.cpp), so its launchers and kernels
// run unchanged: grid and block shapes, grid-stride loops, shared-memory reductions, warp
// shuffles and atomics.
//
// How: every block runs on its own, its threads as cooperative fibers (ucontext) on one OS
// thread. A thread runs until it reaches __syncthreads or a warp shuffle, or returns. One warp
// at a time runs as far as it can (its shuffles released as soon as all 32 lanes wait at one),
// then the next; when every thread waits at __syncthreads the block goes on. Running warps
// ahead of each other is the adversarial schedule for shared memory: a reduction that reuses
// its buffer without a barrier gives wrong sums here. What a GPU would leave undefined is an
// error here, not a hang: a barrier some threads never reach, a shuffle that part of a warp
// skips or with a partial mask, a launch over CUDA's limits (threads per block, grid size,
// 48 KiB of dynamic shared memory without opt-in).
//
// What it does not model: true concurrency (a race between two threads' plain writes to the
// same global address, or an order-dependent result, shows up only as a different result when
// a test reverses the order of blocks, warps and lanes, see Config), memory ordering,
// registers, timing. The kernels' resources are checked from the compiled cubins
// instead (tests/test_cuda_resources.py).
#pragma once

#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <tuple>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = struct CUstream_emulated*;
enum cudaError_t { cudaSuccess = 0 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

namespace cuda_emulation {

struct Config {
  int multiprocessors = 2;     // what cudaDevAttrMultiProcessorCount reports: few SMs, small grids, long grid-stride loops
  bool reverse_order = false;  // run blocks, warps and lanes last to first (an order-dependent result is a race)
};
inline Config& config() {
  static Config c;
  return c;
}

enum class State { kRunnable, kAtSyncthreads, kAtShuffle, kDone };

struct Thread {
  dim3 idx;
  ucontext_t context;
  State state = State::kRunnable;
  unsigned char exchange[8];  // this lane's value during a shuffle
};

struct Block {
  dim3 block_idx, block_dim, grid_dim;
  std::vector<Thread> threads;
  std::vector<double> shared;  // dynamic shared memory (double: 8-byte aligned)
  ucontext_t scheduler;
  int current = -1;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
};

inline Block*& current_block() {
  thread_local Block* block = nullptr;
  return block;
}
inline Thread& current_thread() {
  Block* b = current_block();
  return b->threads[b->current];
}

// Fiber stacks, mapped once and reused, each above a guard page (an overflow faults instead of
// overwriting the next stack).
inline char* stack(size_t i, size_t* size) {
  static std::vector<char*> stacks;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  *size = 256 * 1024;
  while (stacks.size() <= i) {
    void* p = mmap(nullptr, *size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "cuda_emulation: could not map a fiber stack");
    mprotect(p, page, PROT_NONE);
    stacks.push_back(static_cast<char*>(p) + page);
  }
  return stacks[i];
}

inline void fiber_entry() {
  Block* b = current_block();
  try {
    (*b->body)();
  } catch (...) {
    if (!b->error) b->error = std::current_exception();
  }
  b->threads[b->current].state = State::kDone;
}  // returns to uc_link, the scheduler

inline void stop(State s) {
  Block* b = current_block();
  Thread& t = b->threads[b->current];
  t.state = s;
  swapcontext(&t.context, &b->scheduler);
}

inline void run_block(Block& b) {
  const int n = static_cast<int>(b.threads.size());
  for (int i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    size_t size;
    char* sp = stack(i, &size);
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = sp;
    t.context.uc_stack.ss_size = size;
    t.context.uc_link = &b.scheduler;
    makecontext(&t.context, fiber_entry, 0);
  }
  const auto where = [&] {
    return c10::str("block (", b.block_idx.x, ", ", b.block_idx.y, ", ", b.block_idx.z, ") of (", b.block_dim.x, ", ",
                    b.block_dim.y, ", ", b.block_dim.z, ") threads");
  };
  const int warps = (n + 31) / 32;
  const bool reverse = config().reverse_order;
  for (;;) {
    // Each warp in turn runs as far as it can: its lanes one after another up to their next stop,
    // again after each shuffle, until they wait at __syncthreads or have returned. Warps thus
    // run ahead of each other as far as the barriers allow (shared memory reused without a
    // barrier shows up), and lanes run ahead of each other between shuffles.
    int done = 0;
    for (int jw = 0; jw < warps; ++jw) {
      const int w = (reverse ? warps - 1 - jw : jw) * 32, lanes = std::min(32, n - w);
      for (;;) {
        for (int jl = 0; jl < lanes; ++jl) {
          const int i = w + (reverse ? lanes - 1 - jl : jl);
          if (b.threads[i].state != State::kRunnable) continue;
          b.current = i;
          swapcontext(&b.scheduler, &b.threads[i].context);
          if (b.error) std::rethrow_exception(b.error);
        }
        int shuffling = 0, w_done = 0;
        for (int i = w; i < w + lanes; ++i) {
          shuffling += b.threads[i].state == State::kAtShuffle;
          w_done += b.threads[i].state == State::kDone;
        }
        if (shuffling == 0) {
          done += w_done;
          break;
        }
        TORCH_CHECK(lanes == 32, "cuda_emulation: ", where(), ": warp shuffle in a partial warp of ", lanes, " lanes");
        TORCH_CHECK(shuffling == 32, "cuda_emulation: ", where(), ", warp ", w / 32, ": ", shuffling,
                    " lanes wait at a full-mask shuffle while ", w_done, " have exited and ", 32 - shuffling - w_done,
                    " wait at __syncthreads");
        for (int i = w; i < w + 32; ++i) b.threads[i].state = State::kRunnable;
      }
    }
    if (done == n) return;
    TORCH_CHECK(done == 0, "cuda_emulation: ", where(), ": ", n - done, " threads wait at __syncthreads but ", done,
                " have exited without reaching it");
    for (Thread& t : b.threads) t.state = State::kRunnable;
  }
}

// Runs body() as every thread of every block of the launch, one block after another.
inline void launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  TORCH_CHECK(threads >= 1 && threads <= 1024 && block.x <= 1024 && block.y <= 1024 && block.z <= 64,
              "cuda_emulation: invalid block (", block.x, ", ", block.y, ", ", block.z, ")");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 0x7fffffffu && grid.y <= 65535 &&
                  grid.z <= 65535,
              "cuda_emulation: invalid grid (", grid.x, ", ", grid.y, ", ", grid.z, ")");
  TORCH_CHECK(smem <= 48 * 1024, "cuda_emulation: ", smem, " bytes of dynamic shared memory (48 KiB without opt-in)");
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  for (uint64_t j = 0; j < blocks; ++j) {
    const uint64_t k = config().reverse_order ? blocks - 1 - j : j;
    Block b;
    b.block_idx = dim3(static_cast<unsigned>(k % grid.x), static_cast<unsigned>(k / grid.x % grid.y),
                       static_cast<unsigned>(k / (uint64_t{grid.x} * grid.y)));
    b.block_dim = block;
    b.grid_dim = grid;
    b.shared.assign((smem + sizeof(double) - 1) / sizeof(double), std::nan(""));  // garbage until written
    b.threads.resize(threads);
    for (uint64_t i = 0; i < threads; ++i)
      b.threads[i].idx = dim3(static_cast<unsigned>(i % block.x), static_cast<unsigned>(i / block.x % block.y),
                              static_cast<unsigned>(i / (uint64_t{block.x} * block.y)));
    b.body = &body;
    Block* outer = current_block();
    current_block() = &b;
    try {
      run_block(b);
    } catch (...) {
      current_block() = outer;
      throw;
    }
    current_block() = outer;
  }
}

}  // namespace cuda_emulation

#define threadIdx (::cuda_emulation::current_thread().idx)
#define blockIdx (::cuda_emulation::current_block()->block_idx)
#define blockDim (::cuda_emulation::current_block()->block_dim)
#define gridDim (::cuda_emulation::current_block()->grid_dim)

inline void __syncthreads() { cuda_emulation::stop(cuda_emulation::State::kAtSyncthreads); }

template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= 8, "cuda_emulation: shuffles of at most 8 bytes");
  TORCH_CHECK(mask == 0xffffffffu, "cuda_emulation: only full-mask shuffles are emulated");
  TORCH_CHECK(lane_mask >= 0 && lane_mask < 32, "cuda_emulation: lane mask ", lane_mask);
  cuda_emulation::Block* b = cuda_emulation::current_block();
  const int me = b->current;
  std::memcpy(b->threads[me].exchange, &value, sizeof(T));
  cuda_emulation::stop(cuda_emulation::State::kAtShuffle);  // every lane has written
  T out;
  std::memcpy(&out, b->threads[me ^ lane_mask].exchange, sizeof(T));
  cuda_emulation::stop(cuda_emulation::State::kAtShuffle);  // every lane has read
  return out;
}

inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}
inline double atomicAdd(double* p, double v) {
  const double old = *p;
  *p = old + v;
  return old;
}
inline float rsqrt(float v) { return 1.0f / std::sqrt(v); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  TORCH_CHECK(attr == cudaDevAttrMultiProcessorCount, "cuda_emulation: attribute ", static_cast<int>(attr));
  *value = cuda_emulation::config().multiprocessors;
  return cudaSuccess;
}
#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, #expr)

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace cuda
}  // namespace c10

namespace mvit {
namespace {

template <class T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(cuda_emulation::current_block()->shared.data());
}

// launch_kernel of pool_ops_cuda.cu: the arguments are converted to the kernel's parameter
// types once, as a real launch copies them.
template <class... Params, class... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t,
                   Args&&... args) {
  auto params = std::make_tuple(static_cast<Params>(std::forward<Args>(args))...);
  cuda_emulation::launch(grid, block, smem, [&] { std::apply(kernel, params); });
}

}  // namespace
}  // namespace mvit
