"""The end of a training step in one reduction and one host read.

After the backward, the step needs a handful of scalars on the host: the global gradient norm (clipping, the
non-finite check, the log), the metrics averaged over ranks, the flags every rank must agree on (time budget,
checkpoint due, stop signal) and, when sharded, the count of parameters FSDP left without a reduced gradient. Each
read of a device value on the host waits for all queued device work, and each collective is a launch and a round
trip, so they are packed into one float64 vector: one all-reduce (sum), one ``tolist``. :func:`end_of_step` does it.

The gradient norm is computed from each rank's local gradients: ||g||^2 = sum over ranks of the local sum of
squares divided by how many ranks hold each element (every rank under ddp: replicated gradients; one rank under
fsdp; the replica groups under hsdp: a DTensor's ``Replicate`` mesh dimensions). Clipping then scales the local
gradients by min(1, max_norm / (||g|| + 1e-6)) on the device, as ``torch.nn.utils.clip_grad_norm_`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pmf.parallel import dist


def _holders(g: torch.Tensor, world: int) -> int:
    """How many ranks hold each element of gradient ``g``: its replicated mesh dimensions for a DTensor, else all."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(g, DTensor):
        return world
    n = 1
    for size, placement in zip(g.device_mesh.shape, g.placements):
        if isinstance(placement, Replicate):
            n *= size
    return n


def _local(g: torch.Tensor) -> torch.Tensor:
    return g.to_local() if hasattr(g, "to_local") else g


def local_grad_square(params: list[torch.Tensor], device) -> torch.Tensor:
    """This rank's share of ||g||^2 (float64 scalar on ``device``): summed over ranks it is the global value."""
    world = dist.world_size()
    groups: dict[int, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault(_holders(p.grad, world), []).append(_local(p.grad))
    total = torch.zeros((), dtype=torch.float64, device=device)
    for holders, grads in groups.items():
        norms = torch._foreach_norm(grads)
        total = total + torch.stack(norms).to(torch.float64).square().sum() / holders
    return total


@dataclass
class EndOfStep:
    grad_norm: float
    metrics: dict  # averaged over ranks
    flags: tuple  # each: true on at least one rank
    missing_gradients: int  # summed over ranks


def end_of_step(params: list[torch.Tensor], sums: dict, flags: tuple, missing: int, device,
                max_norm: float = 0.0) -> EndOfStep:
    """One all-reduce and one host read for everything the step ends with (module doc). ``sums``: metric name ->
    this rank's value (a device tensor or a number); ``flags``: host booleans; ``missing``: this rank's count of
    parameters without a reduced gradient. With ``max_norm > 0`` the local gradients are clipped in place (device
    work only) before the read."""
    keys = sorted(sums)
    parts = [torch.as_tensor(sums[k]).detach().to(device, torch.float64).reshape(1) for k in keys]
    host = torch.tensor([float(missing), *(float(bool(f)) for f in flags)], dtype=torch.float64)
    parts += [local_grad_square(params, device).reshape(1), host.to(device, non_blocking=True)]
    vec = dist.all_reduce_sum_(torch.cat(parts))
    norm = vec[len(keys)].sqrt()
    if max_norm > 0 and params:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0).to(torch.float32)
        torch._foreach_mul_([_local(p.grad) for p in params], coef)
    values = vec.tolist()  # the one host read of the step
    world = dist.world_size()
    metrics = {k: values[i] / world for i, k in enumerate(keys)}
    n = len(keys)
    return EndOfStep(grad_norm=values[n] ** 0.5, metrics=metrics,
                     flags=tuple(v > 0 for v in values[n + 2:]), missing_gradients=int(values[n + 1]))
