"""Test set-up shared by the whole suite.

- Without a CUDA GPU, Triton kernels run under its interpreter on CPU tensors: TRITON_INTERPRET=1
  must be set before anything imports triton, so it is set here, at collection start.
- Compiled ops fill their outputs with NaN before the kernels write them
  (NONLOCAL_KERNELS_POISON=1), so an element a kernel never writes fails the checks.
- Every test draws fresh random data: the seed is new each run and printed, so a failure can be
  replayed with NONLOCAL_KERNELS_SEED=<seed>.
- Tests marked `gpu` skip without a CUDA device (scripts/gpu_check.sh runs them on a GPU).
"""

import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("NONLOCAL_KERNELS_POISON", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def fresh_seed():
    seed = int(os.environ.get("NONLOCAL_KERNELS_SEED") or random.SystemRandom().randrange(2**31))
    torch.manual_seed(seed)
    print(f"[seed] NONLOCAL_KERNELS_SEED={seed}")
    yield seed


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_check.sh on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
