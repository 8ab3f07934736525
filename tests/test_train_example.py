"""python -m nonlocal_kernels.examples.train: the task's clips hold what it says, and the
example runs end to end at a tiny size (a smoke test: it trains for a few steps, writes the
plot and the results, and compares backend auto with the reference). Its default run is
recorded in benchmarks/results/train-example-cpu-2026-11-30.md."""

import json
import os
import re
import subprocess
import sys

import torch

from nonlocal_kernels.examples.train import PatchFinder, make_clips

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_frame_0s_patch_appears_again_in_the_labelled_frame_only():
    gen = torch.Generator().manual_seed(torch.randint(2**31, ()).item())
    clips, labels = make_clips(64, 5, 9, 3, gen)
    # A patch is the only place where all three colours are +-1 (the noise is 0.3 std): find
    # each frame's 3 x 3 window of +-1 values and compare the frames' contents.
    windows = clips.unfold(3, 3, 1).unfold(4, 3, 1)  # (n, 3, T, 7, 7, 3, 3)
    exact = (windows.abs() == 1).all(dim=1).flatten(-2).all(-1)  # (n, T, 7, 7)
    for b in range(64):
        content = []
        for t in range(5):
            ys, xs = torch.nonzero(exact[b, t], as_tuple=True)
            assert len(ys) >= 1
            content.append(windows[b, :, t, ys[0], xs[0]])
        same = [t for t in range(1, 5) if torch.equal(content[t], content[0])]
        assert same == [labels[b].item() + 1]


def test_the_model_reads_other_frames_only_through_its_block():
    # Without the block, frame 0's logits do not depend on the other frames.
    model = PatchFinder(4, width=8, nonlocal_block=False).eval()
    x = torch.randn(2, 3, 4, 6, 6)
    y = x.clone()
    y[:, :, 1:] = torch.randn(2, 3, 3, 6, 6)
    assert torch.equal(model(x), model(y))
    model = PatchFinder(4, width=8).eval()
    with torch.no_grad():
        model.block.conv_out.conv.weight.normal_()  # a fresh block is the identity
    assert not torch.allclose(model(x), model(y))


def test_example_runs_at_a_tiny_size(tmp_path):
    out = subprocess.run([sys.executable, "-m", "nonlocal_kernels.examples.train", "--steps",
                          "4", "--frames", "3", "--size", "6", "--batch", "4", "--width", "8",
                          "--eval-clips", "8", "--measure-steps", "1", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"accuracy on 8 held-out clips: [0-9.]+ \(chance 0\.500\)", out.stdout)
    assert re.search(r"\| auto \((cpu|sdpa|triton|cuda)\) \| [0-9]+ \| [0-9]+ \|", out.stdout)
    assert re.search(r"\| reference \| [0-9]+ \| [0-9]+ \|", out.stdout)
    assert "4/4 steps" in out.stderr  # the progress, on stderr
    with open(tmp_path / "results.json") as f:
        res = json.load(f)
    assert len(res["loss"]) == 4 and all(v > 0 for v in res["loss"])
    assert set(res["per_step"]) == {"auto", "reference"}
    assert (tmp_path / "loss.png").stat().st_size > 0
