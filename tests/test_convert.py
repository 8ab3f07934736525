"""nonlocal_kernels.convert on the real peer packages (mmcv-lite, mmaction2, pytorchvideo, timm)
and on test-local reproductions of the blocks that are not on PyPI (tests/peers: SlowFast,
AlexHex7), in float64: state dicts unchanged, outputs and every gradient (input, parameters) and
the BN running statistics equal to the original's within float64 rounding, in train and eval
mode, and no N x M tensor in the converted forward or backward."""

import copy
import logging
import sys
import types
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import nonlocal_kernels as nk
from nonlocal_kernels.convert import ConvertedNonLocal

from peers import (non_local_concatenation, non_local_dot_product, non_local_embedded_gaussian,
                   non_local_gaussian, randomize, slowfast_nonlocal_helper)

mmcv_nl = pytest.importorskip("mmcv.cnn.bricks.non_local")
ptv_nl = pytest.importorskip("pytorchvideo.layers.nonlocal_net")
timm = pytest.importorskip("timm")
from timm.layers.non_local_attn import NonLocalAttn  # noqa: E402

MODES = list(nk.modes.NAMES)


def import_mmaction():
    """mmaction2 1.2.0's wheel imports mmaction.models.localizers.drn, which it does not ship:
    stand a stub in for that one module, then import the package for real."""
    for name in ("mmaction.models.localizers.drn", "mmaction.models.localizers.drn.drn"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["mmaction.models.localizers.drn.drn"].DRN = type("DRN", (nn.Module,), {})
    import mmaction.models  # noqa: F401
    from mmaction.models.backbones.resnet3d import ResNet3d
    from mmaction.models.backbones.resnet_tsm import ResNetTSM
    return ResNet3d, ResNetTSM


def close(a, b, what, scale=None):
    """|a - b| <= 1e-9 of scale (default: max |b|): equal up to float64 rounding."""
    scale = max(b.detach().abs().max().item(), 1e-300) if scale is None else scale
    err = (a.detach() - b.detach()).abs().max().item()
    assert err <= 1e-9 * scale, f"{what}: max|err| {err:.3e} > 1e-9 x {scale:.3e}"


def run(model, x, train):
    model.train(train)
    x = x.clone().requires_grad_()
    y = model(x)
    dy = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1))
    (y * dy).sum().backward()
    return y, x.grad


def check_conversion(original: nn.Module, x: torch.Tensor, expect: int, grads: bool = True):
    """Convert a copy of ``original``; compare everything, in train and eval mode."""
    original = randomize(original).double()
    converted = copy.deepcopy(original)
    params_before = list(converted.parameters())
    nk.convert(converted)
    assert len(nk.converted_blocks(converted)) == expect
    assert all(a is b for a, b in zip(converted.parameters(), params_before))
    sd0, sd1 = original.state_dict(), converted.state_dict()
    assert list(sd0) == list(sd1)
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k
    for train in (True, False):
        for m in (original, converted):
            m.zero_grad(set_to_none=True)
        if grads:
            (y0, g0), (y1, g1) = run(original, x.double(), train), run(converted, x.double(), train)
            pairs = [("dx", g1, g0)] + [
                (name, p1.grad, p0.grad) for (name, p0), p1
                in zip(original.named_parameters(), converted.parameters()) if p0.grad is not None]
            # One scale for every gradient of the model: a parameter whose gradient is tiny
            # next to the others still carries the rounding of the whole backward.
            scale = max(ref.abs().max().item() for _, _, ref in pairs)
            for name, got, ref in pairs:
                close(got, ref, name, scale)
        else:
            with torch.no_grad():
                y0, y1 = original.train(train)(x.double()), converted.train(train)(x.double())
        close(y1, y0, "y")
        for (name, b0), b1 in zip(original.named_buffers(), converted.buffers()):
            if b0.is_floating_point():
                close(b1, b0, name)
    return original, converted


class NoAffinitySpy(TorchDispatchMode):
    """Records every op whose output has both an N-sized and an M-sized dim."""

    def __init__(self, N, M):
        super().__init__()
        self.N, self.M, self.found = N, M, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and self.N in t.shape and self.M in t.shape \
                    and t.numel() >= self.N * self.M:
                self.found.append((str(func), tuple(t.shape)))
        return out


def assert_no_affinity(model, x, N, M):
    spy = NoAffinitySpy(N, M)
    with spy:
        run(model, x, True)
    assert not spy.found, spy.found


# ------------------------------------------------------------------------------------------
# mmcv (and so mmaction2)
# ------------------------------------------------------------------------------------------
MMCV = {1: (mmcv_nl.NonLocal1d, (2, 6, 13)), 2: (mmcv_nl.NonLocal2d, (2, 6, 7, 5)),
        3: (mmcv_nl.NonLocal3d, (2, 6, 3, 6, 5))}


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("sub_sample", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_mmcv_blocks(dim, mode, sub_sample, norm):
    cls, shape = MMCV[dim]
    kw = dict(sub_sample=sub_sample, mode=mode, use_scale=dim != 2, zeros_init=False)
    if norm:
        kw["norm_cfg"] = dict(type=f"BN{dim}d", requires_grad=True)
    block = cls(6, **kw)
    x = torch.randn(shape)
    if mode != "concatenation":
        check_conversion(nn.Sequential(block), x, expect=1)
        return
    # mmcv's concatenation cannot run backward (it divides its ReLU's output in place): the
    # forward is checked against it, the gradients against this library's reference block.
    original, converted = check_conversion(nn.Sequential(block), x, expect=1, grads=False)
    with pytest.raises(RuntimeError, match="inplace"):
        run(original, x.double(), True)
    ref = nk.NonLocalBlock(6, dim=dim, backend="reference", **kw).double()
    ref.load_state_dict(original[0].state_dict())
    (y0, g0), (y1, g1) = run(ref, x.double(), True), run(converted, x.double(), True)
    close(y1, y0, "y")
    close(g1, g0, "dx")
    for (name, p0), p1 in zip(ref.named_parameters(), converted.parameters()):
        close(p1.grad, p0.grad, name)


@pytest.mark.parametrize("mode", MODES)
def test_no_n_by_m_tensor_in_a_converted_block(mode, monkeypatch):
    # x (2, 6, 3, 6, 5): N = 90 query positions; sub-sampled keys M = 3 * 3 * 2 = 18.
    # Below a memory budget the CPU kernel runs its whole-batch path over a B x N x M buffer
    # (docs/cpu.md, "Two paths"); with the budget at 0 nothing N x M may exist at all.
    monkeypatch.setenv("NONLOCAL_KERNELS_CPU_KEEP_MB", "0")
    block = nn.Sequential(mmcv_nl.NonLocal3d(6, sub_sample=True, mode=mode, zeros_init=False))
    nk.convert(randomize(block))
    assert_no_affinity(block, torch.randn(2, 6, 3, 6, 5), N=90, M=18)


I3D_NL_CFG = dict(sub_sample=True, use_scale=False, mode="embedded_gaussian",
                  norm_cfg=dict(type="BN3d", requires_grad=True))


def mmaction2_i3d_nl():
    """mmaction2's I3D-NL backbone (ResNet3d-50 with 5 Non-local blocks) at base width 8."""
    ResNet3d, _ = import_mmaction()
    return ResNet3d(depth=50, pretrained=None, pretrained2d=False, base_channels=8,
                    non_local=((0, 0, 0), (1, 0, 1, 0), (1, 0, 1, 0, 1, 0), (0, 0, 0)),
                    non_local_cfg=I3D_NL_CFG)


def test_mmaction2_i3d_nl_and_tsm_nl_backbones():
    _, ResNetTSM = import_mmaction()
    nl_cfg = I3D_NL_CFG
    i3d = mmaction2_i3d_nl()
    # Two clips and 64 x 64 frames: train-mode batch norm over fewer elements at the last
    # stage is so ill-conditioned that float64 rounding alone moves dx by 1e-8 relative.
    check_conversion(i3d, torch.randn(2, 3, 4, 64, 64), expect=5)
    tsm = ResNetTSM(depth=50, pretrained=None, pretrained2d=False, num_segments=2,
                    non_local=((0, 0, 0), (1, 0, 1, 0), (1, 0, 1, 0, 1, 0), (0, 0, 0)),
                    non_local_cfg=dict(nl_cfg, mode="dot_product"))
    tsm.init_weights()  # wraps the blocks (shift, non-local) as ResNetTSM does before use
    check_conversion(tsm, torch.randn(2, 3, 64, 64), expect=5)


def test_our_block_takes_mmaction2_non_local_cfg():
    cfg = dict(sub_sample=True, use_scale=False, mode="embedded_gaussian",
               norm_cfg=dict(type="BN3d", requires_grad=True))
    ours = nk.NonLocal3d(16, **cfg).double()
    theirs = randomize(mmcv_nl.NonLocal3d(16, **cfg)).double()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 16, 2, 6, 6, dtype=torch.float64)
    close(ours(x), theirs(x), "y")
    with pytest.raises(ValueError, match="norm_cfg"):
        nk.NonLocal3d(16, norm_cfg=dict(type="GN", num_groups=4))
    with pytest.raises(ValueError, match="norm_cfg: type 'BN2d'"):
        nk.NonLocal3d(16, norm_cfg=dict(type="BN2d"))
    with pytest.raises(ValueError, match="conv_cfg"):
        nk.NonLocal3d(16, conv_cfg=dict(type="DCN"))
    frozen = nk.NonLocal3d(16, norm_cfg=dict(type="BN3d", requires_grad=False))
    assert not any(p.requires_grad for p in frozen.conv_out.bn.parameters())


# ------------------------------------------------------------------------------------------
# pytorchvideo, timm
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", [None, nn.BatchNorm3d])
@pytest.mark.parametrize("pool_size", [None, (1, 2, 2), (2, 2, 2), (1, 3, 3)])
@pytest.mark.parametrize("instantiation", ["softmax", "dot_product"])
def test_pytorchvideo_nonlocal(instantiation, pool_size, norm):
    block = ptv_nl.create_nonlocal(dim_in=6, dim_inner=4, pool_size=pool_size,
                                   instantiation=instantiation, norm=norm)
    model = nn.Sequential(nn.Conv3d(3, 6, 1), block, nn.ReLU(),
                          ptv_nl.create_nonlocal(dim_in=6, dim_inner=3))
    check_conversion(model, torch.randn(2, 3, 4, 6, 6), expect=2)


def test_timm_nonlocal_attn_and_resnet18_with_nl_blocks():
    check_conversion(nn.Sequential(NonLocalAttn(16, rd_ratio=1 / 2)), torch.randn(2, 16, 7, 5),
                     expect=1)
    model = timm.create_model("resnet18", block_args=dict(attn_layer="nl"), num_classes=3)
    check_conversion(model, torch.randn(1, 3, 48, 40), expect=8)


# ------------------------------------------------------------------------------------------
# SlowFast and AlexHex7 (test-local reproductions, tests/peers)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pool_size", [None, (1, 2, 2), (2, 2, 2)])
@pytest.mark.parametrize("instantiation", ["softmax", "dot_product"])
def test_slowfast_nonlocal(instantiation, pool_size):
    block = slowfast_nonlocal_helper.Nonlocal(6, 4, pool_size=pool_size,
                                              instantiation=instantiation)
    check_conversion(nn.Sequential(block), torch.randn(2, 6, 4, 6, 5), expect=1)


ALEXHEX7 = [non_local_embedded_gaussian, non_local_gaussian, non_local_dot_product,
            non_local_concatenation]


@pytest.mark.parametrize("bn_layer", [True, False])
@pytest.mark.parametrize("sub_sample", [True, False])
@pytest.mark.parametrize("variant", ALEXHEX7, ids=lambda m: m.__name__.split(".")[-1])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_alexhex7_blocks(dim, variant, sub_sample, bn_layer):
    block = variant._NonLocalBlockND(6, dimension=dim, sub_sample=sub_sample, bn_layer=bn_layer)
    shape = {1: (2, 6, 13), 2: (2, 6, 7, 6), 3: (2, 6, 3, 6, 5)}[dim]
    original, converted = check_conversion(nn.Sequential(block), torch.randn(shape), expect=1)
    # The affinity map itself, when asked for, comes from the block's own forward.
    z, nl_map = converted[0](torch.randn(shape, dtype=torch.float64), return_nl_map=True)
    assert z.shape == shape and nl_map.dim() == 3


# ------------------------------------------------------------------------------------------
# What convert promises beyond the numbers
# ------------------------------------------------------------------------------------------
def test_checkpoints_load_both_ways_and_converting_twice_is_harmless(caplog):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(mmcv_nl.NonLocal2d(6, sub_sample=True),
                             nn.Sequential(NonLocalAttn(6, rd_ratio=1 / 2)),
                             nk.NonLocal2d(6))
    original, converted = randomize(make()), make()
    with caplog.at_level(logging.INFO, logger="nonlocal_kernels"):
        nk.convert(converted)
    assert "converted 2 block(s): 0 (mmcv NonLocal2d), 1.0 (timm NonLocalAttn)" in caplog.text
    converted.load_state_dict(original.state_dict())
    original.load_state_dict(converted.state_dict())
    x = torch.randn(2, 6, 8, 7)
    y0, y1 = converted.eval()(x), original.eval()(x)
    assert y1.stride() == y0.stride()  # the layout of the original's output too
    torch.testing.assert_close(y0, y1)
    blocks = nk.converted_blocks(converted)
    assert nk.convert(converted) is converted and nk.converted_blocks(converted) == blocks
    assert isinstance(converted[0], ConvertedNonLocal) and "mmcv" in repr(converted[0])
    assert isinstance(converted[2], nk.NonLocal2d)  # ours runs fused already: untouched
    torch.save(converted, "/dev/null")  # picklable


def test_a_block_that_cannot_be_told_apart_is_left_working_with_a_warning():
    # An AlexHex7-shaped block whose file name does not say embedded Gaussian or dot product.
    Anonymous = type("_NonLocalBlockND", (non_local_dot_product._NonLocalBlockND,),
                     {"__module__": "my_project.blocks"})
    model = nn.Sequential(Anonymous(6, dimension=2))
    x = torch.randn(1, 6, 5, 4)
    want = model(x)
    with pytest.warns(UserWarning, match=r"left 0 \(_NonLocalBlockND\) unconverted: its variant"):
        nk.convert(model)
    assert type(model[0]) is Anonymous and nk.converted_blocks(model) == []
    assert torch.equal(model(x), want)


def test_convert_refuses_a_bare_block_and_a_bad_backend():
    with pytest.raises(TypeError, match="model: is itself a Non-local block"):
        nk.convert(mmcv_nl.NonLocal2d(6))
    with pytest.raises(TypeError, match="backend"):
        nk.convert(nn.Sequential(), backend=None)


def test_converted_blocks_take_a_backend():
    model = nn.Sequential(mmcv_nl.NonLocal2d(6, zeros_init=False))
    nk.convert(model, backend="reference")
    assert model[0].nonlocal_backend == "reference"
    model(torch.randn(1, 6, 4, 4)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nk.convert(nn.Sequential(nn.Linear(2, 2)))  # nothing to convert: no warning
