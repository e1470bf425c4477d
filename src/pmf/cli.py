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
    from pmf.checkpoint import load_exported

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


def _class_list(text: str | None, num_classes: int) -> list[int]:
    if not text:
        return list(range(num_classes))
    classes = [int(c) for c in text.split(",") if c.strip()]
    bad = [c for c in classes if not 0 <= c <= num_classes]
    if bad:
        raise ValueError(f"--classes {bad} out of range: labels are 0..{num_classes - 1} ({num_classes} = null)")
    return classes


def cmd_train(args) -> int:
    from pmf.config import load_config
    from pmf.train import train

    cfg = load_config(args.preset, args.config, args.set or [])
    train(cfg, args.run_dir, minutes=args.minutes, dry_run=args.dry_run, quiet=args.quiet)
    return 0


def cmd_sample(args) -> int:
    from pmf.data import to_uint8
    from pmf.images import save_grid, save_npz
    from pmf.sampler import noise_from_seeds, sample

    net, meta = _load_net(args.checkpoint, args.ema, args.device)
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
        x = sample(net, noise, labels[idx].to(args.device), args.steps, omega, t_min, t_max)
        images.append(to_uint8(x.float().cpu()))
    images = torch.cat(images)
    if out.suffix == ".npz":
        save_npz(out, images, labels)
    else:
        save_grid(images, out, nrow=len(classes), scale=max(1, 112 // net.input_size))
    print(f"wrote {n} samples ({args.steps} step(s), omega {omega}, interval [{t_min}, {t_max}]) to {out}")
    return 0


def cmd_eval(args) -> int:
    from pmf.classifier import fmnist_metrics

    net, meta = _load_net(args.checkpoint, args.ema, args.device)
    omega = args.omega if args.omega is not None else meta.get("omega", 1.0)
    t_min, t_max = args.interval if args.interval else (meta.get("t_min", 0.0), meta.get("t_max", 1.0))
    steps = [int(s) for s in args.steps.split(",")]
    res = fmnist_metrics(net, n=args.num, steps=steps, omega=omega, t_min=t_min, t_max=t_max,
                         batch_size=args.batch_size, noise_scale=meta.get("noise_scale", 1.0), seed=args.seed)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    elif Path(args.checkpoint).is_dir() and (Path(args.checkpoint) / "config.json").exists():
        (Path(args.checkpoint) / "metrics.json").write_text(text + "\n")
    return 0


def cmd_toy(args) -> int:
    from pmf.toy import run_toy

    dims = tuple(int(d) for d in args.dims.split(",")) if args.dims else None
    kw = {"preset": args.preset, "dataset": args.dataset, "seed": args.seed}
    if dims:
        kw["dims"] = dims
    run_toy(args.out, **kw)
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
    t.set_defaults(fn=cmd_train)

    def guidance_args(q):
        q.add_argument("--checkpoint", required=True, help="run directory or export (.safetensors / directory)")
        q.add_argument("--ema", help="EMA copy to use, e.g. ema_hl500 (default: the run's sample.ema)")
        q.add_argument("--omega", type=float, help="guidance scale (default: the checkpoint's recommended one)")
        q.add_argument("--interval", type=float, nargs=2, metavar=("T_MIN", "T_MAX"), help="guidance interval")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        q.add_argument("--batch-size", type=int, default=256)

    s = sub.add_parser("sample", help="sample a PNG grid or an NPZ of class-balanced samples")
    guidance_args(s)
    s.add_argument("--steps", type=int, default=1, help="number of steps (1 = one network evaluation)")
    s.add_argument("--classes", help="comma-separated class ids (default: all)")
    s.add_argument("--rows", type=int, default=8, help="grid rows (samples per class)")
    s.add_argument("--num", type=int, help="number of samples for an .npz archive")
    s.add_argument("--out", default="grid.png", help="grid.png, or FILE.npz with --num")
    s.set_defaults(fn=cmd_sample)

    e = sub.add_parser("eval", help="Fashion-MNIST Frechet distance and class accuracy of 1- and 2-step samples")
    guidance_args(e)
    e.add_argument("--num", type=int, default=10000)
    e.add_argument("--steps", default="1,2", help="comma-separated step counts")
    e.add_argument("--out", help="write the metrics JSON here (default: RUN_DIR/metrics.json)")
    e.set_defaults(fn=cmd_eval)

    y = sub.add_parser("toy", help="the paper's toy study: x- vs u-prediction as the dimension grows")
    y.add_argument("--out", required=True)
    y.add_argument("--preset", default="quick", choices=["quick", "paper"])
    y.add_argument("--dims", help="comma-separated ambient dimensions (default 2,8,16,512)")
    y.add_argument("--dataset", default="swiss_roll")
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
