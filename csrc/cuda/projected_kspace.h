// Parameters and launchers of the projected soft path's k-space kernels
// (projected_kspace.cuh). Torch-free and free of device code, so the binding
// (interchange_cuda.cpp, a host compiler) and the CPU emulation of the kernels
// (tests/cuda_emulation, HYPERDAS_FAST_EMULATE) include it alike.
//
// The projected path (csrc/common/interchange_projected.h derives it) forms the mix only in
// k dimensions: with RV = [R | -2 v_1 .. -2 v_B] ([d, Kc], Kc = k + B; just R without
// reflect) the GEMMs P_S = source RV, P_B = base RV (and P_G = grad RV in the backward) carry
// everything these kernels need. Row x of batch b in k dimensions gives
// block(x) = [x | u.x in column k + b, zeros in the other B - 1 columns] ([Kc]).
#pragma once

#include <cstdint>
#include <type_traits>

namespace hyperdas_fast {
namespace cuda {

// Subspace sizes are padded to 64, 128 or 256 (three instantiations per dtype and mode keep
// the compile time of CI modest; the kernels are memory-bound at these sizes).
inline int padded_k(int64_t k) { return k <= 64 ? 64 : (k <= 128 ? 128 : 256); }

// f(std::integral_constant<int, padded_k(k)>{}): picks a kernel's KP instantiation.
template <typename F>
auto with_padded_k(int64_t k, F&& f) {
  switch (padded_k(k)) {
    case 64:
      return f(std::integral_constant<int, 64>{});
    case 128:
      return f(std::integral_constant<int, 128>{});
    default:
      return f(std::integral_constant<int, 256>{});
  }
}

namespace kspace {

// Forward: for every base row (b, t)
//   c = R_b^T delta = W_src^T P_S[:k] + (w_self - 1) P_B[:k] + (-2 v.delta) u,
//   -2 v.delta = W_src^T P_S[k + b] + (w_self - 1) P_B[k + b],   e = m c,
// written as block(e) (for the output GEMM base + block(e) RV^T), and/or as e and u.e in the
// apply kernel's padded fp32 layout (interchange_kernels.cuh: launch_soft_apply).
template <typename Elem>
struct ForwardParams {
  const Elem* ps = nullptr;       // [B*S, Kc] = source RV
  const Elem* pb = nullptr;       // [B*T, Kc] = base RV
  const Elem* weights = nullptr;  // [B, S + 1, T]
  const float* u = nullptr;    // [B, k] = R^T v_b, or nullptr without reflect
  const float* mask = nullptr; // row b at mask + b * mask_stride_b, or nullptr
  int64_t mask_stride_b = 0;
  Elem* block = nullptr;          // [B*T, Kc]: block(e), or nullptr
  float* e = nullptr;          // [B * rows_pad, KP]: e, zero in padded rows and columns; or nullptr
  float* eu = nullptr;         // [B * rows_pad]: u.e (with e)
  int64_t B = 0, T = 0, S = 0, rows_pad = 0;
  int k = 0, Kc = 0, KP = 0;   // KP: padded k (64, 128 or 256), e's row length
};

// Backward, with P_G = grad RV, g_e = R_b^T g, g_c = m g_e:
// rows kernel (per base row): g_c, u.g_c, g_w[b, S, t] = (R_b^T base_t) . g_c,t,
//   Ag = block(e), Ab = block((w_self - 1) g_c), and per tile of kRows rows the partial sums
//   over t of g_e * c (g_mask) and of (-2 v.g) e + (-2 v.delta) g_c (y_sum);
// sources kernel (per source row, after the rows kernel): g_s = W_src g_c,
//   As = block(g_s) (u.g_s = W_src (u.g_c)), g_w[b, s, t] = (R_b^T source_s) . g_c,t.
template <typename Elem>
struct BackwardParams {
  const Elem* ps = nullptr;       // [B*S, Kc]
  const Elem* pb = nullptr;       // [B*T, Kc]
  const Elem* pg = nullptr;       // [B*T, Kc] = grad RV
  const Elem* weights = nullptr;  // [B, S + 1, T]
  const float* u = nullptr;    // [B, k] or nullptr
  const float* mask = nullptr;
  int64_t mask_stride_b = 0;
  Elem* ag = nullptr;             // [B*T, Kc] block(e)
  Elem* ab = nullptr;             // [B*T, Kc] block((w_self - 1) g_c)
  Elem* as = nullptr;             // [B*S, Kc] block(W_src g_c)
  float* gc = nullptr;         // [B*T, k]
  float* ugc = nullptr;        // [B*T] (with u)
  float* gw = nullptr;         // [B, S + 1, T]
  float* gmask_part = nullptr; // [B, tiles, k], or nullptr without mask
  float* y_part = nullptr;     // [B, tiles, k] (with u)
  int64_t B = 0, T = 0, S = 0;
  int k = 0, Kc = 0;
};

// Rows per block of the forward and backward rows kernels: the partial sums have
// ceil(T / kRowsPerTile) tiles per batch.
constexpr int kRowsPerTile = 16;
// Largest k the kernels take (a row's columns live in registers, 16 per thread at most).
constexpr int kMaxK = 256;

inline int64_t row_tiles(int64_t T) { return (T + kRowsPerTile - 1) / kRowsPerTile; }

}  // namespace kspace
}  // namespace cuda
}  // namespace hyperdas_fast

#ifndef HYPERDAS_FAST_EMULATE
#include <cuda_runtime.h>

namespace hyperdas_fast {
namespace cuda {
namespace kspace {

// p.B * p.T rows; 0 < k <= kMaxK. All pointers contiguous as described above.
template <typename T>
cudaError_t launch_forward(const ForwardParams<T>& p, cudaStream_t stream);
template <typename T>
cudaError_t launch_backward(const BackwardParams<T>& p, cudaStream_t stream);

}  // namespace kspace
}  // namespace cuda
}  // namespace hyperdas_fast
#endif
