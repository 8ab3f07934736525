"""Train a small video classifier whose only way to compare frames is a non-local block.

    python -m nonlocal_kernels.examples.train                 # CPU: minutes; a GPU when present
    python -m nonlocal_kernels.examples.train --no-nonlocal   # the same network without the block

The task, on fresh synthetic clips every step: a clip holds T frames of faint noise, and each
frame one small random colour patch at a random place. Frame 0's patch appears again in exactly
one other frame, somewhere else (it moved); every other frame holds a patch of its own. Which
frame holds the copy? The patches are drawn anew for every clip, so no pattern can be learnt:
the network has to compare what frame 0 shows with every position of every other frame. Its
convolutions see 3 x 3 pixels of one frame (their temporal kernel is 1) and its classifier reads
frame 0 only, so the non-local block, which relates every position of the clip to every other,
is its only way across frames. Without the block (``--no-nonlocal``) it stays at chance,
1 / (T - 1).

It trains with Adam for ``--steps`` steps on ``--backend`` (default auto: the library's fused
kernel), shows a progress bar (on stderr), and writes into ``--out``: ``loss.png`` (loss and
accuracy over the steps) and ``results.json``. The accuracy reached is measured on held-out
clips at the end. Then it times training steps with ``backend="auto"`` and with
``backend="reference"`` (which forms the N x N affinity) at the same size and prints time and
peak memory per step, each backend in a fresh process (CPU: the process's peak RSS growth over
model and batch; GPU: max_memory_allocated).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from .. import NonLocal3d
from ..backends import registry
from ..progress import Progress


# ------------------------------------------------------------------------------------------
# The task
# ------------------------------------------------------------------------------------------
def make_clips(n: int, frames: int, size: int, patch: int, generator: torch.Generator):
    """(clips (n, 3, T, size, size), labels (n,)): faint noise and one random +-1 colour patch
    per frame at a random place; frame 0's patch appears again in frame ``labels + 1``."""
    clips = 0.3 * torch.randn(n, 3, frames, size, size, generator=generator)
    patches = torch.randn(n, frames, 3, patch, patch, generator=generator).sign()
    labels = torch.randint(frames - 1, (n,), generator=generator)
    rows = torch.arange(n)
    patches[rows, labels + 1] = patches[rows, 0]  # frame 0's patch, moved to another frame
    where = torch.randint(size - patch + 1, (n, frames, 2), generator=generator).tolist()
    for b in range(n):
        for t in range(frames):
            y, x = where[b][t]
            clips[b, :, t, y:y + patch, x:x + patch] = patches[b, t]
    return clips, labels


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------
class PatchFinder(nn.Module):
    """Per-frame convolutions (3 x 3 pixels of one frame), a one-hot code of each position's
    frame in extra channels, a NonLocal3d block over the whole clip, and a classifier that reads
    frame 0 only.

    The block's queries and keys start out equal (theta and phi share their initial weights,
    zero on the code channels): a position's affinity is highest with the same content, its
    own and the copy in another frame. Its value g carries the code channels, so what it brings
    back to frame 0's patch says in which frame the copy was. Without the block (``--no-nonlocal``)
    frame 0's features never meet another frame's."""

    def __init__(self, frames: int, width: int = 32, backend: str = "auto",
                 nonlocal_block: bool = True):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(3, width, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(width), nn.ReLU(),
            nn.Conv3d(width, width, 1), nn.BatchNorm3d(width), nn.ReLU())
        channels = width + frames
        self.block = nn.Identity()
        if nonlocal_block:
            self.block = NonLocal3d(channels, inter_channels=width, use_scale=False,
                                    backend=backend)
            with torch.no_grad():
                w = self.block.theta.conv.weight
                w.normal_(0, width ** -0.5)
                w[:, width:] = 0
                self.block.phi.conv.weight.copy_(w)
        self.head = nn.Sequential(nn.Conv2d(channels, 2 * width, 1), nn.ReLU())
        self.classify = nn.Linear(2 * width, frames - 1)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        h = self.stem(clips)
        n, _, T, H, W = h.shape
        code = torch.eye(T, dtype=h.dtype, device=h.device).view(1, T, T, 1, 1)
        h = self.block(torch.cat([h, code.expand(n, T, T, H, W)], 1))
        h = self.head(h[:, :, 0]).amax(dim=(2, 3))  # frame 0, its strongest responses
        return self.classify(h)                     # (n, T - 1): which frame holds the copy


def build(args, backend: str):
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = PatchFinder(args.frames, args.width, backend, not args.no_nonlocal).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    return model, opt, device


def train_step(model, opt, clips, labels) -> tuple:
    """One Adam step; (loss, accuracy of the batch)."""
    logits = model(clips)
    loss = nn.functional.cross_entropy(logits, labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item(), (logits.argmax(1) == labels).float().mean().item()


@torch.no_grad()
def accuracy(model, args, device, generator, clips_total: int) -> float:
    model.eval()
    right = 0
    for start in range(0, clips_total, args.batch):
        clips, labels = make_clips(min(args.batch, clips_total - start), args.frames, args.size,
                                   args.patch, generator)
        right += (model(clips.to(device)).argmax(1).cpu() == labels).sum().item()
    model.train()
    return right / clips_total


# ------------------------------------------------------------------------------------------
# Time and memory per step, one backend in a fresh process
# ------------------------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


BACKENDS = ("auto", "reference")


def _primed(args, backend: str, gen: torch.Generator):
    """A model and optimizer after one step on two clips (what is allocated once: thread
    pools, the optimizer's state), and a batch."""
    model, opt, device = build(args, backend)
    train_step(model, opt, *(t.to(device) for t in make_clips(2, args.frames, args.size,
                                                              args.patch, gen)))
    clips, labels = make_clips(args.batch, args.frames, args.size, args.patch, gen)
    return model, opt, clips.to(device), labels.to(device)


def measure(args) -> dict:
    """``--measure memory:BACKEND``: the peak memory of ``--measure-steps`` training steps on
    BACKEND above what the primed model, optimizer and batch hold. ``--measure time``: the
    median time of a step on each backend, timed in rounds of one step each (the order turned
    every round, after a round of warm-up), so that a shared machine's changes of speed hit
    both alike."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(args.seed + 1)
    if args.measure == "time":
        runs = {b: _primed(args, b, gen) for b in BACKENDS}
        times = {b: [] for b in BACKENDS}
        for i in range(args.measure_steps + 1):
            for b in BACKENDS[::-1] if i % 2 else BACKENDS:
                t0 = time.perf_counter()
                train_step(*runs[b])  # .item() waits for the GPU
                times[b].append(time.perf_counter() - t0)
        return {b: statistics.median(t[1:]) * 1e3 for b, t in times.items()}
    run = _primed(args, args.measure.split(":", 1)[1], gen)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss()
    for _ in range(args.measure_steps):
        train_step(*run)
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    return {"peak_mb": max(peak, 0) / 2**20}


def compare_backends(argv: list) -> dict:
    """{backend: {"ms": ..., "peak_mb": ...}}: each backend's memory in a fresh process, then
    both timed in one more."""
    out = {b: {} for b in BACKENDS}
    for what in [f"memory:{b}" for b in BACKENDS] + ["time"]:
        cmd = [sys.executable, "-m", "nonlocal_kernels.examples.train", *argv, "--measure", what]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("TRAIN-MEASURE ")]
        if proc.returncode != 0 or not line:
            raise RuntimeError(f"measuring {what} failed:\n{proc.stderr[-3000:]}")
        res = json.loads(line[0].split(" ", 1)[1])
        if what == "time":
            for b in BACKENDS:
                out[b]["ms"] = res[b]
        else:
            out[what.split(":")[1]].update(res)
    return out


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------
def plot(history: dict, path: str, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps = range(1, len(history["loss"]) + 1)
    ax.plot(steps, history["loss"], color="tab:blue", alpha=0.35, lw=0.8)
    ax.plot(steps, _smooth(history["loss"]), color="tab:blue", label="loss (smoothed)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss", color="tab:blue")
    ax.grid(True, alpha=0.3)
    acc = ax.twinx()
    acc.plot(steps, _smooth(history["accuracy"]), color="tab:orange",
             label="batch accuracy (smoothed)")
    acc.axhline(history["chance"], color="tab:gray", ls="--", lw=0.8, label="chance")
    acc.set_ylim(0, 1)
    acc.set_ylabel("accuracy", color="tab:orange")
    fig.legend(loc="center left", bbox_to_anchor=(0.1, 0.55), fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _smooth(values: list, k: int = 20) -> list:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - k] if i >= k else 0.0)
        out.append(total / min(i + 1, k))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m nonlocal_kernels.examples.train",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--frames", type=int, default=6, help="T frames per clip")
    p.add_argument("--size", type=int, default=12, help="frames are size x size pixels")
    p.add_argument("--patch", type=int, default=3, help="the patches are patch x patch pixels")
    p.add_argument("--width", type=int, default=32, help="channels of the network")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", help="the block's backend for the training run")
    p.add_argument("--no-nonlocal", action="store_true", help="the network without its "
                   "non-local block (it then stays at chance)")
    p.add_argument("--eval-clips", type=int, default=1024, help="held-out clips for the "
                   "accuracy reached")
    p.add_argument("--measure-steps", type=int, default=5, help="timed steps per backend in "
                   "the auto-against-reference comparison (0: none)")
    p.add_argument("--out", default="train-out", help="folder for loss.png and results.json")
    p.add_argument("--progress", default="auto", choices=["auto", "live", "compact", "off"])
    p.add_argument("--measure", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.patch > args.size or args.frames < 2:
        p.error("--patch: must fit in a frame, and a clip needs two frames or more")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.measure:
        print("TRAIN-MEASURE " + json.dumps(measure(args)), flush=True)
        return 0
    model, opt, device = build(args, args.backend)
    classes = args.frames - 1
    N = args.frames * args.size * args.size
    probe = torch.empty(1, 2, 2, device=device)
    auto, picked = (registry.select(b, probe, probe, probe, "embedded_gaussian").name
                    for b in ("auto", args.backend))
    picked = "" if args.no_nonlocal else picked
    print(f"clips of {args.frames} frames of {args.size}x{args.size} ({N} positions), "
          f"batch {args.batch}, {args.steps} steps on {device}; "
          + (f"NonLocal3d({args.width + args.frames}) on backend {args.backend} ({picked})"
             if picked else "no non-local block") + f"; chance {1 / classes:.3f}", flush=True)

    gen = torch.Generator().manual_seed(args.seed + 2)
    history = {"loss": [], "accuracy": [], "chance": 1 / classes}
    t0 = time.perf_counter()
    with Progress(args.steps, "steps", mode=args.progress) as bar:
        for step in range(args.steps):
            clips, labels = make_clips(args.batch, args.frames, args.size, args.patch, gen)
            loss, acc = train_step(model, opt, clips.to(device), labels.to(device))
            history["loss"].append(loss)
            history["accuracy"].append(acc)
            recent = history["accuracy"][-20:]
            bar.update(step + 1, f"loss {loss:.3f}, accuracy {sum(recent) / len(recent):.2f}")
    train_s = time.perf_counter() - t0
    held_out = accuracy(model, args, device, torch.Generator().manual_seed(args.seed + 3),
                        args.eval_clips)
    print(f"trained in {train_s:.0f} s ({train_s / args.steps * 1e3:.0f} ms per step, data "
          f"included); accuracy on {args.eval_clips} held-out clips: {held_out:.3f} "
          f"(chance {1 / classes:.3f})", flush=True)

    os.makedirs(args.out, exist_ok=True)
    results = {"args": {k: v for k, v in vars(args).items() if k != "measure"},
               "backend_picked": picked, "train_s": train_s, "held_out_accuracy": held_out,
               "chance": 1 / classes, "loss": history["loss"], "accuracy": history["accuracy"]}
    if args.measure_steps > 0 and not args.no_nonlocal:
        cmp = compare_backends([a for a in argv if a != "--no-nonlocal"])
        results["per_step"] = cmp
        print(f"\ntraining step (forward, backward, Adam), batch {args.batch}, N = M = {N}: "
              f"median of {args.measure_steps} steps in alternation after a warm-up; peak "
              f"memory of each in a fresh process:")
        print("| backend | ms per step | peak memory MB |\n|---|---|---|")
        for name, r in cmp.items():
            label = f"auto ({auto})" if name == "auto" else name
            print(f"| {label} | {r['ms']:.0f} | {r['peak_mb']:.0f} |")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    title = (f"PatchFinder, {args.frames} frames of {args.size}x{args.size}, batch {args.batch}, "
             f"{'backend ' + picked if picked else 'no non-local block'}; held-out accuracy "
             f"{held_out:.2f}")
    if plot(history, os.path.join(args.out, "loss.png"), title):
        print(f"\nwrote {os.path.join(args.out, 'loss.png')} and results.json")
    else:
        print("\nmatplotlib is not installed: wrote results.json only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
