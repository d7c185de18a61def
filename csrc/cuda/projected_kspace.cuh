// k-space kernels of the CUDA projected soft path (parameters and the math:
// projected_kspace.h). They replace the ATen path's dozen small ops per pass (9 in the
// forward, 24 in the backward besides the GEMMs; on an H200 those cost about as much as the
// GEMMs at Llama-3-8B B=32 T=128: benchmarks/results/profile_forward_h200_60b8923.json).
//
// Work is tiny next to the GEMMs (B*T*S*k multiply-adds, all operands from L2), so these are
// plain CUDA-core kernels: a block owns kRowsPerTile rows, 16 threads share a row and hold
// its columns j = lane + 16 i in registers, and the other side of each product (P_S rows in
// the forward, g_c rows in the sources kernel) is staged through shared memory in chunks.
// Reductions go through shared memory in a fixed order (deterministic, no atomics, no warp
// shuffles), and the only CUDA constructs are __shared__ arrays and __syncthreads: with
// HYPERDAS_FAST_EMULATE the same source runs on the CPU (tests/cuda_emulation), which is how
// CI checks them without a GPU.
#pragma once

#include "element.cuh"
#include "projected_kspace.h"

namespace hyperdas_fast {
namespace cuda {
namespace kspace {

constexpr int kThreads = 256;
constexpr int kRows = kRowsPerTile;       // rows per block (16)
constexpr int kLanes = kThreads / kRows;  // threads per row (16)
constexpr int kChunk = 32;                // P_S rows staged per step (rows kernels)

// Sources per step in the sources kernel: g_c rows plus the block's R_b^T source rows stay
// under the 48 KB of static shared memory.
template <int KP>
struct SourcesChunk {
  static constexpr int value = KP <= 128 ? 32 : 16;
};

// Stages sources [s0, s0 + kChunk) of batch b: their weights for the tile's rows t0.. in
// sW[s][row], their P_S[:k] rows in sP (zero past k and S) and P_S[k + b] in sPv (with v).
template <typename T, int KP>
__device__ __forceinline__ void stage_sources(const T* ps, const T* w_b, int64_t b, int64_t t0, int64_t T_,
                                              int64_t S, int64_t s0, int k, int Kc, bool has_v,
                                              float (&sW)[kChunk][kRows], float (&sP)[kChunk][KP],
                                              float (&sPv)[kChunk]) {
  const int tid = threadIdx.x;
  for (int idx = tid; idx < kChunk * kRows; idx += kThreads) {
    const int s = idx / kRows, rr = idx % kRows;
    sW[s][rr] = (s0 + s < S && t0 + rr < T_) ? to_f(w_b[(s0 + s) * T_ + t0 + rr]) : 0.f;
  }
  for (int idx = tid; idx < kChunk * KP; idx += kThreads) {
    const int s = idx / KP, j = idx % KP;
    sP[s][j] = (s0 + s < S && j < k) ? to_f(ps[(b * S + s0 + s) * Kc + j]) : 0.f;
  }
  if (has_v && tid < kChunk) sPv[tid] = s0 + tid < S ? to_f(ps[(b * S + s0 + tid) * Kc + k + b]) : 0.f;
}

// acc[i] += W_src^T P_S[:k] for this thread's row and columns, over all S sources of
// batch b; returns sum_s w P_S[k + b] (= -2 v . W_src^T source) in lane 0 (0 elsewhere).
template <typename T, int KP>
__device__ __forceinline__ float mix_projections(const T* ps, const T* w_b, int64_t b, int64_t t0, int64_t T_,
                                                 int64_t S, int k, int Kc, bool has_v, float (&acc)[KP / kLanes],
                                                 float (&sW)[kChunk][kRows], float (&sP)[kChunk][KP],
                                                 float (&sPv)[kChunk]) {
  const int tid = threadIdx.x, r = tid / kLanes, lane = tid % kLanes;
  float vd = 0.f;
  for (int64_t s0 = 0; s0 < S; s0 += kChunk) {
    stage_sources<T, KP>(ps, w_b, b, t0, T_, S, s0, k, Kc, has_v, sW, sP, sPv);
    __syncthreads();
    const int ns = (int)mn(kChunk, S - s0);
    for (int s = 0; s < ns; ++s) {
      const float w = sW[s][r];
#pragma unroll
      for (int i = 0; i < KP / kLanes; ++i) acc[i] = fmaf(w, sP[s][lane + kLanes * i], acc[i]);
      if (has_v && lane == 0) vd = fmaf(w, sPv[s], vd);
    }
    __syncthreads();  // before the next chunk overwrites the staged rows
  }
  return vd;
}

// Four consecutive floats of shared memory from a 16-byte aligned address: one 128-bit load
// on the GPU.
__device__ __forceinline__ void load4(const float* src, float (&v)[4]) {
#ifdef HYPERDAS_FAST_EMULATE
  for (int c = 0; c < 4; ++c) v[c] = src[c];
#else
  const float4 x = *reinterpret_cast<const float4*>(src);
  v[0] = x.x;
  v[1] = x.y;
  v[2] = x.z;
  v[3] = x.w;
#endif
}

// Writes block(x) for one row: x[i] in column lane + 16 i (< k), xu in column k + b, zeros
// in the other reflection columns (Kc > k only with reflect).
template <typename T, int KP>
__device__ __forceinline__ void store_block(T* dst, const float (&x)[KP / kLanes], float xu, int lane, int k, int Kc,
                                            int64_t b) {
#pragma unroll
  for (int i = 0; i < KP / kLanes; ++i) {
    const int j = lane + kLanes * i;
    if (j < k) dst[j] = from_f<T>(x[i]);
  }
  for (int j = k + lane; j < Kc; j += kLanes) dst[j] = from_f<T>(j == k + b ? xu : 0.f);
}

// Sum over the 16 lanes of each row of one value per thread, in lane order; every thread
// gets its row's sum. red: [kRows][kLanes] shared scratch. Contains a __syncthreads, so
// every thread of the block must call it.
__device__ __forceinline__ float row_sum(float x, float (&red)[kRows][kLanes]) {
  const int r = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  red[r][lane] = x;
  __syncthreads();
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += red[r][l];
  return s;
}

// Grid of each kernel (x: row tiles, y: batch), shared by the launchers and the emulation.
template <typename T>
inline int64_t forward_tiles(const ForwardParams<T>& p) {
  const int64_t rows = p.e != nullptr ? mx(p.rows_pad, p.T) : p.T;
  return (rows + kRows - 1) / kRows;
}
inline int64_t source_tiles(int64_t S) { return (S + kRows - 1) / kRows; }

// ---------------------------------------------------------------------------------------
// Forward. Grid (forward_tiles, B): ceil(T / kRows) tiles, or rows_pad / kRows when e is
// written (its padded rows are zeroed).
// Register tiles: thread (rg, cg) holds the 4 columns 4 cg .. 4 cg + 3 of RT = KP / 64
// consecutive rows, so each source step reads one float4 of P_S and RT weights from shared
// memory for 4 RT multiply-adds. (The rows kernels' layout, one row per 16 threads and
// columns 16 apart, reads 9 values for 8: on an H200 this kernel took 32 us at Llama-3-8B
// B=32 T=128 that way, benchmarks/results/profile_forward_h200_600b5a3.json.)
// ---------------------------------------------------------------------------------------
template <typename T, int KP>
__global__ void __launch_bounds__(kThreads) forward_kernel(ForwardParams<T> p) {
  constexpr int CG = KP / 4;                  // column groups: threads per row group
  constexpr int RT = kRows * CG / kThreads;   // rows per thread
  static_assert(KP % 4 == 0 && RT >= 1 && RT * kThreads == kRows * CG, "the tile splits evenly");
  __shared__ float sW[kChunk][kRows];
  __shared__ __align__(16) float sP[kChunk][KP];
  __shared__ float sPv[kChunk];
  __shared__ float sVd[kRows];
  __shared__ float sRed[kRows][CG];

  const int tid = threadIdx.x, cg = tid % CG, r0 = (tid / CG) * RT, j0 = 4 * cg;
  const int64_t b = blockIdx.y;
  const int64_t t0 = (int64_t)blockIdx.x * kRows;
  const bool has_v = p.u != nullptr;
  const T* w_b = p.weights + b * (p.S + 1) * p.T;

  float acc[RT][4];
  float vs[RT];  // sum_s w P_S[k + b] (cg == 0 only)
#pragma unroll
  for (int i = 0; i < RT; ++i) {
    vs[i] = 0.f;
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[i][c] = 0.f;
  }
  for (int64_t s0 = 0; s0 < p.S; s0 += kChunk) {
    stage_sources<T, KP>(p.ps, w_b, b, t0, p.T, p.S, s0, p.k, p.Kc, has_v, sW, sP, sPv);
    __syncthreads();
    const int ns = (int)mn(kChunk, p.S - s0);
    for (int s = 0; s < ns; ++s) {
      float pv[4];
      load4(&sP[s][j0], pv);
#pragma unroll
      for (int i = 0; i < RT; ++i) {
        const float w = sW[s][r0 + i];
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[i][c] = fmaf(w, pv[c], acc[i][c]);
        if (has_v && cg == 0) vs[i] = fmaf(w, sPv[s], vs[i]);
      }
    }
    __syncthreads();  // before the next chunk overwrites the staged rows
  }

  float wm1[RT];  // w_self - 1
#pragma unroll
  for (int i = 0; i < RT; ++i) {
    const int64_t t = t0 + r0 + i;
    wm1[i] = t < p.T ? to_f(w_b[p.S * p.T + t]) - 1.f : 0.f;
    if (has_v && cg == 0)  // -2 v.delta
      sVd[r0 + i] = t < p.T ? fmaf(wm1[i], to_f(p.pb[(b * p.T + t) * p.Kc + p.k + b]), vs[i]) : 0.f;
  }
  __syncthreads();
  float uj[4], mj[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const int j = j0 + c;
    uj[c] = has_v && j < p.k ? p.u[b * p.k + j] : 0.f;
    mj[c] = p.mask != nullptr && j < p.k ? p.mask[b * p.mask_stride_b + j] : 1.f;
  }
#pragma unroll
  for (int i = 0; i < RT; ++i) {
    const int64_t t = t0 + r0 + i, row = b * p.T + t;
    const float vdd = has_v ? sVd[r0 + i] : 0.f;
    float ue = 0.f;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int j = j0 + c;
      float x = 0.f;
      if (t < p.T && j < p.k) {
        x = fmaf(vdd, uj[c], fmaf(wm1[i], to_f(p.pb[row * p.Kc + j]), acc[i][c])) * mj[c];
        ue = fmaf(x, uj[c], ue);
      }
      acc[i][c] = x;  // e, zero past k and T
    }
    sRed[r0 + i][cg] = ue;
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < RT; ++i) {
    const int64_t t = t0 + r0 + i, row = b * p.T + t;
    float ue = 0.f;  // u.e, summed over the row's column groups in order
    if (has_v)
      for (int l = 0; l < CG; ++l) ue += sRed[r0 + i][l];
    if (p.e != nullptr && t < p.rows_pad) {
      const int64_t erow = b * p.rows_pad + t;
#pragma unroll
      for (int c = 0; c < 4; ++c) p.e[erow * KP + j0 + c] = acc[i][c];
      if (cg == 0) p.eu[erow] = ue;
    }
    if (p.block != nullptr && t < p.T) {
      T* dst = p.block + row * p.Kc;
#pragma unroll
      for (int c = 0; c < 4; ++c)
        if (j0 + c < p.k) dst[j0 + c] = from_f<T>(acc[i][c]);
      for (int j = p.k + cg; j < p.Kc; j += CG) dst[j] = from_f<T>(j == p.k + b ? ue : 0.f);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward, rows kernel. Grid (row_tiles(T), B).
// ---------------------------------------------------------------------------------------
template <typename T, int KP>
__global__ void __launch_bounds__(kThreads) backward_rows_kernel(BackwardParams<T> p) {
  constexpr int NJ = KP / kLanes;
  __shared__ float sW[kChunk][kRows];
  __shared__ float sP[kChunk][KP];  // after the mix: rows [0, kRows) g_mask, [kRows, 2 kRows) y
  __shared__ float sPv[kChunk];
  __shared__ float sV[3][kRows];    // -2 v.delta, -2 v.g, -2 v.base
  __shared__ float sRed[kRows][kLanes];
  static_assert(kChunk >= 2 * kRows, "the column sums reuse sP's rows");

  const int tid = threadIdx.x, r = tid / kLanes, lane = tid % kLanes;
  const int64_t b = blockIdx.y;
  const int64_t tile = blockIdx.x;
  const int64_t t0 = tile * kRows;
  const int64_t t = t0 + r;
  const bool valid = t < p.T;
  const bool has_v = p.u != nullptr;
  const T* w_b = p.weights + b * (p.S + 1) * p.T;
  const int64_t row = b * p.T + t;

  float e[NJ], gc[NJ];
#pragma unroll
  for (int i = 0; i < NJ; ++i) e[i] = 0.f;
  const float vs = mix_projections<T, KP>(p.ps, w_b, b, t0, p.T, p.S, p.k, p.Kc, has_v, e, sW, sP, sPv);
  const float wm1 = valid ? to_f(w_b[p.S * p.T + t]) - 1.f : 0.f;
  if (has_v && lane == 0) {
    const T* pv = p.pb + row * p.Kc + p.k + b;
    sV[0][r] = valid ? fmaf(wm1, to_f(*pv), vs) : 0.f;
    sV[1][r] = valid ? to_f(p.pg[row * p.Kc + p.k + b]) : 0.f;
    sV[2][r] = valid ? to_f(*pv) : 0.f;
  }
  __syncthreads();
  const float vdd = has_v ? sV[0][r] : 0.f, vgg = has_v ? sV[1][r] : 0.f, vbb = has_v ? sV[2][r] : 0.f;
  float ue = 0.f, ugc = 0.f, gw_self = 0.f;
#pragma unroll
  for (int i = 0; i < NJ; ++i) {
    const int j = lane + kLanes * i;
    float c = 0.f, ev = 0.f, ge = 0.f, g = 0.f;
    if (valid && j < p.k) {
      const float uj = has_v ? p.u[b * p.k + j] : 0.f;
      const float pbj = to_f(p.pb[row * p.Kc + j]);
      c = fmaf(vdd, uj, fmaf(wm1, pbj, e[i]));   // R_b^T delta
      ge = fmaf(vgg, uj, to_f(p.pg[row * p.Kc + j]));  // R_b^T g
      const float cb = fmaf(vbb, uj, pbj);       // R_b^T base
      const float m = p.mask != nullptr ? p.mask[b * p.mask_stride_b + j] : 1.f;
      ev = c * m;
      g = ge * m;
      p.gc[row * p.k + j] = g;
      gw_self = fmaf(cb, g, gw_self);
      ue = fmaf(ev, uj, ue);
      ugc = fmaf(g, uj, ugc);
    }
    e[i] = ev;
    gc[i] = g;
    // per-column partial sums over this tile's rows: g_e * c (g_mask) and y_sum's terms
    if (j < KP) {
      sP[r][j] = ge * c;
      sP[kRows + r][j] = fmaf(vgg, ev, vdd * g);
    }
  }
  gw_self = row_sum(gw_self, sRed);  // (its __syncthreads also publishes sP's partial rows)
  for (int j = tid; j < p.k; j += kThreads) {
    const int64_t part = (b * gridDim.x + tile) * p.k + j;  // gridDim.x = row_tiles(T)
    float gm = 0.f, y = 0.f;
    for (int rr = 0; rr < kRows; ++rr) {
      gm += sP[rr][j];
      y += sP[kRows + rr][j];
    }
    if (p.gmask_part != nullptr) p.gmask_part[part] = gm;
    if (has_v) p.y_part[part] = y;
  }
  __syncthreads();
  ue = row_sum(ue, sRed);
  __syncthreads();
  ugc = row_sum(ugc, sRed);
  if (!valid) return;
  if (lane == 0) {
    p.gw[b * (p.S + 1) * p.T + p.S * p.T + t] = gw_self;
    if (has_v) p.ugc[row] = ugc;
  }
  store_block<T, KP>(p.ag + row * p.Kc, e, ue, lane, p.k, p.Kc, b);
#pragma unroll
  for (int i = 0; i < NJ; ++i) gc[i] *= wm1;
  store_block<T, KP>(p.ab + row * p.Kc, gc, wm1 * ugc, lane, p.k, p.Kc, b);
}

// ---------------------------------------------------------------------------------------
// Backward, sources kernel (after the rows kernel: reads g_c and u.g_c). Grid
// (source_tiles(S), B); a block owns kRows sources and walks all T base rows.
// ---------------------------------------------------------------------------------------
template <typename T, int KP>
__global__ void __launch_bounds__(kThreads) backward_sources_kernel(BackwardParams<T> p) {
  constexpr int NJ = KP / kLanes;
  constexpr int TC = SourcesChunk<KP>::value;        // base rows per step
  constexpr int kOut = (kRows * TC) / kThreads;      // g_w outputs per thread and step
  static_assert(kRows * TC == kOut * kThreads, "g_w outputs split evenly over the threads");
  __shared__ float sW[TC][kRows];     // w[b, s, t] for this block's sources s
  __shared__ float sG[TC][KP + 1];    // g_c rows (+1: the g_w loop reads down a column)
  __shared__ float sGu[TC];           // u.g_c
  __shared__ float sCs[kRows][KP + 1];  // R_b^T source_s
  __shared__ float sV[kRows];

  const int tid = threadIdx.x, r = tid / kLanes, lane = tid % kLanes;
  const int64_t b = blockIdx.y;
  const int64_t s0 = (int64_t)blockIdx.x * kRows;
  const int64_t s = s0 + r;
  const bool valid = s < p.S;
  const bool has_v = p.u != nullptr;
  const T* w_b = p.weights + b * (p.S + 1) * p.T;

  if (has_v && lane == 0) sV[r] = valid ? to_f(p.ps[(b * p.S + s) * p.Kc + p.k + b]) : 0.f;  // -2 v.source
  __syncthreads();
#pragma unroll
  for (int i = 0; i < NJ; ++i) {
    const int j = lane + kLanes * i;
    float cs = 0.f;
    if (valid && j < p.k) {
      cs = to_f(p.ps[(b * p.S + s) * p.Kc + j]);
      if (has_v) cs = fmaf(sV[r], p.u[b * p.k + j], cs);
    }
    sCs[r][j] = cs;
  }

  float gs[NJ];
#pragma unroll
  for (int i = 0; i < NJ; ++i) gs[i] = 0.f;
  float ugs = 0.f;
  for (int64_t tb = 0; tb < p.T; tb += TC) {
    for (int idx = tid; idx < TC * kRows; idx += kThreads) {
      const int tt = idx % TC, rr = idx / TC;  // consecutive threads: consecutive t (coalesced)
      sW[tt][rr] = (tb + tt < p.T && s0 + rr < p.S) ? to_f(w_b[(s0 + rr) * p.T + tb + tt]) : 0.f;
    }
    for (int idx = tid; idx < TC * KP; idx += kThreads) {
      const int tt = idx / KP, j = idx % KP;
      sG[tt][j] = (tb + tt < p.T && j < p.k) ? p.gc[(b * p.T + tb + tt) * p.k + j] : 0.f;
    }
    if (has_v && tid < TC) sGu[tid] = tb + tid < p.T ? p.ugc[b * p.T + tb + tid] : 0.f;
    __syncthreads();  // (the first pass also publishes sCs)
    const int nt = (int)mn(TC, p.T - tb);
    for (int tt = 0; tt < nt; ++tt) {
      const float w = sW[tt][r];
#pragma unroll
      for (int i = 0; i < NJ; ++i) gs[i] = fmaf(w, sG[tt][lane + kLanes * i], gs[i]);
      if (has_v) ugs = fmaf(w, sGu[tt], ugs);
    }
#pragma unroll
    for (int q = 0; q < kOut; ++q) {
      const int idx = tid + q * kThreads;
      const int tt = idx % TC, rr = idx / TC;
      float dot = 0.f;
      for (int j = 0; j < p.k; ++j) dot = fmaf(sCs[rr][j], sG[tt][j], dot);
      if (tb + tt < p.T && s0 + rr < p.S) p.gw[b * (p.S + 1) * p.T + (s0 + rr) * p.T + tb + tt] = dot;
    }
    __syncthreads();  // before the next step overwrites sW / sG
  }
  if (valid) store_block<T, KP>(p.as + (b * p.S + s) * p.Kc, gs, ugs, lane, p.k, p.Kc, b);
}

}  // namespace kspace
}  // namespace cuda
}  // namespace hyperdas_fast
