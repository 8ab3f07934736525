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
    # torch_sdpa_flash forces SDPA's flash kernel: it runs on the benchmark's channels-first
    # inputs (the baseline hands it (B, 1, L, d) with a unit last-dim stride; before, every
    # fused SDPA kernel refused them with "No available kernel"). It needs dk == dv.
    stdout, res = run_cli(tmp_path, "--shape", "1,96,40,16,16", "--shape", "2,50,30,8,8",
                          "--backends", "naive,torch_sdpa_flash", "--repeats", "2",
                          "--budget", "1")
    rows = res["rows"]
    assert [(r["shape"], r["method"]) for r in rows] == [
        ("(1, 96, 40, 16, 16)", "naive"), ("(1, 96, 40, 16, 16)", "torch_sdpa_flash"),
        ("(2, 50, 30, 8, 8)", "naive"), ("(2, 50, 30, 8, 8)", "torch_sdpa_flash")]
    for r in rows:
        assert r["status"] == "ok"
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
        assert r["peak_fwd_bytes"] >= 0 and r["peak_fwd_bwd_bytes"] >= 0
    assert rows[0]["fwd_flops"] == 2 * 96 * 40 * (16 + 16)
    assert "| (1, 96, 40, 16, 16) | naive |" in stdout
    assert "AMD" in res["machine"] or "cores" in res["machine"]
    for name in ("results.md", "time.png", "memory.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_cli_cpu_timing_processes_keep_the_heap_unless_told_not_to(tmp_path, monkeypatch):
    """--cpu-heap keep (the default) runs the CPU timing process with KEEP_HEAP_ENV, and the
    rows and results.md say so; --cpu-heap default passes this environment's MALLOC_* on."""
    from benchmarks.runner import KEEP_HEAP_ENV
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    here = {k: v for k, v in os.environ.items()
            if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"}
    args = ("--shape", "1,24,16,8,8", "--backends", "naive", "--repeats", "1", "--warmup", "0",
            "--budget", "1", "--no-plots", "--device", "cpu")
    _, res = run_cli(tmp_path / "keep", *args)
    assert res["rows"][0]["timing_malloc_env"] == dict(here, **KEEP_HEAP_ENV)
    assert "keep glibc's heap (MALLOC_MMAP_THRESHOLD_=33554432" in (
        tmp_path / "keep" / "results.md").read_text()
    _, res = run_cli(tmp_path / "default", *args, "--cpu-heap", "default")
    assert res["rows"][0]["timing_malloc_env"] == here
    assert "glibc's heap as configured" in (tmp_path / "default" / "results.md").read_text()


def test_cli_rows_say_which_cpu_path_ran(tmp_path):
    from nonlocal_kernels.backends import registry
    if registry.get("cpu").unavailable_reason() is not None:
        pytest.skip("backend cpu is not built")
    stdout, res = run_cli(tmp_path, "--shape", "1,64,40,8,8", "--backends", "cpu,cpu_tiled",
                          "--repeats", "2", "--budget", "1", "--no-plots")
    assert [(r["method"], r["path"]) for r in res["rows"]] == [
        ("cpu", "scores kept"), ("cpu_tiled", "recomputes S")]
    assert "| cpu (scores kept) |" in stdout and "| cpu_tiled (recomputes S) |" in stdout


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


def test_interleaved_timing_reports_a_failing_method_and_times_the_others(monkeypatch):
    from benchmarks import baselines
    from benchmarks.runner import time_interleaved

    calls = []

    def fails_on_the_case(theta, phi, g, w, mode, scale):
        calls.append(theta.shape[1])
        if theta.shape[1] > 16:  # the tiny priming problem (N = 16) passes, the case fails
            raise RuntimeError("planted failure")
        return theta @ phi.transpose(1, 2) @ g

    monkeypatch.setitem(baselines.BASELINES, "planted",
                        (fails_on_the_case, None, ("cpu",), "fails on the case"))
    spec = {"case": [1, 40, 24, 8, 8], "mode": "embedded_gaussian", "dtype": "float32",
            "device": "cpu", "methods": ["naive", "planted", "torch_sdpa"],
            "steps": {"fwd": ["naive", "planted", "torch_sdpa"],
                      "fwd_bwd": ["naive", "planted", "torch_sdpa"]},
            "repeats": 4, "warmup": 1, "budget_s": 10.0}
    res = time_interleaved(spec)
    assert res["planted"] == {"status": "fwd timing: error: RuntimeError: planted failure"}
    assert calls == [16, 40]  # dropped after its failure, not called in later rounds or steps
    for m in ("naive", "torch_sdpa"):
        for step in ("fwd", "fwd_bwd"):
            assert res[m][f"{step}_ms"] > 0 and res[m][f"{step}_rounds"] == 4


def test_interleaved_timing_settles_each_method_before_its_timed_calls(monkeypatch):
    """settle = 2: every timed call of a method comes right after two untimed calls of the same
    method (the call sequence shows it); the per-call times cover the timed calls only."""
    from benchmarks import baselines
    from benchmarks.runner import time_interleaved

    sequence = []

    def counted(name):
        def run(theta, phi, g, w, mode, scale):
            if theta.shape[1] != 16:  # not the priming call
                sequence.append(name)
            return theta @ phi.transpose(1, 2) @ g
        return run

    for name in ("first", "second"):
        monkeypatch.setitem(baselines.BASELINES, name, (counted(name), None, ("cpu",), name))
    spec = {"case": [1, 40, 24, 8, 8], "mode": "embedded_gaussian", "dtype": "float32",
            "device": "cpu", "methods": ["first", "second"], "steps": {"fwd": ["first", "second"]},
            "repeats": 3, "warmup": 1, "settle": 2, "budget_s": 10.0}
    res = time_interleaved(spec)
    rounds = [sequence[i:i + 6] for i in range(0, len(sequence), 6)]
    assert rounds == [["first"] * 3 + ["second"] * 3, ["second"] * 3 + ["first"] * 3] * 2
    for m in ("first", "second"):
        assert res[m]["fwd_rounds"] == 3 and len(res[m]["fwd_round_ms"]) == 4
