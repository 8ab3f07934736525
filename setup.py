"""Build of nonlocal_kernels._C (and the test-only nonlocal_kernels._C_emu).

    pip install --no-build-isolation -e .

- C++ sources always: csrc/ops.cpp, csrc/cpu/*.cpp and csrc/fast/*.cpp.
- CUDA sources (csrc/cuda/*.cu, csrc/cuda/*.cpp) when nvcc is found (CUDA_HOME, else
  /usr/local/cuda) and torch was built with CUDA. NONLOCAL_KERNELS_CUDA=0/1 forces either way.
  TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0" when no GPU is visible.
- NONLOCAL_KERNELS_EMU=1 also builds nonlocal_kernels._C_emu from csrc/emu/*.cpp: the CUDA
  kernel sources compiled by the host compiler against csrc/emu/cuda_emu.h (tests only).
- csrc/cpu/softmax_kernel_avx2.cpp, softmax_kernel_avx512.cpp and csrc/fast/concat_kernel_avx2.cpp,
  concat_kernel_avx512.cpp alone are compiled with their instruction sets' flags on x86-64 (ISA_FLAGS; CMakeLists.txt does the same); everything else
  keeps the baseline ISA.
- NONLOCAL_KERNELS_WERROR=1 turns warnings in our own sources into errors (CI).
  NONLOCAL_KERNELS_CUDA_WERROR=1 does it for the .cu files only (nvcc, device and host side);
  `make test` sets it.
"""

import glob
import os
import platform
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


# Sources compiled for one instruction set, with that set's flags (x86-64 only: elsewhere they
# compile to nothing). softmax_cpu.cpp calls their kernels only when the CPU has the features.
_AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"]
_AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
ISA_FLAGS = {"csrc/cpu/softmax_kernel_avx2.cpp": _AVX2_FLAGS,
             "csrc/cpu/softmax_kernel_avx512.cpp": _AVX512_FLAGS,
             "csrc/fast/concat_kernel_avx2.cpp": _AVX2_FLAGS,
             "csrc/fast/concat_kernel_avx512.cpp": _AVX512_FLAGS}
IS_X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def _env_flag(name):
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    if v not in ("0", "1"):
        sys.exit(f"{name} must be 0 or 1, got {v!r}")
    return v == "1"


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return home if os.path.exists(os.path.join(home, "bin", "nvcc")) else None


def extensions():
    import torch
    from torch.utils import cpp_extension

    werror = ["-Werror"] if _env_flag("NONLOCAL_KERNELS_WERROR") else []
    cxx = ["-O3", "-fopenmp", "-Wall", "-Wno-unused-function"] + werror
    common = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    sources = ["csrc/ops.cpp"] + _rel("csrc/cpu/*.cpp") + _rel("csrc/fast/*.cpp")
    # Py_LIMITED_API itself comes from torch (py_limited_api=True); defining it here too
    # redefined it in every compile command, a warning that -Werror turns into a failure.
    define = [("NONLOCAL_KERNELS_PYTHON_MODULE", None)]

    want_cuda = _env_flag("NONLOCAL_KERNELS_CUDA")
    cuda_home = _cuda_home()
    cuda_sources = _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/*.cpp")
    can_cuda = cuda_home is not None and torch.version.cuda is not None
    if want_cuda and not can_cuda:
        sys.exit("NONLOCAL_KERNELS_CUDA=1 but nvcc (CUDA_HOME or /usr/local/cuda) or a CUDA "
                 "build of torch is missing")
    use_cuda = bool(cuda_sources) and (want_cuda if want_cuda is not None else can_cuda)

    exts = []
    if use_cuda:
        os.environ.setdefault("CUDA_HOME", cuda_home)
        cpp_extension.CUDA_HOME = cuda_home
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        nvcc = ["-O3", "-lineinfo",
                "-Xcompiler=-Wall", "--expt-relaxed-constexpr"]
        if werror or _env_flag("NONLOCAL_KERNELS_CUDA_WERROR"):
            nvcc += ["-Werror=all-warnings", "-Xcompiler=-Werror"]
        exts.append(cpp_extension.CUDAExtension(
            "nonlocal_kernels._C", sources + cuda_sources, py_limited_api=True,
            define_macros=define + [("NONLOCAL_KERNELS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **common))
    else:
        exts.append(cpp_extension.CppExtension(
            "nonlocal_kernels._C", sources, py_limited_api=True, define_macros=define,
            extra_compile_args={"cxx": cxx}, **common))

    emu_sources = _rel("csrc/emu/*.cpp")
    if _env_flag("NONLOCAL_KERNELS_EMU") and emu_sources:
        # The emulator compiles CUDA's own cuda_fp16.h / cuda_bf16.h with the host compiler.
        cuda_include = os.path.join(cuda_home or "/usr/local/cuda", "include")
        if not os.path.exists(os.path.join(cuda_include, "cuda_fp16.h")):
            print(f"WARNING: NONLOCAL_KERNELS_EMU=1 but CUDA's headers (cuda_fp16.h) are not in "
                  f"{cuda_include} (set CUDA_HOME): nonlocal_kernels._C_emu is not built",
                  file=sys.stderr)
            return exts
        exts.append(cpp_extension.CppExtension(
            "nonlocal_kernels._C_emu", emu_sources, py_limited_api=True,
            define_macros=[("NONLOCAL_KERNELS_EMU_MODULE", None)],
            extra_compile_args={"cxx": cxx + ["-DNONLOCAL_KERNELS_EMU"]},
            include_dirs=[os.path.join(ROOT, "csrc"), cuda_include],
            extra_link_args=["-fopenmp"]))
    return exts


def build_ext_class():
    """torch's BuildExtension (ninja), plus per-source flags (ISA_FLAGS): those sources are
    compiled first, on their own with the extension's flags and theirs, and linked in as objects."""
    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension):
        def build_extension(self, ext):
            isa_sources = [s for s in ext.sources if s in ISA_FLAGS] if IS_X86_64 else []
            for src in isa_sources:
                args = ext.extra_compile_args
                args = dict(args) if isinstance(args, dict) else {"cxx": list(args)}
                args["cxx"] = list(args["cxx"]) + ISA_FLAGS[src]
                ext.extra_objects = list(ext.extra_objects or []) + self.compiler.compile(
                    [src], output_dir=self.build_temp, macros=list(ext.define_macros),
                    include_dirs=ext.include_dirs, debug=self.debug, extra_postargs=args,
                    depends=ext.depends)
            ext.sources = [s for s in ext.sources if s not in isa_sources]
            super().build_extension(ext)

    return Build.with_options(use_ninja=True)


def license_metadata() -> dict:
    """The license, for every setuptools that builds torch extensions. pyproject.toml declares
    it dynamic: its SPDX string form (`license = "BSD-3-Clause"`) needs setuptools >= 77, and
    older ones (Python 3.11's venv brings 65.5) reject the whole file ("`project.license` must be
    valid exactly by one definition"), while >= 77 deprecates the table form. So: an SPDX
    License-Expression from 77 on, the plain License field before."""
    import setuptools

    if int(setuptools.__version__.split(".")[0]) >= 77:
        return {"license_expression": LICENSE}
    return {"license": LICENSE}


LICENSE = "BSD-3-Clause"


def main():
    setup(
        **license_metadata(),
        ext_modules=extensions(),
        cmdclass={"build_ext": build_ext_class()},
        options={"bdist_wheel": {"py_limited_api": "cp39"}},
    )


if __name__ == "__main__":
    main()
