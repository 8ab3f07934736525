// Run-order control of the emulator for nonlocal_kernels._C_emu (no torch here: the emulator
// header and torch's headers stay in separate translation units).
#include <string>

#include "cuda/softmax_launch.h"
#include "emu/cuda_emu.h"

namespace nonlocal_kernels {
namespace emu_kernels {

const char* set_run_order(const char* order) {
  static thread_local std::string error;
  try {
    cuda_emu::set_run_order(order);
  } catch (const cuda_emu::Error& e) {
    error = e.what();
    return error.c_str();
  }
  return nullptr;
}

const char* get_run_order() {
  static thread_local std::string order;
  order = cuda_emu::run_order();
  return order.c_str();
}

}  // namespace emu_kernels
}  // namespace nonlocal_kernels
