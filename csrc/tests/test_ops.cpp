// C++ test (ctest): the ops library built by CMake loads like torch.ops.load_library() loads it,
// registers both schemas with the expected arguments, and every kernel it registers for CPU
// computes the same as a plain ATen softmax attention (forward and backward) on ragged cases.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <dlfcn.h>

#include <cstdio>
#include <string>
#include <tuple>

#include "tests/expect.h"

static void check_schema(const char* name, size_t n_args, size_t n_returns) {
  auto op = c10::Dispatcher::singleton().findSchema({name, ""});
  EXPECT(op.has_value(), "operator %s is not registered", name);
  if (!op) return;
  const auto& schema = op->schema();
  EXPECT(schema.arguments().size() == n_args, "%s: %zu arguments, expected %zu", name,
         schema.arguments().size(), n_args);
  EXPECT(schema.returns().size() == n_returns, "%s: %zu returns, expected %zu", name,
         schema.returns().size(), n_returns);
}

static void check_cpu_forward_if_registered() {
  auto op = c10::Dispatcher::singleton().findSchema({"nonlocal_kernels::softmax_fwd", ""});
  if (!op || !op->hasKernelForDispatchKey(c10::DispatchKey::CPU)) {
    std::printf("softmax_fwd has no CPU kernel in this build: numeric check not run\n");
    return;
  }
  auto typed = op->typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                             const at::Tensor&, double)>();
  at::manual_seed(0);
  at::Tensor theta = at::randn({2, 37, 19}, at::kDouble);
  at::Tensor phi = at::randn({2, 23, 19}, at::kDouble);
  at::Tensor g = at::randn({2, 23, 11}, at::kDouble);
  double scale = 0.3;
  auto [y, lse] = typed.call(theta, phi, g, scale);
  at::Tensor s = at::matmul(theta, phi.transpose(1, 2)) * scale;
  at::Tensor y_ref = at::matmul(at::softmax(s, -1), g);
  at::Tensor lse_ref = at::logsumexp(s, -1);
  double ey = (y - y_ref).abs().max().item<double>();
  double el = (lse - lse_ref).abs().max().item<double>();
  EXPECT(ey < 1e-10 && el < 1e-10, "CPU softmax_fwd differs from ATen: y %g, lse %g", ey, el);
}

// The CPU softmax_bwd against the closed-form gradients written with ATen matmuls, on a ragged
// case with channels-first (transposed) inputs.
static void check_cpu_backward_if_registered() {
  auto op = c10::Dispatcher::singleton().findSchema({"nonlocal_kernels::softmax_bwd", ""});
  auto fwd_op = c10::Dispatcher::singleton().findSchema({"nonlocal_kernels::softmax_fwd", ""});
  if (!op || !op->hasKernelForDispatchKey(c10::DispatchKey::CPU) || !fwd_op) {
    std::printf("softmax_bwd has no CPU kernel in this build: numeric check not run\n");
    return;
  }
  auto fwd = fwd_op->typed<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  auto bwd = op->typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, double)>();
  at::manual_seed(1);
  at::Tensor theta = at::randn({2, 29, 41}, at::kDouble).transpose(1, 2);  // (2, 41, 29)
  at::Tensor phi = at::randn({2, 29, 300}, at::kDouble).transpose(1, 2);   // (2, 300, 29)
  at::Tensor g = at::randn({2, 300, 13}, at::kDouble);
  at::Tensor dy = at::randn({2, 41, 13}, at::kDouble);
  double scale = 0.2;
  auto [y, lse] = fwd.call(theta, phi, g, scale);
  auto [dtheta, dphi, dg] = bwd.call(dy, theta, phi, g, y, lse, scale);
  at::Tensor p = at::softmax(at::matmul(theta, phi.transpose(1, 2)) * scale, -1);
  at::Tensor dp = at::matmul(dy, g.transpose(1, 2));
  at::Tensor ds = p * (dp - (dp * p).sum(-1, true));
  double e1 = (dtheta - at::matmul(ds, phi) * scale).abs().max().item<double>();
  double e2 = (dphi - at::matmul(ds.transpose(1, 2), theta) * scale).abs().max().item<double>();
  double e3 = (dg - at::matmul(p.transpose(1, 2), dy)).abs().max().item<double>();
  EXPECT(e1 < 1e-10 && e2 < 1e-10 && e3 < 1e-10,
         "CPU softmax_bwd differs from ATen: dtheta %g, dphi %g, dg %g", e1, e2, e3);
}

int main() {
  void* handle = dlopen(NONLOCAL_KERNELS_OPS_LIBRARY, RTLD_NOW | RTLD_GLOBAL);
  EXPECT(handle != nullptr, "dlopen(%s) failed: %s", NONLOCAL_KERNELS_OPS_LIBRARY, dlerror());
  if (!handle) return 1;
  check_schema("nonlocal_kernels::softmax_fwd", 4, 2);
  check_schema("nonlocal_kernels::softmax_bwd", 7, 3);
  check_cpu_forward_if_registered();
  check_cpu_backward_if_registered();
  return nlk_test::summary();
}
