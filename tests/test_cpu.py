"""Backend ``cpu``: the C++ kernel (csrc/cpu/) against the float64 oracle.

Two paths: the whole-batch one (calls whose B·N·M scores fit NONLOCAL_KERNELS_CPU_KEEP_MB, every
small test input under the default budget) and the tiled one (above it; tests force it with a
budget of 0). On the tiled path, both GEMM paths (the Vectorized panel GEMM, default, and BLAS on tiles) and both kernel builds
(AVX2 and the portable one) are selected through NONLOCAL_KERNELS_CPU_* (read at every call);
tiny tiles (NONLOCAL_KERNELS_CPU_BM/BN) make small inputs span many ragged query and key tiles,
so the online-softmax rescaling and the backward's per-group partial sums all run.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from nonlocal_kernels import nonlocal_attention, ops
from nonlocal_kernels.backends import cpu as cpu_backend
from nonlocal_kernels.backends import registry
from nonlocal_kernels.modes import SOFTMAX_MODES
from nonlocal_kernels.testing import (assert_all_ok, check_close, compare_with_oracle,
                                      make_inputs)

pytestmark = pytest.mark.skipif(
    ops.extension_unavailable_reason() is not None or ops.kernel_unavailable_reason("CPU"),
    reason="nonlocal_kernels._C with CPU kernels is not built")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_first", "strided"]
_CPUINFO = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
HAS_AVX2 = "avx2" in _CPUINFO
HAS_AVX512 = all(f in _CPUINFO.split() for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq"))

# (GEMM path, kernel build) variants; the first is what users get on this machine (the AVX-512
# build where the CPU has it, else AVX2, else the portable one), then the narrower builds.
# "blas-sgemm": the BLAS path without MKL's packed key tiles (NONLOCAL_KERNELS_CPU_MKL_PACK=0),
# what a torch without MKL runs; "blas" packs them where torch links MKL.
VARIANTS = ([("vec", None), ("blas", None), ("blas-sgemm", None)] +
            ([("vec", "avx2")] if HAS_AVX512 else []) + [("vec", "default"), ("blas", "default")])


def use_path(monkeypatch, path):
    """"whole" (the whole-batch path: any budget these small inputs fit) or "tiled" (budget 0)."""
    assert path in ("whole", "tiled")
    monkeypatch.setenv(cpu_backend.KEEP_ENV, "1024" if path == "whole" else "0")


@pytest.fixture
def variant(request, monkeypatch):
    """A (GEMM path, kernel build) of the tiled path ("whole": the whole-batch path instead)."""
    gemm, isa = request.param
    if gemm == "whole":
        use_path(monkeypatch, "whole")
        return request.param
    use_path(monkeypatch, "tiled")
    if gemm == "blas-sgemm":
        gemm = "blas"
        monkeypatch.setenv("NONLOCAL_KERNELS_CPU_MKL_PACK", "0")
    monkeypatch.setenv("NONLOCAL_KERNELS_CPU_GEMM", gemm)
    if isa is not None:
        monkeypatch.setenv("NONLOCAL_KERNELS_CPU_ISA", isa)
    return request.param


@pytest.fixture(params=["whole", "tiled"])
def path(request, monkeypatch):
    use_path(monkeypatch, request.param)
    return request.param


def small_tiles(monkeypatch, bm=7, bn=5):
    """Tiny tiles on the tiled path."""
    use_path(monkeypatch, "tiled")
    monkeypatch.setenv("NONLOCAL_KERNELS_CPU_BM", str(bm))
    monkeypatch.setenv("NONLOCAL_KERNELS_CPU_BN", str(bn))  # rounded up to 16 key rows


@pytest.mark.parametrize("variant", VARIANTS, indirect=True, ids=lambda v: f"{v[0]}-{v[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_oracle_every_dtype_and_layout(variant, dtype, layout, monkeypatch):
    small_tiles(monkeypatch)
    # Ragged: N, M not multiples of the tiles, dk != dv, odd head dims.
    theta, phi, g = make_inputs(2, 45, 37, 19, 11, dtype=dtype, layout=layout)
    assert_all_ok(compare_with_oracle(theta, phi, g, backend="cpu", scale=0.37,
                                      return_lse=True))


@pytest.mark.parametrize("gemm", ["vec", "blas"])
@pytest.mark.parametrize("layout,seeds", [("contiguous", (208, 594, 1991, 2623, 2845)),
                                          ("strided", (432, 1005, 1506, 2454, 2741))])
def test_backward_p_is_the_forwards_softmax(gemm, layout, seeds, monkeypatch):
    """Regression, the draws (of 3000 per layout) that once failed the rule:
    - the BLAS path's forward and backward tiled the queries differently (12 vs 6 rows with 2
      threads) and sgemm rounded S differently for the two row counts: P = exp(S - lse) lost
      the cancellation of lse's rounding (dtheta/dphi up to 3.03x the tolerance);
    - both paths: lse is a float, so exp(S - lse) sums to 1 only within half an ulp of lse, and
      in a peaked row with a large D = rowsum(P * dP) that error reaches dtheta/dphi through
      dS = P (dP - D) (up to 1.22x; 2741 and 2845). The backward now normalises P by its own
      row sum."""
    small_tiles(monkeypatch)
    monkeypatch.setenv("NONLOCAL_KERNELS_CPU_GEMM", gemm)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for seed in seeds:
            torch.manual_seed(seed)
            theta, phi, g = make_inputs(2, 45, 37, 19, 11, layout=layout)
            assert_all_ok(compare_with_oracle(theta, phi, g, backend="cpu", scale=0.37,
                                              return_lse=True))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 130, 300, 5, 70), (1, 301, 530, 64, 48),
                                   (1, 64, 700, 2, 3), (1, 70, 1100, 9, 5)])
def test_default_tiles_ragged_sizes(dtype, shape, path):
    """Default tile sizes: several key tiles (256 rows on the vec path, 512 on blas) with a
    ragged last one (tiled path); rows of the score buffer of odd lengths (whole batch)."""
    theta, phi, g = make_inputs(*shape, dtype=dtype, layout="channels_first")
    assert_all_ok(compare_with_oracle(theta, phi, g, backend="cpu", scale=shape[3] ** -0.5))


@pytest.mark.parametrize("shape", [(2, 1, 2, 3, 2), (1, 1, 3, 1, 1), (3, 2, 5, 1, 4)])
def test_tiny_shapes_float64(shape, path):
    """A handful of output elements: float64 only, where the rule's reference error is not a
    lottery over a few low-precision roundings."""
    theta, phi, g = make_inputs(*shape, dtype=torch.float64)
    assert_all_ok(compare_with_oracle(theta, phi, g, backend="cpu", scale=0.8, return_lse=True))


@pytest.mark.parametrize("variant", VARIANTS[:2], indirect=True, ids=lambda v: v[0])
@pytest.mark.parametrize("dk,dv", [(1024, 3), (3, 1024), (2053, 2), (2, 2053)])
def test_large_head_dims(variant, dk, dv):
    theta, phi, g = make_inputs(2, 23, 29, dk, dv, dtype=torch.float32, layout="channels_first")
    assert_all_ok(compare_with_oracle(theta, phi, g, backend="cpu", scale=dk ** -0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_head_dims_low_precision_and_many_tiles(dtype, monkeypatch):
    small_tiles(monkeypatch, bm=13, bn=16)
    theta, phi, g = make_inputs(1, 40, 50, 1030, 260, dtype=dtype, layout="strided")
    assert_all_ok(compare_with_oracle(theta, phi, g, backend="cpu", scale=0.03,
                                      return_lse=True))


@pytest.mark.parametrize("whole", [True, False], ids=["whole", "small-tiles"])
def test_gradient_through_lse_only(whole, monkeypatch):
    use_path(monkeypatch, "whole") if whole else small_tiles(monkeypatch)
    theta, phi, g = (t.detach().requires_grad_() for t in
                     make_inputs(2, 20, 18, 6, 5, dtype=torch.float64))
    _, lse = nonlocal_attention(theta, phi, g, scale=0.5, backend="cpu", return_lse=True)
    _, lse_ref = nonlocal_attention(theta, phi, g, scale=0.5, backend="reference",
                                    return_lse=True)
    w = torch.randn_like(lse)
    got = torch.autograd.grad((lse * w).sum(), (theta, phi, g))
    want = torch.autograd.grad((lse_ref * w).sum(), (theta, phi), allow_unused=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert got[2].abs().max() == 0  # lse does not depend on g


@pytest.mark.parametrize("whole", [True, False], ids=["whole", "small-tiles"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_columns_of_g_and_gradient_into_y_and_lse(dtype, whole, monkeypatch):
    """The backward takes D from its own P and dP, except for all-zero columns of g, whose share
    dy * y comes from y as given (how a gradient into lse reaches the kernel): real zero columns
    of g, with gradients flowing into both y and lse, several key tiles."""
    use_path(monkeypatch, "whole") if whole else small_tiles(monkeypatch)
    theta, phi, g = make_inputs(2, 30, 40, 6, 7, dtype=dtype, layout="contiguous")
    g[..., 2] = 0
    g[1, :, 5] = 0  # zero in one batch only
    assert_all_ok(compare_with_oracle(theta, phi, g, backend="cpu", scale=0.6,
                                      return_lse=True))


@pytest.mark.parametrize("variant", VARIANTS[:2] + [("whole", None)], indirect=True,
                         ids=lambda v: v[0])
@pytest.mark.parametrize("layout", ["contiguous", "channels_first"])
def test_gradcheck_float64(variant, layout, monkeypatch):
    if variant[0] == "whole":
        use_path(monkeypatch, "whole")
    else:
        small_tiles(monkeypatch, bm=4, bn=3)
    theta, phi, g = (t.detach().requires_grad_() for t in
                     make_inputs(2, 9, 19, 3, 4, dtype=torch.float64, layout=layout))

    def fn(t, p, gg):
        y, lse = nonlocal_attention(t, p, gg, scale=0.7, backend="cpu", return_lse=True)
        return y, lse

    assert torch.autograd.gradcheck(fn, (theta, phi, g), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant", VARIANTS[:2], indirect=True, ids=lambda v: v[0])
def test_backward_is_deterministic(variant):
    # B = 1: on two or more threads the backward splits the query tiles into groups with
    # partial dphi/dg sums; their reduction order is fixed.
    theta, phi, g = (t.detach().requires_grad_() for t in
                     make_inputs(1, 700, 300, 24, 20, dtype=torch.float32))
    dy = torch.randn(1, 700, 20)
    grads = []
    for _ in range(2):
        y = nonlocal_attention(theta, phi, g, scale=0.2, backend="cpu")
        grads.append(torch.autograd.grad(y, (theta, phi, g), dy))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_auto_picks_cpu_for_cpu_tensors_of_the_softmax_family():
    theta, phi, g = make_inputs(1, 5, 4, 3, 2)
    for mode in SOFTMAX_MODES:
        assert registry.select("auto", theta, phi, g, mode).name == "cpu"
    assert registry.select("auto", theta, phi, g, "dot_product").name != "cpu"
    info = {b["name"]: b for b in registry.available_backends()}["cpu"]
    assert info["available"] and info["priority"] == 50 and info["devices"] == ["cpu"]


def test_direct_op_calls_check_their_arguments():
    theta, phi, g = make_inputs(2, 5, 4, 3, 2)
    op = torch.ops.nonlocal_kernels
    with pytest.raises(RuntimeError, match="phi: M"):
        op.softmax_fwd(theta, phi[:, :0], g[:, :0], 1.0)
    with pytest.raises(RuntimeError, match="g: expected"):
        op.softmax_fwd(theta, phi, g[:, :3], 1.0)
    y, lse = op.softmax_fwd(theta, phi, g, 1.0)
    with pytest.raises(RuntimeError, match="lse: expected dtype"):
        op.softmax_bwd(y, theta, phi, g, y, lse.double(), 1.0)
    with pytest.raises(RuntimeError, match="dy: expected"):
        op.softmax_bwd(y[:, :4], theta, phi, g, y, lse, 1.0)


def test_bad_tuning_environment_is_reported(monkeypatch):
    theta, phi, g = make_inputs(1, 5, 4, 3, 2)
    monkeypatch.setenv("NONLOCAL_KERNELS_CPU_GEMM", "fast")
    with pytest.raises(RuntimeError, match="NONLOCAL_KERNELS_CPU_GEMM"):
        nonlocal_attention(theta, phi, g, backend="cpu")
    monkeypatch.delenv("NONLOCAL_KERNELS_CPU_GEMM")
    monkeypatch.setenv("NONLOCAL_KERNELS_CPU_MKL_PACK", "yes")
    with pytest.raises(RuntimeError, match="NONLOCAL_KERNELS_CPU_MKL_PACK"):
        nonlocal_attention(theta, phi, g, backend="cpu")
    monkeypatch.delenv("NONLOCAL_KERNELS_CPU_MKL_PACK")
    monkeypatch.setenv("NONLOCAL_KERNELS_CPU_ISA", "sse")
    with pytest.raises(RuntimeError, match="expected 'avx512', 'avx2' or 'default'"):
        nonlocal_attention(theta, phi, g, backend="cpu")
    if not HAS_AVX512:
        monkeypatch.setenv("NONLOCAL_KERNELS_CPU_ISA", "avx512")
        with pytest.raises(RuntimeError, match="no AVX-512"):
            nonlocal_attention(theta, phi, g, backend="cpu")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads ru_maxrss (Linux)")
def test_memory_does_not_grow_with_n_times_m():
    """Forward + backward at N = 16000, M = 4000: one N x M float32 matrix is 256 MB; the kernel's
    peak RSS growth must stay far below that (inputs, outputs and gradients are ~2.5 MB)."""
    code = textwrap.dedent("""
        import resource, torch, nonlocal_kernels as nk
        from nonlocal_kernels.testing import make_inputs
        t, p, g = (x.detach().requires_grad_() for x in make_inputs(1, 16, 16, 8, 8))
        nk.nonlocal_attention(t, p, g, backend="cpu").sum().backward()  # warm-up
        t, p, g = (x.detach().requires_grad_() for x in make_inputs(1, 16000, 4000, 8, 8))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        nk.nonlocal_attention(t, p, g, backend="cpu").sum().backward()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    growth_mb = int(out.stdout.strip().splitlines()[-1])
    assert growth_mb < 64, f"peak RSS grew by {growth_mb} MB"


# ---------------------------------------------------------------------------------------------
# The whole-batch path: calls whose B·N·M scores fit NONLOCAL_KERNELS_CPU_KEEP_MB; the forward's
# softmax P is kept for the backward when the call will be differentiated.

def _grads_on_path(path, theta, phi, g, monkeypatch, *, scale=0.37, dlse=True):
    """y, lse and the gradients of (y, lse) through backend cpu on the given path ("scores
    kept" or "recomputes S"), with the same upstream gradients every time (seeded)."""
    use_path(monkeypatch, "whole" if path == "scores kept" else "tiled")
    leaves = [t.detach().requires_grad_() for t in (theta, phi, g)]
    with registry.record_paths() as taken:
        y, lse = nonlocal_attention(*leaves, scale=scale, backend="cpu", return_lse=True)
    assert taken == [("softmax", path)]
    gen = torch.Generator().manual_seed(5)
    dy = torch.randn(y.shape, generator=gen).to(y.dtype)
    outs, grads = ([y, lse], [dy, torch.randn(lse.shape, generator=gen).to(lse.dtype)]) if dlse \
        else ([y], [dy])
    return [y, lse] + list(torch.autograd.grad(outs, leaves, grads))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_whole_batch_path_matches_the_oracle(dtype, layout, monkeypatch):
    """Forward+backward (ragged odd sizes, dk != dv, a gradient into lse) and the forward of a
    call that will not be differentiated, each on the path it should take."""
    use_path(monkeypatch, "whole")
    theta, phi, g = make_inputs(2, 45, 37, 19, 11, dtype=dtype, layout=layout)
    with registry.record_paths() as taken:
        assert_all_ok(compare_with_oracle(theta, phi, g, backend="cpu", scale=0.37,
                                          return_lse=True))
    assert ("softmax", "scores kept") in taken
    with registry.record_paths() as taken, torch.no_grad():
        y, lse = nonlocal_attention(theta, phi, g, scale=0.37, backend="cpu", return_lse=True)
    assert taken == [("softmax", "forward, whole batch")]
    args = [t.to(torch.float64) for t in (theta, phi, g)]
    y64, lse64 = nonlocal_attention(*args, scale=0.37, backend="reference", return_lse=True)
    ylp, lselp = nonlocal_attention(theta, phi, g, scale=0.37, backend="reference",
                                    return_lse=True)
    assert_all_ok([check_close(y, ylp, y64, name="y"), check_close(lse, lselp, lse64, name="lse")])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("M,dv", [(37, 525), (7, 512), (32, 576), (600, 520)])
def test_whole_batch_path_dg_of_a_wide_g(dtype, layout, M, dv, monkeypatch):
    """dv >= 512: a channels-first float32/float64 dg is the product P^T dy transposed into
    place (softmax_cpu.cpp, dg_into). Ragged M and dv (not multiples of the 16 x 16 transpose
    blocks or the 64-column tasks), whole blocks, and (M = 600) tasks split over threads."""
    use_path(monkeypatch, "whole")
    theta, phi, g = make_inputs(2, 45, M, 19, dv, dtype=dtype, layout=layout)
    with registry.record_paths() as taken:
        assert_all_ok(compare_with_oracle(theta, phi, g, backend="cpu", scale=0.37))
    assert taken and set(taken) == {("softmax", "scores kept")}


def test_whole_batch_temporaries_between_calls_of_other_sizes(monkeypatch):
    """The whole-batch path's scores (forward without grad), dS and dg's product live in the
    calling thread's arena between calls: calls of other sizes in between (a larger one that
    regrows it, a smaller one) leave a call's outputs and gradients bit for bit as they were."""
    use_path(monkeypatch, "whole")

    def run(shape):
        theta, phi, g = make_inputs(*shape, layout="channels_first")
        with torch.no_grad():
            y = nonlocal_attention(theta, phi, g, backend="cpu")
        leaves = [t.detach().requires_grad_() for t in (theta, phi, g)]
        nonlocal_attention(*leaves, backend="cpu").backward(torch.ones_like(y))
        return [y] + [t.grad for t in leaves]

    torch.manual_seed(5)
    first = run((2, 45, 37, 19, 530))
    run((2, 90, 70, 5, 600))
    run((1, 9, 7, 3, 2))
    torch.manual_seed(5)
    for a, b in zip(first, run((2, 45, 37, 19, 530))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(3, 130, 300, 5, 70), (1, 301, 530, 64, 48)])
def test_both_paths_agree_within_the_rule_and_with_each_other(shape, monkeypatch):
    """The two paths are different algorithms (batched products against tiles), so they round
    differently; both pass the rule, and they agree to float32 rounding."""
    theta, phi, g = make_inputs(*shape, dtype=torch.float32, layout="channels_first")
    kept = _grads_on_path("scores kept", theta, phi, g, monkeypatch, scale=shape[3] ** -0.5)
    recomputed = _grads_on_path("recomputes S", theta, phi, g, monkeypatch,
                                scale=shape[3] ** -0.5)
    for a, b in zip(kept, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for path in ("whole", "tiled"):
        use_path(monkeypatch, path)
        assert_all_ok(compare_with_oracle(theta, phi, g, backend="cpu", scale=shape[3] ** -0.5))


def test_keep_budget_boundary_and_forward_only(monkeypatch):
    """B·N·M·4 bytes of float32 scores (8 for float64) fit the budget or not, for calls that
    will be differentiated and for those that will not."""
    theta, phi, g = (t.requires_grad_() for t in make_inputs(2, 45, 37, 3, 2))
    nbytes = 2 * 45 * 37 * 4
    for mb, path in ((nbytes / 2**20, "scores kept"), ((nbytes - 4) / 2**20, "recomputes S"),
                     (0, "recomputes S")):
        monkeypatch.setenv(cpu_backend.KEEP_ENV, repr(mb))
        with registry.record_paths() as taken:
            nonlocal_attention(theta, phi, g, backend="cpu")
        with registry.record_paths() as taken_fwd, torch.no_grad():
            nonlocal_attention(theta, phi, g, backend="cpu")
        assert taken == [("softmax", path)], (mb, taken)
        assert taken_fwd == [("softmax", "forward, whole batch" if path == "scores kept"
                              else "forward, tiled")], (mb, taken_fwd)
    monkeypatch.setenv(cpu_backend.KEEP_ENV, repr(nbytes / 2**20))  # float64: twice the bytes
    with registry.record_paths() as taken:
        nonlocal_attention(*(t.detach().double().requires_grad_() for t in (theta, phi, g)),
                           backend="cpu")
    assert taken == [("softmax", "recomputes S")]
    monkeypatch.delenv(cpu_backend.KEEP_ENV)
    with registry.record_paths() as taken:
        nonlocal_attention(theta.detach(), phi.detach(), g.detach(), backend="cpu")
    assert taken == [("softmax", "forward, whole batch")]
    assert registry.last_path() == "forward, whole batch"


@pytest.mark.parametrize("value", ["-1", "lots", "nan", "inf"])
def test_bad_keep_budget_is_reported(value, monkeypatch):
    theta, phi, g = (t.requires_grad_() for t in make_inputs(1, 5, 4, 3, 2))
    monkeypatch.setenv(cpu_backend.KEEP_ENV, value)
    with pytest.raises(ValueError, match=cpu_backend.KEEP_ENV):
        nonlocal_attention(theta, phi, g, backend="cpu")


def test_keep_ops_direct_calls():
    theta, phi, g = make_inputs(2, 5, 4, 3, 2)
    op = torch.ops.nonlocal_kernels
    y, lse, scores = op.softmax_keep_fwd(theta, phi, g, 0.5, True)
    assert scores.shape == (2, 5, 4) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.softmax(0.5 * theta @ phi.transpose(1, 2), -1))
    torch.testing.assert_close(lse, torch.logsumexp(0.5 * theta @ phi.transpose(1, 2), -1))
    y0, lse0, empty = op.softmax_keep_fwd(theta, phi, g, 0.5, False)
    assert empty.shape == (2, 0, 0) and torch.equal(y, y0) and torch.equal(lse, lse0)
    dy = torch.randn_like(y)
    kept = op.softmax_keep_bwd(dy, theta, phi, g, y, lse, scores, 0.5)
    for grads in (op.softmax_keep_bwd(dy, theta, phi, g, y, lse, empty, 0.5),
                  op.softmax_bwd(dy, theta, phi, g, y, lse, 0.5)):
        for a, b in zip(kept, grads):
            torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match="scores: expected softmax_keep_fwd's third output"):
        op.softmax_keep_bwd(dy, theta, phi, g, y, lse, scores[:, :4], 0.5)
    with pytest.raises(RuntimeError, match="scores: expected dtype"):
        op.softmax_keep_bwd(dy, theta, phi, g, y, lse, scores.double(), 0.5)
    with pytest.raises(RuntimeError, match="scores: expected a contiguous"):
        op.softmax_keep_bwd(dy, theta, phi, g, y, lse,
                            scores.transpose(1, 2).contiguous().transpose(1, 2), 0.5)
    with pytest.raises(RuntimeError, match="dy: expected"):
        op.softmax_keep_bwd(dy[:, :4], theta, phi, g, y, lse, scores, 0.5)


def test_kept_scores_are_deterministic(monkeypatch):
    theta, phi, g = make_inputs(1, 700, 300, 24, 20, dtype=torch.float32)
    runs = [_grads_on_path("scores kept", theta, phi, g, monkeypatch, scale=0.2)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
