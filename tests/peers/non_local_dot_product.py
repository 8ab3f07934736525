"""AlexHex7's dot-product block: theta . phi divided by the number of key positions."""

from torch import nn

from . import _alexhex7


class _NonLocalBlockND(nn.Module):
    def __init__(self, in_channels, inter_channels=None, dimension=3, sub_sample=True,
                 bn_layer=True):
        super().__init__()
        _alexhex7.build(self, in_channels, inter_channels, dimension, sub_sample, bn_layer)

    def forward(self, x, return_nl_map=False):
        n, c = x.shape[0], self.inter_channels
        g_x = self.g(x).view(n, c, -1).permute(0, 2, 1)
        theta_x = self.theta(x).view(n, c, -1).permute(0, 2, 1)
        phi_x = self.phi(x).view(n, c, -1)
        f = theta_x @ phi_x
        return _alexhex7.finish(self, x, f / f.shape[-1], g_x, return_nl_map)
