"""``pmf`` command line: train, sample, eval, toy, import-official, export, ablate, prepare-data. Parses text into
typed values and calls the library; no module below receives an argparse Namespace.

Expected failures (bad settings or arguments, missing or damaged files, a busy run directory, a full disk, a missing
GPU) end with one line naming the file or key and the fix, and exit status 2; ``--debug`` prints the traceback too.
Unexpected exceptions keep their traceback. Exit statuses: :mod:`pmf.errors`, docs/robustness.md."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import traceback
import zipfile
from pathlib import Path

import torch

from pmf.errors import EXIT_USAGE, PmfError


def _load_net(checkpoint: str, ema: str | None = None, device: str = "cpu"):
    """``(net, meta)`` from any checkpoint form (:func:`pmf.train.load.load_checkpoint`); a damaged file is one line."""
    from safetensors import SafetensorError

    from pmf.method.pretrained import HubUnavailableError
    from pmf.train.load import load_checkpoint

    try:
        return load_checkpoint(checkpoint, ema, device)
    except (HubUnavailableError, FileNotFoundError, PmfError):
        raise  # already say what is missing and what to do
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise PmfError(f"cannot load the export {checkpoint} ({type(e).__name__}: {msg}); it is missing or damaged: "
                       "re-export it by rerunning `pmf train` on its run directory, or pick another --checkpoint / "
                       "--ema") from e


def _check_args(args, num=None) -> None:
    """Sampling arguments and the device, before any network is loaded (pmf.train.validate)."""
    from pmf.train.validate import ConfigError, device_problem
    from pmf.method.sampler import sampling_problems

    t_min, t_max = args.interval if getattr(args, "interval", None) else (None, None)
    steps = getattr(args, "steps", None)
    problems = sampling_problems(args.omega, t_min, t_max, steps if isinstance(steps, int) else None, num)
    if (why := device_problem(args.device, "--device")) is not None:
        problems.append(why)
    batch_size = getattr(args, "batch_size", None)
    if batch_size is not None and batch_size < 1:
        problems.append(f"--batch-size={batch_size} must be >= 1")
    if problems:
        raise ConfigError("; ".join(problems))


def _check_ref_stats(path, feature_dim: int | None = 2048) -> None:
    """--ref-stats must be readable and hold statistics of the extractor's features (default the Inception pool
    features, F = 2048; None: readability only), checked from the file's headers before any sample is generated or
    feature computed."""
    from pmf.io.userfiles import check_reference_file

    if path is None or not Path(path).exists():
        return  # setup_metric names a missing file itself, also before any sample is generated
    check_reference_file(path, feature_dim)


def _run_config(checkpoint: str) -> dict:
    """A run directory's resolved config (config.json; {} for other checkpoint forms); a damaged one is named."""
    from pmf.util.safe_load import read_json_object

    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        return {}
    return read_json_object(path, "the run's config")


def _fast(net, args):
    """The network wrapped for ``--precision`` / ``--compile`` (unchanged when neither is asked for)."""
    if args.precision == "fp32" and not args.compile:
        return net
    from pmf.train.speed import InferenceNet

    return InferenceNet(net, args.precision, args.compile)


def _class_list(text: str | None, num_classes: int) -> list[int]:
    if not text:
        return list(range(num_classes))
    classes = [int(c) for c in text.split(",") if c.strip()]
    bad = [c for c in classes if not 0 <= c <= num_classes]
    if bad:
        raise ValueError(f"--classes {bad} out of range: labels are 0..{num_classes - 1} ({num_classes} = null)")
    return classes


def cmd_train(args) -> int:
    from pmf.parallel import dist
    from pmf.train.config import load_config
    from pmf.train.loop import train

    cfg = load_config(args.preset, args.config, args.set or [])
    started = not torch.distributed.is_initialized()  # train() joins the group under torchrun; we leave it
    try:
        summary = train(cfg, args.run_dir, minutes=args.minutes, dry_run=args.dry_run, quiet=args.quiet,
                        restart=args.restart, plan_devices=args.plan_devices,
                        plan_device_memory=args.plan_device_memory, init_from=args.init_from)
    finally:
        if started:
            dist.shutdown()
    return summary.get("exit_status", 0)  # 3: stopped by non-finite steps; 75: stopped by a signal (pmf.errors)


def cmd_sample(args) -> int:
    args.batch_size = 256 if args.batch_size is None else args.batch_size
    from pmf.data.images import npz_archive_bytes, npz_sample_writer, png_grid_bytes, png_grid_writer, to_uint8
    from pmf.method.sampler import SamplerSettings, noise_from_seeds, sample
    from pmf.io.userfiles import check_free_space

    _check_args(args, num=args.num)
    if args.rows < 1:
        raise PmfError(f"--rows={args.rows} must be >= 1")
    net, meta = _load_net(args.checkpoint, args.ema, args.device)
    net = _fast(net, args)
    settings = SamplerSettings.from_meta(meta, args.omega, args.interval or None, args.instantaneous, net)
    omega, t_min, t_max, noise_scale = settings.omega, settings.t_min, settings.t_max, settings.noise_scale
    C, R = net.in_channels, net.input_size
    classes = _class_list(args.classes, net.num_classes)
    out = Path(args.out)
    n = args.num if args.num is not None else args.rows * len(classes)  # --num 0 is refused by _check_args
    # Both outputs are written batch by batch (an .npz in the ADM layout: arr_0 uint8 N x H x W x C, arr_1 labels; a
    # grid row of images by row), so memory holds one batch whatever --num; the disk must hold the whole file.
    scale = max(1, 112 // R)
    if out.suffix == ".npz":
        check_free_space(out, npz_archive_bytes(n, R, R, C), f"{n} samples of {R} x {R} x {C}")
        writer_cm = npz_sample_writer(out, n, R, R, C)
    else:
        check_free_space(out, png_grid_bytes(n, len(classes), C, R, R, scale), f"a grid of {n} samples")
        writer_cm = png_grid_writer(out, n, len(classes), C, R, R, scale)
    with writer_cm as writer:
        for start in range(0, n, args.batch_size):
            idx = list(range(start, min(n, start + args.batch_size)))
            labels = torch.tensor([classes[i % len(classes)] for i in idx])  # class-balanced
            noise = noise_from_seeds([args.seed * 10**7 + i for i in idx], (C, R, R), noise_scale, args.device)
            x = sample(net, noise, labels.to(args.device), args.steps, omega, t_min, t_max, args.instantaneous)
            batch = to_uint8(x.float().cpu())
            if out.suffix == ".npz":
                writer.write(batch, labels)
            else:
                writer.write(batch)
    print(f"wrote {n} samples ({args.steps} step(s), omega {omega}, interval [{t_min}, {t_max}]) to {out}")
    return 0


def cmd_eval_samples(args) -> int:
    """``pmf eval --samples FILE.npz``: FID, sFID, IS, precision and recall of a sample archive (one process)."""
    args.batch_size = 256 if args.batch_size is None else args.batch_size
    from pmf.eval.samples import evaluate_samples, fmnist_extractor_and_reference, inception_extractor, load_reference
    from pmf.io.userfiles import check_evaluation_memory, check_sample_archive

    if args.checkpoint:
        raise ValueError("give either --samples (evaluate a sample file) or --checkpoint (generate), not both")
    if args.extractor == "fmnist":
        if args.ref_stats:
            raise ValueError("the fmnist extractor's reference is the Fashion-MNIST test set: drop --ref-stats")
        n_file = check_sample_archive(args.samples, "fmnist", (1,), 28)[0]  # before the CNN is trained or loaded
        check_evaluation_memory(min(n_file, args.num or n_file), 256)
        extractor, reference = fmnist_extractor_and_reference(args.device, args.batch_size)
    else:
        if not args.ref_stats:
            raise ValueError("--extractor inception needs a reference: --ref-stats NPZ (ADM's "
                             "VIRTUAL_imagenet256_labeled.npz, JiT's jit_in256_stats.npz, or `pmf ref-stats` output)")
        n_file = check_sample_archive(args.samples, "inception", (1, 3), None)[0]  # before any feature is computed
        check_evaluation_memory(min(n_file, args.num or n_file), 2048)
        _check_ref_stats(args.ref_stats, None)  # readable, before the network is loaded
        extractor = inception_extractor(args.inception, args.device)
        _check_ref_stats(args.ref_stats, extractor.feature_dim)  # its dimension, before any feature
        reference = load_reference(args.ref_stats, extractor, args.batch_size, args.device)
    res = evaluate_samples(args.samples, extractor, reference, args.batch_size, args.num, k=args.k,
                           device=args.device)
    res["samples"] = str(args.samples)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def cmd_eval(args) -> int:
    """Metrics of 1-, 2-, 4-step (``--steps``) samples: the Fashion-MNIST CNN distance and class accuracy (default),
    or Inception FID and IS against ``--ref-stats``. Runs under torchrun too (generation split over ranks). With
    ``--samples FILE.npz`` it evaluates a stored sample archive instead (:func:`cmd_eval_samples`)."""
    if args.samples:
        return cmd_eval_samples(args)
    if not args.checkpoint:
        raise ValueError("give --checkpoint (a run or export to sample from) or --samples FILE.npz")
    from pmf.parallel import dist
    from pmf.eval.generate import SEED_STRIDE, evaluate_generator
    from pmf.eval.metrics import setup_metric
    from pmf.method.sampler import SamplerSettings

    _check_args(args, num=args.num)
    # a run directory's `eval:` section (pmf.train.config.EvalConfig, set by its preset) gives the defaults
    eval_cfg = _run_config(args.checkpoint).get("eval", {})
    args.num = args.num if args.num is not None else eval_cfg.get("num_samples")
    if args.num is not None and args.num > SEED_STRIDE:
        raise PmfError(f"--num={args.num} exceeds {SEED_STRIDE:,}: sample i is drawn from seed --seed * {SEED_STRIDE:,}"
                       " + i (pmf.eval.generate), so larger counts would repeat another seed's noise; evaluate fewer")
    args.batch_size = args.batch_size if args.batch_size is not None else eval_cfg.get("batch_size", 256)
    step_tokens = args.steps if args.steps is not None else eval_cfg.get("steps", [1, 2, 4])
    steps = [int(s) for tok in step_tokens for s in str(tok).split(",") if s.strip()]  # "1 2 4" or "1,2,4"
    if not steps or min(steps) < 1:
        raise PmfError(f"--steps {' '.join(map(str, step_tokens))}: every step count must be >= 1")
    if args.extractor == "inception":
        _check_ref_stats(args.ref_stats)
    started = not torch.distributed.is_initialized()
    dist.init("cuda" if args.device.startswith("cuda") else "cpu")
    device = f"cuda:{dist.local_rank()}" if args.device == "cuda" and dist.world_size() > 1 else args.device
    try:
        net, meta = _load_net(args.checkpoint, args.ema, device)
        net = _fast(net, args)
        settings = SamplerSettings.from_meta(meta, args.omega, args.interval or None, args.instantaneous, net)
        if args.extractor == "fmnist":
            from pmf.eval.fmnist import fmnist_metrics, get_fmnist_classifier

            n = args.num or 10_000
            if dist.is_main():
                get_fmnist_classifier()  # trains and caches it on first use, before the other ranks read it
            dist.barrier()
            res = fmnist_metrics(net, n=n, steps=steps, batch_size=args.batch_size, seed=args.seed, device=device,
                                 **settings.kwargs())
        else:
            n = args.num or 50_000
            metric = setup_metric("inception", args.inception, args.ref_stats, device, args.batch_size)
            res = {"n": n, **evaluate_generator(net, metric, n, steps, batch_size=args.batch_size, seed=args.seed,
                                                device=device, **settings.kwargs()), **metric.info}
        run_dir = Path(args.checkpoint)
        cfg = _run_config(args.checkpoint)
        ema = args.ema or cfg.get("sample", {}).get("ema") or "model"
        res.update({"extractor": args.extractor, "steps": steps, "omega": settings.omega, "t_min": settings.t_min,
                    "t_max": settings.t_max, "ema": ema, "seed": args.seed,
                    "sampler": "instantaneous" if args.instantaneous else "average"})
        if dist.is_main():
            text = json.dumps(res, indent=2)
            print(text)
            if args.out:
                Path(args.out).write_text(text + "\n")
            elif cfg:
                (run_dir / "metrics.json").write_text(text + "\n")
    finally:
        if started:
            dist.shutdown()
    return 0


def cmd_ref_stats(args) -> int:
    """Reference statistics of real images in the Inception features, as an .npz: pool (mu, sigma) and spatial
    (mu_s, sigma_s) statistics and the pool features of the first --pr-num images (precision / recall)."""
    from pmf.parallel import dist
    from pmf.eval.samples import inception_extractor, reference_from_source, save_reference

    from pmf.train.validate import ConfigError, device_problem

    if not Path(args.images).exists():
        raise FileNotFoundError(f"--images {args.images} does not exist (an image folder or an .npz of uint8 images)")
    problems = [f"--{k.replace('_', '-')}={v} must be >= 1" for k, v in
                (("num", args.num), ("batch_size", args.batch_size), ("resolution", args.resolution)) if v is not None
                and v < 1]
    if (why := device_problem(args.device, "--device")) is not None:
        problems.append(why)
    if problems:
        raise ConfigError("; ".join(problems))
    started = not torch.distributed.is_initialized()
    dist.init("cuda" if args.device.startswith("cuda") else "cpu")
    device = f"cuda:{dist.local_rank()}" if args.device == "cuda" and dist.world_size() > 1 else args.device
    try:
        extractor = inception_extractor(args.inception, device)
        ref = reference_from_source(args.images, extractor, args.resolution, args.batch_size, args.num, args.workers,
                                    keep=args.pr_num, device=device)
        if dist.is_main():
            save_reference(args.out, ref)
            kept = ref.features.shape[0] if ref.features is not None else 0
            print(f"wrote {args.out}: mu {ref.mu.shape}, sigma {ref.sigma.shape}, mu_s {ref.mu_s.shape}, sigma_s "
                  f"{ref.sigma_s.shape} from {ref.num:.0f} images of {args.images}; pool features of the first "
                  f"{kept} (precision / recall)")
    finally:
        if started:
            dist.shutdown()
    return 0


def cmd_prepare_data(args) -> int:
    """ImageFolder -> ADM-center-cropped uint8 shards + dataset.json (pmf.data.prepare)."""
    from pmf.data.prepare import prepare_data

    if args.check:  # verify --out against its manifest; writes nothing
        from pmf.data.shards import check_shards

        r = check_shards(args.out)
        print(f"{args.out}: {r['shards']} shards, {r['images']} images, {r['bytes'] / 1e6:.1f} MB: every SHA-256 "
              "matches the manifest")
        return 0
    missing = [flag for flag, value in (("--source", args.source), ("--resolution", args.resolution)) if value is None]
    if missing:
        raise PmfError(f"prepare-data needs {' and '.join(missing)} (only --check goes without them)")
    from pmf.data.sources import SourceOptions

    m = prepare_data(args.source, args.out, args.resolution, workers=args.workers, shard_size=args.shard_size,
                     quiet=args.quiet, source_options=SourceOptions(args.image_column, args.label_column, args.split))
    print(f"{args.out}: {m['num_images']} images, {m['num_classes']} classes, {len(m['shards'])} shards at "
          f"{m['resolution']} px; {m['num_skipped']} files skipped ({m['num_unreadable']} unreadable)")
    return 0


def cmd_guidance_search(args) -> int:
    """Grid over EMA x interval x omega on --num-search samples, then --num-final samples at the best point."""
    args.batch_size = 256 if args.batch_size is None else args.batch_size
    from pmf.parallel import dist
    from pmf.eval.metrics import setup_metric
    from pmf.eval.guidance_search import guidance_search, parse_interval
    from pmf.train.validate import ConfigError, device_problem
    from pmf.method.sampler import sampling_problems

    problems = [p for w in args.omegas for p in sampling_problems(omega=w)]
    for text in args.intervals:
        try:
            lo, hi = parse_interval(text)
        except ValueError as e:
            problems.append(f"--intervals {text}: {e}")
            continue
        problems += [p.replace("--interval", f"--intervals {text}:") for p in sampling_problems(t_min=lo, t_max=hi)]
    problems += [f"--{k.replace('_', '-')}={v} must be >= 1" for k, v in
                 (("num_search", args.num_search), ("num_final", args.num_final), ("steps", args.steps),
                  ("batch_size", args.batch_size)) if v is not None and v < 1]
    if (why := device_problem(args.device, "--device")) is not None:
        problems.append(why)
    if problems:
        raise ConfigError("; ".join(problems))
    if args.extractor == "inception":
        _check_ref_stats(args.ref_stats)
    started = not torch.distributed.is_initialized()
    dist.init("cuda" if args.device.startswith("cuda") else "cpu")
    device = f"cuda:{dist.local_rank()}" if args.device == "cuda" and dist.world_size() > 1 else args.device
    try:
        intervals = [parse_interval(t) for t in args.intervals]
        cfg = _run_config(args.checkpoint)
        emas = args.emas or [cfg.get("sample", {}).get("ema") or "model"]
        if args.extractor == "fmnist":
            from pmf.eval.fmnist import get_fmnist_classifier

            if dist.is_main():
                get_fmnist_classifier()  # trains and caches it on first use, before the other ranks read it
            dist.barrier()
        metric = setup_metric(args.extractor, args.inception, args.ref_stats, device, args.batch_size)
        num_final = args.num_final or (10_000 if args.extractor == "fmnist" else 50_000)
        guidance_search(lambda name: _load_net(args.checkpoint, name, device)[0], metric, emas, args.omegas,
                        intervals, args.num_search, num_final, args.out, steps=args.steps,
                        batch_size=args.batch_size, seed=args.seed, device=device)  # noise scale: the net's own
    finally:
        if started:
            dist.shutdown()
    return 0


def cmd_toy(args) -> int:
    from pmf.studies.toy import toy_cli

    dims = tuple(int(d) for d in args.dims.split(",")) if args.dims else (2, 8, 16, 512)
    toy_cli(args.out, preset=args.preset, dims=dims, dataset=args.dataset, seed=args.seed, steps=args.steps)
    return 0


def cmd_export(args) -> int:
    """Any --checkpoint (a run's EMA copy, a network folder, a Hub repo id) -> a network folder, or
    (``--format official-jax``) the official JAX tree as an Orbax checkpoint."""
    if args.format == "official-jax":
        from pmf.train.official_run import export_official

        path = export_official(args.checkpoint, args.out, args.ema)
        print(f"exported {args.checkpoint} -> {path} (Orbax, official TrainState tree)")
        return 0

    net, meta = _load_net(args.checkpoint, args.ema)
    run = Path(args.checkpoint)
    if (run / "export").is_dir():  # a training run: say which weights these are
        kimg = meta.get("kimg")
        meta = {**meta, "source": f"run '{run.resolve().name}', weights '{meta['ema']}'"
                + (f" after {kimg:g} kimg" if isinstance(kimg, (int, float)) else "")}
    net.save_pretrained(args.out, meta=meta)
    print(f"exported {args.checkpoint} ({meta.get('model') or 'PMFDiT'}, weights {meta.get('ema', 'model')}) -> "
          f"{args.out} (config.json, model.safetensors, README.md)")
    return 0


def cmd_import(args) -> int:
    from pmf.io.convert import import_official_main
    from pmf.train.official_run import import_official_jax_main, is_orbax_input

    if is_orbax_input(args.input):
        return import_official_jax_main(args)
    if args.model is None:
        raise PmfError("import-official of a .pt needs --model SIZE (e.g. --model pMF-B/16)")
    import_official_main(args.input, args.model, args.out)
    return 0


def cmd_ablate(args) -> int:
    from pmf.studies.ablate import SuiteSettings, dry_run, run_suite

    files = dict(kv.split("=", 1) for kv in args.set or [])
    settings = SuiteSettings(kimg=tuple(args.kimg), eval_num=args.eval_num, jobs=args.jobs, files=files,
                             train=not args.report_only)
    if args.dry_run:
        arms = dry_run(args.suite, settings, args.only)
        print(json.dumps({"arms": arms, "est_cpu_minutes": round(sum(a["est_cpu_minutes"] for a in arms), 1)},
                         indent=2))
        return 0
    if args.jobs > 1:
        torch.set_num_threads(1)  # evaluation runs in this process, one thread per job
    run_suite(args.suite, args.out, settings, args.only)
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def add_official_jax_args(q) -> None:
    """import-official's options for an official JAX (Orbax) checkpoint."""
    q.add_argument("--model-kwargs", metavar="JSON", help="the official pmfDiT constructor kwargs, e.g. "
                   "'{\"hidden_size\": 768, \"depth\": 16, ...}' (any size; overrides --model's)")
    q.add_argument("--preset", help="Orbax: write a run directory for this training preset (as pmf train --preset)")
    q.add_argument("--config", help="Orbax: ... or this YAML config")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="Orbax: ... with these overrides")
    q.add_argument("--images-per-step", type=int, default=1024, help="Orbax run: images per official step (the "
                   "official global batch, 1024); images seen = step x this")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pmf", description="pixel MeanFlow: one-step image generation in pixels")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train or resume a run (rerun the same command to resume)")
    t.add_argument("--preset", help="named preset (pmf/configs/NAME.yaml), e.g. fmnist-demo")
    t.add_argument("--config", help="a YAML config file instead of a preset")
    t.add_argument("--run-dir", required=True, help="run directory (checkpoints, logs, grids, exports)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set train.batch_size=64")
    t.add_argument("--minutes", type=float, help="stop cleanly with a checkpoint after this much wall-clock time")
    t.add_argument("--init-from", metavar="DIR", help="a new run starts from these weights and EMA copies: an "
                   "official Orbax checkpoint or a pmf run directory (optimizer and counters start fresh)")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and run size, then exit")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--restart", action="store_true",
                   help="train again from step 0 in a run directory that has a log, exports or states (the old log "
                        "and states are moved aside, the exports overwritten)")
    t.add_argument("--plan-devices", type=int, metavar="N",
                   help="--dry-run: plan for N devices (default: WORLD_SIZE, else 1)")
    t.add_argument("--plan-device-memory", type=float, metavar="GIB",
                   help="--dry-run: memory of one device in GiB (default: the visible GPU's, else this host's RAM)")
    t.set_defaults(fn=cmd_train)

    def guidance_args(q, checkpoint_required: bool = True):
        q.add_argument("--checkpoint", required=checkpoint_required,
                       help="run directory, network folder (config.json + model.safetensors) or Hub repo id")
        q.add_argument("--ema", help="EMA copy to use, e.g. ema_hl500 (default: the run's sample.ema)")
        q.add_argument("--omega", type=float, help="guidance scale (default: the checkpoint's recommended one)")
        q.add_argument("--interval", type=float, nargs=2, metavar=("T_MIN", "T_MAX"), help="guidance interval")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        q.add_argument("--batch-size", type=int, help="images per batch (default 256; pmf eval of a run: its "
                       "eval.batch_size)")
        q.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                       help="bf16: autocast the network (faster on GPUs and CPUs with native bf16 matmuls)")
        q.add_argument("--compile", action="store_true",
                       help="torch.compile the network with weight freezing (eager fallback on failure)")
        q.add_argument("--instantaneous", action="store_true",
                       help="Euler steps with the instantaneous velocity v = u(z, t, t) (h = 0) instead of the "
                            "average velocity: the flow-matching sampler (use many --steps)")

    s = sub.add_parser("sample", help="sample a PNG grid or an NPZ of class-balanced samples")
    guidance_args(s)
    s.add_argument("--steps", type=int, default=1, help="number of steps (1 = one network evaluation)")
    s.add_argument("--classes", help="comma-separated class ids (default: all)")
    s.add_argument("--rows", type=int, default=8, help="grid rows (samples per class)")
    s.add_argument("--num", type=int, help="number of samples for an .npz archive")
    s.add_argument("--out", default="grid.png", help="grid.png, or FILE.npz with --num")
    s.set_defaults(fn=cmd_sample)

    def metric_args(q):
        q.add_argument("--extractor", default="fmnist", choices=["fmnist", "inception"],
                       help="fmnist: Fashion-MNIST CNN distance + class accuracy; inception: FID + IS (ImageNet)")
        q.add_argument("--inception", help="FID Inception weights pt_inception-2015-12-05-6726825d.pth "
                       "(default: $PMF_INCEPTION)")
        q.add_argument("--ref-stats", help="reference .npz for --extractor inception: statistics (mu, sigma; also "
                       "mu_s, sigma_s and features from `pmf ref-stats`; JiT's jit_in256_stats.npz) or an ADM "
                       "reference batch (VIRTUAL_imagenet256_labeled.npz: images arr_0 plus mu/sigma/mu_s/sigma_s)")

    e = sub.add_parser("eval", help="Frechet distance (Fashion-MNIST CNN, or Inception FID + IS) of 1/2/4-step samples; "
                       "with --samples FILE.npz: FID, sFID, IS, precision and recall of a sample archive")
    guidance_args(e, checkpoint_required=False)
    metric_args(e)
    e.add_argument("--samples", help="evaluate this sample archive (.npz: arr_0 uint8 N x H x W x C, optional arr_1 "
                   "labels; or images / labels) instead of generating: FID, sFID, IS, precision, recall")
    e.add_argument("--k", type=int, default=3, help="--samples: k of the k-NN manifolds of precision / recall")
    e.add_argument("--num", type=int, help="number of samples (default 10000 fmnist, 50000 inception; --samples: "
                   "the whole file)")
    e.add_argument("--steps", nargs="+", help="step counts, e.g. --steps 1 2 4 (default: the run's eval.steps, else "
                   "1 2 4)")
    e.add_argument("--out", help="write the metrics JSON here (default: RUN_DIR/metrics.json)")
    e.set_defaults(fn=cmd_eval)

    r = sub.add_parser("ref-stats", help="Inception reference statistics of real images as an .npz: mu, sigma (FID), "
                       "mu_s, sigma_s (sFID), features (precision / recall)")
    r.add_argument("--images", required=True, help="image folder (ADM center crop) or .npz of uint8 images")
    r.add_argument("--out", required=True, help="output .npz")
    r.add_argument("--inception", help="FID Inception weights pt_inception-2015-12-05-6726825d.pth "
                   "(default: $PMF_INCEPTION)")
    r.add_argument("--resolution", type=int, default=256, help="center-crop size for an image folder")
    r.add_argument("--num", type=int, help="use only the first N images (sorted paths / archive order)")
    r.add_argument("--batch-size", type=int, default=250)
    r.add_argument("--pr-num", type=int, default=10_000,
                   help="keep the pool features of the first N images for precision / recall (ADM: 10000; 0: none)")
    r.add_argument("--workers", type=int, default=4, help="image decoding processes for a folder")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.set_defaults(fn=cmd_ref_stats)

    d = sub.add_parser("prepare-data", help="ImageFolder -> center-cropped uint8 shards for data.dataset=shards")
    d.add_argument("--source", help="(required unless --check) image folder with one subfolder per class (e.g. ImageNet train), "
                   "a Hugging Face datasets folder (.parquet / .arrow), an EDM2 .zip, or WebDataset .tar shards")
    d.add_argument("--image-column", help="Hugging Face source: the image column (default: found by type and name)")
    d.add_argument("--label-column", help="Hugging Face source: the class-label column (default: found by name)")
    d.add_argument("--split", default="train", help="Hugging Face source: the split read when file names mark splits")
    d.add_argument("--resolution", type=int, help="(required unless --check) ADM center-crop size R (256, 512, ...)")
    d.add_argument("--out", required=True, help="output directory (rerun the same command to resume)")
    d.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding processes")
    d.add_argument("--shard-size", type=int, default=1000, help="source files per shard (one .npy each)")
    d.add_argument("--quiet", action="store_true", help="no progress line")
    d.add_argument("--check", action="store_true", help="only verify --out: every shard's SHA-256 against "
                   "dataset.json (exit 2 naming any damaged or altered file)")
    d.set_defaults(fn=cmd_prepare_data)

    g = sub.add_parser("guidance-search", help="grid over omega x interval x EMA, then the full count at the best")
    g.add_argument("--checkpoint", required=True, help="run directory or export")
    metric_args(g)
    g.add_argument("--omegas", type=float, nargs="+", required=True, help="guidance scales, e.g. 1 2 3 4")
    g.add_argument("--intervals", nargs="+", default=["0.0,1.0"], help="T_MIN,T_MAX pairs, e.g. 0.0,1.0 0.1,0.8")
    g.add_argument("--emas", nargs="+", help="EMA copies, e.g. ema_hl500 model (default: the run's sample.ema)")
    g.add_argument("--num-search", type=int, default=5000, help="samples per grid point")
    g.add_argument("--num-final", type=int, help="samples at the best point (default 10000 fmnist, 50000 inception)")
    g.add_argument("--steps", type=int, default=1, help="sampling steps")
    g.add_argument("--out", required=True, help="output directory (search.json, search.csv, search.png)")
    g.add_argument("--seed", type=int, default=0, help="search seed; the final run uses seed + 1")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--batch-size", type=int, default=256)
    g.set_defaults(fn=cmd_guidance_search)

    y = sub.add_parser("toy", help="the paper's toy study: x- vs u-prediction as the dimension grows")
    y.add_argument("--out", required=True)
    y.add_argument("--preset", default="quick", choices=["quick", "paper"], help="quick: ~6 min on 2 cores")
    y.add_argument("--dims", help="comma-separated ambient dimensions (default 2,8,16,512)")
    y.add_argument("--dataset", default="swiss_roll", help="swiss_roll | 8gaussians | checkerboard")
    y.add_argument("--steps", type=int, help="override the preset's number of training steps")
    y.add_argument("--seed", type=int, default=0)
    y.set_defaults(fn=cmd_toy)

    i = sub.add_parser("import-official", help="convert an official checkpoint: a PyTorch .pt to the Hugging Face "
                       "layout; a JAX (Orbax) checkpoint to exports, or to a run directory that pmf train continues")
    i.add_argument("input", help="official .pt file, or an Orbax checkpoint_<step> directory (its workdir, or a .zip)")
    i.add_argument("--model", help="size, e.g. pMF-B/16 (a .pt needs it; an Orbax checkpoint needs it or "
                   "--model-kwargs)")
    i.add_argument("--out", required=True, help=".pt: output directory (config.json, model.safetensors, README.md); "
                   "Orbax: an export directory, or with --preset/--config/--set a run directory")
    add_official_jax_args(i)
    i.set_defaults(fn=cmd_import)

    x = sub.add_parser("export", help="save any checkpoint (e.g. a run's EMA copy) in the Hugging Face layout")
    x.add_argument("--checkpoint", required=True, help="run directory, network folder or Hub repo id")
    x.add_argument("--ema", help="weights to export, e.g. ema_hl500 (default: the run's sample.ema)")
    x.add_argument("--out", required=True, help="output directory (config.json, model.safetensors, README.md)")
    x.add_argument("--format", default="hf", choices=["hf", "official-jax"], help="hf: the Hugging Face layout; "
                   "official-jax: an Orbax checkpoint_<step>/ of the official JAX TrainState (docs/hub.md)")
    x.set_defaults(fn=cmd_export)

    a = sub.add_parser("ablate", help="the paper's ablations, small: arms x seeds, a table and a figure per claim")
    a.add_argument("--suite", default="paper", help="declared list of arms (pmf.studies.ablate.SUITES)")
    a.add_argument("--out", required=True, help="output directory (runs/, report.md, claim*.png, results.json)")
    a.add_argument("--kimg", type=float, nargs="+", default=[30.0], metavar="KIMG",
                   help="training images per run, in thousands; several budgets (e.g. 30 60 120) continue each run "
                        "from one to the next, every run reaching a budget before any goes past it, and each is "
                        "evaluated")
    a.add_argument("--eval-num", type=int, default=10_000, help="samples per evaluation")
    a.add_argument("--jobs", type=int, default=1, help="runs side by side, one thread each")
    a.add_argument("--only", nargs="+", help="arm names or claim numbers to run, worked in this order at each budget")
    a.add_argument("--set", action="append", metavar="KEY=PATH", help="perceptual weight files, e.g. "
                   "perceptual.lpips_vgg_path=vgg16-397923af.pth")
    a.add_argument("--dry-run", action="store_true", help="list the arms, overrides and estimated CPU time")
    a.add_argument("--report-only", action="store_true",
                   help="train and evaluate nothing: write the report from the evaluations already in --out")
    a.set_defaults(fn=cmd_ablate)

    for sp in sub.choices.values():
        sp.add_argument("--debug", action="store_true", help="print the traceback of an expected error too")
    return p


def _expected_errors() -> tuple:
    """Exception types that mean bad input or a bad environment, not a bug: reported in one line."""
    from safetensors import SafetensorError

    import pickle

    import yaml

    # pickles refused by torch.load(weights_only=True), YAML that is not plain data: pmf.io.userfiles names the file
    # where it reads one; these catch any reader that does not
    return (PmfError, ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile, SafetensorError,
            pickle.UnpicklingError, yaml.YAMLError)


def error_line(e: BaseException) -> str:
    """One line for an expected failure: what and where (file, key), and the fix."""
    if isinstance(e, KeyError) and e.args:
        text = str(e.args[0])
    elif isinstance(e, OSError) and e.errno is not None:
        where = e.filename or ""
        hint = {errno.ENOSPC: "free disk space or choose another directory",
                errno.EDQUOT: "free space within your quota or choose another directory",
                errno.EACCES: "check the permissions, or choose another path",
                errno.EPERM: "check the permissions, or choose another path",
                errno.EROFS: "the filesystem is read-only: choose another path",
                errno.ENOENT: "check the path",
                errno.EFBIG: "the file exceeds a size limit (ulimit -f): raise it or free space"}.get(e.errno, "")
        text = f"{e.strerror or e}" + (f": {where}" if where else "") + (f" ({hint})" if hint else "")
    else:
        text = str(e) or type(e).__name__
        if isinstance(e, (EOFError, zipfile.BadZipFile)):
            text = f"a file is truncated or not the expected archive ({type(e).__name__}: {text})"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("PMF_DEBUG") == "1"
    try:
        return args.fn(args)
    except _expected_errors() as e:
        if debug:
            traceback.print_exc()
        print(f"pmf {args.command}: error: {error_line(e)}" + ("" if debug else " (--debug for the traceback)"),
              file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
