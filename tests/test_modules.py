"""NonLocal1d/2d/3d and NonLocalBlock: mmcv semantics and keys, init, sub-sampling, autocast,
channels_last, bad arguments."""

import math

import pytest
import torch

from nonlocal_kernels import NonLocal1d, NonLocal2d, NonLocal3d, NonLocalBlock, modes
from nonlocal_kernels.testing import max_abs_diff

MODES = list(modes.NAMES)
CLASSES = {1: NonLocal1d, 2: NonLocal2d, 3: NonLocal3d}
SHAPES = {1: (2, 8, 9), 2: (2, 8, 5, 7), 3: (2, 8, 3, 5, 7)}  # odd sizes on purpose


def mmcv_style_forward(block, x):
    """mmcv _NonLocalNd.forward re-derived with plain matmuls on the block's own weights."""
    n = x.size(0)
    g_x = block.g(x).view(n, block.inter_channels, -1).permute(0, 2, 1)
    if block.mode == "gaussian":
        theta_x = x.view(n, block.in_channels, -1).permute(0, 2, 1)
        phi_x = (block.phi(x) if block.sub_sample else x).view(n, block.in_channels, -1)
        pw = torch.softmax(theta_x @ phi_x, -1)
    elif block.mode == "concatenation":
        theta_x = block.theta(x).view(n, block.inter_channels, -1, 1)
        phi_x = block.phi(x).view(n, block.inter_channels, 1, -1)
        h, w = theta_x.size(2), phi_x.size(3)
        feat = torch.cat([theta_x.repeat(1, 1, 1, w), phi_x.repeat(1, 1, h, 1)], dim=1)
        pw = torch.relu(block.concat_project.conv(feat)).view(n, h, w)
        pw = pw / pw.shape[-1]
    else:
        theta_x = block.theta(x).view(n, block.inter_channels, -1).permute(0, 2, 1)
        phi_x = block.phi(x).view(n, block.inter_channels, -1)
        pw = theta_x @ phi_x
        if block.mode == "embedded_gaussian":
            pw = torch.softmax(pw / theta_x.shape[-1] ** 0.5, -1)
        else:
            pw = pw / pw.shape[-1]
    y = (pw @ g_x).permute(0, 2, 1).reshape(n, block.inter_channels, *x.shape[2:])
    return x + block.conv_out(y)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sub_sample", [False, True])
def test_matches_mmcv_style_forward_and_backward(dim, mode, sub_sample):
    block = CLASSES[dim](8, mode=mode, sub_sample=sub_sample, zeros_init=False, std=0.2).double()
    x = torch.randn(*SHAPES[dim], dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    z = block(x)
    assert z.shape == x.shape and z.dtype == x.dtype
    z_ref = mmcv_style_forward(block, x2)
    assert max_abs_diff(z, z_ref) < 1e-10
    dz = torch.randn_like(z)
    z.backward(dz)
    grads = {k: p.grad.clone() for k, p in block.named_parameters()}
    block.zero_grad()
    z_ref.backward(dz)
    assert max_abs_diff(x.grad, x2.grad) < 1e-10
    for k, p in block.named_parameters():
        assert max_abs_diff(grads[k], p.grad) < 1e-10, k


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm", [None, "bn"])
def test_gradients_reach_every_parameter(mode, norm):
    block = NonLocal2d(6, mode=mode, norm=norm, sub_sample=True, zeros_init=False, std=0.3)
    if norm == "bn":
        torch.nn.init.ones_(block.conv_out.bn.weight)
    x = torch.randn(2, 6, 6, 5)
    if mode == "concatenation":
        _activate_some_concat_pair(block, x)
    block(x).pow(2).sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def _activate_some_concat_pair(block, x):
    """ReLU(a_i + b_j) can be 0 for every pair on an unlucky draw; then the theta/phi/concat
    gradients are exactly 0 (the reference agrees). Negate the concat weight in that case so that
    some pair is active: a + b becomes -(a + b), which has a positive entry unless all are 0."""
    seen = {}
    hooks = [getattr(block, n).register_forward_hook(
        lambda mod, inp, out, n=n: seen.__setitem__(n, out.detach())) for n in ("theta", "phi")]
    with torch.no_grad():
        block(x)
    for h in hooks:
        h.remove()
    w = block.concat_project.conv.weight.detach().reshape(2, -1)
    a = torch.einsum("bc...,c->b...", seen["theta"], w[0]).flatten(1)
    b = torch.einsum("bc...,c->b...", seen["phi"], w[1]).flatten(1)
    if (a[:, :, None] + b[:, None, :]).max() <= 0:
        with torch.no_grad():
            block.concat_project.conv.weight.neg_()


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm", [None, "bn"])
def test_zeros_init_makes_a_fresh_block_the_identity(dim, mode, norm):
    block = CLASSES[dim](8, mode=mode, norm=norm, sub_sample=True)
    x = torch.randn(*SHAPES[dim])
    assert torch.equal(block(x), x)
    out = block.conv_out.bn if norm else block.conv_out.conv
    assert out.weight.abs().sum() == 0
    for m in (block.g[0], getattr(block, "theta", None)):
        if m is not None:
            std = m.conv.weight.std().item()
            assert 0.002 < std < 0.05 and m.conv.bias.abs().sum() == 0


def keys(block):
    return sorted(block.state_dict().keys())


def test_state_dict_keys_match_mmcv():
    assert keys(NonLocal2d(8)) == sorted([
        "g.conv.weight", "g.conv.bias", "theta.conv.weight", "theta.conv.bias",
        "phi.conv.weight", "phi.conv.bias", "conv_out.conv.weight", "conv_out.conv.bias"])
    assert keys(NonLocal3d(8, sub_sample=True, norm="bn")) == sorted([
        "g.0.conv.weight", "g.0.conv.bias", "theta.conv.weight", "theta.conv.bias",
        "phi.0.conv.weight", "phi.0.conv.bias", "conv_out.conv.weight", "conv_out.bn.weight",
        "conv_out.bn.bias", "conv_out.bn.running_mean", "conv_out.bn.running_var",
        "conv_out.bn.num_batches_tracked"])
    assert keys(NonLocal1d(8, mode="gaussian", sub_sample=True)) == sorted([
        "g.0.conv.weight", "g.0.conv.bias", "conv_out.conv.weight", "conv_out.conv.bias"])
    cat = NonLocal2d(8, mode="concatenation")
    assert "concat_project.conv.weight" in keys(cat)
    assert cat.concat_project.conv.weight.shape == (1, 8, 1, 1)  # 2 * inter_channels
    assert "concat_project.conv.bias" not in keys(cat)
    assert NonLocal3d(8, sub_sample=True).g[0].conv.weight.shape == (4, 8, 1, 1, 1)
    # The Caffe2/SlowFast order pools x before the convs: no Sequential, plain keys.
    assert keys(NonLocal2d(8, sub_sample=True, pool_before_conv=True)) == keys(NonLocal2d(8))


def test_a_state_dict_round_trips_between_blocks():
    a, b = NonLocal3d(8, sub_sample=True, zeros_init=False), NonLocal3d(8, sub_sample=True)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(1, 8, 2, 4, 4)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("dim,shape,m", [(1, (1, 4, 9), 4), (2, (1, 4, 5, 7), 6),
                                         (3, (1, 4, 3, 5, 7), 18)])
def test_sub_sampling_on_odd_sizes(dim, shape, m):
    block = CLASSES[dim](4, sub_sample=True, zeros_init=False)
    x = torch.randn(*shape)
    seen = {}
    import nonlocal_kernels.modules as mod
    orig = mod.nonlocal_attention

    def spy(theta, phi, g, **kw):
        seen["N"], seen["M"] = theta.shape[1], phi.shape[1]
        seen["strides"] = theta.stride()
        return orig(theta, phi, g, **kw)
    mod.nonlocal_attention = spy
    try:
        assert block(x).shape == x.shape
    finally:
        mod.nonlocal_attention = orig
    assert seen["N"] == math.prod(shape[2:]) and seen["M"] == m
    assert seen["strides"][2] != 1  # channels-first view, not a permuted copy


def test_pool_before_conv_equals_pool_after_for_1x1_convs_and_max_pool_of_affine():
    # Max-pooling commutes with a 1x1 conv only for monotone maps; with a positive scalar
    # weight per channel and one channel it does, which pins the order's plumbing.
    a = NonLocal2d(1, inter_channels=1, sub_sample=True, zeros_init=False)
    b = NonLocal2d(1, inter_channels=1, sub_sample=True, pool_before_conv=True, zeros_init=False)
    for blk in (a, b):
        for m in (blk.theta, blk.conv_out):
            torch.nn.init.constant_(m.conv.weight, 0.5)
    with torch.no_grad():
        b.g.conv.weight.copy_(a.g[0].conv.weight.abs())
        a.g[0].conv.weight.abs_()
        b.phi.conv.weight.copy_(a.phi[0].conv.weight.abs())
        a.phi[0].conv.weight.abs_()
    x = torch.randn(2, 1, 6, 5)
    assert max_abs_diff(a(x), b(x)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_autocast(dtype, mode):
    block = NonLocal3d(16, mode=mode, sub_sample=True, zeros_init=False, std=0.1)
    x = torch.randn(2, 16, 2, 6, 6)
    with torch.no_grad():
        want = block(x)
    with torch.autocast("cpu", dtype=dtype):
        z = block(x)
    assert z.dtype == torch.float32
    delta = (want - x).abs().max().item()
    assert max_abs_diff(z, want) <= 0.05 * delta + 1e-6
    z.sum().backward()
    assert all(p.grad is not None for p in block.parameters())


@pytest.mark.parametrize("sub_sample", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_blocks_built_on_the_meta_device(dim, mode, sub_sample):
    # A model built on the meta device (then to_empty / load_state_dict) holds blocks whose
    # forward gives the output's shape without running a kernel, on auto's backend.
    shape = {1: (2, 8, 9), 2: (2, 8, 9, 7), 3: (2, 8, 3, 9, 7)}[dim]
    block = NonLocalBlock(8, dim=dim, mode=mode, sub_sample=sub_sample, norm="bn").to("meta")
    z = block(torch.empty(shape, device="meta"))
    assert z.device.type == "meta" and z.shape == shape and z.dtype == torch.float32
    real = block.to_empty(device="cpu")
    real.init_weights()
    real.conv_out.bn.reset_running_stats()
    assert real(torch.randn(shape)).shape == shape


@pytest.mark.parametrize("dim,fmt", [(2, torch.channels_last), (3, torch.channels_last_3d)])
@pytest.mark.parametrize("mode", MODES)
def test_channels_last(dim, fmt, mode):
    block = CLASSES[dim](8, mode=mode, sub_sample=True, zeros_init=False, std=0.2).double()
    x = torch.randn(*SHAPES[dim], dtype=torch.float64)
    xc = x.to(memory_format=fmt).requires_grad_()
    z = block(xc)
    assert max_abs_diff(z, block(x)) < 1e-10
    z.sum().backward()
    assert xc.grad.shape == x.shape


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="cosine"), "mode: unknown mode"),
    (dict(norm="gn"), "norm: expected None or 'bn'"),
    (dict(dim=4), "dim: expected 1, 2 or 3"),
    (dict(mode="dot_product", scale=0.5), "scale: applies to the softmax modes only"),
    (dict(pool_before_conv=True), "pool_before_conv: needs sub_sample=True"),
    (dict(reduction=0), "reduction: expected a positive int"),
    (dict(inter_channels=0), "inter_channels: expected a positive int"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NonLocalBlock(8, **kwargs)


def test_bad_inputs():
    block = NonLocal2d(8, sub_sample=True)
    with pytest.raises(ValueError, match="x: expected a 4-D input"):
        block(torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match="x: expected 8 channels"):
        block(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="every spatial size must be >= 2"):
        block(torch.randn(2, 8, 1, 5))
    # Time is never pooled: T = 1 is fine in 3-D.
    assert NonLocal3d(8, sub_sample=True)(torch.randn(1, 8, 1, 4, 4)).shape == (1, 8, 1, 4, 4)


def test_scale_options():
    assert NonLocal2d(8).scale == pytest.approx(1 / math.sqrt(4))
    assert NonLocal2d(8, use_scale=False).scale == 1.0
    assert NonLocal2d(8, scale=0.25).scale == 0.25
    assert NonLocal2d(8, mode="gaussian").scale == 1.0
    assert NonLocal2d(8, mode="dot_product").scale is None
    assert NonLocal2d(8, inter_channels=3).inter_channels == 3
    assert NonLocal2d(3, reduction=4).inter_channels == 1
