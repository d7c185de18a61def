// Shape, dtype and device checks of the interchange ops' inputs, for every device: the CPU
// kernels, the projected ops (csrc/cpu/interchange_projected.cpp) and the CUDA binding call
// them, so a raw torch.ops.hyperdas_fast call with a wrong shape fails with a message that
// names the argument instead of reading the wrong memory. (The Python API checks the same
// first, with ValueErrors: hyperdas_fast/ops/checks.py.) Nothing here reads tensor values, so
// nothing syncs a GPU.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace hyperdas_fast {
namespace checks {

inline void check_same(const at::Tensor& t, const at::Tensor& base, const char* name) {
  TORCH_CHECK(t.device() == base.device(), "hyperdas_fast: ", name, " is on ", t.device(), " but base is on ",
              base.device());
  TORCH_CHECK(t.scalar_type() == base.scalar_type(), "hyperdas_fast: ", name, " has dtype ", t.scalar_type(),
              " but base has dtype ", base.scalar_type());
}

inline void check_states(const at::Tensor& base, const at::Tensor& source) {
  TORCH_CHECK(at::isFloatingType(base.scalar_type()), "hyperdas_fast: base must be a floating tensor, got ",
              base.scalar_type());
  TORCH_CHECK(base.layout() == at::kStrided, "hyperdas_fast: base must be a dense (strided) tensor, got layout ",
              base.layout());
  TORCH_CHECK(base.dim() == 3, "hyperdas_fast: base must be [B, T, d], got ", base.sizes());
  check_same(source, base, "source");
  TORCH_CHECK(source.layout() == at::kStrided, "hyperdas_fast: source must be a dense (strided) tensor, got layout ",
              source.layout());
  TORCH_CHECK(source.dim() == 3 && source.size(0) == base.size(0) && source.size(2) == base.size(2),
              "hyperdas_fast: source must be [B, S, d] with base ", base.sizes(), ", got ", source.sizes());
  TORCH_CHECK(source.size(1) >= 1, "hyperdas_fast: source must have S >= 1 tokens");
}

inline void check_subspace(const at::Tensor& base, const std::optional<at::Tensor>& basis,
                           const std::optional<at::Tensor>& reflect, const std::optional<at::Tensor>& mask) {
  const int64_t B = base.size(0), d = base.size(2);
  if (!basis.has_value()) {
    TORCH_CHECK(!reflect.has_value() && !mask.has_value(), "hyperdas_fast: reflect and mask need a basis [d, k]");
    return;
  }
  check_same(*basis, base, "basis");
  TORCH_CHECK(basis->dim() == 2 && basis->size(0) == d && basis->size(1) >= 1 && basis->size(1) <= d,
              "hyperdas_fast: basis must be [d, k] with d = ", d, " and 1 <= k <= d, got ", basis->sizes());
  const int64_t k = basis->size(1);
  if (reflect.has_value()) {
    check_same(*reflect, base, "reflect");
    TORCH_CHECK(reflect->dim() == 2 && reflect->size(0) == B && reflect->size(1) == d,
                "hyperdas_fast: reflect must be [B, d] = [", B, ", ", d, "], got ", reflect->sizes());
  }
  if (mask.has_value()) {
    check_same(*mask, base, "mask");
    const bool ok = (mask->dim() == 2 && mask->size(0) == B && mask->size(1) == k) ||
                    (mask->dim() == 1 && mask->size(0) == k);
    TORCH_CHECK(ok, "hyperdas_fast: mask must be [B, k] = [", B, ", ", k, "] or [k], got ", mask->sizes());
  }
}

inline void check_soft(const at::Tensor& base, const at::Tensor& source, const at::Tensor& weights,
                       const std::optional<at::Tensor>& basis, const std::optional<at::Tensor>& reflect,
                       const std::optional<at::Tensor>& mask) {
  check_states(base, source);
  check_same(weights, base, "weights");
  TORCH_CHECK(weights.dim() == 3 && weights.size(0) == base.size(0) && weights.size(1) == source.size(1) + 1 &&
                  weights.size(2) == base.size(1),
              "hyperdas_fast: weights must be [B, S+1, T] = [", base.size(0), ", ", source.size(1) + 1, ", ",
              base.size(1), "], got ", weights.sizes());
  check_subspace(base, basis, reflect, mask);
}

inline void check_grad_out(const at::Tensor& grad_out, const at::Tensor& base) {
  TORCH_CHECK(grad_out.sizes() == base.sizes(), "hyperdas_fast: grad_out must have base's shape ", base.sizes(),
              ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.device() == base.device(), "hyperdas_fast: grad_out is on ", grad_out.device(),
              " but base is on ", base.device());
}

// The rows form's index tensors: [P] integer tensors on base's device (their values are
// checked where they are read on the host: the CPU op, and the Python API for CUDA).
inline void check_row_indices(const at::Tensor& base, const at::Tensor& batch_index, const at::Tensor& base_pos,
                              const at::Tensor& source_pos) {
  const int64_t P = batch_index.numel();
  for (const at::Tensor* idx : {&batch_index, &base_pos, &source_pos}) {
    TORCH_CHECK(idx->dim() == 1 && idx->numel() == P && idx->device() == base.device() &&
                    (idx->scalar_type() == at::kLong || idx->scalar_type() == at::kInt),
                "hyperdas_fast: batch_index, base_pos and source_pos must be [P] integer tensors on base's device (",
                base.device(), "), got ", batch_index.sizes(), ", ", base_pos.sizes(), ", ", source_pos.sizes());
  }
}

}  // namespace checks
}  // namespace hyperdas_fast
