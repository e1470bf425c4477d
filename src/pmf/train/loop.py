"""The training loop: data -> pmf_loss -> backward -> gradient all-reduce -> finite check -> optimizer -> EMA.

:func:`train` validates, then :func:`setup` returns a :class:`Run` (network, optimizer, EMA copies, strategy, data,
counters, schedules, reports), :func:`train_loop` steps it, and :func:`wrap_up` saves and reports how it stopped.
Every "each N kimg" action (log record, sample grid, checkpoint, cross-rank check) is due at fixed points of the
images seen (:mod:`pmf.train.schedule`), so a resumed run fires them where an uninterrupted one does.

Restart is rerunning the same command: the loop saves (model, optimizer, EMAs, data position, images seen,
counters) atomically, and every random draw derives from (seed, images seen, sample index in the global batch), so
a resumed run continues exactly as an uninterrupted one, on 1 or N processes (``torchrun --nproc-per-node N -m pmf
train ...``), with replicated (``train.parallel=ddp``) or FSDP2-sharded (``fsdp``, ``hsdp``) weights: what differs
between them is one strategy object (:mod:`pmf.train.modes`), so the loop has one code path. Every mode writes
one state directory (:mod:`pmf.train.checkpoint`, each rank its part), which resumes under any mode and world size. Only rank 0 writes the other files. ``--dry-run`` (:mod:`pmf.train.dryrun`) prints the resolved
config and the run's size without reading data or allocating the model. docs/scale-out.md.
Preemption signals, the run-directory lock, checked checkpoints and exit statuses: docs/robustness.md.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import torch

from pmf.data.datasets import ImageFolderDataset, ShardedLoader, load_fashion_mnist
from pmf.data.images import to_model_range, to_uint8, save_grid
from pmf.data.shards import ShardDataset
from pmf.errors import EXIT_DIVERGED, PmfError, exit_status
from pmf.method.model import PMFDiT
from pmf.method.objective import objective_at, pmf_loss
from pmf.method.objective_lean import row_buckets
from pmf.method.perceptual import build_perceptual
from pmf.method.rng import PerSampleGenerator
from pmf.method.sampler import noise_from_seeds, sample
from pmf.parallel import dist
from pmf.train import modes, plan
from pmf.train.checkpoint import open_latest, refuse_silent_restart, set_aside_previous_run
from pmf.train.config import RunConfig, config_differences, model_kwargs, to_json
from pmf.train.dryrun import dry_run_report
from pmf.train.ema import EMA
from pmf.train.optim import lr_at, set_lr
from pmf.train.progress import Logger, Progress, bar_total, open_bar
from pmf.train.runlock import lock_run_dir
from pmf.train.schedule import Every
from pmf.train.speed import compile_step
from pmf.train.precision import autocast_context, cpu_capability, is_out_of_memory, set_tf32
from pmf.train.step_end import end_of_step
from pmf.train.validate import check_writable_dir, validate_config
from pmf.util.atomic import atomic_write_text
from pmf.util.preempt import stop_on_signals

# ----------------------------------------------------------------------------------------------------------------
# Building blocks


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", dist.local_rank())
    return torch.device(name)


def load_dataset(cfg: RunConfig):
    """(data, num_classes) of a validated config: Fashion-MNIST as in-memory uint8 tensors, an ImageFolder dataset,
    or prepared shards (`pmf prepare-data` output, memory-mapped: pmf.data.shards). data.path is checked here, not
    by the config gate: ``--dry-run`` plans a run without its data."""
    if cfg.data.dataset == "fashion_mnist":
        return load_fashion_mnist("train", root=cfg.data.path or None), 10
    if not cfg.data.path:
        raise ValueError(f"data.dataset={cfg.data.dataset} needs data.path=" + (
            "/path/to/train (one folder per class)" if cfg.data.dataset == "imagefolder"
            else "/path/to/shards (the pmf prepare-data --out dir)"))
    if cfg.data.dataset == "imagefolder":
        ds = ImageFolderDataset(cfg.data.path, cfg.data.resolution)
    else:
        ds = ShardDataset(cfg.data.path, cfg.data.resolution, verify=cfg.data.verify)
    return ds, len(ds.classes)


def sample_seeds(seed: int, nimg: int, indices: torch.Tensor) -> list[int]:
    """Per-sample seed = f(run seed, global image counter): image number nimg + i of the run, never reused."""
    return [seed * (1 << 40) + nimg + int(i) for i in indices]


@dataclass
class StepResult:
    metrics: dict
    finite: bool
    grad_norm: float
    flags: tuple = ()  # end_flags() of train_step, each true when true on any rank


def train_step(net, opt, images_u8, labels, cfg: RunConfig, nimg: int, device, perceptual=None,
               loss_fn=pmf_loss, strategy: modes.Strategy | None = None, end_flags=None) -> StepResult:
    """One optimizer step on this rank's slice of the global batch, in ``accum_steps`` micro-batches. Gradients are
    averaged over ranks by the ``strategy`` (:mod:`pmf.train.modes`; default: the one ``net`` was built for):
    bucketed all-reduces launched during the last micro-batch's backward (``ddp``), or FSDP's reduce-scatter
    (``fsdp``, ``hsdp``); the earlier micro-batches accumulate gradients without communication.
    ``perceptual``: the LPIPS / ConvNeXt hook of :func:`pmf.method.perceptual.build_perceptual`, or None. ``loss_fn``:
    :func:`pmf.method.objective.pmf_loss`, possibly compiled by :func:`pmf.train.speed.compile_step`; its forward passes
    run under ``train.precision`` autocast, the backward outside it. ``end_flags``: a function returning host booleans
    the ranks must agree on (time budget, checkpoint due, stop signal), called after the backward; they travel in
    the step's one end-of-step reduction (:mod:`pmf.train.step_end`) and come back in ``StepResult.flags``. The
    step reads the device on the host once, at its end."""
    rank = dist.rank()
    strategy = strategy or modes.strategy_of(net, cfg, device)
    per_rank = images_u8.shape[0]
    accum = cfg.train.accum_steps
    micro = per_rank // accum
    objective = objective_at(cfg.objective, nimg)  # schedules of the objective follow the images seen
    sums: dict[str, torch.Tensor] = {}  # kept as tensors: no device sync per micro-batch, one at the end
    for a in range(accum):
        strategy.start_micro_batch(net, last=a == accum - 1)
        sl = slice(a * micro, (a + 1) * micro)
        x = to_model_range(images_u8[sl].to(device, non_blocking=True).contiguous())  # shards: CHW view of HWC
        y = labels[sl].to(device, non_blocking=True) if cfg.data.class_conditional else None
        indices = torch.arange(rank * per_rank + a * micro, rank * per_rank + (a + 1) * micro)
        gen = PerSampleGenerator(sample_seeds(cfg.train.seed, nimg, indices), indices)
        with autocast_context(device.type, cfg.train.precision):
            loss, metrics = loss_fn(net, x, y, objective, gen, perceptual=perceptual)
        (loss / accum).backward()
        for k, v in metrics.items():
            v = torch.as_tensor(v).detach().to(device, torch.float64) / accum
            sums[k] = sums[k] + v if k in sums else v
    strategy.finish_gradients(net, nimg)
    params = [p for p in net.parameters() if p.grad is not None]
    missing = strategy.missing_gradients(net)
    # One all-reduce and one host read: grad norm (clipped on the device), metrics averaged over ranks, the flags,
    # FSDP's reduction check. Decided on reduced values only, so every rank skips or steps together.
    end = end_of_step(params, sums, tuple(end_flags()) if end_flags is not None else (), len(missing), device,
                      cfg.train.grad_clip)
    if end.missing_gradients:
        raise strategy.gradient_error(missing, nimg)
    finite = math.isfinite(end.grad_norm) and all(math.isfinite(v) for v in end.metrics.values())
    if finite:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return StepResult(end.metrics, finite, end.grad_norm, end.flags)


GRID_MAX_IMAGES = 64  # training grids stay small: rank 0 samples them between steps, at any model size
GRID_CHUNK = 16  # images per network call while sampling a grid
GRID_WIDTH_PX = 640  # about this wide on disk: small images are enlarged, large ones averaged down


def grid_layout(num_classes: int) -> tuple[list[int], int]:
    """(classes of the columns, rows) of a training grid: every class when there are at most 16, else 8 classes
    spread evenly over the label set (0, C/8, 2C/8, ...); as many rows (fixed seeds) as keep it <= 64 images, at
    most 8."""
    cols = num_classes if num_classes <= 16 else 8
    classes = [(j * num_classes) // cols for j in range(cols)]
    return classes, max(1, min(8, GRID_MAX_IMAGES // cols))


@torch.no_grad()
def sample_grid(net, cfg: RunConfig, num_classes: int, path) -> Path:
    """1-NFE grid of at most 64 images: columns are classes spread over the label set, rows are fixed seeds
    (``sample.grid_seed``), so grids are comparable across a run. Sampled in chunks of 16 under the training
    precision (``train.precision``), written about 640 pixels wide."""
    classes, rows = grid_layout(num_classes)
    n = rows * len(classes)
    labels = torch.tensor(classes).repeat(rows)  # row-major: image i is (row i // cols, column i % cols)
    shape = (net.in_channels, net.input_size, net.input_size)
    dev = next(net.parameters()).device
    noise = noise_from_seeds([cfg.sample.grid_seed * 100000 + i for i in range(n)], shape,
                             cfg.objective.noise_scale, "cpu")
    chunks = []
    for i in range(0, n, GRID_CHUNK):
        with autocast_context(dev.type, cfg.train.precision):
            x = sample(net, noise[i:i + GRID_CHUNK].to(dev), labels[i:i + GRID_CHUNK].to(dev), cfg.sample.steps,
                       cfg.sample.omega, cfg.sample.t_min, cfg.sample.t_max)
        chunks.append(x.float().cpu())
    x = torch.cat(chunks)
    down = math.ceil(len(classes) * net.input_size / GRID_WIDTH_PX)
    if down > 1:  # average-pool large images down so the PNG stays a few hundred pixels wide
        x = torch.nn.functional.avg_pool2d(x, down, ceil_mode=True)
    width = len(classes) * (x.shape[-1] + 2) + 2  # save_grid's 2-px borders
    return save_grid(to_uint8(x), path, nrow=len(classes), scale=max(1, GRID_WIDTH_PX // width))


class ConfigMismatch(PmfError, ValueError):
    """The run directory holds a run with other settings."""


def check_resume_config(run_dir: Path, cfg: RunConfig, state_config: str | None = None) -> None:
    """A run directory belongs to one configuration: refuse to resume with a different one, naming the differences.
    The references are run_dir/config.json and the resolved config stored in the training state (``state_config``,
    JSON); either may be missing (the state's config is then the reference). Settings marked resumable in the
    config dataclasses (pmf.train.config.RESUMABLE: lr, intervals, total_kimg, max_nonfinite, ...) may change."""
    path = run_dir / "config.json"
    refs = []
    if path.exists():
        try:
            refs.append((str(path), json.loads(path.read_text())))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if state_config is None:
                raise ConfigMismatch(f"{path} is not valid JSON ({e}) and no training state carries the config; "
                                     "restore it, or pass --restart to start again") from None
    if state_config is not None:
        refs.append(("the training state", json.loads(state_config)))
    for where, old in refs:
        diffs = config_differences(old, cfg)
        if diffs:
            raise ConfigMismatch(f"{run_dir} holds a run with a different configuration (per {where}): "
                                 + "; ".join(diffs) + ". Use a new --run-dir, or rerun with the original settings "
                                 "to resume (or --restart to start again from step 0).")


def export_all(net_sd: dict, ema_sds: dict, run_dir: Path, kwargs: dict, cfg: RunConfig, nimg: int) -> None:
    """Inference exports of the raw weights ``net_sd`` and every EMA copy (``{name: state dict}``), v-head dropped:
    one network folder each, ``run_dir/export/<name>/`` (:mod:`pmf.method.pretrained`). Full (unsharded) state dicts."""
    meta = {"noise_scale": cfg.objective.noise_scale, "omega": cfg.sample.omega, "t_min": cfg.sample.t_min,
            "t_max": cfg.sample.t_max, "kimg": nimg / 1000, "model": cfg.model.name}
    infer_kwargs = {**kwargs, "v_head": False}
    infer = PMFDiT(**infer_kwargs)

    def strip_v(sd):
        return {k: v for k, v in sd.items() if not k.startswith(("v_heads.", "v_final_layer."))}

    infer.load_state_dict(strip_v(net_sd), strict=True)
    infer.save_pretrained(run_dir / "export" / "model", meta=meta)
    for name, sd in ema_sds.items():
        infer.load_state_dict(strip_v(sd), strict=True)
        infer.save_pretrained(run_dir / "export" / name, meta=meta)


# ----------------------------------------------------------------------------------------------------------------
# The run: what the loop changes and saves, and what it needs to step


@dataclass(frozen=True)
class Periodic:
    """The loop's "each N kimg" actions, each on its own :class:`~pmf.train.schedule.Every` (fired from the images
    seen alone, so a resumed run fires them where an uninterrupted one does)."""

    log: Every  # a log record (train.log_every_kimg; also after the 1st, 2nd, 4th, ... step before the first)
    grid: Every  # the sample grid samples-<kimg>.png (train.sample_every_kimg; 0 = only at the end)
    ckpt: Every  # the training state (train.ckpt_every_kimg; the wall-clock ckpt_every_minutes is end_flags')
    check: Every  # the cross-rank parameter check (train.check_every_kimg; never on one process or when off)


def periodic(cfg: RunConfig, world: int) -> Periodic:
    t = cfg.train
    return Periodic(log=Every(t.log_every_kimg, early_img=t.batch_size), grid=Every(t.sample_every_kimg),
                    ckpt=Every(t.ckpt_every_kimg),
                    check=Every(t.check_every_kimg if world > 1 and t.consistency_check else 0))


@dataclass
class Run:
    """What a training run changes and saves: the network, optimizer, EMA copies, data position and counters. Its
    methods save and load the training state, draw the sample grid and write the exports through the ``strategy``
    (full state dicts are gathered on rank 0 where sharded; every rank calls every method); restart = rerun, through
    :meth:`load_state_dict`. :func:`setup` adds what the loop needs besides (the fields after the counters);
    :func:`build_run` alone (importing a run, tests) leaves them at their defaults."""

    cfg: RunConfig
    run_dir: Path
    device: torch.device
    kwargs: dict  # PMFDiT constructor arguments
    net: PMFDiT
    opt: torch.optim.Optimizer
    ema: EMA
    loader: ShardedLoader
    strategy: modes.Strategy
    nimg: int = 0  # images seen
    step: int = 0
    nonfinite_run: int = 0  # non-finite steps in a row
    nonfinite_total: int = 0
    data: object = None  # the dataset (the log counts its skipped files)
    grid_classes: int = 1  # classes the sample grid spreads over (1: unconditional)
    total_nimg: int = 0  # images the run trains to (train.total_kimg)
    perceptual: Callable | None = None  # the frozen LPIPS / ConvNeXt hook of build_perceptual, or None; not saved
    loss_fn: Callable | None = None  # pmf_loss, compiled under train.compile
    every: Periodic | None = None
    progress: Progress | None = None

    def net_state(self) -> dict:
        return self.strategy.model_state(self.net)

    def ema_state(self, which: str | None = None) -> dict:
        return self.strategy.full(self.ema.state_dict() if which is None else self.ema.weights(which))

    def counters(self) -> dict:
        """Everything of the training state that is not a tensor of the network, optimizer or EMA."""
        return {"loader": self.loader.state_dict(), "nimg": self.nimg, "nonfinite_run": self.nonfinite_run,
                "nonfinite_total": self.nonfinite_total, "config": to_json(self.cfg)}

    def load_state_dict(self, state: dict) -> None:
        """The training state :func:`open_run_dir` found; its tensors are read into the built run (resharded)."""
        self.strategy.load_training_state(state, self.net, self.opt, self.ema)
        self.loader.load_state_dict(state["loader"])
        self.nimg, self.step = int(state["nimg"]), int(state["step"])
        self.nonfinite_run, self.nonfinite_total = int(state["nonfinite_run"]), int(state["nonfinite_total"])

    def checkpoint(self) -> None:
        """The training state (every rank takes part, each writing its part)."""
        self.strategy.save_training_state(self.run_dir, self.step, self.net, self.opt, self.ema, self.counters())

    def grid(self, tag: str, num_classes: int) -> None:
        """The bounded 1-NFE sample grid of ``sample.ema`` (or the raw weights) as samples-{tag}.png."""
        model = self.strategy.sampling_model(self.net, self.ema, self.cfg.sample.ema, self.kwargs)
        if model is not None:  # rank 0
            model.eval()
            sample_grid(model, self.cfg, num_classes, self.run_dir / f"samples-{tag}.png")
            self.net.train()

    def export(self) -> None:
        final_net, final_emas = self.net_state(), {name: self.ema_state(name) for name in self.ema.names}
        if dist.is_main():
            export_all(final_net, final_emas, self.run_dir, self.kwargs, self.cfg, self.nimg)

    def skipped_files(self) -> int:
        """Unreadable ImageFolder files this process met (each warned about once); rank 0's count on N processes."""
        return self.data.num_skipped if isinstance(self.data, ImageFolderDataset) else 0


def open_run_dir(cfg: RunConfig, run_dir: Path, restart: bool) -> dict | None:
    """The training state to resume from (None: start at step 0), after ``--restart`` moved an old run aside, a
    silent restart over an existing run was refused, and the config was checked against the run's. Damaged states
    are skipped (rank 0 renames them *.damaged); every rank checks its share of the hashes and reads the non-tensor
    part; the tensors are read into the built run (:meth:`Run.load_state_dict`)."""
    if restart:
        if dist.is_main():
            moved = set_aside_previous_run(run_dir)
            print(f"--restart: training {run_dir} from step 0" + (f"; moved aside: {', '.join(moved)}" if moved else ""),
                  flush=True)
        dist.barrier()
    state = open_latest(run_dir, set_aside=dist.is_main())
    if state is None and not restart:
        refuse_silent_restart(run_dir)
    if not restart:
        check_resume_config(run_dir, cfg, state.get("config") if state is not None else None)
    return state


def build_run(cfg: RunConfig, run_dir: Path, device: torch.device, data, state: dict | None) -> Run:
    """Strategy, network (seeded initial weights, sharded where sharded), optimizer, EMA and data stream; then the
    state's tensors and counters, when resuming."""
    world, kwargs = dist.world_size(), model_kwargs(cfg)
    strategy = modes.make_strategy(cfg, device, world)
    net = strategy.build_net(kwargs)
    opt = strategy.build_optimizer(net)
    ema = EMA(net, cfg.train.ema, ramp=cfg.train.ema_ramp)  # sharded copies where the network is sharded
    loader = ShardedLoader(data, cfg.train.batch_size, seed=cfg.train.seed, rank=dist.rank(), world_size=world,
                           num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    run = Run(cfg, run_dir, device, kwargs, net, opt, ema, loader, strategy)
    if state is not None:
        run.load_state_dict(state)
        dist.print0(f"resumed {run_dir} at {run.nimg / 1000:.1f} kimg (step {run.step})")
    return run


# ----------------------------------------------------------------------------------------------------------------
# Set-up, the loop, wrap-up


def train(cfg: RunConfig, run_dir: str | os.PathLike, minutes: float | None = None, dry_run: bool = False,
          quiet: bool = False, restart: bool = False, plan_devices: int | None = None,
          plan_device_memory: float | None = None, init_from: str | None = None) -> dict:
    """Train (or resume) the run in ``run_dir``. Returns a summary dict; its ``exit_status`` is the command's
    (pmf.errors). ``minutes`` stops cleanly, with a checkpoint, once that much wall-clock time has passed (the run
    then resumes when the command is rerun). SIGTERM / SIGINT / SIGUSR1 stop after the current step with a
    checkpoint and the exports (:mod:`pmf.util.preempt`). Rank 0 holds ``run_dir/.lock`` throughout
    (:mod:`pmf.train.runlock`). ``restart``: start again from step 0, moving the old states and log aside.
    ``plan_devices`` / ``plan_device_memory``: the devices ``dry_run`` plans for (see :func:`dry_run_report`).
    ``init_from``: a new run's
    weights and EMA copies come from this Orbax checkpoint or run directory (:mod:`pmf.train.official_run`)."""
    t_start = time.time()
    plan.set_allocator_defaults()  # before anything touches CUDA
    run_dir = Path(run_dir)
    validate_config(cfg)  # every setting, before any work (also for --dry-run)
    check_writable_dir(run_dir)
    device = resolve_device(cfg.train.device)
    kwargs = model_kwargs(cfg)
    # accum_steps=auto resolved, and a run that cannot fit refused, before any data or model set-up (pmf.train.plan)
    world_at_hand = (plan_devices if dry_run and plan_devices else None) or int(os.environ.get("WORLD_SIZE", "1"))
    cfg, _ = plan.fit_to_devices(cfg, kwargs, world_at_hand, device, plan_device_memory if dry_run else None,
                                 refuse=not dry_run)
    if dry_run:
        return dry_run_report(cfg, kwargs, device, plan_devices, plan_device_memory)

    dist.init(device.type)
    lock = lock_run_dir(run_dir)  # before anything in run_dir is read; a second run on it is refused
    try:
        with stop_on_signals() as stop:
            run = setup(cfg, run_dir, device, restart, init_from, quiet, t_start, minutes)
            stop_reason, res = train_loop(run, stop)
            return wrap_up(run, stop_reason, res)
    finally:
        if lock is not None:
            lock.release()


def configure_torch(cfg: RunConfig, device: torch.device) -> None:
    """Process-wide settings of the run: CPU threads, flush-to-zero on CPU, TF32 on CUDA."""
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormal arithmetic stalls CPU steps for seconds
    set_tf32(device, cfg.train.tf32)


def setup(cfg: RunConfig, run_dir: Path, device: torch.device, restart: bool, init_from: str | None, quiet: bool,
          t_start: float, minutes: float | None) -> Run:
    """The data, the training state to resume from, the built :class:`Run` (resumed, or initialized from
    ``init_from``), the perceptual hook, the (compiled) loss, config.json, the schedules and the reports (times
    from ``t_start``, the time budget ``minutes``)."""
    world, G, accum = dist.world_size(), cfg.train.batch_size, cfg.train.accum_steps
    if G % (world * accum):
        raise ValueError(f"train.batch_size={G} must be divisible by world_size*accum_steps={world * accum}")
    configure_torch(cfg, device)
    data, num_classes = load_dataset(cfg)
    if cfg.data.class_conditional and (model_classes := model_kwargs(cfg)["num_classes"]) != num_classes:
        raise ValueError(f"model has num_classes={model_classes} but the data has {num_classes} classes; "
                         f"set model.overrides={{num_classes: {num_classes}}}")
    state = open_run_dir(cfg, run_dir, restart)
    if device.type == "cpu" and not quiet:  # a CPU without native bf16 trains far slower in bf16: say which this is
        dist.print0(f"CPU: {cpu_capability()}")
    run = build_run(cfg, run_dir, device, data, state)
    if init_from is not None:
        from pmf.train.init_from import apply_init_from

        apply_init_from(run, init_from, resumed=state is not None)
    del state
    run.data, run.grid_classes = data, num_classes if cfg.data.class_conditional else 1
    run.total_nimg = int(round(cfg.train.total_kimg * 1000))  # round: e.g. 320 epochs = 409973.44 kimg
    run.perceptual = build_perceptual(cfg.perceptual, cfg.objective.perceptual_weights, device)  # frozen; not saved
    run.loss_fn = compile_step(pmf_loss, cfg.train.compile, cfg.train.compile_mode,
                               recompile_limit=row_buckets(G // (world * accum)))  # at most one graph per row bucket
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", to_json(cfg) + "\n")
    run.net.train()
    run.every = periodic(cfg, world)
    bar = open_bar(run.total_nimg, run.nimg, dist.is_main() and not quiet)
    run.progress = Progress(t_start, minutes, Logger(run_dir, dist.is_main()), bar, t_loop=time.time(),
                            nimg_loop=run.nimg, last_ckpt_time=time.time())
    return run


def train_loop(run: Run, stop) -> tuple[str, StepResult | None]:
    """Draw a batch, take a step, update the EMA copies, run the actions that are due, stop. Returns why it stopped
    and the last step's result (None when a finished run is rerun: the body never runs)."""
    G, every = run.cfg.train.batch_size, run.every
    res, batches = None, iter(run.loader)
    while run.nimg < run.total_nimg:
        images_u8, labels = next(batches)
        set_lr(run.opt, lr_at(run.cfg.optim, run.nimg / 1000))
        res = take_step(run, images_u8, labels, end_flags(run, stop))
        nimg_before, run.nimg, run.step = run.nimg, run.nimg + G, run.step + 1
        if res.finite:
            run.nonfinite_run = 0
            run.ema.update(run.net, G, run.nimg)
        elif skip_nonfinite(run, res):
            return f"{run.nonfinite_run} non-finite steps in a row", res
        show_progress(run, res)
        if every.log.due(nimg_before, run.nimg) or run.nimg >= run.total_nimg:
            log_record(run, res)
        if every.check.due(nimg_before, run.nimg):
            check_consistency(run)
        if every.grid.due(nimg_before, run.nimg):
            run.grid(f"{run.nimg // 1000:06d}kimg", run.grid_classes)
        time_up, ckpt_due, preempted = res.flags  # agreed on by all ranks in the step's reduction (end_flags)
        if preempted:  # the checkpoint and exports of wrap_up save this step
            return f"preempted ({stop.signal_name or 'signal on another rank'})", res
        if time_up:  # the checkpoint of wrap_up saves this step
            return "time budget", res
        if ckpt_due:
            checkpoint(run)
    return "done", res


def end_flags(run: Run, stop):
    """The host booleans of the coming step that the ranks decide together, in the step's one reduction
    (:mod:`pmf.train.step_end`): time budget over, checkpoint due (by images after the step, or by wall clock),
    stop signal. Wall clocks differ across ranks: decided apart, one rank would stop or enter checkpoint()'s barrier
    while the others wait in another collective. A stop signal on any rank stops every rank after this same step
    (:mod:`pmf.util.preempt`)."""
    nimg_before, nimg_after = run.nimg, run.nimg + run.cfg.train.batch_size
    ckpt_seconds = run.cfg.train.ckpt_every_minutes * 60

    def flags() -> tuple[bool, bool, bool]:
        now = time.time()
        return (run.progress.time_up(now),
                run.every.ckpt.due(nimg_before, nimg_after) or now - run.progress.last_ckpt_time > ckpt_seconds,
                stop.requested)

    return flags


def take_step(run: Run, images_u8, labels, flags) -> StepResult:
    """:func:`train_step` on the run's network; an out-of-memory error says what did not fit and what to turn."""
    try:
        return train_step(run.net, run.opt, images_u8, labels, run.cfg, run.nimg, run.device, run.perceptual,
                          run.loss_fn, run.strategy, flags)
    except Exception as e:
        if is_out_of_memory(e):
            raise plan.out_of_memory_error(e, run.cfg, run.kwargs, dist.world_size(), run.device) from e
        raise


def skip_nonfinite(run: Run, res: StepResult) -> bool:
    """Count a skipped non-finite step (its update was not applied); true when ``train.max_nonfinite`` of them in a
    row stop the run."""
    run.nonfinite_run += 1
    run.nonfinite_total += 1
    dist.print0(f"non-finite step at {run.nimg / 1000:.2f} kimg (grad norm {res.grad_norm}); skipped "
                f"({run.nonfinite_run} in a row)")
    return run.nonfinite_run >= run.cfg.train.max_nonfinite


def show_progress(run: Run, res: StepResult) -> None:
    """The step's loss into the next log record's average; the bar moved on (rank 0 without --quiet)."""
    p = run.progress
    p.losses.append(res.metrics.get("loss", float("nan")))
    if p.bar is not None:
        p.bar.update(run.cfg.train.batch_size)
        # --minutes: the bar ends where the time budget stops the run, if that comes before total_kimg.
        p.bar.total = bar_total(run.total_nimg, run.nimg, p.nimg_loop, p.t_loop, p.deadline(), time.time())
        # loss_u (raw MSE of V against v_g) moves visibly; the adaptively weighted loss sits near its number of
        # terms by construction (each term is l / sg(l + eps)).
        p.bar.set_postfix(loss_u=f"{res.metrics.get('loss_u', float('nan')):.4f}", step=run.step, refresh=False)


def log_record(run: Run, res: StepResult) -> None:
    """One JSONL / TensorBoard record: the step's metrics, the loss averaged since the last record, rates, counts."""
    p = run.progress
    elapsed = time.time() - p.t_loop
    rec = {"kimg": run.nimg / 1000, "step": run.step, **res.metrics, "loss_avg": sum(p.losses) / len(p.losses),
           "grad_norm": res.grad_norm, "lr": run.opt.param_groups[0]["lr"],
           "img_per_s": (run.nimg - p.nimg_loop) / max(elapsed, 1e-9), "nonfinite_total": run.nonfinite_total,
           "skipped_files": run.skipped_files(), "time_s": time.time() - p.t_start}
    if hasattr(run.loss_fn, "report"):  # train.compile: graphs compiled, recompiles, graph breaks
        rec.update({f"compile_{k}": v for k, v in run.loss_fn.report().items()})
    p.logger.log(rec)
    p.losses = []


def check_consistency(run: Run) -> None:
    """Parameters agree across ranks. Sharded strategies: only replicated tensors are compared; that the sharded
    gradients were reduce-scattered is checked in every step's end-of-step reduction (Strategy.missing_gradients)."""
    dist.check_consistency(run.net, f"parameters at {run.nimg / 1000:.1f} kimg")


def checkpoint(run: Run) -> None:
    """The training state; train.ckpt_every_minutes counts again from now."""
    run.checkpoint()
    run.progress.last_ckpt_time = time.time()


def wrap_up(run: Run, stop_reason: str, res: StepResult | None) -> dict:
    """After the loop, however it stopped: the checkpoint, the latest grid, the exports, the summary."""
    run.progress.close()
    if stop_reason == "done" and run.nonfinite_run > 0:  # reached the end, but its last steps trained nothing
        stop_reason = f"done, but the last {run.nonfinite_run} steps were non-finite"
    run.checkpoint()
    run.grid("latest", run.grid_classes)
    run.export()
    return finish(run, stop_reason, res)


def summary_of(run: Run) -> dict:
    """What summary.json says of the run's set-up."""
    world, G, data = dist.world_size(), run.cfg.train.batch_size, run.data
    n_data = len(data[1]) if isinstance(data, tuple) else len(data)
    summary = {"run_dir": str(run.run_dir), "world_size": world, "device": str(run.device), "model": run.cfg.model.name,
               "parallel": run.cfg.train.parallel, "strategy": modes.mode_of(run.cfg.train.parallel, world),
               "total_kimg": run.cfg.train.total_kimg, "steps_total": math.ceil(run.total_nimg / G),
               "steps_per_epoch": n_data // G,
               "params_M": round(sum(p.numel() for p in run.net.parameters()) / 1e6, 3)}
    if hasattr(run.loss_fn, "report"):
        summary["compile"] = run.loss_fn.report()
    return summary


def finish(run: Run, stop_reason: str, res: StepResult | None) -> dict:
    """summary.json and the closing lines: why the run stopped and what to do next."""
    summary = summary_of(run)
    summary.update({"kimg": run.nimg / 1000, "step": run.step, "stop_reason": stop_reason,
                    "exit_status": exit_status(stop_reason), "nonfinite_total": run.nonfinite_total,
                    "skipped_files": run.skipped_files(),
                    "seconds": time.time() - run.progress.t_start,
                    "last_metrics": res.metrics if res is not None else {}})
    if dist.is_main():
        atomic_write_text(run.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    dist.print0(f"stopped ({stop_reason}) at {run.nimg / 1000:.1f} kimg, step {run.step}; "
                f"grid {run.run_dir / 'samples-latest.png'}")
    if summary["exit_status"] == EXIT_DIVERGED:
        dist.print0(f"exit status {EXIT_DIVERGED}: lower optim.lr (or raise train.max_nonfinite) and rerun to continue "
                    f"from step {run.step}, or rerun with --restart if the weights are ruined")
    elif stop_reason != "done":
        dist.print0(f"rerun the same command to continue (exit status {summary['exit_status']})")
    dist.barrier()  # every rank leaves after rank 0 wrote everything (a launcher may kill the others on a non-zero exit)
    return summary
