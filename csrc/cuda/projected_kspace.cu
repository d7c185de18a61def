// Launchers of the projected path's k-space kernels (projected_kspace.cuh), instantiated for
// float / __half / __nv_bfloat16 and k padded to 64, 128 or 256.
#include "projected_kspace.cuh"

namespace hyperdas_fast {
namespace cuda {
namespace kspace {

template <typename T>
cudaError_t launch_forward(const ForwardParams<T>& p, cudaStream_t stream) {
  if (p.B == 0 || p.T == 0) return cudaSuccess;
  if (p.k <= 0 || p.k > kMaxK || (p.e != nullptr && (p.KP != padded_k(p.k) || p.rows_pad < p.T)))
    return cudaErrorInvalidValue;
  return with_padded_k(p.k, [&](auto kp) {
    constexpr int KP = decltype(kp)::value;
    forward_kernel<T, KP><<<dim3((unsigned)forward_tiles(p), (unsigned)p.B), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t launch_backward(const BackwardParams<T>& p, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  if (p.k <= 0 || p.k > kMaxK) return cudaErrorInvalidValue;
  return with_padded_k(p.k, [&](auto kp) {
    constexpr int KP = decltype(kp)::value;
    if (p.T > 0) {
      backward_rows_kernel<T, KP><<<dim3((unsigned)row_tiles(p.T), (unsigned)p.B), kThreads, 0, stream>>>(p);
      cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    // with T = 0 too: it writes block(W_src g_c) = block(0), which the caller's GEMMs read
    if (p.S > 0)
      backward_sources_kernel<T, KP><<<dim3((unsigned)source_tiles(p.S), (unsigned)p.B), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

#define HYPERDAS_INSTANTIATE(T)                                                      \
  template cudaError_t launch_forward<T>(const ForwardParams<T>&, cudaStream_t);     \
  template cudaError_t launch_backward<T>(const BackwardParams<T>&, cudaStream_t);

HYPERDAS_INSTANTIATE(float)
HYPERDAS_INSTANTIATE(__half)
HYPERDAS_INSTANTIATE(__nv_bfloat16)
#undef HYPERDAS_INSTANTIATE

}  // namespace kspace
}  // namespace cuda
}  // namespace hyperdas_fast
