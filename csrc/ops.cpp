// Operator schemas of nonlocal_kernels (ops_schema.h). Kernels register implementations per
// dispatch key in csrc/cpu/*.cpp (CPU), csrc/cuda/*.cpp (CUDA), csrc/fast/*.cpp (the CPU
// concatenation kernels, which define their own schemas). Fakes, vmap rules and autograd are
// registered in Python (nonlocal_kernels/ops.py).
//
// softmax_fwd: y = softmax_rows(scale * theta phi^T) g and lse = logsumexp_rows(scale theta phi^T)
// softmax_bwd: the gradients of y with respect to theta, phi, g (how each backend recomputes
// what it needs: docs/design.md).
// Inputs are 3-D with any strides; lse is float32 (float64 for float64 inputs).
#include "ops_schema.h"

TORCH_LIBRARY(nonlocal_kernels, m) {
  nonlocal_kernels::define_softmax_ops(m);
  nonlocal_kernels::define_softmax_keep_ops(m);
}

#ifdef NONLOCAL_KERNELS_PYTHON_MODULE
// `import nonlocal_kernels._C` loads this library (running the registrations above); the module
// itself is empty, so no pybind11 is needed.
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
