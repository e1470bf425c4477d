"""Device plan: will a run's micro-batch fit, and where does the memory of one device go?

``pmf train ... --dry-run`` calls :func:`device_plan`. The estimate of the peak memory of one device is a sum of

- **weights, gradients**: the training network's parameters (v-head included) in float32 (autocast never changes
  them; under bf16 autocast the weights also have a bf16 copy); under ``train.parallel=fsdp`` a 1/world shard each
  (``hsdp``: 1/shard-group size, :func:`shard_degree`), plus the largest block gathered in full (in bfloat16 under
  ``train.precision=bf16``: the FSDP mixed-precision policy gathers bf16 weights, so no autocast copy is kept);
- **optimizer state**: bytes per parameter *measured* by building ``train.optim``'s optimizer on a tiny model and
  taking one step (Muon keeps one buffer per matrix, Adam two per tensor; whatever the optimizer is, it is counted);
- **EMA copies**: ``len(train.ema)`` float32 copies of the parameters (sharded under FSDP);
- **perceptual networks**: the frozen LPIPS-VGG16 / ConvNeXt-V2 weights, when ``objective.perceptual_weights`` uses
  them;
- **activations**: the bytes autograd keeps from the forward pass to the backward pass, *measured* with
  :func:`torch.autograd.graph.saved_tensors_hooks` on the real ``pmf_loss`` of small instances of the network (full
  width, heads, patch size, objective and precision; a few blocks, a few patches), then scaled to the run's tokens
  and depth with a model that is linear in both (:func:`activation_model`); the perceptual backbones' activations are
  measured the same way on a small crop and scaled by pixel count. With ``train.activation_checkpointing`` a block
  keeps only its input, and the backward recomputes one block at a time;
- **workspace**: one block's activations as the transient working set of the backward, 10 % of the activations for
  allocator fragmentation, and 1 GiB for the CUDA context.

Every block's saved tensors are O(tokens x width) here (the fused attention keeps q, k, v, O and a logsumexp, no
tokens^2 matrix), which is what makes the extrapolation in tokens exact up to the constant prefix; the test
``tests/test_plan.py`` checks the extrapolated estimate against the measured bytes of a bigger model (25 %).
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from dataclasses import replace

import torch

GIB = 1024**3
CUDA_CONTEXT_BYTES = 1 * GIB  # CUDA context + cuBLAS / cuDNN workspaces, per process
FRAGMENTATION = 0.10  # caching-allocator slack on top of the activations


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
    from pmf.objective import pmf_loss
    from pmf.train.speed import autocast_context

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


MEASURE_BATCH = 4  # rows per measurement: the r = t / r != t split and dropout follow the objective's proportions


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


@functools.lru_cache(maxsize=32)
def _activation_model_cached(kw_items: tuple, obj_items: tuple, precision: str) -> dict:
    from pmf.model import PMFDiT
    from pmf.objective import ObjectiveConfig

    kwargs, obj_cfg = dict(kw_items), ObjectiveConfig(**dict(obj_items))
    obj_cfg = replace(obj_cfg, perceptual_weights={})  # the backbones are measured separately
    # (trunk blocks, head blocks, patch grid side): enough points to solve the four coefficients below
    points = [(1, 1, 2), (2, 1, 2), (1, 2, 2), (1, 1, 4)]
    measured = []
    with _cpu_measurement():
        for n_t, n_h, g in points:
            net = _cheap_instance(PMFDiT, **_proxy_kwargs(kwargs, n_t, n_h, g))
            measured.append(loss_saved_bytes(net, obj_cfg, MEASURE_BATCH, precision) / MEASURE_BATCH)
            del net
    n_prefix = _prefix_tokens(kwargs)
    L = [n_prefix + g * g for _, _, g in points]
    m1, m2, m3, m4 = measured
    a_trunk = (m2 - m1) / L[0]  # bytes per token per trunk block
    a_head = (m3 - m1) / L[0]  # per token per head depth step (u-head + v-head block)
    c_patch = (m4 - m1 - (L[3] - L[0]) * (a_trunk + a_head)) / (points[3][2] ** 2 - points[0][2] ** 2)
    c0 = m1 - L[0] * (a_trunk + a_head) - points[0][2] ** 2 * c_patch
    return {"per_token_trunk_block": a_trunk, "per_token_head_block": a_head, "per_patch": c_patch,
            "per_sample": c0}


def _cheap_instance(cls, *args, **kwargs):
    """``cls(*args, **kwargs)`` built on the meta device and materialised on the CPU uninitialised: what autograd
    saves depends on shapes, not values, and initialising (even filling) a full-width layer costs seconds on a
    loaded CPU. Only for measuring sizes: the values are arbitrary."""
    with torch.device("meta"):
        module = cls(*args, **kwargs)
    return module.to_empty(device="cpu")


def _prefix_tokens(kwargs: dict) -> int:
    return sum(kwargs.get(k, d) for k, d in (("num_class_tokens", 8), ("num_cfg_tokens", 4),
                                             ("num_interval_tokens", 4), ("num_time_tokens", 4)))


def _freeze_dict(d: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else
                         tuple(sorted(v.items())) if isinstance(v, dict) else v) for k, v in d.items()))


def activation_model(kwargs: dict, obj_cfg, precision: str = "fp32") -> dict:
    """Coefficients of saved bytes per sample = L (n_trunk a_trunk + n_head a_head) + n_patch c_patch + c0, measured
    on four small instances of the network (full width; 1-2 trunk blocks, 1-2 head blocks, 2x2 or 4x4 patches).
    L = prefix + patch tokens; n_head counts one u-head block plus its v-head twin. Cached per configuration."""
    from dataclasses import asdict

    obj = {k: v for k, v in asdict(obj_cfg).items()}
    return _activation_model_cached(_freeze_dict(kwargs), tuple(sorted(
        (k, tuple(v) if isinstance(v, list) else v) for k, v in obj.items() if not isinstance(v, dict))),
        str(precision))


def activation_bytes_per_sample(kwargs: dict, obj_cfg, precision: str = "fp32", checkpointing: bool = False) -> dict:
    """{"saved": bytes kept per sample until the backward, "transient": the largest per-sample working set the
    backward adds on top (one block's activations)} for the network ``kwargs`` and objective ``obj_cfg``."""
    m = activation_model(kwargs, obj_cfg, precision)
    g = kwargs.get("input_size", 256) // kwargs.get("patch_size", 16)
    n_patch = g * g
    L = _prefix_tokens(kwargs) + n_patch
    n_head = kwargs.get("aux_head_depth", 8)
    n_trunk = kwargs.get("depth", 16) - n_head
    per_trunk, per_head = L * m["per_token_trunk_block"], L * m["per_token_head_block"]
    outside = n_patch * m["per_patch"] + m["per_sample"]
    if not checkpointing:
        return {"saved": n_trunk * per_trunk + n_head * per_head + outside, "transient": max(per_trunk, per_head)}
    # A checkpointed block keeps its input (B, L, D) in float32 (the residual stream; the JVP's tangents carry no
    # autograd history and are not kept); the backward recomputes one block at a time.
    D = kwargs.get("hidden_size", 768)
    kept = L * D * 4 * (n_trunk + 2 * n_head)
    return {"saved": kept + outside, "transient": max(per_trunk, per_head)}


@functools.lru_cache(maxsize=8)
def _perceptual_model_cached(terms: tuple, precision: str, crop: int) -> dict:
    from pmf.perceptual import LPIPS, ConvNeXtV2, PerceptualLoss
    from pmf.train.speed import autocast_context

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
    from pmf.model import build_model
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
    from pmf.model import Block, PMFDiT

    with torch.device("meta"):
        net = PMFDiT(**dict(kw_items))
    mat = sum(p.numel() for p in net.parameters() if p.ndim >= 2)
    other = sum(p.numel() for p in net.parameters() if p.ndim < 2)
    block = max(sum(p.numel() for p in m.parameters()) for m in net.modules() if isinstance(m, Block))
    return {"matrix": mat, "other": other, "total": mat + other, "largest_block": block}


def shard_degree(cfg, world: int) -> int:
    """Over how many devices each parameter is split: 1 (one process, ddp), the world (fsdp), the shard group (hsdp:
    ``train.hsdp_shard_size``, else LOCAL_WORLD_SIZE, else 8 GPUs per node, at most the world)."""
    import os

    if world <= 1 or cfg.train.parallel == "ddp":
        return 1
    if cfg.train.parallel == "hsdp":
        size = cfg.train.hsdp_shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or min(world, 8)
        return size if world % size == 0 else 1
    return world


def estimate_memory(cfg, kwargs: dict, world: int, micro: int) -> dict:
    """Bytes per device of each term (see the module docstring) for a per-device micro-batch ``micro``."""
    n = _param_counts(kwargs)
    shard = shard_degree(cfg, world)
    bf16 = str(cfg.train.precision).lower() in ("bf16", "bfloat16")
    # One block's weights (bf16 when gathered under the bf16 policy) and fp32 gradients, unsharded.
    gathered = (2 if bf16 else 4) * n["largest_block"] + 4 * n["largest_block"] if shard > 1 else 0
    opt = optimizer_bytes_per_param(cfg.optim)
    act = activation_bytes_per_sample(kwargs, cfg.objective, cfg.train.precision,
                                      getattr(cfg.train, "activation_checkpointing", False))
    perc = perceptual_memory(cfg.objective, cfg.perceptual, cfg.train.precision)
    activations = micro * (act["saved"] + perc["per_sample"])
    # Under bf16 autocast the weights' bf16 copies (autocast's cast cache) live through forward and backward.
    # Sharded: the gathered weights are already bf16, nothing is cast.
    casts = 2 * n["total"] if bf16 and shard == 1 else 0
    gathered_w = (2 if bf16 else 4) * n["largest_block"] if shard > 1 else 0
    terms = {
        "weights": 4 * n["total"] / shard + gathered_w + casts,
        "gradients": 4 * n["total"] / shard + gathered - gathered_w,
        "optimizer_state": (opt["matrix"] * n["matrix"] + opt["other"] * n["other"]) / shard,
        "ema_copies": len(cfg.train.ema) * 4 * n["total"] / shard,
        "perceptual_networks": perc["weights"],
        "activations": activations,
        "workspace": micro * act["transient"] + FRAGMENTATION * activations + CUDA_CONTEXT_BYTES,
    }
    return terms


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def device_plan(cfg, kwargs: dict, world: int, device_memory_gib: float, device_name: str = "") -> dict:
    """The plan of one device: the configured micro-batch and accumulation, the estimated peak memory split into its
    terms (GiB), ``fits`` (estimate <= the device's memory), and the largest micro-batch that fits (a divisor of the
    per-device batch) with its accumulation steps."""
    G, accum = cfg.train.batch_size, cfg.train.accum_steps
    per_device = G // world
    micro = per_device // accum
    terms = estimate_memory(cfg, kwargs, world, micro)
    total = sum(terms.values())
    fits = total <= device_memory_gib * GIB
    best = None
    for m in _divisors_desc(per_device):
        if sum(estimate_memory(cfg, kwargs, world, m).values()) <= device_memory_gib * GIB:
            best = m
            break
    plan = {
        "devices": world, "device": device_name, "device_memory_gib": round(device_memory_gib, 2),
        "micro_batch_per_device": micro, "accum_steps": accum, "precision": cfg.train.precision,
        "activation_checkpointing": bool(getattr(cfg.train, "activation_checkpointing", False)),
        "est_peak_gib_per_device": round(total / GIB, 2),
        "est_gib_per_device": {k: round(v / GIB, 3) for k, v in terms.items()},
        "fits": bool(fits),
        "largest_fitting_micro_batch": best,
        "accum_steps_for_largest": per_device // best if best else None,
    }
    if not fits:
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
    return (f"plan for {plan['devices']} device(s) of {plan['device_memory_gib']} GiB: micro-batch "
            f"{plan['micro_batch_per_device']} x {plan['accum_steps']} accumulation steps, est. peak "
            f"{plan['est_peak_gib_per_device']} GiB per device ({terms} GiB)")


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
