// Autograd of hyperdas_fast::interchange_fwd, in C++ (the Autograd dispatch key, so it serves
// the CPU and the CUDA kernels alike; it is built into hyperdas_fast._C with the schemas).
//
// Why C++: at the SmolLM2 training shape the whole fused forward+backward takes ~1-2 ms on
// a CPU, and a Python autograd.Function (torch.library.register_autograd) added ~0.3 ms of
// interpreter and pytree work to every step.
//
// The forward returns (out, coords); coords (c = R_b^T (mix - base), only with with_coords)
// is not differentiable and is saved so the backward skips one GEMM. On tensors that need a
// gradient the forward is interchange_fwd_train where the device's backward can reuse
// something of the forward, which it returns third and the backward gets as `saved`: on
// CPU (fp32/fp64) delta = mix - base, so the backward skips the mix (a batched GEMM and a
// pass over [B, T, d]); on CUDA, where the backward runs the k-space kernels
// (projected::cuda_keeps_projections), the projections [P_S; P_B (; RV)], so the backward
// skips two GEMMs over d (csrc/cuda/interchange_cuda.cpp). The backward calls
// hyperdas_fast::interchange_bwd through the dispatcher, so each device uses its own kernel
// and torch.compile traces both ops through their fake kernels (ops/library.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/InferenceMode.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "../common/interchange_projected.h"

#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

namespace hyperdas_fast {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                          const std::optional<Tensor>&, const std::optional<Tensor>&,
                                          const std::optional<Tensor>&, bool);
using FwdTrainSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                       const std::optional<Tensor>&, const std::optional<Tensor>&);
using BwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, const std::optional<Tensor>&, const std::optional<Tensor>&,
    const std::optional<Tensor>&);

std::optional<Tensor> defined_or_none(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

class InterchangeFunction : public torch::autograd::Function<InterchangeFunction> {
 public:
  // train: a gradient will be needed and the device's interchange_fwd_train keeps something
  // for the backward (see the note at the top).
  static variable_list forward(AutogradContext* ctx, const Tensor& base, const Tensor& source,
                               const Tensor& weights, const std::optional<Tensor>& basis,
                               const std::optional<Tensor>& reflect, const std::optional<Tensor>& mask,
                               bool with_coords, bool train) {
    static auto fwd = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("hyperdas_fast::interchange_fwd", "")
                          .typed<FwdSig>();
    static auto fwd_train = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("hyperdas_fast::interchange_fwd_train", "")
                                .typed<FwdTrainSig>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor out, coords, saved;
    if (train) {
      std::tie(out, coords, saved) = fwd_train.call(base, source, weights, *basis, reflect, mask);
    } else {
      std::tie(out, coords) = fwd.call(base, source, weights, basis, reflect, mask, with_coords);
    }
    // Inference tensors (hidden states computed under torch.inference_mode(), say, with a
    // basis to train) cannot be saved for backward: save copies of those.
    auto savable = [](const Tensor& t) { return t.defined() && t.is_inference() ? t.clone() : t; };
    ctx->save_for_backward({savable(base), savable(source), savable(weights), savable(basis.value_or(Tensor())),
                            savable(reflect.value_or(Tensor())), savable(mask.value_or(Tensor())), coords, saved});
    // The caller gets coords only when it asked for them (same output as the plain op).
    Tensor coords_out = (with_coords || !train) ? coords : at::empty({0}, base.options());
    ctx->mark_non_differentiable({coords_out});
    // coords gets no gradient: no zeros filled in for it on every backward.
    ctx->set_materialize_grads(false);
    return {out, coords_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("hyperdas_fast::interchange_bwd", "")
                         .typed<BwdSig>();
    const Tensor& grad_out = grad_outputs[0];
    if (!grad_out.defined()) {  // only reachable through the non-differentiable coords
      return variable_list(8);
    }
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &basis = saved[3], &reflect = saved[4], &mask = saved[5], &coords = saved[6],
                 &kept = saved[7];
    auto grads = op.call(grad_out, saved[0], saved[1], saved[2], defined_or_none(basis),
                         defined_or_none(reflect), defined_or_none(mask), defined_or_none(coords),
                         defined_or_none(kept));
    // An empty gradient (numel 0) stands for a None input; the engine drops the gradients
    // of inputs that do not require one.
    return {std::get<0>(grads),
            std::get<1>(grads),
            std::get<2>(grads),
            basis.defined() ? std::get<3>(grads) : Tensor(),
            reflect.defined() ? std::get<4>(grads) : Tensor(),
            mask.defined() ? std::get<5>(grads) : Tensor(),
            Tensor(),   // with_coords
            Tensor()};  // train
  }
};

std::tuple<Tensor, Tensor> interchange_fwd_autograd(const Tensor& base, const Tensor& source,
                                                    const Tensor& weights,
                                                    const std::optional<Tensor>& basis,
                                                    const std::optional<Tensor>& reflect,
                                                    const std::optional<Tensor>& mask, bool with_coords) {
  bool needs_grad = false;
  if (at::GradMode::is_enabled()) {
    for (const Tensor* t : {&base, &source, &weights}) needs_grad = needs_grad || t->requires_grad();
    for (const std::optional<Tensor>* t : {&basis, &reflect, &mask}) {
      needs_grad = needs_grad || (t->has_value() && (*t)->requires_grad());
    }
  }
  // CPU, fp32/fp64 only: for half types interchange_fwd_train keeps nothing (the backward
  // recomputes in float), and with_coords must still return the coords.
  const bool cpu_train = needs_grad && basis.has_value() && base.device().is_cpu() &&
                         (base.scalar_type() == at::kFloat || base.scalar_type() == at::kDouble);
  // CUDA: where the backward will run the k-space kernels (and the CUDA extension is loaded);
  // the training forward returns no coords, so not when they are asked for.
  bool cuda_train = false;
  if (needs_grad && basis.has_value() && !with_coords && base.is_cuda()) {
    static const auto fwd_train_op =
        c10::Dispatcher::singleton().findSchemaOrThrow("hyperdas_fast::interchange_fwd_train", "");
    const char* force = std::getenv("HYPERDAS_FAST_CUDA_SOFT");
    cuda_train = fwd_train_op.hasKernelForDispatchKey(c10::DispatchKey::CUDA) &&
                 projected::cuda_keeps_projections(base, basis->size(1), force ? force : "");
  }
  const bool train = cpu_train || cuda_train;
  variable_list out = InterchangeFunction::apply(base, source, weights, basis, reflect, mask, with_coords, train);
  return {out[0], out[1]};
}

// interchange_bwd under autograd: the gradients it returns are not differentiable again.
// With create_graph=True (a gradient penalty, say) its outputs get a node whose backward
// raises, instead of the dispatcher's fallback, which would treat them as constants and
// drop the second-order terms with only a warning. Building the node (AOTAutograd traces
// the backward with create_graph) is allowed; only running it is refused.
class InterchangeBwdFunction : public torch::autograd::Function<InterchangeBwdFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& grad_out, const Tensor& base,
                               const Tensor& source, const Tensor& weights, const std::optional<Tensor>& basis,
                               const std::optional<Tensor>& reflect, const std::optional<Tensor>& mask,
                               const std::optional<Tensor>& coords, const std::optional<Tensor>& delta) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("hyperdas_fast::interchange_bwd", "")
                         .typed<BwdSig>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto grads = op.call(grad_out, base, source, weights, basis, reflect, mask, coords, delta);
    return {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads),
            std::get<3>(grads), std::get<4>(grads), std::get<5>(grads)};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "hyperdas_fast: the interchange op's gradients are not differentiable (double backward, "
                "e.g. a gradient penalty, is not implemented by the cpp and cuda backends); use "
                "backend='torch' for higher-order gradients");
    return {};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> interchange_bwd_autograd(
    const Tensor& grad_out, const Tensor& base, const Tensor& source, const Tensor& weights,
    const std::optional<Tensor>& basis, const std::optional<Tensor>& reflect, const std::optional<Tensor>& mask,
    const std::optional<Tensor>& coords, const std::optional<Tensor>& delta) {
  variable_list g =
      InterchangeBwdFunction::apply(grad_out, base, source, weights, basis, reflect, mask, coords, delta);
  return {g[0], g[1], g[2], g[3], g[4], g[5]};
}

// interchange_rows_ writes into base: bump its version counter like any in-place op, so
// autograd refuses a backward through a graph that saved base before the write (rather
// than computing a gradient from the overwritten values), and an inference tensor cannot
// be updated outside inference mode.
void interchange_rows_inplace(const Tensor& base, const Tensor& source, const Tensor& batch_index,
                              const Tensor& base_pos, const Tensor& source_pos, const std::optional<Tensor>& basis,
                              const std::optional<Tensor>& reflect, const std::optional<Tensor>& mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("hyperdas_fast::interchange_rows_", "")
                       .typed<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                   const std::optional<Tensor>&, const std::optional<Tensor>&,
                                   const std::optional<Tensor>&)>();
  // An inference tensor may be updated in inference mode only: refuse before writing.
  TORCH_CHECK(!base.is_inference() || c10::InferenceMode::is_enabled(),
              "Inplace update to inference tensor outside InferenceMode is not allowed; clone it first or call "
              "under torch.inference_mode()");
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.call(base, source, batch_index, base_pos, source_pos, basis, reflect, mask);
  }
  torch::autograd::impl::bump_version(base);
}

}  // namespace
}  // namespace hyperdas_fast

TORCH_LIBRARY_IMPL(hyperdas_fast, Autograd, m) {
  m.impl("interchange_fwd", &hyperdas_fast::interchange_fwd_autograd);
  m.impl("interchange_bwd", &hyperdas_fast::interchange_bwd_autograd);
}

TORCH_LIBRARY_IMPL(hyperdas_fast, ADInplaceOrView, m) {
  m.impl("interchange_rows_", &hyperdas_fast::interchange_rows_inplace);
}
