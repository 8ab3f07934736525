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

// The CPU kernel's whole-batch variant of the pair (nonlocal_kernels namespace, CPU key only):
// the forward can keep its softmax P = softmax(scale * theta phi^T) (B, N, M; lse's dtype) for
// the backward, which then reads it instead of recomputing anything. keep = false: scores is an
// empty (B, 0, 0) tensor, and the backward given one recomputes, as softmax_bwd does. Which
// pair runs, and when: docs/cpu.md.
inline void define_softmax_keep_ops(torch::Library& m) {
  m.def(
      "softmax_keep_fwd(Tensor theta, Tensor phi, Tensor g, float scale, bool keep) -> "
      "(Tensor y, Tensor lse, Tensor scores)");
  m.def(
      "softmax_keep_bwd(Tensor dy, Tensor theta, Tensor phi, Tensor g, Tensor y, Tensor lse, "
      "Tensor scores, float scale) -> (Tensor dtheta, Tensor dphi, Tensor dg)");
}

}  // namespace nonlocal_kernels
