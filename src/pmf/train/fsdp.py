"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for PMFDiT: sharded parameters, gradients, optimizer state and EMA
copies; ``train.parallel=fsdp`` and ``hsdp``. The default, ``train.parallel=ddp``, is the bare module with an
explicit gradient all-reduce (:mod:`pmf.parallel.dist`). Findings and the reasons for each choice: docs/scale-out.md.

What works through ``fully_shard`` (torch 2.13, checked on CPU/gloo with 2 processes in tests/test_fsdp.py):

* ``torch.func.jvp`` (``objective.impl=reference``): FSDP2's hook function ``RegisterPostBackwardFunction`` has a
  ``jvp`` rule and a vmap rule, so functorch's JVP passes through the pre-forward hooks; u, du/dt and the
  reduce-scattered gradients equal the unsharded ones.
* The lean objective's explicit tangent pass (``objective.impl=lean``): plain tensors only (blocks take their
  tangent through ``forward``, the root's ``u_and_tangent`` is a registered forward method), so FSDP2's hooks see
  nothing unusual; u, du/dt and the reduce-scattered gradients equal the unsharded ones (tests/test_fsdp_lean.py).
  Forward-AD dual tensors (``torch.autograd.forward_ad``) must not enter FSDP2's hook function
  (``RegisterPostBackwardFunction`` has no view-preserving ``jvp`` for them: torch 2.13 raises "A custom Function's
  forward is returning a view (or an input as-is) but the jvp is not returning a view.").
* ``torch.optim.Muon`` runs on DTensor matrices, but its Newton-Schulz iteration then runs as sharded DTensor matmuls
  (a collective in every iteration) and, in bfloat16, the changed summation order moves the update by ~2 % per
  matrix. :class:`GatheredMuon` all-gathers each momentum-updated matrix once, orthogonalises it whole, and keeps
  its shard: the update is then bitwise that of the unsharded optimizer.

Meshes (:func:`build_mesh`): ``train.parallel=fsdp`` shards every parameter over all ranks (1-D mesh);
``hsdp`` uses a 2-D mesh ``(replicate, shard)``: parameters are sharded within a group of ``train.hsdp_shard_size``
ranks (default: the processes of one node, LOCAL_WORLD_SIZE) and replicated across groups, so the per-block
all-gathers and reduce-scatters stay on the fast intra-node links and only the gradient all-reduce of each shard
crosses nodes. Placements are then ``(Replicate(), Shard(0))``; everything below works on either mesh.

Mixed precision (:func:`mixed_precision`, :func:`shard_model`): with ``train.precision=bf16`` the numbers are those of
the replicated run under bf16 autocast, and only the matrix weights travel in bfloat16. Autocast casts exactly the
inputs of the matrix products (``nn.Linear``, ``nn.Conv2d``) to bfloat16 and leaves the rest in float32: the learned
tokens, ``pos_embed``, the label embedding, the RMSNorm scales and the zero-initialised gates, so the residual stream
(and du/dt riding on it) stays float32 through every block. FSDP2's ``MixedPrecisionPolicy`` casts every parameter of
a unit, so a single bf16 policy per block would make all of those bfloat16 and the residual stream with them. Hence
two units per block: the block's linear layers form one group (``fully_shard`` of a list) under
``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`` (half the all-gather traffic; their bf16 values
are the ones autocast would make), and the block itself, with its norms and gates, under a float32 policy; the root
unit (tokens, position embedding, embedders, final layers: about 4 % of the parameters) is float32 as well, its
matrix products cast by autocast as in a replicated run. Gradients are reduce-scattered in float32 into float32
shards; the optimizer and EMAs see float32 as before. ``cast_forward_inputs=False``: autocast decides the compute
dtypes, so the times t, r, h and the guidance scalars keep float32 on their way into the sinusoidal embeddings.
Checked against the replicated run under bf16 (block-input dtypes, loss, gradients): tests/test_fsdp_precision.py.

What may run inside the JVP (the MeanFlow loss differentiates u(z_t, r, t) along the tangent (v, 0, 1), Eq. 6):

* ``torch.func.jvp`` around the sharded network: yes. The pre-forward hook all-gathers a unit's parameters as
  plain tensors (they carry no tangent: forward-mode AD here is over the inputs z, t, not over theta), the hook
  function's ``jvp`` rule passes the tangents through, and the primal and tangent of a block are computed from the
  same gathered weights (one all-gather for both). Under the bf16 policy the gathered weights are bfloat16 and the
  tangent is computed in the autocast dtype, exactly as in a plain bf16 run.
* ``torch.autograd.forward_ad`` dual tensors entering a sharded unit: no (see above); the lean objective has none.
* ``torch.inference_mode`` around a sharded forward: never (FSDP's unsharded storage would become an inference
  tensor); use ``torch.no_grad`` for a guidance pass without gradients.
* Collectives inside the JVP: only FSDP's own (all-gather on entry to a unit, the same on every rank). Anything
  rank-dependent inside the JVP (a branch on rank-local data that skips a unit) desynchronises the all-gathers and
  hangs: every rank must run every unit the same number of times per micro-batch.
* Calls to PMFDiT methods other than ``forward`` go through :data:`FORWARD_METHODS` (registered with
  ``register_fsdp_forward_method``), or the root's parameters stay sharded inside them.

Checkpoints: the training state is written and read by every rank with ``torch.distributed.checkpoint``
(:mod:`pmf.train.checkpoint`), no full gather; exports and grids are gathered to full tensors on rank 0
(:func:`gather_full`, ``get_model_state_dict(..., full_state_dict=True)``). Full tensors present on every rank are
loaded into shards by cutting each rank's chunk (:func:`shard_like`). Everything here is a collective: call it on
every rank, in the same order.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from pmf.parallel import dist
from pmf.train.optim import BatchedMuon, MuonWithAdam, build_optimizer

# Methods of PMFDiT that the objective calls directly (lean path, guidance); FSDP's root hooks must run around them
# too, or the root's own parameters (tokens, embedders, final layers) stay sharded inside them.
FORWARD_METHODS = ("trunk", "head", "u_and_tangent")



def blocks_of(net: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a PMFDiT (trunk, u-head, v-head): one FSDP unit each."""
    out = [*net.shared_blocks, *net.u_heads]
    if getattr(net, "has_v_head", False):
        out += list(net.v_heads)
    return out


def hsdp_mesh_shape(world: int, shard_size: int = 0) -> tuple[int, int]:
    """(replicas, shard group size) of the HSDP mesh over ``world`` ranks. ``shard_size`` 0 means the processes per
    node (torchrun's LOCAL_WORLD_SIZE, else the whole world)."""
    if shard_size <= 0:
        shard_size = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if shard_size < 1 or world % shard_size:
        raise ValueError(f"train.parallel=hsdp: the shard group size {shard_size} does not divide the world size "
                         f"{world}; set train.hsdp_shard_size to a divisor of {world} (usually the GPUs per node, "
                         "e.g. 8), or use train.parallel=fsdp to shard over all ranks")
    return world // shard_size, shard_size


def build_mesh(device_type: str, parallel: str, shard_size: int = 0) -> DeviceMesh:
    """The device mesh of ``parallel``: 1-D over all ranks (``fsdp``), or 2-D ``(replicate, shard)`` (``hsdp``,
    :func:`hsdp_mesh_shape`)."""
    world = dist.world_size()
    if parallel == "hsdp":
        return init_device_mesh(device_type, hsdp_mesh_shape(world, shard_size), mesh_dim_names=("replicate", "shard"))
    if parallel == "fsdp":
        return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    raise ValueError(f"no FSDP mesh for train.parallel={parallel!r}")


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """The policy of the matrix weights (the linear layers of each block): under bf16 all-gathered in bfloat16,
    gradients reduced in float32; fp32: no casting. Inputs are not cast (module doc). Everything else is sharded
    under :data:`FLOAT32_POLICY`."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    return MixedPrecisionPolicy(cast_forward_inputs=False)


# Parameters that autocast leaves in float32 (tokens, position embedding, norms, gates, the root's embedders whose
# products autocast casts itself) are gathered and kept in float32 (module doc).
FLOAT32_POLICY = MixedPrecisionPolicy(cast_forward_inputs=False)
MATRIX_LAYERS = (nn.Linear, nn.Conv2d)  # the layers whose weights autocast casts to the compute dtype


def matrix_layers(block: nn.Module) -> list[nn.Module]:
    """The linear / convolution layers inside ``block`` (one FSDP group under a low-precision policy)."""
    return [m for m in block.modules() if isinstance(m, MATRIX_LAYERS)]


def shard_model(net: nn.Module, device: torch.device, reshard_after_forward: bool = True,
                mesh: DeviceMesh | None = None, mp_policy: MixedPrecisionPolicy | None = None) -> nn.Module:
    """Shard ``net`` in place over ``mesh`` (default: 1-D over all ranks): every block is its own FSDP unit
    (all-gathered just before it runs, freed after when ``reshard_after_forward``), the root unit holds the rest.
    With a low-precision ``mp_policy`` (:func:`mixed_precision`) only each block's linear layers take it, as a group
    of their own inside the block; the block's other parameters and the root stay float32, as autocast keeps them
    (module doc). ``net`` may live on the meta device (then materialise it with ``to_empty`` and fill it,
    :mod:`pmf.train.modes`); a real module must have the same parameters on every rank
    (:func:`pmf.parallel.dist.broadcast_module_`): each rank keeps its own chunk of its own copy, so differing copies
    would be silently mixed into one model."""
    if mesh is None:
        mesh = init_device_mesh(device.type, (dist.world_size(),))
    mp_policy = mp_policy or MixedPrecisionPolicy()
    low = mp_policy.param_dtype is not None and mp_policy.param_dtype != torch.float32
    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    if low:
        # A linear layer on a (B, L, D) input returns a view of its 2-D product; FSDP2 warns that an in-place op on it
        # would skip the pre-backward hook. The network never writes into a layer's output in place.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPLinear", category=UserWarning)
    for blk in blocks_of(net):
        if low:
            # The block's tangent pass applies these layers' weights to the tangent outside their forward (and
            # out_proj's before its forward): one group, kept gathered from its first forward to its backward.
            fully_shard(matrix_layers(blk), mesh=mesh, reshard_after_forward=False, mp_policy=mp_policy)
        fully_shard(blk, **kw, mp_policy=FLOAT32_POLICY if low else mp_policy)
    fully_shard(net, **kw, mp_policy=FLOAT32_POLICY if low else mp_policy)
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


def load_full_model_state_dict(net: nn.Module, state_dict: dict) -> None:
    """Load a full (unsharded) model state dict, present on every rank, into the sharded ``net`` (strict): each rank
    keeps its chunk; no communication."""
    net.load_state_dict(shard_like(dict(state_dict), net.state_dict()), strict=True)


# ----------------------------------------------------------------------------------------------------------------
# Muon on sharded matrices


class GatheredMuon(BatchedMuon):
    """:class:`pmf.train.optim.BatchedMuon` whose orthogonalisation sees whole matrices when the parameters are sharded
    DTensors.

    Per matrix: B <- lerp(B, G, 1 - mu) on the shard; U = lerp(G, B, mu) (Nesterov) on the shard; U is all-gathered,
    O = NS5(U) runs on the full matrices (every rank, the same numbers, batched by shape exactly as in one process),
    each rank keeps its rows of O; theta <- theta (1 - lr wd) - lr_adj O. The arithmetic is the unsharded
    optimizer's, so the result equals it bit for bit. Plain tensors take the same path without the gather. Cost: one
    all-gather per matrix per step. With ``partition`` (``optim.muon_partition``, the default) the gathered matrices
    are the same on every rank, so the Newton-Schulz work is split as in DDP mode: each rank orthogonalises its
    FLOP-balanced share and one all-gather shares the results (:mod:`pmf.parallel.ns_partition`); without it every rank
    orthogonalises every matrix."""

    def _full(self, update):
        return update.full_tensor() if isinstance(update, DTensor) else update

    def _like(self, ortho, update):
        if isinstance(update, DTensor):
            return distribute_tensor(ortho, update.device_mesh, update.placements, src_data_rank=None)
        return ortho


def build_sharded_optimizer(net: nn.Module, cfg) -> torch.optim.Optimizer:
    """:func:`pmf.train.optim.build_optimizer` over the sharded parameters, with its Muon part replaced by
    :class:`GatheredMuon` (same groups and hyperparameters, same state-dict layout; Newton-Schulz split over the
    ranks when ``cfg.muon_partition``)."""
    opt = build_optimizer(net, cfg)

    def gathered(muon: torch.optim.Muon) -> GatheredMuon:
        return GatheredMuon([dict(g) for g in muon.param_groups], **muon.defaults,
                            ns_dtype=getattr(muon, "ns_dtype", torch.bfloat16), partition=cfg.muon_partition)

    if isinstance(opt, MuonWithAdam):
        return MuonWithAdam(gathered(opt.muon), opt.adam)
    if isinstance(opt, torch.optim.Muon):
        return gathered(opt)
    return opt


# ----------------------------------------------------------------------------------------------------------------
# Checks


def missing_gradients(net: nn.Module, ignore_prefixes: tuple[str, ...] = ()) -> list[str]:
    """This rank's trainable parameters without a gradient (names starting with ``ignore_prefixes`` excepted)."""
    return [n for n, p in net.named_parameters()
            if p.requires_grad and p.grad is None and not n.startswith(tuple(ignore_prefixes))]


def gradients_not_reduced(what: str, missing: list[str]) -> dist.ConsistencyError:
    """The error of :func:`check_gradients_reduced`, raised on every rank once any rank counted a missing one."""
    detail = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "") if missing else "on another rank"
    return dist.ConsistencyError(
        f"{what}: parameters without a reduce-scattered gradient at rank {dist.rank()}: {detail}. FSDP's "
        "post-backward hook did not run for them (a forward that bypassed the FSDP module's hooks?).")


def check_gradients_reduced(net: nn.Module, what: str = "gradients", ignore_prefixes: tuple[str, ...] = ()) -> None:
    """FSDP's analogue of the DDP-path consistency check. With sharded parameters no replica can drift (each
    element lives on one rank), but a backward that bypasses FSDP's hooks leaves the sharded gradients empty (the
    gradient lands on a freed unsharded tensor and is never reduce-scattered), and the optimizer then silently skips
    those parameters. Raises :class:`pmf.parallel.dist.ConsistencyError` on every rank when any rank has a trainable
    sharded parameter without a gradient (names starting with ``ignore_prefixes`` are allowed none). The training
    step makes the same check inside its one end-of-step reduction
    (:meth:`pmf.train.modes.Strategy.missing_gradients`)."""
    missing = missing_gradients(net, ignore_prefixes)
    if dist.all_reduce_scalar(float(len(missing)), "max") > 0:
        raise gradients_not_reduced(what, missing)
