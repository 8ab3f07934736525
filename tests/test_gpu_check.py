"""scripts/gpu_check.sh on a machine without a GPU (a dry run): seconds, every GPU step reported
as skipped for lack of a GPU, and at most 8 files in its output folder (what a device tool
brings back)."""

import os
import subprocess
import sys
import tarfile
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["build", "import", "tests", "bench", "sanitizer", "cuda-sanitizer", "triton-triage",
         "triton-sweep"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: gpu_check.sh would run")
def test_dry_run_skips_every_gpu_step_in_seconds_and_writes_at_most_8_files(tmp_path):
    out = tmp_path / "out"
    t0 = time.monotonic()
    res = subprocess.run(["bash", "scripts/gpu_check.sh", str(out)], cwd=ROOT, text=True,
                         capture_output=True, timeout=120,
                         env=dict(os.environ, PYTHON=sys.executable))
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, res.stdout + res.stderr
    assert elapsed < 60, elapsed
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert files == ["bundle.tgz", "log.txt", "summary.md"], files
    summary = (out / "summary.md").read_text()
    assert "| 1 | env | ok |" in summary
    for step in STEPS:
        assert f"| {step} | skipped: no GPU |" in summary, summary
    with tarfile.open(out / "bundle.tgz") as tar:
        assert {"./summary.md", "./log.txt"} <= set(tar.getnames())
