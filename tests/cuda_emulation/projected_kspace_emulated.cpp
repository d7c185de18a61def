// The k-space kernels of csrc/cuda/projected_kspace.cuh on the CPU (emulate.h), behind a C
// API for ctypes (tests/test_cuda_kspace_emulated.py). Pointers may be null where the
// parameter structs allow it. Returns 0, or 1 for arguments the launchers would refuse.
#include "emulate.h"

#include "../../csrc/cuda/projected_kspace.cuh"

using namespace hyperdas_fast::cuda::kspace;
using hyperdas_fast::cuda::padded_k;
using hyperdas_fast::cuda::with_padded_k;

extern "C" int emulated_forward(const float* ps, const float* pb, const float* weights, const float* u,
                                const float* mask, int64_t mask_stride_b, float* block, float* e, float* eu,
                                int64_t B, int64_t T, int64_t S, int64_t rows_pad, int k, int Kc) {
  ForwardParams<float> p;
  p.ps = ps, p.pb = pb, p.weights = weights, p.u = u, p.mask = mask, p.mask_stride_b = mask_stride_b;
  p.block = block, p.e = e, p.eu = eu;
  p.B = B, p.T = T, p.S = S, p.rows_pad = rows_pad, p.k = k, p.Kc = Kc, p.KP = padded_k(k);
  if (k <= 0 || k > kMaxK) return 1;
  with_padded_k(k, [&](auto kp) {
    constexpr int KP = decltype(kp)::value;
    emulate_launch(dim3((unsigned)forward_tiles(p), (unsigned)B), kThreads, [&] { forward_kernel<float, KP>(p); });
  });
  return 0;
}

extern "C" int emulated_backward(const float* ps, const float* pb, const float* pg, const float* weights,
                                 const float* u, const float* mask, int64_t mask_stride_b, float* ag, float* ab,
                                 float* as, float* gc, float* ugc, float* gw, float* gmask_part, float* y_part,
                                 int64_t B, int64_t T, int64_t S, int k, int Kc) {
  BackwardParams<float> p;
  p.ps = ps, p.pb = pb, p.pg = pg, p.weights = weights, p.u = u, p.mask = mask, p.mask_stride_b = mask_stride_b;
  p.ag = ag, p.ab = ab, p.as = as, p.gc = gc, p.ugc = ugc, p.gw = gw, p.gmask_part = gmask_part, p.y_part = y_part;
  p.B = B, p.T = T, p.S = S, p.k = k, p.Kc = Kc;
  if (k <= 0 || k > kMaxK) return 1;
  with_padded_k(k, [&](auto kp) {
    constexpr int KP = decltype(kp)::value;
    if (T > 0)  // as launch_backward
      emulate_launch(dim3((unsigned)row_tiles(T), (unsigned)B), kThreads, [&] { backward_rows_kernel<float, KP>(p); });
    if (S > 0)
      emulate_launch(dim3((unsigned)source_tiles(S), (unsigned)B), kThreads,
                     [&] { backward_sources_kernel<float, KP>(p); });
  });
  return 0;
}
