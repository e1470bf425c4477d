"""Process group helpers. Every function is a no-op (or the identity) in a single process, so the trainer has one
code path for 1 and N processes.

Why no DDP wrapper: ``torch.func.jvp`` cannot run through ``DistributedDataParallel`` (pytorch/pytorch#102197), and
calling the unwrapped ``ddp.module`` inside the JVP silently skips DDP's gradient all-reduce, so each rank would
train its own replica. We therefore run the bare module and average gradients explicitly, in buckets launched
while backward runs (:class:`GradReducer`), and check that parameters agree across ranks (:func:`check_consistency`).
With ``train.parallel=fsdp`` (:mod:`pmf.train.fsdp`) FSDP2 shards the parameters and reduce-scatters the gradients
itself; :func:`check_consistency` then compares only the replicated tensors.
"""

from __future__ import annotations

import datetime
import functools
import os
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist


def init(device_type: str = "cpu") -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); gloo on CPU, nccl on CUDA."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    extra = {}
    if device_type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
        # Binds the group to this rank's GPU: NCCL communicators are created eagerly on it, and barrier() and
        # object collectives do not guess the device from the rank (a wrong guess hangs on some layouts).
        extra["device_id"] = device
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30), **extra)


def shutdown() -> None:
    """Destroy the process group (its communicators and threads) if one was joined; call where :func:`init` was
    called, also on error paths, so no rank exits holding NCCL resources (PyTorch warns, and may hang at exit)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """In-place mean over ranks of a list of tensors (flattened into one buffer: one collective)."""
    if not dist.is_initialized() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks of one tensor, without reading it on the host; a no-op in one process."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


BUCKET_MB = 25.0  # gradient bucket size of GradReducer: large enough to amortise a collective's launch latency,
#   small enough that the first buckets are reduced while backward still runs (the size DDP uses by default)


@dataclass(eq=False)
class _Bucket:
    """Consecutive parameters (in reduction order) whose gradients live in one flat buffer during a reduction."""
    params: list[torch.nn.Parameter]
    offsets: list[int]  # start of each parameter's gradient in the buffer (elements)
    numel: int
    deferred: bool = False  # launched only by finish(): parameters that got no gradient on any rank so far
    buffer: torch.Tensor | None = None  # allocated when the first gradient arrives; dropped after the reduction
    pending: int = 0  # gradients of this bucket still to arrive on the armed micro-batch
    work: object = None  # the async all-reduce in flight

    def view(self, k: int) -> torch.Tensor:
        p = self.params[k]
        return self.buffer[self.offsets[k] : self.offsets[k] + p.numel()].view_as(p)


class GradReducer:
    """Average gradients over ranks in buckets, each all-reduced asynchronously as soon as its gradients exist.

    Parameters are grouped, in reverse registration order (about the order backward produces their gradients),
    into buckets of ~``bucket_mb`` MB (a parameter larger than that gets a bucket of its own). On the micro-batch
    armed by ``start_micro_batch(last=True)``, a post-accumulate-grad hook moves each finished gradient into its
    bucket's flat buffer (``p.grad`` becomes a view of it: the gradient is not copied back afterwards, and no
    buffer of all gradients at once ever exists) and launches ``all_reduce(async_op=True)`` for every bucket whose
    gradients are complete, in bucket order, so the sequence of collectives is the same on every rank whatever
    order the hooks run in. :meth:`finish` launches what is left (a parameter without a gradient gets zeros, so every
    rank joins the same collective and unused parameters agree across ranks), waits for all, and divides by the
    world size (``ReduceOp.AVG`` under NCCL; gloo has no AVG). Earlier micro-batches only accumulate ``p.grad``.

    Each rank's loss is the mean over its own equal slice of the global batch, so the mean of the rank gradients is
    the gradient of the global-batch mean. After the first reduction the ranks agree (one small all-reduce) on which
    parameters got a gradient on any rank; the others move to trailing buckets launched by :meth:`finish`, so an
    unused head at the end of the parameter list does not hold back the first bucket. Correctness never depends on
    that guess: a bucket is launched only once all its gradients exist, or by :meth:`finish`.

    In one process nothing is registered or launched and gradients are left as they are (``None`` stays ``None``).
    A parameter must receive its gradient once per backward (non-reentrant activation checkpointing)."""

    def __init__(self, module: torch.nn.Module, bucket_mb: float = BUCKET_MB, hooks: bool = True):
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb={bucket_mb} must be > 0")
        self.world = world_size()
        self.active = dist.is_initialized() and self.world > 1
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.names = {id(p): n for n, p in module.named_parameters()}
        self._avg = self.active and dist.get_backend() == "nccl"  # gloo has no ReduceOp.AVG
        self._armed = False
        self._fired: set[int] = set()  # indices into self.params that got a gradient on the armed micro-batch
        self._used: list[bool] | None = None  # set by the first reduction (agreed over ranks)
        self._next = 0  # index of the next bucket to launch
        self._handles = []
        self._layout(deferred=set())
        if self.active and hooks:
            for k, p in enumerate(self.params):
                self._handles.append(p.register_post_accumulate_grad_hook(functools.partial(self._on_grad, k)))

    def _layout(self, deferred: set[int]) -> None:
        """Buckets in reverse parameter order; the parameters in ``deferred`` go last, in buckets of their own kind.
        A new bucket starts at the size cap or at a change of dtype / device."""
        order = [k for k in reversed(range(len(self.params))) if k not in deferred]
        order += [k for k in reversed(range(len(self.params))) if k in deferred]
        self.buckets: list[_Bucket] = []
        self._where: dict[int, tuple[_Bucket, int]] = {}
        cur = None
        for k in order:
            p = self.params[k]
            late = k in deferred
            if (cur is None or cur.deferred != late or p.dtype != cur.params[0].dtype
                    or p.device != cur.params[0].device
                    or (cur.numel + p.numel()) * p.element_size() > self.bucket_bytes):
                cur = _Bucket([], [], 0, deferred=late)
                self.buckets.append(cur)
            self._where[k] = (cur, len(cur.params))
            cur.params.append(p)
            cur.offsets.append(cur.numel)
            cur.numel += p.numel()
        self._reset()

    def _reset(self) -> None:
        for b in self.buckets:
            b.buffer, b.work, b.pending = None, None, sum(1 for _ in b.params)
        self._fired.clear()
        self._next = 0

    def start_micro_batch(self, last: bool) -> None:
        """Call before each micro-batch's backward; ``last``: its gradients are the step's final ones (armed)."""
        if not self.active:
            return
        if last and (self._next or self._fired):
            raise RuntimeError("GradReducer: start_micro_batch(last=True) twice without finish() in between")
        self._armed = last

    def _move(self, b: _Bucket, k: int) -> None:
        """Make ``p.grad`` the bucket view holding its current value (zeros when it has none)."""
        p = b.params[k]
        if b.buffer is None:
            b.buffer = torch.empty(b.numel, dtype=p.dtype, device=p.device)
        view = b.view(k)
        g = p.grad
        if g is None:
            view.zero_()
        elif g.data_ptr() != view.data_ptr():
            view.copy_(g)
        p.grad = view  # the old gradient tensor is freed here: one copy per parameter, no extra full buffer

    def _on_grad(self, k: int, p: torch.nn.Parameter) -> None:
        if not self._armed:
            return  # an earlier micro-batch: accumulate only
        if k in self._fired:
            raise RuntimeError(f"GradReducer: {self.names.get(id(p), k)} received its gradient twice in one backward "
                               "(reentrant activation checkpointing?); its bucket may already be in flight")
        self._fired.add(k)
        b, slot = self._where[k]
        self._move(b, slot)
        if not b.deferred:
            b.pending -= 1
            while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:
                self._launch(self.buckets[self._next])

    def _launch(self, b: _Bucket) -> None:
        op = dist.ReduceOp.AVG if self._avg else dist.ReduceOp.SUM
        b.work = dist.all_reduce(b.buffer, op=op, async_op=True)
        self._next += 1

    def finish(self) -> None:
        """Launch the buckets not launched yet (missing gradients as zeros), wait for all, average. Afterwards every
        trainable parameter has the same ``p.grad`` on every rank (in N processes)."""
        if not self.active:
            return
        self._armed = False
        for b in self.buckets[self._next:]:
            for slot, p in enumerate(b.params):
                if b.buffer is None or p.grad is None or p.grad.data_ptr() != b.view(slot).data_ptr():
                    self._move(b, slot)
            self._launch(b)
        for b in self.buckets:
            b.work.wait()
            if not self._avg:
                b.buffer.div_(self.world)
        fired = set(self._fired)
        self._reset()  # drops the buffers: they live on as the p.grad views until zero_grad
        if self._used is None and self._handles:
            flags = torch.tensor([float(k in fired) for k in range(len(self.params))], dtype=torch.float64)
            if dist.get_backend() == "nccl":
                flags = flags.cuda()
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            self._used = [f > 0 for f in flags.tolist()]
            unused = {k for k, u in enumerate(self._used) if not u}
            if unused:
                self._layout(deferred=unused)

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


_REDUCERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def grad_reducer(module: torch.nn.Module) -> GradReducer:
    """The :class:`GradReducer` of ``module`` (made, and its hooks registered, on first use)."""
    r = _REDUCERS.get(module)
    if r is None:
        r = _REDUCERS[module] = GradReducer(module)
    return r


def all_reduce_grads(module: torch.nn.Module, bucket_mb: float = BUCKET_MB) -> None:
    """Average gradients over ranks after backward, without overlap (:class:`GradReducer` without hooks): bucket by
    bucket, a parameter without a gradient gets zeros. The trainer uses :func:`grad_reducer`, which overlaps the
    reduction with the backward of the last micro-batch."""
    if not dist.is_initialized():
        return
    r = GradReducer(module, bucket_mb, hooks=False)
    r.finish()


def broadcast_module_(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to all ranks (used once at start)."""
    if not dist.is_initialized():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


def _all_reduce_values(values: list[float], op) -> list[float]:
    """One all-reduce of a few Python numbers as a float64 vector (on the GPU under NCCL)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=op)
    return t.tolist()


def all_reduce_scalar(value: float, op: str = "sum") -> float:
    """Sum / max of a Python number over ranks."""
    if not dist.is_initialized():
        return value
    return _all_reduce_values([float(value)], dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)[0]


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """For each flag, whether it is True on at least one rank: one MAX all-reduce of all flags together."""
    if not dist.is_initialized():
        return tuple(bool(f) for f in flags)
    return tuple(v > 0 for v in _all_reduce_values([float(bool(f)) for f in flags], dist.ReduceOp.MAX))


class ConsistencyError(RuntimeError):
    pass


def _is_sharded(t: torch.Tensor) -> bool:
    """A DTensor with any non-replicated placement (an FSDP2 parameter): each element lives on one rank only."""
    from torch.distributed.tensor import DTensor, Replicate

    return isinstance(t, DTensor) and not all(isinstance(p, Replicate) for p in t.placements)


@torch.no_grad()
def check_consistency(module: torch.nn.Module, what: str = "parameters", atol: float = 0.0) -> None:
    """Raise :class:`ConsistencyError` when any parameter differs across ranks (a broken gradient sync, a rank
    that skipped a step, different seeds). Compares rank 0's tensors with every rank's, one broadcast per parameter
    plus one all-reduce; no-op in one process.

    Sharded parameters (FSDP2 DTensors) are skipped: they have no replicas to disagree. Run this check *before*
    ``fully_shard`` (each rank keeps its chunk of its own copy, so differing copies would be mixed silently) and
    :func:`pmf.train.fsdp.check_gradients_reduced` after; replicated DTensors are compared through their local tensors."""
    if not dist.is_initialized():
        return
    bad = []
    for name, p in module.named_parameters():
        if _is_sharded(p):
            continue
        p = p.to_local() if hasattr(p, "to_local") else p
        ref = p.detach().clone()
        dist.broadcast(ref, 0)
        diff = (p.detach() - ref).abs().max().item() if p.numel() else 0.0
        if diff > atol:
            bad.append(f"{name} (max |diff| {diff:.3g})")
    flags = torch.tensor([float(len(bad))], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        flags = flags.cuda()
    dist.all_reduce(flags)
    if flags.item() > 0:
        detail = ", ".join(bad[:8]) + (" ..." if len(bad) > 8 else "") if bad else "on another rank"
        raise ConsistencyError(
            f"{what} differ across ranks at rank {rank()}: {detail}. Gradients are not being averaged "
            "(is the GradReducer / all_reduce_grads run after backward?) or ranks diverged (seeds, skipped "
            "steps).")
