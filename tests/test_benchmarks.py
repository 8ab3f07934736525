"""The benchmark CLI end to end on tiny shapes: table, JSON, plots, and OOM reported, not dropped."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(tmp_path, *args):
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--out", str(tmp_path), *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "results.json") as f:
        return out.stdout, json.load(f)


def test_cli_measures_every_method_and_writes_table_and_plots(tmp_path):
    stdout, res = run_cli(tmp_path, "--shape", "1,96,40,16,8", "--shape", "2,50,30,8,8",
                          "--backends", "naive,sdpa", "--repeats", "2", "--budget", "1")
    rows = res["rows"]
    assert [(r["shape"], r["method"]) for r in rows] == [
        ("(1, 96, 40, 16, 8)", "naive"), ("(1, 96, 40, 16, 8)", "sdpa"),
        ("(2, 50, 30, 8, 8)", "naive"), ("(2, 50, 30, 8, 8)", "sdpa")]
    for r in rows:
        assert r["status"] == "ok"
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
        assert r["peak_fwd_bytes"] >= 0 and r["peak_fwd_bwd_bytes"] >= 0
    assert rows[0]["fwd_flops"] == 2 * 96 * 40 * (16 + 8)
    assert "| (1, 96, 40, 16, 8) | naive |" in stdout
    assert "AMD" in res["machine"] or "cores" in res["machine"]
    for name in ("results.md", "time.png", "memory.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_cli_reports_out_of_memory_instead_of_dropping_the_case(tmp_path):
    # The naive N x M affinity would be 160 GB: the case process hits its address-space limit.
    _, res = run_cli(tmp_path, "--shape", "1,200000,200000,8,8", "--backends", "naive",
                     "--mem-limit-gb", "4", "--fwd-only", "--no-plots")
    (row,) = res["rows"]
    assert row["status"].startswith("fwd: OOM")
    assert "fwd_ms" not in row


@pytest.mark.parametrize("args,match", [(["--shape", "1,2,3"], "--shape: expected B,N,M,dk,dv"),
                                        (["--quick", "--backends", "nope"], "unknown method")])
def test_cli_rejects_bad_arguments(tmp_path, args, match):
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--out", str(tmp_path), *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and match in out.stderr
