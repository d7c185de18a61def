// Element conversions and index helpers shared by the CUDA kernels.
//
// With HYPERDAS_FAST_EMULATE defined (tests/cuda_emulation/emulate.h), this is plain host
// C++ for float only: the k-space kernels of projected_kspace.cuh then run on the CPU, one
// std::thread per CUDA thread, so CI checks their indexing and arithmetic without a GPU.
#pragma once

#include <cstdint>

#ifndef HYPERDAS_FAST_EMULATE
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace hyperdas_fast {
namespace cuda {

__host__ __device__ __forceinline__ int64_t mn(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t mx(int64_t a, int64_t b) { return a > b ? a : b; }

__device__ __forceinline__ float to_f(float x) { return x; }
template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }

#ifndef HYPERDAS_FAST_EMULATE
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
#endif

}  // namespace cuda
}  // namespace hyperdas_fast
