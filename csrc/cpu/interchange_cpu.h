// C++ CPU kernels of the fused interchange intervention (see ../../hyperdas_fast/ops/reference.py).
//
// Shapes: base [B,T,d], source [B,S,d], weights [B,S+1,T] (row S = [SELF]), basis R [d,k],
// reflect v [B,d], mask m [B,k] or [k]. Per example R_b = (I - 2 v v^T) R is never built.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace hyperdas_fast {
namespace cpu {

// out = base + R_b diag(m_b) R_b^T (mix - base), mix = w^T [source; base]; basis None: out = mix.
// Returns (out, coords): with with_coords and a basis, coords = R_b^T (mix - base) [B, T, k]
// (before the mask), which interchange_bwd can reuse; otherwise an empty tensor.
std::tuple<at::Tensor, at::Tensor> interchange_fwd(
    const at::Tensor& base,
    const at::Tensor& source,
    const at::Tensor& weights,
    const std::optional<at::Tensor>& basis,
    const std::optional<at::Tensor>& reflect,
    const std::optional<at::Tensor>& mask,
    bool with_coords);

// The forward for training: (out, coords, delta) with delta = mix - base [B, T, d], which
// interchange_bwd reuses instead of recomputing the mix (reduced precision: coords and delta
// are empty, and the backward recomputes them in float).
std::tuple<at::Tensor, at::Tensor, at::Tensor> interchange_fwd_train(
    const at::Tensor& base,
    const at::Tensor& source,
    const at::Tensor& weights,
    const at::Tensor& basis,
    const std::optional<at::Tensor>& reflect,
    const std::optional<at::Tensor>& mask);

// Gradients of base, source, weights, basis, reflect, mask; an empty tensor for a None input.
// coords: the forward's coords (saves one [B*T, d] x [d, k] GEMM), or None / empty: recomputed.
// delta: the forward's mix - base (saves the mix's batched GEMM), or None / empty: recomputed.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> interchange_bwd(
    const at::Tensor& grad_out,
    const at::Tensor& base,
    const at::Tensor& source,
    const at::Tensor& weights,
    const std::optional<at::Tensor>& basis,
    const std::optional<at::Tensor>& reflect,
    const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& coords,
    const std::optional<at::Tensor>& delta);

// Hard mode, in place on a contiguous base: for each row p with (b, t, s) =
// (batch_index[p], base_pos[p], source_pos[p]):
//   base[b,t] = x + R_b diag(m_b) R_b^T (source[b,s] - x),  x = base[b,t]
// (basis None: base[b,t] = source[b,s]). (b, t) pairs must be unique.
void interchange_rows_(
    const at::Tensor& base,
    const at::Tensor& source,
    const at::Tensor& batch_index,
    const at::Tensor& base_pos,
    const at::Tensor& source_pos,
    const std::optional<at::Tensor>& basis,
    const std::optional<at::Tensor>& reflect,
    const std::optional<at::Tensor>& mask);

}  // namespace cpu
}  // namespace hyperdas_fast
