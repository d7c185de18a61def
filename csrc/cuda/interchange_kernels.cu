// Kernels and launchers of the interchange op (see interchange_kernels.cuh for the math and
// the pipeline). Templated over float / __half / __nv_bfloat16, fp32 accumulation.
#include "interchange_kernels.cuh"
#include "element.cuh"
#include "projected_kspace.h"  // padded_k, with_padded_k

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <type_traits>

namespace hyperdas_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // 8 warps per block
constexpr int kWarps = kThreads / 32;
constexpr int BM = 64;         // rows per tile
constexpr int DC = 64;         // d chunk of the coords kernel
constexpr int SS = 16;         // source tokens per MMA step of the mix

// ---------------------------------------------------------------------------------------
// 16-element row segment loads / stores (conversions: element.cuh)
// ---------------------------------------------------------------------------------------

// Loads p[0..n) (n <= 16) as floats, zero beyond n. `vec`: p is 16-byte aligned and n == 16.
template <typename T>
__device__ __forceinline__ void load16(const T* p, int n, bool vec, float (&out)[16]) {
  if (vec && n == 16) {
    constexpr int kPer = 16 / sizeof(T);  // elements per uint4
    const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int i = 0; i < 16 / kPer; ++i) {
      uint4 raw = __ldg(q + i);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < kPer; ++j) out[i * kPer + j] = to_f(e[j]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i) out[i] = i < n ? to_f(p[i]) : 0.f;
  }
}

// Same as load16 without the read-only cache path (the rows kernel reads rows it rewrites).
template <typename T>
__device__ __forceinline__ void load16_rw(const T* p, int n, bool vec, float (&out)[16]) {
  if (vec && n == 16) {
    constexpr int kPer = 16 / sizeof(T);
    const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int i = 0; i < 16 / kPer; ++i) {
      uint4 raw = q[i];
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < kPer; ++j) out[i * kPer + j] = to_f(e[j]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i) out[i] = i < n ? to_f(p[i]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store16(T* p, int n, bool vec, const float (&v)[16]) {
  if (vec && n == 16) {
    constexpr int kPer = 16 / sizeof(T);
    uint4* q = reinterpret_cast<uint4*>(p);
#pragma unroll
    for (int i = 0; i < 16 / kPer; ++i) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int j = 0; j < kPer; ++j) e[j] = from_f<T>(v[i * kPer + j]);
      q[i] = raw;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i)
      if (i < n) p[i] = from_f<T>(v[i]);
  }
}

// ---------------------------------------------------------------------------------------
// Block-level tile MMA: acc[M][N] += A[M][K] B[K][N], A row-major in shared memory, B either
// row-major (B(kk, n) = sB[kk * ldb + n]) or column-major (B(kk, n) = sB[n * ldb + kk]).
// ---------------------------------------------------------------------------------------

// Tensor cores (WMMA 16x16x16) for half / bfloat16. Fragment f of the M/16 x N/16 grid
// belongs to warp f % 8.
template <typename T, int M, int N>
struct WmmaTile {
  static constexpr int FN = N / 16;
  static constexpr int F = (M / 16) * FN;
  static_assert(F % kWarps == 0, "tile must split evenly over 8 warps");
  static constexpr int FPW = F / kWarps;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[FPW];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int j = 0; j < FPW; ++j) nvcuda::wmma::fill_fragment(acc[j], 0.f);
  }

  template <bool kBColMajor>
  __device__ __forceinline__ void mma(const T* sA, int lda, const T* sB, int ldb, int K) {
    using namespace nvcuda;
    const int w = threadIdx.x / 32;
    using BLayout = typename std::conditional<kBColMajor, wmma::col_major, wmma::row_major>::type;
    for (int ks = 0; ks < K; ks += 16) {
#pragma unroll
      for (int j = 0; j < FPW; ++j) {
        const int f = w + kWarps * j;
        const int r = f / FN, c = f % FN;
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> b;
        wmma::load_matrix_sync(a, sA + r * 16 * lda + ks, lda);
        if (kBColMajor)
          wmma::load_matrix_sync(b, sB + c * 16 * ldb + ks, ldb);
        else
          wmma::load_matrix_sync(b, sB + ks * ldb + c * 16, ldb);
        wmma::mma_sync(acc[j], a, b, acc[j]);
      }
    }
  }

  // Stores the tile to p (shared or global), row-major with leading dimension ld.
  __device__ __forceinline__ void store(float* p, int ld) const {
    const int w = threadIdx.x / 32;
#pragma unroll
    for (int j = 0; j < FPW; ++j) {
      const int f = w + kWarps * j;
      const int r = f / FN, c = f % FN;
      nvcuda::wmma::store_matrix_sync(p + r * 16 * ld + c * 16, acc[j], ld, nvcuda::wmma::mem_row_major);
    }
  }
};

// fp32 FMA path (exact fp32 like torch's default, no TF32): element e = tid + 256 i.
template <int M, int N>
struct FmaTile {
  static constexpr int E = M * N / kThreads;
  static_assert(M * N % kThreads == 0, "tile must split evenly over 256 threads");
  float acc[E];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < E; ++i) acc[i] = 0.f;
  }

  template <bool kBColMajor>
  __device__ __forceinline__ void mma(const float* sA, int lda, const float* sB, int ldb, int K) {
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const int e = threadIdx.x + kThreads * i;
      const int r = e / N, c = e % N;
      float s = acc[i];
#pragma unroll 4
      for (int kk = 0; kk < K; ++kk)
        s = fmaf(sA[r * lda + kk], kBColMajor ? sB[c * ldb + kk] : sB[kk * ldb + c], s);
      acc[i] = s;
    }
  }

  __device__ __forceinline__ void store(float* p, int ld) const {
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const int e = threadIdx.x + kThreads * i;
      p[(e / N) * ld + (e % N)] = acc[i];
    }
  }
};

template <typename T, int M, int N>
using Tile = typename std::conditional<std::is_same<T, float>::value, FmaTile<M, N>, WmmaTile<T, M, N>>::type;

__host__ __device__ constexpr int align_up(int x, int a) { return (x + a - 1) / a * a; }

// Leading dimensions (elements) of the shared tiles: +8 (16-bit) / +4 (fp32) padding keeps
// WMMA pointers 32-byte aligned and spreads banks.
template <typename T>
__host__ __device__ constexpr int pad_ld(int n) { return n + (sizeof(T) == 4 ? 4 : 8); }

// Loads rows [r0, r0 + rows) x cols [0, KP) of R [d, k] into sR (row-major, ld) as T;
// zero outside [d, k). Vectorised when k is a multiple of 8 and R is 16-byte aligned.
template <typename T, int KP>
__device__ __forceinline__ void load_basis_rows(T* sR, int ld, const T* R, int64_t r0, int rows, int64_t d, int k,
                                                bool vec_k) {
  if (vec_k) {
    constexpr int kPer = 16 / sizeof(T);
    const int groups = rows * (KP / kPer);
    for (int g = threadIdx.x; g < groups; g += kThreads) {
      const int j = g / (KP / kPer);
      const int kk = (g % (KP / kPer)) * kPer;
      uint4 raw = make_uint4(0, 0, 0, 0);
      if (r0 + j < d && kk < k) raw = __ldg(reinterpret_cast<const uint4*>(R + (r0 + j) * k + kk));
      *reinterpret_cast<uint4*>(sR + j * ld + kk) = raw;
    }
  } else {
    for (int e = threadIdx.x; e < rows * KP; e += kThreads) {
      const int j = e / KP, kk = e % KP;
      float x = (r0 + j < d && kk < k) ? to_f(R[(r0 + j) * k + kk]) : 0.f;
      sR[j * ld + kk] = from_f<T>(x);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Mix of one [BM, DC] tile: sMix = w[b, :S, t]^T source[b, :, d0:d0+DC] (without the [SELF]
// term). Uses sW [BM][LDW] and sSrc [SS][LDS] as staging.
// ---------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void block_mix(float* sMix, int ldm, T* sW, T* sSrc, const T* weights, const T* source,
                                          int64_t b, int64_t t0, int64_t d0, const Dims& dims, bool vec) {
  constexpr int LDW = pad_ld<T>(SS);
  constexpr int LDS = pad_ld<T>(DC);
  Tile<T, BM, DC> acc;
  acc.zero();
  const int64_t T_ = dims.T, S = dims.S, d = dims.d;
  const T* wb = weights + b * (S + 1) * T_;
  for (int64_t s0 = 0; s0 < S; s0 += SS) {
    // sW[r][s] = w[b, s0 + s, t0 + r]; consecutive threads read consecutive t (coalesced).
    for (int e = threadIdx.x; e < BM * SS; e += kThreads) {
      const int r = e % BM, s = e / BM;
      float x = (s0 + s < S && t0 + r < T_) ? to_f(wb[(s0 + s) * T_ + t0 + r]) : 0.f;
      sW[r * LDW + s] = from_f<T>(x);
    }
    // sSrc[s][j] = source[b, s0 + s, d0 + j], 16 consecutive elements per thread.
    for (int e = threadIdx.x; e < SS * (DC / 16); e += kThreads) {
      const int s = e / (DC / 16), j = (e % (DC / 16)) * 16;
      float x[16];
      const int n = (s0 + s < S) ? (int)mn(16, mx(0, d - d0 - j)) : 0;
      load16(source + (b * S + s0 + s) * d + d0 + j, n, vec, x);
#pragma unroll
      for (int i = 0; i < 16; ++i) sSrc[s * LDS + j + i] = from_f<T>(x[i]);
    }
    __syncthreads();
    acc.template mma<false>(sW, LDW, sSrc, LDS, SS);
    __syncthreads();
  }
  acc.store(sMix, ldm);
}

// ---------------------------------------------------------------------------------------
// Kernel 1: coordinates. Grid (row tiles, dsplit, B [soft] or 1 [rows]).
// ---------------------------------------------------------------------------------------
template <typename T>
struct CoordsParams {
  const T* base;
  const T* source;
  const T* weights;  // soft only
  const T* basis;
  const T* reflect;
  const int64_t* bidx;  // rows only
  const int64_t* tpos;
  const int64_t* spos;
  float* partial;  // [dsplit][npad][KP]
  float* vdpart;   // [dsplit][npad]
  Dims dims;
  int64_t rows_pad;  // padded rows per batch (soft) or padded P (rows)
  int64_t npad;      // total padded rows
  int chunks_per_split;
  bool vec;    // d % 8 == 0 and pointers 16-byte aligned
  bool vec_k;  // k % 8 == 0 and basis 16-byte aligned
};

template <typename T, int KP>
struct CoordsSmem {
  static constexpr int LDD = pad_ld<T>(DC);
  static constexpr int LDR = pad_ld<T>(KP);
  static constexpr int LDW = pad_ld<T>(SS);
  static constexpr int LDS = pad_ld<T>(DC);
  static constexpr int LDM = DC + 4;
  static constexpr size_t off_delta = 0;
  static constexpr size_t off_r = align_up(off_delta + sizeof(T) * BM * LDD, 128);
  static constexpr size_t off_w = align_up(off_r + sizeof(T) * DC * LDR, 128);
  static constexpr size_t off_src = align_up(off_w + sizeof(T) * BM * LDW, 128);
  static constexpr size_t off_mix = align_up(off_src + sizeof(T) * SS * LDS, 128);
  static constexpr size_t bytes = off_mix + sizeof(float) * BM * LDM;
};

// Two blocks per SM for KP <= 128 (caps registers at 128: latency hiding matters more than
// a few spilled registers for this memory-bound loop).
template <typename T, int KP, bool kRows>
__global__ void __launch_bounds__(kThreads, (KP <= 128 && sizeof(T) == 2) ? 2 : 1) coords_kernel(CoordsParams<T> p) {
  using L = CoordsSmem<T, KP>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sDelta = reinterpret_cast<T*>(smem + L::off_delta);
  T* sR = reinterpret_cast<T*>(smem + L::off_r);
  T* sW = reinterpret_cast<T*>(smem + L::off_w);
  T* sSrc = reinterpret_cast<T*>(smem + L::off_src);
  float* sMix = reinterpret_cast<float*>(smem + L::off_mix);
  __shared__ int64_t sXoff[BM], sYoff[BM], sB[BM];
  __shared__ float sWself[BM];

  const Dims& dm = p.dims;
  const int64_t tile0 = (int64_t)blockIdx.x * BM;
  const int split = blockIdx.y;
  const int64_t b = kRows ? 0 : (int64_t)blockIdx.z;
  if (threadIdx.x < BM) {
    const int64_t r = tile0 + threadIdx.x;
    int64_t xoff = -1, yoff = -1, bb = 0;
    float ws = 0.f;
    if (kRows) {
      if (r < dm.P) {
        bb = p.bidx[r];
        xoff = (bb * dm.T + p.tpos[r]) * dm.d;
        yoff = (bb * dm.S + p.spos[r]) * dm.d;
      }
    } else if (r < dm.T) {
      bb = b;
      xoff = (b * dm.T + r) * dm.d;
      ws = to_f(p.weights[(b * (dm.S + 1) + dm.S) * dm.T + r]);
    }
    sXoff[threadIdx.x] = xoff;
    sYoff[threadIdx.x] = yoff;
    sB[threadIdx.x] = bb;
    sWself[threadIdx.x] = ws;
  }
  __syncthreads();

  // Element-wise mapping: 4 threads per row, 16 consecutive columns each.
  const int row = threadIdx.x >> 2;
  const int q = (threadIdx.x & 3) * 16;
  const int64_t xoff = sXoff[row], yoff = sYoff[row], brow = sB[row];
  const float wself = sWself[row];
  float vd = 0.f;

  Tile<T, BM, KP> acc;
  acc.zero();
  const int64_t nchunks = (dm.d + DC - 1) / DC;
  const int64_t c_begin = (int64_t)split * p.chunks_per_split;
  const int64_t c_end = mn(nchunks, c_begin + p.chunks_per_split);
  for (int64_t ch = c_begin; ch < c_end; ++ch) {
    const int64_t d0 = ch * DC;
    load_basis_rows<T, KP>(sR, L::LDR, p.basis, d0, DC, dm.d, (int)dm.k, p.vec_k);
    if (!kRows) block_mix<T>(sMix, L::LDM, sW, sSrc, p.weights, p.source, b, tile0, d0, dm, p.vec);
    __syncthreads();
    const int n = xoff >= 0 ? (int)mn(16, mx(0, dm.d - d0 - q)) : 0;
    float x[16], y[16];
    load16(p.base + (xoff >= 0 ? xoff : 0) + d0 + q, n, p.vec, x);
    if (kRows) {
      load16(p.source + (yoff >= 0 ? yoff : 0) + d0 + q, n, p.vec, y);
#pragma unroll
      for (int i = 0; i < 16; ++i) y[i] -= x[i];
    } else {
#pragma unroll
      for (int i = 0; i < 16; ++i) y[i] = i < n ? sMix[row * L::LDM + q + i] + (wself - 1.f) * x[i] : 0.f;
    }
    if (p.reflect != nullptr) {
      float v[16];
      load16(p.reflect + brow * dm.d + d0 + q, n, p.vec, v);
#pragma unroll
      for (int i = 0; i < 16; ++i) vd = fmaf(y[i], v[i], vd);
    }
#pragma unroll
    for (int i = 0; i < 16; ++i) sDelta[row * L::LDD + q + i] = from_f<T>(y[i]);
    __syncthreads();
    acc.template mma<false>(sDelta, L::LDD, sR, L::LDR, DC);
    __syncthreads();
  }
  // Partial sums of this d slice; rows are padded so whole tiles can be stored.
  const int64_t prow0 = (kRows ? 0 : b * p.rows_pad) + tile0;
  acc.store(p.partial + ((int64_t)split * p.npad + prow0) * KP, KP);
  vd += __shfl_xor_sync(0xffffffffu, vd, 1);
  vd += __shfl_xor_sync(0xffffffffu, vd, 2);
  if ((threadIdx.x & 3) == 0 && p.reflect != nullptr) p.vdpart[(int64_t)split * p.npad + prow0 + row] = vd;
}

// ---------------------------------------------------------------------------------------
// Kernel 2: finalize. One warp per padded row: e = m * (sum partials - 2 (v.delta) u), u.e.
// ---------------------------------------------------------------------------------------
struct FinalizeParams {
  const float* partial;
  const float* vdpart;
  const float* u;
  const float* mask;
  int64_t mask_stride_b;
  const int64_t* bidx;  // rows mode, else nullptr
  float* e;             // [npad][KP]
  float* eu;            // [npad]
  int64_t npad, rows_pad, P;
  int k, KP, dsplit;
  bool rows;
};

__global__ void __launch_bounds__(kThreads) finalize_kernel(FinalizeParams p) {
  const int64_t row = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= p.npad) return;
  int64_t b = 0;
  bool valid = true;
  if (p.rows) {
    valid = row < p.P;
    b = valid ? p.bidx[row] : 0;
  } else {
    b = row / p.rows_pad;
  }
  float vd = 0.f;
  if (p.u != nullptr)
    for (int s = 0; s < p.dsplit; ++s) vd += p.vdpart[(int64_t)s * p.npad + row];
  float eu = 0.f;
  for (int kk = lane; kk < p.KP; kk += 32) {
    float c = 0.f;
    for (int s = 0; s < p.dsplit; ++s) c += p.partial[((int64_t)s * p.npad + row) * p.KP + kk];
    if (kk < p.k && valid) {
      if (p.u != nullptr) c = fmaf(-2.f * vd, p.u[b * p.k + kk], c);
      if (p.mask != nullptr) c *= p.mask[b * p.mask_stride_b + kk];
      if (p.u != nullptr) eu = fmaf(c, p.u[b * p.k + kk], eu);
    } else {
      c = 0.f;
    }
    p.e[row * p.KP + kk] = c;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) eu += __shfl_xor_sync(0xffffffffu, eu, o);
  if (lane == 0) p.eu[row] = eu;
}

// ---------------------------------------------------------------------------------------
// Kernel 3: apply. Grid (row tiles, d spans, B [soft] or 1 [rows]).
// out = base + e R^T - 2 (u.e) v; in rows mode out == base (in place, rows unique).
// ---------------------------------------------------------------------------------------
template <typename T>
struct ApplyParams {
  const T* base;
  T* out;
  const T* basis;
  const T* reflect;
  const int64_t* bidx;
  const int64_t* tpos;
  const float* e;
  const float* eu;
  Dims dims;
  int64_t rows_pad;
  int chunks_per_span;
  bool vec, vec_k;
};

template <int KP>
struct ApplyChunk {
  static constexpr int value = KP <= 128 ? 128 : 64;
};

template <typename T, int KP>
struct ApplySmem {
  static constexpr int DCB = ApplyChunk<KP>::value;
  static constexpr int LDE = pad_ld<T>(KP);
  static constexpr int LDR = pad_ld<T>(KP);
  static constexpr int LDA = DCB + 4;
  static constexpr size_t off_e = 0;
  static constexpr size_t off_r = align_up(off_e + sizeof(T) * BM * LDE, 128);  // aliased by sAcc
  static constexpr size_t r_bytes = sizeof(T) * DCB * LDR;
  static constexpr size_t acc_bytes = sizeof(float) * BM * LDA;
  static constexpr size_t bytes = off_r + (r_bytes > acc_bytes ? r_bytes : acc_bytes);
};

template <typename T, int KP, bool kRows>
__global__ void __launch_bounds__(kThreads) apply_kernel(ApplyParams<T> p) {
  using L = ApplySmem<T, KP>;
  constexpr int DCB = L::DCB;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sE = reinterpret_cast<T*>(smem + L::off_e);
  T* sR = reinterpret_cast<T*>(smem + L::off_r);
  float* sAcc = reinterpret_cast<float*>(smem + L::off_r);
  __shared__ int64_t sXoff[BM], sB[BM];
  __shared__ float sEu[BM];

  const Dims& dm = p.dims;
  const int64_t tile0 = (int64_t)blockIdx.x * BM;
  const int64_t b = kRows ? 0 : (int64_t)blockIdx.z;
  const int64_t prow0 = (kRows ? 0 : b * p.rows_pad) + tile0;
  if (threadIdx.x < BM) {
    const int64_t r = tile0 + threadIdx.x;
    int64_t xoff = -1, bb = 0;
    if (kRows) {
      if (r < dm.P) {
        bb = p.bidx[r];
        xoff = (bb * dm.T + p.tpos[r]) * dm.d;
      }
    } else if (r < dm.T) {
      bb = b;
      xoff = (b * dm.T + r) * dm.d;
    }
    sXoff[threadIdx.x] = xoff;
    sB[threadIdx.x] = bb;
    sEu[threadIdx.x] = p.eu[prow0 + threadIdx.x];
  }
  // e tile [BM][KP] (fp32 workspace, padded rows) -> T in shared memory.
  for (int g = threadIdx.x; g < BM * KP / 4; g += kThreads) {
    const int r = g / (KP / 4), kk = (g % (KP / 4)) * 4;
    const float4 v = *reinterpret_cast<const float4*>(p.e + (prow0 + r) * KP + kk);
    T* dst = sE + r * L::LDE + kk;
    dst[0] = from_f<T>(v.x);
    dst[1] = from_f<T>(v.y);
    dst[2] = from_f<T>(v.z);
    dst[3] = from_f<T>(v.w);
  }
  __syncthreads();

  const int row = threadIdx.x >> 2;
  const int q = (threadIdx.x & 3) * 16;
  const int64_t xoff = sXoff[row], brow = sB[row];
  const float eu2 = 2.f * sEu[row];
  const int64_t nchunks = (dm.d + DCB - 1) / DCB;
  const int64_t c_begin = (int64_t)blockIdx.y * p.chunks_per_span;
  const int64_t c_end = mn(nchunks, c_begin + p.chunks_per_span);
  for (int64_t ch = c_begin; ch < c_end; ++ch) {
    const int64_t d0 = ch * DCB;
    load_basis_rows<T, KP>(sR, L::LDR, p.basis, d0, DCB, dm.d, (int)dm.k, p.vec_k);
    __syncthreads();
    Tile<T, BM, DCB> acc;
    acc.zero();
    // B(kk, j) = R[d0 + j, kk] = sR[j * LDR + kk]: column-major.
    acc.template mma<true>(sE, L::LDE, sR, L::LDR, KP);
    __syncthreads();  // sAcc aliases sR
    acc.store(sAcc, L::LDA);
    __syncthreads();
    if (xoff >= 0) {
#pragma unroll
      for (int g = 0; g < DCB / 64; ++g) {
        const int col = g * 64 + q;
        const int n = (int)mn(16, mx(0, dm.d - d0 - col));
        if (n <= 0) continue;
        float x[16], v[16], o[16];
        load16_rw(p.base + xoff + d0 + col, n, p.vec, x);
        if (p.reflect != nullptr) {
          load16(p.reflect + brow * dm.d + d0 + col, n, p.vec, v);
        } else {
#pragma unroll
          for (int i = 0; i < 16; ++i) v[i] = 0.f;
        }
#pragma unroll
        for (int i = 0; i < 16; ++i) o[i] = x[i] + sAcc[row * L::LDA + col + i] - eu2 * v[i];
        store16(p.out + xoff + d0 + col, n, p.vec, o);
      }
    }
    __syncthreads();  // before the next chunk overwrites sR / sAcc
  }
}

// ---------------------------------------------------------------------------------------
// Vanilla kernels: soft mix (out = w^T source + w_self base) and rows copy.
// ---------------------------------------------------------------------------------------
template <typename T>
struct MixSmem {
  static constexpr int LDW = pad_ld<T>(SS);
  static constexpr int LDS = pad_ld<T>(DC);
  static constexpr int LDM = DC + 4;
  static constexpr size_t off_w = 0;
  static constexpr size_t off_src = align_up(off_w + sizeof(T) * BM * LDW, 128);
  static constexpr size_t off_mix = align_up(off_src + sizeof(T) * SS * LDS, 128);
  static constexpr size_t bytes = off_mix + sizeof(float) * BM * LDM;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) mix_kernel(const T* base, const T* source, const T* weights, T* out,
                                                       Dims dm, int chunks_per_span, bool vec) {
  using L = MixSmem<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sW = reinterpret_cast<T*>(smem + L::off_w);
  T* sSrc = reinterpret_cast<T*>(smem + L::off_src);
  float* sMix = reinterpret_cast<float*>(smem + L::off_mix);
  const int64_t t0 = (int64_t)blockIdx.x * BM;
  const int64_t b = blockIdx.z;
  const int row = threadIdx.x >> 2;
  const int q = (threadIdx.x & 3) * 16;
  const int64_t t = t0 + row;
  const bool valid = t < dm.T;
  const float wself = valid ? to_f(weights[(b * (dm.S + 1) + dm.S) * dm.T + t]) : 0.f;
  const int64_t xoff = (b * dm.T + (valid ? t : 0)) * dm.d;
  const int64_t nchunks = (dm.d + DC - 1) / DC;
  const int64_t c_begin = (int64_t)blockIdx.y * chunks_per_span;
  const int64_t c_end = mn(nchunks, c_begin + chunks_per_span);
  for (int64_t ch = c_begin; ch < c_end; ++ch) {
    const int64_t d0 = ch * DC;
    block_mix<T>(sMix, L::LDM, sW, sSrc, weights, source, b, t0, d0, dm, vec);
    __syncthreads();
    const int n = valid ? (int)mn(16, mx(0, dm.d - d0 - q)) : 0;
    if (n > 0) {
      float x[16];
      load16(base + xoff + d0 + q, n, vec, x);
#pragma unroll
      for (int i = 0; i < 16; ++i) x[i] = sMix[row * L::LDM + q + i] + wself * x[i];
      store16(out + xoff + d0 + q, n, vec, x);
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) rows_copy_kernel(T* base, const T* source, const int64_t* bidx,
                                                             const int64_t* tpos, const int64_t* spos, Dims dm,
                                                             bool vec) {
  const int64_t r = blockIdx.x;
  const int64_t bb = bidx[r];
  T* dst = base + (bb * dm.T + tpos[r]) * dm.d;
  const T* src = source + (bb * dm.S + spos[r]) * dm.d;
  for (int64_t j = (int64_t)threadIdx.x * 16; j < dm.d; j += kThreads * 16) {
    const int n = (int)mn(16, dm.d - j);
    float x[16];
    load16(src + j, n, vec, x);
    store16(dst + j, n, vec, x);
  }
}

// ---------------------------------------------------------------------------------------
// Host side: launch plans
// ---------------------------------------------------------------------------------------

struct Plan {
  int KP = 0;
  int64_t rows_pad = 0;  // per batch (soft) or P padded (rows)
  int64_t npad = 0;      // all padded rows
  int64_t tiles = 0;     // row tiles (all batches)
  int dsplit = 1, chunks_per_split = 1;  // coords kernel
  int dspans = 1, chunks_per_span = 1;   // apply kernel
};

Plan make_plan(const Dims& dm, int num_sms, bool rows) {
  Plan pl;
  pl.KP = padded_k(dm.k);
  const int64_t nrows = rows ? dm.P : dm.T;
  pl.rows_pad = (nrows + BM - 1) / BM * BM;
  pl.npad = rows ? pl.rows_pad : pl.rows_pad * dm.B;
  pl.tiles = pl.npad / BM;
  const int sms = std::max(num_sms, 1);
  // coords: split d until there are about 2 blocks per SM.
  const int64_t nch = (dm.d + DC - 1) / DC;
  // (floor: one wave of about 2 blocks per SM; a second, mostly empty wave costs as much.)
  int64_t want = (2 * sms) / mx(pl.tiles, 1);
  want = mx(1, mn(mn(want, nch), 16));
  pl.chunks_per_split = (int)((nch + want - 1) / want);
  pl.dsplit = (int)((nch + pl.chunks_per_split - 1) / pl.chunks_per_split);
  // apply: split d until there are about 4 blocks per SM.
  const int dcb = pl.KP <= 128 ? 128 : 64;
  const int64_t nchb = (dm.d + dcb - 1) / dcb;
  int64_t spans = (4 * sms + pl.tiles - 1) / mx(pl.tiles, 1);
  spans = mx(1, mn(spans, nchb));
  pl.chunks_per_span = (int)((nchb + spans - 1) / spans);
  pl.dspans = (int)((nchb + pl.chunks_per_span - 1) / pl.chunks_per_span);
  return pl;
}

size_t workspace_floats(const Plan& pl) {
  // partial [dsplit][npad][KP] + vdpart [dsplit][npad] + e [npad][KP] + eu [npad]
  return (size_t)pl.dsplit * pl.npad * pl.KP + (size_t)pl.dsplit * pl.npad + (size_t)pl.npad * pl.KP +
         (size_t)pl.npad;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename K>
cudaError_t set_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
}

template <typename T, int KP, bool kRows>
cudaError_t run_fused(const T* base_in, T* out, const T* source, const T* weights, const int64_t* bidx,
                      const int64_t* tpos, const int64_t* spos, const Subspace<T>& sub, float* ws, const Dims& dm,
                      const Plan& pl, cudaStream_t stream) {
  const bool vec = dm.d % 8 == 0 && aligned16(base_in) && aligned16(out) && aligned16(source) &&
                   (sub.reflect == nullptr || aligned16(sub.reflect));
  const bool vec_k = dm.k % 8 == 0 && aligned16(sub.basis);
  float* partial = ws;
  float* vdpart = partial + (size_t)pl.dsplit * pl.npad * KP;
  float* e = vdpart + (size_t)pl.dsplit * pl.npad;
  float* eu = e + (size_t)pl.npad * KP;
  const unsigned gz = kRows ? 1u : (unsigned)dm.B;
  const unsigned gx = (unsigned)(pl.rows_pad / BM);

  CoordsParams<T> cp{base_in, source, weights, sub.basis, sub.reflect, bidx, tpos, spos, partial, vdpart,
                     dm,      pl.rows_pad, pl.npad, pl.chunks_per_split, vec, vec_k};
  const size_t cbytes = CoordsSmem<T, KP>::bytes;
  cudaError_t err = set_smem(coords_kernel<T, KP, kRows>, cbytes);
  if (err != cudaSuccess) return err;
  coords_kernel<T, KP, kRows><<<dim3(gx, pl.dsplit, gz), kThreads, cbytes, stream>>>(cp);

  FinalizeParams fp{partial, vdpart, sub.u, sub.mask, sub.mask_stride_b, kRows ? bidx : nullptr, e, eu,
                    pl.npad, pl.rows_pad, dm.P, (int)dm.k, KP, pl.dsplit, kRows};
  finalize_kernel<<<(unsigned)((pl.npad + kWarps - 1) / kWarps), kThreads, 0, stream>>>(fp);

  ApplyParams<T> ap{base_in, out, sub.basis, sub.reflect, bidx, tpos, e, eu, dm, pl.rows_pad,
                    pl.chunks_per_span, vec, vec_k};
  const size_t abytes = ApplySmem<T, KP>::bytes;
  err = set_smem(apply_kernel<T, KP, kRows>, abytes);
  if (err != cudaSuccess) return err;
  apply_kernel<T, KP, kRows><<<dim3(gx, pl.dspans, gz), kThreads, abytes, stream>>>(ap);
  return cudaGetLastError();
}

template <typename T, bool kRows>
cudaError_t dispatch_fused(const T* base_in, T* out, const T* source, const T* weights, const int64_t* bidx,
                           const int64_t* tpos, const int64_t* spos, const Subspace<T>& sub, float* ws,
                           const Dims& dm, const Plan& pl, cudaStream_t stream) {
  switch (pl.KP) {
    case 64:
      return run_fused<T, 64, kRows>(base_in, out, source, weights, bidx, tpos, spos, sub, ws, dm, pl, stream);
    case 128:
      return run_fused<T, 128, kRows>(base_in, out, source, weights, bidx, tpos, spos, sub, ws, dm, pl, stream);
    default:
      return run_fused<T, 256, kRows>(base_in, out, source, weights, bidx, tpos, spos, sub, ws, dm, pl, stream);
  }
}

}  // namespace

size_t soft_forward_workspace_floats(const Dims& dims, int num_sms) {
  if (dims.k == 0) return 0;
  return workspace_floats(make_plan(dims, num_sms, false));
}

size_t rows_forward_workspace_floats(const Dims& dims, int num_sms) {
  if (dims.k == 0 || dims.P == 0) return 0;
  return workspace_floats(make_plan(dims, num_sms, true));
}

template <typename T>
cudaError_t launch_soft_forward(const T* base, const T* source, const T* weights, const Subspace<T>& sub, T* out,
                                float* workspace, const Dims& dims, int num_sms, cudaStream_t stream) {
  if (dims.B == 0 || dims.T == 0 || dims.d == 0) return cudaSuccess;
  if (dims.k > kMaxFusedK) return cudaErrorInvalidValue;
  if (dims.k == 0 || sub.basis == nullptr) {
    const bool vec = dims.d % 8 == 0 && aligned16(base) && aligned16(source) && aligned16(out);
    const int sms = std::max(num_sms, 1);
    const int64_t tiles = (dims.T + BM - 1) / BM * dims.B;
    const int64_t nch = (dims.d + DC - 1) / DC;
    int64_t spans = mx(1, mn(nch, (4 * sms + tiles - 1) / tiles));
    const int cps = (int)((nch + spans - 1) / spans);
    spans = (nch + cps - 1) / cps;
    const size_t bytes = MixSmem<T>::bytes;
    cudaError_t err = set_smem(mix_kernel<T>, bytes);
    if (err != cudaSuccess) return err;
    mix_kernel<T><<<dim3((unsigned)((dims.T + BM - 1) / BM), (unsigned)spans, (unsigned)dims.B), kThreads, bytes,
                    stream>>>(base, source, weights, out, dims, cps, vec);
    return cudaGetLastError();
  }
  const Plan pl = make_plan(dims, num_sms, false);
  return dispatch_fused<T, false>(base, out, source, weights, nullptr, nullptr, nullptr, sub, workspace, dims, pl,
                                  stream);
}

template <typename T>
cudaError_t launch_rows_forward(T* base, const T* source, const int64_t* bidx, const int64_t* tpos,
                                const int64_t* spos, const Subspace<T>& sub, float* workspace, const Dims& dims,
                                int num_sms, cudaStream_t stream) {
  if (dims.P == 0 || dims.d == 0) return cudaSuccess;
  if (dims.k > kMaxFusedK) return cudaErrorInvalidValue;
  if (dims.k == 0 || sub.basis == nullptr) {
    const bool vec = dims.d % 8 == 0 && aligned16(base) && aligned16(source);
    rows_copy_kernel<T><<<(unsigned)dims.P, kThreads, 0, stream>>>(base, source, bidx, tpos, spos, dims, vec);
    return cudaGetLastError();
  }
  const Plan pl = make_plan(dims, num_sms, true);
  return dispatch_fused<T, true>(base, base, source, nullptr, bidx, tpos, spos, sub, workspace, dims, pl, stream);
}

void soft_apply_layout(const Dims& dims, int64_t* rows_pad, int* kp) {
  *rows_pad = (dims.T + BM - 1) / BM * BM;
  *kp = padded_k(dims.k);
}

template <typename T>
cudaError_t launch_soft_apply(const T* base, T* out, const Subspace<T>& sub, const float* e, const float* eu,
                              const Dims& dims, int num_sms, cudaStream_t stream) {
  if (dims.B == 0 || dims.T == 0 || dims.d == 0) return cudaSuccess;
  if (dims.k <= 0 || dims.k > kMaxFusedK || sub.basis == nullptr) return cudaErrorInvalidValue;
  const Plan pl = make_plan(dims, num_sms, false);
  const bool vec = dims.d % 8 == 0 && aligned16(base) && aligned16(out) &&
                   (sub.reflect == nullptr || aligned16(sub.reflect));
  const bool vec_k = dims.k % 8 == 0 && aligned16(sub.basis);
  auto run = [&](auto kp) {
    constexpr int KP = decltype(kp)::value;
    ApplyParams<T> ap{base, out, sub.basis, sub.reflect, nullptr, nullptr, e, eu, dims, pl.rows_pad,
                      pl.chunks_per_span, vec, vec_k};
    const size_t bytes = ApplySmem<T, KP>::bytes;
    cudaError_t err = set_smem(apply_kernel<T, KP, false>, bytes);
    if (err != cudaSuccess) return err;
    apply_kernel<T, KP, false><<<dim3((unsigned)(pl.rows_pad / BM), pl.dspans, (unsigned)dims.B), kThreads, bytes,
                                 stream>>>(ap);
    return cudaGetLastError();
  };
  return with_padded_k(dims.k, run);
}

#define HYPERDAS_INSTANTIATE(T)                                                                                  \
  template cudaError_t launch_soft_forward<T>(const T*, const T*, const T*, const Subspace<T>&, T*, float*,      \
                                              const Dims&, int, cudaStream_t);                                   \
  template cudaError_t launch_rows_forward<T>(T*, const T*, const int64_t*, const int64_t*, const int64_t*,      \
                                              const Subspace<T>&, float*, const Dims&, int, cudaStream_t);    \
  template cudaError_t launch_soft_apply<T>(const T*, T*, const Subspace<T>&, const float*, const float*,        \
                                            const Dims&, int, cudaStream_t);

HYPERDAS_INSTANTIATE(float)
HYPERDAS_INSTANTIATE(__half)
HYPERDAS_INSTANTIATE(__nv_bfloat16)
#undef HYPERDAS_INSTANTIATE

}  // namespace cuda
}  // namespace hyperdas_fast
