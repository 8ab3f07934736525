"""One training step of a NonLocal3d block whose clip is split by frames over the processes of
a group (context parallelism, docs/design.md section 10):

    torchrun --nproc_per_node=4 scripts/context_parallel_example.py     # gloo on CPU, NCCL on GPUs

Each process holds a slab of the clip's frames; the block attends over the whole clip. The
parameters are replicated, so their gradients are all-reduced over the group: here by
DistributedDataParallel over a second group of the same ranks (DDP's collectives then never
interleave with the block's own, which use the context-parallel group).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from nonlocal_kernels import NonLocal3d, distributed


def train_step(cp_group, device, clip=(1, 64, 8, 14, 14)):
    """The block's output slab and the block (its parameters' .grad: the whole clip's)."""
    torch.manual_seed(0)  # the same weights and the same clip on every rank
    block = NonLocal3d(clip[1], sub_sample=True, norm="bn", zeros_init=False,
                       cp_group=cp_group).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(
        block, process_group=dist.new_group(dist.get_process_group_ranks(cp_group)))
    x = torch.randn(clip, device=device)  # each rank would usually load only its own frames
    x_r = distributed.shard_frames(x, cp_group)  # (n, C, T_r, H, W)
    z_r = ddp(x_r)
    # The clip's loss (here the mean of z^2) is the sum of the ranks' terms; DDP averages the
    # gradients over its P ranks, so each term is scaled by P to make that average the sum.
    loss_r = z_r.square().sum() / x.numel() * dist.get_world_size(cp_group)
    loss_r.backward()
    return z_r.detach(), block


def main():
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun's env:// rendezvous
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    z_r, block = train_step(dist.group.WORLD, device)
    z = distributed.gather_frames(z_r, dist.group.WORLD)  # the whole clip's output
    if rank == 0:
        print(f"output {tuple(z.shape)}, |dW_theta| {block.theta.conv.weight.grad.norm():.4g}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
