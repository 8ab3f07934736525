"""Context parallelism: one clip's positions split across the ranks of a process group.

Each rank holds a shard of the positions: its queries theta_r (B, n_r, dk) and its keys
phi_r (B, m_r, dk), g_r (B, m_r, dv); shards may be uneven and some may be empty. Every rank of
the group calls :func:`nonlocal_attention` together and gets y (and lse) for its own queries,
with exact gradients to its own theta, phi, g. The collectives are torch.distributed's (NCCL
on CUDA tensors, gloo on CPU tensors), only those gloo has in every torch the package allows:
``all_gather_into_tensor``, ``all_to_all_single`` and ``all_reduce``.

Per family (the modes table, modes.py):

- softmax: all-gather phi and g (one packed buffer, rows padded to the largest shard), run the
  backend's own forward op on all M keys; y and lse stay local. Backward: gather the keys again
  (``keep_gathered=True`` keeps them from the forward instead: one all-gather less, M (dk + dv)
  elements held per call until the backward), run the backend's backward op, and send each
  rank's rows of dphi and dg back to it (all-to-all; the P partial sums are added in float32
  for 16-bit types, in rank order). Exact for every backend: each backward is given all keys,
  so its P, D and renormalisation are those of the whole row.
- dot_product: y = theta (sum_r phi_r^T g_r) / M, one all-reduce of a dk x dv matrix (float32
  for 16-bit types); the backward all-reduces theta^T dy. Nothing grows with N or M.
- concatenation: a = theta.w_theta and b = phi.w_phi locally (float32 for 16-bit types), then
  all-gather b and g; the backend runs on (a, all b, all g) with concat_weight [1, 1], so fast's
  sorted sums run unchanged. Gradients of b and g go back to their owners.
- backend ``reference``: all-gather phi and g and run the reference on all keys (materialises
  n_r x M): the oracle, differentiable to any order.

Gradients. A rank's concat_weight gradient is its own share: the sum over the group is the
gradient of the whole clip (parameters are replicated, so all-reduce their gradients over the
group, as DDP does). Second derivatives are exact where the backend's are (reference; the
dot_product family, whose collectives are all-reduces), and otherwise raise at the second
backward before any collective, naming backend='reference' (a rank without queries has a
constant, empty first derivative; PyTorch says so). torch.func: every collective runs inside
an autograd.Function whose vmap rule folds the vmapped dim into the batch, after checking that
every rank vmaps over the same size, so grad, vmap of the whole computation and per-sample
gradients (vmap of grad) work. A backward under a vmap its forward did not have (jacrev, vmap
over a vjp) holds cotangents of this rank's own outputs, which a sum over the group would mix
with other ranks' cotangents of other outputs: it raises where a gradient crosses the group
(jacrev with respect to a rank's own queries works). torch.compile runs the collectives
eagerly (graph breaks; fullgraph=True is refused by dynamo).

Every call starts with an all-gather of each rank's shapes and arguments (a few int64s), so
that bad use raises the same clear error on every rank instead of a hang: batch, dk, dv, dtype,
mode, backend or scale that differ across ranks; a rank whose inputs failed validation or sit on
a device the group's backend cannot use. A process outside the group gets an error at once.
Every rank must also call backward through its result (a rank with no queries too), since the
backward's collectives need every rank.

Memory per rank: the local shards, the gathered keys and their gradients, O((N/P + M) d);
nothing n_r x M except on the reference backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import struct
import threading
import time
import zlib
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from . import modes as _modes
from . import ops
from .backends import registry
from .modes import FLOAT_DTYPES

try:
    import torch.distributed as dist
    _HAS_DIST = dist.is_available()
except ImportError:  # a torch built without distributed support
    dist, _HAS_DIST = None, False


# Where partial results from several ranks are added, and the projections of concatenation
# computed: float64 for float64, else float32 (the kernels' accumulation rule, which lse's
# dtype follows).
compute_dtype = ops.lse_dtype


# ------------------------------------------------------------------------------------------
# Communicators: the collectives this module uses, over a process group or a test stand-in
# ------------------------------------------------------------------------------------------
class Communicator:
    """The three collectives this module uses, for one rank of a group. ``group`` arguments
    take a torch.distributed ProcessGroup (wrapped in :class:`ProcessGroupCommunicator`) or an
    instance of a subclass (nonlocal_kernels.testing.SimulatedRank runs P ranks in one process).

    Tensors passed in are contiguous; ``out`` of all_gather / all_to_all is contiguous and holds
    ``size`` chunks of ``inp.numel()`` elements."""

    rank: int
    size: int
    device: torch.device  # where the metadata exchange runs

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        raise NotImplementedError

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        raise NotImplementedError

    def all_reduce(self, t: torch.Tensor) -> None:  # sum, in place
        raise NotImplementedError

    def device_error(self, device: torch.device) -> Optional[str]:
        """Why tensors on ``device`` cannot be sent over this group (None when they can)."""
        return None


_records: list = []  # active record_communication() dicts


@contextlib.contextmanager
def record_communication() -> Iterator[dict]:
    """Count this process's collectives inside the block, per kind: {"all_gather": {"calls",
    "bytes_out", "bytes_in", "seconds"}, ...}. Bytes are the payload a rank sends and receives
    under the usual algorithms: an all-gather sends its chunk to, and receives one from, each of
    the P - 1 others; an all-to-all sends and receives (P - 1) / P of its buffer; a ring
    all-reduce 2 (P - 1) / P of the tensor each way. Seconds are wall time in the call (on CUDA
    the call only enqueues the transfer)."""
    stats: dict = {}
    _records.append(stats)
    try:
        yield stats
    finally:
        _records.remove(stats)


def _record(kind: str, nbytes: float, seconds: float) -> None:
    for stats in _records:
        s = stats.setdefault(kind, {"calls": 0, "bytes_out": 0, "bytes_in": 0, "seconds": 0.0})
        s["calls"] += 1
        s["bytes_out"] += int(nbytes)
        s["bytes_in"] += int(nbytes)
        s["seconds"] += seconds


def _device_backends(group) -> dict:
    """{device type: backend name} for a process group: "gloo" runs CPU tensors, "nccl" CUDA
    tensors, "cpu:gloo,cuda:nccl" both; another backend (mpi, ucc, a test's) is taken at its
    word for the device types it registered."""
    name = dist.get_backend(group)
    if ":" in name:
        return dict(part.split(":", 1) for part in name.split(","))
    if name == "gloo":
        return {"cpu": "gloo"}
    if name == "nccl":
        return {"cuda": "nccl"}
    types = getattr(group, "_device_types", None) or [torch.device("cpu")]
    return {torch.device(t).type: name for t in types}


class ProcessGroupCommunicator(Communicator):
    """A torch.distributed ProcessGroup; ranks and collectives are the group's own (a
    sub-group's rank 0 is whichever global rank it lists first)."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.backends = _device_backends(group)
        if "cpu" in self.backends:
            self.device = torch.device("cpu")
        elif "cuda" in self.backends:
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device(next(iter(self.backends)))
        # all_gather_single is all_gather_into_tensor's name from torch 2.14 on (the old name
        # warns there).
        self._all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def device_error(self, device):
        if device.type not in self.backends:
            runs = ", ".join(f"{b} on {t}" for t, b in self.backends.items())
            return (f"the group's backend ({runs}) cannot send {device.type} tensors: use NCCL "
                    f"for CUDA tensors and gloo for CPU tensors (init_process_group(backend=...) "
                    f"or new_group(backend=...))")
        if self.backends[device.type] == "nccl" and device.index != torch.cuda.current_device():
            return (f"the tensors are on {device} but NCCL sends from this process's current "
                    f"device cuda:{torch.cuda.current_device()} (torch.cuda.set_device)")
        return None

    def _timed(self, kind, nbytes, fn, *args):
        t0 = time.perf_counter()
        fn(*args, group=self.group)
        _record(kind, nbytes, time.perf_counter() - t0)

    # Flat views: gloo checks each of the output's size chunks along dim 0 against the input.
    def all_gather(self, out, inp):
        self._timed("all_gather", inp.numel() * inp.element_size() * (self.size - 1),
                    self._all_gather, out.view(-1), inp.view(-1))

    def all_to_all(self, out, inp):
        self._timed("all_to_all", inp.numel() * inp.element_size() * (self.size - 1) / self.size,
                    dist.all_to_all_single, out.view(-1), inp.view(-1))

    def all_reduce(self, t):
        self._timed("all_reduce", 2 * t.numel() * t.element_size() * (self.size - 1) / self.size,
                    dist.all_reduce, t)


def communicator(group) -> Communicator:
    """The Communicator for ``group`` (a ProcessGroup, or a Communicator itself); raises when
    torch.distributed is not set up or this process is not a member."""
    if isinstance(group, Communicator):
        return group
    if not _HAS_DIST:
        raise RuntimeError("group: this torch has no torch.distributed support")
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member "
                         f"of the group (new_group returned NON_GROUP_MEMBER here); call with a "
                         f"group that contains it, or group=None")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group: expected a torch.distributed ProcessGroup (e.g. "
                        f"dist.group.WORLD or dist.new_group(...)), got {type(group).__name__}")
    if not dist.is_initialized():
        raise RuntimeError("group: torch.distributed is not initialised "
                           "(dist.init_process_group)")
    if dist.get_rank(group) < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member "
                         f"of the group; call with a group that contains it, or group=None")
    return ProcessGroupCommunicator(group)


# ------------------------------------------------------------------------------------------
# Agreeing on a call: every rank's shapes and arguments, exchanged before any other collective
# ------------------------------------------------------------------------------------------
_pending = threading.local()  # report_errors() blocks whose group has not exchanged yet


def _exchange(comm: Communicator, row: Optional[Sequence[int]], width: int) -> list:
    """All-gather one row of ``width`` int64s per rank (None: this rank failed; it sends a
    row of -1 whose first field 0 says so). Returns every rank's row, in rank order."""
    for block in getattr(_pending, "blocks", ()):
        block["exchanged"] = True
    vec = torch.tensor(list(row) if row is not None else [0] + [-1] * (width - 1),
                       dtype=torch.int64, device=comm.device)
    out = torch.empty(comm.size * width, dtype=torch.int64, device=comm.device)
    comm.all_gather(out, vec)
    return out.view(comm.size, width).tolist()


def _raise_if_any_failed(rows: list, error: Optional[BaseException], what: str) -> None:
    if error is not None:
        raise error
    failed = [r for r, row in enumerate(rows) if not row[0]]
    if failed:
        raise RuntimeError(f"{what}: rank(s) {failed} of the group rejected their inputs (the "
                           f"error on those ranks says why); every rank of the group stops here")


@contextlib.contextmanager
def report_errors(group) -> Iterator[None]:
    """Run a rank's local work before its first collective on ``group`` (validation, local
    layers): an error raised here first joins the call's metadata exchange as a failure, so
    every other rank raises too instead of waiting for this one. Errors after the exchange are
    raised as they are."""
    block = {"exchanged": False}
    blocks = getattr(_pending, "blocks", None)
    if blocks is None:
        blocks = _pending.blocks = []
    blocks.append(block)
    try:
        yield
    except Exception:
        if not block["exchanged"]:
            _exchange(communicator(group), None, len(_FIELDS))
        raise
    finally:
        blocks.remove(block)


_FIELDS = ("ok", "batch", "queries", "keys", "dk", "dv", "dtype", "mode", "backend", "scale",
           "keep")


def _backend_code(name: str) -> int:
    return zlib.crc32(name.encode())


def _scale_bits(scale: Optional[float]) -> int:
    return 0 if scale is None else struct.unpack("<q", struct.pack("<d", scale))[0]


def _describe(field: str, value: int) -> str:
    if field == "dtype":
        return str(FLOAT_DTYPES[value]).replace("torch.", "")
    if field == "mode":
        return repr(_modes.NAMES[value])
    if field == "backend":
        names = {_backend_code(n): n for n in registry.names()}
        return repr(names.get(value, f"#{value:x}"))
    if field == "scale":
        return repr(struct.unpack("<d", struct.pack("<q", value))[0])
    return str(value)


_AGREE = (("batch", "batch size (the product of the dims before N)"), ("dk", "dk"),
          ("dv", "dv"), ("dtype", "dtype"), ("mode", "mode"),
          ("backend", "backend (backend='auto' picks by what each machine has)"),
          ("scale", "scale"), ("keep", "keep_gathered"))


@dataclasses.dataclass(frozen=True)
class Plan:
    """What every rank agreed on for one call: the communicator and each rank's number of
    queries and of keys (rows), in group-rank order."""
    comm: Communicator
    queries: tuple
    keys: tuple
    keep: bool = False

    @property
    def M(self) -> int:
        return sum(self.keys)


# ------------------------------------------------------------------------------------------
# Rows across ranks: gather, scatter-sum, all-reduce, each an autograd.Function
# ------------------------------------------------------------------------------------------
def gather_rows(comm: Communicator, counts: Sequence[int], parts: Sequence) -> torch.Tensor:
    """(B, M, d): every rank's rows (B, counts[r], d_i) in rank order, the parts' columns packed
    side by side (d = sum d_i). One all_gather_into_tensor of this rank's rows, padded to the
    largest shard; with even shards and B = 1 the result is a view of the received buffer."""
    parts = [p for p in parts if p is not None]
    B, m = parts[0].shape[:2]
    d = sum(p.shape[2] for p in parts)
    m_max = max(counts)
    send = parts[0].new_empty((B, m_max, d))
    col = 0
    for p in parts:
        send[:, :m, col:col + p.shape[2]].copy_(p)
        col += p.shape[2]
    send[:, m:].zero_()
    out = parts[0].new_empty((comm.size, B, m_max, d))
    comm.all_gather(out, send)
    if all(c == m_max for c in counts) and (B == 1 or comm.size == 1):
        return out.view(B, comm.size * m_max, d) if B == 1 else out[0]
    return torch.cat([out[r, :, :c] for r, c in enumerate(counts)], dim=1)


def scatter_rows(comm: Communicator, counts: Sequence[int], parts: Sequence) -> torch.Tensor:
    """(B, m_r, d): the sum over the group of every rank's rows of this rank, the inverse of
    gather_rows: parts (B, M, d_i) hold rows for every rank, in rank order. One
    all_to_all_single (each rank's rows padded to the largest shard); the P partial sums are
    added in rank order in float32 (float64 for float64) and returned in the parts' dtype."""
    parts = [p for p in parts if p is not None]
    B = parts[0].shape[0]
    d = sum(p.shape[2] for p in parts)
    m_max = max(counts)
    send = parts[0].new_empty((comm.size, B, m_max, d))
    start = 0
    for r, c in enumerate(counts):
        col = 0
        for p in parts:
            send[r, :, :c, col:col + p.shape[2]].copy_(p[:, start:start + c])
            col += p.shape[2]
        send[r, :, c:].zero_()
        start += c
    recv = torch.empty_like(send)
    comm.all_to_all(recv, send)
    m = counts[comm.rank]
    acc = recv[0, :, :m].to(compute_dtype(send.dtype), copy=True)
    for s in range(1, comm.size):
        acc += recv[s, :, :m]
    return acc.to(send.dtype)


def _split(t: torch.Tensor, width: int, has_second: bool) -> tuple:
    return (t[..., :width], t[..., width:]) if has_second else (t, None)


def _refuse_double_backward(who: str) -> RuntimeError:
    return ops.double_backward_error(f"backend {who!r} under a process group")


def _batched_gradient_error() -> RuntimeError:
    return RuntimeError(
        "torch.func under a process group: a batch of gradients that crosses the group (jacrev, "
        "or vmap over a vjp, of a function whose keys or batch-norm statistics come from other "
        "ranks) is not supported: each rank's batch would be summed with the other ranks' "
        "batches, which belong to other outputs. torch.func.grad, vmap over the whole "
        "computation (every rank alike), and jacrev with respect to this rank's queries alone "
        "work; for the rest, compute on the whole clip in one process.")


def _vmap_levels() -> frozenset:
    """The levels of the torch.func vmaps active now (empty where torch cannot say)."""
    from torch._functorch import pyfunctorch
    interpreters = getattr(pyfunctorch, "retrieve_all_functorch_interpreters", lambda: [])()
    return frozenset(i.level() for i in interpreters
                     if i.key() == torch._C._functorch.TransformType.Vmap)


def _check_cotangents(ctx) -> None:
    """Raise when this backward runs under a vmap that was not there in the forward (jacrev,
    vmap over a vjp): its batch is then of cotangents of this rank's own outputs, and sending
    them across the group would add them to other ranks' cotangents of other outputs. A vmap
    over the whole computation (forward included) batches the same thing on every rank."""
    if _vmap_levels() - ctx.vmap_levels:
        raise _batched_gradient_error()


def _fold(info, in_dims, args, comm) -> list:
    """ops.fold_batch for a collective's vmap rule, after checking that every rank vmaps over
    the same size (folded into the batch, it sets the size of what the ranks exchange)."""
    rows = _exchange(comm, (1, info.batch_size), 2)
    if len({r[1] for r in rows}) > 1:
        raise ValueError(f"vmap under a process group: every rank must vmap over the same size; "
                         f"got {[r[1] for r in rows]} (rank order)")
    return ops.fold_batch(info, in_dims, args)


def _rows_setup_context(ctx, inputs, output):
    ctx.comm, ctx.counts, ctx.who, a, b = inputs
    ctx.width, ctx.has_b = a.shape[-1], b is not None
    ctx.vmap_levels = _vmap_levels()


def _rows_backward(adjoint, ctx, d, who) -> tuple:
    """The gradients of GatherRows / ScatterRows: their adjoint applied to d, split like the
    inputs (a, b)."""
    _check_cotangents(ctx)
    da, db = _split(adjoint.apply(ctx.comm, ctx.counts, who, d, None), ctx.width, ctx.has_b)
    return None, None, None, da, db


def _rows_vmap(cls, info, in_dims, comm, counts, who, a, b):
    a, b = _fold(info, in_dims[3:], (a, b), comm)
    return ops.unfold_batch(cls.apply(comm, counts, who, a, b), info.batch_size)


@ops.fast_apply
class GatherRows(torch.autograd.Function):
    """``apply(comm, counts, who, a, b) -> (B, M, da + db)``: gather_rows of (a, b); b may be
    None. Backward: ScatterRows (the adjoint). ``who``: None when a second derivative through
    this call is exact, else the backend whose backward has none (ScatterRows then refuses)."""

    @staticmethod
    def forward(comm, counts, who, a, b):
        return gather_rows(comm, counts, (a, b))

    setup_context = staticmethod(_rows_setup_context)

    @staticmethod
    def backward(ctx, dX):
        return _rows_backward(ScatterRows, ctx, dX, ctx.who)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _rows_vmap(GatherRows, info, in_dims, *args)


@ops.fast_apply
class ScatterRows(torch.autograd.Function):
    """``apply(comm, counts, who, a, b) -> (B, m_r, da + db)``: scatter_rows of (a, b); b may
    be None. Backward: GatherRows, or an error naming ``who`` when it is set."""

    @staticmethod
    def forward(comm, counts, who, a, b):
        return scatter_rows(comm, counts, (a, b))

    setup_context = staticmethod(_rows_setup_context)

    @staticmethod
    def backward(ctx, dx):
        if ctx.who is not None:
            raise _refuse_double_backward(ctx.who)
        return _rows_backward(GatherRows, ctx, dx, None)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _rows_vmap(ScatterRows, info, in_dims, *args)


@ops.fast_apply
class AllReduce(torch.autograd.Function):
    """``apply(comm, t)``: the sum of t over the group, on every rank. Its own adjoint: every
    rank's output is the same sum, so the gradient of each input is the sum of the gradients."""

    @staticmethod
    def forward(comm, t):
        out = t.contiguous().clone()
        comm.all_reduce(out)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.comm = inputs[0]
        ctx.vmap_levels = _vmap_levels()

    @staticmethod
    def backward(ctx, d):
        _check_cotangents(ctx)
        return None, AllReduce.apply(ctx.comm, d)

    @staticmethod
    def vmap(info, in_dims, comm, t):
        (t,) = _fold(info, in_dims[1:], (t,), comm)
        return ops.unfold_batch(AllReduce.apply(comm, t), info.batch_size)


# ------------------------------------------------------------------------------------------
# The softmax family on a backend's own ops
# ------------------------------------------------------------------------------------------
def _softmax_fwd(namespace, theta, keys, dk, scale):
    if theta.shape[1] == 0:  # no queries on this rank: no kernel to run (the gather ran)
        return (theta.new_empty((theta.shape[0], 0, keys.shape[2] - dk)),
                theta.new_empty((theta.shape[0], 0), dtype=ops.lse_dtype(theta.dtype)))
    return ops.run_op(ops.op(f"{namespace}::softmax_fwd"), theta, keys[..., :dk],
                      keys[..., dk:], scale)


def _zero_key_grads(keys, dk, *grads) -> tuple:
    """Zero gradients for the gathered keys [phi | g] of a rank whose queries add nothing. Made
    from an incoming gradient when there is one, so that under a vmap of the whole computation
    they are batched like the other ranks' gradients (every rank then sends alike)."""
    like = next((t for t in grads if t is not None), keys)
    B, M, d = keys.shape
    return (like.new_zeros((B, M, dk), dtype=keys.dtype),
            like.new_zeros((B, M, d - dk), dtype=keys.dtype))


@ops.fast_apply
class SoftmaxContextParallel(torch.autograd.Function):
    """``apply(who, namespace, plan, theta, phi, g, scale) -> (y, lse, keys)``: backend
    ``who``'s softmax ops (``namespace``) on this rank's queries and the group's keys. ``keys``,
    the gathered [phi | g], is returned so that the backward may keep it; it is not
    differentiable. A second derivative raises (the softmax_bwd ops have none)."""

    @staticmethod
    def forward(who, namespace, plan, theta, phi, g, scale):
        keys = gather_rows(plan.comm, plan.keys, (phi, g))
        y, lse = _softmax_fwd(namespace, theta, keys, phi.shape[2], scale)
        return y, lse, keys

    @staticmethod
    def setup_context(ctx, inputs, output):
        who, namespace, plan, theta, phi, g, scale = inputs
        y, lse, keys = output
        ctx.mark_non_differentiable(keys)
        ctx.save_for_backward(theta, phi, g, y, lse, keys if plan.keep else None)
        ctx.who, ctx.namespace, ctx.plan, ctx.scale = who, namespace, plan, scale
        ctx.vmap_levels = _vmap_levels()
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, dy, dlse, _):
        theta, phi, g, y, lse, keys = ctx.saved_tensors
        plan, dk = ctx.plan, phi.shape[2]
        to_keys = ctx.needs_input_grad[4] or ctx.needs_input_grad[5]
        if to_keys:
            _check_cotangents(ctx)
        if keys is None:
            keys = gather_rows(plan.comm, plan.keys, (phi.detach(), g.detach()))
        if theta.shape[1] == 0 or (dy is None and dlse is None):
            # This rank's queries add nothing to any key's gradient; it still takes part in
            # the all-to-all, which every rank's rows go through.
            dtheta = torch.zeros_like(theta)
            dphi_all, dg_all = _zero_key_grads(keys, dk, dy, dlse)
        else:
            bwd = ops.softmax_bwd_fn(ctx.who, ctx.namespace, None)  # None: S is recomputed
            dtheta, dphi_all, dg_all = ops.softmax_grads(bwd, dy, dlse, theta, keys[..., :dk],
                                                         keys[..., dk:], y, lse, ctx.scale)
        dphi = dg = None
        if to_keys:
            dphi, dg = _split(ScatterRows.apply(plan.comm, plan.keys, ctx.who, dphi_all, dg_all),
                              dk, True)
        return None, None, None, dtheta, dphi, dg, None

    @staticmethod
    def vmap(info, in_dims, who, namespace, plan, theta, phi, g, scale):
        theta, phi, g = _fold(info, in_dims[3:6], (theta, phi, g), plan.comm)
        return ops.unfold_batch(
            SoftmaxContextParallel.apply(who, namespace, plan, theta, phi, g, scale),
            info.batch_size)


@ops.fast_apply
class NoQueries(torch.autograd.Function):
    """``apply(theta, keys, dk) -> (y, lse)`` for a rank without queries (theta (B, 0, dk)):
    empty outputs, and zero gradients for theta and the gathered keys (B, M, dk + dv), which
    still go through the group's all-to-all. It stands in for a backend whose kernels may not
    take N = 0; like those, it has no second derivative (its gradients are constants)."""

    @staticmethod
    def forward(theta, keys, dk):
        B = theta.shape[0]
        return (theta.new_empty((B, 0, keys.shape[2] - dk)),
                theta.new_empty((B, 0), dtype=ops.lse_dtype(theta.dtype)))

    @staticmethod
    def setup_context(ctx, inputs, output):
        theta, keys, _ = inputs
        ctx.theta_like, ctx.keys_like = theta.new_empty(theta.shape), keys.new_empty(keys.shape)
        ctx.vmap_levels = _vmap_levels()

    @staticmethod
    def backward(ctx, dy, dlse):
        if ctx.needs_input_grad[1]:
            _check_cotangents(ctx)
        dkeys = torch.cat(_zero_key_grads(ctx.keys_like, 0, dy, dlse), dim=2)
        return torch.zeros_like(ctx.theta_like), dkeys, None

    @staticmethod
    def vmap(info, in_dims, theta, keys, dk):
        theta, keys = ops.fold_batch(info, in_dims[:2], (theta, keys))
        return ops.unfold_batch(NoQueries.apply(theta, keys, dk), info.batch_size)


# ------------------------------------------------------------------------------------------
# One strategy per family
# ------------------------------------------------------------------------------------------
def _who(backend, family: str) -> Optional[str]:
    return None if family in backend.double_backward else backend.name


def _run_on_gathered_keys(plan, backend, family, theta, phi, g, *, return_lse, **kw):
    """The backend's own ``run`` on this rank's queries and the group's keys; autograd composes
    (GatherRows' backward sends the keys' gradients home), and the gathered keys are kept for
    the backward. A rank without queries runs no kernel: the reference where second
    derivatives are exact (its graph is that of the other ranks), else NoQueries."""
    who = _who(backend, family)
    keys = GatherRows.apply(plan.comm, plan.keys, who, phi, g)
    dk = phi.shape[2]
    if theta.shape[1] == 0 and who is not None:
        y, lse = NoQueries.apply(theta, keys, dk)
        return (y, lse) if return_lse else y
    run = backend.run if theta.shape[1] else registry.get("reference").run
    return run(theta, keys[..., :dk], keys[..., dk:], return_lse=return_lse, **kw)


def _run_softmax(plan, backend, theta, phi, g, *, scale, return_lse, **kw):
    if backend.namespace is None:
        return _run_on_gathered_keys(plan, backend, "softmax", theta, phi, g, scale=scale,
                                     return_lse=return_lse, **kw)
    y, lse, _ = SoftmaxContextParallel.apply(backend.name, backend.namespace, plan, theta, phi,
                                             g, float(scale))
    return (y, lse) if return_lse else y


def _run_dot_product(plan, backend, theta, phi, g, **kw):
    """y = theta (sum_r phi_r^T g_r) / M: one all-reduce of (B, dk, dv); plain PyTorch
    products (fast's reordered order), differentiable to any order."""
    cdt = compute_dtype(theta.dtype)
    k = AllReduce.apply(plan.comm, torch.bmm(phi.to(cdt).transpose(1, 2), g.to(cdt)))
    return torch.bmm(theta.to(cdt), k).div(plan.M).to(theta.dtype)


def _run_concatenation(plan, backend, theta, phi, g, *, concat_weight, **kw):
    """The projections a = theta.w_theta (local) and b = phi.w_phi (gathered with g), then the
    backend on (a, b, g) with weights [1, 1]: the same sum, with one column per key sent."""
    cdt = compute_dtype(theta.dtype)
    dk = theta.shape[2]
    w = concat_weight.to(cdt)
    a = torch.matmul(theta.to(cdt), w[:dk]).unsqueeze(-1)
    b = torch.matmul(phi.to(cdt), w[dk:]).unsqueeze(-1)
    y = _run_on_gathered_keys(plan, backend, "concatenation", a, b, g.to(cdt),
                              mode="concatenation", scale=None, concat_weight=w.new_ones(2),
                              return_lse=False)
    return y.to(theta.dtype)


_STRATEGIES = {"softmax": _run_softmax, "dot_product": _run_dot_product,
               "concatenation": _run_concatenation}


def nonlocal_attention(theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor, *, group,
                       mode: str = "embedded_gaussian", scale: Optional[float] = None,
                       concat_weight: Optional[torch.Tensor] = None, backend: str = "auto",
                       return_lse: bool = False, keep_gathered: bool = False):
    """:func:`nonlocal_kernels.nonlocal_attention` with the positions split over ``group``.

    theta (..., n_r, dk), phi (..., m_r, dk), g (..., m_r, dv): this rank's queries and keys
    (any n_r, m_r >= 0; the group holds M = sum m_r >= 1 keys). Returns this rank's y
    (..., n_r, dv) (and lse) over all M keys. Every rank of the group must call it with the same
    mode, backend, scale, batch dims, dk, dv and dtype, and call backward through the result.
    ``keep_gathered`` (softmax family): keep the gathered keys from the forward for the
    backward instead of gathering them again.
    """
    from . import functional

    comm = communicator(group)
    row = error = chosen = None
    try:
        scale = functional._validate(theta, phi, g, mode, scale, concat_weight, return_lse,
                                     backend, min_keys=0)
        reason = comm.device_error(theta.device)
        if reason is not None:
            raise ValueError(f"theta: {reason}")
        batch = math.prod(theta.shape[:-2])
        dv = g.shape[-1]
        # Empty batches and dv = 0 run on the reference, as without a group (same on every
        # rank: batch and dv are agreed below).
        chosen = registry.get("reference") if batch == 0 or dv == 0 else \
            registry.select(backend, *(functional._flatten_batch(t) for t in (theta, phi, g)),
                            mode)
        if not isinstance(keep_gathered, bool):
            raise TypeError(f"keep_gathered: expected a bool, got {type(keep_gathered).__name__}")
        row = (1, batch, theta.shape[-2], phi.shape[-2], theta.shape[-1], dv,
               FLOAT_DTYPES.index(theta.dtype), _modes.NAMES.index(mode),
               _backend_code(chosen.name), _scale_bits(scale), int(keep_gathered))
    except (ValueError, TypeError, RuntimeError) as exc:
        error = exc
    rows = _exchange(comm, row, len(_FIELDS))
    _raise_if_any_failed(rows, error, "nonlocal_attention")
    for field, what in _AGREE:
        i = _FIELDS.index(field)
        if len({r[i] for r in rows}) > 1:
            values = ", ".join(f"rank {k}: {_describe(field, r[i])}" for k, r in enumerate(rows))
            raise ValueError(f"group: every rank must pass the same {what}; got {values}")
    plan = Plan(comm, tuple(r[2] for r in rows), tuple(r[3] for r in rows), keep_gathered)
    if plan.M == 0:
        raise ValueError("phi: the group holds no key positions (m_r = 0 on every rank); "
                         "M must be >= 1")
    family = _modes.get(mode).family
    if sum(plan.queries) == 0 or rows[0][1] == 0:
        # No rank has a query (or the batch is empty): every y is empty and nothing needs to
        # be sent; the reference gives the shapes and zero gradients.
        return functional.run_flat(registry.get("reference").run, theta, phi, g, mode=mode,
                                   scale=scale, concat_weight=concat_weight,
                                   return_lse=return_lse)

    def run(t3, p3, g3, **kw):
        if chosen.name == "reference":
            return _run_on_gathered_keys(plan, chosen, family, t3, p3, g3, **kw)
        return _STRATEGIES[family](plan, chosen, t3, p3, g3, **kw)
    return functional.run_flat(run, theta, phi, g, mode=mode, scale=scale,
                               concat_weight=concat_weight, return_lse=return_lse)


# ------------------------------------------------------------------------------------------
# Modules: batch norm over the group, clips sharded by frames
# ------------------------------------------------------------------------------------------
def batch_norm(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm, group) -> torch.Tensor:
    """``bn(x)`` with training-mode statistics over the whole clip: each rank's per-channel sums
    are all-reduced over ``group`` (two all-reduces: the sums and count, then the squared
    deviations from the mean), in float32 (float64 for float64). Running statistics update as
    BatchNorm's do, identically on every rank. In eval mode with running statistics it is
    bn(x) (no communication)."""
    if not bn.training and bn.track_running_stats and bn.running_mean is not None:
        return bn(x)
    comm = communicator(group)
    C = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    shape = (1, C) + (1,) * (x.dim() - 2)
    xc = x.to(compute_dtype(x.dtype))
    sums = AllReduce.apply(comm, torch.cat([xc.sum(dims), xc.new_tensor([x.numel() / max(C, 1)])]))
    count = int(round(sums[-1].item()))
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training over the group, "
                         f"got {count} in total (input size on this rank {tuple(x.shape)})")
    mean = sums[:-1] / count
    xm = xc - mean.view(shape)
    var = AllReduce.apply(comm, (xm * xm).sum(dims)) / count
    y = xm * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.training and bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            f = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - f).add_(mean.detach().to(bn.running_mean.dtype), alpha=f)
            bn.running_var.mul_(1 - f).add_((var.detach() * count / (count - 1))
                                            .to(bn.running_var.dtype), alpha=f)
    return y.to(x.dtype)


def frame_split(T: int, size: int) -> list:
    """How T frames split over ``size`` ranks: as even as possible, the first T % size ranks
    one frame more (torch.tensor_split's split); ranks past T get none."""
    return [T // size + (r < T % size) for r in range(size)]


def shard_frames(x: torch.Tensor, group, dim: int = 2) -> torch.Tensor:
    """This rank's slab of a whole clip x (every rank holds x): frames
    frame_split(T, P)[rank] along ``dim`` (2: (n, C, T, H, W)), a view. No communication."""
    comm = communicator(group)
    return x.tensor_split(comm.size, dim)[comm.rank]


def gather_frames(x: torch.Tensor, group, dim: int = 2) -> torch.Tensor:
    """The whole clip on every rank from each rank's slab x (frames along ``dim``), ranks in
    group order; slabs may be uneven or empty. Differentiable: each slab's gradient is the sum
    over the group of the gradients of its frames."""
    comm = communicator(group)
    row = error = None
    try:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        dim = dim % x.dim()
        reason = comm.device_error(x.device)
        if reason is not None:
            raise ValueError(f"x: {reason}")
        before, after = math.prod(x.shape[:dim]), math.prod(x.shape[dim + 1:])
        row = (1, x.shape[dim], before, after, x.dim(), dim,
               zlib.crc32(str(x.dtype).encode()))
    except (TypeError, ValueError, IndexError) as exc:
        error = exc
    rows = _exchange(comm, row, 7)
    _raise_if_any_failed(rows, error, "gather_frames")
    if len({tuple(r[2:]) for r in rows}) > 1:
        shapes = ", ".join(f"rank {k}: {r[2]} x {r[1]} x {r[3]} ({r[4]}-D, dim {r[5]})"
                           for k, r in enumerate(rows))
        raise ValueError(f"x: every rank's slab must match apart from its frames (dim {dim}) "
                         f"and have the same dtype; (dims before) x frames x (dims after): "
                         f"{shapes}")
    counts = tuple(r[1] for r in rows)
    x3 = x.reshape(before, x.shape[dim], after)
    out = GatherRows.apply(comm, counts, None, x3, None)
    return out.reshape(x.shape[:dim] + (sum(counts),) + x.shape[dim + 1:])
