// Runs CUDA kernels written for it on the CPU: one std::thread per CUDA thread, blocks one
// after another, __syncthreads as a std::barrier, __shared__ arrays as function statics
// (one block runs at a time, so a static is that block's shared memory). Enough for the
// k-space kernels of csrc/cuda/projected_kspace.cuh, which use nothing else of CUDA (no
// warp intrinsics, no dynamic shared memory); float only. Slow, and meant for small shapes:
// it checks indexing, tiling, padding and reductions, not speed.
#pragma once

#define HYPERDAS_FAST_EMULATE 1

#include <math.h>

#include <barrier>
#include <cstdint>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx{0, 0, 0};
inline thread_local dim3 blockIdx{0, 0, 0};
inline dim3 gridDim{1, 1, 1};
inline dim3 blockDim{1, 1, 1};
inline std::barrier<>* emulated_block_barrier = nullptr;

inline void __syncthreads() { emulated_block_barrier->arrive_and_wait(); }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

// kernel(): the kernel call with its arguments bound, e.g. [&] { my_kernel<float>(p); }.
template <typename F>
void emulate_launch(dim3 grid, unsigned threads, F kernel) {
  gridDim = grid;
  blockDim = dim3(threads);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::barrier<> barrier((std::ptrdiff_t)threads);
        emulated_block_barrier = &barrier;
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            threadIdx = dim3(t);
            blockIdx = dim3(x, y, z);
            kernel();
          });
        for (auto& th : pool) th.join();
      }
}
