"""One small ragged forward+backward per GPU backend, for compute-sanitizer (gpu_check.sh).

    compute-sanitizer --tool memcheck python scripts/gpu_sanitize_case.py [backend ...]

Runs every available non-reference backend that takes CUDA tensors (or the ones named), prints
one line each, and exits non-zero if any raised.
"""

import os
import sys

import torch

# Run from a checkout: import this checkout's package (scripts/.. on the path).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import nonlocal_kernels as nk
from nonlocal_kernels.testing import make_inputs


def main(names) -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU")
        return 0
    if not names:
        names = [b["name"] for b in nk.available_backends()
                 if b["available"] and "cuda" in b["devices"] and b["name"] != "reference"]
    bad = 0
    for name in names:
        for mode in ("embedded_gaussian", "dot_product", "concatenation"):
            info = {b["name"]: b for b in nk.available_backends()}[name]
            if mode not in info["modes"]:
                continue
            theta, phi, g, w = (t.requires_grad_() for t in make_inputs(
                2, 77, 45, 40, 24, dtype=torch.float16, device="cuda", with_concat=True))
            try:
                kw = dict(mode=mode, backend=name)
                if mode == "concatenation":
                    kw["concat_weight"] = w
                y = nk.nonlocal_attention(theta, phi, g, **kw)
                y.backward(torch.randn_like(y))
                torch.cuda.synchronize()
                print(f"{name} {mode}: ok", flush=True)
            except Exception as exc:
                bad += 1
                print(f"{name} {mode}: {type(exc).__name__}: {exc}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
