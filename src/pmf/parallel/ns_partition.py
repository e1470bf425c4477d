"""Muon's Newton-Schulz work split across data-parallel ranks (``optim.muon_partition``).

With replicated parameters (``train.parallel=ddp``) every rank holds the same averaged gradients and the same momentum
buffers, so every rank would orthogonalise every matrix: the same numbers computed W times. Here each matrix gets
one owner rank, the owner alone runs Newton-Schulz on it, and the results are shared with one all-gather. The update
each rank applies is then the owner's, i.e. that of one process (batched matmuls over a subset of a shape's stack may
round differently from the whole stack on some backends; on CPU they agree to the bit in our tests).

Assignment (:func:`assign_owners`): greedy longest-processing-time over the Newton-Schulz FLOPs of each matrix
(:func:`ns_flops`): matrices in order of decreasing cost (ties: lower index first) each go to the least loaded rank
(ties: lower rank). Pure integer arithmetic on the shapes, so every rank computes the same assignment without
communicating; the largest load is at most 4/3 of the best possible (Graham 1969) and at most the mean plus one
matrix.

Sharing (:func:`share`): each rank packs its results, flattened in the Newton-Schulz dtype, into one buffer padded to
the largest share; one ``all_gather`` of W such buffers. A ring all-gather receives (W - 1) * max_share elements per
rank, against 2 (W - 1) / W * N for an all-reduce of a zero-filled buffer of all N elements: fewer bytes whenever
the largest share is under twice the mean, which a FLOP-balanced split of the pMF matrices meets (nearly all of them
have one inner dimension, the hidden width; ``benchmarks/muon_partition.py`` prints the bytes of both). Per-owner
broadcasts would move N - own share but take W collectives. This module imports only torch and the standard library.
"""

from __future__ import annotations

import heapq
from typing import Sequence

import torch
import torch.distributed as tdist

__all__ = ["ns_flops", "assign_owners", "loads", "active_world", "share"]


def ns_flops(shape: Sequence[int], steps: int = 5) -> int:
    """Multiply-add FLOPs (2 per multiply-add) of ``steps`` quintic Newton-Schulz iterations on an (m, n) matrix.
    With s = min(m, n), l = max(m, n) (the iteration runs on the wide orientation): A = X X^T costs 2 s^2 l,
    b A + c A^2 costs 2 s^3, (b A + c A^2) X costs 2 s^2 l; per step 4 s^2 l + 2 s^3, proportional to m n min(m, n)
    when s is much smaller than l. The normalisation and the additions are O(s l) and left out."""
    m, n = (int(d) for d in shape)
    s, l_ = min(m, n), max(m, n)
    return steps * (4 * s * s * l_ + 2 * s**3)


def assign_owners(costs: Sequence[int], world: int) -> list[int]:
    """The owner rank of each item: greedy LPT on integer ``costs`` over ``world`` ranks (see module doc). The same
    input gives the same output on every rank and in every process; with ``world`` 1 every item is rank 0's."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    owners = [0] * len(costs)
    heap = [(0, r) for r in range(world)]  # (load, rank): the least loaded rank, lower rank first on ties
    for i in sorted(range(len(costs)), key=lambda i: (-int(costs[i]), i)):
        load, r = heapq.heappop(heap)
        owners[i] = r
        heapq.heappush(heap, (load + int(costs[i]), r))
    return owners


def loads(costs: Sequence[int], owners: Sequence[int], world: int) -> list[int]:
    """Total cost per rank under an assignment."""
    out = [0] * world
    for c, r in zip(costs, owners):
        out[r] += int(c)
    return out


def active_world(enabled: bool, group=None) -> tuple[int, int]:
    """(world size, rank) to partition over: the process group's when ``enabled`` and one is initialised, else
    (1, 0): one process owns everything and nothing is communicated."""
    if not enabled or not tdist.is_available() or not tdist.is_initialized():
        return 1, 0
    return tdist.get_world_size(group), tdist.get_rank(group)


def _all_gather_flat(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    fn = getattr(tdist, "all_gather_single", None) or tdist.all_gather_into_tensor  # renamed in torch 2.13
    fn(out, inp, group=group)


def share(mine: dict[int, torch.Tensor], shapes: Sequence[Sequence[int]], owners: Sequence[int], world: int,
          rank: int, dtype: torch.dtype, device: torch.device, group=None) -> list[torch.Tensor]:
    """Every item's tensor on every rank, from ``mine`` ({index: tensor} of the items this rank owns, of
    ``shapes[index]``). One all-gather of per-rank buffers of ``dtype`` padded to the largest share; with ``world``
    1 ``mine`` is returned as a list, untouched. A collective: every rank calls it with the same shapes and owners."""
    if world == 1 or not shapes:
        return [mine[i] for i in range(len(shapes))]
    numel = [int(torch.Size(s).numel()) for s in shapes]
    by_rank: list[list[int]] = [[] for _ in range(world)]
    for i, r in enumerate(owners):
        by_rank[r].append(i)
    chunk = max(sum(numel[i] for i in idx) for idx in by_rank)
    send = torch.zeros(chunk, dtype=dtype, device=device)
    off = 0
    for i in by_rank[rank]:
        send[off : off + numel[i]] = mine[i].reshape(-1)
        off += numel[i]
    recv = torch.empty(world * chunk, dtype=dtype, device=device)
    _all_gather_flat(recv, send, group)
    out: list[torch.Tensor | None] = [None] * len(shapes)
    for r, idx in enumerate(by_rank):
        off = r * chunk
        for i in idx:
            out[i] = mine[i] if r == rank else recv[off : off + numel[i]].view(tuple(shapes[i]))
            off += numel[i]
    return out
