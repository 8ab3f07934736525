// CUDA implementations of nonlocal_kernels::softmax_fwd / softmax_bwd: the kernels of
// csrc/cuda/softmax_*.cu launched on the current stream of the inputs' device. fp32 inputs use
// TF32 tensor cores only when torch.backends.cuda.matmul.allow_tf32 is set, else exact fp32.
// c10's stream and guard headers only: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers
// that a minimal CUDA toolkit may not have.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/softmax_host.h"

namespace nonlocal_kernels {
namespace {

constexpr SoftmaxKernels kKernels = NLK_SOFTMAX_KERNELS(cuda_kernels);

std::tuple<at::Tensor, at::Tensor> softmax_fwd_cuda(const at::Tensor& theta, const at::Tensor& phi,
                                                    const at::Tensor& g, double scale) {
  const char* op = "nonlocal_kernels::softmax_fwd (cuda)";
  check_device_type(theta, at::kCUDA, "theta", op);
  const c10::cuda::CUDAGuard guard(theta.device());
  return cuda_softmax_fwd(kKernels, theta, phi, g, scale,
                          c10::cuda::getCurrentCUDAStream().stream(), op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& theta, const at::Tensor& phi, const at::Tensor& g,
    const at::Tensor& y, const at::Tensor& lse, double scale) {
  const char* op = "nonlocal_kernels::softmax_bwd (cuda)";
  check_device_type(theta, at::kCUDA, "theta", op);
  const c10::cuda::CUDAGuard guard(theta.device());
  return cuda_softmax_bwd(kKernels, dy, theta, phi, g, y, lse, scale,
                          c10::cuda::getCurrentCUDAStream().stream(), op);
}

}  // namespace

TORCH_LIBRARY_IMPL(nonlocal_kernels, CUDA, m) {
  m.impl("softmax_fwd", &softmax_fwd_cuda);
  m.impl("softmax_bwd", &softmax_bwd_cuda);
}

}  // namespace nonlocal_kernels
