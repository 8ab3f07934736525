// The CUDA kernels of csrc/cuda/softmax_tf32.cu compiled by the host compiler against the
// emulator (csrc/emu/cuda_emu.h), for nonlocal_kernels._C_emu.
#include "../cuda/softmax_tf32.cu"
