"""Device plan: will a run's micro-batch fit, and where does the memory of one device go?

``pmf train ... --dry-run`` calls :func:`device_plan`; ``train.accum_steps: auto`` picks the micro-batch from it
(:func:`auto_plan`). The estimate of the peak memory of one device is a sum of

- **weights**: the training network's parameters (v-head included) in float32; under bf16 autocast (unsharded) also
  autocast's bf16 copies of the weights; under ``train.parallel=fsdp`` a 1/world shard (``hsdp``: 1/shard-group
  size, :func:`shard_degree`) plus two blocks gathered (the running one and the prefetched one; linear weights in
  bf16 under bf16) and the root unit gathered in float32 (:mod:`pmf.train.fsdp`);
- **gradients**: float32, the same split; sharded with ``accum_steps > 1`` every rank also holds the *unsynced full
  gradients* between micro-batches (FSDP accumulates them unsharded and reduce-scatters only on the last one);
- **optimizer state**: bytes per parameter *measured* by building ``train.optim``'s optimizer on a tiny model and
  taking one step (Muon keeps one buffer per matrix, Adam two per tensor);
- **EMA copies**: ``len(train.ema)`` float32 copies of the parameters (sharded under FSDP);
- **perceptual networks**: the frozen LPIPS-VGG16 / ConvNeXt-V2 weights, when ``objective.perceptual_weights`` uses
  them;
- **activations**: the *peak* bytes one step allocates per sample beyond the above, *measured directly* on the CPU
  (:mod:`pmf.train.memtrack`: every storage the real ``pmf_loss`` forward and backward create, from creation to
  free, no saved-tensor hook) on small instances of the network (full width, heads, patch size, objective,
  precision and checkpointing; 1-2 trunk and head blocks, 2x2 to 8x8 patches), with the ops CUDA autocast runs in
  float32 (``pow``, ``rsqrt``, ``exp``, ``softmax``, ...) run in float32 as on a GPU; then extrapolated to the run's
  tokens L and depth with :func:`activation_model`: per sample, L (n_trunk a_trunk + n_head a_head) + H L^2
  (n_blocks s_block + s_once) + n_patch c_patch + c0. The H L^2 terms hold the float32 B x H x L x L tangent
  temporaries of the attention's JVP rule (``pmf.method.attention``; per block if they outlive the block, once if they
  are the transient working set of one block); the perceptual backbones' activations are measured on a small crop and
  scaled by pixel count;
- **runtime**: budgets, not measurements: the CUDA context with cuBLAS / cuDNN workspaces
  (:data:`CUDA_RUNTIME_BYTES`), each NCCL communicator the mode creates (:data:`COMMUNICATOR_BYTES`: ``ddp`` and
  ``fsdp`` one, ``hsdp`` two), and allocator slack of :data:`FRAGMENTATION` of the activations (with
  ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``, which :func:`set_allocator_defaults` sets unless the user set
  it). gpu_check measures the real peak against the plan on a GPU.

tests/test_plan.py checks the plan against a direct measurement of the real ``train_step`` (peak allocated bytes on
the CPU) for small models, within 15 %.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import weakref
from dataclasses import replace

import numpy as np
import torch

from pmf.errors import PmfError

GIB = 1024**3
CUDA_RUNTIME_BYTES = 1.5 * GIB  # CUDA context, cuBLAS / cuBLASLt / cuDNN workspaces, per process
COMMUNICATOR_BYTES = 1.5 * GIB  # one NCCL communicator's buffers (NVLS / ring channels on an 8-GPU H100 node)
FRAGMENTATION = 0.10  # caching-allocator slack on top of the activations (expandable segments on)
ALLOC_CONF = "expandable_segments:True"


def set_allocator_defaults() -> None:
    """``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` unless the user set the variable: segments that grow in
    place instead of new blocks for each size, so a step's varying shapes do not fragment the device (the plan's
    slack assumes it). Must run before the first CUDA allocation."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)


# ----------------------------------------------------------------------------------------------------------------
# Measurements


def saved_tensor_bytes(fn, exclude=()) -> tuple[object, int]:
    """(fn(), bytes of the distinct storages autograd saved for the backward while ``fn`` ran and still holds when
    it returns: a graph that ``fn`` built and dropped again frees its saved tensors, and they are not counted).
    Storages of the tensors in ``exclude`` (the parameters: they exist anyway) are not counted, nor tensors of a
    parameter's shape (the bf16 copies autocast makes of the weights: a per-step constant, counted by the caller, not
    per-sample activations)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    weight_shapes = {tuple(t.shape) for t in exclude} | {tuple(t.shape)[::-1] for t in exclude if t.ndim == 2}
    saved: list[weakref.ref] = []

    def pack(t):
        # Detached: the graph then holds no reference back to a saved output's own node (returning ``t`` itself
        # makes a reference cycle that keeps such outputs alive after backward would have freed them).
        t = t.detach()
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    sizes: dict[int, int] = {}
    for ref in saved:
        t = ref()
        if t is None or tuple(t.shape) in weight_shapes:
            continue
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
        except RuntimeError:  # a storage-less view the CPU convolution saves of its (parameter) weight
            continue
        if ptr and ptr not in skip:
            sizes[ptr] = max(sizes.get(ptr, 0), st.nbytes())
    return out, sum(sizes.values())


def loss_saved_bytes(net, obj_cfg, batch: int, precision: str = "fp32", seed: int = 0) -> int:
    """Saved-tensor bytes of one ``pmf_loss`` forward of ``net`` (CPU) on a batch of random images; the draws come
    from ``seed`` (the same for every instance, so instances see the same t, r, omega, dropout pattern)."""
    from pmf.method.objective import pmf_loss
    from pmf.train.precision import autocast_context

    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, net.in_channels, net.input_size, net.input_size, generator=gen) * 2 - 1
    y = torch.randint(0, net.num_classes, (batch,), generator=gen)

    def run():
        with torch.random.fork_rng(devices=[]), autocast_context("cpu", precision):
            torch.manual_seed(seed)
            return pmf_loss(net, x, y, obj_cfg)

    (loss, _), nbytes = saved_tensor_bytes(run, exclude=list(net.parameters()))
    del loss
    return nbytes


MEASURE_BATCH = 4  # rows per measurement: the r = t / r != t split follows the sample index (exact proportions)


def step_peak_bytes(net, obj_cfg, batch: int, precision: str = "fp32", seed: int = 0) -> int:
    """Peak bytes one ``pmf_loss`` forward and backward of ``net`` allocate on a batch of images, beyond the
    parameters, their gradients and autocast's weight copies (tensors of a parameter's shape are not counted), with
    CUDA autocast's dtypes. ``net`` on the meta device (shapes only, nothing computed:
    :func:`pmf.train.memtrack.meta_autocast`) or the CPU (computed, CPU autocast with CUDA's float32 ops).
    Per-sample draws as in training (:class:`pmf.method.rng.PerSampleGenerator`, fixed seeds)."""
    from pmf.method.objective import pmf_loss
    from pmf.method.rng import PerSampleGenerator
    from pmf.train.memtrack import meta_autocast, tracking
    from pmf.train.precision import autocast_context

    dev = next(net.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(batch, net.in_channels, net.input_size, net.input_size, generator=gen) * 2 - 1).to(dev)
    y = torch.randint(0, net.num_classes, (batch,), generator=gen).to(dev)
    meta = dev.type == "meta"
    # On meta the emulation stays on through the backward (the backward's own ops never pass through it).
    with contextlib.ExitStack() as stack:
        tracker = stack.enter_context(tracking([p.shape for p in net.parameters()], cuda_dtypes=not meta))
        if meta:
            stack.enter_context(meta_autocast(precision))
        with contextlib.nullcontext() if meta else autocast_context("cpu", precision):
            loss, _ = pmf_loss(net, x, y, obj_cfg, PerSampleGenerator([seed * 1000 + i for i in range(batch)]))
        loss.backward()
        del loss
    net.zero_grad(set_to_none=True)
    return tracker.peak


def _proxy_kwargs(kwargs: dict, n_trunk: int, n_head: int, grid: int) -> dict:
    p = kwargs.get("patch_size", 16)
    return {**kwargs, "depth": n_trunk + n_head, "aux_head_depth": n_head, "input_size": grid * p}


@contextlib.contextmanager
def _cpu_measurement():
    """One CPU thread (tiny ops: with threads competing for a loaded machine, OpenMP barriers cost ~50x) and
    denormals flushed (constant weights shrink some activations into them), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    flush = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if flush:
            torch.set_flush_denormal(False)


# (trunk blocks, head blocks, patch grid side) of the measured instances: enough to solve the six coefficients
PROXIES = [(1, 1, 2), (2, 1, 2), (1, 2, 2), (1, 1, 4), (1, 1, 8), (2, 1, 8)]


def _features(L: int, n_trunk: int, n_head: int, n_patch: int, heads: int) -> list[float]:
    """The terms of the per-sample peak (module doc), in the order of :func:`activation_model`'s coefficients."""
    return [L * n_trunk, L * n_head, heads * L * L * (n_trunk + n_head), heads * L * L, n_patch, 1.0]


COEFFICIENTS = ("per_token_trunk_block", "per_token_head_block", "per_head_token_pair_block",
                "per_head_token_pair", "per_patch", "per_sample")


@functools.lru_cache(maxsize=32)
def _activation_model_cached(kw_items: tuple, obj_items: tuple, precision: str, checkpointing: bool) -> dict:
    from pmf.method.model import PMFDiT
    from pmf.method.objective import ObjectiveConfig

    kwargs, obj_cfg = dict(kw_items), ObjectiveConfig(**dict(obj_items))
    obj_cfg = replace(obj_cfg, perceptual_weights={})  # the backbones are measured separately
    heads, n_prefix = kwargs.get("num_heads", 12), _prefix_tokens(kwargs)
    rows, measured = [], []
    with _cpu_measurement():
        for n_t, n_h, g in PROXIES:
            with torch.device("meta"):  # shapes only: nothing is computed (pmf.train.memtrack.meta_autocast)
                net = PMFDiT(**_proxy_kwargs(kwargs, n_t, n_h, g))
            net.activation_checkpointing = checkpointing
            # Checkpointed blocks are measured in float32: the emulated autocast does not reach the recomputation
            # inside the backward, and the kept block inputs are the float32 residual stream either way; the
            # recomputed block's working set is then counted in float32, an upper bound.
            measured.append(step_peak_bytes(net, obj_cfg, MEASURE_BATCH, "fp32" if checkpointing else precision)
                            / MEASURE_BATCH)
            rows.append(_features(n_prefix + g * g, n_t, n_h, g * g, heads))
            del net
    coef = np.linalg.lstsq(np.array(rows), np.array(measured), rcond=None)[0]
    return dict(zip(COEFFICIENTS, (float(c) for c in coef)))


def _cheap_instance(cls, *args, **kwargs):
    """``cls(*args, **kwargs)`` built on the meta device and materialised on the CPU uninitialised: what autograd
    saves depends on shapes, not values, and initialising (even filling) a full-width layer costs seconds on a
    loaded CPU. Only for measuring sizes: the values are arbitrary."""
    with torch.device("meta"):
        module = cls(*args, **kwargs)
    return module.to_empty(device="cpu")


def _prefix_tokens(kwargs: dict) -> int:
    """class + cfg + 2 x interval (t_min and t_max each) + time tokens, with PMFDiT's defaults."""
    get = kwargs.get
    return (get("num_class_tokens", 8) + get("num_cfg_tokens", 4) + 2 * get("num_interval_tokens", 2)
            + get("num_time_tokens", 4))


def _freeze_dict(d: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else
                         tuple(sorted(v.items())) if isinstance(v, dict) else v) for k, v in d.items()))


def activation_model(kwargs: dict, obj_cfg, precision: str = "fp32", checkpointing: bool = False) -> dict:
    """Coefficients (:data:`COEFFICIENTS`) of the peak bytes per sample of one step (module doc), measured on the
    instances :data:`PROXIES` of the network (full width). Cached per configuration."""
    from dataclasses import asdict

    obj = {k: v for k, v in asdict(obj_cfg).items()}
    return _activation_model_cached(_freeze_dict(kwargs), tuple(sorted(
        (k, tuple(v) if isinstance(v, list) else v) for k, v in obj.items() if not isinstance(v, dict))),
        str(precision), bool(checkpointing))


def activation_bytes_per_sample(kwargs: dict, obj_cfg, precision: str = "fp32", checkpointing: bool = False) -> float:
    """Peak bytes per sample of one training step of the network ``kwargs`` with objective ``obj_cfg`` beyond
    weights and gradients (:func:`activation_model` extrapolated to its depth and tokens)."""
    m = activation_model(kwargs, obj_cfg, precision, checkpointing)
    g = kwargs.get("input_size", 256) // kwargs.get("patch_size", 16)
    n_head = kwargs.get("aux_head_depth", 8)
    n_trunk = kwargs.get("depth", 16) - n_head
    f = _features(_prefix_tokens(kwargs) + g * g, n_trunk, n_head, g * g, kwargs.get("num_heads", 12))
    return float(sum(c * x for c, x in zip((m[k] for k in COEFFICIENTS), f)))


@functools.lru_cache(maxsize=8)
def _perceptual_model_cached(terms: tuple, precision: str, crop: int) -> dict:
    from pmf.method.perceptual import LPIPS, ConvNeXtV2, PerceptualLoss
    from pmf.train.precision import autocast_context

    small = 32
    hook = PerceptualLoss(_cheap_instance(LPIPS) if "lpips" in terms else None,
                          _cheap_instance(ConvNeXtV2) if "convnext" in terms else None, small, crop_scale=(1.0, 1.0))
    weight_bytes = sum(p.numel() * p.element_size() for p in hook.parameters())
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, small, small, generator=gen).requires_grad_(True)
    target = torch.rand(2, 3, small, small, generator=gen)

    def run():
        with autocast_context("cpu", precision):
            return hook(x * 2 - 1, target * 2 - 1, torch.Generator().manual_seed(0))

    with _cpu_measurement():
        _, nbytes = saved_tensor_bytes(run, exclude=list(hook.parameters()))
    return {"weights": weight_bytes, "per_sample": nbytes / 2 * (crop / small) ** 2}


def perceptual_memory(obj_cfg, perceptual_cfg, precision: str = "fp32") -> dict:
    """{"weights": bytes of the frozen backbones, "per_sample": saved bytes per sample at the crop size} of the
    perceptual terms the objective uses (zeros when none). Backbones built with random weights: sizes only."""
    terms = tuple(sorted(k for k, v in (obj_cfg.perceptual_weights or {}).items() if v > 0))
    if not terms:
        return {"weights": 0, "per_sample": 0.0}
    return _perceptual_model_cached(terms, str(precision), int(perceptual_cfg.crop_size))


@functools.lru_cache(maxsize=8)
def _optimizer_bytes_cached(optim_items: tuple) -> dict:
    """Optimizer-state bytes per parameter element, matrices (ndim >= 2) and the rest, after one step on a tiny
    network."""
    from pmf.method.model import build_model
    from pmf.train.optim import OptimConfig, build_optimizer

    cfg = OptimConfig(**dict(optim_items))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_model("pMF-tiny")
    for p in net.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt = build_optimizer(net, cfg)
    opt.step()
    mat = {"n": 0, "bytes": 0}
    vec = {"n": 0, "bytes": 0}
    for p in net.parameters():
        acc = mat if p.ndim >= 2 else vec
        acc["n"] += p.numel()
        acc["bytes"] += sum(v.numel() * v.element_size() for v in opt.state.get(p, {}).values()
                            if isinstance(v, torch.Tensor) and v.numel() > 1)
    return {"matrix": mat["bytes"] / max(mat["n"], 1), "other": vec["bytes"] / max(vec["n"], 1)}


def optimizer_bytes_per_param(optim_cfg) -> dict:
    from dataclasses import asdict

    return _optimizer_bytes_cached(tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                                for k, v in asdict(optim_cfg).items())))


# ----------------------------------------------------------------------------------------------------------------
# The plan


def _param_counts(kwargs: dict) -> dict:
    return _param_counts_cached(_freeze_dict(kwargs))


@functools.lru_cache(maxsize=32)
def _param_counts_cached(kw_items: tuple) -> dict:
    from pmf.method.model import Block, PMFDiT
    from pmf.train.fsdp import matrix_layers

    with torch.device("meta"):
        net = PMFDiT(**dict(kw_items))
    mat = sum(p.numel() for p in net.parameters() if p.ndim >= 2)
    other = sum(p.numel() for p in net.parameters() if p.ndim < 2)
    blocks = [m for m in net.modules() if isinstance(m, Block)]
    block = max(sum(p.numel() for p in m.parameters()) for m in blocks)
    block_matrix = max(sum(p.numel() for lin in matrix_layers(m) for p in lin.parameters()) for m in blocks)
    root = mat + other - sum(p.numel() for m in blocks for p in m.parameters())
    return {"matrix": mat, "other": other, "total": mat + other, "largest_block": block,
            "largest_block_matrix": block_matrix, "root": root}


def shard_degree(cfg, world: int) -> int:
    """Over how many devices each parameter is split: 1 (one process, ddp), the world (fsdp), the shard group (hsdp:
    ``train.hsdp_shard_size``, else LOCAL_WORLD_SIZE, else 8 GPUs per node, at most the world)."""
    if world <= 1 or cfg.train.parallel == "ddp":
        return 1
    if cfg.train.parallel == "hsdp":
        size = cfg.train.hsdp_shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or min(world, 8)
        return size if world % size == 0 else 1
    return world


def communicators(cfg, world: int) -> int:
    """NCCL communicators a process of this mode holds: none alone, one for ddp / fsdp, two for hsdp (shard group
    and replica group)."""
    if world <= 1:
        return 0
    return 2 if cfg.train.parallel == "hsdp" and 1 < shard_degree(cfg, world) < world else 1


def estimate_memory(cfg, kwargs: dict, world: int, micro: int, accum: int | None = None,
                    checkpointing: bool | None = None) -> dict:
    """Bytes per device of each term (module doc) for a per-device micro-batch ``micro`` with ``accum``
    micro-batches per step (default: the config's, when it is a number) and activation checkpointing on or off
    (default: the config's)."""
    n = _param_counts(kwargs)
    shard = shard_degree(cfg, world)
    bf16 = str(cfg.train.precision).lower() in ("bf16", "bfloat16")
    if accum is None:
        accum = cfg.train.accum_steps if isinstance(cfg.train.accum_steps, int) else 1
    if checkpointing is None:
        checkpointing = bool(getattr(cfg.train, "activation_checkpointing", False))
    opt = optimizer_bytes_per_param(cfg.optim)
    act = activation_bytes_per_sample(kwargs, cfg.objective, cfg.train.precision, checkpointing)
    perc = perceptual_memory(cfg.objective, cfg.perceptual, cfg.train.precision)
    activations = micro * (act + perc["per_sample"])
    if shard > 1:
        # two blocks gathered at a time (the running one, the prefetched one): linear weights in the compute dtype,
        # norms and gates in float32; the root unit gathered in float32 (pmf.train.fsdp)
        blk, blk_mat = n["largest_block"], n["largest_block_matrix"]
        gathered = 2 * ((2 if bf16 else 4) * blk_mat + 4 * (blk - blk_mat)) + 4 * n["root"]
        weights = 4 * n["total"] / shard + gathered
        # unsynced micro-batches: every rank accumulates full unsharded gradients until the last one
        grads = 4 * n["total"] / shard + (4 * n["total"] if accum > 1 else 2 * 4 * blk + 4 * n["root"])
    else:
        weights = 4 * n["total"] + (2 * n["matrix"] if bf16 else 0)  # + autocast's bf16 copies of the matrices
        grads = 4 * n["total"]
    return {
        "weights": weights,
        "gradients": grads,
        "optimizer_state": (opt["matrix"] * n["matrix"] + opt["other"] * n["other"]) / shard,
        "ema_copies": len(cfg.train.ema) * 4 * n["total"] / shard,
        "perceptual_networks": perc["weights"],
        "activations": activations,
        "runtime": CUDA_RUNTIME_BYTES + communicators(cfg, world) * COMMUNICATOR_BYTES + FRAGMENTATION * activations,
    }


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


MIN_MICRO_WITHOUT_CHECKPOINTING = 32  # auto: below this micro-batch, checkpointing's extra forward buys a larger one


def _fits(cfg, kwargs, world, micro, accum, ckpt, limit) -> bool:
    return sum(estimate_memory(cfg, kwargs, world, micro, accum, ckpt).values()) <= limit


def _largest_fitting(cfg, kwargs, world, per_device, ckpt, limit) -> int | None:
    for m in _divisors_desc(per_device):
        if _fits(cfg, kwargs, world, m, per_device // m, ckpt, limit):
            return m
    return None


def auto_settings(cfg, kwargs: dict, world: int, device_memory_gib: float) -> tuple[int, int, bool] | None:
    """(micro-batch per device, accumulation steps, activation checkpointing) for ``train.accum_steps: auto``: the
    largest micro-batch (a divisor of the per-device batch, so the global batch is kept) that fits without
    checkpointing; with checkpointing when that micro-batch is below :data:`MIN_MICRO_WITHOUT_CHECKPOINTING` (and
    below the per-device batch) and checkpointing fits one at least twice as large. None: nothing fits."""
    per_device = cfg.train.batch_size // world
    limit = device_memory_gib * GIB
    plain = _largest_fitting(cfg, kwargs, world, per_device, False, limit)
    if plain is not None and plain >= min(per_device, MIN_MICRO_WITHOUT_CHECKPOINTING):
        return plain, per_device // plain, False
    ckpt = _largest_fitting(cfg, kwargs, world, per_device, True, limit)
    if ckpt is not None and (plain is None or ckpt >= 2 * plain):
        return ckpt, per_device // ckpt, True
    return (plain, per_device // plain, False) if plain is not None else None


def device_plan(cfg, kwargs: dict, world: int, device_memory_gib: float, device_name: str = "") -> dict:
    """The plan of one device: the micro-batch, accumulation and checkpointing (the config's, or those
    :func:`auto_settings` picks for ``train.accum_steps: auto``), the estimated peak memory split into its terms
    (GiB), ``fits`` (estimate <= the device's memory), and the largest micro-batch that fits (a divisor of the
    per-device batch) with its accumulation steps."""
    G = cfg.train.batch_size
    per_device = G // world
    auto = cfg.train.accum_steps == "auto"
    ckpt = bool(getattr(cfg.train, "activation_checkpointing", False))
    chosen = auto_settings(cfg, kwargs, world, device_memory_gib) if auto else None
    if chosen is not None:
        micro, accum, ckpt = chosen
    else:
        accum = per_device if auto else cfg.train.accum_steps  # auto, nothing fits: the smallest micro-batch, 1
        micro = per_device // accum
    terms = estimate_memory(cfg, kwargs, world, micro, accum, ckpt)
    total = sum(terms.values())
    best = _largest_fitting(cfg, kwargs, world, per_device, ckpt, device_memory_gib * GIB)
    plan = {
        "devices": world, "device": device_name, "device_memory_gib": round(device_memory_gib, 2),
        "accum_steps_setting": cfg.train.accum_steps,
        "micro_batch_per_device": micro, "accum_steps": accum, "precision": cfg.train.precision,
        "activation_checkpointing": ckpt,
        "est_peak_gib_per_device": round(total / GIB, 2),
        "est_gib_per_device": {k: round(v / GIB, 3) for k, v in terms.items()},
        "fits": bool(total <= device_memory_gib * GIB),
        "largest_fitting_micro_batch": best,
        "accum_steps_for_largest": per_device // best if best else None,
    }
    if not plan["fits"]:
        plan["advice"] = knobs_advice(plan)
    return plan


def knobs_advice(plan: dict) -> str:
    """The knobs that lower the peak memory of a device, for an error message or the dry-run notes."""
    best = plan.get("largest_fitting_micro_batch")
    tips = []
    if best:
        tips.append(f"--set train.accum_steps={plan['accum_steps_for_largest']} (micro-batch {best} per device)")
    else:
        tips.append("a smaller micro-batch (--set train.accum_steps=N), even 1 image does not fit")
    if not plan.get("activation_checkpointing"):
        tips.append("--set train.activation_checkpointing=true (recomputes each block in the backward)")
    if plan.get("precision") in ("fp32", "float32"):
        tips.append("--set train.precision=bf16 (autocast; weights, gradients, optimizer stay fp32)")
    tips.append("--set train.parallel=fsdp (shards weights, gradients, optimizer state and EMAs over all devices; "
                "hsdp: over the devices of a node)")
    return "; ".join(tips)


def format_plan(plan: dict) -> str:
    """One line for an error message: micro-batch, accumulation, the estimate and its terms."""
    terms = ", ".join(f"{k} {v:.2f}" for k, v in plan["est_gib_per_device"].items())
    ckpt = ", activation checkpointing" if plan.get("activation_checkpointing") else ""
    return (f"plan for {plan['devices']} device(s) of {plan['device_memory_gib']} GiB: micro-batch "
            f"{plan['micro_batch_per_device']} x {plan['accum_steps']} accumulation steps{ckpt}, est. peak "
            f"{plan['est_peak_gib_per_device']} GiB per device ({terms} GiB)")


class DoesNotFit(PmfError, ValueError):
    """The run cannot fit the devices at hand (refused before any data or model set-up)."""


def device_memory(device, plan_device_memory: float | None = None) -> tuple[float, str]:
    """(GiB, name) of the memory of one device of this run: ``plan_device_memory`` when given, the local GPU's on
    CUDA, else this host's RAM."""
    device = torch.device(device)
    if plan_device_memory:
        return float(plan_device_memory), "planned"
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device.index or 0)
        return props.total_memory / GIB, props.name
    return host_memory_gib(), "host RAM (CPU run)"


def fit_to_devices(cfg, kwargs: dict, world: int, device, plan_device_memory: float | None = None,
                   refuse: bool = True):
    """(config, plan or None) of a run on ``world`` devices like ``device``: ``train.accum_steps: auto`` replaced by
    the micro-batch, accumulation and checkpointing :func:`auto_settings` picks (a copy of ``cfg``; one line says
    what was chosen). With ``refuse``, a run whose plan does not fit is refused here (:class:`DoesNotFit`, one line
    with the plan's numbers and the knobs): ``auto`` runs always, fixed settings on CUDA devices (a CPU run's
    'device' is the host, whose memory the plan does not bound)."""
    auto = cfg.train.accum_steps == "auto"
    if not auto and (not refuse or torch.device(device).type != "cuda"):
        return cfg, None
    mem, name = device_memory(device, plan_device_memory)
    p = device_plan(cfg, kwargs, world, mem, name)
    if refuse and not p["fits"]:
        raise DoesNotFit(f"{cfg.model.name} does not fit: {format_plan(p)}. Knobs: {knobs_advice(p)}")
    if auto:
        cfg = replace(cfg, train=replace(cfg.train, accum_steps=p["accum_steps"],
                                         activation_checkpointing=p["activation_checkpointing"]))
        if refuse and int(os.environ.get("RANK", "0")) == 0:  # a dry run reports it in its JSON instead
            print(f"train.accum_steps=auto: micro-batch {p['micro_batch_per_device']} x {p['accum_steps']} "
                  f"accumulation steps per device, activation checkpointing "
                  f"{'on' if p['activation_checkpointing'] else 'off'} ({format_plan(p)})", flush=True)
    return cfg, p


class PlannedOutOfMemoryError(RuntimeError):
    """A device ran out of memory; the message carries the plan's numbers and the knobs to turn."""


def out_of_memory_error(err: BaseException, cfg, kwargs: dict, world: int, device) -> PlannedOutOfMemoryError:
    """The error to raise (``from err``) when a training step runs out of device memory: what was allocated, the
    plan's estimate for this device, and the knobs (micro-batch, activation checkpointing, precision, FSDP)."""
    device = torch.device(device)
    used = ""
    if device.type == "cuda":
        mem = torch.cuda.get_device_properties(device).total_memory / GIB
        used = (f" ({torch.cuda.max_memory_allocated(device) / GIB:.1f} GiB peak allocated of {mem:.1f} GiB, "
                f"{torch.cuda.memory_reserved(device) / GIB:.1f} GiB reserved)")
    else:
        mem = host_memory_gib()
    try:
        p = device_plan(cfg, kwargs, world, mem, str(device))
        detail = f"{format_plan(p)}. Knobs: {knobs_advice(p)}"
    except Exception as plan_err:  # noqa: BLE001  (the plan must never hide the original error)
        detail = f"(no plan: {type(plan_err).__name__}: {plan_err})"
    first = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
    return PlannedOutOfMemoryError(f"out of memory on {device}{used}: {first}\n{detail}\n"
                                   f"Check a configuration before launching: pmf train ... --dry-run")


def local_devices() -> tuple[int, float, str]:
    """(count, memory GiB of device 0, name) of the visible CUDA devices, or (0, 0, "") without CUDA."""
    if not torch.cuda.is_available():
        return 0, 0.0, ""
    props = torch.cuda.get_device_properties(0)
    return torch.cuda.device_count(), props.total_memory / GIB, props.name


def host_memory_gib() -> float:
    """Physical memory of this machine (the 'device' of a CPU run)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        return math.nan
