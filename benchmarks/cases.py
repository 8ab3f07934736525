"""Benchmark shapes (docs/design.md section 9) and the FLOP model."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Case:
    B: int
    N: int
    M: int
    dk: int
    dv: int
    label: str = ""

    @property
    def shape(self) -> str:
        return f"({self.B}, {self.N}, {self.M}, {self.dk}, {self.dv})"

    def fwd_flops(self) -> float:
        """2·N·M·dk + 2·N·M·dv per batch element (the materialised-affinity count)."""
        return 2.0 * self.B * self.N * self.M * (self.dk + self.dv)

    def fwd_bwd_flops(self) -> float:
        return 3.5 * self.fwd_flops()  # backward counted as 2.5x the forward

    def affinity_bytes(self, itemsize: int) -> int:
        return self.B * self.N * self.M * itemsize


def parse_shape(text: str) -> Case:
    parts = [int(p) for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
    if len(parts) != 5 or min(parts) < 1:
        raise ValueError(f"--shape: expected B,N,M,dk,dv (positive ints), got {text!r}")
    return Case(*parts)


PRESETS = {
    # Finishes in well under two minutes on 2 CPU cores (each case runs in a fresh process).
    "quick": [
        Case(1, 784, 196, 64, 64, "tiny 28x28 / 14x14"),
        Case(1, 1568, 392, 64, 64, "2x28x28"),
        Case(1, 3136, 784, 64, 64, "4x28x28"),
    ],
    # CPU-sized variants of the shapes that matter.
    "cpu": [
        Case(2, 1568, 392, 256, 256, "I3D-NL res3, 2 frames"),
        Case(1, 3136, 784, 256, 256, "I3D-NL res3, B=1"),
        Case(4, 784, 196, 512, 512, "I3D-NL res4, B=4"),
        Case(2, 784, 196, 1024, 512, "Gaussian res4, B=2"),
        Case(1, 6272, 1568, 256, 256, "TSM-NL res3, B=1"),
        Case(1, 25088, 6272, 256, 256, "long video 8x56x56"),
    ],
    # The GPU shapes of docs/design.md section 9.
    "gpu": [
        Case(8, 3136, 784, 256, 256, "I3D-NL res3"),
        Case(8, 784, 196, 512, 512, "I3D-NL res4"),
        Case(16, 6272, 1568, 256, 256, "TSM-NL res3"),
        Case(8, 784, 196, 1024, 512, "Gaussian res4"),
        Case(1, 32768, 32768, 256, 256, "segmentation NL head"),
        Case(1, 100352, 25088, 256, 256, "long video 32x56x56"),
    ],
    # Memory against N for the README: M = N / 4 (sub-sampled), d = 256.
    "memory": [Case(1, n, n // 4, 256, 256, f"N={n}") for n in (1568, 3136, 6272, 12544, 25088)],
}
