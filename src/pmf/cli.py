"""``pmf`` command line: train, sample, eval, toy, import-official. Parses text into typed values and calls the
library; no module below receives an argparse Namespace."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _load_net(checkpoint: str, ema: str | None = None, device: str = "cpu"):
    """A network from an export directory/file, or from a run directory (its ``export/`` folder, EMA chosen by
    ``ema``, default the run's ``sample.ema``). Returns (net, meta)."""
    from pmf.export import load_exported

    p = Path(checkpoint)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist (give a run directory or an export)")
    if p.is_dir() and (p / "export").is_dir():
        cfg = json.loads((p / "config.json").read_text()) if (p / "config.json").exists() else {}
        name = ema or cfg.get("sample", {}).get("ema") or "model"
        net, meta = load_exported(p / "export", name=name)
    elif p.is_dir():
        net, meta = load_exported(p, name=ema or "model")
    else:
        net, meta = load_exported(p)
    return net.to(device).eval(), meta


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
    from pmf.train.config import load_config
    from pmf.train.loop import train

    cfg = load_config(args.preset, args.config, args.set or [])
    train(cfg, args.run_dir, minutes=args.minutes, dry_run=args.dry_run, quiet=args.quiet,
          plan_devices=args.plan_devices, plan_device_memory=args.plan_device_memory)
    return 0


def cmd_sample(args) -> int:
    from pmf.images import to_uint8
    from pmf.images import save_grid, save_npz
    from pmf.sampler import noise_from_seeds, sample

    net, meta = _load_net(args.checkpoint, args.ema, args.device)
    net = _fast(net, args)
    omega = args.omega if args.omega is not None else meta.get("omega", 1.0)
    t_min, t_max = args.interval if args.interval else (meta.get("t_min", 0.0), meta.get("t_max", 1.0))
    noise_scale = meta.get("noise_scale", getattr(net, "noise_scale", 1.0))
    shape = (net.in_channels, net.input_size, net.input_size)
    classes = _class_list(args.classes, net.num_classes)
    out = Path(args.out)
    if args.num:
        n = args.num
        labels = torch.tensor([classes[i % len(classes)] for i in range(n)])  # class-balanced
    else:
        rows = args.rows
        n = rows * len(classes)
        labels = torch.tensor([classes[i % len(classes)] for i in range(n)])
    images = []
    for start in range(0, n, args.batch_size):
        idx = list(range(start, min(n, start + args.batch_size)))
        noise = noise_from_seeds([args.seed * 10**7 + i for i in idx], shape, noise_scale, args.device)
        x = sample(net, noise, labels[idx].to(args.device), args.steps, omega, t_min, t_max, args.instantaneous)
        images.append(to_uint8(x.float().cpu()))
    images = torch.cat(images)
    if out.suffix == ".npz":
        save_npz(out, images, labels)
    else:
        save_grid(images, out, nrow=len(classes), scale=max(1, 112 // net.input_size))
    print(f"wrote {n} samples ({args.steps} step(s), omega {omega}, interval [{t_min}, {t_max}]) to {out}")
    return 0


def cmd_eval(args) -> int:
    """Metrics of 1-, 2-, 4-step (``--steps``) samples: the Fashion-MNIST CNN distance and class accuracy (default),
    or Inception FID and IS against ``--ref-stats``. Runs under torchrun too (generation split over ranks)."""
    from pmf.train import dist
    from pmf.eval.generate import evaluate_generator
    from pmf.eval.metrics import setup_metric

    started = not torch.distributed.is_initialized()
    dist.init("cuda" if args.device.startswith("cuda") else "cpu")
    device = f"cuda:{dist.local_rank()}" if args.device == "cuda" and dist.world_size() > 1 else args.device
    try:
        net, meta = _load_net(args.checkpoint, args.ema, device)
        net = _fast(net, args)
        omega = args.omega if args.omega is not None else meta.get("omega", 1.0)
        t_min, t_max = args.interval if args.interval else (meta.get("t_min", 0.0), meta.get("t_max", 1.0))
        steps = [int(s) for tok in args.steps for s in str(tok).split(",") if s.strip()]  # "1 2 4" or "1,2,4"
        noise_scale = meta.get("noise_scale", 1.0)
        if args.extractor == "fmnist":
            from pmf.eval.fmnist import fmnist_metrics, get_fmnist_classifier

            n = args.num or 10_000
            if dist.is_main():
                get_fmnist_classifier()  # trains and caches it on first use, before the other ranks read it
            dist.barrier()
            res = fmnist_metrics(net, n=n, steps=steps, omega=omega, t_min=t_min, t_max=t_max,
                                 batch_size=args.batch_size, noise_scale=noise_scale, seed=args.seed, device=device,
                                 instantaneous=args.instantaneous)
        else:
            n = args.num or 50_000
            metric = setup_metric("inception", args.inception, args.ref_stats, device, args.batch_size)
            res = {"n": n, **evaluate_generator(net, metric, n, steps, noise_scale, omega, t_min, t_max,
                                                args.batch_size, args.seed, device,
                                                instantaneous=args.instantaneous), **metric.info}
        run_dir = Path(args.checkpoint)
        cfg = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
        ema = args.ema or cfg.get("sample", {}).get("ema") or "model"
        res.update({"extractor": args.extractor, "steps": steps, "omega": omega, "t_min": t_min, "t_max": t_max,
                    "ema": ema, "seed": args.seed, "sampler": "instantaneous" if args.instantaneous else "average"})
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
    """Reference statistics (mu, sigma) of real images in the Inception pool features, as an .npz."""
    from pmf.train import dist
    from pmf.eval.generate import reference_stats, save_ref_stats
    from pmf.eval.inception import load_inception

    if not Path(args.images).exists():
        raise FileNotFoundError(f"--images {args.images} does not exist (an image folder or an .npz of uint8 images)")
    started = not torch.distributed.is_initialized()
    dist.init("cuda" if args.device.startswith("cuda") else "cpu")
    device = f"cuda:{dist.local_rank()}" if args.device == "cuda" and dist.world_size() > 1 else args.device
    try:
        model = load_inception(args.inception, device=device)
        stats = reference_stats(args.images, model.features_and_logits, args.resolution, args.batch_size, args.num,
                                args.workers)
        mu, sigma = stats.mean_cov()
        if dist.is_main():
            save_ref_stats(args.out, mu, sigma, num=stats.count)
            print(f"wrote {args.out}: mu {mu.shape}, sigma {sigma.shape} from {stats.count:.0f} images of "
                  f"{args.images}")
    finally:
        if started:
            dist.shutdown()
    return 0


def cmd_guidance_search(args) -> int:
    """Grid over EMA x interval x omega on --num-search samples, then --num-final samples at the best point."""
    from pmf.train import dist
    from pmf.eval.metrics import setup_metric
    from pmf.eval.guidance_search import guidance_search, parse_interval

    started = not torch.distributed.is_initialized()
    dist.init("cuda" if args.device.startswith("cuda") else "cpu")
    device = f"cuda:{dist.local_rank()}" if args.device == "cuda" and dist.world_size() > 1 else args.device
    try:
        intervals = [parse_interval(t) for t in args.intervals]
        run_dir = Path(args.checkpoint)
        cfg = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
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
    from pmf.toy import toy_cli

    dims = tuple(int(d) for d in args.dims.split(",")) if args.dims else (2, 8, 16, 512)
    toy_cli(args.out, preset=args.preset, dims=dims, dataset=args.dataset, seed=args.seed, steps=args.steps)
    return 0


def cmd_import(args) -> int:
    from pmf.convert import import_official_main

    import_official_main(args.input, args.model, args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pmf", description="pixel MeanFlow: one-step image generation in pixels")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train or resume a run (rerun the same command to resume)")
    t.add_argument("--preset", help="named preset (pmf/configs/NAME.yaml), e.g. fmnist-demo")
    t.add_argument("--config", help="a YAML config file instead of a preset")
    t.add_argument("--run-dir", required=True, help="run directory (checkpoints, logs, grids, exports)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set train.batch_size=64")
    t.add_argument("--minutes", type=float, help="stop cleanly with a checkpoint after this much wall-clock time")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and run size, then exit")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--plan-devices", type=int, metavar="N",
                   help="--dry-run: plan for N devices (default: WORLD_SIZE, else 1)")
    t.add_argument("--plan-device-memory", type=float, metavar="GIB",
                   help="--dry-run: memory of one device in GiB (default: the visible GPU's, else this host's RAM)")
    t.set_defaults(fn=cmd_train)

    def guidance_args(q):
        q.add_argument("--checkpoint", required=True, help="run directory or export (.safetensors / directory)")
        q.add_argument("--ema", help="EMA copy to use, e.g. ema_hl500 (default: the run's sample.ema)")
        q.add_argument("--omega", type=float, help="guidance scale (default: the checkpoint's recommended one)")
        q.add_argument("--interval", type=float, nargs=2, metavar=("T_MIN", "T_MAX"), help="guidance interval")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        q.add_argument("--batch-size", type=int, default=256)
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
        q.add_argument("--ref-stats", help="reference statistics .npz (mu, sigma) for --extractor inception")

    e = sub.add_parser("eval", help="Frechet distance (Fashion-MNIST CNN, or Inception FID + IS) of 1/2/4-step samples")
    guidance_args(e)
    metric_args(e)
    e.add_argument("--num", type=int, help="number of samples (default 10000 fmnist, 50000 inception)")
    e.add_argument("--steps", nargs="+", default=["1", "2", "4"], help="step counts, e.g. --steps 1 2 4")
    e.add_argument("--out", help="write the metrics JSON here (default: RUN_DIR/metrics.json)")
    e.set_defaults(fn=cmd_eval)

    r = sub.add_parser("ref-stats", help="Inception reference statistics (mu, sigma) of real images as an .npz")
    r.add_argument("--images", required=True, help="image folder (ADM center crop) or .npz of uint8 images")
    r.add_argument("--out", required=True, help="output .npz")
    r.add_argument("--inception", help="FID Inception weights pt_inception-2015-12-05-6726825d.pth "
                   "(default: $PMF_INCEPTION)")
    r.add_argument("--resolution", type=int, default=256, help="center-crop size for an image folder")
    r.add_argument("--num", type=int, help="use only the first N images (sorted paths / archive order)")
    r.add_argument("--batch-size", type=int, default=250)
    r.add_argument("--workers", type=int, default=4, help="image decoding processes for a folder")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.set_defaults(fn=cmd_ref_stats)

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

    i = sub.add_parser("import-official", help="convert an official PyTorch checkpoint to our format")
    i.add_argument("input", help="official .pt file")
    i.add_argument("--model", required=True, help="size, e.g. pMF-B/16")
    i.add_argument("--out", required=True, help="output directory")
    i.set_defaults(fn=cmd_import)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"pmf {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
