// Schemas of the hyperdas_fast ops (shared with the CUDA extension, which only adds
// TORCH_LIBRARY_IMPL(hyperdas_fast, CUDA, m)), their CPU kernels, and the Python module
// init of hyperdas_fast._C. Autograd: interchange_autograd.cpp; fake kernels: hyperdas_fast/ops/library.py.
#include <Python.h>
#include <torch/library.h>

#include "interchange_cpu.h"

extern "C" {
// `import hyperdas_fast._C` loads this library, which runs the static registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "hyperdas_fast C++ CPU kernels (torch.ops.hyperdas_fast)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(hyperdas_fast, m) {
  m.set_python_module("hyperdas_fast.ops.library");
  m.def(
      "interchange_fwd(Tensor base, Tensor source, Tensor weights, Tensor? basis, Tensor? reflect, "
      "Tensor? mask, bool with_coords=False) -> (Tensor, Tensor)");
  m.def(
      "interchange_bwd(Tensor grad_out, Tensor base, Tensor source, Tensor weights, Tensor? basis, "
      "Tensor? reflect, Tensor? mask, Tensor? coords=None, Tensor? saved=None) -> (Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor)");
  // The forward that also returns what the device's backward reuses, as interchange_bwd's
  // `saved` (the C++ autograd uses it on tensors that need a gradient): on CPU (fp32/fp64)
  // delta = mix - base [B, T, d]; on CUDA the projections [P_S; P_B (; RV)]
  // [B*S + B*T (+ d), k (+ B)] (csrc/common/interchange_projected.h: kept_rows).
  m.def(
      "interchange_fwd_train(Tensor base, Tensor source, Tensor weights, Tensor basis, Tensor? reflect, "
      "Tensor? mask) -> (Tensor, Tensor, Tensor)");
  m.def(
      "interchange_rows_(Tensor(a!) base, Tensor source, Tensor batch_index, Tensor base_pos, "
      "Tensor source_pos, Tensor? basis, Tensor? reflect, Tensor? mask) -> ()");
}

TORCH_LIBRARY_IMPL(hyperdas_fast, CPU, m) {
  m.impl("interchange_fwd", &hyperdas_fast::cpu::interchange_fwd);
  m.impl("interchange_bwd", &hyperdas_fast::cpu::interchange_bwd);
  m.impl("interchange_fwd_train", &hyperdas_fast::cpu::interchange_fwd_train);
  m.impl("interchange_rows_", &hyperdas_fast::cpu::interchange_rows_);
}
