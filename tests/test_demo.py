"""`make demo` end to end (batch 1 to keep it short)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_best_backend_against_reference():
    out = subprocess.run([sys.executable, "-m", "nonlocal_kernels.demo", "--batch", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "N=3136, M=784, inter_channels=256" in out.stdout
    assert re.search(r"\| reference \| [0-9.]+ \| [0-9]+ \|", out.stdout)
    m = re.search(r"max\|z error\| ([0-9.e+-]+) .* max\|dx error\| ([0-9.e+-]+)", out.stdout)
    assert m and float(m.group(1)) < 1e-3 and float(m.group(2)) < 1e-3
