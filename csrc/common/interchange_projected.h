// The soft interchange as a few large GEMMs ("projected" formulation), in ATen only, so the
// same code runs on any device: the CUDA extension uses it for large inputs (cuBLAS does the
// heavy lifting), and the CPU extension registers it as interchange_{fwd,bwd}_projected so
// the tests run this exact code without a GPU. (The triton backend has the same algebra with
// its k-space steps fused into Triton kernels: hyperdas_fast/ops/triton_projected.py.)
//
// Why it is cheaper: the mix is never formed in d dimensions. Projection commutes with the
// mix, so with RV = [R | -2 v_1 .. -2 v_B] ([d, k+B]; just R without reflect):
//   P_S = source RV [B,S,k+B],  P_B = base RV [B,T,k+B]              (two GEMMs over d)
//   C   = W_src^T P_S + (w_self - 1) P_B     [B,T,k+B]: R^T delta, and -2 v_b.delta in column k+b
//   c   = R^T delta - 2 (v.delta) u = C[:k] + C[k+b] u,  u = R^T v;   e = m c
//   out = base + R e - 2 (u.e) v = base + block(e) RV^T               (one GEMM, beta = 1)
// where block(x) for a row x of batch b is [x | u.x in column k+b, zeros elsewhere], so the
// rank-one reflection terms ride along in the same GEMMs. Bytes: source and base read once,
// base read and out written once; no [B,T,d] temporary.
//
// The backward uses the same trick: g_delta = R_b g_c never exists in d dimensions either:
//   g_base   = g + (w_self - 1) R_b g_c           = addmm(g, block((w_self-1) g_c), RV^T)
//   g_source = R_b (W_src g_c)                    = block(W_src g_c) RV^T
//   g_w[s,t] = g_c,t . (R_b^T source_s),  g_w[S,t] = g_c,t . (R_b^T base_t)   (k dimensions)
//   [g_R | G_v] = g^T block(e) + source^T block(W_src g_c) + base^T block((w_self-1) g_c)
//   g_basis  = g_R - 2 V^T y,   g_v = -2 [G_v column b + R y_b],  y_b = sum_t (v.g) e + (v.delta) g_c
// (G_v column b = sum_t (u.e) g + (u.g_c) delta.) Because RV carries -2 v, the values read
// from its columns are -2 v.x, and block(.) is the same matrix in the output GEMMs (where
// the rank-one terms carry -2) and in the g_R GEMMs (where they do not).
//
// Every step is one ATen call where it can be (addcmul, baddbmm, addmm, out= variants, and
// the three block matrices in one zeroed buffer): at the sizes this runs, a GPU spends a few
// microseconds per small kernel, and the k-space work is dozens of them
// (benchmarks/count_kernels.py counts them).
//
// RV has k + B columns, so these GEMMs do (k+B)/k times the work of R alone: callers use
// this formulation only while B is small next to k (use_projected below).
#pragma once

#include <ATen/ATen.h>
#include <torch/version.h>

#include <algorithm>
#include <atomic>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

namespace hyperdas_fast {
namespace projected {

using at::Tensor;

// Batch sizes up to this many columns ride in RV (see the note above).
inline bool batch_fits(int64_t B, int64_t k) { return B <= std::max<int64_t>(64, 2 * k); }

// The CUDA k-space kernels' largest k (csrc/cuda/projected_kspace.h: kspace::kMaxK; the
// CUDA binding static_asserts they agree).
constexpr int64_t kKspaceMaxK = 256;

// Whether the CUDA backend's forward, when a gradient will be needed, keeps the projections
// for the backward (interchange_fwd_train on CUDA; the C++ autograd asks): wherever its
// backward runs the k-space kernels, which start from P_S = source RV and P_B = base RV
// (interchange_cuda.cpp: soft_path). Then the backward projects only the gradient, rather
// than source and base again (two GEMMs over d: 42 us of a 487 us forward+backward at
// Llama-3-8B B=32 T=128 bf16 on an H200, profile_forward_backward_h200_45e5f3b.json).
// Its output then comes from the k-space forward kernel at every size (interchange_cuda.cpp:
// interchange_fwd_train_cuda). `force` is HYPERDAS_FAST_CUDA_SOFT: the fused and ATen
// projected paths keep nothing.
inline bool cuda_keeps_projections(const Tensor& base, int64_t k, const std::string& force) {
  const auto s = base.scalar_type();
  return base.is_cuda() && (s == at::kFloat || s == at::kHalf || s == at::kBFloat16) && k <= kKspaceMaxK &&
         batch_fits(base.size(0), k) && force != "fused" && force != "projected";
}

// What the CUDA forward keeps: one [B*S + B*T (+ d with reflect), Kc] tensor in base's dtype,
// rows P_S = source RV, then P_B = base RV, then (with reflect) RV = [R | -2 V^T] itself
// (all have Kc = k (+ B) columns, so one buffer holds them).
inline int64_t kept_rows(int64_t B, int64_t S, int64_t T, int64_t d, bool has_v) {
  return B * S + B * T + (has_v ? d : 0);
}

inline at::ScalarType compute_type(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

// CUDA GEMMs with an out_dtype (mm.dtype, addmm.dtype(_out): bf16/fp16 operands, fp32
// products and result), in torch >= 2.8 only: the call sites that use them are compiled
// where this holds.
#define HYPERDAS_FAST_OUT_DTYPE_GEMMS \
  (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8))

// Runs f (GEMMs with an fp32 out_dtype) where both operands a, b are bf16/fp16 CUDA tensors
// of one dtype and `runs` (the call site's flag) is still set; returns whether it ran. A
// c10::Error other than out-of-memory means this build of torch lacks the overload: `runs`
// is then cleared for the process, and the caller upcasts instead, now and from then on.
template <typename F>
inline bool try_out_dtype_gemms(const Tensor& a, const Tensor& b, std::atomic<bool>& runs, F&& f) {
  const auto dt = a.scalar_type();
  if (!a.is_cuda() || dt != b.scalar_type() || (dt != at::kBFloat16 && dt != at::kHalf) || !runs.load())
    return false;
  try {
    f();
    return true;
  } catch (const c10::OutOfMemoryError&) {
    throw;  // not a missing overload
  } catch (const c10::Error&) {
    runs.store(false);
    return false;
  }
}

// u = R^T v ([B, k], v = reflect [B, d]) in the compute type. For bf16/fp16 CUDA operands one
// cuBLAS call with an fp32 result (exact products and fp32 sums, as the fp32 GEMM of the
// upcast operands). The upcasts, the fp32 GEMM (6 us) and its split-K reduction (3 us) took
// four kernels at Llama-3-8B shapes on an H200 (profile_forward_h200_45e5f3b.json); the
// Triton backend made the same change (hyperdas_fast/ops/triton_kernels.py: _mm_fp32).
inline Tensor reflect_u(const Tensor& v, const Tensor& R) {
#if HYPERDAS_FAST_OUT_DTYPE_GEMMS
  static std::atomic<bool> runs{true};
  Tensor u;
  if (try_out_dtype_gemms(v, R, runs, [&] { u = at::mm(v, R, at::kFloat); })) return u;
#endif
  const auto cdt = compute_type(v.scalar_type());
  return at::mm(v.to(cdt), R.to(cdt));
}

// sum_i X_i^T A_i ([d, Kc]) in the compute type, for the backward's g_R: X_i [n_i, d] and
// A_i [n_i, Kc] in base's dtype. For bf16/fp16 CUDA operands the GEMMs accumulate into one
// fp32 result (cuBLAS's beta = 1), where rounding each GEMM's result to bf16, upcasting it
// and adding took a copy and two adds besides (about 10 us at Llama-3-8B B=32 T=128 on an
// H200: profile_forward_backward_h200_45e5f3b.json), and lost the low bits of each term.
inline Tensor gemm_sum_t(std::initializer_list<std::pair<Tensor, Tensor>> terms) {
  const Tensor& x0 = terms.begin()->first;
  const auto dt = x0.scalar_type();
  const auto cdt = compute_type(dt);
  Tensor sum;
#if HYPERDAS_FAST_OUT_DTYPE_GEMMS
  static std::atomic<bool> runs{true};
  const bool summed = try_out_dtype_gemms(x0, terms.begin()->second, runs, [&] {
    sum = at::mm(x0.t(), terms.begin()->second, at::kFloat);
    for (auto it = terms.begin() + 1; it != terms.end(); ++it)
      at::addmm_out(sum, sum, it->first.t(), it->second, at::kFloat);
  });
  if (summed) return sum;
  sum = Tensor();  // (whatever a failed try left)
#endif
  for (const auto& [x, a] : terms) {
    if (!sum.defined()) {
      sum = at::mm(x.t(), a).to(cdt);
    } else if (dt == cdt) {
      sum.addmm_(x.t(), a);  // accumulated by the GEMM
    } else {
      sum.add_(at::mm(x.t(), a));
    }
  }
  return sum;
}

// [d, k] or [d, k + B] = [R | -2 V^T], in R's dtype. Non-finite entries of V are zeroed:
// the block matrices hold zeros in the other examples' reflection columns, and 0 * inf =
// NaN would carry one example's non-finite v into every example's output and gradients.
// That example's own rows still come out non-finite, through u = R^T v (from the raw v).
inline Tensor rv_of(const Tensor& R, const std::optional<Tensor>& v, std::optional<Tensor> out = std::nullopt) {
  if (!v.has_value()) return R;
  Tensor cols = at::nan_to_num(v->t().mul(-2.0).to(R.scalar_type()), 0.0, 0.0, 0.0);
  if (out.has_value()) return at::cat_out(*out, {R, cols}, 1);  // (out: rows of a larger buffer)
  return at::cat({R, cols}, 1);
}

// P [B, X, k + B] -> [B, X]: column k + b of batch b (a view).
inline Tensor diag_cols(const Tensor& P, int64_t k) {
  const int64_t B = P.size(0);
  return P.narrow(2, k, B).diagonal(0, 0, 2).t();
}

// x [B, X, K] -> x [B*X, K] in the compute dtype (a cast only for reduced precision).
inline Tensor project(const Tensor& x, const Tensor& RV, at::ScalarType cdt) {
  const int64_t B = x.size(0);
  return at::mm(x.reshape({-1, x.size(2)}), RV).view({B, x.size(1), -1}).to(cdt);
}

// What both passes need: C (see the note; its first k columns, corrected, are c), u, and the
// weights in the compute dtype.
struct Mixed {
  Tensor C, c, u, w, w_src, w_self;
};

// C = W_src^T P_S + (w_self - 1) P_B; c = C[:k] + C[k+b] u (reflect) or C[:k].
inline Mixed mix_projected(const Tensor& PS, const Tensor& PB, const Tensor& weights, const Tensor& R,
                           const std::optional<Tensor>& reflect, at::ScalarType cdt) {
  const int64_t S = PS.size(1), k = R.size(1);
  Mixed p;
  p.w = weights.to(cdt);
  p.w_src = p.w.narrow(1, 0, S);   // [B, S, T]
  p.w_self = p.w.select(1, S);     // [B, T]
  p.C = at::baddbmm(PB * p.w_self.unsqueeze(-1), p.w_src.transpose(1, 2), PS).sub_(PB);
  if (reflect.has_value()) {
    p.u = reflect_u(*reflect, R);  // [B, k]
    p.c = at::addcmul(p.C.narrow(2, 0, k), diag_cols(p.C, k).unsqueeze(-1), p.u.unsqueeze(1));
  } else {
    p.c = p.C.narrow(2, 0, k);
  }
  return p;
}

inline Tensor mask_factor(const Tensor& mask, at::ScalarType cdt) {
  Tensor m = mask.to(cdt);
  return mask.dim() == 2 ? m.unsqueeze(1) : m;  // [B, 1, k] or [k]
}

// x [B, X, k] -> x.u [B, X] (one batched GEMV).
inline Tensor dot_u(const Tensor& x, const Tensor& u) { return at::bmm(x, u.unsqueeze(-1)).squeeze(-1); }

// Writes block(x) into dst [B, X, k + B] (zeroed beforehand): x in the first k columns, xu
// [B, X] in column k + b of batch b. dst may have another dtype (the copies cast).
inline void fill_block(Tensor dst, const Tensor& x, const std::optional<Tensor>& xu, int64_t k) {
  dst.narrow(2, 0, k).copy_(x);
  if (xu.has_value()) diag_cols(dst, k).copy_(*xu);
}

// (out, coords): coords = c [B, T, k] in base's dtype when with_coords, else empty.
inline std::tuple<Tensor, Tensor> forward(const Tensor& base, const Tensor& source, const Tensor& weights,
                                          const Tensor& R, const std::optional<Tensor>& reflect,
                                          const std::optional<Tensor>& mask, bool with_coords) {
  const int64_t B = base.size(0), T = base.size(1), d = base.size(2), k = R.size(1);
  const auto dt = base.scalar_type();
  const auto cdt = compute_type(dt);
  Tensor RV = rv_of(R, reflect);
  Mixed p = mix_projected(project(source, RV, cdt), project(base, RV, cdt), weights, R, reflect, cdt);
  Tensor e = mask.has_value() ? p.c * mask_factor(*mask, cdt) : p.c;
  Tensor E = e;
  if (reflect.has_value()) {
    E = at::zeros({B, T, RV.size(1)}, base.options());
    fill_block(E, e, dot_u(e, p.u), k);
  }
  Tensor out = at::addmm(base.reshape({B * T, d}), E.reshape({B * T, -1}).to(dt), RV.t()).view({B, T, d});
  Tensor coords = with_coords ? p.c.to(dt) : at::empty({0}, base.options());
  return {out, coords};
}

// The backward's GEMMs over d, from the k-space results (computed by ATen in backward below,
// or by the CUDA kernels of csrc/cuda/projected_kspace.cuh):
//   blocks [2 N + B S, Kc] in base's dtype: rows [0, N) block(e), [N, N + B S) block(W_src g_c),
//   [N + B S, 2 N + B S) block((w_self - 1) g_c);  y_sum [B, k] (with reflect) as in the note.
// Returns (g_base, g_source, g_basis, g_reflect).
inline std::tuple<Tensor, Tensor, Tensor, Tensor> backward_gemms(const Tensor& g, const Tensor& base,
                                                                  const Tensor& source, const Tensor& R,
                                                                  const std::optional<Tensor>& reflect,
                                                                  const Tensor& RV, const Tensor& blocks,
                                                                  const std::optional<Tensor>& y_sum) {
  const int64_t B = base.size(0), T = base.size(1), d = base.size(2), S = source.size(1), k = R.size(1);
  const int64_t N = B * T;
  const auto dt = base.scalar_type();
  const auto cdt = compute_type(dt);
  Tensor Ag = blocks.narrow(0, 0, N), As = blocks.narrow(0, N, B * S), Ab = blocks.narrow(0, N + B * S, N);
  Tensor g_base = at::addmm(g.reshape({N, d}), Ab, RV.t()).view({B, T, d});
  Tensor g_source = at::mm(As, RV.t()).view({B, S, d});
  // [g_R | G_v] in the compute dtype
  Tensor GR = gemm_sum_t({{g.reshape({N, d}), Ag}, {source.reshape({B * S, d}), As}, {base.reshape({N, d}), Ab}});
  Tensor g_basis_c = GR.narrow(1, 0, k);
  Tensor g_reflect = at::empty({0}, base.options());
  if (reflect.has_value()) {
    // g_basis = g_R - 2 V^T y and g_v = -2 G_v^T + y_sum R^T (addmm returns it contiguous, as
    // interchange_bwd's fake kernel promises). For bf16/fp16 CUDA operands: y_sum rounded to
    // their dtype, and GEMMs with fp32 results, where upcasting V and R and running fp32 GEMMs
    // took four kernels and 17 us at Llama-3-8B B=32 T=128 on an H200
    // (profile_forward_backward_h200_009a417.json); y_sum's rounding (2^-9 relative) is
    // far below the error of the same op in that dtype.
    const Tensor& v = *reflect;
    bool done = false;
#if HYPERDAS_FAST_OUT_DTYPE_GEMMS
    static std::atomic<bool> runs{true};
    Tensor gb, gv;
    done = try_out_dtype_gemms(v, R, runs, [&] {
      Tensor y_low = y_sum->to(dt);
      gb = at::addmm(g_basis_c, v.t(), y_low, at::kFloat);
      gv = at::addmm(GR.narrow(1, k, B).t(), y_low, R.t(), at::kFloat, -2.0, 1.0);
    });
    if (done) {
      g_basis_c = gb;
      g_reflect = gv.to(v.scalar_type());
    }
#endif
    if (!done) {
      g_basis_c = at::addmm(g_basis_c, v.to(cdt).t(), *y_sum);
      g_reflect = at::addmm(GR.narrow(1, k, B).t(), *y_sum, R.to(cdt).t(), -2.0, 1.0).to(v.scalar_type());
    }
  }
  // In the basis's own memory layout (a QR factor is column-major), as the fake kernel says.
  Tensor g_basis = at::empty_like(R, at::MemoryFormat::Preserve).copy_(g_basis_c);
  return {g_base, g_source, g_basis, g_reflect};
}

inline std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward(
    const Tensor& g, const Tensor& base, const Tensor& source, const Tensor& weights, const Tensor& R,
    const std::optional<Tensor>& reflect, const std::optional<Tensor>& mask) {
  const int64_t B = base.size(0), T = base.size(1), S = source.size(1), k = R.size(1);
  const int64_t N = B * T;
  const auto dt = base.scalar_type();
  const auto cdt = compute_type(dt);
  const bool has_v = reflect.has_value();
  Tensor RV = rv_of(R, reflect);
  const int64_t Kc = RV.size(1);
  Tensor PS = project(source, RV, cdt), PB = project(base, RV, cdt), PG = project(g, RV, cdt);
  Mixed p = mix_projected(PS, PB, weights, R, reflect, cdt);
  // R_b^T of g, source, base: their first k columns, corrected as c is
  Tensor ge = PG.narrow(2, 0, k), cS = PS.narrow(2, 0, k), cB = PB.narrow(2, 0, k);
  if (has_v) {
    Tensor u1 = p.u.unsqueeze(1);
    ge = at::addcmul(ge, diag_cols(PG, k).unsqueeze(-1), u1);
    cS = at::addcmul(cS, diag_cols(PS, k).unsqueeze(-1), u1);
    cB = at::addcmul(cB, diag_cols(PB, k).unsqueeze(-1), u1);
  }
  Tensor e = p.c, gc = ge, g_mask = at::empty({0}, base.options());
  if (mask.has_value()) {
    Tensor prod = ge * p.c;
    g_mask = (mask->dim() == 2 ? prod.sum(1) : prod.sum(at::IntArrayRef{0, 1})).to(mask->scalar_type());
    Tensor mb = mask_factor(*mask, cdt);
    e = p.c * mb;
    gc = ge * mb;
  }
  Tensor gs = at::bmm(p.w_src, gc);  // W_src g_c [B, S, k]
  Tensor g_w = at::empty({B, S + 1, T}, gc.options());
  Tensor g_w_src = g_w.narrow(1, 0, S), g_w_self = g_w.select(1, S);
  at::bmm_out(g_w_src, cS, gc.transpose(1, 2));
  at::sum_out(g_w_self, cB * gc, {-1});
  // block(e), block(W_src g_c), block((w_self - 1) g_c) in one zeroed buffer, in base's dtype
  Tensor blocks = at::zeros({2 * N + B * S, Kc}, base.options());
  Tensor Ag = blocks.narrow(0, 0, N), As = blocks.narrow(0, N, B * S), Ab = blocks.narrow(0, N + B * S, N);
  Tensor wm1_gc = gc * (p.w_self - 1.0).unsqueeze(-1);
  std::optional<Tensor> ue, ugs, wm1_ugc;
  if (has_v) {
    ue = dot_u(e, p.u);
    ugs = dot_u(gs, p.u);
    wm1_ugc = dot_u(wm1_gc, p.u);
  }
  fill_block(Ag.view({B, T, Kc}), e, ue, k);
  fill_block(As.view({B, S, Kc}), gs, ugs, k);
  fill_block(Ab.view({B, T, Kc}), wm1_gc, wm1_ugc, k);
  std::optional<Tensor> y_sum;
  if (has_v) {
    // y_sum = -2 y = sum_t (-2 v.g) e + (-2 v.delta) g_c: the -2 v.x values are column k+b of
    // P_G and of C
    y_sum = at::baddbmm(at::bmm(diag_cols(PG, k).unsqueeze(1), e), diag_cols(p.C, k).unsqueeze(1), gc)
                .squeeze(1);  // [B, k]
  }
  auto [g_base, g_source, g_basis, g_reflect] = backward_gemms(g, base, source, R, reflect, RV, blocks, y_sum);
  return {g_base, g_source, g_w.to(weights.scalar_type()), g_basis, g_reflect, g_mask};
}

}  // namespace projected
}  // namespace hyperdas_fast
