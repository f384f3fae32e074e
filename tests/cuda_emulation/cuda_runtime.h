// A CPU emulation of the CUDA features kernels/cuda/sdpo_preference.cu uses, so that the CPU
// tests can execute its kernels (tests/test_cuda_emulation.py). Not a general CUDA emulator:
// - a launch runs its blocks one after another; inside a block, every CUDA thread is a
//   std::thread, and __syncthreads() is a std::barrier over them (the launch starts one
//   std::thread per thread of a block, and they run the blocks in turn: starting 256 new ones
//   per block made a 297-block launch take 8 s on 2 cores, 2 s this way);
// - __shared__ becomes `static`: one copy, shared by the threads of the (single) running block;
// - blockIdx, threadIdx, blockDim and gridDim are thread-locals set by the launch;
// - the 16-byte vector accesses (__ldg / __stwb of a uint4) are counted, and one at an address
//   that is not 16-byte aligned is a fault, as on a GPU: it is skipped, and the next
//   cudaGetLastError() returns "misaligned address" (the library turns that into an error);
// - blocks run in grid order, or in a shuffled order after cuda_emulation_shuffle_blocks(seed)
//   (a GPU schedules blocks in no fixed order; results must not depend on it);
// - after cuda_emulation_jitter_threads(seed), every thread waits a pseudo-random 0 to 63 us
//   (a yield below 16) before each block and after each __syncthreads(), so the threads of a
//   block reach their shared-memory reads and writes in another order per seed: a result
//   that depends on timing (a missing barrier) changes with it.
// The test rewrites each `kernel<<<grid, block, shared, stream>>>(args)` into
// `cuda_emulation::launch(grid, block, [&] { kernel(args); })` before compiling with g++.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 blockIdx, threadIdx, blockDim, gridDim;

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorMisalignedAddress = 716 };

struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

namespace cuda_emulation {
inline std::atomic<long> vector_loads{0}, vector_stores{0}, misaligned{0};
inline unsigned block_order_seed = 0;  // 0: grid order
inline unsigned thread_jitter_seed = 0;  // 0: no waits
inline thread_local unsigned jitter_state = 0;

// The thread's next wait (xorshift32 on a per-thread state seeded by the launch).
inline void jitter() {
  if (thread_jitter_seed == 0) return;
  jitter_state ^= jitter_state << 13;
  jitter_state ^= jitter_state >> 17;
  jitter_state ^= jitter_state << 5;
  const unsigned micros = jitter_state % 64;
  if (micros < 16) {
    std::this_thread::yield();
  } else {
    std::this_thread::sleep_for(std::chrono::microseconds(micros));
  }
}
}  // namespace cuda_emulation

inline cudaError_t cudaGetLastError() {
  return cuda_emulation::misaligned.exchange(0) ? cudaErrorMisalignedAddress : cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t status) {
  return status == cudaErrorMisalignedAddress ? "misaligned address" : "no error";
}

inline bool cuda_emulation_aligned(const void* address) {
  if (reinterpret_cast<uintptr_t>(address) % 16 == 0) return true;
  ++cuda_emulation::misaligned;
  return false;
}
inline uint4 __ldg(const uint4* address) {
  uint4 value{0, 0, 0, 0};
  if (!cuda_emulation_aligned(address)) return value;
  ++cuda_emulation::vector_loads;
  std::memcpy(&value, address, sizeof(value));
  return value;
}
inline void __stwb(uint4* address, uint4 value) {
  if (!cuda_emulation_aligned(address)) return;
  ++cuda_emulation::vector_stores;
  std::memcpy(address, &value, sizeof(value));
}
inline float __uint_as_float(unsigned bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}
inline unsigned __float_as_uint(float value) {
  unsigned bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// The test's window onto the counters and the block order (exported from the test build).
extern "C" __attribute__((visibility("default"))) long cuda_emulation_vector_loads() {
  return cuda_emulation::vector_loads.exchange(0);
}
extern "C" __attribute__((visibility("default"))) long cuda_emulation_vector_stores() {
  return cuda_emulation::vector_stores.exchange(0);
}
extern "C" __attribute__((visibility("default"))) void cuda_emulation_shuffle_blocks(
    unsigned seed) {
  cuda_emulation::block_order_seed = seed;
}
extern "C" __attribute__((visibility("default"))) void cuda_emulation_jitter_threads(
    unsigned seed) {
  cuda_emulation::thread_jitter_seed = seed;
}

// CUDA's min overloads for device code (by value: `decltype(a < b ? a : b)` would be a reference).
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}

namespace cuda_emulation {

inline std::barrier<>* block_barrier = nullptr;

// Runs `kernel` (a closure calling the kernel with its arguments) on grid x block threads.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& kernel) {
  const unsigned threads = block.x * block.y * block.z;
  std::barrier<> barrier(threads);
  block_barrier = &barrier;
  std::vector<dim3> blocks;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) blocks.emplace_back(bx, by, bz);
  if (block_order_seed != 0) {
    std::mt19937 generator(block_order_seed);
    std::shuffle(blocks.begin(), blocks.end(), generator);
  }
  std::vector<std::thread> workers;
  workers.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      gridDim = grid;
      blockDim = block;
      threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      jitter_state = ((thread_jitter_seed * 2654435761u) ^ ((t + 1) * 40503u)) | 1u;
      for (const dim3 block_index : blocks) {
        blockIdx = block_index;
        jitter();
        kernel();
        // The end of the block: no thread starts the next one (whose __shared__ statics are
        // this one's) before all have left this one.
        barrier.arrive_and_wait();
      }
    });
  }
  for (auto& worker : workers) worker.join();
  block_barrier = nullptr;
}

}  // namespace cuda_emulation

inline void __syncthreads() {
  cuda_emulation::block_barrier->arrive_and_wait();
  cuda_emulation::jitter();
}
