"""Backend ``fast``: the exact dot_product reorderings and the sorted concatenation path.

Everything is checked against the float64 oracle with docs/design.md section 5's rule on fresh random
data: forward and every gradient (concat_weight included), ragged sizes, M != N, dk != dv,
strided and channels-first inputs, ties, a_i + b_j exactly 0, and error growth up to N = 1e5.
"""

import contextlib
import os

import pytest
import torch

import nonlocal_kernels
from nonlocal_kernels import NonLocal2d, NonLocal3d, modes, nonlocal_attention, nonlocal_reference
from nonlocal_kernels.backends import fast, registry
from nonlocal_kernels.testing import (assert_all_ok, check_close, compare_with_oracle,
                                      make_inputs, max_abs_diff)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (mode, forced dot_product path): every code path of the backend.
# "pytorch": concatenation with the fused C++ CPU kernels switched off (the pure-PyTorch version
# of the same algorithm, which CUDA tensors and builds without the extension run); None: the
# default (the C++ kernels on CPU when nonlocal_kernels._C is built).
PATHS = [("dot_product", "reordered"), ("dot_product", "naive"), ("concatenation", None),
         ("concatenation", "pytorch")]
PATH_IDS = ["dot-reordered", "dot-naive", "concat", "concat-pytorch"]
CUDA = pytest.param("cuda", marks=pytest.mark.gpu)


def _dt(dtype):
    return str(dtype).replace("torch.", "")


@contextlib.contextmanager
def forced(path):
    """Force a dot_product path ("reordered"/"naive") or the concatenation kernel ("pytorch")."""
    with fast.force_dot_product_path(path if path in fast.DOT_PATHS else None), \
            fast.use_compiled_concat(path != "pytorch"):
        yield


def run_checks(inputs, mode, path, **kw):
    """compare_with_oracle on backend 'fast', asserting which path ran."""
    theta, phi, g, w = inputs
    with forced(path), fast.record_paths() as taken:
        checks = compare_with_oracle(theta, phi, g, backend="fast", mode=mode,
                                     concat_weight=w if modes.get(mode).takes_concat_weight else None, **kw)
    assert taken == [(mode, "sorted" if mode == "concatenation" else path)]
    assert_all_ok(checks)
    return checks


# --------------------------------------------------------------------------------------------
# registration and dispatch
# --------------------------------------------------------------------------------------------

def test_registered_for_its_own_modes_with_priority_200():
    rows = {b["name"]: b for b in nonlocal_kernels.available_backends()}
    b = rows["fast"]
    assert b["available"] and b["auto"] and b["priority"] == 200
    assert set(b["modes"]) == {"dot_product", "concatenation"}
    assert set(b["devices"]) == {"cpu", "cuda"}
    assert set(b["dtypes"]) == {"float64", "float32", "float16", "bfloat16"}


@pytest.mark.parametrize("mode", ["dot_product", "concatenation", "embedded_gaussian"])
def test_auto_picks_fast_for_its_modes_only(mode):
    theta, phi, g = make_inputs(1, 5, 4, 3, 2)
    chosen = registry.select("auto", theta, phi, g, mode)
    assert (chosen.name == "fast") == (mode in ("dot_product", "concatenation"))


def test_cost_model_and_debug_hook():
    # I3D res4 (small map, wide channels): the naive order needs fewer FLOPs; TSM res3 not.
    assert fast.choose_dot_product_path(784, 196, 512, 512) == "naive"
    assert fast.choose_dot_product_path(6272, 1568, 256, 256) == "reordered"
    assert fast.choose_dot_product_path(3136, 784, 256, 256) == "reordered"
    flops = fast.dot_product_flops(784, 196, 512, 512)
    assert flops == {"naive": 2 * 784 * 196 * 1024, "reordered": 2 * 512 * 512 * 980}
    with fast.force_dot_product_path("naive"):
        assert fast.choose_dot_product_path(6272, 1568, 256, 256) == "naive"
    with pytest.raises(ValueError, match="path: expected one of"):
        with fast.force_dot_product_path("fastest"):
            pass
    # Without forcing, each call takes (and reports) the cost model's choice, and is right.
    for shape, want in (((2, 4, 3, 40, 48), "naive"), ((2, 60, 50, 3, 2), "reordered")):
        B, N, M, dk, dv = shape
        assert fast.choose_dot_product_path(N, M, dk, dv) == want
        theta, phi, g = make_inputs(*shape)
        with fast.record_paths() as taken:
            checks = compare_with_oracle(theta, phi, g, backend="auto", mode="dot_product")
        assert taken == [("dot_product", want)] and fast.last_path() == want
        assert_all_ok(checks)


def test_compiled_concat_kernels_run_on_cpu_when_the_extension_is_built():
    from nonlocal_kernels import ops
    if ops.extension_unavailable_reason() is not None:
        pytest.skip(f"extension not built: {ops.extension_unavailable_reason()}")
    cpu = torch.device("cpu")
    assert fast.compiled_concat_available(cpu)
    with fast.use_compiled_concat(False):
        assert not fast.compiled_concat_available(cpu)
    assert not fast.compiled_concat_available(torch.device("meta"))


# --------------------------------------------------------------------------------------------
# agreement with the oracle
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("layout", ["channels_first", "contiguous", "strided"])
def test_matches_oracle(mode, path, dtype, layout):
    # Ragged sizes, M != N (sub-sampled), dk != dv; M = 37 has two full scan blocks and a tail.
    inputs = make_inputs(2, 45, 37, 5, 7, dtype=dtype, layout=layout, with_concat=True)
    run_checks(inputs, mode, path)


@pytest.mark.parametrize("mode,path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("B,N,M,dk,dv", [(1, 1, 1, 1, 1), (3, 9, 40, 8, 3), (1, 33, 16, 2, 17),
                                         (2, 70, 48, 6, 1)])
def test_shapes(mode, path, B, N, M, dk, dv):
    # M < N, M > N, M an exact multiple of the scan block, single rows and columns.
    run_checks(make_inputs(B, N, M, dk, dv, with_concat=True), mode, path)


@pytest.mark.parametrize("mode,path,wants", [
    (m, p, x) for m, p in PATHS
    for x in ("theta", "phi", "g") + (("concat_weight",) if modes.get(m).takes_concat_weight else ())])
def test_gradients_of_a_subset_of_inputs(mode, path, wants):
    theta, phi, g, w = make_inputs(2, 13, 9, 4, 5, dtype=torch.float64, with_concat=True)
    w = w if modes.get(mode).takes_concat_weight else None
    names = ("theta", "phi", "g", "concat_weight")
    dy = torch.randn(2, 13, 5, dtype=torch.float64)
    grads = []
    for backend in ("fast", "reference"):
        ins = [None if t is None else t.detach().requires_grad_(n == wants)
               for n, t in zip(names, (theta, phi, g, w))]
        with forced(path):
            y = nonlocal_attention(*ins[:3], mode=mode, concat_weight=ins[3], backend=backend)
        (grad,) = torch.autograd.grad(y, ins[names.index(wants)], dy)
        grads.append(grad)
    assert max_abs_diff(*grads) < 1e-12


@pytest.mark.parametrize("mode,path", PATHS, ids=PATH_IDS)
def test_float64_gradcheck(mode, path):
    theta, phi, g, w = make_inputs(2, 6, 5, 3, 4, dtype=torch.float64, with_concat=True)
    args = [theta, phi, g] + ([w] if modes.get(mode).takes_concat_weight else [])
    args = [t.detach().requires_grad_() for t in args]

    def fn(*xs):
        return nonlocal_attention(*xs[:3], mode=mode, backend="fast",
                                  concat_weight=xs[3] if len(xs) > 3 else None)

    with forced(path):
        assert torch.autograd.gradcheck(fn, args)


def test_many_row_chunks(monkeypatch):
    # Tiny chunks: the chunked loops over query rows must cover every row exactly once.
    # (Only the pure-PyTorch concatenation chunks its rows; the C++ kernels need no scratch.)
    monkeypatch.setitem(fast._CHUNK_ELEMENTS, "cpu", 8)
    run_checks(make_inputs(2, 50, 21, 3, 5, with_concat=True), "concatenation", "pytorch")


@pytest.mark.parametrize("path", [None, "pytorch"], ids=["concat", "concat-pytorch"])
def test_deterministic(path):
    theta, phi, g, w = [t.detach().requires_grad_() for t in
                        make_inputs(2, 300, 80, 16, 24, with_concat=True)]
    dy = torch.randn(2, 300, 24)
    outs = []
    with forced(path):
        for _ in range(2):
            for t in (theta, phi, g, w):
                t.grad = None
            y = nonlocal_attention(theta, phi, g, mode="concatenation", concat_weight=w)
            y.backward(dy)
            outs.append([y.detach().clone()] + [t.grad.clone() for t in (theta, phi, g, w)])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# the C++ concatenation kernels' per-ISA builds (csrc/fast/concat_kernel_*.cpp)
# --------------------------------------------------------------------------------------------

_CPU_FLAGS = (open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else [])
_HAS_AVX2 = all(f in _CPU_FLAGS for f in ("avx2", "fma", "f16c"))
_HAS_AVX512 = _HAS_AVX2 and all(f in _CPU_FLAGS for f in ("avx512f", "avx512bw", "avx512vl",
                                                          "avx512dq"))
# Every build this CPU runs: NONLOCAL_KERNELS_CPU_ISA forces one (None: the default choice).
CONCAT_ISAS = ([None] + (["avx512"] if _HAS_AVX512 else []) + (["avx2"] if _HAS_AVX2 else [])
               + ["default"])


def _compiled_concat():
    if not fast.compiled_concat_available(torch.device("cpu")):
        pytest.skip("nonlocal_kernels._C (the C++ concatenation kernels) is not built")


@pytest.mark.parametrize("isa", CONCAT_ISAS, ids=lambda v: v or "auto")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=_dt)
@pytest.mark.parametrize("layout", ["channels_first", "contiguous", "strided"])
@pytest.mark.parametrize("B,N,M,dk,dv", [(2, 300, 37, 19, 150), (1, 40, 200, 260, 131)])
def test_concat_kernel_builds_match_oracle(isa, dtype, layout, B, N, M, dk, dv, monkeypatch):
    # Sizes that reach every branch of the loops: dv = 150 / 131 is a whole 128-column block of
    # the backward's sweep plus a ragged one (not a multiple of its 8 lanes) and ragged
    # 16-column tiles; N = 300 a whole 256-row block of the channels-first projection plus a
    # tail; dk = 260 dot products over whole lanes and a tail; M > N and M < N.
    _compiled_concat()
    if isa is not None:
        monkeypatch.setenv("NONLOCAL_KERNELS_CPU_ISA", isa)
    run_checks(make_inputs(B, N, M, dk, dv, dtype=dtype, layout=layout, with_concat=True),
               "concatenation", None)


@pytest.mark.parametrize("isa", CONCAT_ISAS, ids=lambda v: v or "auto")
def test_concat_kernel_builds_are_deterministic(isa, monkeypatch):
    # Large enough that every loop of the kernels splits over 2 threads (concat_sorted.cpp,
    # kParallelWork: 64 K elements per thread): the projections and their gradients (4200 rows,
    # 300 columns), the gathers and prefix sums (10 tiles of 600 keys per batch), the output rows
    # (2100 queries of 150 columns), the sweep (2 blocks per batch). The 2-thread result is also
    # checked against the oracle.
    _compiled_concat()
    if isa is not None:
        monkeypatch.setenv("NONLOCAL_KERNELS_CPU_ISA", isa)
    B, N, M, dk, dv = 2, 2100, 600, 300, 150
    theta, phi, g, w = [t.detach().requires_grad_() for t in
                        make_inputs(B, N, M, dk, dv, with_concat=True)]
    dy = torch.randn(B, N, dv)
    outs = []
    for threads in (1, 2, 1):
        with _threads(threads):
            for t in (theta, phi, g, w):
                t.grad = None
            y = nonlocal_attention(theta, phi, g, mode="concatenation", concat_weight=w,
                                   backend="fast")
            y.backward(dy)
            outs.append([y.detach().clone()] + [t.grad.clone() for t in (theta, phi, g, w)])
    for run in outs[1:]:
        for a, b in zip(outs[0], run):
            assert torch.equal(a, b)
    with _threads(2):
        run_checks((theta.detach(), phi.detach(), g.detach(), w.detach()), "concatenation", None)


@contextlib.contextmanager
def _threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def test_concat_kernel_build_variable_is_honoured(monkeypatch):
    _compiled_concat()
    theta, phi, g, w = make_inputs(1, 5, 4, 3, 2, with_concat=True)
    monkeypatch.setenv("NONLOCAL_KERNELS_CPU_ISA", "sse")
    with pytest.raises(RuntimeError, match="expected 'avx512', 'avx2' or 'default'"):
        nonlocal_attention(theta, phi, g, mode="concatenation", concat_weight=w, backend="fast")
    if not _HAS_AVX512:
        monkeypatch.setenv("NONLOCAL_KERNELS_CPU_ISA", "avx512")
        with pytest.raises(RuntimeError, match="no AVX-512"):
            nonlocal_attention(theta, phi, g, mode="concatenation", concat_weight=w,
                               backend="fast")


# --------------------------------------------------------------------------------------------
# ties and exact zeros (concatenation)
# --------------------------------------------------------------------------------------------

def exact_tie_inputs(dtype, layout="contiguous"):
    """theta, phi, w of small dyadic values, so that a = theta.w_theta and b = phi.w_phi are exact
    in every dtype (bfloat16 included): repeated theta rows (ties in a), repeated phi rows (ties in
    b) and phi rows equal to -theta rows with w_phi = w_theta, so a_i + b_j == 0 exactly."""
    B, N, M, dk, dv = 2, 12, 10, 4, 3
    w_half = torch.tensor([1.0, 0.5, -0.25, 2.0], dtype=torch.float64)
    theta = torch.randint(-3, 4, (B, N, dk)).double() * 0.5
    theta[:, 6:9] = theta[:, 0:1]  # equal a values
    phi = torch.randint(-3, 4, (B, M, dk)).double() * 0.5
    phi[:, 0:3] = -theta[:, 0:3]  # b_j = -a_i: exact zeros, for 3 + 3 query rows each
    phi[:, 5:8] = phi[:, 4:5]  # equal b values
    phi[:, 8] = -theta[:, 9]
    g = torch.randn(B, M, dv, dtype=torch.float64)
    w = torch.cat([w_half, w_half])
    a = theta @ w_half
    b = phi @ w_half
    zeros = int(((a.unsqueeze(-1) + b.unsqueeze(-2)) == 0).sum())
    assert zeros >= 2 * 7, zeros  # the construction really has exact zeros
    assert len(torch.unique(b[0])) < M and len(torch.unique(a[0])) < N  # and ties

    def lay(t):
        t = t.to(dtype)
        if layout == "channels_first":
            return t.transpose(1, 2).contiguous().transpose(1, 2)
        return t
    return lay(theta), lay(phi), lay(g), w.to(dtype)


@pytest.mark.parametrize("path", [None, "pytorch"], ids=["concat", "concat-pytorch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("layout", ["contiguous", "channels_first"])
def test_concat_ties_and_exact_zero_pairs(dtype, layout, path):
    run_checks(exact_tie_inputs(dtype, layout), "concatenation", path)


def test_concat_relu_gradient_at_exactly_zero_is_zero_like_pytorch():
    # One query, one key, a + b == 0: y = 0 and, as torch.relu's gradient at 0 is 0, every
    # gradient is 0 (the reference, through autograd, agrees).
    theta = torch.tensor([[[1.5, -2.0]]], dtype=torch.float64, requires_grad=True)
    phi = torch.tensor([[[-1.5, 2.0]]], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([[[3.0, -1.0, 2.0]]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.0, 0.5, 1.0, 0.5], dtype=torch.float64, requires_grad=True)
    for backend, path in (("fast", None), ("fast", "pytorch"), ("reference", None)):
        for t in (theta, phi, g, w):
            t.grad = None
        with forced(path):
            y = nonlocal_attention(theta, phi, g, mode="concatenation", concat_weight=w,
                                   backend=backend)
        y.backward(torch.ones_like(y))
        assert torch.equal(y, torch.zeros_like(y)), backend
        for t in (theta, phi, g, w):
            assert torch.equal(t.grad, torch.zeros_like(t)), backend


# --------------------------------------------------------------------------------------------
# error growth with N (concatenation's long prefix sums; dot product's long reductions)
# --------------------------------------------------------------------------------------------

def _sampled_errors(mode, N, M, d, g_mean, path=None):
    """Errors of the fast path and of the float32 reference against float64, on sampled outputs:
    rows I of y (each needs all M keys) and columns J of dg (each needs all N queries), so the
    oracle never holds more than N x |J| values."""
    theta, phi, g, w = make_inputs(1, N, M, d, d, with_concat=True, layout="contiguous")
    g = g + g_mean
    w = w if modes.get(mode).takes_concat_weight else None
    dy = torch.randn(1, N, d)
    leaves = [t.detach().requires_grad_() for t in (theta, phi, g)]
    with forced(path):
        y = nonlocal_attention(*leaves, mode=mode, concat_weight=w, backend="fast")
    y.backward(dy)
    dg = leaves[2].grad
    I = torch.randperm(N)[:256]
    J = torch.randperm(M)[:64]
    out = {}
    for dt in (torch.float64, torch.float32):
        t, p, v, dyy = (x.to(dt) for x in (theta, phi, g, dy))
        ww = None if w is None else w.to(dt)
        y_ref = nonlocal_reference(t[:, I], p, v, mode=mode, concat_weight=ww)
        # dg_J = W[:, J]^T dy with W the reference's affinity, here for the columns J only.
        if mode == "dot_product":
            W = (t @ p[:, J].transpose(1, 2)) / M
        else:
            W = torch.relu((t @ ww[:d]).unsqueeze(-1) + (p[:, J] @ ww[d:]).unsqueeze(-2)) / M
        out[dt] = (y_ref, W.transpose(1, 2) @ dyy)
    (y64, dg64), (y32, dg32) = out[torch.float64], out[torch.float32]
    return [check_close(y[:, I], y32, y64, name=f"y N={N}"),
            check_close(dg[:, J], dg32, dg64, name=f"dg N={N}", grad=True)]


@pytest.mark.parametrize("mode,path", [("concatenation", None), ("concatenation", "pytorch"),
                                       ("dot_product", None)],
                         ids=["concatenation", "concatenation-pytorch", "dot_product"])
@pytest.mark.parametrize("g_mean", [0.0, 3.0], ids=["g-centred", "g-mean-3"])
def test_error_does_not_grow_worse_than_the_oracle_up_to_N_1e5(mode, path, g_mean):
    # At every N, M = N / 4: within 2x (3x for dg) of float32 PyTorch's own error at that N.
    for N in (1000, 10000, 100000):
        checks = _sampled_errors(mode, N, N // 4, 4, g_mean, path)
        print([str(c) for c in checks])
        assert_all_ok(checks)


# --------------------------------------------------------------------------------------------
# no N x M anywhere
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,path", [("dot_product", "reordered"), ("concatenation", None),
                                       ("concatenation", "pytorch")],
                         ids=["dot-reordered", "concat", "concat-pytorch"])
def test_no_allocation_of_n_by_m(mode, path):
    from torch.profiler import ProfilerActivity, profile
    N = M = 2048
    theta, phi, g, w = [t.detach().requires_grad_() for t in
                        make_inputs(1, N, M, 8, 8, with_concat=True)]
    w = w if modes.get(mode).takes_concat_weight else None
    with forced(path), \
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = nonlocal_attention(theta, phi, g, mode=mode, concat_weight=w, backend="fast")
        y.backward(torch.randn_like(y))
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < biggest < N * M * 4 // 16, biggest  # N x M float32 would be 16 MiB


# --------------------------------------------------------------------------------------------
# the modules use the fast paths by default
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["dot_product", "concatenation"])
@pytest.mark.parametrize("cls,shape", [(NonLocal2d, (2, 8, 6, 5)), (NonLocal3d, (1, 8, 2, 4, 4))])
def test_modules_use_the_fast_paths_by_default(mode, cls, shape):
    block = cls(8, mode=mode, sub_sample=True, zeros_init=False).double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    with fast.record_paths() as taken:
        z = block(x)
    assert [m for m, _ in taken] == [mode] and block.backend == "auto"
    z.backward(torch.ones_like(z))
    grads = [p.grad.clone() for p in block.parameters()] + [x.grad.clone()]
    block.zero_grad()
    x.grad = None
    block.backend = "reference"
    z_ref = block(x)
    z_ref.backward(torch.ones_like(z_ref))
    assert max_abs_diff(z, z_ref) < 1e-10
    for mine, ref in zip(grads, [p.grad for p in block.parameters()] + [x.grad]):
        assert max_abs_diff(mine, ref) < 1e-10


# --------------------------------------------------------------------------------------------
# CUDA (scripts/gpu_check.sh runs these on a GPU machine)
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("mode,path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("layout", ["channels_first", "strided"])
def test_cuda_matches_oracle(mode, path, dtype, layout):
    run_checks(make_inputs(2, 300, 77, 9, 20, dtype=dtype, device="cuda", layout=layout,
                           with_concat=True), mode, path)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_cuda_concat_ties_and_exact_zero_pairs(dtype):
    run_checks([t.cuda() for t in exact_tie_inputs(dtype, "channels_first")], "concatenation",
               None)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["dot_product", "concatenation"])
def test_cuda_deterministic(mode):
    leaves = [t.detach().requires_grad_() for t in make_inputs(2, 5000, 1200, 16, 32,
                                                               device="cuda", with_concat=True)]
    w = leaves[3] if modes.get(mode).takes_concat_weight else None
    dy = torch.randn(2, 5000, 32, device="cuda")
    outs = []
    for _ in range(2):
        for t in leaves:
            t.grad = None
        y = nonlocal_attention(*leaves[:3], mode=mode, concat_weight=w)
        y.backward(dy)
        outs.append([y.detach().clone()] + [t.grad.clone() for t in leaves if t.grad is not None])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
