"""One function per ``pmf`` subcommand: each turns its parsed arguments into typed values, checks them before any
work (:mod:`pmf.cli.session`) and calls the library; no module below receives an argparse Namespace."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pmf.cli.session import (at_least_one, check_ref_stats, check_sampling_args, dist_session, fast,
                             fmnist_classifier_ready, load_net, refuse, report, run_defaults)
from pmf.errors import PmfError


def cmd_train(args) -> int:
    from pmf.train.config import load_config
    from pmf.train.loop import train

    cfg = load_config(args.preset, args.config, args.set or [])
    with dist_session(None):  # train() joins the group under torchrun (its device is the config's); we leave it
        summary = train(cfg, args.run_dir, minutes=args.minutes, dry_run=args.dry_run, quiet=args.quiet,
                        restart=args.restart, plan_devices=args.plan_devices,
                        plan_device_memory=args.plan_device_memory, init_from=args.init_from)
    return summary.get("exit_status", 0)  # 3: stopped by non-finite steps; 75: stopped by a signal (pmf.errors)


def _class_list(classes: list[int] | None, num_classes: int) -> list[int]:
    if not classes:
        return list(range(num_classes))
    bad = [c for c in classes if not 0 <= c <= num_classes]
    if bad:
        raise ValueError(f"--classes {bad} out of range: labels are 0..{num_classes - 1} ({num_classes} = null)")
    return classes


def _sample_writer(out: Path, n: int, columns: int, C: int, R: int):
    """The output's streaming writer, batch by batch, so memory holds one batch whatever --num (the disk must hold
    the whole file): an .npz in the ADM layout (arr_0 uint8 N x H x W x C, arr_1 labels), else a PNG grid with one
    column per class."""
    from pmf.data.images import npz_archive_bytes, npz_sample_writer, png_grid_bytes, png_grid_writer
    from pmf.io.userfiles import check_free_space

    if out.suffix == ".npz":
        check_free_space(out, npz_archive_bytes(n, R, R, C), f"{n} samples of {R} x {R} x {C}")
        return npz_sample_writer(out, n, R, R, C)
    scale = max(1, 112 // R)
    check_free_space(out, png_grid_bytes(n, columns, C, R, R, scale), f"a grid of {n} samples")
    return png_grid_writer(out, n, columns, C, R, R, scale)


def cmd_sample(args) -> int:
    from pmf.data.images import to_uint8
    from pmf.method.sampler import SamplerSettings, noise_from_seeds, sample

    check_sampling_args(args, steps=args.steps, num=args.num)
    refuse(at_least_one(rows=args.rows))
    net, meta = load_net(args.checkpoint, args.ema, args.device)
    settings = SamplerSettings.from_meta(meta, args.omega, args.interval, args.instantaneous, net)
    net = fast(net, args)
    C, R = net.in_channels, net.input_size
    classes = _class_list(args.classes, net.num_classes)
    out = Path(args.out)
    n = args.num if args.num is not None else args.rows * len(classes)
    with _sample_writer(out, n, len(classes), C, R) as writer:
        for start in range(0, n, args.batch_size):
            idx = list(range(start, min(n, start + args.batch_size)))
            labels = torch.tensor([classes[i % len(classes)] for i in idx])  # class-balanced
            noise = noise_from_seeds([args.seed * 10**7 + i for i in idx], (C, R, R), settings.noise_scale,
                                     args.device)
            x = sample(net, noise, labels.to(args.device), args.steps, settings.omega, settings.t_min,
                       settings.t_max, args.instantaneous)
            if out.suffix == ".npz":
                writer.write(to_uint8(x.float().cpu()), labels)
            else:
                writer.write(to_uint8(x.float().cpu()))
    print(f"wrote {n} samples ({args.steps} step(s), omega {settings.omega}, interval [{settings.t_min}, "
          f"{settings.t_max}]) to {out}")
    return 0


def _eval_counts(args, run) -> tuple[int | None, int, list[int]]:
    """``(num, batch_size, steps)`` of ``pmf eval``: the flags, else the run's ``eval:`` section (set by its preset),
    else None (the extractor's count), 256 and 1 2 4."""
    from pmf.eval.generate import SEED_STRIDE

    num = args.num if args.num is not None else run.eval.get("num_samples")
    if num is not None and num > SEED_STRIDE:
        raise PmfError(f"--num={num} exceeds {SEED_STRIDE:,}: sample i is drawn from seed --seed * {SEED_STRIDE:,}"
                       " + i (pmf.eval.generate), so larger counts would repeat another seed's noise; evaluate fewer")
    batch_size = args.batch_size if args.batch_size is not None else run.eval.get("batch_size", 256)
    steps = [int(s) for s in (args.steps if args.steps is not None else run.eval.get("steps", [1, 2, 4]))]
    if not steps or min(steps) < 1:
        raise PmfError(f"--steps {' '.join(map(str, steps))}: every step count must be >= 1")
    return num, batch_size, steps


def cmd_eval(args) -> int:
    """Metrics of 1-, 2-, 4-step (``--steps``) samples: the Fashion-MNIST CNN distance and class accuracy (default),
    or Inception FID and IS against ``--ref-stats``. Runs under torchrun too (generation split over ranks)."""
    from pmf.eval.generate import evaluate_generator
    from pmf.eval.metrics import setup_metric
    from pmf.method.sampler import SamplerSettings

    check_sampling_args(args, num=args.num)
    run = run_defaults(args.checkpoint)
    num, batch_size, steps = _eval_counts(args, run)
    if args.extractor == "inception":
        check_ref_stats(args.ref_stats)
    with dist_session(args.device) as device:
        net, meta = load_net(args.checkpoint, args.ema, device)
        settings = SamplerSettings.from_meta(meta, args.omega, args.interval, args.instantaneous, net)
        net = fast(net, args)
        if args.extractor == "fmnist":
            from pmf.eval.fmnist import fmnist_metrics

            fmnist_classifier_ready()
            res = fmnist_metrics(net, n=num or 10_000, steps=steps, batch_size=batch_size, seed=args.seed,
                                 device=device, **settings.kwargs())
        else:
            metric = setup_metric("inception", args.inception, args.ref_stats, device, batch_size)
            res = {"n": num or 50_000, **evaluate_generator(net, metric, num or 50_000, steps, batch_size=batch_size,
                                                            seed=args.seed, device=device, **settings.kwargs()),
                   **metric.info}
        res.update({"extractor": args.extractor, "steps": steps, "omega": settings.omega, "t_min": settings.t_min,
                    "t_max": settings.t_max, "ema": run.ema_or(args.ema), "seed": args.seed,
                    "sampler": "instantaneous" if args.instantaneous else "average"})
        report(res, args.out or (Path(args.checkpoint) / "metrics.json" if run.config else None))
    return 0


def _archive_extractor(args):
    """``(extractor, reference)`` for ``pmf eval-samples``, each input checked before any feature is computed."""
    from pmf.eval.samples import fmnist_extractor_and_reference, inception_extractor, load_reference
    from pmf.io.userfiles import check_evaluation_memory, check_sample_archive

    if args.extractor == "fmnist":
        if args.ref_stats:
            raise ValueError("the fmnist extractor's reference is the Fashion-MNIST test set: drop --ref-stats")
        n_file = check_sample_archive(args.samples, "fmnist", (1,), 28)[0]  # before the CNN is trained or loaded
        check_evaluation_memory(min(n_file, args.num or n_file), 256)
        return fmnist_extractor_and_reference(args.device, args.batch_size)
    if not args.ref_stats:
        raise ValueError("--extractor inception needs a reference: --ref-stats NPZ (ADM's "
                         "VIRTUAL_imagenet256_labeled.npz, JiT's jit_in256_stats.npz, or `pmf ref-stats` output)")
    n_file = check_sample_archive(args.samples, "inception", (1, 3), None)[0]  # before any feature is computed
    check_evaluation_memory(min(n_file, args.num or n_file), 2048)
    check_ref_stats(args.ref_stats, None)  # readable, before the network is loaded
    extractor = inception_extractor(args.inception, args.device)
    check_ref_stats(args.ref_stats, extractor.feature_dim)  # its dimension, before any feature
    return extractor, load_reference(args.ref_stats, extractor, args.batch_size, args.device)


def cmd_eval_samples(args) -> int:
    """``pmf eval-samples --samples FILE.npz``: FID, sFID, IS, precision and recall of a sample archive, whatever
    made it (one process)."""
    from pmf.eval.samples import evaluate_samples

    refuse(at_least_one(num=args.num, batch_size=args.batch_size, k=args.k), args.device)
    extractor, reference = _archive_extractor(args)
    res = evaluate_samples(args.samples, extractor, reference, args.batch_size, args.num, k=args.k,
                           device=args.device)
    report({**res, "samples": str(args.samples)}, args.out)
    return 0


def cmd_ref_stats(args) -> int:
    """Reference statistics of real images in the Inception features, as an .npz: pool (mu, sigma) and spatial
    (mu_s, sigma_s) statistics and the pool features of the first --pr-num images (precision / recall)."""
    from pmf.eval.samples import inception_extractor, reference_from_source, save_reference
    from pmf.parallel import dist

    if not Path(args.images).exists():
        raise FileNotFoundError(f"--images {args.images} does not exist (an image folder or an .npz of uint8 images)")
    refuse(at_least_one(num=args.num, batch_size=args.batch_size, resolution=args.resolution), args.device)
    with dist_session(args.device) as device:
        extractor = inception_extractor(args.inception, device)
        ref = reference_from_source(args.images, extractor, args.resolution, args.batch_size, args.num, args.workers,
                                    keep=args.pr_num, device=device)
        if dist.is_main():
            save_reference(args.out, ref)
            kept = ref.features.shape[0] if ref.features is not None else 0
            print(f"wrote {args.out}: mu {ref.mu.shape}, sigma {ref.sigma.shape}, mu_s {ref.mu_s.shape}, sigma_s "
                  f"{ref.sigma_s.shape} from {ref.num:.0f} images of {args.images}; pool features of the first "
                  f"{kept} (precision / recall)")
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
    from pmf.eval.guidance_search import guidance_search
    from pmf.eval.metrics import setup_metric
    from pmf.method.sampler import sampling_problems

    intervals = [tuple(i) for i in args.interval] if args.interval else [(0.0, 1.0)]
    problems = [p for w in args.omegas for p in sampling_problems(omega=w)]
    problems += [p for lo, hi in intervals for p in sampling_problems(t_min=lo, t_max=hi)]
    refuse(problems + at_least_one(num_search=args.num_search, num_final=args.num_final, steps=args.steps,
                                   batch_size=args.batch_size), args.device)
    if args.extractor == "inception":
        check_ref_stats(args.ref_stats)
    with dist_session(args.device) as device:
        emas = args.emas or [run_defaults(args.checkpoint).ema]
        if args.extractor == "fmnist":
            fmnist_classifier_ready()
        metric = setup_metric(args.extractor, args.inception, args.ref_stats, device, args.batch_size)
        num_final = args.num_final or (10_000 if args.extractor == "fmnist" else 50_000)
        guidance_search(lambda name: load_net(args.checkpoint, name, device)[0], metric, emas, args.omegas,
                        intervals, args.num_search, num_final, args.out, steps=args.steps,
                        batch_size=args.batch_size, seed=args.seed, device=device)  # noise scale: the net's own
    return 0


def cmd_toy(args) -> int:
    from pmf.studies.toy import toy_cli

    toy_cli(args.out, preset=args.preset, dims=tuple(args.dims), dataset=args.dataset, seed=args.seed,
            steps=args.train_steps)
    return 0


def cmd_export(args) -> int:
    """Any --checkpoint (a run's EMA copy, a network folder, a Hub repo id) -> a network folder, or
    (``--format official-jax``) the official JAX tree as an Orbax checkpoint."""
    if args.format == "official-jax":
        from pmf.train.official_run import export_official

        path = export_official(args.checkpoint, args.out, args.ema)
        print(f"exported {args.checkpoint} -> {path} (Orbax, official TrainState tree)")
        return 0

    net, meta = load_net(args.checkpoint, args.ema)
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
        return import_official_jax_main(args.input, args.out, args.model, args.model_kwargs, args.preset, args.config,
                                        args.set or [], args.images_per_step)
    if args.model is None:
        raise PmfError("import-official of a .pt needs --model SIZE (e.g. --model pMF-B/16)")
    import_official_main(args.input, args.model, args.out)
    return 0


def cmd_ablate(args) -> int:
    from pmf.studies.ablate import SuiteSettings, dry_run, run_suite

    settings = SuiteSettings(kimg=tuple(args.kimg), eval_num=args.eval_num, jobs=args.jobs,
                             files=dict(args.weight_file or []), train=not args.report_only)
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
