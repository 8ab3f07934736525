"""`make demo` end to end: the everyday case (batch 1 to keep it short); the long clip is what
`make demo` shows a newcomer, too long for the test suite (its code path is the same)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_best_backend_against_reference():
    out = subprocess.run([sys.executable, "-m", "nonlocal_kernels.demo", "--batch", "1",
                          "--cases", "everyday"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "N=3136, M=784" in out.stdout
    assert re.search(r"\| reference \| [0-9.]+ \| [0-9]+ \|", out.stdout)
    m = re.search(r"max\|z error\| ([0-9.e+-]+) .* max\|dx error\| ([0-9.e+-]+)", out.stdout)
    assert m and float(m.group(1)) < 1e-3 and float(m.group(2)) < 1e-3


def test_demo_refuses_an_unknown_case():
    out = subprocess.run([sys.executable, "-m", "nonlocal_kernels.demo", "--cases", "huge"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "--cases" in out.stderr
