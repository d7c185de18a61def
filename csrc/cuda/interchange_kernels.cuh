// CUDA kernels of the interchange op: launchers on raw pointers (no torch headers), so CI
// without a GPU can compile-check them with plain nvcc.
//
// Math (HYPERDAS.md section 1), per token row with R [d, k], v = reflect[b], u = R^T v,
// m = mask[b]:
//   delta = mix - base,  mix = sum_s w[b,s,t] source[b,s] + w[b,S,t] base[b,t]   (soft)
//   delta = source[b, s] - base[b, t]                                             (rows)
//   c = R^T delta - 2 (v.delta) u,  e = m * c,  out = base + R e - 2 (u.e) v
//
// Pipeline (fused path, k <= kMaxFusedK):
//   1. coords kernel: 64-row tiles x a slice of d; builds the mix in shared memory with
//      tensor-core MMAs (w^T tile x source tile), forms delta, accumulates delta @ R and
//      v.delta. d is split across blocks (dsplit) so the grid fills the GPU; partial sums
//      go to a workspace (no atomics: the result is deterministic).
//   2. finalize kernel: sums the dsplit partials, applies the Householder correction and
//      the mask -> e [rows, KP] fp32 and u.e [rows].
//   3. apply kernel: 64-row tiles x a span of d: out = base + e R^T - 2 (u.e) v.
// Vanilla (no basis): one mix kernel (soft) or a row copy kernel (rows).
// half / bfloat16 use WMMA (fp32 accumulation); float uses an FMA path with the same
// tiling (exact fp32, not tensor cores).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace hyperdas_fast {
namespace cuda {

// Largest subspace size k handled by the fused kernels; larger k (e.g. BoundlessDAS with
// k = d) is a GEMM-bound problem that the binding hands to cuBLAS via ATen.
constexpr int kMaxFusedK = 256;

struct Dims {
  int64_t B = 0;   // batch
  int64_t T = 0;   // base tokens
  int64_t S = 0;   // source tokens
  int64_t d = 0;   // hidden size
  int64_t k = 0;   // subspace size (0 = vanilla)
  int64_t P = 0;   // selected rows (rows mode)
};

// Optional subspace arguments shared by both modes.
template <typename T>
struct Subspace {
  const T* basis = nullptr;      // [d, k] row-major
  const T* reflect = nullptr;    // [B, d] or nullptr
  const float* u = nullptr;      // [B, k] fp32 = R^T v, or nullptr
  const float* mask = nullptr;   // fp32, row b at mask + b * mask_stride_b, or nullptr
  int64_t mask_stride_b = 0;     // k for a [B, k] mask, 0 for a shared [k] mask
};

// Floats of fp32 workspace the fused path needs (0 for vanilla).
size_t soft_forward_workspace_floats(const Dims& dims, int num_sms);
size_t rows_forward_workspace_floats(const Dims& dims, int num_sms);

// Soft form: out = interchange(base, source, weights, ...). All tensors contiguous.
template <typename T>
cudaError_t launch_soft_forward(const T* base, const T* source, const T* weights, const Subspace<T>& sub,
                                T* out, float* workspace, const Dims& dims, int num_sms, cudaStream_t stream);

// Rows form, in place on `base` (contiguous [B, T, d]): row p sets
// base[bidx[p], tpos[p]] = x + R_b diag(m_b) R_b^T (source[bidx[p], spos[p]] - x). Rows are unique.
template <typename T>
cudaError_t launch_rows_forward(T* base, const T* source, const int64_t* bidx, const int64_t* tpos,
                                const int64_t* spos, const Subspace<T>& sub, float* workspace, const Dims& dims,
                                int num_sms, cudaStream_t stream);

// The apply kernel alone, for the projected path (csrc/cuda/projected_kspace.h): out = base +
// e R^T - 2 (u.e) v from e [B * rows_pad, KP] and u.e [B * rows_pad] (fp32, zero in the
// padded rows and columns) in the layout soft_apply_layout gives. 0 < k <= kMaxFusedK.
void soft_apply_layout(const Dims& dims, int64_t* rows_pad, int* kp);
template <typename T>
cudaError_t launch_soft_apply(const T* base, T* out, const Subspace<T>& sub, const float* e, const float* eu,
                              const Dims& dims, int num_sms, cudaStream_t stream);

}  // namespace cuda
}  // namespace hyperdas_fast
