"""A converted peer model trains under DistributedDataParallel: P processes, each on its share
of the batch, give the parameter gradients (and the BN running statistics) of one process on
the whole batch, in float64.

The model is mmaction2's I3D-NL backbone (ResNet3d with non-local blocks, small width) with a
linear head, its Non-local blocks converted by nonlocal_kernels.convert.

Batch norm is what could make the comparison dishonest: in training mode each BN layer
normalises with the statistics of the batch it sees, so P processes with plain BN compute
another function than one process on the whole batch (the control below shows that the
gradients then differ). The equivalence holds when BN's statistics are those of the whole
batch, which is what SyncBatchNorm gives: on NCCL, torch's nn.SyncBatchNorm
(convert_sync_batchnorm); on gloo, whose CPU tensors torch's SyncBatchNorm refuses, every BN
layer runs nonlocal_kernels.distributed.batch_norm over the group, the synchronised batch norm
the blocks use under context parallelism (sums and counts all-reduced, running statistics
updated as BatchNorm's). It also holds with BN frozen in eval mode (mmaction2's norm_eval, the
usual setting for fine-tuning), checked too. The loss is the mean over each process's share;
DDP averages the gradients over the P processes, which makes the mean over the whole batch.

Processes: testing.run_spawned (a FileStore in a temporary folder, a short collective timeout,
every rank's traceback as soon as one fails). The NCCL variant is marked gpu.
"""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import nonlocal_kernels as nk
from nonlocal_kernels import distributed
from nonlocal_kernels.testing import run_spawned

pytest.importorskip("mmcv.cnn.bricks.non_local")
pytest.importorskip("mmaction")

CLASSES = 5
CLIP = (3, 4, 32, 32)  # (C, T, H, W) of one clip
PER_RANK = 2  # clips per process


def make_model(seed: int) -> nn.Module:
    """I3D-NL (mmaction2 ResNet3d, base width 8, non-local blocks in res3 and res4) and a linear
    head, random non-zero weights in its Non-local blocks, converted, in float64."""
    from test_convert import import_mmaction, randomize

    ResNet3d, _ = import_mmaction()
    torch.manual_seed(seed)
    backbone = ResNet3d(depth=50, pretrained=None, pretrained2d=False, base_channels=8,
                        non_local=((0, 0, 0), (1, 0, 1, 0), (1, 0, 1, 0, 1, 0), (0, 0, 0)),
                        non_local_cfg=dict(sub_sample=True, use_scale=False,
                                           mode="embedded_gaussian",
                                           norm_cfg=dict(type="BN3d", requires_grad=True)))
    model = nn.Sequential(backbone, nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                          nn.Linear(8 * 32, CLASSES))
    randomize(model)
    nk.convert(model)
    assert len(nk.converted_blocks(model)) == 5
    return model.double()


def make_batch(seed: int, clips: int):
    gen = torch.Generator().manual_seed(seed + 1)
    return (torch.randn((clips,) + CLIP, dtype=torch.float64, generator=gen),
            torch.randint(CLASSES, (clips,), generator=gen))


def bn_layers(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def sync_batch_norms(model: nn.Module, group) -> nn.Module:
    """Every BN layer with the statistics of the whole batch over ``group`` in training
    (distributed.batch_norm); eval mode unchanged. torch's SyncBatchNorm does this for GPUs."""
    def forward(self, x):
        if not self.training:
            return type(self).forward(self, x)
        return distributed.batch_norm(x, self, group)
    for m in bn_layers(model):
        m.forward = types.MethodType(forward, m)
    return model


def one_step(model, x, labels, bn):
    """Gradients and BN running statistics after a forward and backward of the mean loss.
    ``bn``: "train" (batch statistics) or "frozen" (BN in eval mode, the rest training)."""
    model.train()
    if bn == "frozen":
        for m in bn_layers(model):
            m.eval()
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), labels).backward()
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    grads = {n: p.grad.detach().clone() for n, p in inner.named_parameters()}
    stats = {n: b.detach().clone() for n, b in inner.named_buffers() if b.is_floating_point()}
    return grads, stats


CASES = [("synced", "train"), ("frozen", "frozen"), ("unsynced", "train")]


def ddp_worker(rank, size, seed, device):
    """Each case on this rank's share of the batch, under DDP."""
    import torch.distributed as dist

    x, labels = make_batch(seed, PER_RANK * size)
    x, labels = x.chunk(size)[rank].to(device), labels.chunk(size)[rank].to(device)
    out = {}
    for name, bn in CASES:
        if name == "unsynced" and size == 1:
            continue
        model = make_model(seed).to(device)
        if name == "synced":
            if device == "cpu":
                sync_batch_norms(model, dist.group.WORLD)
            else:
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=None)
        grads, stats = one_step(ddp, x, labels, bn)
        out[name] = ({k: v.cpu() for k, v in grads.items()}, {k: v.cpu() for k, v in stats.items()})
    return out


def relative_error(got: dict, want: dict) -> float:
    """max over tensors of max|got - want|, over the largest |want| of them all."""
    assert list(got) == list(want)
    scale = max(w.abs().max().item() for w in want.values())
    return max((got[k] - want[k]).abs().max().item() for k in want) / scale


def check_against_one_process(results: list, seed: int, size: int):
    x, labels = make_batch(seed, PER_RANK * size)
    for name, bn in CASES:
        if name not in results[0]:
            continue
        want_grads, want_stats = one_step(make_model(seed), x, labels, bn)
        for rank, res in enumerate(results):
            grads, stats = res[name]
            errors = relative_error(grads, want_grads), relative_error(stats, want_stats)
            print(f"{name} BN, rank {rank}: gradients {errors[0]:.1e}, running statistics "
                  f"{errors[1]:.1e} (relative to the largest)")
            if name == "unsynced":
                # Plain BN normalises each share by its own statistics: another function.
                assert errors[0] > 1e-3, "the control: unsynchronised BN should differ"
            else:
                # Equal up to float64 rounding. Train-mode BN at the last stage normalises few
                # elements per channel (2 clips x 2 frames x 1 x 1 per process), which makes
                # rounding grow: seen up to 1e-10 (the control's error is above 1e-3).
                assert max(errors) < 1e-8, (name, rank, errors)


def test_ddp_on_gloo_matches_one_process_on_the_whole_batch(fresh_seed):
    results = run_spawned(ddp_worker, 2, fresh_seed, "cpu", timeout_s=240, group_timeout_s=60)
    check_against_one_process(results, fresh_seed, 2)


@pytest.mark.gpu
def test_ddp_on_nccl_matches_one_process_on_the_whole_batch(fresh_seed):
    size = min(2, torch.cuda.device_count())  # NCCL takes one GPU per process
    results = run_spawned(ddp_worker, size, fresh_seed, "cuda", backend="nccl", timeout_s=240,
                          group_timeout_s=60)
    check_against_one_process(results, fresh_seed, size)
