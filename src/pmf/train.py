"""The training loop: data -> pmf_loss -> backward -> gradient all-reduce -> finite check -> optimizer -> EMA.

Restart is rerunning the same command: the loop saves (model, optimizer, EMAs, data position, images seen,
counters) atomically, and every random draw derives from (seed, images seen, sample index in the global batch), so
a resumed run continues exactly as an uninterrupted one, on 1 or N processes (``torchrun --nproc-per-node N -m pmf
train ...``). Only rank 0 writes files.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pmf import dist
from pmf.checkpoint import atomic_write_text, export_model, load_latest, save_training_state
from pmf.config import RunConfig, to_dict, to_json
from pmf.data import ImageFolderDataset, ShardedLoader, load_fashion_mnist, to_model_range, to_uint8
from pmf.images import save_grid
from pmf.model import MODELS, PMFDiT
from pmf.objective import PerSampleGenerator, pmf_loss
from pmf.optim import EMA, build_optimizer, lr_at, set_lr
from pmf.sampler import noise_from_seeds, sample

# Config keys that may change between a run and its resumption (they do not change the training trajectory).
RESUMABLE_CHANGES = {"train.total_kimg", "train.log_every_kimg", "train.sample_every_kimg", "train.ckpt_every_kimg",
                     "train.ckpt_every_minutes", "train.check_every_kimg", "train.device", "train.threads",
                     "train.compile", "data.num_workers", "data.path", "eval", "sample"}


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", dist.local_rank())
    return torch.device(name)


def model_kwargs(cfg: RunConfig) -> dict:
    """PMFDiT kwargs of the run: registry entry + overrides, with the objective's noise scale and guidance range."""
    if cfg.model.name not in MODELS:
        raise KeyError(f"unknown model {cfg.model.name!r}; registered: {', '.join(MODELS)}")
    spec = MODELS[cfg.model.name]
    omega_max = 1.0 + cfg.objective.cfg_max if cfg.objective.guidance else 1.0
    kw = {**spec.kwargs, "noise_scale": cfg.objective.noise_scale, "omega_max": omega_max, **cfg.model.overrides}
    if not cfg.data.class_conditional:
        kw.setdefault("num_classes", spec.kwargs.get("num_classes", 1))
    return kw


def load_dataset(cfg: RunConfig):
    """(data, num_classes): Fashion-MNIST as in-memory uint8 tensors, or an ImageFolder dataset."""
    if cfg.data.dataset == "fashion_mnist":
        return load_fashion_mnist("train", root=cfg.data.path or None), 10
    if cfg.data.dataset == "imagefolder":
        if not cfg.data.path:
            raise ValueError("data.dataset=imagefolder needs data.path=/path/to/train (one folder per class)")
        ds = ImageFolderDataset(cfg.data.path, cfg.data.resolution)
        return ds, len(ds.classes)
    raise ValueError(f"unknown data.dataset {cfg.data.dataset!r}; use fashion_mnist or imagefolder")


def sample_seeds(seed: int, nimg: int, indices: torch.Tensor) -> list[int]:
    """Per-sample seed = f(run seed, global image counter): image number nimg + i of the run, never reused."""
    return [seed * (1 << 40) + nimg + int(i) for i in indices]


@dataclass
class StepResult:
    metrics: dict
    finite: bool
    grad_norm: float


def train_step(net, opt, images_u8, labels, cfg: RunConfig, nimg: int, device) -> StepResult:
    """One optimizer step on this rank's slice of the global batch, in ``accum_steps`` micro-batches."""
    world, rank = dist.world_size(), dist.rank()
    per_rank = images_u8.shape[0]
    accum = cfg.train.accum_steps
    micro = per_rank // accum
    sums: dict[str, float] = {}
    for a in range(accum):
        sl = slice(a * micro, (a + 1) * micro)
        x = to_model_range(images_u8[sl].to(device, non_blocking=True))
        y = labels[sl].to(device) if cfg.data.class_conditional else None
        indices = torch.arange(rank * per_rank + a * micro, rank * per_rank + (a + 1) * micro)
        gen = PerSampleGenerator(sample_seeds(cfg.train.seed, nimg, indices), indices, device=device)
        loss, metrics = pmf_loss(net, x, y, cfg.objective, gen)
        (loss / accum).backward()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) / accum
    dist.all_reduce_grads(net)
    params = [p for p in net.parameters() if p.grad is not None]
    max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    # Metrics averaged over ranks (a non-finite value on any rank makes the mean non-finite).
    keys = sorted(sums)
    vals = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
    if dist.world_size() > 1:
        vals = vals.to(device)
        torch.distributed.all_reduce(vals)
        vals = vals.cpu() / world
    metrics = dict(zip(keys, vals.tolist()))
    # Decided on all-reduced values only, so every rank skips or steps together (rank-local metrics would let one
    # replica skip a step the others take).
    finite = math.isfinite(grad_norm) and all(math.isfinite(v) for v in metrics.values())
    if finite:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return StepResult(metrics, finite, grad_norm)


@torch.no_grad()
def sample_grid(net, cfg: RunConfig, num_classes: int, path, rows: int = 8) -> Path:
    """1-NFE grid: columns are classes, rows are fixed seeds (``sample.grid_seed``), so grids are comparable."""
    n = rows * num_classes
    labels = torch.arange(n) % num_classes
    shape = (net.in_channels, net.input_size, net.input_size)
    dev = next(net.parameters()).device
    noise = noise_from_seeds([cfg.sample.grid_seed * 100000 + i for i in range(n)], shape,
                             cfg.objective.noise_scale, dev)
    x = sample(net, noise, labels.to(dev), cfg.sample.steps, cfg.sample.omega, cfg.sample.t_min, cfg.sample.t_max)
    return save_grid(to_uint8(x.float().cpu()), path, nrow=num_classes, scale=max(1, 112 // net.input_size))


class Logger:
    """JSONL (always) + TensorBoard (when installed); rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled, self.path, self.tb = enabled, run_dir / "log.jsonl", None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "kimg":
                    self.tb.add_scalar(k, v, global_step=int(record["kimg"] * 1000))
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


def check_resume_config(run_dir: Path, cfg: RunConfig) -> None:
    """A run directory belongs to one configuration: refuse to resume with a different one (except the keys in
    RESUMABLE_CHANGES), naming the differences."""
    path = run_dir / "config.json"
    if not path.exists():
        return
    old, new = json.loads(path.read_text()), json.loads(to_json(cfg))
    diffs = []
    for section in new:
        if section in RESUMABLE_CHANGES:
            continue
        for key in set(new[section]) | set(old.get(section, {})):
            if f"{section}.{key}" in RESUMABLE_CHANGES:
                continue
            if old.get(section, {}).get(key) != new[section].get(key):
                diffs.append(f"{section}.{key}: {old.get(section, {}).get(key)!r} -> {new[section].get(key)!r}")
    if diffs:
        raise ValueError(f"{run_dir} holds a run with a different configuration:\n  " + "\n  ".join(diffs)
                         + "\nUse a new --run-dir, or rerun with the original settings to resume.")


def export_all(net, ema: EMA, run_dir: Path, kwargs: dict, cfg: RunConfig, nimg: int) -> None:
    """Inference exports (safetensors + JSON) of the raw weights and every EMA copy, v-head dropped."""
    meta = {"noise_scale": cfg.objective.noise_scale, "omega": cfg.sample.omega, "t_min": cfg.sample.t_min,
            "t_max": cfg.sample.t_max, "kimg": nimg / 1000, "model": cfg.model.name}
    infer_kwargs = {**kwargs, "v_head": False}
    infer = PMFDiT(**infer_kwargs)

    def strip_v(sd):
        return {k: v for k, v in sd.items() if not k.startswith(("v_heads.", "v_final_layer."))}

    infer.load_state_dict(strip_v(net.state_dict()), strict=True)
    export_model(infer, run_dir / "export", infer_kwargs, meta, name="model")
    for name in ema.names:
        infer.load_state_dict(strip_v(ema.weights(name)), strict=True)
        export_model(infer, run_dir / "export", infer_kwargs, meta, name=name)


# ----------------------------------------------------------------------------------------------------------------
# The loop


def train(cfg: RunConfig, run_dir: str | os.PathLike, minutes: float | None = None, dry_run: bool = False,
          quiet: bool = False) -> dict:
    """Train (or resume) the run in ``run_dir``. Returns a summary dict. ``minutes`` stops cleanly, with a
    checkpoint, once that much wall-clock time has passed (the run then resumes when the command is rerun)."""
    t_start = time.time()
    run_dir = Path(run_dir)
    device = resolve_device(cfg.train.device)
    dist.init(device.type)
    world, rank = dist.world_size(), dist.rank()
    G, accum = cfg.train.batch_size, cfg.train.accum_steps
    if G % (world * accum):
        raise ValueError(f"train.batch_size={G} must be divisible by world_size*accum_steps={world * accum}")
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormal arithmetic stalls CPU steps for seconds

    kwargs = model_kwargs(cfg)
    data, num_classes = load_dataset(cfg)
    if cfg.data.class_conditional and kwargs["num_classes"] != num_classes:
        raise ValueError(f"model has num_classes={kwargs['num_classes']} but the data has {num_classes} classes; "
                         f"set model.overrides={{num_classes: {num_classes}}}")
    total_nimg = int(cfg.train.total_kimg * 1000)
    summary = {"run_dir": str(run_dir), "world_size": world, "device": str(device), "model": cfg.model.name,
               "total_kimg": cfg.train.total_kimg, "steps_total": math.ceil(total_nimg / G)}
    n_data = len(data[1]) if isinstance(data, tuple) else len(data)
    summary["steps_per_epoch"] = n_data // G
    if dry_run:
        with torch.device("meta"):
            n_params = sum(p.numel() for p in PMFDiT(**kwargs).parameters())
        summary["params_M"] = round(n_params / 1e6, 3)
        dist.print0(to_json(cfg))
        dist.print0(json.dumps(summary, indent=2))
        return summary

    check_resume_config(run_dir, cfg)
    torch.manual_seed(cfg.train.seed)  # initial weights: same on every rank, then broadcast anyway
    net = PMFDiT(**kwargs).to(device)
    opt = build_optimizer(net, cfg.optim)
    ema = EMA(net, cfg.train.ema, ramp=cfg.train.ema_ramp)
    loader = ShardedLoader(data, G, seed=cfg.train.seed, rank=rank, world_size=world,
                           num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    nimg, step, nonfinite_run, nonfinite_total = 0, 0, 0, 0
    state = load_latest(run_dir)
    if state is not None:
        net.load_state_dict(state["net"], strict=True)
        opt.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        loader.load_state_dict(state["loader"])
        nimg, step = int(state["nimg"]), int(state["step"])
        nonfinite_run, nonfinite_total = int(state["nonfinite_run"]), int(state["nonfinite_total"])
        dist.print0(f"resumed {run_dir} at {nimg / 1000:.1f} kimg (step {step})")
    dist.broadcast_module_(net)
    if cfg.train.consistency_check:
        dist.check_consistency(net, "initial parameters")
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", to_json(cfg) + "\n")
    net.train()
    logger = Logger(run_dir, dist.is_main())
    summary["params_M"] = round(sum(p.numel() for p in net.parameters()) / 1e6, 3)

    def checkpoint():
        if dist.is_main():
            save_training_state(run_dir, {"net": net.state_dict(), "optimizer": opt.state_dict(),
                                          "ema": ema.state_dict(), "loader": loader.state_dict(), "nimg": nimg,
                                          "nonfinite_run": nonfinite_run, "nonfinite_total": nonfinite_total}, step)
        dist.barrier()

    def skipped_files() -> int:
        # Unreadable ImageFolder files this process met (each warned about once); rank 0's count on N processes.
        return data.num_skipped if isinstance(data, ImageFolderDataset) else 0

    def grid(tag):
        if dist.is_main():
            which = cfg.sample.ema
            model = ema.model(which, like=net) if which else net
            model.eval()
            sample_grid(model, cfg, num_classes if cfg.data.class_conditional else 1, run_dir / f"samples-{tag}.png")
            net.train()

    next_log = nimg + cfg.train.log_every_kimg * 1000
    next_grid = nimg + cfg.train.sample_every_kimg * 1000 if cfg.train.sample_every_kimg > 0 else float("inf")
    next_ckpt = nimg + cfg.train.ckpt_every_kimg * 1000
    next_check = nimg + cfg.train.check_every_kimg * 1000
    last_ckpt_time = time.time()
    pbar = None
    if dist.is_main() and not quiet:
        from tqdm import tqdm

        pbar = tqdm(total=total_nimg, initial=nimg, unit="img", unit_scale=True, dynamic_ncols=True, smoothing=0.05)
    stop_reason = "done"
    res = None  # stays None when a finished run is rerun (the loop body never runs)
    t_loop, nimg_loop, window = time.time(), nimg, []
    it = iter(loader)
    while nimg < total_nimg:
        # Wall clocks differ across ranks: decide together, or one rank stops while the others wait in a collective.
        time_up = minutes is not None and time.time() - t_start > minutes * 60
        if dist.all_reduce_scalar(float(time_up), "max") > 0:
            stop_reason = "time budget"
            break
        images_u8, labels = next(it)
        set_lr(opt, lr_at(cfg.optim, nimg / 1000))
        res = train_step(net, opt, images_u8, labels, cfg, nimg, device)
        nimg += G
        step += 1
        if res.finite:
            nonfinite_run = 0
            ema.update(net, G, nimg)
        else:
            nonfinite_run += 1
            nonfinite_total += 1
            dist.print0(f"non-finite step at {nimg / 1000:.2f} kimg (grad norm {res.grad_norm}); skipped "
                        f"({nonfinite_run} in a row)")
            if nonfinite_run >= cfg.train.max_nonfinite:
                stop_reason = f"{nonfinite_run} non-finite steps in a row"
                break
        window.append(res.metrics.get("loss", float("nan")))
        if pbar is not None:
            pbar.update(G)
            pbar.set_postfix(loss=f"{res.metrics.get('loss', float('nan')):.4f}", step=step, refresh=False)
        if nimg >= next_log or nimg >= total_nimg:
            elapsed = time.time() - t_loop
            rec = {"kimg": nimg / 1000, "step": step, **res.metrics, "loss_avg": sum(window) / len(window),
                   "grad_norm": res.grad_norm, "lr": opt.param_groups[0]["lr"],
                   "img_per_s": (nimg - nimg_loop) / max(elapsed, 1e-9), "nonfinite_total": nonfinite_total,
                   "skipped_files": skipped_files(), "time_s": time.time() - t_start}
            logger.log(rec)
            window, next_log = [], next_log + cfg.train.log_every_kimg * 1000
        if world > 1 and cfg.train.consistency_check and nimg >= next_check:
            dist.check_consistency(net, f"parameters at {nimg / 1000:.1f} kimg")
            next_check += cfg.train.check_every_kimg * 1000
        if nimg >= next_grid:
            grid(f"{nimg // 1000:06d}kimg")
            next_grid += cfg.train.sample_every_kimg * 1000
        ckpt_due = nimg >= next_ckpt or time.time() - last_ckpt_time > cfg.train.ckpt_every_minutes * 60
        if dist.all_reduce_scalar(float(ckpt_due), "max") > 0:  # checkpoint() ends in a barrier: all ranks or none
            checkpoint()
            last_ckpt_time = time.time()
            next_ckpt = nimg + cfg.train.ckpt_every_kimg * 1000
    if pbar is not None:
        pbar.close()
    checkpoint()
    if dist.is_main():
        grid("latest")
        export_all(net, ema, run_dir, kwargs, cfg, nimg)
    logger.close()
    summary.update({"kimg": nimg / 1000, "step": step, "stop_reason": stop_reason, "nonfinite_total": nonfinite_total,
                    "skipped_files": skipped_files(),
                    "seconds": time.time() - t_start, "last_metrics": res.metrics if res is not None else {}})
    if dist.is_main():
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    dist.print0(f"stopped ({stop_reason}) at {nimg / 1000:.1f} kimg, step {step}; grid {run_dir / 'samples-latest.png'}")
    return summary
