"""The training loop: data -> pmf_loss -> backward -> gradient all-reduce -> finite check -> optimizer -> EMA.

Restart is rerunning the same command: the loop saves (model, optimizer, EMAs, data position, images seen,
counters) atomically, and every random draw derives from (seed, images seen, sample index in the global batch), so
a resumed run continues exactly as an uninterrupted one, on 1 or N processes (``torchrun --nproc-per-node N -m pmf
train ...``), with replicated (``train.parallel=ddp``) or FSDP2-sharded (``fsdp``, ``hsdp``) weights: what differs
between them is one strategy object (:mod:`pmf.train.modes`), so the loop has one code path. Replicated runs
write one state file (rank 0), sharded runs a sharded state directory (every rank); either resumes under any mode
and world size. Only rank 0 writes the other files. ``--dry-run`` (:mod:`pmf.train.dryrun`) prints the resolved
config and the run's size without reading data or allocating the model. docs/scale-out.md.
Preemption signals, the run-directory lock, checked checkpoints and exit statuses: docs/robustness.md.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pmf.data.datasets import ImageFolderDataset, ShardedLoader, load_fashion_mnist
from pmf.data.images import to_model_range, to_uint8, save_grid
from pmf.data.shards import ShardDataset
from pmf.errors import EXIT_DIVERGED, PmfError, exit_status
from pmf.io.export import export_model
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
from pmf.train.progress import bar_total
from pmf.train.runlock import lock_run_dir
from pmf.train.speed import autocast_context, compile_step, cpu_capability, is_out_of_memory, set_tf32
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


def next_log_at(nimg: int, batch: int, every: float) -> float:
    """The images seen at which the next log record is written after ``nimg``: every ``every`` images, and before
    the first of them after 1, 2, 4, 8, ... steps (so the first records of a slow run, e.g. one GPU with a large
    global batch, come within minutes). A function of the images seen only, so a resumed run logs where an
    uninterrupted one does."""
    regular = (math.floor(nimg / every) + 1) * every if every > 0 else float("inf")
    early = batch
    while early <= nimg:
        early *= 2
    return min(regular, early) if early < every else regular


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
    """Inference exports (safetensors + JSON) of the raw weights ``net_sd`` and every EMA copy (``{name: state
    dict}``), v-head dropped. Full (unsharded) state dicts."""
    meta = {"noise_scale": cfg.objective.noise_scale, "omega": cfg.sample.omega, "t_min": cfg.sample.t_min,
            "t_max": cfg.sample.t_max, "kimg": nimg / 1000, "model": cfg.model.name}
    infer_kwargs = {**kwargs, "v_head": False}
    infer = PMFDiT(**infer_kwargs)

    def strip_v(sd):
        return {k: v for k, v in sd.items() if not k.startswith(("v_heads.", "v_final_layer."))}

    infer.load_state_dict(strip_v(net_sd), strict=True)
    export_model(infer, run_dir / "export", infer_kwargs, meta, name="model")
    for name, sd in ema_sds.items():
        infer.load_state_dict(strip_v(sd), strict=True)
        export_model(infer, run_dir / "export", infer_kwargs, meta, name=name)


# ----------------------------------------------------------------------------------------------------------------
# The loop


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
            return _train_locked(cfg, run_dir, minutes, quiet, restart, stop, t_start, device, kwargs, init_from)
    finally:
        if lock is not None:
            lock.release()


@dataclass
class Run:
    """What a training run changes and saves: the network, optimizer, EMA copies, data position and counters. Its
    methods save and load the training state, draw the sample grid and write the exports through the ``strategy``
    (full state dicts are gathered on rank 0 where sharded; every rank calls every method); restart = rerun, through
    :meth:`load_state_dict`."""

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

    def net_state(self) -> dict:
        return self.strategy.model_state(self.net)

    def ema_state(self, which: str | None = None) -> dict:
        return self.strategy.full(self.ema.state_dict() if which is None else self.ema.weights(which))

    def counters(self) -> dict:
        """Everything of the training state that is not a tensor of the network, optimizer or EMA."""
        return {"loader": self.loader.state_dict(), "nimg": self.nimg, "nonfinite_run": self.nonfinite_run,
                "nonfinite_total": self.nonfinite_total, "config": to_json(self.cfg)}

    def load_state_dict(self, state: dict) -> None:
        """The training state :func:`open_run_dir` found (a single-file or a sharded one)."""
        self.strategy.load_training_state(state, self.net, self.opt, self.ema)
        self.loader.load_state_dict(state["loader"])
        self.nimg, self.step = int(state["nimg"]), int(state["step"])
        self.nonfinite_run, self.nonfinite_total = int(state["nonfinite_run"]), int(state["nonfinite_total"])

    def checkpoint(self) -> None:
        """The training state (every rank takes part: a gather, or each rank writing its shards)."""
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


def open_run_dir(cfg: RunConfig, run_dir: Path, restart: bool) -> dict | None:
    """The training state to resume from (None: start at step 0), after ``--restart`` moved an old run aside, a
    silent restart over an existing run was refused, and the config was checked against the run's. Damaged states
    are skipped (rank 0 renames them *.damaged); every rank reads a single-file state memory-mapped, and only the
    checked manifest and non-tensor part of a sharded one (its shards are read into the built run)."""
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


def _train_locked(cfg: RunConfig, run_dir: Path, minutes, quiet, restart, stop, t_start, device, kwargs,
                  init_from=None) -> dict:
    world = dist.world_size()
    G, accum = cfg.train.batch_size, cfg.train.accum_steps
    if G % (world * accum):
        raise ValueError(f"train.batch_size={G} must be divisible by world_size*accum_steps={world * accum}")
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormal arithmetic stalls CPU steps for seconds
    set_tf32(device, cfg.train.tf32)

    data, num_classes = load_dataset(cfg)
    if cfg.data.class_conditional and kwargs["num_classes"] != num_classes:
        raise ValueError(f"model has num_classes={kwargs['num_classes']} but the data has {num_classes} classes; "
                         f"set model.overrides={{num_classes: {num_classes}}}")
    grid_classes = num_classes if cfg.data.class_conditional else 1
    total_nimg = int(round(cfg.train.total_kimg * 1000))  # round: e.g. 320 epochs = 409973.44 kimg
    n_data = len(data[1]) if isinstance(data, tuple) else len(data)
    summary = {"run_dir": str(run_dir), "world_size": world, "device": str(device), "model": cfg.model.name,
               "parallel": cfg.train.parallel, "strategy": modes.mode_of(cfg.train.parallel, world),
               "total_kimg": cfg.train.total_kimg,
               "steps_total": math.ceil(total_nimg / G), "steps_per_epoch": n_data // G}

    state = open_run_dir(cfg, run_dir, restart)
    if device.type == "cpu" and not quiet:  # a CPU without native bf16 trains far slower in bf16: say which this is
        dist.print0(f"CPU: {cpu_capability()}")
    run = build_run(cfg, run_dir, device, data, state)
    if init_from is not None:
        from pmf.train.init_from import apply_init_from

        apply_init_from(run, init_from, resumed=state is not None)
    del state
    net, opt, ema = run.net, run.opt, run.ema
    perceptual = build_perceptual(cfg.perceptual, cfg.objective.perceptual_weights, device)  # frozen; not saved
    loss_fn = compile_step(pmf_loss, cfg.train.compile, cfg.train.compile_mode,
                           recompile_limit=row_buckets(G // (world * accum)))  # at most one graph per row bucket
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", to_json(cfg) + "\n")
    net.train()
    logger = Logger(run_dir, dist.is_main())
    summary["params_M"] = round(sum(p.numel() for p in net.parameters()) / 1e6, 3)

    def skipped_files() -> int:
        # Unreadable ImageFolder files this process met (each warned about once); rank 0's count on N processes.
        return data.num_skipped if isinstance(data, ImageFolderDataset) else 0

    next_log = next_log_at(run.nimg, G, cfg.train.log_every_kimg * 1000)
    next_grid = run.nimg + cfg.train.sample_every_kimg * 1000 if cfg.train.sample_every_kimg > 0 else float("inf")
    next_ckpt = run.nimg + cfg.train.ckpt_every_kimg * 1000
    next_check = run.nimg + cfg.train.check_every_kimg * 1000
    last_ckpt_time = time.time()
    pbar = None
    if dist.is_main() and not quiet:
        from tqdm import tqdm

        pbar = tqdm(total=total_nimg, initial=run.nimg, unit="img", unit_scale=True, dynamic_ncols=True,
                    smoothing=0.05)
    stop_reason = "done"
    res = None  # stays None when a finished run is rerun (the loop body never runs)
    t_loop, nimg_loop, window = time.time(), run.nimg, []
    it = iter(run.loader)
    while run.nimg < total_nimg:
        images_u8, labels = next(it)
        set_lr(opt, lr_at(cfg.optim, run.nimg / 1000))

        def end_flags(nimg_after=run.nimg + G):
            # Wall clocks differ across ranks: the time budget and the checkpoint are decided together (in the step's
            # one reduction), or one rank stops or enters checkpoint()'s barrier while the others wait in another
            # collective. A stop signal on any rank stops every rank after this same step (pmf.util.preempt).
            now = time.time()
            return (minutes is not None and now - t_start > minutes * 60,
                    nimg_after >= next_ckpt or now - last_ckpt_time > cfg.train.ckpt_every_minutes * 60,
                    stop.requested)

        try:
            res = train_step(net, opt, images_u8, labels, cfg, run.nimg, device, perceptual, loss_fn, run.strategy,
                             end_flags)
        except Exception as e:
            if is_out_of_memory(e):  # say what did not fit and what to turn, not just the allocator's line
                raise plan.out_of_memory_error(e, cfg, run.kwargs, world, device) from e
            raise
        run.nimg += G
        run.step += 1
        if res.finite:
            run.nonfinite_run = 0
            ema.update(net, G, run.nimg)
        else:
            run.nonfinite_run += 1
            run.nonfinite_total += 1
            dist.print0(f"non-finite step at {run.nimg / 1000:.2f} kimg (grad norm {res.grad_norm}); skipped "
                        f"({run.nonfinite_run} in a row)")
            if run.nonfinite_run >= cfg.train.max_nonfinite:
                stop_reason = f"{run.nonfinite_run} non-finite steps in a row"
                break
        window.append(res.metrics.get("loss", float("nan")))
        if pbar is not None:
            pbar.update(G)
            # --minutes: the bar ends where the time budget stops the run, if that comes before total_kimg.
            pbar.total = bar_total(total_nimg, run.nimg, nimg_loop, t_loop,
                                   None if minutes is None else t_start + minutes * 60, time.time())
            # loss_u (raw MSE of V against v_g) moves visibly; the adaptively weighted loss sits near its number of
            # terms by construction (each term is l / sg(l + eps)).
            pbar.set_postfix(loss_u=f"{res.metrics.get('loss_u', float('nan')):.4f}", step=run.step, refresh=False)
        if run.nimg >= next_log or run.nimg >= total_nimg:
            elapsed = time.time() - t_loop
            rec = {"kimg": run.nimg / 1000, "step": run.step, **res.metrics, "loss_avg": sum(window) / len(window),
                   "grad_norm": res.grad_norm, "lr": opt.param_groups[0]["lr"],
                   "img_per_s": (run.nimg - nimg_loop) / max(elapsed, 1e-9), "nonfinite_total": run.nonfinite_total,
                   "skipped_files": skipped_files(), "time_s": time.time() - t_start}
            if hasattr(loss_fn, "report"):  # train.compile: graphs compiled, recompiles, graph breaks
                rec.update({f"compile_{k}": v for k, v in loss_fn.report().items()})
            logger.log(rec)
            window, next_log = [], next_log_at(run.nimg, G, cfg.train.log_every_kimg * 1000)
        if world > 1 and cfg.train.consistency_check and run.nimg >= next_check:
            # Sharded strategies: only replicated tensors are compared; that the sharded gradients were
            # reduce-scattered is checked in every step's end-of-step reduction (Strategy.missing_gradients).
            dist.check_consistency(net, f"parameters at {run.nimg / 1000:.1f} kimg")
            next_check += cfg.train.check_every_kimg * 1000
        if run.nimg >= next_grid:
            run.grid(f"{run.nimg // 1000:06d}kimg", grid_classes)
            next_grid += cfg.train.sample_every_kimg * 1000
        time_up, ckpt_due, preempted = res.flags  # agreed on by all ranks in the step's reduction (end_flags)
        if preempted:  # the checkpoint and exports after the loop save this step
            stop_reason = f"preempted ({stop.signal_name or 'signal on another rank'})"
            break
        if time_up:  # the checkpoint after the loop saves this step
            stop_reason = "time budget"
            break
        if ckpt_due:
            run.checkpoint()
            last_ckpt_time = time.time()
            next_ckpt = run.nimg + cfg.train.ckpt_every_kimg * 1000
    if pbar is not None:
        pbar.close()
    if stop_reason == "done" and run.nonfinite_run > 0:  # reached the end, but its last steps trained nothing
        stop_reason = f"done, but the last {run.nonfinite_run} steps were non-finite"
    run.checkpoint()
    run.grid("latest", grid_classes)
    run.export()
    logger.close()
    if hasattr(loss_fn, "report"):
        summary["compile"] = loss_fn.report()
    return finish(run, summary, stop_reason, res, skipped_files(), t_start)


def finish(run: Run, summary: dict, stop_reason: str, res, skipped_files: int, t_start: float) -> dict:
    """summary.json and the closing lines: why the run stopped and what to do next."""
    summary.update({"kimg": run.nimg / 1000, "step": run.step, "stop_reason": stop_reason,
                    "exit_status": exit_status(stop_reason), "nonfinite_total": run.nonfinite_total,
                    "skipped_files": skipped_files,
                    "seconds": time.time() - t_start, "last_metrics": res.metrics if res is not None else {}})
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
