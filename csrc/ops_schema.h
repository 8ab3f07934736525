// The softmax family's schemas, written once for every C++ namespace that implements them
// (nonlocal_kernels in _C, nonlocal_kernels_emu in _C_emu). nonlocal_kernels/ops.py holds the
// same text for the Triton namespace; tests/test_ops.py checks that the two agree.
#pragma once

#include <torch/library.h>

namespace nonlocal_kernels {

inline void define_softmax_ops(torch::Library& m) {
  m.def("softmax_fwd(Tensor theta, Tensor phi, Tensor g, float scale) -> (Tensor y, Tensor lse)");
  m.def(
      "softmax_bwd(Tensor dy, Tensor theta, Tensor phi, Tensor g, Tensor y, Tensor lse, "
      "float scale) -> (Tensor dtheta, Tensor dphi, Tensor dg)");
}

}  // namespace nonlocal_kernels
