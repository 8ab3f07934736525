"""What AlexHex7/Non-local_pytorch's four files share: the constructor of _NonLocalBlockND (g,
theta, phi as 1x1 convs of the block's dimension, W as conv + batch norm or a conv alone, max-pool
sub-sampling after the g and phi convs) and the end of the forward (y back to a feature map,
z = W(y) + x). Each variant's module defines the affinity."""

import torch
from torch import nn

_LAYERS = {1: (nn.Conv1d, nn.MaxPool1d, nn.BatchNorm1d, 2),
           2: (nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, (2, 2)),
           3: (nn.Conv3d, nn.MaxPool3d, nn.BatchNorm3d, (1, 2, 2))}


def build(block, in_channels, inter_channels, dimension, sub_sample, bn_layer,
          theta_phi=True, concat=False):
    conv, pool, bn, size = _LAYERS[dimension]
    block.sub_sample, block.in_channels = sub_sample, in_channels
    block.inter_channels = inter_channels or max(in_channels // 2, 1)
    c = block.inter_channels
    block.g = conv(in_channels, c, kernel_size=1)
    if bn_layer:
        block.W = nn.Sequential(conv(c, in_channels, kernel_size=1), bn(in_channels))
        nn.init.constant_(block.W[1].weight, 0)
        nn.init.constant_(block.W[1].bias, 0)
    else:
        block.W = conv(c, in_channels, kernel_size=1)
        nn.init.constant_(block.W.weight, 0)
        nn.init.constant_(block.W.bias, 0)
    if theta_phi:
        block.theta = conv(in_channels, c, kernel_size=1)
        block.phi = conv(in_channels, c, kernel_size=1)
    if concat:
        block.concat_project = nn.Sequential(nn.Conv2d(2 * c, 1, 1, 1, 0, bias=False), nn.ReLU())
    if sub_sample:
        block.g = nn.Sequential(block.g, pool(kernel_size=size))
        block.phi = nn.Sequential(block.phi, pool(kernel_size=size)) if theta_phi \
            else pool(kernel_size=size)


def finish(block, x, f_div_c, g_x, return_nl_map):
    y = torch.matmul(f_div_c, g_x).permute(0, 2, 1).contiguous()
    y = y.view(x.shape[0], block.inter_channels, *x.shape[2:])
    z = block.W(y) + x
    return (z, f_div_c) if return_nl_map else z
