"""First run on a GPU: one unattended script that says whether pMF training and sampling work, and how fast.

    python benchmarks/gpu_check.py [--deadline-min 8] [--json results.jsonl]     # on one GPU (H100 / H200)
    python benchmarks/gpu_check.py --smoke                                      # tiny versions, CPU, < 2 min

Every section is guarded (an exception is a FAIL line, the next section runs) and timed, and the whole run stops
starting sections once its internal deadline is near (default 8 minutes: sections left out are SKIP lines). Each
result is one JSON line on stdout: {"section", "name", "status": PASS | FAIL | SKIP | INFO, ...numbers}; a summary
line (PASS / FAIL counts) ends the run, and the exit code is 1 if anything failed.

Sections (in this order):
  env          torch, CUDA, cuDNN, NCCL, GPU, TF32 flags, SDPA backends
  fsdp         first: a one-rank NCCL (gloo on CPU) all-reduce, the lean objective on an FSDP2-sharded model under
               bf16, two train_steps, a DCP save / load round trip of the sharded training state
  attn_jvp     pmf.method.attention's JVP per SDPA backend (flash, efficient, cudnn, math) in fp32, TF32 and bf16
  against
               float64 (relative error of O and of dO; the centred tangent dO = (P * (dS - rowsum(P dS))) V + P dV)
  train_step   pmf.train.loop.train_step as the presets train (lean, per-sample host generators, bf16, TF32,
               activation checkpointing), pMF-B/16 micro-batches 32 / 64 / 128: eager, compiled
               (train.compile=true) and compiled with CUDA graphs (train.compile_mode=reduce-overhead); time, MFU
               from a FLOP count of the real step, peak memory against the plan; an OOM is one line
  step         pMF (lean default objective) vs flow matching: step time and peak memory, pMF-B/16 at 256 px,
               fp32 / TF32 / bf16, micro-batches 32 and 64; the pMF / FM time ratio
  max_micro    the largest micro-batch of pMF-B/16 (bf16) that fits, found by doubling, against the plan's
  train        300 steps of the real pmf.train.loop.train_step (Muon, EMA-free) on synthetic class-structured images:
               the loss goes down
  sample       1-NFE sampling images/s of pMF-B/16: fp32, bf16, compiled (pmf.train.speed.InferenceNet)
  data         ImageFolder loader images/s at 256 and 512 px (synthetic JPEGs, 8 workers)
  h16          one pMF-H/16 training step at micro-batch 4 (bf16): time and peak memory

Every section runs under a watchdog (an alarm per section and faulthandler stack dumps): a hang is a FAIL line.
The smoke mode runs each section with a tiny model on the CPU (checks the script, not the numbers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from pmf.method.attention import attention, math_attention
from pmf.method.model import build_model
from pmf.method.objective import ObjectiveConfig, conditional_velocity, noisy_image, pmf_loss
from pmf.method.rng import PerSampleGenerator
from pmf.method.sampler import noise_from_seeds, sample
from pmf.train.speed import InferenceNet
from pmf.train.precision import autocast_context, set_tf32


class Check:
    """Result printer, deadline and counters."""

    def __init__(self, deadline_s: float, json_path: str | None):
        self.t0, self.deadline_s = time.time(), deadline_s
        self.counts = {"PASS": 0, "FAIL": 0, "SKIP": 0, "INFO": 0}
        self.file = open(json_path, "a") if json_path else None

    def left(self) -> float:
        return self.deadline_s - (time.time() - self.t0)

    def emit(self, section: str, name: str, status: str, **numbers):
        self.counts[status] += 1
        rec = {"section": section, "name": name, "status": status,
               **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in numbers.items()}}
        line = json.dumps(rec)
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, iters: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``iters`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


@contextlib.contextmanager
def peak_memory(device, out: dict):
    """out["peak_gib"]: peak CUDA memory allocated inside the block above what was allocated before (CUDA only)."""
    if device.type != "cuda":
        yield
        return
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    yield
    sync(device)
    out["peak_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30


def perturbed(name: str, device, **kw):
    torch.manual_seed(0)
    net = build_model(name, **kw)
    with torch.no_grad():  # zero-init gates / final layers would make the heads output 0
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net.to(device)


def fm_loss(net, x, y, gen):
    """Flow matching with both heads at r = t (the baseline a pMF step is compared with)."""
    t = torch.sigmoid(torch.randn(x.shape[0], generator=gen, device=x.device) * 0.8 + 0.8)
    z = noisy_image(x, t, torch.randn(x.shape, generator=gen, device=x.device))
    v_t = conditional_velocity(z, x, t)
    zero, one = torch.zeros_like(t), torch.ones_like(t)
    u, v = net(z, t, zero, one, zero, one, y)
    return (u - v_t).pow(2).flatten(1).sum(1).mean() + (v - v_t).pow(2).flatten(1).sum(1).mean()


def batch_for(net, n, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, net.in_channels, net.input_size, net.input_size, generator=g) * 2 - 1
    return x.to(device), torch.randint(0, net.num_classes, (n,), generator=g).to(device)


# ----------------------------------------------------------------------------------------------------------------
# Sections


def sec_env(ck: Check, dev, smoke):
    info = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "device": str(dev)}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                    gpus=torch.cuda.device_count(),
                    nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None,
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32,
                    sdpa_flash=torch.backends.cuda.flash_sdp_enabled(),
                    sdpa_mem_efficient=torch.backends.cuda.mem_efficient_sdp_enabled(),
                    sdpa_cudnn=torch.backends.cuda.cudnn_sdp_enabled(), sdpa_math=torch.backends.cuda.math_sdp_enabled())
    ck.emit("env", "environment", "INFO", **info)


def _attn_jvp(q, k, v, dq, dk, dv):
    return torch.func.jvp(lambda a, b, c: attention(a, b, c, "jvp_sdpa"), (q, k, v), (dq, dk, dv))


def sec_attn_jvp(ck: Check, dev, smoke):
    B, H, L, d = (1, 2, 16, 16) if smoke else (2, 12, 276, 64)
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(B, H, L, d, generator=g, dtype=torch.float64) for _ in range(6)]
    o64, do64 = torch.func.jvp(math_attention, tuple(args[:3]), tuple(args[3:]))  # the float64 truth (CPU)
    backends = [None]
    if dev.type == "cuda":
        from torch.nn.attention import SDPBackend
        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH]
    limits = {"fp32": 1e-4, "tf32": 2e-2, "bf16": 5e-2}  # relative L2 error of O and dO
    for be in backends:
        for mode in ("fp32", "tf32", "bf16"):
            name = f"{getattr(be, 'name', 'default').lower()}/{mode}"
            try:
                set_tf32(dev, mode == "tf32")
                ctx = contextlib.nullcontext()
                if be is not None:
                    from torch.nn.attention import sdpa_kernel
                    ctx = sdpa_kernel([be])
                dt = torch.bfloat16 if mode == "bf16" else torch.float32
                with ctx:
                    o, do = _attn_jvp(*(a.to(dev, dt) for a in args))
                e_o = ((o.double().cpu() - o64).norm() / o64.norm()).item()
                e_do = ((do.double().cpu() - do64).norm() / do64.norm()).item()
                ok = e_o < limits[mode] and e_do < limits[mode]
                ck.emit("attn_jvp", name, "PASS" if ok else "FAIL", rel_err_O=e_o, rel_err_dO=e_do,
                        limit=limits[mode])
            except Exception as e:  # noqa: BLE001  (a backend may not support this dtype / shape / GPU)
                ck.emit("attn_jvp", name, "SKIP", reason=f"{type(e).__name__}: {str(e)[:160]}")
    set_tf32(dev, True)


def _step_fns(net, x, y, dev, precision):
    cfg = ObjectiveConfig()

    def pmf_step():  # per-sample host generators, as train_step draws (the lean row plan; a CUDA generator would not)
        with autocast_context(dev.type, precision):
            loss, _ = pmf_loss(net, x, y, cfg, PerSampleGenerator(range(3, 3 + x.shape[0])))
        loss.backward()
        net.zero_grad(set_to_none=True)

    def fm_step():
        with autocast_context(dev.type, precision):
            loss = fm_loss(net, x, y, torch.Generator(dev).manual_seed(3))
        loss.backward()
        net.zero_grad(set_to_none=True)

    return pmf_step, fm_step


def sec_step(ck: Check, dev, smoke):
    model, micros, iters = ("pMF-tiny", (4,), 2) if smoke else ("pMF-B/16", (32, 64), 5)
    net = perturbed(model, dev)
    for micro in micros:
        x, y = batch_for(net, micro, dev)
        for mode in ("fp32", "tf32", "bf16"):
            set_tf32(dev, mode == "tf32")
            pmf_step, fm_step = _step_fns(net, x, y, dev, "bf16" if mode == "bf16" else None)
            mem_p, mem_f = {}, {}
            with peak_memory(dev, mem_p):
                t_p = timed(pmf_step, dev, iters)
            with peak_memory(dev, mem_f):
                t_f = timed(fm_step, dev, iters)
            ratio = t_p / t_f  # a gate on the GPU (pMF's JVP should cost < 2.5 FM steps); tiny smoke models: info
            status = "INFO" if smoke else ("PASS" if ratio <= 2.5 else "FAIL")
            ck.emit("step", f"{model} micro {micro} {mode}", status, pmf_s=t_p, fm_s=t_f,
                    ratio=ratio, img_per_s=micro / t_p, pmf_peak_gib=mem_p.get("peak_gib"),
                    fm_peak_gib=mem_f.get("peak_gib"))
    set_tf32(dev, True)


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense bf16 tensor-core peaks


def _peak_flops(dev) -> float | None:
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_properties(dev).name
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def sec_train_step(ck: Check, dev, smoke):
    """pmf.train.loop.train_step itself, as the presets train (lean objective, per-sample host generators, bf16,
    TF32 on, activation checkpointing), per micro-batch and path (eager, compiled: train.compile=true, compiled with
    CUDA graphs: train.compile_mode=reduce-overhead): time, images/s, MFU from a FLOP count of the real step
    (torch.utils.flop_counter over one step), peak memory against the plan's estimate; an OOM is one line per
    (micro-batch, path) and the next one runs."""
    from torch.utils.flop_counter import FlopCounterMode

    from pmf.train import plan
    from pmf.train.config import load_config
    from pmf.train.config import model_kwargs
    from pmf.train.loop import train_step
    from pmf.train.memtrack import tracking
    from pmf.train.optim import build_optimizer
    from pmf.method.objective_lean import row_buckets
    from pmf.train.speed import compile_step

    model, micros, iters = ("pMF-tiny", (4,), 2) if smoke else ("pMF-B/16", (32, 64, 128), 4)
    paths = [("eager", False, "default")] + ([] if smoke else [("compiled", True, "default")])
    if smoke:  # compiling even pMF-tiny's step takes minutes on a shared CPU; the GPU run times both paths
        ck.emit("train_step", "compiled (smoke)", "SKIP", reason="compile skipped in --smoke (minutes on a CPU)")
    if dev.type == "cuda":
        paths.append(("compiled+cudagraphs", True, "reduce-overhead"))
    set_tf32(dev, True)
    for micro in micros:
        for path, compiled, mode in paths:
            if ck.left() < (20 if smoke else 45):
                ck.emit("train_step", f"{model} micro {micro} {path}", "SKIP", reason="deadline")
                continue
            cfg = load_config("pmf-b16-in256", overrides=[
                f"model.name={model}", f"train.batch_size={micro}", "train.accum_steps=1", "train.precision=bf16",
                "train.activation_checkpointing=true", f"train.compile={str(compiled).lower()}",
                "objective.perceptual_weights={}", "data.class_conditional=true"])
            cfg.train.compile_mode = mode
            kw = model_kwargs(cfg)
            try:
                torch.manual_seed(0)
                net = build_model(model).to(dev)
                net.activation_checkpointing = True
                opt = build_optimizer(net, cfg.optim)
                imgs = torch.randint(0, 256, (micro, net.in_channels, net.input_size, net.input_size),
                                     dtype=torch.uint8)
                labels = torch.arange(micro) % net.num_classes
                loss_fn = compile_step(pmf_loss, compiled, mode, recompile_limit=row_buckets(micro))  # as the loop does

                def step(i=[0]):
                    i[0] += 1
                    return train_step(net, opt, imgs, labels, cfg, i[0] * micro, dev, loss_fn=loss_fn)

                t0 = time.time()
                step()  # compiles, allocates the optimizer state
                first_s = time.time() - t0
                with FlopCounterMode(display=False) as flops:
                    step()
                mem = {}
                with peak_memory(dev, mem):
                    s = timed(step, dev, iters, warmup=0)
                if dev.type == "cpu":  # the peak of one step, measured by storage lifetimes (pmf.train.memtrack)
                    with tracking(cuda_dtypes=False) as tr:  # the dtypes this CPU step really has
                        step()
                    mem["peak_gib"] = tr.peak / 2**30
                terms = plan.estimate_memory(cfg, kw, 1, micro, 1, True)
                planned = sum(terms[k] for k in ("gradients", "activations")) / 2**30  # the step's own allocations
                peak = _peak_flops(dev)
                mfu = flops.get_total_flops() / s / peak if peak else None
                ck.emit("train_step", f"{model} micro {micro} {path}", "PASS", s_per_step=s, img_per_s=micro / s,
                        first_step_s=first_s, tflop_per_step=flops.get_total_flops() / 1e12, mfu=mfu,
                        peak_gib=mem.get("peak_gib"), plan_step_gib=planned,
                        plan_over_measured=planned / mem["peak_gib"] if mem.get("peak_gib") else None)
            except torch.OutOfMemoryError as e:
                ck.emit("train_step", f"{model} micro {micro} {path}", "INFO", oom=str(e).splitlines()[0][:200])
            finally:
                if dev.type == "cuda":
                    torch.cuda.empty_cache()


def sec_max_micro(ck: Check, dev, smoke):
    from pmf.train import plan
    from pmf.train.config import load_config
    from pmf.train.config import model_kwargs

    cfg = load_config("pmf-b16-in256", overrides=["train.precision=bf16", "train.accum_steps=1"])
    mem = torch.cuda.get_device_properties(dev).total_memory / 2**30 if dev.type == "cuda" else 80.0
    planned = plan.device_plan(cfg, model_kwargs(cfg), 8, mem)["largest_fitting_micro_batch"]
    if smoke:
        net = perturbed("pMF-tiny", dev)
        pmf_step, _ = _step_fns(net, *batch_for(net, 4, dev), dev, "bf16")
        pmf_step()
        ck.emit("max_micro", "plan only (smoke)", "INFO", planned=planned)
        return
    net = perturbed("pMF-B/16", dev)
    best, micro, peaks = 0, 16, {}
    while micro <= 512 and ck.left() > 60:
        try:
            pmf_step, _ = _step_fns(net, *batch_for(net, micro, dev), dev, "bf16")
            out = {}
            with peak_memory(dev, out):
                pmf_step()
            best, peaks[micro] = micro, round(out.get("peak_gib", 0.0), 2)
            micro *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    ck.emit("max_micro", "pMF-B/16 bf16", "PASS" if best >= 16 else "FAIL", largest_found=best,
            peak_gib_by_micro=peaks, planned_largest=planned,
            plan_vs_found="plan within 2x" if best and planned and 0.5 <= planned / best <= 2 else "check the plan")


def sec_train(ck: Check, dev, smoke):
    from pmf.train.config import load_config
    from pmf.train.loop import train_step
    from pmf.train.optim import build_optimizer

    steps, model, batch = (60, "pMF-tiny", 16) if smoke else (300, "pMF-S/4-32", 64)
    cfg = load_config("tiny-test", overrides=[f"model.name={model}", f"train.batch_size={batch}",
                                               f"train.precision={'fp32' if smoke else 'bf16'}"])
    torch.manual_seed(0)
    net = build_model(model).to(dev)
    opt = build_optimizer(net, cfg.optim)
    C, S, K = net.in_channels, net.input_size, net.num_classes
    protos = torch.rand(K, C, S, S, generator=torch.Generator().manual_seed(0))  # one smooth pattern per class
    protos = torch.nn.functional.avg_pool2d(protos, 3, 1, 1)
    losses, t = [], time.time()
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        y = torch.randint(0, K, (batch,), generator=g)
        imgs = ((protos[y] + 0.05 * torch.randn(batch, C, S, S, generator=g)).clamp(0, 1) * 255).to(torch.uint8)
        res = train_step(net, opt, imgs, y, cfg, step * batch, dev)
        losses.append(res.metrics["loss_u"])
        if ck.left() < 30:
            break
    n = max(1, len(losses) // 10)
    first, last = sum(losses[:n]) / n, sum(losses[-n:]) / n
    ck.emit("train", f"{model} {len(losses)} steps", "PASS" if last < 0.8 * first else "FAIL", loss_u_first=first,
            loss_u_last=last, s_per_step=(time.time() - t) / len(losses))


def sec_sample(ck: Check, dev, smoke):
    model, n, iters = ("pMF-tiny", 8, 2) if smoke else ("pMF-B/16", 128, 5)
    net = perturbed(model, dev, v_head=False).eval()
    noise = noise_from_seeds(range(n), (net.in_channels, net.input_size, net.input_size), 1.0, dev)
    y = torch.arange(n, device=dev) % net.num_classes
    ref = None
    for name, precision, comp in (("fp32", None, False), ("bf16", "bf16", False), ("bf16 compiled", "bf16", True)):
        if smoke and comp:
            ck.emit("sample", name, "SKIP", reason="compile skipped in --smoke (minutes on a CPU)")
            continue
        inet = InferenceNet(net, precision, compile=comp)
        with torch.inference_mode():
            s = timed(lambda: sample(inet, noise, y), dev, iters)
            x = sample(inet, noise, y).float()
        diff = None if ref is None else ((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
        ref = x if ref is None else ref
        ck.emit("sample", name, "PASS" if torch.isfinite(x).all() else "FAIL", img_per_s=n / s,
                rel_rms_vs_fp32=diff)


def sec_data(ck: Check, dev, smoke):
    from PIL import Image

    from pmf.data.datasets import ImageFolderDataset, ShardedLoader

    n, workers = (16, 0) if smoke else (512, 8)
    with tempfile.TemporaryDirectory() as root:
        rng = torch.Generator().manual_seed(0)
        for i in range(n):
            os.makedirs(f"{root}/c{i % 4}", exist_ok=True)
            arr = (torch.rand(3, 60, 80, generator=rng) * 255).to(torch.uint8)
            big = torch.nn.functional.interpolate(arr[None].float(), size=(375 * 2 if not smoke else 96,
                                                  500 * 2 if not smoke else 128), mode="bilinear")[0]
            Image.fromarray(big.clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(f"{root}/c{i % 4}/{i}.jpg",
                                                                                    quality=90)
        for res in ((64,) if smoke else (256, 512)):
            ds = ImageFolderDataset(root, res)
            loader = ShardedLoader(ds, 16 if smoke else 128, seed=0, num_workers=workers,
                                   pin_memory=dev.type == "cuda")
            it = iter(loader)
            next(it)  # workers started
            t, seen = time.time(), 0
            for _ in range(3 if smoke else 8):
                imgs, _ = next(it)
                seen += imgs.shape[0]
            ck.emit("data", f"imagefolder {res} px, {workers} workers", "PASS", img_per_s=seen / (time.time() - t))


def sec_h16(ck: Check, dev, smoke):
    model, micro = ("pMF-tiny", 2) if smoke else ("pMF-H/16", 4)
    net = perturbed(model, dev)
    pmf_step, _ = _step_fns(net, *batch_for(net, micro, dev), dev, "bf16")
    out = {}
    with peak_memory(dev, out):
        s = timed(pmf_step, dev, 1 if smoke else 3)
    ck.emit("h16", f"{model} micro {micro} bf16", "PASS", s_per_step=s, peak_gib=out.get("peak_gib"))


def sec_fsdp(ck: Check, dev, smoke):
    """First after env: a one-rank NCCL (gloo on CPU) process group, then the lean objective on an FSDP2-sharded
    model under bf16 (linear layers gathered in bf16, the rest float32: pmf.train.fsdp), two train_steps, and a
    torch.distributed.checkpoint save / load round trip of its training state."""
    import torch.distributed as tdist

    from pmf.train import fsdp, modes
    from pmf.train.checkpoint import open_latest
    from pmf.train.config import load_config
    from pmf.train.loop import train_step
    from pmf.train.ema import EMA

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PMF_CHECK_PORT", "29517"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    tdist.init_process_group(backend, rank=0, world_size=1)
    try:
        t = torch.ones(4, device=dev)
        tdist.all_reduce(t)
        ck.emit("fsdp", f"{backend} all_reduce", "PASS" if t.sum().item() == 4 else "FAIL")
        cfg = load_config("tiny-test", overrides=["model.name=pMF-tiny", "train.batch_size=8", "objective.impl=lean",
                                                   "train.parallel=fsdp", "train.precision=bf16", "train.ema=[hl1]"])

        def build():
            torch.manual_seed(0)
            net = build_model("pMF-tiny").to(dev)
            fsdp.shard_model(net, dev, True, mp_policy=fsdp.mixed_precision("bf16"))
            return net, fsdp.build_sharded_optimizer(net, cfg.optim)

        net, opt = build()
        strategy = modes.strategy_of(net, cfg, dev)
        x, y = batch_for(net, 8, torch.device("cpu"))
        imgs = ((x + 1) * 127.5).to(torch.uint8)
        losses = [train_step(net, opt, imgs, y, cfg, i * 8, dev, strategy=strategy).metrics["loss"] for i in range(2)]
        ck.emit("fsdp", f"one-rank {backend} FSDP2, lean, bf16", "PASS" if all(map(math.isfinite, losses)) else "FAIL",
                losses=losses)
        ema = EMA(net, cfg.train.ema)
        with tempfile.TemporaryDirectory() as run_dir:
            strategy.save_training_state(Path(run_dir), 2, net, opt, ema, {"nimg": 16})
            state = open_latest(Path(run_dir))
            net2, opt2 = build()
            strategy.load_training_state(state, net2, opt2, EMA(net2, cfg.train.ema))
            same = all(torch.equal(a.full_tensor(), b.full_tensor()) for a, b in zip(net.parameters(), net2.parameters()))
        ck.emit("fsdp", "DCP save / load round trip", "PASS" if same else "FAIL", step=state["step"])
    finally:
        tdist.destroy_process_group()


SECTIONS = [("env", sec_env, 1), ("fsdp", sec_fsdp, 20), ("attn_jvp", sec_attn_jvp, 20),
            ("train_step", sec_train_step, 150), ("step", sec_step, 60), ("max_micro", sec_max_micro, 60),
            ("train", sec_train, 60), ("sample", sec_sample, 45), ("data", sec_data, 30), ("h16", sec_h16, 30)]
# (name, function, seconds it needs on an H100: started only if that is left). NCCL first: a broken collective
# setup is the likeliest first-light failure, and the last section is the one a deadline skips.


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def watchdog(seconds: float):
    """A section that hangs (an NCCL collective, a DataLoader worker, a compile) is stopped: after ``seconds`` an
    alarm raises :class:`SectionTimeout` in it (a FAIL line, the next section runs), and faulthandler dumps every
    thread's stack to stderr a little later if even that does not return (e.g. stuck inside a C call)."""
    import faulthandler
    import signal

    def fire(signum, frame):
        raise SectionTimeout(f"section still running after {seconds:.0f} s (watchdog)")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(max(1, int(seconds)))
    faulthandler.dump_traceback_later(seconds + 30, exit=False)
    try:
        yield
    finally:
        signal.alarm(0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, old)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny versions of every section on the CPU")
    ap.add_argument("--deadline-min", type=float, default=8.0, help="stop starting sections after this")
    ap.add_argument("--json", help="also append the JSON lines to this file")
    ap.add_argument("--only", nargs="+", help="run only these sections")
    args = ap.parse_args(argv)
    from pmf.train import plan

    plan.set_allocator_defaults()  # as training runs: expandable segments unless the user set the allocator
    dev = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.smoke:
        torch.set_num_threads(1)  # tiny tensors: one thread is fastest on a shared CPU
    else:
        set_tf32(dev, True)
    ck = Check(args.deadline_min * 60, args.json)
    for name, fn, need in SECTIONS:
        if args.only and name not in args.only:
            continue
        if not args.smoke and ck.left() < need:
            ck.emit(name, "section", "SKIP", reason=f"{ck.left():.0f} s left of the deadline, needs ~{need} s")
            continue
        t = time.time()
        try:
            with watchdog(max(need * 3, 120) if not args.smoke else 240):
                fn(ck, dev, args.smoke)
        except Exception as e:  # noqa: BLE001  (one section's failure must not stop the others)
            ck.emit(name, "section", "FAIL", error=f"{type(e).__name__}: {str(e)[:300]}",
                    where=traceback.format_exc().strip().splitlines()[-3][:200])
        ck.emit(name, "time", "INFO", seconds=time.time() - t)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    c = ck.counts
    verdict = "PASS" if c["FAIL"] == 0 else "FAIL"
    print(json.dumps({"summary": verdict, "pass": c["PASS"], "fail": c["FAIL"], "skip": c["SKIP"],
                      "seconds": round(time.time() - ck.t0, 1), "device": str(dev), "smoke": args.smoke}), flush=True)
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
