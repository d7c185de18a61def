// The soft interchange as a few large GEMMs ("projected" formulation), in ATen only, so the
// same code runs on any device: the CUDA extension uses it for large inputs (cuBLAS does the
// heavy lifting), and the CPU extension registers it as interchange_{fwd,bwd}_projected so
// the tests run this exact code without a GPU.
//
// Why it is cheaper: the mix is never formed in d dimensions. Projection commutes with the
// mix, so with RV = [R | v_1 .. v_B] ([d, k+B]; just R without reflect):
//   P_S = source RV [B,S,k+B],  P_B = base RV [B,T,k+B]              (two GEMMs over d)
//   R^T delta_t = sum_s w[s,t] R^T source_s + (w_self - 1) R^T base_t  (in k dimensions)
//   v_b.delta_t likewise from column k+b of P_S and P_B
//   c = R^T delta - 2 (v.delta) u,  u = R^T v;   e = m c
//   out = base + R e - 2 (u.e) v = base + [e | E_v] RV^T               (one GEMM, beta = 1)
// where E_v [N, B] holds -2 (u.e_t) in column b of batch b's rows (zero elsewhere), so the
// rank-one reflection terms ride along in the same GEMMs. Bytes: source and base read once,
// base read and out written once; no [B,T,d] temporary.
//
// The backward uses the same trick: g_delta = R_b g_c never exists in d dimensions either:
//   g_base   = g + (w_self - 1) R_b g_c           = addmm(g, [(w_self-1) g_c | ..], RV^T)
//   g_source = R_b (W_src g_c)                    = [W_src g_c | ..] RV^T
//   g_w[s,t] = g_c,t . (R_b^T source_s),  g_w[S,t] = g_c,t . (R_b^T base_t)   (k dimensions)
//   g_R      = g^T e + source^T (W_src g_c) + base^T ((w_self-1) g_c) - 2 V^T y
//   g_v      = -2 [sum_t (u.e) g + sum_t (u.g_c) delta + R y],  y_b = sum_t (v.g) e + (v.delta) g_c
// The d-sized sums over t in g_v are the extra columns of the three g_R GEMMs.
//
// RV has k + B columns, so these GEMMs do (k+B)/k times the work of R alone: callers use
// this formulation only while B is small next to k (use_projected below).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <tuple>

namespace hyperdas_fast {
namespace projected {

using at::Tensor;

// Batch sizes up to this many columns ride in RV (see the note above).
inline bool batch_fits(int64_t B, int64_t k) { return B <= std::max<int64_t>(64, 2 * k); }

inline at::ScalarType compute_type(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

// [d, k] or [d, k + B] = [R | V^T], in R's dtype.
inline Tensor rv_of(const Tensor& R, const std::optional<Tensor>& v) {
  return v.has_value() ? at::cat({R, v->t().to(R.scalar_type())}, 1) : R;
}

// P [B, X, k + B] -> [B, X]: column k + b of batch b.
inline Tensor diag_cols(const Tensor& P, int64_t k) {
  const int64_t B = P.size(0);
  return P.narrow(2, k, B).diagonal(0, 0, 2).t();
}

// [k_part | vals placed at column b of batch b] : [B, X, k] , [B, X] -> [B, X, k + B]
inline Tensor block_cols(const Tensor& k_part, const Tensor& vals) {
  const int64_t B = vals.size(0);
  Tensor eye = at::eye(B, vals.options());
  return at::cat({k_part, vals.unsqueeze(-1) * eye.unsqueeze(1)}, -1);
}

// What the passes need from P_S, P_B: c (reflected coords, before the mask), u, v.delta,
// v.source, v.base, and for the backward (with_sides) c_S = R_b^T source, c_B = R_b^T base;
// all in the compute dtype. (The forward skips c_S, c_B: each launch counts in eager calls.)
struct Projections {
  Tensor c, cS, cB, u, vd, sv, bv, w_src, wm1;
};

inline Projections project(const Tensor& base, const Tensor& source, const Tensor& weights, const Tensor& R,
                           const std::optional<Tensor>& reflect, const Tensor& RV, bool with_sides) {
  const int64_t B = base.size(0), T = base.size(1), d = base.size(2), S = source.size(1), k = R.size(1);
  const auto cdt = compute_type(base.scalar_type());
  Projections p;
  Tensor PS = at::mm(source.reshape({B * S, d}), RV).view({B, S, -1}).to(cdt);
  Tensor PB = at::mm(base.reshape({B * T, d}), RV).view({B, T, -1}).to(cdt);
  p.w_src = weights.narrow(1, 0, S).to(cdt);           // [B, S, T]
  p.wm1 = weights.select(1, S).to(cdt) - 1.0;          // [B, T]
  p.cS = PS.narrow(2, 0, k);
  p.cB = PB.narrow(2, 0, k);
  p.c = at::baddbmm(p.wm1.unsqueeze(-1) * p.cB, p.w_src.transpose(1, 2), p.cS);  // R^T delta
  if (reflect.has_value()) {
    p.u = at::mm(reflect->to(cdt), R.to(cdt));         // [B, k]
    p.sv = diag_cols(PS, k);                           // [B, S]
    p.bv = diag_cols(PB, k);                           // [B, T]
    p.vd = at::bmm(p.w_src.transpose(1, 2), p.sv.unsqueeze(-1)).squeeze(-1) + p.wm1 * p.bv;  // [B, T]
    Tensor u1 = p.u.unsqueeze(1);
    p.c = p.c - 2.0 * p.vd.unsqueeze(-1) * u1;
    if (with_sides) {
      p.cS = p.cS - 2.0 * p.sv.unsqueeze(-1) * u1;
      p.cB = p.cB - 2.0 * p.bv.unsqueeze(-1) * u1;
    }
  }
  return p;
}

inline Tensor mask_factor(const Tensor& mask, at::ScalarType cdt) {
  Tensor m = mask.to(cdt);
  return mask.dim() == 2 ? m.unsqueeze(1) : m;  // [B, 1, k] or [k]
}

// (out, coords): coords = c [B, T, k] in base's dtype when with_coords, else empty.
inline std::tuple<Tensor, Tensor> forward(const Tensor& base, const Tensor& source, const Tensor& weights,
                                          const Tensor& R, const std::optional<Tensor>& reflect,
                                          const std::optional<Tensor>& mask, bool with_coords) {
  const int64_t B = base.size(0), T = base.size(1), d = base.size(2);
  const auto dt = base.scalar_type();
  const auto cdt = compute_type(dt);
  Tensor RV = rv_of(R, reflect);
  Projections p = project(base, source, weights, R, reflect, RV, /*with_sides=*/false);
  Tensor e = mask.has_value() ? p.c * mask_factor(*mask, cdt) : p.c;
  Tensor E = reflect.has_value() ? block_cols(e, -2.0 * (e * p.u.unsqueeze(1)).sum(-1)) : e;
  Tensor out = at::addmm(base.reshape({B * T, d}), E.reshape({B * T, -1}).to(dt), RV.t()).view({B, T, d});
  Tensor coords = with_coords ? p.c.to(dt) : at::empty({0}, base.options());
  return {out, coords};
}

inline std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward(
    const Tensor& g, const Tensor& base, const Tensor& source, const Tensor& weights, const Tensor& R,
    const std::optional<Tensor>& reflect, const std::optional<Tensor>& mask) {
  const int64_t B = base.size(0), T = base.size(1), d = base.size(2), S = source.size(1), k = R.size(1);
  const int64_t N = B * T;
  const auto dt = base.scalar_type();
  const auto cdt = compute_type(dt);
  Tensor RV = rv_of(R, reflect);
  const int64_t Kc = RV.size(1);
  Projections p = project(base, source, weights, R, reflect, RV, /*with_sides=*/true);
  Tensor PG = at::mm(g.reshape({N, d}), RV).view({B, T, -1}).to(cdt);
  Tensor ge = PG.narrow(2, 0, k);
  Tensor vg;
  if (reflect.has_value()) {
    vg = diag_cols(PG, k);
    ge = ge - 2.0 * vg.unsqueeze(-1) * p.u.unsqueeze(1);
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
  Tensor g_w = at::cat({at::bmm(p.cS, gc.transpose(1, 2)), (p.cB * gc).sum(-1).unsqueeze(1)}, 1)
                   .to(weights.scalar_type());
  Tensor wm1 = p.wm1.unsqueeze(-1);
  Tensor Eb, Es, Ag, As, Ab;  // GEMM operands: g_base, g_source, and the three g_R sums
  if (reflect.has_value()) {
    Tensor u1 = p.u.unsqueeze(1);
    Tensor ugc = (gc * u1).sum(-1), ue = (e * u1).sum(-1), ugs = (gs * u1).sum(-1);
    Eb = block_cols(wm1 * gc, -2.0 * p.wm1 * ugc);
    Es = block_cols(gs, -2.0 * ugs);
    Ag = block_cols(e, ue);
    As = block_cols(gs, at::bmm(p.w_src, ugc.unsqueeze(-1)).squeeze(-1));
    Ab = block_cols(wm1 * gc, p.wm1 * ugc);
  } else {
    Eb = wm1 * gc;
    Es = gs;
    Ag = e;
    As = gs;
    Ab = Eb;
  }
  Tensor g_base = at::addmm(g.reshape({N, d}), Eb.reshape({N, Kc}).to(dt), RV.t()).view({B, T, d});
  Tensor g_source = at::mm(Es.reshape({B * S, Kc}).to(dt), RV.t()).view({B, S, d});
  Tensor GR = at::mm(g.reshape({N, d}).t(), Ag.reshape({N, Kc}).to(dt)).to(cdt);
  GR.add_(at::mm(source.reshape({B * S, d}).t(), As.reshape({B * S, Kc}).to(dt)).to(cdt));
  GR.add_(at::mm(base.reshape({N, d}).t(), Ab.reshape({N, Kc}).to(dt)).to(cdt));
  Tensor g_basis_c = GR.narrow(1, 0, k);
  Tensor g_reflect = at::empty({0}, base.options());
  if (reflect.has_value()) {
    Tensor y = (vg.unsqueeze(-1) * e + p.vd.unsqueeze(-1) * gc).sum(1);  // [B, k]
    g_basis_c = g_basis_c - 2.0 * at::mm(reflect->to(cdt).t(), y);
    // contiguous, as interchange_bwd's fake kernel promises (GR's columns are transposed here)
    g_reflect = (-2.0 * (GR.narrow(1, k, B).t() + at::mm(y, R.to(cdt).t())))
                    .to(reflect->scalar_type())
                    .contiguous();
  }
  // In the basis's own memory layout (a QR factor is column-major), as the fake kernel says.
  Tensor g_basis = at::empty_like(R, at::MemoryFormat::Preserve).copy_(g_basis_c);
  return {g_base, g_source, g_w, g_basis, g_reflect, g_mask};
}

}  // namespace projected
}  // namespace hyperdas_fast
