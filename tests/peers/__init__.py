"""Test-local reproductions of Non-local blocks that are not on PyPI, written from their
published forwards (SlowFast's nonlocal_helper.Nonlocal, AlexHex7/Non-local_pytorch's
_NonLocalBlockND variants), for tests/test_convert.py. Module and class names are theirs,
because nonlocal_kernels.convert recognises these blocks by structure and names.

``randomize`` gives the Non-local blocks of any model (these and the real peers') random
weights, for the tests that convert them (tests/test_convert.py, test_deploy.py,
test_mixed_precision.py)."""

import torch
from torch import nn

from nonlocal_kernels.convert import _find


def randomize(model: nn.Module, std: float = 0.3) -> nn.Module:
    """Random non-zero weights (normal, ``std``) in every Non-local block (the peers
    zero-initialise their output layers, which makes a fresh block the identity) and BN
    statistics away from (0, 1); the rest of a backbone keeps its own initialisation."""
    blocks = [m for m in model.modules() if _find(m) is not None]
    with torch.no_grad():
        for block in blocks:
            for p in block.parameters():
                p.copy_(torch.randn_like(p) * std)
            for m in block.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.1)
                    m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
    return model
