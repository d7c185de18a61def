// Torch binding of the CUDA interchange kernels: implementations for the CUDA dispatch key
// of the ops whose schemas the CPU extension (hyperdas_fast._C) defines with
// TORCH_LIBRARY(hyperdas_fast, m):
//
//   interchange_fwd(Tensor base, Tensor source, Tensor weights, Tensor? basis, Tensor? reflect,
//                   Tensor? mask, bool with_coords=False) -> (Tensor, Tensor)
//   interchange_bwd(Tensor grad_out, Tensor base, Tensor source, Tensor weights, Tensor? basis,
//                   Tensor? reflect, Tensor? mask, Tensor? coords=None, Tensor? saved=None)
//                   -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)
//
// coords = R_b^T (mix - base) [B, T, k]: the fused forward does not keep it, so with_coords
// computes it with ATen (hyperdas_fast.ops.cuda passes with_coords=False); the backward uses
// it when given and recomputes it otherwise.
//   interchange_rows_(Tensor(a!) base, Tensor source, Tensor batch_index, Tensor base_pos,
//                     Tensor source_pos, Tensor? basis, Tensor? reflect, Tensor? mask) -> ()
//
// Forward and rows: the fused kernels of interchange_kernels.cu for fp32 / fp16 / bf16 and
// k <= kMaxFusedK; otherwise (float64, or k > 256 such as BoundlessDAS with k = d, which is
// GEMM-bound) the same math with ATen ops (cuBLAS).
// Soft inputs whose batch fits the projected formulation (csrc/common/interchange_projected.h,
// a few cuBLAS GEMMs over d that never form the mix in d dimensions; see the README's GPU
// section), by the rule of soft_path() below: the backward always, the forward from
// B*T*d = 2^22 up, its steps in k dimensions done by the k-space kernels of projected_kspace.cuh
// (for float64 or k > 256: by ATen ops, and only from 2^24 up). A forward that needs a
// gradient (interchange_fwd_train, below) keeps the projections for the backward and takes
// the k-space kernels at every size.
// Otherwise the forward is the fused kernel and the backward ATen with the mix recomputed.
// HYPERDAS_FAST_CUDA_SOFT=fused|projected|projected_kernels|projected_apply overrides the
// choice (benchmarks compare them).
// Autograd for these ops is registered in C++ (csrc/cpu/interchange_autograd.cpp).
#include <ATen/ATen.h>
// c10/cuda headers only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE
// headers): keeps this file compile-checkable with just the CUDA runtime headers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <optional>
#include <cstdlib>
#include <string>
#include <tuple>

#include "../common/input_checks.h"
#include "../common/interchange_projected.h"
#include "interchange_kernels.cuh"
#include "projected_kspace.h"

namespace {

using at::Tensor;
namespace hk = hyperdas_fast::cuda;

bool fused_dtype(const Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

// Calls f(CT{}) with CT the CUDA element type of s (fp32 / fp16 / bf16 only).
template <typename F>
void dispatch_fused(at::ScalarType s, F&& f) {
  switch (s) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(__half{});
      break;
    case at::kBFloat16:
      f(__nv_bfloat16{});
      break;
    default:
      TORCH_CHECK(false, "interchange (cuda): fused kernels take fp32, fp16 or bf16, got ", s);
  }
}

int num_sms() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "interchange (cuda): ", name, " must be a CUDA tensor, got ", t.device());
}

// ----------------------------------------------------------------------------------------
// ATen formulation (fallback forward / rows, and the building blocks of the backward)
// ----------------------------------------------------------------------------------------

// R_b diag(m_b) R_b^T x for x [B, N, d] (factored Householder, nothing d x d).
Tensor subspace_project(const Tensor& x, const Tensor& basis, const std::optional<Tensor>& reflect,
                        const std::optional<Tensor>& mask) {
  Tensor coords = at::matmul(x, basis);
  Tensor u;
  if (reflect.has_value()) {
    u = at::matmul(*reflect, basis);  // [B, k]
    coords = coords - 2.0 * at::matmul(x, reflect->unsqueeze(-1)) * u.unsqueeze(1);
  }
  if (mask.has_value()) coords = coords * (mask->dim() == 2 ? mask->unsqueeze(1) : *mask);
  Tensor y = at::matmul(coords, basis.t());
  if (reflect.has_value()) y = y - 2.0 * at::matmul(coords, u.unsqueeze(-1)) * reflect->unsqueeze(1);
  return y;
}

Tensor soft_mix(const Tensor& base, const Tensor& source, const Tensor& weights) {
  const int64_t S = source.size(1);
  return at::baddbmm(weights.select(1, S).unsqueeze(-1) * base, weights.narrow(1, 0, S).transpose(1, 2), source);
}

Tensor fwd_aten(const Tensor& base, const Tensor& source, const Tensor& weights, const std::optional<Tensor>& basis,
                const std::optional<Tensor>& reflect, const std::optional<Tensor>& mask) {
  Tensor mix = soft_mix(base, source, weights);
  if (!basis.has_value()) return mix;
  return base + subspace_project(mix - base, *basis, reflect, mask);
}

// c = R_b^T (mix - base) [B, T, k] (before the mask).
Tensor coords_aten(const Tensor& base, const Tensor& source, const Tensor& weights, const Tensor& basis,
                   const std::optional<Tensor>& reflect) {
  Tensor delta = soft_mix(base, source, weights) - base;
  Tensor c = at::matmul(delta, basis);
  if (reflect.has_value()) {
    Tensor u = at::matmul(*reflect, basis);  // [B, k]
    c = c - 2.0 * at::matmul(delta, reflect->unsqueeze(-1)) * u.unsqueeze(1);
  }
  return c.contiguous();
}

// ----------------------------------------------------------------------------------------
// Forward
// ----------------------------------------------------------------------------------------

struct SubspaceTensors {
  Tensor basis, reflect, u, mask;
  int64_t mask_stride_b = 0;
};

SubspaceTensors prepare_subspace(const std::optional<Tensor>& basis, const std::optional<Tensor>& reflect,
                                 const std::optional<Tensor>& mask) {
  SubspaceTensors s;
  if (!basis.has_value()) return s;
  s.basis = basis->contiguous();
  const int64_t k = s.basis.size(1);
  if (reflect.has_value()) {
    s.reflect = reflect->contiguous();
    s.u = hyperdas_fast::projected::reflect_u(s.reflect, s.basis).contiguous();  // [B, k] fp32, tiny
  }
  if (mask.has_value()) {
    s.mask = mask->to(at::kFloat).contiguous();
    s.mask_stride_b = mask->dim() == 2 ? k : 0;
  }
  return s;
}

template <typename CT>
hk::Subspace<CT> view_subspace(const SubspaceTensors& s) {
  hk::Subspace<CT> sub;
  if (!s.basis.defined()) return sub;
  sub.basis = reinterpret_cast<const CT*>(s.basis.data_ptr());
  if (s.reflect.defined()) {
    sub.reflect = reinterpret_cast<const CT*>(s.reflect.data_ptr());
    sub.u = s.u.data_ptr<float>();
  }
  if (s.mask.defined()) {
    sub.mask = s.mask.data_ptr<float>();
    sub.mask_stride_b = s.mask_stride_b;
  }
  return sub;
}

// HYPERDAS_FAST_CUDA_SOFT: "" (the default rule below), "fused", or a projected variant:
//   "projected"          k-space steps as ATen ops (csrc/common/interchange_projected.h);
//   "projected_kernels"  k-space steps as the kernels of projected_kspace.cuh, output by
//                        cuBLAS (base + block(e) RV^T);
//   "projected_apply"    the same kernels, output by the fused path's apply kernel (one pass
//                        over base, where addmm first copies base into its result).
static std::string soft_path_override() {
  const char* env = std::getenv("HYPERDAS_FAST_CUDA_SOFT");
  std::string value = env ? env : "";
  TORCH_CHECK(value.empty() || value == "fused" || value == "projected" || value == "projected_kernels" ||
                  value == "projected_apply",
              "HYPERDAS_FAST_CUDA_SOFT must be 'fused', 'projected', 'projected_kernels' or 'projected_apply', "
              "got '", value, "'");
  return value;
}

enum class SoftPath { Fused, ProjectedAten, ProjectedKernels, ProjectedApply };

// The k-space kernels take fp32 / fp16 / bf16 and k up to kspace::kMaxK, and do not produce
// coords: a forward asked for coords (with_coords) runs the ATen k-space steps. (The cuda
// backend's Python entry, hyperdas_fast/ops/cuda.py, never asks for them.)
static_assert(hk::kspace::kMaxK <= hk::kMaxFusedK, "the apply kernel must take every k the k-space kernels take");

// Which soft path a call takes. Every projected path needs the batch to fit in RV's extra
// columns. The default rule, from the paths forced side by side on an H200 (bf16,
// benchmarks/results/ops_h200_600b5a3.json, graph replay; eager host time in brackets):
// - backward: the k-space kernels at every benchmarked shape. Forward+backward, against the
//   fused forward + ATen backward: SmolLM2 k=16 136 us (eager 1.58 ms) vs 205 us (2.11 ms);
//   Llama-3-8B B=8 T=32 206 vs 287 us; B=32 T=128 494 vs 964 us (and 562 for the ATen
//   projected path).
// - forward: the k-space kernels from B*T*d = 2^22 up (B=8 T=128: 88 us vs the fused 120;
//   B=32 T=128: 147 vs the fused 344 and the ATen projected 163). Below it the fused
//   kernel: about even in GPU time (B=8 T=32 68 vs 65 us; SmolLM2 k=64 41 vs 44) and
//   cheaper on the host (eager 0.15 vs 0.24 ms and 0.12 vs 0.18 ms).
// Where the kernels cannot run (float64, k > kMaxK, coords asked for), the ATen projected
// path from B*T*d = 2^24 up, as before the kernels were measured.
static SoftPath soft_path(const std::string& force, const Tensor& base, int64_t k, bool with_coords,
                          bool backward) {
  const int64_t B = base.size(0), size = B * base.size(1) * base.size(2);
  if (!hyperdas_fast::projected::batch_fits(B, k) || force == "fused") return SoftPath::Fused;
  const bool kernels_run = fused_dtype(base) && k <= hk::kspace::kMaxK && !with_coords;
  if (force == "projected") return SoftPath::ProjectedAten;
  if (force == "projected_kernels") return kernels_run ? SoftPath::ProjectedKernels : SoftPath::ProjectedAten;
  if (force == "projected_apply") return kernels_run ? SoftPath::ProjectedApply : SoftPath::ProjectedAten;
  if (kernels_run && (backward || size >= (int64_t{1} << 22))) return SoftPath::ProjectedKernels;
  return size >= (int64_t{1} << 24) ? SoftPath::ProjectedAten : SoftPath::Fused;
}

static_assert(hk::kspace::kMaxK == hyperdas_fast::projected::kKspaceMaxK,
              "interchange_projected.h's cuda_keeps_projections must know the kernels' largest k");

struct KspaceInputs {
  Tensor RV, PS, PB, w, u, m;
  Tensor kept;  // [P_S; P_B (; RV)] in one buffer, when the caller keeps them for the backward
  int64_t mask_stride_b = 0;
};

// P_S = source RV, P_B = base RV (base's dtype, as the ATen path's GEMMs), u = R^T v and the
// mask in fp32, the weights contiguous. With `kept` (the training forward's third output,
// projected::kept_rows) P_S, P_B and RV are views of it rather than computed; with keep, they
// are computed into one buffer (in.kept) for the backward.
static KspaceInputs kspace_inputs(const Tensor& base, const Tensor& source, const Tensor& weights, const Tensor& R,
                                  const std::optional<Tensor>& reflect, const std::optional<Tensor>& mask,
                                  const std::optional<Tensor>& kept = std::nullopt, bool keep = false) {
  namespace pj = hyperdas_fast::projected;
  const int64_t B = base.size(0), T = base.size(1), d = base.size(2), S = source.size(1);
  const int64_t Kc = R.size(1) + (reflect.has_value() ? B : 0);
  const int64_t rows = pj::kept_rows(B, S, T, d, reflect.has_value());
  KspaceInputs in;
  if (kept.has_value()) {
    TORCH_CHECK(kept->dim() == 2 && kept->size(0) == rows && kept->size(1) == Kc && kept->is_contiguous() &&
                    kept->scalar_type() == base.scalar_type() && kept->device() == base.device(),
                "interchange_bwd (cuda): saved (the training forward's projections [P_S; P_B",
                reflect.has_value() ? "; RV" : "", "]) must be a contiguous [", rows, ", ", Kc, "] ",
                base.scalar_type(), " tensor on ", base.device(), ", got ", kept->sizes(), " ",
                kept->scalar_type(), " on ", kept->device());
    in.PS = kept->narrow(0, 0, B * S);
    in.PB = kept->narrow(0, B * S, B * T);
    in.RV = reflect.has_value() ? kept->narrow(0, B * S + B * T, d) : R;
  } else if (keep) {
    in.kept = at::empty({rows, Kc}, base.options());
    in.RV = reflect.has_value() ? pj::rv_of(R, reflect, in.kept.narrow(0, B * S + B * T, d)) : R;
    in.PS = in.kept.narrow(0, 0, B * S);
    in.PB = in.kept.narrow(0, B * S, B * T);
    at::mm_out(in.PS, source.reshape({B * S, d}), in.RV);
    at::mm_out(in.PB, base.reshape({B * T, d}), in.RV);
  } else {
    in.RV = pj::rv_of(R, reflect);
    in.PS = at::mm(source.reshape({-1, source.size(2)}), in.RV);
    in.PB = at::mm(base.reshape({-1, base.size(2)}), in.RV);
  }
  // the kernels index P rows as row * Kc
  TORCH_INTERNAL_ASSERT(in.PS.is_contiguous() && in.PB.is_contiguous(), "projected: P_S / P_B not contiguous");
  in.w = weights.to(base.scalar_type()).contiguous();
  if (reflect.has_value()) in.u = hyperdas_fast::projected::reflect_u(*reflect, R).contiguous();
  if (mask.has_value()) {
    in.m = mask->to(at::kFloat).contiguous();
    in.mask_stride_b = mask->dim() == 2 ? R.size(1) : 0;
  }
  return in;
}

template <typename CT>
const CT* cptr(const Tensor& t) {
  return t.defined() ? reinterpret_cast<const CT*>(t.data_ptr()) : nullptr;
}
static const float* fptr(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// The forward from kspace_inputs' in (base and source contiguous).
static Tensor kspace_forward_cuda(const Tensor& base, const Tensor& source, const Tensor& R,
                                  const std::optional<Tensor>& reflect, const KspaceInputs& in, bool apply_output) {
  const int64_t B = base.size(0), T = base.size(1), d = base.size(2), k = R.size(1);
  const int Kc = (int)in.RV.size(1);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  hk::Dims dims;
  dims.B = B;
  dims.T = T;
  dims.d = d;
  dims.S = source.size(1);
  dims.k = k;
  Tensor E, ws, out;
  int64_t rows_pad = 0;
  int KP = 0;
  if (apply_output) {
    hk::soft_apply_layout(dims, &rows_pad, &KP);
    ws = at::empty({B * rows_pad * (KP + 1)}, base.options().dtype(at::kFloat));
  } else {
    E = at::empty({B * T, Kc}, base.options());
  }
  dispatch_fused(base.scalar_type(), [&](auto tag) {
    using CT = decltype(tag);
    hk::kspace::ForwardParams<CT> p;
    p.ps = cptr<CT>(in.PS);
    p.pb = cptr<CT>(in.PB);
    p.weights = cptr<CT>(in.w);
    p.u = fptr(in.u);
    p.mask = fptr(in.m);
    p.mask_stride_b = in.mask_stride_b;
    p.B = B;
    p.T = T;
    p.S = dims.S;
    p.k = (int)k;
    p.Kc = Kc;
    if (apply_output) {
      p.e = ws.data_ptr<float>();
      p.eu = p.e + B * rows_pad * KP;
      p.rows_pad = rows_pad;
      p.KP = KP;
    } else {
      p.block = reinterpret_cast<CT*>(E.data_ptr());
    }
    C10_CUDA_CHECK(hk::kspace::launch_forward<CT>(p, stream));
    if (apply_output) {
      out = at::empty_like(base, at::MemoryFormat::Contiguous);
      SubspaceTensors st;  // the apply kernel reads R and v (u.e comes from the k-space kernel)
      st.basis = R.to(base.scalar_type()).contiguous();
      if (reflect.has_value()) {
        st.reflect = reflect->to(base.scalar_type()).contiguous();
        st.u = in.u;
      }
      C10_CUDA_CHECK(hk::launch_soft_apply<CT>(cptr<CT>(base), reinterpret_cast<CT*>(out.data_ptr()),
                                               view_subspace<CT>(st), p.e, p.eu, dims, num_sms(), stream));
    }
  });
  if (!apply_output) out = at::addmm(base.reshape({B * T, d}), E, in.RV.t()).view({B, T, d});
  return out;
}

static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> kspace_backward_cuda(
    const Tensor& g, const Tensor& base, const Tensor& source, const Tensor& weights, const Tensor& R,
    const std::optional<Tensor>& reflect, const std::optional<Tensor>& mask, const std::optional<Tensor>& kept) {
  const int64_t B = base.size(0), T = base.size(1), S = source.size(1), k = R.size(1), N = B * T;
  KspaceInputs in = kspace_inputs(base, source, weights, R, reflect, mask, kept);
  Tensor PG = at::mm(g.reshape({N, base.size(2)}), in.RV);
  TORCH_INTERNAL_ASSERT(PG.is_contiguous(), "projected: P_G not contiguous");
  const int64_t Kc = in.RV.size(1);
  const auto f32 = base.options().dtype(at::kFloat);
  const int64_t tiles = hk::kspace::row_tiles(T);
  // Every entry of these is written by the kernels (the blocks' zero columns included).
  Tensor blocks = at::empty({2 * N + B * S, Kc}, base.options());
  Tensor gc = at::empty({N, k}, f32), gw = at::empty({B, S + 1, T}, f32);
  Tensor ugc = reflect.has_value() ? at::empty({N}, f32) : Tensor();
  Tensor y_part = reflect.has_value() ? at::empty({B, tiles, k}, f32) : Tensor();
  Tensor gmask_part = mask.has_value() ? at::empty({B, tiles, k}, f32) : Tensor();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_fused(base.scalar_type(), [&](auto tag) {
    using CT = decltype(tag);
    CT* blk = reinterpret_cast<CT*>(blocks.data_ptr());
    hk::kspace::BackwardParams<CT> p;
    p.ps = cptr<CT>(in.PS);
    p.pb = cptr<CT>(in.PB);
    p.pg = cptr<CT>(PG);
    p.weights = cptr<CT>(in.w);
    p.u = fptr(in.u);
    p.mask = fptr(in.m);
    p.mask_stride_b = in.mask_stride_b;
    p.ag = blk;                    // rows [0, N): block(e)
    p.as = blk + N * Kc;           // rows [N, N + B S): block(W_src g_c)
    p.ab = blk + (N + B * S) * Kc; // rows [N + B S, 2 N + B S): block((w_self - 1) g_c)
    p.gc = gc.data_ptr<float>();
    p.ugc = reflect.has_value() ? ugc.data_ptr<float>() : nullptr;
    p.gw = gw.data_ptr<float>();
    p.gmask_part = mask.has_value() ? gmask_part.data_ptr<float>() : nullptr;
    p.y_part = reflect.has_value() ? y_part.data_ptr<float>() : nullptr;
    p.B = B;
    p.T = T;
    p.S = S;
    p.k = (int)k;
    p.Kc = (int)Kc;
    C10_CUDA_CHECK(hk::kspace::launch_backward<CT>(p, stream));
  });
  Tensor g_mask = at::empty({0}, base.options());
  // (Summing these tile partials inside the sources kernel saved the two reductions, 6 us,
  // but made that kernel 39 -> 49 us at Llama-3-8B B=32 T=128 on an H200:
  // profile_forward_backward_h200*.json at 009a417 and 54324ce.)
  if (mask.has_value())
    g_mask = (mask->dim() == 2 ? gmask_part.sum(1) : gmask_part.sum(at::IntArrayRef{0, 1})).to(mask->scalar_type());
  std::optional<Tensor> y_sum;
  if (reflect.has_value()) y_sum = y_part.sum(1);
  auto [g_base, g_source, g_basis, g_reflect] =
      hyperdas_fast::projected::backward_gemms(g, base, source, R, reflect, in.RV, blocks, y_sum);
  return {g_base, g_source, gw.to(weights.scalar_type()), g_basis, g_reflect, g_mask};
}

static Tensor fused_forward(const Tensor& base_in, const Tensor& source_in, const Tensor& weights_in,
                            const std::optional<Tensor>& basis, const std::optional<Tensor>& reflect,
                            const std::optional<Tensor>& mask);

std::tuple<Tensor, Tensor> interchange_fwd_cuda(const Tensor& base_in, const Tensor& source_in,
                                                const Tensor& weights_in, const std::optional<Tensor>& basis,
                                                const std::optional<Tensor>& reflect,
                                                const std::optional<Tensor>& mask, bool with_coords) {
  check_cuda(base_in, "base");
  hyperdas_fast::checks::check_soft(base_in, source_in, weights_in, basis, reflect, mask);
  c10::cuda::CUDAGuard guard(base_in.device());
  const int64_t k = basis.has_value() ? basis->size(1) : 0;
  const std::string force = soft_path_override();  // read (and checked) on every call
  const SoftPath path = basis.has_value() ? soft_path(force, base_in, k, with_coords, false) : SoftPath::Fused;
  if (path == SoftPath::ProjectedKernels || path == SoftPath::ProjectedApply) {
    Tensor base = base_in.contiguous(), source = source_in.contiguous();
    KspaceInputs in = kspace_inputs(base, source, weights_in, *basis, reflect, mask);
    return {kspace_forward_cuda(base, source, *basis, reflect, in, path == SoftPath::ProjectedApply),
            at::empty({0}, base_in.options())};
  }
  if (path == SoftPath::ProjectedAten)
    return hyperdas_fast::projected::forward(base_in, source_in, weights_in, *basis, reflect, mask, with_coords);
  Tensor coords = (with_coords && basis.has_value())
                      ? coords_aten(base_in, source_in, weights_in, *basis, reflect)
                      : at::empty({0}, base_in.options());
  if (!fused_dtype(base_in) || k > hk::kMaxFusedK)
    return {fwd_aten(base_in, source_in, weights_in, basis, reflect, mask), coords};
  return {fused_forward(base_in, source_in, weights_in, basis, reflect, mask), coords};
}

// The fused soft forward kernel (fp32 / fp16 / bf16, k <= kMaxFusedK).
static Tensor fused_forward(const Tensor& base_in, const Tensor& source_in, const Tensor& weights_in,
                            const std::optional<Tensor>& basis, const std::optional<Tensor>& reflect,
                            const std::optional<Tensor>& mask) {
  const int64_t k = basis.has_value() ? basis->size(1) : 0;
  Tensor base = base_in.contiguous(), source = source_in.contiguous(), weights = weights_in.contiguous();
  SubspaceTensors st = prepare_subspace(basis, reflect, mask);
  hk::Dims dims;
  dims.B = base.size(0);
  dims.T = base.size(1);
  dims.d = base.size(2);
  dims.S = source.size(1);
  dims.k = k;
  Tensor out = at::empty_like(base, at::MemoryFormat::Contiguous);
  const int sms = num_sms();
  const size_t ws_floats = hk::soft_forward_workspace_floats(dims, sms);
  Tensor ws = at::empty({(int64_t)std::max<size_t>(ws_floats, 1)}, base.options().dtype(at::kFloat));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_fused(base.scalar_type(), [&](auto tag) {
    using CT = decltype(tag);
    C10_CUDA_CHECK(hk::launch_soft_forward<CT>(
        reinterpret_cast<const CT*>(base.data_ptr()), reinterpret_cast<const CT*>(source.data_ptr()),
        reinterpret_cast<const CT*>(weights.data_ptr()), view_subspace<CT>(st),
        reinterpret_cast<CT*>(out.data_ptr()), ws.data_ptr<float>(), dims, sms, stream));
  });
  return out;
}

// The forward when a gradient will be needed, where projected::cuda_keeps_projections holds
// (the C++ autograd asks before calling): (out, empty coords, kept), kept = [P_S; P_B (; RV)]
// ([kept_rows, Kc], base's dtype) for the backward's k-space kernels, which then project only
// the gradient. The output comes from the k-space forward kernel at every size (the apply
// kernel under HYPERDAS_FAST_CUDA_SOFT=projected_apply): with the projections made anyway,
// it is cheaper than the fused kernel, which interchange_fwd picks below B*T*d = 2^22. Forced
// side by side on an H200 (bf16, forward+backward, graph replay; eager in brackets), this
// path against the default of then (fused forward, projections in the training forward):
// SmolLM2 k=16 87 us (0.96 ms) vs 102 (1.08), k=64 92 (0.92) vs 109 (1.02), Llama-3-8B B=8
// T=32 142 (0.89) vs 179 (0.89) (benchmarks/results/ops_h200_6cbce29.json, cuda and
// cuda:projected_kernels rows); equal from 2^22 up, where both were this path.
std::tuple<Tensor, Tensor, Tensor> interchange_fwd_train_cuda(const Tensor& base_in, const Tensor& source_in,
                                                              const Tensor& weights, const Tensor& basis,
                                                              const std::optional<Tensor>& reflect,
                                                              const std::optional<Tensor>& mask) {
  check_cuda(base_in, "base");
  hyperdas_fast::checks::check_soft(base_in, source_in, weights, basis, reflect, mask);
  c10::cuda::CUDAGuard guard(base_in.device());
  const int64_t k = basis.size(1);
  const std::string force = soft_path_override();
  TORCH_CHECK(hyperdas_fast::projected::cuda_keeps_projections(base_in, k, force),
              "interchange_fwd_train (cuda): keeps projections only for fp32/fp16/bf16, k <= ",
              hyperdas_fast::projected::kKspaceMaxK, " and a batch that fits (B <= max(64, 2k)), got ",
              base_in.scalar_type(), ", k = ", k, ", B = ", base_in.size(0), ", HYPERDAS_FAST_CUDA_SOFT='", force,
              "' (not 'fused' or 'projected')");
  Tensor base = base_in.contiguous(), source = source_in.contiguous();
  KspaceInputs in = kspace_inputs(base, source, weights, basis, reflect, mask, std::nullopt, /*keep=*/true);
  Tensor out = kspace_forward_cuda(base, source, basis, reflect, in, force == "projected_apply");
  return {out, at::empty({0}, base_in.options()), in.kept};
}

// ----------------------------------------------------------------------------------------
// Rows (hard mode), in place on base
// ----------------------------------------------------------------------------------------

void interchange_rows_cuda_(const Tensor& base, const Tensor& source_in, const Tensor& batch_index,
                            const Tensor& base_pos, const Tensor& source_pos, const std::optional<Tensor>& basis,
                            const std::optional<Tensor>& reflect, const std::optional<Tensor>& mask) {
  check_cuda(base, "base");
  hyperdas_fast::checks::check_states(base, source_in);
  hyperdas_fast::checks::check_subspace(base, basis, reflect, mask);
  // Shapes only: the index values (range, one entry per base row) are checked on the host by
  // the Python API (hyperdas_fast/ops/__init__.py) before it calls this op; checking them
  // here would sync the GPU on every call.
  hyperdas_fast::checks::check_row_indices(base, batch_index, base_pos, source_pos);
  TORCH_CHECK(base.is_contiguous(), "interchange_rows_ (cuda): base must be contiguous, got strides ",
              base.strides());
  c10::cuda::CUDAGuard guard(base.device());
  const int64_t P = batch_index.numel();
  if (P == 0) return;
  Tensor bidx = batch_index.to(at::kLong).contiguous();
  Tensor tpos = base_pos.to(at::kLong).contiguous();
  Tensor spos = source_pos.to(at::kLong).contiguous();
  const int64_t k = basis.has_value() ? basis->size(1) : 0;
  if (!fused_dtype(base) || k > hk::kMaxFusedK) {
    Tensor x = base.index({bidx, tpos});
    Tensor y = source_in.index({bidx, spos});
    if (basis.has_value()) {
      std::optional<Tensor> rv = reflect.has_value() ? std::optional<Tensor>(reflect->index({bidx})) : std::nullopt;
      std::optional<Tensor> rm = (mask.has_value() && mask->dim() == 2)
                                     ? std::optional<Tensor>(mask->index({bidx}))
                                     : mask;
      y = x + subspace_project((y - x).unsqueeze(1), *basis, rv, rm).squeeze(1);
    }
    base.index_put_({bidx, tpos}, y.to(base.scalar_type()));
    return;
  }
  // A source that shares memory with base is read from a copy (the rows kernels write rows
  // that other blocks may still read).
  Tensor source = source_in.is_alias_of(base) ? source_in.clone(at::MemoryFormat::Contiguous)
                                              : source_in.contiguous();
  SubspaceTensors st = prepare_subspace(basis, reflect, mask);
  hk::Dims dims;
  dims.B = base.size(0);
  dims.T = base.size(1);
  dims.d = base.size(2);
  dims.S = source.size(1);
  dims.k = k;
  dims.P = P;
  const int sms = num_sms();
  const size_t ws_floats = hk::rows_forward_workspace_floats(dims, sms);
  Tensor ws = at::empty({(int64_t)std::max<size_t>(ws_floats, 1)}, base.options().dtype(at::kFloat));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_fused(base.scalar_type(), [&](auto tag) {
    using CT = decltype(tag);
    C10_CUDA_CHECK(hk::launch_rows_forward<CT>(
        reinterpret_cast<CT*>(base.data_ptr()), reinterpret_cast<const CT*>(source.data_ptr()),
        bidx.data_ptr<int64_t>(), tpos.data_ptr<int64_t>(), spos.data_ptr<int64_t>(), view_subspace<CT>(st),
        ws.data_ptr<float>(), dims, sms, stream));
  });
}

// ----------------------------------------------------------------------------------------
// Backward (ATen): with delta = mix - base, c = R_b^T delta, g_e = R_b^T g, e = m c,
// g_c = m g_e, u = R^T v:
//   g_delta = R g_c - 2 (u.g_c) v
//   g_base = g - (1 - w_self) g_delta;  g_source = w_src g_delta;  g_w = [source; base] . g_delta
//   g_mask = sum_t g_e c
//   g_basis = G^T E + Delta^T G_c - 2 V^T y,   y_b = sum_t (v.g) e + (v.delta) g_c
//   g_reflect = -2 [sum_t (u.e) g + sum_t (u.g_c) delta + R y]
// ----------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> interchange_bwd_cuda(
    const Tensor& grad_out, const Tensor& base_in, const Tensor& source_in, const Tensor& weights,
    const std::optional<Tensor>& basis, const std::optional<Tensor>& reflect, const std::optional<Tensor>& mask,
    const std::optional<Tensor>& coords, const std::optional<Tensor>& saved) {
  // saved: the training forward's projections (interchange_fwd_train_cuda), used by the
  // k-space path; the other paths recompute what they need.
  check_cuda(base_in, "base");
  hyperdas_fast::checks::check_soft(base_in, source_in, weights, basis, reflect, mask);
  hyperdas_fast::checks::check_grad_out(grad_out, base_in);
  c10::cuda::CUDAGuard guard(base_in.device());
  const auto dt = base_in.scalar_type();
  const std::string force = soft_path_override();  // read (and checked) on every call
  const SoftPath path =
      basis.has_value() ? soft_path(force, base_in, basis->size(1), false, true) : SoftPath::Fused;
  // projected_apply differs from projected_kernels only in the forward's output step
  if (path == SoftPath::ProjectedKernels || path == SoftPath::ProjectedApply)
    return kspace_backward_cuda(grad_out.to(dt).contiguous(), base_in.contiguous(), source_in.contiguous(),
                                weights, *basis, reflect, mask,
                                saved.has_value() && saved->numel() > 0 ? saved : std::nullopt);
  if (path == SoftPath::ProjectedAten)
    return hyperdas_fast::projected::backward(grad_out.to(dt).contiguous(), base_in.contiguous(),
                                              source_in.contiguous(), weights, *basis, reflect, mask);
  Tensor g = grad_out.to(dt).contiguous();
  Tensor base = base_in.contiguous(), source = source_in.contiguous();
  const int64_t B = base.size(0), T = base.size(1), d = base.size(2), S = source.size(1), N = B * T;
  Tensor w_src = weights.narrow(1, 0, S);   // [B, S, T]
  Tensor w_self = weights.select(1, S);     // [B, T]
  auto empty = [&] { return at::empty({0}, base.options()); };
  Tensor g_delta, g_basis = empty(), g_reflect = empty(), g_mask = empty();
  if (!basis.has_value()) {
    g_delta = g;
  } else {
    const auto f32 = at::kFloat;
    Tensor R = basis->contiguous();
    const int64_t k = R.size(1);
    Tensor delta = soft_mix(base, source, weights) - base;  // [B, T, d], dt
    // c from the forward's coords when given (already reflected), else recomputed.
    const bool have_c = coords.has_value() && coords->numel() > 0;
    if (have_c) {
      TORCH_CHECK(coords->dim() == 3 && coords->size(0) == B && coords->size(1) == T && coords->size(2) == k,
                  "interchange_bwd (cuda): coords must be [B, T, k] = [", B, ", ", T, ", ", k, "], got ",
                  coords->sizes());
    }
    Tensor c = have_c ? coords->to(f32) : at::mm(delta.view({N, d}), R).to(f32).view({B, T, k});
    Tensor ge = at::mm(g.view({N, d}), R).to(f32).view({B, T, k});
    Tensor v, vf, u, vd, vg;
    if (reflect.has_value()) {
      v = reflect->contiguous();
      vf = v.to(f32);
      u = at::mm(vf, R.to(f32));                        // [B, k]
      vd = at::bmm(delta, v.unsqueeze(-1)).to(f32);     // [B, T, 1]
      vg = at::bmm(g, v.unsqueeze(-1)).to(f32);
      if (!have_c) c = c - 2.0 * vd * u.unsqueeze(1);
      ge = ge - 2.0 * vg * u.unsqueeze(1);
    }
    Tensor e = c, gc = ge;
    if (mask.has_value()) {
      Tensor mf = mask->to(f32);
      Tensor mb = mask->dim() == 2 ? mf.unsqueeze(1) : mf;
      Tensor prod = ge * c;
      g_mask = (mask->dim() == 2 ? prod.sum(1) : prod.sum(at::IntArrayRef{0, 1})).to(mask->scalar_type());
      e = c * mb;
      gc = ge * mb;
    }
    Tensor gc_dt = gc.to(dt);
    g_delta = at::matmul(gc_dt, R.t());  // [B, T, d]
    Tensor gb = at::mm(g.view({N, d}).t(), e.to(dt).view({N, k})).to(f32) +
                at::mm(delta.view({N, d}).t(), gc_dt.view({N, k})).to(f32);
    if (reflect.has_value()) {
      Tensor uu = u.unsqueeze(1);
      Tensor ugc = (gc * uu).sum(-1, /*keepdim=*/true);  // [B, T, 1]
      Tensor ue = (e * uu).sum(-1, /*keepdim=*/true);
      g_delta = g_delta - (2.0 * ugc).to(dt) * v.unsqueeze(1);
      Tensor y = (vg * e + vd * gc).sum(1);  // [B, k]
      gb = gb - 2.0 * at::mm(vf.t(), y);
      g_reflect = (-2.0 * (at::bmm(ue.transpose(1, 2).to(dt), g).squeeze(1).to(f32) +
                           at::bmm(ugc.transpose(1, 2).to(dt), delta).squeeze(1).to(f32) +
                           at::mm(y, R.to(f32).t())))
                      .to(reflect->scalar_type());
    }
    // In the basis's own memory layout (a QR factor is column-major), as the CPU kernel and the fake kernel return it.
    g_basis = at::empty_like(*basis, at::MemoryFormat::Preserve).copy_(gb);
  }
  Tensor g_base = g - (1.0 - w_self).unsqueeze(-1) * g_delta;
  Tensor g_source = at::bmm(w_src, g_delta);
  Tensor g_w = at::cat({at::bmm(source, g_delta.transpose(1, 2)), (g_delta * base).sum(-1).unsqueeze(1)}, 1)
                   .to(weights.scalar_type());
  return {g_base, g_source, g_w, g_basis, g_reflect, g_mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(hyperdas_fast, CUDA, m) {
  m.impl("interchange_fwd", &interchange_fwd_cuda);
  m.impl("interchange_bwd", &interchange_bwd_cuda);
  m.impl("interchange_fwd_train", &interchange_fwd_train_cuda);
  m.impl("interchange_rows_", &interchange_rows_cuda_);
}

// A Python module named hyperdas_fast._C_cuda; importing it runs the registrations above.
#include <Python.h>

static struct PyModuleDef hyperdas_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda",
                                                  "CUDA kernels of hyperdas_fast (registered as torch ops)", -1,
                                                  nullptr};

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&hyperdas_cuda_module); }
