"""SlowFast's Nonlocal block (slowfast/models/nonlocal_helper.py), reproduced for the tests:
theta from x; phi and g from x max-pooled by pool_size (when any size > 1); affinity theta^T phi
scaled by dim_inner^-0.5 then a softmax ("softmax"), or divided by the number of key positions
("dot_product"); out = x + bn(conv_out(y))."""

import torch
from torch import nn


class Nonlocal(nn.Module):
    def __init__(self, dim, dim_inner, pool_size=None, instantiation="softmax",
                 norm_eps=1e-5, norm_momentum=0.1, norm_module=nn.BatchNorm3d):
        super().__init__()
        self.dim, self.dim_inner = dim, dim_inner
        self.pool_size = pool_size
        self.instantiation = instantiation
        self.use_pool = pool_size is not None and any(s > 1 for s in pool_size)
        self.conv_theta = nn.Conv3d(dim, dim_inner, kernel_size=1)
        self.conv_phi = nn.Conv3d(dim, dim_inner, kernel_size=1)
        self.conv_g = nn.Conv3d(dim, dim_inner, kernel_size=1)
        self.conv_out = nn.Conv3d(dim_inner, dim, kernel_size=1)
        self.bn = norm_module(num_features=dim, eps=norm_eps, momentum=norm_momentum)
        if self.use_pool:
            self.pool = nn.MaxPool3d(kernel_size=pool_size, stride=pool_size)

    def forward(self, x):
        identity = x
        n, _, t, h, w = x.shape
        theta = self.conv_theta(x)
        if self.use_pool:
            x = self.pool(x)
        phi, g = self.conv_phi(x), self.conv_g(x)
        theta, phi, g = (v.reshape(n, self.dim_inner, -1) for v in (theta, phi, g))
        affinity = torch.einsum("nci,ncj->nij", theta, phi)
        if self.instantiation == "softmax":
            affinity = (affinity * self.dim_inner ** -0.5).softmax(dim=2)
        elif self.instantiation == "dot_product":
            affinity = affinity / affinity.shape[2]
        else:
            raise NotImplementedError(self.instantiation)
        y = torch.einsum("nij,ncj->nci", affinity, g).reshape(n, self.dim_inner, t, h, w)
        return identity + self.bn(self.conv_out(y))
