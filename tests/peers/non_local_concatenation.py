"""AlexHex7's concatenation block: ReLU(w . [theta_i, phi_j]) (a bias-free 1x1 conv over the
pairs), divided by the number of key positions."""

import torch
from torch import nn

from . import _alexhex7


class _NonLocalBlockND(nn.Module):
    def __init__(self, in_channels, inter_channels=None, dimension=3, sub_sample=True,
                 bn_layer=True):
        super().__init__()
        _alexhex7.build(self, in_channels, inter_channels, dimension, sub_sample, bn_layer,
                        concat=True)

    def forward(self, x, return_nl_map=False):
        n, c = x.shape[0], self.inter_channels
        g_x = self.g(x).view(n, c, -1).permute(0, 2, 1)
        theta_x = self.theta(x).view(n, c, -1, 1)
        phi_x = self.phi(x).view(n, c, 1, -1)
        h, w = theta_x.shape[2], phi_x.shape[3]
        pairs = torch.cat([theta_x.repeat(1, 1, 1, w), phi_x.repeat(1, 1, h, 1)], dim=1)
        f = self.concat_project(pairs).view(n, h, w)
        return _alexhex7.finish(self, x, f / w, g_x, return_nl_map)
