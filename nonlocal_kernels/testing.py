"""Error measures and the tolerance rule (docs/design.md section 5), shared by tests and benchmarks.

The rule: compute the oracle in float64 (``ref64``) and the plain reference in the dtype under
test (``ref_lp``). A result passes when

    max|out - ref64| <= factor * max|ref_lp - ref64| + 1e-6 * max|ref64|

with factor 2 for outputs and 3 for gradients: a fused kernel may be no less accurate than
PyTorch itself in the same precision. float32 with TF32 dot products is held to PyTorch's
float16 error on the same data (TF32 keeps float16's 10-bit mantissa).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from .distributed import Communicator

OUTPUT_FACTOR = 2.0
GRAD_FACTOR = 3.0
REL_FLOOR = 1e-6


def max_abs(t: torch.Tensor) -> float:
    return t.detach().abs().max().item() if t.numel() else 0.0


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| computed in float64 (NaN if either holds a NaN, so NaN never passes)."""
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    d = (a.detach().double() - b.detach().double()).abs()
    return float("nan") if torch.isnan(d).any() else d.max().item()


def tolerance(ref_lp: torch.Tensor, ref64: torch.Tensor, factor: float) -> float:
    return factor * max_abs_diff(ref_lp, ref64) + REL_FLOOR * max_abs(ref64)


@dataclasses.dataclass
class Check:
    name: str
    error: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tol  # False for NaN

    def __str__(self) -> str:
        return f"{self.name}: max|err| {self.error:.3e} vs tol {self.tol:.3e}"


def check_close(out: torch.Tensor, ref_lp: torch.Tensor, ref64: torch.Tensor, *,
                name: str = "output", grad: bool = False) -> Check:
    """Apply the rule to one tensor; returns the Check (see assert_all_ok)."""
    if out is None or ref64 is None:
        raise AssertionError(f"{name}: missing tensor (out={out is not None}, "
                             f"ref={ref64 is not None})")
    if out.dtype != ref_lp.dtype:
        raise AssertionError(f"{name}: dtype {out.dtype}, expected {ref_lp.dtype}")
    factor = GRAD_FACTOR if grad else OUTPUT_FACTOR
    return Check(name, max_abs_diff(out, ref64), tolerance(ref_lp, ref64, factor))


def assert_all_ok(checks: list) -> None:
    bad = [c for c in checks if not c.ok]
    if bad:
        raise AssertionError("outside the tolerance rule (docs/design.md section 5): " +
                             "; ".join(str(c) for c in bad) +
                             " | all: " + "; ".join(str(c) for c in checks))


def make_inputs(B: int, N: int, M: int, dk: int, dv: int, *, dtype=torch.float32,
                device="cpu", layout: str = "channels_first", with_concat: bool = False,
                generator: Optional[torch.Generator] = None):
    """Fresh random theta (B,N,dk), phi (B,M,dk), g (B,M,dv) [, concat_weight (2dk,)].

    layout: "contiguous"; "channels_first" (views t.transpose(1, 2) of (B, d, N) tensors, as
    the modules pass them); "strided" (every other element of the last dim of a wider tensor).
    """
    def make(n, d):
        if layout == "contiguous":
            return torch.randn(B, n, d, dtype=dtype, device=device, generator=generator)
        if layout == "channels_first":
            return torch.randn(B, d, n, dtype=dtype, device=device,
                               generator=generator).transpose(1, 2)
        if layout == "strided":
            return torch.randn(B, n, 2 * d, dtype=dtype, device=device,
                               generator=generator)[..., ::2]
        raise ValueError(f"layout: unknown layout {layout!r}")

    out = [make(N, dk), make(M, dk), make(M, dv)]
    if with_concat:
        out.append(torch.randn(2 * dk, dtype=dtype, device=device, generator=generator))
    return tuple(out)


def shape_for(backend, dtype: torch.dtype, shape: tuple, mode: str, device) -> Optional[tuple]:
    """A test shape (B, N, M, dk, dv) that ``backend`` (a registry.Backend) runs in ``dtype`` on
    ``device``: ``shape``, or ``shape`` with dv = dk when it takes only that (sdpa); None when
    it takes neither (then the test leaves that dtype out)."""
    B, N, M, dk, _ = shape
    for s in (shape, (B, N, M, dk, dk)):
        reason = backend.check_call(mode, dtype, torch.device(device).type)
        if reason is None and backend.accepts is not None:
            t, p, g = (torch.empty(B, n, d, dtype=dtype, device=device)
                       for n, d in ((N, dk), (M, dk), (M, s[4])))
            reason = backend.accepts(t, p, g, mode)
        if reason is None:
            return s
    return None


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (a kernel that fails to write an element then fails every check)."""
    return t.fill_(float("nan"))


def _leaf(t: Optional[torch.Tensor], dtype=None) -> Optional[torch.Tensor]:
    if t is None:
        return None
    t = t.detach() if dtype is None else t.detach().to(dtype)
    return t.requires_grad_(True)  # detach() keeps strides, so the view layout is kept


def compare_with_oracle(theta, phi, g, *, backend: str, mode: str = "embedded_gaussian",
                        scale=None, concat_weight=None, return_lse: bool = False,
                        backward: bool = True, tf32: bool = False, candidate=None) -> list:
    """Run nonlocal_attention(backend=...) and the reference (test dtype and float64) on the same
    inputs (their strides kept), with the same fresh random upstream gradient; return a Check
    for y, lse (if asked) and every input gradient. Use assert_all_ok on the result.

    ``candidate(inputs, upstream) -> (outputs, gradients)`` replaces nonlocal_attention(backend=...)
    as what is checked (the same call split over a process group, say): inputs are leaves
    [theta, phi, g, concat_weight or None] in the test dtype, upstream the gradients of
    [y, lse] (None without backward); it returns (y,) or (y, lse) and the inputs' gradients."""
    from .functional import nonlocal_attention
    from .ops import lse_dtype

    dtype = theta.dtype
    ref_dtype = torch.float16 if tf32 else dtype
    kw = dict(mode=mode, scale=scale, return_lse=return_lse)
    upstream = None
    if backward:
        upstream = [torch.randn(theta.shape[:-1] + g.shape[-1:], dtype=dtype,
                                device=theta.device)]
        if return_lse:
            upstream.append(torch.randn(theta.shape[:-1], dtype=lse_dtype(dtype),
                                        device=theta.device))

    def run(dt, be):
        ins = [_leaf(t, None if dt == dtype else dt) for t in (theta, phi, g, concat_weight)]
        out = nonlocal_attention(*ins[:3], concat_weight=ins[3], backend=be, **kw)
        outs = out if return_lse else (out,)
        if upstream is not None:
            torch.autograd.backward(list(outs), [u.to(o.dtype) for u, o in zip(upstream, outs)])
        return outs, [None if t is None else t.grad for t in ins]

    if candidate is None:
        cand_out, cand_grads = run(dtype, backend)
    else:
        ins = [_leaf(t) for t in (theta, phi, g, concat_weight)]
        cand_out, cand_grads = candidate(ins, upstream)
    lp_out, lp_grads = run(ref_dtype, "reference")
    hi_out, hi_grads = run(torch.float64, "reference")
    names = ["y", "lse"][:len(cand_out)]
    checks = [check_close(c, lp.to(c.dtype) if tf32 else lp, hi, name=n)
              for n, c, lp, hi in zip(names, cand_out, lp_out, hi_out)]
    if backward:
        for n, c, lp, hi in zip(("dtheta", "dphi", "dg", "dconcat_weight"),
                                cand_grads, lp_grads, hi_grads):
            if hi is None:
                continue
            checks.append(check_close(c, lp.to(c.dtype) if tf32 else lp, hi, name=n,
                                      grad=True))
    return checks


# ------------------------------------------------------------------------------------------
# Process groups for tests and benchmarks (nonlocal_kernels.distributed)
# ------------------------------------------------------------------------------------------
def _spawned_main(rank, fn, size, store_path, backend, threads, group_timeout_s, out_dir, args):
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, store=dist.FileStore(store_path, size), rank=rank,
                            world_size=size, timeout=datetime.timedelta(seconds=group_timeout_s))
    try:
        result = fn(rank, size, *args)
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"result-{rank}.pt"))


def run_spawned(fn, size: int, *args, backend: str = "gloo", timeout_s: float = 120.0,
                group_timeout_s: float = 60.0, threads: int = 1) -> list:
    """``fn(rank, size, *args)`` in ``size`` fresh processes (torch.multiprocessing, start method
    spawn), each in the default process group (``backend``, a FileStore in a temporary folder:
    no ports) with ``threads`` intra-op threads. Returns every rank's result, in rank order.

    Fails fast: as soon as one process raises (or dies), the others are ended and a
    RuntimeError lists every rank's error with its traceback (the rank that raised first, and
    the others that then lost their peer); past ``timeout_s`` every process is ended and
    TimeoutError raised. ``group_timeout_s`` bounds each collective. ``fn`` must be importable
    by name (module level) and its result picklable."""
    import inspect
    import pickle
    import tempfile
    import time

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="nonlocal_kernels_") as tmp:
        ctx = mp.start_processes(_spawned_main, nprocs=size, join=False, start_method="spawn",
                                 args=(fn, size, os.path.join(tmp, "store"), backend, threads,
                                       group_timeout_s, tmp, args))
        # The others get a second to stop after one fails (torch's default waits up to 30 s
        # for a process stuck in a collective to take SIGTERM).
        grace = ({"grace_period": 1.0}
                 if "grace_period" in inspect.signature(ctx.join).parameters else {})
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=0.2, **grace):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run_spawned: {size} processes still running after "
                                       f"{timeout_s:.0f} s ({getattr(fn, '__name__', fn)})")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            errors = []
            for r, path in enumerate(ctx.error_files):
                if os.path.exists(path) and os.path.getsize(path):
                    with open(path, "rb") as fh:
                        errors.append(f"-- rank {r}:\n{pickle.load(fh)}")
            raise RuntimeError(f"run_spawned: {len(errors) or 'a'} rank(s) of {size} failed "
                               f"({exc.__class__.__name__})\n" + "\n".join(errors)) from exc
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        return [torch.load(os.path.join(tmp, f"result-{r}.pt"), weights_only=False)
                for r in range(size)]


class SimulatedRank(Communicator):
    """One rank of :func:`simulate_group`: its collectives are stand-ins that read the other
    ranks' inputs from the previous pass (see simulate_group)."""

    def __init__(self, sim: dict, rank: int):
        self.sim, self.rank, self.size = sim, rank, sim["size"]
        self.device = torch.device(sim["device"])
        self.calls = []  # (kind, the input) per collective, in call order

    def _parts(self, kind: str, inp: torch.Tensor) -> list:
        k = len(self.calls)
        self.calls.append((kind, inp.detach().clone()))
        parts = []
        for r in range(self.size):
            seq = self.sim["previous"][r] if self.sim["previous"] else []
            known = (r != self.rank and k < len(seq) and seq[k][0] == kind
                     and seq[k][1].shape == inp.shape and seq[k][1].dtype == inp.dtype)
            # Until rank r's input to this collective is known (from an earlier pass), this
            # rank's own input stands in for it: the right shape, the wrong values.
            parts.append(seq[k][1] if known else inp)
        return parts

    def all_gather(self, out, inp):
        parts = self._parts("all_gather", inp)
        out.view(self.size, -1).copy_(torch.stack([p.reshape(-1) for p in parts]))

    def all_to_all(self, out, inp):
        parts = self._parts("all_to_all", inp)
        out.view(self.size, -1).copy_(torch.stack(
            [p.reshape(self.size, -1)[self.rank] for p in parts]))

    def all_reduce(self, t):
        parts = self._parts("all_reduce", t)
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        t.copy_(total)


def _same_calls(a: list, b: list) -> bool:
    def same(x, y):  # the same collective with the same input (NaN equal to NaN)
        if x[0] != y[0] or x[1].shape != y[1].shape or x[1].dtype != y[1].dtype:
            return False
        return bool(((x[1] == y[1]) | (x[1].isnan() & y[1].isnan())).all())
    return len(a) == len(b) and all(len(p) == len(q) and all(same(x, y) for x, y in zip(p, q))
                                    for p, q in zip(a, b))


def simulate_group(fn, size: int, *, device="cpu", max_passes: int = 40,
                   raise_errors: bool = True) -> list:
    """P = ``size`` ranks of a process group in this one process and thread: ``fn(rank, group)``
    for each rank, where ``group`` is a stand-in (a nonlocal_kernels.distributed.Communicator)
    that every function taking ``group`` accepts. Works on any device, a GPU included, and
    needs no torch.distributed set-up.

    The ranks run one after the other, so a collective cannot wait for its partners: it is
    served from the inputs they gave to the same collective in the previous pass (before they
    are known, this rank's own input stands in). The passes repeat until every rank gives the
    same inputs to its collectives as in the pass before; then every collective of the last
    pass was served the true inputs of that pass, and its results are exactly those of P
    processes. ``fn`` must therefore compute the same thing on every call (fixed inputs, no
    fresh randomness). A pass costs P calls of fn; a chain of C dependent collectives needs
    about C + 2 passes.

    Returns every rank's result. A rank that raised, or that would wait for ever (a collective
    that some rank never reaches, or reaches as another kind or size), raises AssertionError
    naming each rank's outcome; with ``raise_errors=False`` the list holds, per rank, the
    result, the exception, or a ``SimulatedWait`` saying which collective would not complete.
    """
    sim = {"size": size, "device": device, "previous": None}
    for _ in range(max_passes):
        outcomes, calls = [], []
        for r in range(size):
            comm = SimulatedRank(sim, r)
            try:
                outcomes.append(fn(r, comm))
            except Exception as exc:  # a rank's error is an outcome, judged below
                outcomes.append(exc)
            calls.append(comm.calls)
        if sim["previous"] is not None and _same_calls(calls, sim["previous"]):
            break
        sim["previous"] = calls
    else:
        raise AssertionError(f"simulate_group: the ranks' collective inputs still changed after "
                             f"{max_passes} passes (does fn compute the same on every call?)")
    for r in range(size):
        for k, (kind, t) in enumerate(calls[r]):
            partners = [q for q in range(size) if q != r and not (
                k < len(calls[q]) and calls[q][k][0] == kind
                and calls[q][k][1].shape == t.shape)]
            if partners:
                outcomes[r] = SimulatedWait(r, k, kind, partners, outcomes[r])
                break
    bad = [o for o in outcomes if isinstance(o, (Exception, SimulatedWait))]
    if bad and raise_errors:
        raise AssertionError("simulate_group: " + "; ".join(
            f"rank {r}: {type(o).__name__}: {o}" for r, o in enumerate(outcomes)
            if isinstance(o, (Exception, SimulatedWait))))
    return outcomes


@dataclasses.dataclass
class SimulatedWait:
    """A rank of simulate_group whose collective number ``call`` (``kind``) would never
    complete: ``partners`` do not make that call (they raised or returned before, or made
    another collective). ``outcome``: what the rank returned or raised in the simulation."""
    rank: int
    call: int
    kind: str
    partners: list
    outcome: object

    def __str__(self) -> str:
        return (f"rank {self.rank} would wait for ever in its collective #{self.call} "
                f"({self.kind}): ranks {self.partners} never make it")
