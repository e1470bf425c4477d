"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for PMFDiT: sharded parameters, gradients, optimizer state and EMA
copies; ``train.parallel=fsdp``. The default, ``train.parallel=ddp``, is the bare module with an explicit gradient
all-reduce (:mod:`pmf.train.dist`). Findings and the reasons for each choice: docs/scale-out.md.

What works through ``fully_shard`` (torch 2.13, checked on CPU/gloo with 2 processes in tests/test_fsdp.py):

* ``torch.func.jvp`` (``objective.impl=reference``): FSDP2's hook function ``RegisterPostBackwardFunction`` has a
  ``jvp`` rule and a vmap rule, so functorch's JVP passes through the pre-forward hooks; u, du/dt and the
  reduce-scattered gradients equal the unsharded ones.
* Forward-AD dual tensors (``torch.autograd.forward_ad``, ``objective.impl=lean``) do NOT: the first sharded block
  that receives a dual activation raises "A custom Function's forward is returning a view (or an input as-is) but
  the jvp is not returning a view." (the same hook function, run by the autograd engine's forward-AD path).
  Before that, the lean guidance pass runs under ``torch.inference_mode``: the unsharded parameter storage FSDP
  allocates there becomes an inference tensor, and the next all-gather outside inference mode fails with "Inplace
  update to inference tensor outside InferenceMode is not allowed." :func:`check_objective` refuses the lean path
  before any work is done.
* ``torch.optim.Muon`` runs on DTensor matrices, but its Newton-Schulz iteration then runs as sharded DTensor matmuls
  (a collective in every iteration) and, in bfloat16, the changed summation order moves the update by ~2 % per
  matrix. :class:`GatheredMuon` all-gathers each momentum-updated matrix once, orthogonalises it whole, and keeps
  its shard: the update is then bitwise that of the unsharded optimizer.

Checkpoints and exports are gathered to full tensors on rank 0 (:func:`gather_full`, ``get_model_state_dict(...,
full_state_dict=True)``), so a training state written by an FSDP run has exactly the layout of a ``ddp`` run; a run
can resume under either mode, on any number of processes. Loading scatters full tensors back into shards
(:func:`shard_like`). Everything here is a collective: call it on every rank, in the same order.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from pmf.train import dist
from pmf.train.optim import BatchedMuon, MuonWithAdam, build_optimizer

# Methods of PMFDiT that the objective calls directly (lean path, guidance); FSDP's root hooks must run around them
# too, or the root's own parameters (tokens, embedders, final layers) stay sharded inside them.
FORWARD_METHODS = ("trunk", "head")

# The error forward-mode dual tensors raise inside an FSDP2-sharded module (torch 2.13); quoted in check_objective.
FORWARD_AD_ERROR = ("A custom Function's forward is returning a view (or an input as-is) but the jvp is not returning "
                    "a view.")


def check_objective(impl: str) -> None:
    """Both objectives run on sharded networks: ``reference`` (``torch.func.jvp`` passes FSDP2's hooks) and ``lean``,
    whose forward-AD pass enters every FSDP unit with plain tensors (the rules: :mod:`pmf.objective_lean`; parity
    with one process: tests/test_fsdp_lean.py). Refuses only an objective this module does not know."""
    if impl not in ("lean", "reference"):
        raise ValueError(f"objective.impl must be 'lean' or 'reference' with train.parallel=fsdp, got {impl!r}")


def blocks_of(net: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a PMFDiT (trunk, u-head, v-head): one FSDP unit each."""
    out = [*net.shared_blocks, *net.u_heads]
    if getattr(net, "has_v_head", False):
        out += list(net.v_heads)
    return out


def shard_model(net: nn.Module, device: torch.device, reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``net`` in place over all ranks (one mesh dimension): every block is its own FSDP unit (all-gathered
    just before it runs, freed after when ``reshard_after_forward``), the root unit holds the rest. Call after the
    parameters agree across ranks (:func:`pmf.train.dist.broadcast_module_`): each rank keeps its own chunk of its own
    copy, so differing copies would be silently mixed into one model."""
    mesh = init_device_mesh(device.type, (dist.world_size(),))
    for blk in blocks_of(net):
        fully_shard(blk, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(net, mesh=mesh, reshard_after_forward=reshard_after_forward)
    for name in FORWARD_METHODS:
        register_fsdp_forward_method(net, name)
    return net


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


# ----------------------------------------------------------------------------------------------------------------
# Full <-> sharded state (collectives: every rank calls, in the same order)


def gather_full(obj, dst: int = 0):
    """``obj`` (nested dicts / lists / tuples of tensors and plain values) with every DTensor all-gathered to a full
    CPU tensor on rank ``dst``; other ranks get None in its place (they never hold the whole state in host memory).
    Plain tensors and values are returned as they are."""
    if isinstance(obj, DTensor):
        full = obj.full_tensor()
        return full.cpu() if dist.rank() == dst else None
    if isinstance(obj, dict):
        return {k: gather_full(v, dst) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gather_full(v, dst) for v in obj)
    return obj


def shard_like(full, like):
    """``full`` (a nested structure of full tensors, as :func:`gather_full` wrote it) with each tensor whose
    counterpart in ``like`` is a DTensor cut into that DTensor's shard (same mesh and placements; each rank cuts its
    own chunk from its own copy, no communication)."""
    if isinstance(like, DTensor) and isinstance(full, torch.Tensor):
        if tuple(full.shape) != tuple(like.shape):
            raise ValueError(f"shape {tuple(full.shape)} does not match the sharded tensor's {tuple(like.shape)}")
        t = full.to(device=like.device, dtype=like.dtype)
        return distribute_tensor(t, like.device_mesh, like.placements, src_data_rank=None)
    if isinstance(full, dict) and isinstance(like, dict):
        return {k: shard_like(v, like.get(k)) for k, v in full.items()}
    if isinstance(full, (list, tuple)) and isinstance(like, (list, tuple)) and len(full) == len(like):
        return type(full)(shard_like(a, b) for a, b in zip(full, like))
    return full


def full_model_state_dict(net: nn.Module) -> dict:
    """The unsharded model state dict on rank 0 (CPU; the plain module's keys), {} on the other ranks."""
    return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state_dict(opt: torch.optim.Optimizer, state_dict: dict) -> None:
    """Load an optimizer state dict written from full tensors (a ``ddp`` run's, or :func:`gather_full`'s) into an
    optimizer over sharded parameters: torch's load keeps plain tensors, so every per-parameter state tensor of a
    parameter's shape is then cut into that parameter's shard (scalars such as ``step`` stay as they are)."""
    opt.load_state_dict(state_dict)
    for p, st in opt.state.items():
        if isinstance(p, DTensor):
            for k, v in list(st.items()):
                if isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and tuple(v.shape) == tuple(p.shape):
                    st[k] = shard_like(v, p)


# ----------------------------------------------------------------------------------------------------------------
# Muon on sharded matrices


class GatheredMuon(BatchedMuon):
    """:class:`pmf.train.optim.BatchedMuon` whose orthogonalisation sees whole matrices when the parameters are sharded
    DTensors.

    Per matrix: B <- lerp(B, G, 1 - mu) on the shard; U = lerp(G, B, mu) (Nesterov) on the shard; U is all-gathered,
    O = NS5(U) runs on the full matrices (every rank, the same numbers, batched by shape exactly as in one process),
    each rank keeps its rows of O; theta <- theta (1 - lr wd) - lr_adj O. The arithmetic is the unsharded
    optimizer's, so the result equals it bit for bit. Plain tensors take the same path without the gather. Cost: one
    all-gather per matrix per step; the Newton-Schulz work is repeated on every rank (small next to the network's
    forward and backward passes)."""

    def _full(self, update):
        return update.full_tensor() if isinstance(update, DTensor) else update

    def _like(self, ortho, update):
        if isinstance(update, DTensor):
            return distribute_tensor(ortho, update.device_mesh, update.placements, src_data_rank=None)
        return ortho


def build_sharded_optimizer(net: nn.Module, cfg) -> torch.optim.Optimizer:
    """:func:`pmf.train.optim.build_optimizer` over the sharded parameters, with its Muon part replaced by
    :class:`GatheredMuon` (same groups and hyperparameters, same state-dict layout)."""
    opt = build_optimizer(net, cfg)

    def gathered(muon: torch.optim.Muon) -> GatheredMuon:
        return GatheredMuon([dict(g) for g in muon.param_groups], **muon.defaults,
                            ns_dtype=getattr(muon, "ns_dtype", torch.bfloat16))

    if isinstance(opt, MuonWithAdam):
        return MuonWithAdam(gathered(opt.muon), opt.adam)
    if isinstance(opt, torch.optim.Muon):
        return gathered(opt)
    return opt


# ----------------------------------------------------------------------------------------------------------------
# Checks


def check_gradients_reduced(net: nn.Module, what: str = "gradients", ignore_prefixes: tuple[str, ...] = ()) -> None:
    """FSDP's analogue of the DDP-path consistency check. With sharded parameters no replica can drift (each
    element lives on one rank), but a backward that bypasses FSDP's hooks leaves the sharded gradients empty (the
    gradient lands on a freed unsharded tensor and is never reduce-scattered), and the optimizer then silently skips
    those parameters. Raises :class:`pmf.train.dist.ConsistencyError` on every rank when any rank has a trainable
    sharded parameter without a gradient (names starting with ``ignore_prefixes`` are allowed none)."""
    missing = [n for n, p in net.named_parameters()
               if p.requires_grad and p.grad is None and not n.startswith(tuple(ignore_prefixes))]
    if dist.all_reduce_scalar(float(len(missing)), "max") > 0:
        detail = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "") if missing else "on another rank"
        raise dist.ConsistencyError(
            f"{what}: parameters without a reduce-scattered gradient at rank {dist.rank()}: {detail}. FSDP's "
            "post-backward hook did not run for them (a forward that bypassed the FSDP module's hooks?).")
