# The README's commands. Everything builds from scratch into .venv on a fresh machine.
#   make demo    set up, then run a NonLocal3d block on the best backend against the reference
#   make test    set up, then run the whole test suite (Python + C++ via ctest)
#   make bench   set up, then the quick benchmark (tables and plots in benchmarks/out/)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# pip takes torch 2.14.1 (a CUDA 13.0 build) from the machine's cache when it has one.
TORCH_SPEC ?= torch>=2.6
CSRC   := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py
export NONLOCAL_KERNELS_EMU ?= 1
# Warnings in our .cu files fail the (nvcc, sm_80 + sm_90) build of the CUDA kernels.
export NONLOCAL_KERNELS_CUDA_WERROR ?= 1

.PHONY: setup deps build test test-py test-cpp test-cuda-build demo bench clean

setup: build

$(PY):
	$(PYTHON) -m venv $(VENV)

# The peer packages whose Non-local blocks nonlocal_kernels.convert runs (tests/test_convert.py).
# mmaction2's own requirements pull opencv-contrib and decord, which its backbones do not need:
# it is installed without them, and what its import needs is listed here.
PEERS := timm==1.0.31 pytorchvideo==0.1.5 mmcv-lite==2.1.0 mmengine==0.10.7 einops scipy \
	importlib_metadata
# The ONNX exporter's and runtime's packages (nonlocal_kernels.onnx, tests/test_deploy.py).
ONNX := onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.32.0

# Each set-up step writes how long it took into its stamp (make demo prints them).
$(VENV)/.deps: $(PY) pyproject.toml
	@t0=$$(date +%s); $(PIP) install --upgrade pip && \
	  $(PIP) install "$(TORCH_SPEC)" ninja numpy pytest pytest-benchmark matplotlib setuptools \
	    wheel && \
	  $(PIP) install $(PEERS) $(ONNX) && \
	  $(PIP) install --no-deps mmaction2==1.2.0 && \
	  echo "$$(( $$(date +%s) - t0 )) s installing the dependencies" > $@

deps: $(VENV)/.deps

# Rebuilds when a C++/CUDA source changes (ninja makes the rebuild incremental).
$(VENV)/.built: $(VENV)/.deps $(CSRC) pyproject.toml
	@t0=$$(date +%s); $(PIP) install --no-build-isolation --no-deps -e . && \
	  echo "$$(( $$(date +%s) - t0 )) s building (C++, CUDA for $${TORCH_CUDA_ARCH_LIST:-8.0;9.0} where nvcc exists, emulator)" | tee $@

# The demo builds only what it runs: no emulator, and the CUDA kernels only with a GPU (a full
# build that is up to date serves as well).
$(VENV)/.built-demo: $(VENV)/.deps $(CSRC) pyproject.toml
	@if [ -f $(VENV)/.built ] && [ -z "$$(find $(CSRC) pyproject.toml -newer $(VENV)/.built)" ]; then \
	  cp $(VENV)/.built $@; \
	else \
	  t0=$$(date +%s); gpu=$$($(PY) -c 'import torch; print(int(torch.cuda.is_available()))') && \
	  NONLOCAL_KERNELS_EMU=0 NONLOCAL_KERNELS_CUDA=$$gpu \
	    $(PIP) install --no-build-isolation --no-deps -e . && \
	  echo "$$(( $$(date +%s) - t0 )) s building (C++$$( [ $$gpu = 1 ] && echo ', CUDA'))" | tee $@; \
	fi

build: $(VENV)/.built

test-py: build
	NONLOCAL_KERNELS_POISON=1 $(PY) -m pytest tests -q

test-cpp: build
	cmake -S . -B build-cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build build-cmake -j2
	ctest --test-dir build-cmake --output-on-failure

# The build above compiled the CUDA kernels with nvcc (where nvcc exists) and _C_emu: check both.
test-cuda-build: build
	$(PY) scripts/check_cuda_build.py

test: test-cuda-build test-cpp test-py

demo: $(VENV)/.built-demo
	@echo "set-up: $$(cat $(VENV)/.deps), $$(cat $(VENV)/.built-demo)"
	$(PY) -m nonlocal_kernels.demo

bench: build
	$(PY) -m benchmarks --quick

clean:
	rm -rf build build-cmake *.egg-info nonlocal_kernels/*.so $(VENV)/.built $(VENV)/.built-demo
