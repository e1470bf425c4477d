"""``pmf train --dry-run``: the resolved config, the run's derived numbers (steps, batches, parameters, the chosen
parallel strategy) and the per-device memory plan, without reading data, allocating the model or joining a process
group (:func:`dry_run_report`)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import torch

from pmf.data.datasets import ImageFolderDataset
from pmf.data.shards import ShardDataset, is_shard_dir
from pmf.method.compute import compute_report
from pmf.method.model import PMFDiT
from pmf.parallel import dist
from pmf.train import fsdp, modes, plan
from pmf.train.config import RunConfig, to_json
from pmf.train.ema import EMASpec, ema_beta

# Training-set sizes used by --dry-run when the data is not read: Fashion-MNIST's train split, and the ImageNet-1k
# train set for data.dataset=imagefolder when data.path is not present [the ImageNet-1k train split: 1,281,167 images].
FASHION_MNIST_TRAIN_SIZE = 60_000
IMAGENET_TRAIN_SIZE = 1_281_167


def dataset_size(cfg: RunConfig) -> tuple[int, str]:
    """(number of training images, where the number comes from) without reading any image: Fashion-MNIST's known
    size; for an ImageFolder, the file listing of data.path when it exists (nothing decoded), else the ImageNet-1k
    train size."""
    if cfg.data.dataset == "fashion_mnist":
        return FASHION_MNIST_TRAIN_SIZE, "Fashion-MNIST train split (known size; data not read)"
    if cfg.data.dataset == "imagefolder":
        if cfg.data.path and Path(cfg.data.path).is_dir():
            n = len(ImageFolderDataset(cfg.data.path, cfg.data.resolution))
            return n, f"files listed under {cfg.data.path} (no image decoded)"
        return IMAGENET_TRAIN_SIZE, (f"ImageNet-1k train size {IMAGENET_TRAIN_SIZE:,} assumed: data.path "
                                     f"{cfg.data.path or '(empty)'} is not present, nothing was read")
    if cfg.data.dataset == "shards":
        if cfg.data.path and is_shard_dir(cfg.data.path):
            return len(ShardDataset(cfg.data.path)), f"manifest of {cfg.data.path} (no image read)"
        return IMAGENET_TRAIN_SIZE, (f"ImageNet-1k train size {IMAGENET_TRAIN_SIZE:,} assumed: data.path "
                                     f"{cfg.data.path or '(empty)'} holds no dataset.json, nothing was read")
    raise ValueError(f"unknown data.dataset {cfg.data.dataset!r}; use fashion_mnist, imagefolder or shards")


def run_plan(cfg: RunConfig, world: int, n_data: int) -> dict:
    """The derived numbers of a run: batches per device, steps per epoch and in total, epochs, EMA decays.

    steps_per_epoch = floor(n_data / batch_size) (the recipe's 1,281,167 // 1024 = 1251); the sampler wraps the
    ragged tail into the next epoch, so no image is dropped and the run length is exact in images:
    steps_total = ceil(total_kimg * 1000 / batch_size)."""
    G, accum = cfg.train.batch_size, cfg.train.accum_steps
    if G % (world * accum):
        raise ValueError(f"train.batch_size={G} must be divisible by world_size*accum_steps={world * accum}")
    total_nimg = int(round(cfg.train.total_kimg * 1000))
    return {
        "world_size": world, "parallel": cfg.train.parallel, "global_batch": G, "per_device_batch": G // world,
        "accum_steps": accum, "micro_batch_per_device": G // (world * accum), "dataset_size": n_data,
        "steps_per_epoch": n_data // G, "epochs": round(total_nimg / n_data, 4), "total_kimg": cfg.train.total_kimg,
        "steps_total": math.ceil(total_nimg / G),
        "ema_beta_per_step": {EMASpec.parse(e).name: ema_beta(EMASpec.parse(e), G, 10**18, ramp=None)
                              for e in cfg.train.ema},  # after the ramp-up
    }


def dry_run_report(cfg: RunConfig, kwargs: dict, device: torch.device, plan_devices: int | None = None,
                   plan_device_memory: float | None = None) -> dict:
    """``--dry-run``: print the resolved config and the run's derived numbers; read no data, allocate nothing on the
    device (the model is built on the meta device to count parameters; the memory plan measures small instances on
    the CPU, :mod:`pmf.train.plan`), join no process group. The world size is ``plan_devices``, else torchrun's
    WORLD_SIZE (set it by hand to plan a launch: ``WORLD_SIZE=64 pmf train --dry-run ...``), else 1; the memory of
    a device is ``plan_device_memory`` GiB, else the visible GPU's, else this host's RAM (a CPU run)."""
    world = plan_devices or int(os.environ.get("WORLD_SIZE", "1"))
    n_data, source = dataset_size(cfg)
    summary = {"model": cfg.model.name, "device": str(device), **run_plan(cfg, world, n_data),
               "dataset_size_source": source,
               "steps_per_epoch_rule": "floor(dataset_size / global_batch); the ragged tail wraps into the next epoch"}
    with torch.device("meta"):
        summary["params_M"] = round(sum(p.numel() for p in PMFDiT(**kwargs).parameters()) / 1e6, 3)
        infer = {**kwargs, "v_head": False}
        summary["params_M_inference"] = round(sum(p.numel() for p in PMFDiT(**infer).parameters()) / 1e6, 3)
    # the paper's compute figures (Sec. 6.3): generator / training parameters, Gflops = multiply-accumulates per forward
    summary.update(compute_report(kwargs))
    n_gpu, gpu_gib, gpu_name = plan.local_devices()
    if plan_device_memory:
        mem, name = plan_device_memory, "planned"
    elif n_gpu and device.type == "cuda":
        mem, name = gpu_gib, gpu_name
    else:
        mem, name = plan.host_memory_gib(), "host RAM (CPU run)"
    dplan = plan.device_plan(cfg, kwargs, world, mem, name)
    summary.update({k: dplan[k] for k in ("est_peak_gib_per_device", "fits")}, device_plan=dplan)
    summary["strategy"] = modes.mode_of(cfg.train.parallel, world)
    summary["shard_degree"] = plan.shard_degree(cfg, world)
    if world > 1:  # the same launch under each mode: what sharding buys per device
        summary["est_peak_gib_per_device_by_mode"] = {
            mode: plan.device_plan(replace(cfg, train=replace(cfg.train, parallel=mode)), kwargs, world, mem,
                                   name)["est_peak_gib_per_device"] for mode in ("ddp", "fsdp", "hsdp")}
    notes = [] if dplan["fits"] else [f"does not fit: {plan.format_plan(dplan)}. Knobs: {dplan['advice']}"]
    terms = sorted(k for k, v in (cfg.objective.perceptual_weights or {}).items() if v > 0)
    if terms:
        need = {"lpips": ("lpips_vgg_path", "lpips_lin_path"), "convnext": ("convnext_path",)}
        missing = [f"perceptual.{key}" for t in terms for key in need.get(t, ())
                   if not Path(getattr(cfg.perceptual, key) or "/nonexistent").exists()]
        notes.append(f"perceptual terms {terms} (objective.perceptual_weights) load their backbones at start"
                     + (f"; set {', '.join(missing)} first" if missing else ""))
    if cfg.train.parallel in modes.SHARDED_MODES and world == 1:
        notes.append(f"train.parallel={cfg.train.parallel} in one process runs unsharded")
    if cfg.train.parallel == "hsdp" and world > 1:
        try:
            summary["hsdp_mesh"] = list(fsdp.hsdp_mesh_shape(world, cfg.train.hsdp_shard_size))
        except ValueError as e:
            notes.append(str(e))
    summary["notes"] = notes
    dist.print0(to_json(cfg))
    dist.print0(json.dumps(summary, indent=2))
    return summary
