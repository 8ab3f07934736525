"""`make test` step: where nvcc and a CUDA build of torch exist, the build must have compiled
the CUDA kernels into nonlocal_kernels._C (for TORCH_CUDA_ARCH_LIST, default 8.0;9.0 without a
GPU; warnings in the .cu files are errors under NONLOCAL_KERNELS_CUDA_WERROR=1) and the
emulated test extension nonlocal_kernels._C_emu (NONLOCAL_KERNELS_EMU=1)."""

import os
import sys

import torch

from nonlocal_kernels import ops
from nonlocal_kernels.backends import cuda_emu


def main() -> int:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    have_nvcc = os.path.exists(os.path.join(home, "bin", "nvcc"))
    failures = []
    if have_nvcc and torch.version.cuda is not None and os.environ.get("NONLOCAL_KERNELS_CUDA") != "0":
        reason = ops.extension_unavailable_reason() or ops.kernel_unavailable_reason("CUDA")
        if reason:
            failures.append(f"CUDA kernels missing from nonlocal_kernels._C: {reason}")
        else:
            print(f"CUDA kernels built with nvcc for TORCH_CUDA_ARCH_LIST="
                  f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '8.0;9.0')}")
    else:
        print("no nvcc or no CUDA build of torch: CUDA kernels not built (not checked)")
    if os.environ.get("NONLOCAL_KERNELS_EMU", "1") == "1":
        reason = cuda_emu.BACKEND.unavailable_reason()
        if reason:
            failures.append(f"emulated CUDA extension missing: {reason}")
        else:
            print("nonlocal_kernels._C_emu built (backend cuda_emu)")
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
