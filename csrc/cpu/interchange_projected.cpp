// The projected (few-GEMM) formulation of the soft interchange, csrc/common/interchange_projected.h,
// registered as its own ops for every device (CompositeExplicitAutograd: ATen calls only):
//   interchange_fwd_projected(base, source, weights, basis, reflect?, mask?, with_coords=False) -> (out, coords)
//   interchange_bwd_projected(grad_out, base, source, weights, basis, reflect?, mask?) -> 6 gradients
// The CUDA backend calls the same header for large inputs; these ops let the tests check
// that exact code on the CPU, and let benchmarks time it on any device. No autograd: they
// are the two halves of one.
#include <torch/library.h>

#include "../common/input_checks.h"
#include "../common/interchange_projected.h"

namespace {

using at::Tensor;

void check_inputs(const Tensor& base, const Tensor& source, const Tensor& weights, const Tensor& basis,
                  const std::optional<Tensor>& reflect, const std::optional<Tensor>& mask, const char* op) {
  hyperdas_fast::checks::check_soft(base, source, weights, basis, reflect, mask);
  TORCH_CHECK(hyperdas_fast::projected::batch_fits(base.size(0), basis.size(1)), op, ": batch ", base.size(0),
              " is too large for k = ", basis.size(1), " (at most max(64, 2k) examples)");
}

std::tuple<Tensor, Tensor> fwd_projected(const Tensor& base, const Tensor& source, const Tensor& weights,
                                         const Tensor& basis, const std::optional<Tensor>& reflect,
                                         const std::optional<Tensor>& mask, bool with_coords) {
  check_inputs(base, source, weights, basis, reflect, mask, "interchange_fwd_projected");
  return hyperdas_fast::projected::forward(base, source, weights, basis, reflect, mask, with_coords);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bwd_projected(
    const Tensor& grad_out, const Tensor& base, const Tensor& source, const Tensor& weights, const Tensor& basis,
    const std::optional<Tensor>& reflect, const std::optional<Tensor>& mask) {
  check_inputs(base, source, weights, basis, reflect, mask, "interchange_bwd_projected");
  hyperdas_fast::checks::check_grad_out(grad_out, base);
  return hyperdas_fast::projected::backward(grad_out.to(base.scalar_type()), base, source, weights, basis,
                                            reflect, mask);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hyperdas_fast, m) {
  m.def(
      "interchange_fwd_projected(Tensor base, Tensor source, Tensor weights, Tensor basis, Tensor? reflect, "
      "Tensor? mask, bool with_coords=False) -> (Tensor, Tensor)");
  m.def(
      "interchange_bwd_projected(Tensor grad_out, Tensor base, Tensor source, Tensor weights, Tensor basis, "
      "Tensor? reflect, Tensor? mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hyperdas_fast, CompositeExplicitAutograd, m) {
  m.impl("interchange_fwd_projected", &fwd_projected);
  m.impl("interchange_bwd_projected", &bwd_projected);
}
