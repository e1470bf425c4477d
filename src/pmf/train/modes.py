"""How the network is spread over the processes: one strategy object per run, so the training loop has one code path.

=========  ======================================================================================================
``none``   one process: the bare module, no communication (any ``train.parallel`` in a single process).
``ddp``    replicas (``train.parallel=ddp``): the bare module on every rank, gradients averaged by
           :class:`pmf.parallel.dist.GradReducer` (bucketed all-reduces launched during the last micro-batch's
           backward), Newton-Schulz partitioned over the ranks (``optim.muon_partition``).
``fsdp``   FSDP2 over all ranks (:mod:`pmf.train.fsdp`): parameters, gradients, optimizer state and EMAs sharded;
           Muon on gathered matrices (:class:`pmf.train.fsdp.GatheredMuon`).
``hsdp``   FSDP2 on a 2-D mesh: sharded within a group of ``train.hsdp_shard_size`` ranks (a node), replicated
           across groups.
=========  ======================================================================================================

A :class:`Strategy` owns what differs between them: building the network (on the meta device, materialised on the
target device with the seeded initial weights, sharded where sharded), building the optimizer, the gradient sync of
each micro-batch and the end-of-backward reduction, and full state dicts for exports and grids. The training state
has one format in every mode (:mod:`pmf.train.checkpoint`: each rank writes and reads its own part). Every method is called on every rank, in the same order
(most are collectives in N processes).

Initial weights (:func:`build_initialised`): the network is built on the meta device (no memory, no random draws),
sharded there when sharded, and allocated on the target device with ``to_empty``. The values are those of a plain
CPU build under ``torch.manual_seed(train.seed)`` (the same generator stream, so equal bit for bit, whatever the
device or the sharding): a CPU copy is built and each rank copies its chunk of every tensor into place. The device
never holds more than its shard; the CPU copy is transient.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn

from pmf.method.model import PMFDiT
from pmf.parallel import dist
from pmf.train import checkpoint, fsdp
from pmf.train.config import RunConfig
from pmf.train.ema import EMA
from pmf.train.optim import build_optimizer

MODES = ("none", "ddp", "fsdp", "hsdp")
SHARDED_MODES = ("fsdp", "hsdp")


def mode_of(parallel: str, world: int) -> str:
    """The strategy for ``train.parallel`` (checked by :mod:`pmf.train.validate`) on ``world`` processes: ``none``
    in one process, else ``parallel``."""
    return "none" if world == 1 else parallel


def make_strategy(cfg: RunConfig, device: torch.device, world: int | None = None) -> "Strategy":
    mode = mode_of(cfg.train.parallel, dist.world_size() if world is None else world)
    return (Sharded if mode in SHARDED_MODES else Replicated)(mode, cfg, device)


def strategy_of(net: nn.Module, cfg: RunConfig, device: torch.device) -> "Strategy":
    """The strategy of a network built elsewhere (e.g. a benchmark that shards by hand): sharded if it is."""
    if fsdp.is_sharded(net):
        mode = "hsdp" if next(net.parameters()).device_mesh.ndim == 2 else "fsdp"
        return Sharded(mode, cfg, device)
    return Replicated("ddp" if dist.world_size() > 1 else "none", cfg, device)


# ----------------------------------------------------------------------------------------------------------------
# Initial weights: meta device -> target device, seeded


def build_initialised(kwargs: dict, seed: int, device: torch.device, place=None, check=None) -> PMFDiT:
    """PMFDiT(**kwargs) with the initial weights of ``torch.manual_seed(seed); PMFDiT(**kwargs)`` on the CPU, bit
    for bit, allocated on ``device``. ``place(net)`` runs on the meta-device network before it is allocated (e.g.
    ``fully_shard``: then only each rank's shard is allocated). ``check(cpu_copy)`` sees the CPU values first (the
    cross-rank consistency check). Leaves the global generator seeded as after the plain build."""
    with torch.device("meta"):
        net = PMFDiT(**kwargs)
    if place is not None:
        place(net)
    torch.manual_seed(seed)
    ref = PMFDiT(**kwargs)  # the plain CPU build: its generator stream defines the initial weights
    if check is not None:
        check(ref)
    net.to_empty(device=device)
    fill_from_(net, ref)
    return net


@torch.no_grad()
def fill_from_(net: nn.Module, ref: nn.Module) -> None:
    """Copy every parameter and buffer (persistent or not) of ``ref`` (full tensors) into ``net``; a sharded (DTensor)
    parameter receives this rank's chunk, cut locally."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    src = {**dict(ref.named_parameters()), **dict(ref.named_buffers())}
    dst = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    if set(src) != set(dst):
        raise ValueError(f"tensors differ: {sorted(set(src) ^ set(dst))[:5]}")
    for name, t in dst.items():
        full = src[name].to(device=t.device, dtype=t.dtype)
        if isinstance(t, DTensor):
            full = distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None)
        t.copy_(full)


# ----------------------------------------------------------------------------------------------------------------
# Strategies


class Strategy:
    """The replicated strategies' behaviour; :class:`Sharded` overrides what differs. ``mode``: one of
    :data:`MODES`."""

    sharded = False

    def __init__(self, mode: str, cfg: RunConfig, device: torch.device):
        self.mode, self.cfg, self.device = mode, cfg, device

    def describe(self) -> dict:
        return {"mode": self.mode, "world_size": dist.world_size(), "sharded": self.sharded}

    # -- building ----------------------------------------------------------------------------------------------------
    def build_net(self, kwargs: dict) -> PMFDiT:
        """The network with the run's seeded initial weights, on this rank's device (its shard when sharded)."""
        net = build_initialised(kwargs, self.cfg.train.seed, self.device, place=self._place, check=self._check_initial)
        net.activation_checkpointing = self.cfg.train.activation_checkpointing
        self._after_build(net)
        return net

    def _place(self, net: nn.Module) -> None:
        pass

    def _check_initial(self, ref: nn.Module) -> None:
        pass

    def _after_build(self, net: nn.Module) -> None:
        dist.broadcast_module_(net)  # equal by construction; a cheap guard against a rank-dependent build
        if self.cfg.train.consistency_check:
            dist.check_consistency(net, "initial parameters")

    def build_optimizer(self, net: nn.Module) -> torch.optim.Optimizer:
        # Replicas: each rank orthogonalises its share of the matrices (optim.muon_partition,
        # pmf.parallel.ns_partition).
        return build_optimizer(net, self.cfg.optim, partition_ns=self.cfg.optim.muon_partition)

    # -- one optimizer step ------------------------------------------------------------------------------------------
    def start_micro_batch(self, net: nn.Module, last: bool) -> None:
        """Before each micro-batch's forward: only the last one's backward communicates."""
        dist.grad_reducer(net).start_micro_batch(last=last)  # does nothing in one process

    def finish_gradients(self, net: nn.Module, nimg: int) -> None:
        """After the last micro-batch's backward: every rank holds the mean gradient (its shard when sharded)."""
        dist.grad_reducer(net).finish()  # waits for the buckets launched during backward, launches the rest

    def missing_gradients(self, net: nn.Module) -> list[str]:
        """This rank's parameters that should hold a reduced gradient after :meth:`finish_gradients` and hold none
        (counted in the step's one end-of-step reduction; any on any rank: :meth:`gradient_error` on every rank).
        Replicas: none to check here (the reducer fills every gradient; ``dist.check_consistency`` compares them)."""
        return []

    def gradient_error(self, missing: list[str], nimg: int) -> Exception:
        return dist.ConsistencyError(f"gradients at {nimg / 1000:.3f} kimg: missing at rank {dist.rank()}: {missing}")

    # -- full state dicts (rank 0; None / {} elsewhere when sharded) -------------------------------------------------
    def model_state(self, net: nn.Module) -> dict:
        return net.state_dict()

    def full(self, obj):
        """``obj`` (nested state) with full tensors on rank 0."""
        return obj

    def sampling_model(self, net: nn.Module, ema: EMA, which: str, kwargs: dict) -> nn.Module | None:
        """An unsharded network holding EMA copy ``which`` (or the raw weights if empty) on rank 0, None elsewhere."""
        if not dist.is_main():
            return None
        return ema.model(which, like=net) if which else net

    # -- training state ----------------------------------------------------------------------------------------------
    def save_training_state(self, run_dir: Path, step: int, net, opt, ema: EMA, rest: dict) -> None:
        """The training state of ``step`` (:func:`pmf.train.checkpoint.save_training_state`; every rank its part)."""
        state = {"net": net.state_dict(), "optimizer": opt.state_dict(), "ema": ema.state_dict(), **rest}
        checkpoint.save_training_state(run_dir, state, step, info=self.describe())

    def load_training_state(self, state: checkpoint.OpenedState, net, opt, ema: EMA) -> None:
        """The tensors of ``state`` (:func:`pmf.train.checkpoint.open_latest`) read into the network, optimizer and
        EMA, resharded to this run's layout."""
        checkpoint.load_training_state(state, net, opt, ema)


class Replicated(Strategy):
    """``none`` / ``ddp``: the bare module on every rank."""


class Sharded(Strategy):
    """``fsdp`` / ``hsdp``: FSDP2 units per block over a 1-D or 2-D mesh, the bf16 all-gather policy under
    ``train.precision=bf16`` (:func:`pmf.train.fsdp.mixed_precision`)."""

    sharded = True

    def describe(self) -> dict:
        out = super().describe()
        if self.mode == "hsdp":
            out["mesh"] = list(fsdp.hsdp_mesh_shape(dist.world_size(), self.cfg.train.hsdp_shard_size))
        return out

    def _place(self, net: nn.Module) -> None:
        mesh = fsdp.build_mesh(self.device.type, self.mode, self.cfg.train.hsdp_shard_size)
        fsdp.shard_model(net, self.device, self.cfg.train.fsdp_reshard_after_forward, mesh=mesh,
                         mp_policy=fsdp.mixed_precision(self.cfg.train.precision))

    def _check_initial(self, ref: nn.Module) -> None:
        # Compared before the chunks are cut: each rank keeps its chunk of its own copy, so copies that differ would
        # be mixed silently. One number per rank (52 bits of a SHA-256 of every tensor's bytes), compared by two
        # all-reduces: the CPU copy itself never meets a collective (NCCL takes only GPU tensors).
        if self.cfg.train.consistency_check and dist.world_size() > 1:
            h = float(int(_digest(ref.state_dict())[:13], 16))
            if dist.all_reduce_scalar(h, "max") != -dist.all_reduce_scalar(-h, "max"):
                raise dist.ConsistencyError(
                    f"initial parameters differ across ranks (rank {dist.rank()}): the seeded CPU build gave different "
                    "values; are all ranks running the same torch and pmf?")

    def _after_build(self, net: nn.Module) -> None:
        pass

    def build_optimizer(self, net: nn.Module) -> torch.optim.Optimizer:
        return fsdp.build_sharded_optimizer(net, self.cfg.optim)  # Muon gathers each matrix (GatheredMuon)

    def start_micro_batch(self, net: nn.Module, last: bool) -> None:
        net.set_requires_gradient_sync(last)  # earlier micro-batches accumulate unsharded gradients locally

    def finish_gradients(self, net: nn.Module, nimg: int) -> None:
        pass  # FSDP reduce-scattered during the last backward

    def missing_gradients(self, net: nn.Module) -> list[str]:
        # A skipped reduce-scatter would leave parameters silently untrained (pmf.train.fsdp.check_gradients_reduced).
        if not self.cfg.train.consistency_check:
            return []
        unused = () if self.cfg.objective.use_v_head else ("v_heads.", "v_final_layer.")
        return fsdp.missing_gradients(net, ignore_prefixes=unused)

    def gradient_error(self, missing: list[str], nimg: int) -> Exception:
        return fsdp.gradients_not_reduced(f"gradients at {nimg / 1000:.3f} kimg", missing)

    def model_state(self, net: nn.Module) -> dict:
        return fsdp.full_model_state_dict(net)

    def full(self, obj):
        return fsdp.gather_full(obj)

    def sampling_model(self, net: nn.Module, ema: EMA, which: str, kwargs: dict) -> nn.Module | None:
        sd = self.full(ema.weights(which)) if which else self.model_state(net)  # every rank gathers
        if not dist.is_main():
            return None
        model = PMFDiT(**kwargs).to(self.device)
        model.load_state_dict(sd, strict=True)
        return model


def _digest(sd: dict) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for k, t in sorted(sd.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{k}{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()
