// C++ test (ctest): the ops library built by CMake loads like torch.ops.load_library() loads it,
// registers both schemas with the expected arguments, and every kernel it registers for CPU
// computes the same as a plain ATen softmax attention on a small ragged case.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <dlfcn.h>

#include <cstdio>
#include <string>
#include <tuple>

static int failures = 0;

#define EXPECT(cond, ...)                                  \
  do {                                                     \
    if (!(cond)) {                                         \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                   \
      std::fprintf(stderr, "\n");                          \
      ++failures;                                          \
    }                                                      \
  } while (0)

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

int main() {
  void* handle = dlopen(NONLOCAL_KERNELS_OPS_LIBRARY, RTLD_NOW | RTLD_GLOBAL);
  EXPECT(handle != nullptr, "dlopen(%s) failed: %s", NONLOCAL_KERNELS_OPS_LIBRARY, dlerror());
  if (!handle) return 1;
  check_schema("nonlocal_kernels::softmax_fwd", 4, 2);
  check_schema("nonlocal_kernels::softmax_bwd", 7, 3);
  check_cpu_forward_if_registered();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all C++ op checks passed\n");
  return 0;
}
