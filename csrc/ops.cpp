// Operator schemas of nonlocal_kernels. Kernels register implementations per dispatch key in
// csrc/cpu/*.cpp (CPU), csrc/cuda/*.cpp (CUDA). Fake (meta) implementations and the autograd
// formula live in Python (nonlocal_kernels/ops.py), as in pytorch/extension-cpp.
//
// softmax_fwd: y = softmax_rows(scale * theta phi^T) g and lse = logsumexp_rows(scale theta phi^T)
// softmax_bwd: gradients of y with respect to theta, phi, g, recomputing P from lse.
// Inputs are 3-D with any strides; lse is float32 (float64 for float64 inputs).
#include <torch/library.h>

TORCH_LIBRARY(nonlocal_kernels, m) {
  m.def("softmax_fwd(Tensor theta, Tensor phi, Tensor g, float scale) -> (Tensor y, Tensor lse)");
  m.def(
      "softmax_bwd(Tensor dy, Tensor theta, Tensor phi, Tensor g, Tensor y, Tensor lse, "
      "float scale) -> (Tensor dtheta, Tensor dphi, Tensor dg)");
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
