"""The modes table: the four pairwise functions of Wang et al. (CVPR 2018), one row each.

Every part of the package that needs to know what a mode is or takes reads it here: argument
validation (functional.py), the oracle (reference.py), the modules, the registry, the
benchmarks and the tests.

    y_i = (1 / C) sum_j f(theta_i, phi_j) g_j

=====================  =============  ========================================  ==============
mode                   family         f and C                                   takes
=====================  =============  ========================================  ==============
embedded_gaussian      softmax        exp(scale theta_i . phi_j), row sum       scale, lse
gaussian               softmax        the same, theta = phi = x in the modules  scale, lse
dot_product            dot_product    theta_i . phi_j, C = M                    -
concatenation          concatenation  ReLU(theta_i . w_theta + phi_j . w_phi),  concat_weight
                                      C = M
=====================  =============  ========================================  ==============

``scale`` multiplies the logits of the softmax family (1.0 when not given); ``lse`` is the
softmax family's log-sum-exp per query row; ``concat_weight`` is [w_theta, w_phi], shape (2 dk,).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    family: str  # "softmax", "dot_product" or "concatenation": the kernels a backend provides
    takes_scale: bool  # a softmax scale on the logits
    has_lse: bool  # return_lse=True is possible
    takes_concat_weight: bool  # needs concat_weight = [w_theta, w_phi]

    def default_scale(self, dk: int) -> Optional[float]:
        """The scale a caller without an opinion uses: dk^-0.5 for the softmax family (as the
        benchmarks and the modules with use_scale do), None for the others."""
        return dk ** -0.5 if self.takes_scale else None


_TABLE = (
    Mode("embedded_gaussian", "softmax", takes_scale=True, has_lse=True,
         takes_concat_weight=False),
    Mode("gaussian", "softmax", takes_scale=True, has_lse=True, takes_concat_weight=False),
    Mode("dot_product", "dot_product", takes_scale=False, has_lse=False,
         takes_concat_weight=False),
    Mode("concatenation", "concatenation", takes_scale=False, has_lse=False,
         takes_concat_weight=True),
)
MODES = {m.name: m for m in _TABLE}
NAMES = tuple(MODES)
SOFTMAX_MODES = tuple(m.name for m in _TABLE if m.family == "softmax")


def get(name) -> Mode:
    """The row of mode ``name``; ValueError naming the argument for an unknown mode."""
    if not isinstance(name, str) or name not in MODES:
        raise ValueError(f"mode: unknown mode {name!r}; expected one of {', '.join(NAMES)}")
    return MODES[name]
