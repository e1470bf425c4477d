"""Process group helpers. Every function is a no-op (or the identity) in a single process, so the trainer has one
code path for 1 and N processes.

Why no DDP wrapper: ``torch.func.jvp`` cannot run through ``DistributedDataParallel`` (pytorch/pytorch#102197), and
calling the unwrapped ``ddp.module`` inside the JVP silently skips DDP's gradient all-reduce, so each rank would
train its own replica. We therefore run the bare module and average gradients explicitly
(:func:`all_reduce_grads`), and check that parameters agree across ranks (:func:`check_consistency`).
With ``train.parallel=fsdp`` (:mod:`pmf.train.fsdp`) FSDP2 shards the parameters and reduce-scatters the gradients
itself; :func:`check_consistency` then compares only the replicated tensors.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def init(device_type: str = "cpu") -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); gloo on CPU, nccl on CUDA."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))


def shutdown() -> None:
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


def all_reduce_grads(module: torch.nn.Module) -> None:
    """Average gradients over ranks. Each rank's loss is the mean over its own slice of the global batch, so the
    mean of the rank gradients is the gradient of the global-batch mean (equal slice sizes). A parameter without a
    gradient gets zeros first, so every rank joins the same collective."""
    if not dist.is_initialized():
        return
    grads = []
    for p in module.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    all_reduce_mean_(grads)


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
            "(is all_reduce_grads called after backward?) or ranks diverged (seeds, skipped steps).")
