// A CPU emulation of the CUDA features kernels/cuda/sdpo_preference.cu uses, so that the CPU
// tests can execute its kernels (tests/test_cuda_emulation.py). Not a general CUDA emulator:
// - a launch runs its blocks one after another; inside a block, every CUDA thread is a
//   std::thread, and __syncthreads() is a std::barrier over them;
// - __shared__ becomes `static`: one copy, shared by the threads of the (single) running block;
// - blockIdx, threadIdx, blockDim and gridDim are thread-locals set by the launch.
// The test rewrites each `kernel<<<grid, block, shared, stream>>>(args)` into
// `cuda_emulation::launch(grid, block, [&] { kernel(args); })` before compiling with g++.
#pragma once

#include <algorithm>
#include <barrier>
#include <cstdint>
#include <functional>
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
enum cudaError_t { cudaSuccess = 0 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error (CPU emulation)"; }

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
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::vector<std::thread> workers;
        workers.reserve(threads);
        for (unsigned t = 0; t < threads; ++t) {
          workers.emplace_back([&, t] {
            gridDim = grid;
            blockDim = block;
            blockIdx = dim3(bx, by, bz);
            threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            kernel();
          });
        }
        for (auto& worker : workers) worker.join();
      }
  block_barrier = nullptr;
}

}  // namespace cuda_emulation

inline void __syncthreads() { cuda_emulation::block_barrier->arrive_and_wait(); }
