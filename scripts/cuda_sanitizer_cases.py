"""A few small forward + backward calls of backend ``cuda`` for compute-sanitizer (racecheck,
synccheck, memcheck): every compute type, ragged N/M, dk/dv across chunk boundaries, strided and
channels-first inputs, a gradient into lse. Exits non-zero if a result is off (the sanitizer
reports its own errors through --error-exitcode).

    compute-sanitizer --tool racecheck --error-exitcode 1 python scripts/cuda_sanitizer_cases.py
"""

import sys

import torch

from nonlocal_kernels.testing import assert_all_ok, compare_with_oracle, make_inputs

CASES = [  # (B, N, M, dk, dv), layout
    ((1, 70, 37, 19, 23), "channels_first"),
    ((2, 65, 130, 129, 70), "strided"),
]


def main() -> int:
    torch.manual_seed(0)
    for tf32, dtype in [(False, torch.float32), (True, torch.float32), (False, torch.float16),
                        (False, torch.bfloat16)]:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for shape, layout in CASES:
            theta, phi, g = make_inputs(*shape, dtype=dtype, layout=layout, device="cuda")
            assert_all_ok(compare_with_oracle(theta, phi, g, backend="cuda", scale=0.3,
                                              return_lse=True, tf32=tf32))
            print(f"ok {dtype} tf32={tf32} {shape} {layout}", flush=True)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
