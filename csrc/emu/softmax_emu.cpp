// nonlocal_kernels._C_emu (tests only): the CUDA kernels of csrc/cuda compiled by the host
// compiler against the emulator (csrc/emu/softmax_emu_*.cpp), registered on CPU tensors as
//
//   nonlocal_kernels_emu::softmax_fwd / softmax_bwd   same schemas as nonlocal_kernels::*
//   nonlocal_kernels_emu::set_run_order(str order)    "forward", "reverse" or "random:SEED"
//   nonlocal_kernels_emu::get_run_order() -> str
//
// The default run order comes from NONLOCAL_KERNELS_EMU_ORDER (else "forward"). fp32 inputs
// take the TF32 kernels when torch.backends.cuda.matmul.allow_tf32 is set, as on a GPU.
#include <torch/library.h>

#include <string>

#include "cuda/softmax_host.h"
#include "ops_schema.h"

namespace nonlocal_kernels {
namespace {

constexpr SoftmaxKernels kKernels = NLK_SOFTMAX_KERNELS(emu_kernels);

std::tuple<at::Tensor, at::Tensor> softmax_fwd_emu(const at::Tensor& theta, const at::Tensor& phi,
                                                   const at::Tensor& g, double scale) {
  const char* op = "nonlocal_kernels_emu::softmax_fwd (emulated CUDA)";
  check_device_type(theta, at::kCPU, "theta", op);
  return cuda_softmax_fwd(kKernels, theta, phi, g, scale, nullptr, op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_bwd_emu(
    const at::Tensor& dy, const at::Tensor& theta, const at::Tensor& phi, const at::Tensor& g,
    const at::Tensor& y, const at::Tensor& lse, double scale) {
  const char* op = "nonlocal_kernels_emu::softmax_bwd (emulated CUDA)";
  check_device_type(theta, at::kCPU, "theta", op);
  return cuda_softmax_bwd(kKernels, dy, theta, phi, g, y, lse, scale, nullptr, op);
}

void set_run_order(const std::string& order) {
  const char* err = emu_kernels::set_run_order(order.c_str());
  TORCH_CHECK(err == nullptr, "nonlocal_kernels_emu::set_run_order: ", err);
}

std::string get_run_order() { return emu_kernels::get_run_order(); }

}  // namespace

TORCH_LIBRARY(nonlocal_kernels_emu, m) {
  define_softmax_ops(m);
  m.def("set_run_order(str order) -> ()", &set_run_order);
  m.def("get_run_order() -> str", &get_run_order);
}

TORCH_LIBRARY_IMPL(nonlocal_kernels_emu, CPU, m) {
  m.impl("softmax_fwd", &softmax_fwd_emu);
  m.impl("softmax_bwd", &softmax_bwd_emu);
}

}  // namespace nonlocal_kernels

#ifdef NONLOCAL_KERNELS_EMU_MODULE
// `import nonlocal_kernels._C_emu` loads this library (running the registrations above).
#include <Python.h>
extern "C" PyObject* PyInit__C_emu(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_emu", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
