"""Context parallelism (nonlocal_kernels.distributed): one clip's positions over a process group.

Two ways to run P ranks:

- ``simulate_group`` (nonlocal_kernels.testing): the P ranks in this process, collectives
  served from the other ranks' inputs of the previous pass. Fast (no processes), so it carries
  the crossing of every backend, mode and dtype, torch.func, second derivatives, bad use and
  the modules, and it reports a rank that would wait for ever as a failure.
- ``run_spawned``: P processes (torch.multiprocessing spawn) in a gloo group over a FileStore
  in a temporary folder, one thread each, a 60 s collective timeout: the real transport,
  group ranks (a sub-group from new_group), and errors that must reach every rank. Each spawn
  costs seconds, so each runs many sub-cases; a rank that raises fails the test at once.

Every result is checked against the oracle computed on the whole clip, on fresh random data:
float64 to 1e-12 of the largest value (the single-process runs are at 1e-15 to 1e-14), other
dtypes by the tolerance rule (docs/design.md section 5). GPU tests (a simulated group on CUDA
tensors, an NCCL group of one) skip without a GPU; scripts/gpu_check.sh runs them on one.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch

import nonlocal_kernels as nk
from nonlocal_kernels import distributed, modes
from nonlocal_kernels.backends import registry
from nonlocal_kernels.testing import (REL_FLOOR, assert_all_ok, compare_with_oracle,
                                      make_inputs, run_spawned, shape_for, simulate_group)

HAS_CUDA = torch.cuda.is_available()
SHAPE = (2, 37, 29, 24, 20)  # B, N, M, dk, dv, as the conformance suite (its note on why)
SMALL = (2, 13, 11, 6, 5)


def _splits(N: int, M: int, P: int) -> tuple:
    """Uneven shards of N queries and M keys over P ranks, some empty: for P = 2 rank 1 holds no
    keys; for P = 3 rank 1 holds no queries and rank 0 no keys."""
    if P == 1:
        return [N], [M]
    if P == 2:
        return [N - N // 3, N // 3], [M, 0]
    return [N // 2, 0, N - N // 2], [0, M // 3, M - M // 3]


def _shard(t: torch.Tensor, counts, rank: int, dim: int = -2) -> torch.Tensor:
    return t.narrow(dim, sum(counts[:rank]), counts[rank])


def _leaf(t):
    return None if t is None else t.detach().requires_grad_()


def _grad(leaf):
    # A leaf with no elements may receive no gradient; its (empty) gradient is then zeros.
    if leaf is None:
        return None
    return leaf.grad if leaf.grad is not None or leaf.numel() else torch.zeros_like(leaf)


def _on_group(P: int, backend: str, mode: str, scale, return_lse: bool, keep: bool = False,
              device="cpu"):
    """A compare_with_oracle candidate: the call split over a simulated group of P ranks, every
    rank's outputs and gradients put back together (concat_weight's: the sum of the shares)."""
    def candidate(ins, upstream):
        theta, phi, g, w = ins
        qc, kc = _splits(theta.shape[-2], phi.shape[-2], P)

        def rank_run(rank, group):
            lt, lp, lg = (_leaf(_shard(t, c, rank)) for t, c in ((theta, qc), (phi, kc), (g, kc)))
            lw = _leaf(w)
            out = distributed.nonlocal_attention(lt, lp, lg, group=group, backend=backend,
                                                 mode=mode, scale=scale, concat_weight=lw,
                                                 return_lse=return_lse, keep_gathered=keep)
            outs = out if return_lse else (out,)
            if upstream is not None:
                ups = [_shard(upstream[0], qc, rank)]
                if return_lse:
                    ups.append(_shard(upstream[1], qc, rank, dim=-1))
                torch.autograd.backward(list(outs), ups)
            return [o.detach() for o in outs], [_grad(t) for t in (lt, lp, lg, lw)]

        res = simulate_group(rank_run, P, device=device)
        outs = [torch.cat([r[0][0] for r in res], -2)]
        if return_lse:
            outs.append(torch.cat([r[0][1] for r in res], -1))
        if upstream is None:
            return outs, [None] * 4
        grads = [torch.cat([r[1][i] for r in res], -2) for i in range(3)]
        grads.append(None if w is None else sum(r[1][3] for r in res))
        return outs, grads
    return candidate


def _assert_exact_or_within_rule(checks, dtype):
    assert_all_ok(checks)
    if dtype == torch.float64:  # ref_lp is then the oracle: tol = REL_FLOOR max|ref|
        bad = [c for c in checks if c.error > 1e-12 * c.tol / REL_FLOOR]
        assert not bad, "float64 beyond 1e-12 of the largest value: " + "; ".join(map(str, bad))


def _check_on_group(backend, mode, dtype, P, *, shape, device="cpu", keep=False,
                    layout="channels_first"):
    if backend != "auto":  # a backend that takes dk == dv only (sdpa) runs with dv = dk
        shape = shape_for(registry.get(backend), dtype, shape, mode, device)
    B, N, M, dk, dv = shape
    t, p, g, w = make_inputs(B, N, M, dk, dv, dtype=dtype, device=device, layout=layout,
                             with_concat=True)
    m = modes.get(mode)
    scale = m.default_scale(dk)
    w = w if m.takes_concat_weight else None
    checks = compare_with_oracle(t, p, g, backend=backend, mode=mode, scale=scale,
                                 concat_weight=w, return_lse=m.has_lse,
                                 candidate=_on_group(P, backend, mode, scale, m.has_lse, keep,
                                                     device))
    _assert_exact_or_within_rule(checks, dtype)


# ------------------------------------------------------------------------------------------
# Every backend, mode and dtype, on simulated groups
# ------------------------------------------------------------------------------------------
def _runs_on_cpu(b) -> bool:
    return b.unavailable_reason() is None and "cpu" in b.devices


BACKENDS = [b for b in map(registry.get, registry.names()) if _runs_on_cpu(b)]
PER_MODE = [(b.name, mode) for b in BACKENDS for mode in b.modes]


def _id(x):
    return str(x).replace("torch.", "")


@pytest.mark.parametrize("name,mode", PER_MODE, ids=map(_id, PER_MODE))
def test_every_backend_is_exact_on_a_group(name, mode):
    # float64 (or the best dtype the backend has) for P = 1, 2, 3 with uneven and empty shards,
    # every other dtype for P = 3, all against the whole-clip oracle: y, lse and every gradient
    # (concat_weight's as the sum of the ranks' shares).
    b = registry.get(name)
    best = torch.float64 if torch.float64 in b.dtypes else torch.float32
    for P in (1, 2, 3):
        _check_on_group(name, mode, best, P, shape=SMALL if best == torch.float64 else SHAPE)
    for dtype in b.dtypes:
        if dtype != best:
            _check_on_group(name, mode, dtype, 3, shape=SHAPE)


@pytest.mark.parametrize("name", [b.name for b in BACKENDS if "softmax" in b.families])
def test_softmax_keeping_the_gathered_keys(name):
    b = registry.get(name)
    dtype = torch.float64 if torch.float64 in b.dtypes else torch.float32
    _check_on_group(name, "embedded_gaussian", dtype, 3,
                    shape=SMALL if dtype == torch.float64 else SHAPE, keep=True,
                    layout="strided")


def test_extra_batch_dims_and_no_backward():
    t, p, g = (x.reshape((2, 3) + x.shape[1:]) for x in
               make_inputs(6, 9, 8, 5, 4, dtype=torch.float64))
    for mode in ("embedded_gaussian", "dot_product"):
        scale = modes.get(mode).default_scale(5)
        checks = compare_with_oracle(t, p, g, backend="auto", mode=mode, scale=scale,
                                     candidate=_on_group(3, "auto", mode, scale, False))
        _assert_exact_or_within_rule(checks, torch.float64)
        checks = compare_with_oracle(t, p, g, backend="auto", mode=mode, scale=scale,
                                     backward=False,
                                     candidate=_on_group(2, "auto", mode, scale, False))
        _assert_exact_or_within_rule(checks, torch.float64)


def test_only_queries_or_only_keys_on_some_ranks_and_no_queries_anywhere():
    t, p, g = make_inputs(2, 6, 5, 4, 3, dtype=torch.float64)

    def run(qc, kc):
        def rank_run(rank, group):
            lt, lp, lg = (_leaf(_shard(x, c, rank)) for x, c in ((t, qc), (p, kc), (g, kc)))
            y = nk.nonlocal_attention(lt, lp, lg, group=group)
            y.sum().backward()
            return y.detach(), _grad(lt), _grad(lp), _grad(lg)
        return simulate_group(rank_run, len(qc))

    ref = [x.detach().requires_grad_() for x in (t, p, g)]
    y = nk.nonlocal_attention(*ref, backend="reference")
    y.sum().backward()
    res = run([0, 6], [5, 0])  # queries on rank 1 only, keys on rank 0 only
    torch.testing.assert_close(res[1][0], y.detach(), rtol=0, atol=1e-13)
    torch.testing.assert_close(res[0][2], ref[1].grad, rtol=0, atol=1e-13)
    res = run([0, 0], [2, 3])  # no queries anywhere: empty outputs, zero gradients
    assert res[0][0].shape == (2, 0, 3) and not res[1][2].abs().sum()


# ------------------------------------------------------------------------------------------
# torch.func and second derivatives
# ------------------------------------------------------------------------------------------
FAMILY_CASES = [("embedded_gaussian", "cpu"), ("embedded_gaussian", "reference"),
                ("dot_product", "fast"), ("concatenation", "fast"),
                ("concatenation", "reference")]


def _family_inputs(mode):
    t, p, g, w = make_inputs(2, 6, 5, 4, 3, dtype=torch.float64, with_concat=True)
    m = modes.get(mode)
    kw = {"mode": mode, "scale": m.default_scale(4),
          "concat_weight": w if m.takes_concat_weight else None}
    return (t, p, g), kw


@pytest.mark.parametrize("mode,name", FAMILY_CASES)
def test_torch_func(mode, name):
    (t, p, g), kw = _family_inputs(mode)
    qc, kc = _splits(6, 5, 3)

    def whole(x, ph):
        return nk.nonlocal_attention(x, ph, g, backend="reference", **kw)
    grad_ref = torch.func.grad(lambda x: whole(x, p).square().sum())(t)
    jac_ref = torch.func.jacrev(lambda x: whole(x, p))(t)
    stack = torch.stack([t, 2 * t])
    vmap_ref = torch.func.vmap(lambda x: whole(x, p))(stack)
    # Per-sample gradients with respect to the keys: vmap over the whole computation.
    per_sample_ref = torch.func.vmap(
        torch.func.grad(lambda ph, x: whole(x, ph).square().sum()), in_dims=(None, 0))(p, stack)

    def rank_run(rank, group):
        lt, lp, lg = _shard(t, qc, rank), _shard(p, kc, rank), _shard(g, kc, rank)

        def f(x, ph):
            return nk.nonlocal_attention(x, ph, lg, group=group, backend=name, **kw)
        out = [torch.func.grad(lambda x: f(x, lp).square().sum())(lt),
               torch.func.jacrev(lambda x: f(x, lp))(lt),
               torch.func.vmap(lambda x: f(x, lp))(torch.stack([lt, 2 * lt])),
               torch.func.vmap(torch.func.grad(lambda ph, x: f(x, ph).square().sum()),
                               in_dims=(None, 0))(lp, torch.stack([lt, 2 * lt]))]
        return out

    res = simulate_group(rank_run, 3)
    tight = dict(rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat([r[0] for r in res], 1), grad_ref, **tight)
    for rank, r in enumerate(res):  # a rank's y depends on its own queries alone
        rows = _shard(torch.arange(6), qc, rank, dim=-1)
        torch.testing.assert_close(r[1], jac_ref[:, rows][:, :, :, :, rows], **tight)
    torch.testing.assert_close(torch.cat([r[2] for r in res], 2), vmap_ref, **tight)
    torch.testing.assert_close(torch.cat([r[3] for r in res], 2), per_sample_ref, **tight)


@pytest.mark.parametrize("mode,name", FAMILY_CASES)
def test_torch_func_refuses_a_batch_of_gradients_that_crosses_the_group(mode, name):
    # jacrev of a rank's outputs with respect to its keys: each rank's batch of cotangents
    # belongs to its own outputs, so summing the batches over the group would mix them.
    (t, p, g), kw = _family_inputs(mode)
    qc, kc = _splits(6, 5, 2)

    def rank_run(rank, group):
        lt, lp, lg = _shard(t, qc, rank), _shard(p, kc, rank), _shard(g, kc, rank)
        return torch.func.jacrev(
            lambda ph: nk.nonlocal_attention(lt, ph, lg, group=group, backend=name, **kw))(lp)

    for out in simulate_group(rank_run, 2, raise_errors=False):
        assert isinstance(out, RuntimeError) and "crosses the group" in str(out), out


@pytest.mark.parametrize("mode,name", FAMILY_CASES)
def test_second_derivatives_are_exact_or_refused_on_every_rank(mode, name):
    # S = <v, dL/dtheta> with L = |y|^2, differentiated again with respect to theta, phi and g.
    # A rank's y depends on its own queries only, so its part of dL/dtheta is that of its own
    # |y_r|^2; the second derivative crosses the group through phi and g.
    (t, p, g), kw = _family_inputs(mode)
    qc, kc = _splits(6, 5, 3)
    v = torch.randn_like(t)

    def second(run, xs, v):
        leaves = [_leaf(x) for x in xs]
        (dt,) = torch.autograd.grad(run(*leaves).square().sum(), leaves[0], create_graph=True)
        return torch.autograd.grad((dt * v).sum(), leaves, allow_unused=True)

    def rank_run(rank, group):
        xs = [_shard(t, qc, rank), _shard(p, kc, rank), _shard(g, kc, rank)]
        return second(lambda *a: nk.nonlocal_attention(*a, group=group, backend=name, **kw),
                      xs, _shard(v, qc, rank))

    outcomes = simulate_group(rank_run, 3, raise_errors=False)
    if modes.get(mode).family not in registry.get(name).double_backward:
        for rank, out in enumerate(outcomes):
            assert isinstance(out, RuntimeError), out
            if qc[rank] == 0:  # no queries: its first derivative is an empty constant
                assert "does not require grad" in str(out), out
            else:
                assert "double backward" in str(out) and "backend='reference'" in str(out)
        return
    ref = second(lambda *a: nk.nonlocal_attention(*a, backend="reference", **kw), (t, p, g), v)
    for i, (x, c) in enumerate(((t, qc), (p, kc), (g, kc))):
        got = torch.cat([o[i] if o[i] is not None else torch.zeros_like(_shard(x, c, r))
                         for r, o in enumerate(outcomes)], 1)
        torch.testing.assert_close(got, ref[i], rtol=0, atol=1e-11)


# ------------------------------------------------------------------------------------------
# Bad use: a clear error on every rank, never a wait
# ------------------------------------------------------------------------------------------
def _outcomes(per_rank, P=2):
    """simulate_group over ranks that each call nonlocal_attention(**per_rank(rank))."""
    def rank_run(rank, group):
        return nk.nonlocal_attention(group=group, **per_rank(rank))
    return simulate_group(rank_run, P, raise_errors=False)


def _inputs(dk=4, dv=3, B=2, n=5, m=4, dtype=torch.float64):
    t, p, g = make_inputs(B, n, m, dk, dv, dtype=dtype)
    return {"theta": t, "phi": p, "g": g}


@pytest.mark.parametrize("rank1,match", [
    (dict(dk=5), "same dk"), (dict(dv=4), "same dv"), (dict(B=3), "same batch size"),
    (dict(dtype=torch.float32), "same dtype"), ({"mode": "dot_product"}, "same mode"),
    ({"scale": 0.5}, "same scale"), ({"backend": "reference"}, "same backend"),
])
def test_ranks_that_disagree_all_raise(rank1, match):
    shape = {k: v for k, v in rank1.items() if k in ("dk", "dv", "B", "dtype")}
    call = {k: v for k, v in rank1.items() if k not in shape}
    outs = _outcomes(lambda r: {**_inputs(**(shape if r else {})), **(call if r else {})})
    for out in outs:
        assert isinstance(out, ValueError) and match in str(out), out
        assert "rank 0" in str(out) and "rank 1" in str(out)


def test_a_rank_with_bad_input_stops_every_rank():
    def per_rank(rank):
        kw = _inputs()
        if rank == 1:
            kw["phi"] = kw["phi"][..., :2]  # dk 2 against theta's 4: rank 1's own error
        return kw
    outs = _outcomes(per_rank, P=3)
    assert isinstance(outs[1], ValueError) and "phi: expected shape" in str(outs[1])
    for out in (outs[0], outs[2]):
        assert isinstance(out, RuntimeError) and "rank(s) [1]" in str(out), out


def test_no_keys_anywhere_and_bad_groups():
    outs = _outcomes(lambda r: {**_inputs(), "phi": _inputs()["phi"][:, :0],
                                "g": _inputs()["g"][:, :0]})
    assert all(isinstance(o, ValueError) and "no key positions" in str(o) for o in outs)
    with pytest.raises(TypeError, match="ProcessGroup"):
        nk.nonlocal_attention(**_inputs(), group="world")


def test_a_device_the_group_cannot_send_is_refused_on_every_rank():
    class NoCpu(distributed.Communicator):
        """A stand-in whose backend sends CUDA tensors only (as NCCL)."""
        def __init__(self, inner):
            self.inner, self.rank, self.size, self.device = inner, inner.rank, inner.size, \
                inner.device
            self.all_gather = inner.all_gather

        def device_error(self, device):
            return "NCCL cannot send cpu tensors" if device.type == "cpu" else None

    def rank_run(rank, group):
        return nk.nonlocal_attention(**_inputs(), group=NoCpu(group) if rank == 0 else group)
    outs = simulate_group(rank_run, 2, raise_errors=False)
    assert isinstance(outs[0], ValueError) and "NCCL cannot send cpu tensors" in str(outs[0])
    assert isinstance(outs[1], RuntimeError) and "rank(s) [0]" in str(outs[1])


# ------------------------------------------------------------------------------------------
# Modules and helpers
# ------------------------------------------------------------------------------------------
def _module_case(mode, P, T, *, sub_sample=True, norm="bn", train=True, pool_before_conv=False,
                 backend="auto", sync_bn=False):
    kw = dict(mode=mode, sub_sample=sub_sample, norm=norm, zeros_init=False,
              pool_before_conv=pool_before_conv, backend=backend)
    if sync_bn:  # mmcv's SyncBN: its statistics over its own process group
        kw.update(norm=None, norm_cfg=dict(type="SyncBN"))
    block = nk.NonLocal3d(6, **kw).double().train(train)
    if norm and not train:  # running statistics that are not the defaults
        block.conv_out.bn.running_mean.normal_()
        block.conv_out.bn.running_var.uniform_(0.5, 2)
    state = copy.deepcopy(block.state_dict())
    x = torch.randn(2, 6, T, 6, 4, dtype=torch.float64)
    dz = torch.randn_like(x)
    xr = _leaf(x)
    z = block(xr)
    z.backward(dz)

    def rank_run(rank, group):
        b = nk.NonLocal3d(6, cp_group=group, **kw).double().train(train)
        b.load_state_dict(state)
        if sync_bn:
            b.conv_out.bn.process_group = group
        assert copy.deepcopy(b).cp_group is group  # a copy (EMA, say) shares the group
        xl = _leaf(distributed.shard_frames(x, group))
        zl = b(xl)
        zl.backward(distributed.shard_frames(dz, group))
        return (zl.detach(), xl.grad, {n: p.grad for n, p in b.named_parameters()},
                {n: t.clone() for n, t in b.named_buffers()},
                distributed.gather_frames(zl, group).detach())

    res = simulate_group(rank_run, P)
    tight = dict(rtol=0, atol=1e-12 * max(1.0, z.abs().max().item()))
    torch.testing.assert_close(torch.cat([r[0] for r in res], 2), z.detach(), **tight)
    torch.testing.assert_close(torch.cat([r[1] for r in res], 2), xr.grad, **tight)
    for n, p in block.named_parameters():  # the sum of the ranks' shares
        torch.testing.assert_close(sum(r[2][n] for r in res), p.grad, rtol=0, atol=1e-11,
                                   msg=n)
    for r in res:  # running statistics: the whole clip's, identical on every rank
        for n, t in block.named_buffers():
            torch.testing.assert_close(r[3][n], t, rtol=0, atol=1e-13, msg=n)
        torch.testing.assert_close(r[4], z.detach(), **tight)


@pytest.mark.parametrize("mode", list(modes.NAMES))
def test_nonlocal3d_on_a_group_matches_the_whole_clip(mode):
    # Uneven slabs (P = 2, T = 5), an empty slab (P = 3, T = 2), batch norm in training with
    # the whole clip's statistics; then without sub-sampling, in eval mode.
    _module_case(mode, 2, 5)
    _module_case(mode, 3, 2)
    _module_case(mode, 3, 4, sub_sample=False, train=False)


def test_nonlocal3d_on_a_group_pool_before_conv_sync_bn_and_the_reference_backend():
    _module_case("embedded_gaussian", 2, 3, pool_before_conv=True)
    _module_case("embedded_gaussian", 2, 3, sync_bn=True)
    _module_case("dot_product", 3, 4, norm=None, backend="reference")


def test_module_errors_reach_every_rank():
    def rank_run(rank, group):
        block = nk.NonLocal3d(6, cp_group=group)
        return block(torch.randn(1, 6 if rank else 5, 2, 4, 4))  # rank 0: 5 channels
    outs = simulate_group(rank_run, 2, raise_errors=False)
    assert isinstance(outs[0], ValueError) and "channels" in str(outs[0])
    assert isinstance(outs[1], RuntimeError) and "rank(s) [0]" in str(outs[1])
    with pytest.raises(ValueError, match="only NonLocal3d"):
        nk.NonLocal2d(6, sub_sample=True, cp_group=object())


def test_frame_helpers():
    assert distributed.frame_split(5, 3) == [2, 2, 1]
    assert distributed.frame_split(2, 3) == [1, 1, 0]
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)

    def rank_run(rank, group):
        xl = _leaf(distributed.shard_frames(x, group))
        whole = distributed.gather_frames(xl, group)
        (whole * (rank + 1)).sum().backward()  # every rank's own weight on the whole clip
        return whole.detach(), xl.grad
    res = simulate_group(rank_run, 3)
    for r in res:
        assert torch.equal(r[0], x)
    assert torch.equal(torch.cat([r[1] for r in res], 2), torch.full_like(x, 6.0))


# ------------------------------------------------------------------------------------------
# Real process groups: gloo, P processes
# ------------------------------------------------------------------------------------------
def _whole(mode, seed, dtype=torch.float64):
    g_ = torch.Generator().manual_seed(seed)
    t, p, g, w = make_inputs(2, 11, 9, 5, 4, dtype=dtype, with_concat=True, generator=g_)
    dy = torch.randn(2, 11, 4, dtype=dtype, generator=g_)
    m = modes.get(mode)
    kw = {"mode": mode, "scale": m.default_scale(5),
          "concat_weight": w if m.takes_concat_weight else None, "return_lse": m.has_lse}
    return (t, p, g), dy, kw


def _check_attention_on(group, rank, size, mode, backend, seed):
    """This rank's y, lse and gradients against the whole clip's oracle (float64)."""
    import torch.distributed as dist

    (t, p, g), dy, kw = _whole(mode, seed)
    qc, kc = _splits(11, 9, size)
    leaves = [_leaf(x) for x in (t, p, g, kw["concat_weight"])]
    out = nk.nonlocal_attention(*leaves[:3], **{**kw, "concat_weight": leaves[3]},
                                backend="reference")
    y = out[0] if kw["return_lse"] else out
    loss = (y * dy).sum() + (out[1].sum() if kw["return_lse"] else 0)
    loss.backward()
    mine = [_leaf(_shard(x, c, rank)) for x, c in ((t, qc), (p, kc), (g, kc))]
    lw = _leaf(kw["concat_weight"])
    got = nk.nonlocal_attention(*mine, **{**kw, "concat_weight": lw}, backend=backend,
                                group=group)
    gy = got[0] if kw["return_lse"] else got
    ((gy * _shard(dy, qc, rank)).sum() + (got[1].sum() if kw["return_lse"] else 0)).backward()
    tight = dict(rtol=0, atol=1e-12)
    torch.testing.assert_close(gy, _shard(y, qc, rank), **tight)
    if kw["return_lse"]:
        torch.testing.assert_close(got[1], _shard(out[1], qc, rank, -1), **tight)
    for a, ref, c in zip(mine, leaves, (qc, kc, kc)):
        torch.testing.assert_close(_grad(a), _shard(ref.grad, c, rank), **tight)
    if lw is not None:  # the shares, summed over the group
        dist.all_reduce(lw.grad, group=group)
        torch.testing.assert_close(lw.grad, leaves[3].grad, **tight)


def _check_module_on(group, seed, mode, frames):
    torch.manual_seed(seed)
    kw = dict(mode=mode, sub_sample=True, norm="bn", zeros_init=False)
    block = nk.NonLocal3d(6, **kw).double()
    state = copy.deepcopy(block.state_dict())
    x = torch.randn(1, 6, frames, 6, 4, dtype=torch.float64)
    xr = _leaf(x)
    z = block(xr)
    z.square().sum().backward()
    mine = nk.NonLocal3d(6, cp_group=group, **kw).double()
    mine.load_state_dict(state)
    xl = _leaf(distributed.shard_frames(x, group))
    zl = mine(xl)
    zl.square().sum().backward()
    tight = dict(rtol=0, atol=1e-11)
    torch.testing.assert_close(zl, distributed.shard_frames(z, group), **tight)
    torch.testing.assert_close(xl.grad, distributed.shard_frames(xr.grad, group), **tight)
    import torch.distributed as dist
    for (n, p), ref in zip(mine.named_parameters(), block.parameters()):
        dist.all_reduce(p.grad, group=group)
        torch.testing.assert_close(p.grad, ref.grad, **tight, msg=n)


def _check_the_example(group):
    """scripts/context_parallel_example.py (DDP over a second group of the same ranks): the
    parameters' gradients are those of the whole clip."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "context_parallel_example.py")
    spec = importlib.util.spec_from_file_location("context_parallel_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    clip = (1, 8, 3, 6, 4)
    z_r, block = example.train_step(group, "cpu", clip)
    torch.manual_seed(0)
    whole = nk.NonLocal3d(8, sub_sample=True, norm="bn", zeros_init=False)
    x = torch.randn(clip)
    z = whole(x)
    (z.square().sum() / x.numel()).backward()
    torch.testing.assert_close(z_r, distributed.shard_frames(z, group).detach())
    for (n, p), ref in zip(block.named_parameters(), whole.parameters()):
        torch.testing.assert_close(p.grad, ref.grad, msg=n)


def _expect_on_every_rank(exc_type, match, fn):
    try:
        fn()
    except exc_type as exc:
        assert match in str(exc), exc
    else:
        raise AssertionError(f"expected {exc_type.__name__} ({match})")


def _gloo_worker(rank, size, seed):
    import torch.distributed as dist

    world = dist.group.WORLD
    for i, mode in enumerate(modes.NAMES):
        for backend in ("reference", "auto"):
            _check_attention_on(world, rank, size, mode, backend, seed + i)
    _check_module_on(world, seed, "embedded_gaussian", 5)
    _check_module_on(world, seed, "concatenation", 2)  # P = 3: a rank without frames
    if size == 2:
        _check_the_example(world)
    # Bad use raises on every rank (a hang would end the test by its timeout).
    if size > 1:
        kw = _inputs(dk=4 + (rank == size - 1))
        _expect_on_every_rank(ValueError, "same dk",
                              lambda: nk.nonlocal_attention(**kw, group=world))
        kw = _inputs()
        if rank == 0:  # gloo cannot send meta tensors
            kw = {k: v.to("meta") for k, v in kw.items()}
        exc = ValueError if rank == 0 else RuntimeError
        _expect_on_every_rank(exc, "cannot send meta" if rank == 0 else "rank(s) [0]",
                              lambda: nk.nonlocal_attention(**kw, group=world))
    if size == 3:
        # A sub-group of global ranks 0 and 2: its rank 1 is global rank 2, and shards
        # follow group ranks.
        sub = dist.new_group([0, 2])
        if rank == 1:
            _expect_on_every_rank(ValueError, "not a member",
                                  lambda: nk.nonlocal_attention(**_inputs(), group=sub))
        else:
            assert dist.get_rank(sub) == {0: 0, 2: 1}[rank]
            for i, mode in enumerate(modes.NAMES):
                _check_attention_on(sub, dist.get_rank(sub), 2, mode, "auto", seed + i)
    with distributed.record_communication() as stats:
        _check_attention_on(world, rank, size, "embedded_gaussian", "auto", seed)
    return stats


@pytest.mark.parametrize("size", [1, 2, 3])
def test_gloo_process_groups(size, fresh_seed):
    t0 = time.monotonic()
    stats = run_spawned(_gloo_worker, size, fresh_seed, timeout_s=240)
    print(f"{size} gloo processes: {time.monotonic() - t0:.1f} s")
    # One all-gather of shapes, one of keys in the forward and again in the backward, one
    # all-to-all of the keys' gradients.
    assert stats[0]["all_gather"]["calls"] == 3 and stats[0]["all_to_all"]["calls"] == 1


def _raising_worker(rank, size):
    import torch.distributed as dist

    if rank == 1:
        raise RuntimeError("rank 1 fails before the collective")
    nk.nonlocal_attention(**_inputs(), group=dist.group.WORLD)  # waits for rank 1


def test_a_rank_that_raises_fails_the_test_quickly():
    t0 = time.monotonic()
    with pytest.raises(Exception, match="rank 1 fails before the collective"):
        run_spawned(_raising_worker, 2, timeout_s=120)
    assert time.monotonic() - t0 < 60


# ------------------------------------------------------------------------------------------
# GPU: a simulated group on CUDA tensors, an NCCL group of one
# ------------------------------------------------------------------------------------------
GPU_CASES = [(b.name, mode) for b in map(registry.get, registry.names())
             if "cuda" in b.devices and b.unavailable_reason() is None for mode in b.modes]


@pytest.mark.gpu
@pytest.mark.parametrize("name,mode", GPU_CASES, ids=map(_id, GPU_CASES))
def test_simulated_group_on_the_gpu(name, mode):
    b = registry.get(name)
    for dtype in b.dtypes:
        if shape_for(b, dtype, SHAPE, mode, "cuda") is not None:
            _check_on_group(name, mode, dtype, 3, shape=SHAPE, device="cuda")


def _nccl_worker(rank, size, seed):
    import torch.distributed as dist

    world = dist.group.WORLD
    for i, mode in enumerate(modes.NAMES):
        (t, p, g), dy, kw = _whole(mode, seed + i, dtype=torch.float32)
        t, p, g, dy = (x.cuda() for x in (t, p, g, dy))
        if kw["concat_weight"] is not None:
            kw["concat_weight"] = kw["concat_weight"].cuda()
        results = []
        for group in (world, None):  # a group of one against no group
            leaves = [_leaf(x) for x in (t, p, g)]
            out = nk.nonlocal_attention(*leaves, **kw, group=group)
            out = out if kw["return_lse"] else (out,)
            torch.autograd.backward(out[0], dy)
            results.append([o.detach() for o in out] + [x.grad for x in leaves])
        for a, c in zip(*results):
            torch.testing.assert_close(a, c)
    _expect_on_every_rank(ValueError, "cannot send cpu tensors",
                          lambda: nk.nonlocal_attention(**_inputs(), group=world))


@pytest.mark.gpu
def test_nccl_group_of_one(fresh_seed):
    run_spawned(_nccl_worker, 1, fresh_seed, backend="nccl", timeout_s=240)
