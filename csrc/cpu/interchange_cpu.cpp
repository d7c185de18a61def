// C++ CPU kernels of the fused interchange intervention.
//
// Notation (per example b, token t; rows n = b*T + t):
//   delta = mix - base = W_src^T source + (w_self - 1) base
//   u = R^T v,  c = R_b^T delta = delta R - 2 (delta.v) u,  e = m * c
//   out = base + R_b e = base + e R^T - 2 (e.u) v
// Backward with g = dL/dout:
//   g_e = R_b^T g = g R - 2 (v.g) u,  g_mask = sum_t g_e * c,  g_c = m * g_e
//   g_delta = R_b g_c = g_c R^T - 2 (u.g_c) v
//   g_source[b] = W_src[b] g_delta[b],  g_w[b,s,t] = <g_delta[b,t], source[b,s]>,
//   g_w[b,S,t] = <g_delta[b,t], base[b,t]>,  g_base = g - (1 - w_self) g_delta
//   g_basis = sum_{b,t} (H_b g) e^T + (H_b delta) g_c^T,   H_b = I - 2 v v^T
//           = G^T E + D^T Gc - 2 V^T Q,   Q[b] = sum_t (v.g) e + (v.delta) g_c
//   g_reflect[b] = -2 [ sum_t (u.e) g + (u.g_c) delta  +  R Q[b] ]
//
// The [B,S,T,d] weighted sources and the [B,d,d] Householder matrices are never built.
// Two paths compute the same algebra. Batched: the O(N d k) products are single GEMMs over
// all N = B*T rows (R is shared by the batch) and the mixes are batched GEMMs, all through
// ATen (MKL); every O(N d) rank-1 correction, row dot product and reduction is one fused,
// at::parallel_for loop. Per example (small d*k, enough examples per thread): one task
// runs every step for one example with raw-pointer BLAS calls while its rows are in cache.
// float and double compute in their own type; half and bfloat16 compute in float.
#include "interchange_cpu.h"
#include "../common/input_checks.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace hyperdas_fast {
namespace cpu {
namespace {

// A named range in torch.profiler traces for each fused loop, up to the end of the
// enclosing block (no cost when not profiling); one per block.
#define HDF_SCOPE(name) RECORD_FUNCTION(name, c10::ArrayRef<const c10::IValue>{})

constexpr int64_t kRowGrain = 8;  // rows of d numbers per parallel task

template <typename scalar_t>
inline scalar_t dot(const scalar_t* __restrict a, const scalar_t* __restrict b, int64_t n) {
  scalar_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// ---- row kernels shared by the batched and the per-example paths ----------------------

// Forward, k-vector of one row: c += -2 (delta.v) u (reflect), e = m * c (mask; e may
// alias c); returns e.u (0 without reflect).
template <typename scalar_t>
inline scalar_t fwd_k_row(scalar_t* c, scalar_t* e, const scalar_t* __restrict u, const scalar_t* __restrict m,
                          scalar_t dv, int64_t k) {
  if (u != nullptr) {
    const scalar_t a = scalar_t(-2) * dv;
#pragma omp simd
    for (int64_t j = 0; j < k; ++j) c[j] += a * u[j];
  }
  if (m != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < k; ++j) e[j] = c[j] * m[j];
  }
  return u != nullptr ? dot(e, u, k) : scalar_t(0);
}

// Forward, d-vector of one row: row (= e R^T) += x - 2 (e.u) v.
template <typename scalar_t>
inline void fwd_out_row(scalar_t* __restrict row, const scalar_t* __restrict x, const scalar_t* __restrict v,
                        scalar_t eu, int64_t d) {
  if (v != nullptr) {
    const scalar_t a = scalar_t(-2) * eu;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) row[i] += x[i] + a * v[i];
  } else {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) row[i] += x[i];
  }
}

// Backward, k-vector of one row. In: c_in = c (before the reflection correction when a
// != 0), e = g R. Out, in place: gc = g_c = m * g_e, e = m * c, with g_e = g R - 2 (v.g) u;
// gm += g_e * c, q += (v.g) e + (v.delta) g_c. Returns (u.e, u.g_c). c_in may alias gc
// (same index only). Absent u / m are passed as zeros / ones.
template <typename scalar_t>
inline std::pair<scalar_t, scalar_t> bwd_k_row(const scalar_t* c_in, scalar_t* gc, scalar_t* __restrict e,
                                               const scalar_t* __restrict u, const scalar_t* __restrict m,
                                               scalar_t a, scalar_t vg, scalar_t dv, scalar_t* __restrict gm,
                                               scalar_t* __restrict q, int64_t k) {
  const scalar_t ag = scalar_t(-2) * vg;
  scalar_t s_ue = 0, s_ugc = 0;
#pragma omp simd reduction(+ : s_ue, s_ugc)
  for (int64_t j = 0; j < k; ++j) {
    const scalar_t cj = c_in[j] + a * u[j];  // c
    const scalar_t gej = e[j] + ag * u[j];    // g_e
    gm[j] += gej * cj;
    const scalar_t ej = m[j] * cj, gcj = m[j] * gej;
    e[j] = ej;
    gc[j] = gcj;
    s_ue += u[j] * ej;
    s_ugc += u[j] * gcj;
    q[j] += vg * ej + dv * gcj;
  }
  return {s_ue, s_ugc};
}

// Backward, d-vector of one row: gd (= g_c R^T) += -2 (u.g_c) v; gb = g - (1 - w_self) gd;
// acc += (u.e) g + (u.g_c) delta (the g_reflect sum; v, delta and acc null without
// reflect). Returns g_w[S, t] = gd . x.
template <typename scalar_t>
inline scalar_t bwd_d_row(scalar_t* __restrict gd, scalar_t* __restrict gb, const scalar_t* __restrict g,
                          const scalar_t* __restrict x, const scalar_t* __restrict delta,
                          const scalar_t* __restrict v, scalar_t* __restrict acc, scalar_t w_self,
                          scalar_t ue, scalar_t ugc, int64_t d) {
  const scalar_t one_m_ws = scalar_t(1) - w_self;
  if (v != nullptr) {
    const scalar_t a = scalar_t(-2) * ugc;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) {
      gd[i] += a * v[i];
      gb[i] = g[i] - one_m_ws * gd[i];
      acc[i] += ue * g[i] + ugc * delta[i];
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) gb[i] = g[i] - one_m_ws * gd[i];
  }
  return dot(gd, x, d);
}

// Row-major C[M,N] = alpha op(A) op(B) + beta C on raw pointers, for the per-example
// [S,T]x[T,d] and [S,d]x[d,T] products of the backward. They run inside an
// at::parallel_for over examples, where a tensor op per example would cost more in
// dispatch than the product itself. Uses the Fortran BLAS that libtorch links (MKL in
// the official x86 wheels, weak so a build without it still loads) and otherwise a
// plain loop.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

template <typename scalar_t>
bool have_blas() {
  return std::is_same<scalar_t, float>::value ? sgemm_ != nullptr : dgemm_ != nullptr;
}

// op(A) is [M,K]: A is stored row-major [M,K] (lda), or [K,M] (lda) when trans_a; same for B.
template <typename scalar_t>
void gemm_rowmajor(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, scalar_t alpha,
                   const scalar_t* A, int64_t lda, const scalar_t* Bm, int64_t ldb, scalar_t beta,
                   scalar_t* C, int64_t ldc) {
  if (have_blas<scalar_t>()) {
    // Column-major BLAS sees each row-major matrix transposed: C^T = op(B)^T op(A)^T.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    if constexpr (std::is_same<scalar_t, float>::value) {
      sgemm_(&ta, &tb, &m, &n, &k, &alpha, Bm, &la, A, &lb, &beta, C, &lc);
    } else {
      dgemm_(&ta, &tb, &m, &n, &k, &alpha, Bm, &la, A, &lb, &beta, C, &lc);
    }
    return;
  }
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      scalar_t acc = 0;
      for (int64_t q = 0; q < K; ++q) {
        const scalar_t a = trans_a ? A[q * lda + i] : A[i * lda + q];
        const scalar_t b = trans_b ? Bm[j * ldb + q] : Bm[q * ldb + j];
        acc += a * b;
      }
      C[i * ldc + j] = alpha * acc + (beta == scalar_t(0) ? scalar_t(0) : beta * C[i * ldc + j]);
    }
  }
}

bool is_reduced(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16;
}

std::optional<at::Tensor> opt_to(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  if (!t.has_value()) return std::nullopt;
  return t->to(dtype);
}

std::optional<at::Tensor> opt_contig(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return t->contiguous();
}

// Shapes, dtypes and devices: csrc/common/input_checks.h (shared with the projected and
// CUDA ops); here only what is CPU-specific.
using hyperdas_fast::checks::check_same;
using hyperdas_fast::checks::check_subspace;

void check_states(const at::Tensor& base, const at::Tensor& source) {
  TORCH_CHECK(base.device().is_cpu(), "hyperdas_fast CPU kernel: base must be a CPU tensor, got ",
              base.device());
  hyperdas_fast::checks::check_states(base, source);
}

void check_soft(const at::Tensor& base, const at::Tensor& source, const at::Tensor& weights,
                const std::optional<at::Tensor>& basis, const std::optional<at::Tensor>& reflect,
                const std::optional<at::Tensor>& mask) {
  check_states(base, source);
  hyperdas_fast::checks::check_soft(base, source, weights, basis, reflect, mask);
}

// Grow-only per-thread scratch buffers, one per (slot, float/double). The backward's
// large temporaries would otherwise be handed back to the OS on every call (glibc trims
// the heap) and cost a page fault per 4 KiB page on the next call: measured ~1 ms of
// system time per backward at the SmolLM2 shape. Never returned to the caller.
enum ScratchSlot { kD = 0, kCE, kGD, kPartial, kRowsD, kRowsC, kNumSlots };

at::Tensor scratch(ScratchSlot slot, at::IntArrayRef shape, const at::TensorOptions& opts) {
  thread_local at::Tensor buffers[kNumSlots][2];
  int64_t numel = 1;
  for (int64_t s : shape) numel *= s;
  at::Tensor& buf = buffers[slot][opts.dtype() == at::kDouble ? 1 : 0];
  if (!buf.defined() || buf.numel() < numel || buf.scalar_type() != opts.dtype().toScalarType()) {
    buf = at::empty({numel}, opts);
  }
  return buf.narrow(0, 0, numel).view(shape);
}

using FwdOut = std::tuple<at::Tensor, at::Tensor>;

// Raw views of the subspace arguments.
template <typename scalar_t>
struct Subspace {
  const scalar_t* v = nullptr;  // [B, d] or null
  const scalar_t* u = nullptr;  // [B, k] = v R, or null
  const scalar_t* m = nullptr;  // mask or null
  int64_t m_stride = 0;         // k for [B, k], 0 for [k]
  at::Tensor u_storage;         // owns u
};

// The per-call subspace view shared by the forward, backward and rows kernels.
// With defer_u, u is allocated but not computed: the per-example paths compute each
// example's u = v R in the task that owns the example (compute_u), which saves a serial
// at::mm (16-19 us under torch.profiler at B=16, d=576, k=64, two threads).
template <typename scalar_t>
Subspace<scalar_t> make_subspace(const at::Tensor& R, const std::optional<at::Tensor>& reflect,
                                 const std::optional<at::Tensor>& mask, bool defer_u = false) {
  Subspace<scalar_t> sub;
  if (reflect.has_value()) {
    sub.v = reflect->const_data_ptr<scalar_t>();
    sub.u_storage = defer_u ? at::empty({reflect->size(0), R.size(1)}, reflect->options()) : at::mm(*reflect, R);
    sub.u = sub.u_storage.template const_data_ptr<scalar_t>();
  }
  if (mask.has_value()) {
    sub.m = mask->const_data_ptr<scalar_t>();
    sub.m_stride = mask->dim() == 2 ? R.size(1) : 0;
  }
  return sub;
}


using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// ----------------------------------------------------------------------------------------
// per-example paths: one example per parallel task, its rows kept in cache
// ----------------------------------------------------------------------------------------
// The batched paths below make one pass over all B*T rows per step (mix GEMM, row loop,
// GEMM against R, row loop, ...): every [B, T, d] temporary goes out to memory and comes
// back. With at least about one example per thread, a task instead runs all steps for one
// example on raw pointers with per-example BLAS calls (a [T, d] block stays in L2), and
// the mix, the [T, d] products with R and the source-side gradients never leave the
// thread. At the SmolLM2 training shape (B=16, T=S=24, d=576, k=64, fp32, two threads)
// this cut the forward by about a fifth; the backward is GEMM-bound either way (its
// O(T d k) products are the same FLOPs in both paths). use_per_example() says when.
//
// HYPERDAS_FAST_CPU_SOFT=per_example|batched forces one path (tests check both).
int cpu_soft_path_override() {
  const char* env = std::getenv("HYPERDAS_FAST_CPU_SOFT");
  if (env == nullptr || *env == '\0') return 0;
  const std::string value(env);
  TORCH_CHECK(value == "per_example" || value == "batched",
              "HYPERDAS_FAST_CPU_SOFT must be 'per_example' or 'batched', got '", value, "'");
  return value == "per_example" ? 1 : 2;
}

template <typename scalar_t>
bool use_per_example(int64_t B, int64_t T, int64_t d, int64_t k) {
  const int override_path = cpu_soft_path_override();
  if (!have_blas<scalar_t>()) return false;  // needs raw-pointer GEMMs
  if (override_path != 0) return override_path == 1;
  // Only while an example's rows, R and the backward's [d, k] accumulator stay in a core's
  // L2 (about 1 MiB of it): at Llama-3-8B's d=4096, k=128 each example would stream the
  // 2 MiB R and accumulator from memory, and the per-example path measured 1.1-1.5x slower
  // than the batched one (SmolLM2's d=576, k=64: 0.35 MiB, per-example faster).
  if ((T + 2 * k) * d * static_cast<int64_t>(sizeof(scalar_t)) > (int64_t(1) << 20)) return false;
  // Balanced enough: the busiest thread gets at most 1.25x the average number of examples.
  const int64_t threads = at::get_num_threads();
  const int64_t per_thread = (B + threads - 1) / threads;
  return B >= threads && 4 * per_thread * threads <= 5 * B;
}

// Grow-only per-thread buffers for the per-example tasks (see scratch() for why). Not
// scratch() itself: the calling thread is also OpenMP thread 0 of the task team, and its
// scratch() slots hold whole-batch buffers (the g_basis partials) a task must not reuse.
template <typename scalar_t>
scalar_t* thread_buffer(int slot, int64_t n) {
  thread_local std::vector<scalar_t> buffers[6];
  std::vector<scalar_t>& buf = buffers[slot];
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// R [d, k] as gemm_rowmajor operands, in either of its two dense layouts (a QR factor is
// column-major), so that it is never copied.
template <typename scalar_t>
struct BasisOperand {
  const scalar_t* p;
  int64_t ld;
  bool col_major;
  bool trans_r() const { return col_major; }    // op(.) = R   [d, k]
  bool trans_rt() const { return !col_major; }  // op(.) = R^T [k, d]
};

template <typename scalar_t>
BasisOperand<scalar_t> basis_operand(const at::Tensor& R) {
  TORCH_INTERNAL_ASSERT(R.is_contiguous() || R.t().is_contiguous());
  const bool col_major = !R.is_contiguous();
  return {R.const_data_ptr<scalar_t>(), col_major ? R.size(0) : R.size(1), col_major};
}

at::Tensor dense_basis(const at::Tensor& R) {
  return (R.is_contiguous() || R.t().is_contiguous()) ? R : R.contiguous();
}

// Examples per block: the GEMMs against R run over a block's rows at once, enough rows
// (about 96) that MKL's packing of R is shared by many rows.
int64_t examples_per_block(int64_t T, int64_t examples_per_chunk) {
  constexpr int64_t kBlockRows = 96;
  return std::max<int64_t>(1, std::min(examples_per_chunk, (kBlockRows + T - 1) / T));
}

// One example's delta = W_src^T source + (w_self - 1) base  [T, d], from its weights w
// [S+1, T], source [S, d] and base x [T, d].
template <typename scalar_t>
void example_delta(const scalar_t* w, const scalar_t* src, const scalar_t* x, int64_t T, int64_t S, int64_t d,
                   scalar_t* delta) {
  gemm_rowmajor<scalar_t>(true, false, T, d, S, 1, w, T, src, d, 0, delta, d);
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t a = w[S * T + t] - scalar_t(1);
    scalar_t* __restrict row = delta + t * d;
    const scalar_t* __restrict xr = x + t * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) row[i] += a * xr[i];
  }
}

// Examples per chunk: the batch split over at most one chunk per thread.
inline int64_t examples_per_chunk(int64_t B) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(B, at::get_num_threads()));
  return std::max<int64_t>(1, (B + threads - 1) / threads);
}

// What both per-example passes take from their arguments, and how they split the batch:
// `chunks` fixed ranges of `per_chunk` examples (one per thread), each walked in blocks of
// `per_block` examples. Every chunk holds at least one example: with B = 8 on 5 threads,
// ranges of 2 make 4 chunks, not 5 (an empty fifth chunk would leave its slice of the
// g_basis partials unwritten, and the ordered sum would add stale scratch memory).
template <typename scalar_t>
struct BlockedProblem {
  int64_t B, T, d, S, k, chunks, per_chunk, per_block;
  at::Tensor R;  // the basis, dense (row- or column-major)
  BasisOperand<scalar_t> r;
  Subspace<scalar_t> sub;
  const scalar_t *wp, *xp, *sp;  // weights, base, source

  BlockedProblem(const at::Tensor& base, const at::Tensor& source, const at::Tensor& weights,
                 const at::Tensor& R_in, const std::optional<at::Tensor>& reflect,
                 const std::optional<at::Tensor>& mask)
      : B(base.size(0)), T(base.size(1)), d(base.size(2)), S(source.size(1)), k(R_in.size(1)),
        chunks((B + examples_per_chunk(B) - 1) / examples_per_chunk(B)), per_chunk(examples_per_chunk(B)),
        per_block(examples_per_block(T, per_chunk)), R(dense_basis(R_in)), r(basis_operand<scalar_t>(R)),
        sub(make_subspace<scalar_t>(R, reflect, mask, /*defer_u=*/true)), wp(weights.const_data_ptr<scalar_t>()),
        xp(base.const_data_ptr<scalar_t>()), sp(source.const_data_ptr<scalar_t>()) {}

  // u = v R for examples [b0, b1) (with reflect), by the task that owns them, before any
  // of their rows reads u (the subspace was made with defer_u).
  void compute_u(int64_t b0, int64_t b1) const {
    if (sub.v == nullptr) return;
    gemm_rowmajor<scalar_t>(false, r.trans_r(), b1 - b0, k, d, 1, sub.v + b0 * d, d, r.p, r.ld, 0,
                            const_cast<scalar_t*>(sub.u) + b0 * k, k);
  }
};

// out [d, k] (any strides) = partials[0] + partials[1] + ... in that order, for every
// element, so the sum does not depend on which thread runs it. Run by the task that
// finishes the last chunk, inside the backward's parallel region: as a parallel region of
// its own it took ~32 us under torch.profiler at d=576, k=64 on two threads.
template <typename scalar_t>
void sum_partials_into(const scalar_t* partials, int64_t chunks, int64_t d, int64_t k, scalar_t* op,
                       int64_t s0, int64_t s1) {
  const int64_t part = d * k;
  for (int64_t i = 0; i < d; ++i) {
    const scalar_t* __restrict p = partials + i * k;
    if (s1 == 1) {
      scalar_t* __restrict o = op + i * s0;
#pragma omp simd
      for (int64_t j = 0; j < k; ++j) o[j] = p[j];
      for (int64_t c = 1; c < chunks; ++c) {
        const scalar_t* __restrict pc = p + c * part;
#pragma omp simd
        for (int64_t j = 0; j < k; ++j) o[j] += pc[j];
      }
    } else {
      for (int64_t j = 0; j < k; ++j) {
        scalar_t acc = p[j];
        for (int64_t c = 1; c < chunks; ++c) acc += p[c * part + j];
        op[i * s0 + j * s1] = acc;
      }
    }
  }
}

template <typename scalar_t>
FwdOut fwd_per_example(const at::Tensor& base, const at::Tensor& source, const at::Tensor& weights,
                       const at::Tensor& R_in, const std::optional<at::Tensor>& reflect,
                       const std::optional<at::Tensor>& mask, bool with_coords, at::Tensor* delta_out) {
  const BlockedProblem<scalar_t> P(base, source, weights, R_in, reflect, mask);
  const int64_t B = P.B, T = P.T, d = P.d, S = P.S, Sp1 = S + 1, k = P.k;
  const auto& r = P.r;
  const auto& sub = P.sub;
  const bool has_v = sub.v != nullptr, has_m = sub.m != nullptr;
  const scalar_t *wp = P.wp, *xp = P.xp, *sp = P.sp;
  const auto opts = base.options();

  at::Tensor out = at::empty({B, T, d}, opts);
  at::Tensor coords = with_coords ? at::empty({B, T, k}, opts) : at::empty({0}, opts);
  at::Tensor D = delta_out != nullptr ? at::empty({B, T, d}, opts) : at::Tensor();
  scalar_t* op = out.data_ptr<scalar_t>();
  scalar_t* cp = with_coords ? coords.data_ptr<scalar_t>() : nullptr;
  scalar_t* Dp = D.defined() ? D.data_ptr<scalar_t>() : nullptr;
  const int64_t chunks = P.chunks, per_chunk = P.per_chunk, per_block = P.per_block;
  HDF_SCOPE("hdf_fwd_per_example");
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    const int64_t max_rows = per_block * T;
    scalar_t* delta_buf = Dp == nullptr ? thread_buffer<scalar_t>(0, max_rows * d) : nullptr;
    scalar_t* c_buf = cp == nullptr ? thread_buffer<scalar_t>(1, max_rows * k) : nullptr;
    // e = m * c needs its own buffer only when c itself is returned as coords
    scalar_t* e_buf = (cp != nullptr && has_m) ? thread_buffer<scalar_t>(2, max_rows * k) : nullptr;
    scalar_t* dv = thread_buffer<scalar_t>(3, 2 * max_rows);
    scalar_t* eu = dv + max_rows;
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      const int64_t chunk_end = std::min(B, (chunk + 1) * per_chunk);
      P.compute_u(chunk * per_chunk, chunk_end);
      for (int64_t b0 = chunk * per_chunk; b0 < chunk_end; b0 += per_block) {
        const int64_t b1 = std::min(chunk_end, b0 + per_block), rows = (b1 - b0) * T, n0 = b0 * T;
        scalar_t* delta = Dp != nullptr ? Dp + n0 * d : delta_buf;  // the block's rows [rows, d]
        // delta = W_src^T source + (w_self - 1) base, per example; dv = delta . v
        for (int64_t b = b0; b < b1; ++b) {
          scalar_t* db = delta + (b - b0) * T * d;
          example_delta(wp + b * Sp1 * T, sp + b * S * d, xp + b * T * d, T, S, d, db);
          if (has_v) {
            for (int64_t t = 0; t < T; ++t) dv[(b - b0) * T + t] = dot(db + t * d, sub.v + b * d, d);
          }
        }
        // c = delta R - 2 (delta.v) u; e = m * c; eu = e . u
        scalar_t* c = cp != nullptr ? cp + n0 * k : c_buf;
        scalar_t* e = e_buf != nullptr ? e_buf : c;
        gemm_rowmajor<scalar_t>(false, r.trans_r(), rows, k, d, 1, delta, d, r.p, r.ld, 0, c, k);
        if (has_v || has_m) {
          for (int64_t i = 0; i < rows; ++i) {
            const int64_t b = b0 + i / T;
            eu[i] = fwd_k_row(c + i * k, e + i * k, has_v ? sub.u + b * k : nullptr,
                              has_m ? sub.m + b * sub.m_stride : nullptr, has_v ? dv[i] : scalar_t(0), k);
          }
        }
        // out = base + e R^T - 2 (e.u) v
        scalar_t* o = op + n0 * d;
        gemm_rowmajor<scalar_t>(false, r.trans_rt(), rows, d, k, 1, e, k, r.p, r.ld, 0, o, d);
        for (int64_t i = 0; i < rows; ++i) {
          fwd_out_row(o + i * d, xp + (n0 + i) * d, has_v ? sub.v + (b0 + i / T) * d : nullptr, eu[i], d);
        }
      }
    }
  });
  if (delta_out != nullptr) *delta_out = D;
  return FwdOut(out, coords);
}

template <typename scalar_t>
Grads bwd_per_example(const at::Tensor& G, const at::Tensor& base, const at::Tensor& source,
                      const at::Tensor& weights, const at::Tensor& R_in,
                      const std::optional<at::Tensor>& reflect, const std::optional<at::Tensor>& mask,
                      const std::optional<at::Tensor>& coords, const std::optional<at::Tensor>& delta_in) {
  const BlockedProblem<scalar_t> P(base, source, weights, R_in, reflect, mask);
  const int64_t B = P.B, T = P.T, d = P.d, S = P.S, Sp1 = S + 1, k = P.k;
  const auto& r = P.r;
  const auto& sub = P.sub;
  const bool has_v = sub.v != nullptr, has_m = sub.m != nullptr;
  const scalar_t *wp = P.wp, *xp = P.xp, *sp = P.sp;
  const scalar_t* gp = G.const_data_ptr<scalar_t>();
  const auto opts = base.options();
  const scalar_t* cin = coords.has_value() ? coords->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* delta_given = delta_in.has_value() ? delta_in->const_data_ptr<scalar_t>() : nullptr;

  at::Tensor g_base = at::empty({B, T, d}, opts);
  at::Tensor g_source = at::empty({B, S, d}, opts);
  at::Tensor g_weights = at::empty({B, Sp1, T}, opts);
  at::Tensor g_reflect = has_v ? at::empty({B, d}, opts) : at::empty({0}, opts);
  at::Tensor gm_rows = at::zeros({B, k}, opts);
  at::Tensor Q = at::zeros({B, k}, opts);
  // g_basis = sum_b D_b^T g_c_b + G_b^T e_b - 2 v_b q_b^T, accumulated per chunk of examples
  // while the rows are in cache; the chunks are fixed ranges of examples summed in order
  // afterwards, so the result does not depend on which thread ran which chunk.
  const int64_t chunks = P.chunks, per_chunk = P.per_chunk, per_block = P.per_block;
  at::Tensor basis_partial = scratch(kPartial, {chunks, d, k}, opts);
  scalar_t* gbp = g_base.data_ptr<scalar_t>();
  scalar_t* gsp = g_source.data_ptr<scalar_t>();
  scalar_t* gwp = g_weights.data_ptr<scalar_t>();
  scalar_t* grp = has_v ? g_reflect.data_ptr<scalar_t>() : nullptr;
  scalar_t* gmp = gm_rows.data_ptr<scalar_t>();
  scalar_t* Qp = Q.data_ptr<scalar_t>();
  scalar_t* bpp = basis_partial.data_ptr<scalar_t>();
  // In R's memory layout (AccumulateGrad then need not copy it to match a column-major R).
  at::Tensor g_basis = at::empty_like(R_in, at::MemoryFormat::Preserve);
  scalar_t* gRp = g_basis.data_ptr<scalar_t>();
  const int64_t gR_s0 = g_basis.stride(0), gR_s1 = g_basis.stride(1);
  std::atomic<int64_t> chunks_done{0};  // the task that completes the last chunk sums the partials
  const std::vector<scalar_t> zeros_k(k, scalar_t(0)), ones_k(k, scalar_t(1));
  {
    HDF_SCOPE("hdf_bwd_per_example");
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      const int64_t max_rows = per_block * T;
      scalar_t* gd = thread_buffer<scalar_t>(0, max_rows * d);
      scalar_t* delta_buf = delta_given == nullptr ? thread_buffer<scalar_t>(1, max_rows * d) : nullptr;
      scalar_t* gc = thread_buffer<scalar_t>(2, 2 * max_rows * k);
      scalar_t* e = gc + max_rows * k;
      scalar_t* rowvals = thread_buffer<scalar_t>(3, 4 * max_rows);
      scalar_t *dv = rowvals, *vg = dv + max_rows, *ue = vg + max_rows, *ugc = ue + max_rows;
      for (int64_t chunk = c0; chunk < c1; ++chunk) {
        scalar_t* basis_acc = bpp + chunk * d * k;  // [d, k] row-major
        const int64_t chunk_end = std::min(B, (chunk + 1) * per_chunk);
        P.compute_u(chunk * per_chunk, chunk_end);
        for (int64_t b0 = chunk * per_chunk; b0 < chunk_end; b0 += per_block) {
          const int64_t b1 = std::min(chunk_end, b0 + per_block), rows = (b1 - b0) * T, n0 = b0 * T;
          const scalar_t* x = xp + n0 * d;  // the block's rows
          const scalar_t* g = gp + n0 * d;
          // delta (the forward's, or recomputed per example); dv = delta.v, vg = v.g
          const scalar_t* delta = delta_given != nullptr ? delta_given + n0 * d : delta_buf;
          for (int64_t b = b0; b < b1; ++b) {
            if (delta_given == nullptr) {
              example_delta(wp + b * Sp1 * T, sp + b * S * d, xp + b * T * d, T, S, d, delta_buf + (b - b0) * T * d);
            }
            if (has_v) {
              for (int64_t i = (b - b0) * T; i < (b - b0 + 1) * T; ++i) {
                dv[i] = dot(delta + i * d, sub.v + b * d, d);
                vg[i] = dot(g + i * d, sub.v + b * d, d);
              }
            }
          }
          // gc: c (recomputed unless coords are given), rewritten as g_c; e: g R, rewritten
          // as e. Same algebra as the batched k-rows loop.
          if (cin == nullptr) {
            gemm_rowmajor<scalar_t>(false, r.trans_r(), rows, k, d, 1, delta, d, r.p, r.ld, 0, gc, k);
          }
          gemm_rowmajor<scalar_t>(false, r.trans_r(), rows, k, d, 1, g, d, r.p, r.ld, 0, e, k);
          for (int64_t i = 0; i < rows; ++i) {
            const int64_t b = b0 + i / T;
            const scalar_t* c_in = cin != nullptr ? cin + (n0 + i) * k : gc + i * k;
            const scalar_t a = (has_v && cin == nullptr) ? scalar_t(-2) * dv[i] : scalar_t(0);
            std::tie(ue[i], ugc[i]) =
                bwd_k_row(c_in, gc + i * k, e + i * k, has_v ? sub.u + b * k : zeros_k.data(),
                          has_m ? sub.m + b * sub.m_stride : ones_k.data(), a, has_v ? vg[i] : scalar_t(0),
                          has_v ? dv[i] : scalar_t(0), gmp + b * k, Qp + b * k, k);
          }
          // g_basis partial += delta^T g_c + g^T e - 2 V^T Q over the block's rows / examples
          const scalar_t first = b0 == chunk * per_chunk ? scalar_t(0) : scalar_t(1);
          gemm_rowmajor<scalar_t>(true, false, d, k, rows, 1, delta, d, gc, k, first, basis_acc, k);
          gemm_rowmajor<scalar_t>(true, false, d, k, rows, 1, g, d, e, k, 1, basis_acc, k);
          if (has_v) {
            gemm_rowmajor<scalar_t>(true, false, d, k, b1 - b0, -2, sub.v + b0 * d, d, Qp + b0 * k, k, 1,
                                    basis_acc, k);
          }
          // g_delta = g_c R^T - 2 (u.g_c) v; g_base = g - (1 - w_self) g_delta;
          // g_w[S, t] = g_delta . base; g_reflect = -2 [sum_t (u.e) g + (u.g_c) delta + R q]
          gemm_rowmajor<scalar_t>(false, r.trans_rt(), rows, d, k, 1, gc, k, r.p, r.ld, 0, gd, d);
          if (has_v) {  // g_reflect rows start as Q R^T
            gemm_rowmajor<scalar_t>(false, r.trans_rt(), b1 - b0, d, k, 1, Qp + b0 * k, k, r.p, r.ld, 0,
                                    grp + b0 * d, d);
          }
          for (int64_t i = 0; i < rows; ++i) {
            const int64_t b = b0 + i / T, t = i % T;
            gwp[(b * Sp1 + S) * T + t] =
                bwd_d_row(gd + i * d, gbp + (n0 + i) * d, g + i * d, x + i * d, delta + i * d,
                          has_v ? sub.v + b * d : nullptr, has_v ? grp + b * d : nullptr, wp[(b * Sp1 + S) * T + t],
                          ue[i], ugc[i], d);
          }
          for (int64_t b = b0; b < b1; ++b) {
            if (has_v) {
              scalar_t* __restrict acc = grp + b * d;
#pragma omp simd
              for (int64_t i = 0; i < d; ++i) acc[i] *= scalar_t(-2);
            }
            // g_source = W_src g_delta [S, d]; g_w[:S] = source g_delta^T [S, T]
            const scalar_t* gdb = gd + (b - b0) * T * d;
            gemm_rowmajor<scalar_t>(false, false, S, d, T, 1, wp + b * Sp1 * T, T, gdb, d, 0, gsp + b * S * d, d);
            gemm_rowmajor<scalar_t>(false, true, S, T, d, 1, sp + b * S * d, d, gdb, d, 0, gwp + b * Sp1 * T, T);
          }
        }
        // acq_rel: the last task sees every other task's partial
        if (chunks_done.fetch_add(1, std::memory_order_acq_rel) + 1 == chunks) {
          sum_partials_into<scalar_t>(bpp, chunks, d, k, gRp, gR_s0, gR_s1);
        }
      }
    });
  }
  at::Tensor g_mask = has_m ? (mask->dim() == 2 ? gm_rows : gm_rows.sum(0)) : at::empty({0}, opts);
  return Grads(g_base, g_source, g_weights, g_basis, g_reflect, g_mask);
}

// ----------------------------------------------------------------------------------------
// forward
// ----------------------------------------------------------------------------------------
template <typename scalar_t>
FwdOut fwd_impl(const at::Tensor& base, const at::Tensor& source, const at::Tensor& weights,
                const std::optional<at::Tensor>& basis, const std::optional<at::Tensor>& reflect,
                const std::optional<at::Tensor>& mask, bool with_coords, at::Tensor* delta_out) {
  const int64_t B = base.size(0), T = base.size(1), d = base.size(2), S = source.size(1);
  const int64_t N = B * T;
  const int64_t Sp1 = S + 1;
  const scalar_t* wp = weights.const_data_ptr<scalar_t>();
  const scalar_t* xp = base.const_data_ptr<scalar_t>();

  if (basis.has_value() && use_per_example<scalar_t>(B, T, d, basis->size(1))) {
    return fwd_per_example<scalar_t>(base, source, weights, *basis, reflect, mask, with_coords, delta_out);
  }
  // D = W_src^T source  [B, T, d]
  at::Tensor D = at::bmm(weights.narrow(1, 0, S).transpose(1, 2), source);
  scalar_t* Dp = D.data_ptr<scalar_t>();

  if (!basis.has_value()) {  // vanilla: out = mix
    at::parallel_for(0, N, kRowGrain, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t b = n / T, t = n % T;
        const scalar_t ws = wp[(b * Sp1 + S) * T + t];
        scalar_t* __restrict row = Dp + n * d;
        const scalar_t* __restrict x = xp + n * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) row[i] += ws * x[i];
      }
    });
    return FwdOut(D, at::empty({0}, base.options()));
  }

  const at::Tensor& R = *basis;
  const int64_t k = R.size(1);
  const bool has_v = reflect.has_value();
  const Subspace<scalar_t> sub = make_subspace<scalar_t>(R, reflect, mask);

  // delta = D + (w_self - 1) base; dv = delta . v
  std::vector<scalar_t> dv(has_v ? N : 0);
  {
    HDF_SCOPE("hdf_fwd_delta_rows");
    at::parallel_for(0, N, kRowGrain, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t b = n / T, t = n % T;
        const scalar_t a = wp[(b * Sp1 + S) * T + t] - scalar_t(1);
        scalar_t* __restrict row = Dp + n * d;
        const scalar_t* __restrict x = xp + n * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) row[i] += a * x[i];
        if (has_v) dv[n] = dot(row, sub.v + b * d, d);
      }
    });
  }

  at::Tensor D2 = D.view({N, d});
  at::Tensor C = at::mm(D2, R);  // [N, k]: delta R, corrected in place to c = R_b^T delta
  scalar_t* Cp = C.data_ptr<scalar_t>();
  // E = m * c; a separate buffer only when c itself is returned as coords.
  const bool has_m = sub.m != nullptr;
  at::Tensor E = (with_coords && has_m) ? at::empty({N, k}, base.options()) : C;
  scalar_t* Ep = E.data_ptr<scalar_t>();
  std::vector<scalar_t> eu(has_v ? N : 0);
  if (has_v || has_m) {
    {
      HDF_SCOPE("hdf_fwd_k_rows");
      at::parallel_for(0, N, std::max<int64_t>(1, 4096 / k), [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) {
          const int64_t b = n / T;
          const scalar_t r = fwd_k_row(Cp + n * k, Ep + n * k, has_v ? sub.u + b * k : nullptr,
                                       has_m ? sub.m + b * sub.m_stride : nullptr, has_v ? dv[n] : scalar_t(0), k);
          if (has_v) eu[n] = r;
        }
      });
    }
  }
  at::Tensor coords = with_coords ? C.view({B, T, k}) : at::empty({0}, base.options());
  if (delta_out != nullptr) *delta_out = D;  // kept for the backward: out gets its own buffer

  if (!has_v) {
    return FwdOut(at::addmm(base.view({N, d}), E, R.t()).view({B, T, d}), coords);
  }
  // out = base + E R^T - 2 (e.u) v, written over D unless D is kept
  at::Tensor out = delta_out != nullptr ? at::empty({B, T, d}, base.options()) : D;
  at::Tensor out2 = out.view({N, d});
  at::mm_out(out2, E, R.t());
  scalar_t* op = out.data_ptr<scalar_t>();
  {
    HDF_SCOPE("hdf_fwd_out_rows");
    at::parallel_for(0, N, kRowGrain, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) fwd_out_row(op + n * d, xp + n * d, sub.v + (n / T) * d, eu[n], d);
    });
  }
  return FwdOut(out, coords);
}

// ----------------------------------------------------------------------------------------
// backward
// ----------------------------------------------------------------------------------------
template <typename scalar_t>
Grads bwd_impl(const at::Tensor& G, const at::Tensor& base, const at::Tensor& source,
               const at::Tensor& weights, const std::optional<at::Tensor>& basis,
               const std::optional<at::Tensor>& reflect, const std::optional<at::Tensor>& mask,
               const std::optional<at::Tensor>& coords, const std::optional<at::Tensor>& delta) {
  const int64_t B = base.size(0), T = base.size(1), d = base.size(2), S = source.size(1);
  const int64_t N = B * T;
  const int64_t Sp1 = S + 1;
  const auto opts = base.options();
  const scalar_t* wp = weights.const_data_ptr<scalar_t>();
  const scalar_t* xp = base.const_data_ptr<scalar_t>();
  const scalar_t* gp = G.const_data_ptr<scalar_t>();
  const scalar_t* sp = source.const_data_ptr<scalar_t>();
  const at::Tensor Wsrc = weights.narrow(1, 0, S);  // [B, S, T]
  if (basis.has_value() && use_per_example<scalar_t>(B, T, d, basis->size(1))) {
    return bwd_per_example<scalar_t>(G, base, source, weights, *basis, reflect, mask, coords, delta);
  }

  at::Tensor g_base = at::empty({B, T, d}, opts);
  at::Tensor g_weights = at::empty({B, Sp1, T}, opts);
  at::Tensor g_basis, g_reflect, g_mask;
  scalar_t* gbp = g_base.data_ptr<scalar_t>();
  scalar_t* gwp = g_weights.data_ptr<scalar_t>();
  at::Tensor GD;  // g_delta [B, T, d]
  // g_source[b] = W_src[b] g_delta[b]  [S, d];  g_w[b, :S] = source[b] g_delta[b]^T  [S, T].
  // With at least one example per thread, both products run per example on raw pointers
  // (g_w lands in its strided slot directly), right after that example's g_delta rows,
  // while they are in cache; else as two batched GEMMs at the end.
  const bool per_example = have_blas<scalar_t>() && B >= at::get_num_threads();
  at::Tensor g_source = at::empty({B, S, d}, opts);
  scalar_t* gsp = g_source.data_ptr<scalar_t>();
  bool source_grads_done = false;
  auto source_grads_of = [&](int64_t b, const scalar_t* gd_b) {
    gemm_rowmajor<scalar_t>(false, false, S, d, T, 1, wp + b * Sp1 * T, T, gd_b, d, 0, gsp + b * S * d, d);
    gemm_rowmajor<scalar_t>(false, true, S, T, d, 1, sp + b * S * d, d, gd_b, d, 0, gwp + b * Sp1 * T, T);
  };

  if (!basis.has_value()) {
    // g_delta = g; g_base = w_self g; g_w[b,S,t] = <g, base>
    GD = G;
    at::parallel_for(0, N, kRowGrain, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t b = n / T, t = n % T;
        const scalar_t ws = wp[(b * Sp1 + S) * T + t];
        const scalar_t* __restrict g = gp + n * d;
        scalar_t* __restrict gb = gbp + n * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) gb[i] = ws * g[i];
        gwp[(b * Sp1 + S) * T + t] = dot(g, xp + n * d, d);
      }
    });
    g_basis = at::empty({0}, opts);
    g_reflect = at::empty({0}, opts);
    g_mask = at::empty({0}, opts);
  } else {
    const at::Tensor& R = *basis;
    const int64_t k = R.size(1);
    const bool has_v = reflect.has_value();
    const bool has_m = mask.has_value();
    const Subspace<scalar_t> sub = make_subspace<scalar_t>(R, reflect, mask);

    // D = delta = W_src^T source + (w_self - 1) base [B, T, d] (or the forward's, read only);
    // dv = delta.v; vg = v.g.
    const bool have_delta = delta.has_value();
    at::Tensor D = have_delta ? *delta : scratch(kD, {B, T, d}, opts);
    at::Tensor D2 = D.view({N, d});
    const at::Tensor G2 = G.view({N, d});
    if (!have_delta) at::bmm_out(D, Wsrc.transpose(1, 2), source);
    scalar_t* Dp = D.data_ptr<scalar_t>();
    std::vector<scalar_t> dv(has_v ? N : 0), vg(has_v ? N : 0);
    {
      HDF_SCOPE("hdf_bwd_delta_rows");
      at::parallel_for(0, N, kRowGrain, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) {
          const int64_t b = n / T, t = n % T;
          const scalar_t a = wp[(b * Sp1 + S) * T + t] - scalar_t(1);
          scalar_t* __restrict row = Dp + n * d;
          const scalar_t* __restrict x = xp + n * d;
          if (!have_delta) {
#pragma omp simd
            for (int64_t i = 0; i < d; ++i) row[i] += a * x[i];
          }
          if (has_v) {
            dv[n] = dot(row, sub.v + b * d, d);
            vg[n] = dot(gp + n * d, sub.v + b * d, d);
          }
        }
      });
    }
    // CE = [D R; G R] = [c; g R]; rewritten in place below as [g_c; e] so that
    // g_basis = D^T g_c + G^T e (the H_b parts are the -2 V^T Q term).
    // With the forward's coords (c = R_b^T delta, already reflected) only g R is computed.
    at::Tensor CE = scratch(kCE, {2 * N, k}, opts);
    const scalar_t* cin = nullptr;  // the forward's c [N, k], or null: c comes from CE
    if (coords.has_value()) {
      cin = coords->const_data_ptr<scalar_t>();
    } else {
      at::Tensor c = CE.narrow(0, 0, N);
      at::mm_out(c, D2, R);
    }
    at::Tensor gR = CE.narrow(0, N, N);
    at::mm_out(gR, G2, R);
    scalar_t* GCp = CE.data_ptr<scalar_t>();  // rows [0, N): c in (without coords), g_c out
    scalar_t* Ep = GCp + N * k;                // rows [N, 2N): g R in, e out
    at::Tensor GC = CE.narrow(0, 0, N);
    // Per-example k-vector reductions: g_mask rows and Q. Absent u / m read as 0 / 1.
    at::Tensor gm_rows = at::zeros({B, k}, opts);
    at::Tensor Q = at::zeros({B, k}, opts);
    scalar_t* gmp = gm_rows.data_ptr<scalar_t>();
    scalar_t* Qp = Q.data_ptr<scalar_t>();
    const std::vector<scalar_t> zeros_k(k, scalar_t(0)), ones_k(k, scalar_t(1));
    std::vector<scalar_t> ue(N), ugc(N);
    {
      HDF_SCOPE("hdf_bwd_k_rows");
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const scalar_t* __restrict u = has_v ? sub.u + b * k : zeros_k.data();
          const scalar_t* __restrict m = has_m ? sub.m + b * sub.m_stride : ones_k.data();
          scalar_t* __restrict gm = gmp + b * k;
          scalar_t* __restrict q = Qp + b * k;
          for (int64_t t = 0; t < T; ++t) {
            const int64_t n = b * T + t;
            // c sits in the g_c slot and g R in the e slot: computed in registers, then swapped.
            scalar_t* gc = GCp + n * k;  // may be read as c_in (same index only)
            const scalar_t* c_in = cin != nullptr ? cin + n * k : gc;
            const scalar_t a = (has_v && cin == nullptr) ? scalar_t(-2) * dv[n] : scalar_t(0);
            std::tie(ue[n], ugc[n]) = bwd_k_row(c_in, gc, Ep + n * k, u, m, a, has_v ? vg[n] : scalar_t(0),
                                                has_v ? dv[n] : scalar_t(0), gm, q, k);
          }
        }
      });
    }
    if (has_m) {
      g_mask = mask->dim() == 2 ? gm_rows : gm_rows.sum(0);
    } else {
      g_mask = at::empty({0}, opts);
    }

    // g_basis = D^T g_c + G^T e - 2 V^T Q
    // In R's memory layout, so that AccumulateGrad need not copy it to match a column-major R.
    g_basis = at::empty_like(R, at::MemoryFormat::Preserve);
    at::mm_out(g_basis, D2.t(), GC);
    g_basis.addmm_(G2.t(), CE.narrow(0, N, N));
    if (has_v) g_basis.addmm_(reflect->t(), Q, /*beta=*/1, /*alpha=*/-2);

    // g_delta = Gc R^T - 2 (u.g_c) v; g_base; g_w[:, S]; g_reflect
    GD = scratch(kGD, {B, T, d}, opts);
    at::Tensor GD2 = GD.view({N, d});
    at::mm_out(GD2, GC, R.t());
    scalar_t* GDp = GD.data_ptr<scalar_t>();
    at::Tensor RQ;
    const int64_t TT = per_example ? T : 8;  // rows per task (and per g_reflect partial sum)
    const int64_t tiles_per_b = (T + TT - 1) / TT;
    at::Tensor partial;
    scalar_t* pp = nullptr;
    const scalar_t* rqp = nullptr;
    if (has_v) {
      RQ = at::mm(Q, R.t());  // [B, d]
      rqp = RQ.const_data_ptr<scalar_t>();
      partial = scratch(kPartial, {B * tiles_per_b, d}, opts);
      pp = partial.data_ptr<scalar_t>();
    }
    {
      HDF_SCOPE("hdf_bwd_d_rows");
      at::parallel_for(0, B * tiles_per_b, 1, [&](int64_t i0, int64_t i1) {
        for (int64_t tile = i0; tile < i1; ++tile) {
          const int64_t b = tile / tiles_per_b;
          const int64_t t0 = (tile % tiles_per_b) * TT, t1 = std::min(T, t0 + TT);
          scalar_t* __restrict acc = has_v ? pp + tile * d : nullptr;
          if (has_v) std::fill(acc, acc + d, scalar_t(0));
          const scalar_t* __restrict v = has_v ? sub.v + b * d : nullptr;
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t n = b * T + t;
            gwp[(b * Sp1 + S) * T + t] = bwd_d_row(GDp + n * d, gbp + n * d, gp + n * d, xp + n * d, Dp + n * d,
                                                   v, acc, wp[(b * Sp1 + S) * T + t], ue[n], ugc[n], d);
          }
          if (per_example) source_grads_of(b, GDp + b * T * d);
        }
      });
      source_grads_done = per_example;
    }
    if (has_v) {
      g_reflect = at::empty({B, d}, opts);
      scalar_t* grp = g_reflect.data_ptr<scalar_t>();
      {
        HDF_SCOPE("hdf_bwd_reflect_sum");
        at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) {
            scalar_t* __restrict out = grp + b * d;
            const scalar_t* __restrict rq = rqp + b * d;
#pragma omp simd
            for (int64_t i = 0; i < d; ++i) out[i] = rq[i];
            for (int64_t tile = b * tiles_per_b; tile < (b + 1) * tiles_per_b; ++tile) {
              const scalar_t* __restrict p = pp + tile * d;
#pragma omp simd
              for (int64_t i = 0; i < d; ++i) out[i] += p[i];
            }
#pragma omp simd
            for (int64_t i = 0; i < d; ++i) out[i] *= scalar_t(-2);
          }
        });
      }
    } else {
      g_reflect = at::empty({0}, opts);
    }
  }

  if (source_grads_done) {
  } else if (per_example) {
    HDF_SCOPE("hdf_bwd_source_grads");
    const scalar_t* gdp = GD.const_data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) source_grads_of(b, gdp + b * T * d);
    });
  } else {
    at::bmm_out(g_source, Wsrc, GD);
    g_weights.narrow(1, 0, S).copy_(at::bmm(source, GD.transpose(1, 2)));
  }
  return Grads(g_base, g_source, g_weights, g_basis, g_reflect, g_mask);
}

// ----------------------------------------------------------------------------------------
// hard rows, in place
// ----------------------------------------------------------------------------------------
template <typename scalar_t>
void rows_impl(const at::Tensor& base, const at::Tensor& source, const int64_t* bi,
               const int64_t* ti, const int64_t* si, int64_t P,
               const std::optional<at::Tensor>& basis, const std::optional<at::Tensor>& reflect,
               const std::optional<at::Tensor>& mask) {
  const int64_t T = base.size(1), d = base.size(2), S = source.size(1);
  scalar_t* xp = base.data_ptr<scalar_t>();
  const scalar_t* sp = source.const_data_ptr<scalar_t>();
  if (!basis.has_value()) {
    at::parallel_for(0, P, kRowGrain, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        std::copy(sp + (bi[p] * S + si[p]) * d, sp + (bi[p] * S + si[p] + 1) * d,
                  xp + (bi[p] * T + ti[p]) * d);
      }
    });
    return;
  }
  const at::Tensor& R = *basis;
  const int64_t k = R.size(1);
  const bool has_v = reflect.has_value();
  const Subspace<scalar_t> sub = make_subspace<scalar_t>(R, reflect, mask);
  at::Tensor Dl = scratch(kRowsD, {P, d}, base.options());
  scalar_t* Dp = Dl.data_ptr<scalar_t>();
  std::vector<scalar_t> dv(has_v ? P : 0), eu(has_v ? P : 0);
  at::parallel_for(0, P, kRowGrain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const scalar_t* __restrict y = sp + (bi[p] * S + si[p]) * d;
      const scalar_t* __restrict x = xp + (bi[p] * T + ti[p]) * d;
      scalar_t* __restrict row = Dp + p * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) row[i] = y[i] - x[i];
      if (has_v) dv[p] = dot(row, sub.v + bi[p] * d, d);
    }
  });
  at::Tensor C = scratch(kRowsC, {P, k}, base.options());
  at::mm_out(C, Dl, R);
  scalar_t* Cp = C.data_ptr<scalar_t>();
  at::parallel_for(0, P, std::max<int64_t>(1, 4096 / k), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = bi[p];
      scalar_t* __restrict c = Cp + p * k;
      if (has_v) {
        const scalar_t* __restrict u = sub.u + b * k;
        const scalar_t a = scalar_t(-2) * dv[p];
#pragma omp simd
        for (int64_t j = 0; j < k; ++j) c[j] += a * u[j];
      }
      if (sub.m != nullptr) {
        const scalar_t* __restrict m = sub.m + b * sub.m_stride;
#pragma omp simd
        for (int64_t j = 0; j < k; ++j) c[j] *= m[j];
      }
      if (has_v) eu[p] = dot(c, sub.u + b * k, k);
    }
  });
  at::mm_out(Dl, C, R.t());
  at::parallel_for(0, P, kRowGrain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = bi[p];
      scalar_t* __restrict x = xp + (b * T + ti[p]) * d;
      const scalar_t* __restrict row = Dp + p * d;
      if (has_v) {
        const scalar_t* __restrict v = sub.v + b * d;
        const scalar_t a = scalar_t(-2) * eu[p];
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) x[i] += row[i] + a * v[i];
      } else {
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) x[i] += row[i];
      }
    }
  });
}

}  // namespace

// ----------------------------------------------------------------------------------------
// entry points
// ----------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> interchange_fwd(
    const at::Tensor& base_in, const at::Tensor& source_in, const at::Tensor& weights_in,
    const std::optional<at::Tensor>& basis_in, const std::optional<at::Tensor>& reflect_in,
    const std::optional<at::Tensor>& mask_in, bool with_coords) {
  check_soft(base_in, source_in, weights_in, basis_in, reflect_in, mask_in);
  c10::NoGradGuard no_grad;
  const at::ScalarType dtype = base_in.scalar_type();
  if (is_reduced(dtype)) {
    const auto f = at::kFloat;
    auto r = interchange_fwd(base_in.to(f), source_in.to(f), weights_in.to(f), opt_to(basis_in, f),
                             opt_to(reflect_in, f), opt_to(mask_in, f), with_coords);
    return {std::get<0>(r).to(dtype), std::get<1>(r).to(dtype)};
  }
  const at::Tensor base = base_in.contiguous(), source = source_in.contiguous(),
                   weights = weights_in.contiguous();
  // basis is only read through GEMMs, which take a row- or column-major R as it is (a QR
  // factor is column-major): no copy.
  const auto& basis = basis_in;
  const auto reflect = opt_contig(reflect_in), mask = opt_contig(mask_in);
  FwdOut out;
  AT_DISPATCH_FLOATING_TYPES(dtype, "interchange_fwd_cpu", [&] {
    out = fwd_impl<scalar_t>(base, source, weights, basis, reflect, mask, with_coords, nullptr);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> interchange_fwd_train(
    const at::Tensor& base_in, const at::Tensor& source_in, const at::Tensor& weights_in,
    const at::Tensor& basis, const std::optional<at::Tensor>& reflect_in,
    const std::optional<at::Tensor>& mask_in) {
  check_soft(base_in, source_in, weights_in, basis, reflect_in, mask_in);
  c10::NoGradGuard no_grad;
  const at::ScalarType dtype = base_in.scalar_type();
  if (is_reduced(dtype)) {
    // The backward recomputes in float rather than reuse half-precision copies.
    auto r = interchange_fwd(base_in, source_in, weights_in, basis, reflect_in, mask_in, false);
    return {std::get<0>(r), at::empty({0}, base_in.options()), at::empty({0}, base_in.options())};
  }
  const at::Tensor base = base_in.contiguous(), source = source_in.contiguous(),
                   weights = weights_in.contiguous();
  const auto reflect = opt_contig(reflect_in), mask = opt_contig(mask_in);
  FwdOut out;
  at::Tensor delta;
  AT_DISPATCH_FLOATING_TYPES(dtype, "interchange_fwd_train_cpu", [&] {
    out = fwd_impl<scalar_t>(base, source, weights, basis, reflect, mask, true, &delta);
  });
  return {std::get<0>(out), std::get<1>(out), delta};
}

Grads interchange_bwd(const at::Tensor& grad_in, const at::Tensor& base_in,
                      const at::Tensor& source_in, const at::Tensor& weights_in,
                      const std::optional<at::Tensor>& basis_in,
                      const std::optional<at::Tensor>& reflect_in,
                      const std::optional<at::Tensor>& mask_in,
                      const std::optional<at::Tensor>& coords_in,
                      const std::optional<at::Tensor>& delta_in) {
  check_soft(base_in, source_in, weights_in, basis_in, reflect_in, mask_in);
  hyperdas_fast::checks::check_grad_out(grad_in, base_in);
  // coords: the forward's c = R_b^T (mix - base) [B, T, k]; empty (numel 0) or None: recompute.
  std::optional<at::Tensor> coords;
  if (coords_in.has_value() && coords_in->numel() > 0) {
    TORCH_CHECK(basis_in.has_value(), "hyperdas_fast: coords need a basis [d, k]");
    check_same(*coords_in, base_in, "coords");
    const int64_t k = basis_in->size(1);
    TORCH_CHECK(coords_in->dim() == 3 && coords_in->size(0) == base_in.size(0) &&
                    coords_in->size(1) == base_in.size(1) && coords_in->size(2) == k,
                "hyperdas_fast: coords must be [B, T, k] = [", base_in.size(0), ", ", base_in.size(1),
                ", ", k, "], got ", coords_in->sizes());
    coords = coords_in;
  }
  // delta: the forward's mix - base [B, T, d]; empty or None: recomputed.
  std::optional<at::Tensor> delta;
  if (delta_in.has_value() && delta_in->numel() > 0) {
    TORCH_CHECK(basis_in.has_value(), "hyperdas_fast: delta needs a basis [d, k]");
    check_same(*delta_in, base_in, "delta");
    TORCH_CHECK(delta_in->sizes() == base_in.sizes(), "hyperdas_fast: delta must have base's shape ",
                base_in.sizes(), ", got ", delta_in->sizes());
    delta = delta_in;
  }
  c10::NoGradGuard no_grad;
  const at::ScalarType dtype = base_in.scalar_type();
  if (is_reduced(dtype)) {
    // Recompute c in float rather than reuse the forward's coords rounded to half precision.
    const auto f = at::kFloat;
    Grads g = interchange_bwd(grad_in.to(f), base_in.to(f), source_in.to(f), weights_in.to(f),
                              opt_to(basis_in, f), opt_to(reflect_in, f), opt_to(mask_in, f),
                              std::nullopt, std::nullopt);
    return Grads(std::get<0>(g).to(dtype), std::get<1>(g).to(dtype), std::get<2>(g).to(dtype),
                 std::get<3>(g).to(dtype), std::get<4>(g).to(dtype), std::get<5>(g).to(dtype));
  }
  const at::Tensor grad = grad_in.to(dtype).contiguous();
  const at::Tensor base = base_in.contiguous(), source = source_in.contiguous(),
                   weights = weights_in.contiguous();
  // basis is only read through GEMMs, which take a row- or column-major R as it is (a QR
  // factor is column-major): no copy.
  const auto& basis = basis_in;
  const auto reflect = opt_contig(reflect_in), mask = opt_contig(mask_in);
  coords = opt_contig(coords);
  delta = opt_contig(delta);
  Grads out;
  AT_DISPATCH_FLOATING_TYPES(dtype, "interchange_bwd_cpu", [&] {
    out = bwd_impl<scalar_t>(grad, base, source, weights, basis, reflect, mask, coords, delta);
  });
  return out;
}

void interchange_rows_(const at::Tensor& base, const at::Tensor& source_in,
                       const at::Tensor& batch_index, const at::Tensor& base_pos,
                       const at::Tensor& source_pos, const std::optional<at::Tensor>& basis_in,
                       const std::optional<at::Tensor>& reflect_in,
                       const std::optional<at::Tensor>& mask_in) {
  check_states(base, source_in);
  check_subspace(base, basis_in, reflect_in, mask_in);
  TORCH_CHECK(base.is_contiguous(), "hyperdas_fast: interchange_rows_ needs a contiguous base");
  hyperdas_fast::checks::check_row_indices(base, batch_index, base_pos, source_pos);
  const int64_t P = batch_index.numel();
  if (P == 0) return;
  c10::NoGradGuard no_grad;
  const at::Tensor bi = batch_index.to(at::kLong).contiguous();
  const at::Tensor ti = base_pos.to(at::kLong).contiguous();
  const at::Tensor si = source_pos.to(at::kLong).contiguous();
  {
    const int64_t B = base.size(0), T = base.size(1), S = source_in.size(1);
    const int64_t *b = bi.const_data_ptr<int64_t>(), *t = ti.const_data_ptr<int64_t>(),
                  *s = si.const_data_ptr<int64_t>();
    for (int64_t p = 0; p < P; ++p) {
      TORCH_CHECK(b[p] >= 0 && b[p] < B && t[p] >= 0 && t[p] < T && s[p] >= 0 && s[p] < S,
                  "hyperdas_fast: row ", p, " = (", b[p], ", ", t[p], ", ", s[p],
                  ") is out of range for B, T, S = ", B, ", ", T, ", ", S);
    }
    // Each base row at most once: the kernels add each row's change to base in place, so a
    // repeated (batch, base_pos) would apply two changes on top of each other.
    std::vector<std::pair<int64_t, int64_t>> keys(P);
    for (int64_t p = 0; p < P; ++p) keys[p] = {b[p] * T + t[p], p};
    std::sort(keys.begin(), keys.end());
    for (int64_t p = 1; p < P; ++p) {
      TORCH_CHECK(keys[p].first != keys[p - 1].first, "hyperdas_fast: rows ", keys[p - 1].second, " and ",
                  keys[p].second, " both target base row (", b[keys[p].second], ", ", t[keys[p].second],
                  "); each (batch_index, base_pos) may appear once");
    }
  }
  const at::ScalarType dtype = base.scalar_type();
  if (is_reduced(dtype)) {
    const auto f = at::kFloat;
    at::Tensor base_f = base.to(f);
    interchange_rows_(base_f, source_in.to(f), bi, ti, si, opt_to(basis_in, f), opt_to(reflect_in, f),
                      opt_to(mask_in, f));
    base.copy_(base_f);
    return;
  }
  // A source that shares memory with base (interchange_hard(h, h, ...): rows of one stream
  // swapped) is read from a copy: the rows are written while others are still to be read.
  const at::Tensor source = source_in.is_alias_of(base) ? source_in.clone(at::MemoryFormat::Contiguous)
                                                        : source_in.contiguous();
  // basis is only read through GEMMs, which take a row- or column-major R as it is (a QR
  // factor is column-major): no copy.
  const auto& basis = basis_in;
  const auto reflect = opt_contig(reflect_in), mask = opt_contig(mask_in);
  AT_DISPATCH_FLOATING_TYPES(dtype, "interchange_rows_cpu", [&] {
    rows_impl<scalar_t>(base, source, bi.const_data_ptr<int64_t>(), ti.const_data_ptr<int64_t>(),
                        si.const_data_ptr<int64_t>(), P, basis, reflect, mask);
  });
}

}  // namespace cpu
}  // namespace hyperdas_fast
