"""The ``pmf`` argument parser: one function per subcommand, built from a few shared groups of flags. The syntax
every subcommand follows (space-separated lists, one meaning per flag name) is :mod:`pmf.cli.args`'s."""

from __future__ import annotations

import os

import torch

from pmf.cli import commands
from pmf.cli.args import Parser, key_value, listed

INCEPTION_HELP = "FID Inception weights pt_inception-2015-12-05-6726825d.pth (default: $PMF_INCEPTION)"


def _device(q) -> None:
    q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _network(q) -> None:
    """The network to sample: a checkpoint, its EMA copy, and how fast to run it."""
    q.add_argument("--checkpoint", required=True, help="run directory, network folder (config.json + model.safetensors) "
                   "or Hub repo id")
    q.add_argument("--ema", help="EMA copy to use, e.g. ema_hl500 (default: the run's sample.ema)")
    q.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: autocast the network (faster on GPUs and CPUs with native bf16 matmuls)")
    q.add_argument("--compile", action="store_true",
                   help="torch.compile the network with weight freezing (eager fallback on failure)")
    _device(q)


def _sampler(q) -> None:
    """How one sample is drawn: guidance (Eq. 13's omega on [t_min, t_max]), the sampler, the seed."""
    q.add_argument("--omega", type=float, help="guidance scale (default: the checkpoint's recommended one)")
    q.add_argument("--interval", type=listed(float, "--interval"), nargs=2, metavar=("T_MIN", "T_MAX"),
                   help="guidance interval (default: the checkpoint's recommended one)")
    q.add_argument("--seed", type=int, default=0, help="noise seed: sample i's noise depends only on it and i")
    q.add_argument("--instantaneous", action="store_true",
                   help="Euler steps with the instantaneous velocity v = u(z, t, t) (h = 0) instead of the "
                        "average velocity: the flow-matching sampler (use many --steps)")


def _metric(q) -> None:
    q.add_argument("--extractor", default="fmnist", choices=["fmnist", "inception"],
                   help="fmnist: Fashion-MNIST CNN distance + class accuracy; inception: FID + IS (ImageNet)")
    q.add_argument("--inception", help=INCEPTION_HELP)
    q.add_argument("--ref-stats", help="reference .npz for --extractor inception: statistics (mu, sigma; also "
                   "mu_s, sigma_s and features from `pmf ref-stats`; JiT's jit_in256_stats.npz) or an ADM "
                   "reference batch (VIRTUAL_imagenet256_labeled.npz: images arr_0 plus mu/sigma/mu_s/sigma_s)")


def add_train(sub) -> None:
    t = sub.add_parser("train", help="train or resume a run (rerun the same command to resume)")
    t.add_argument("--preset", help="named preset (pmf/configs/NAME.yaml), e.g. fmnist-demo")
    t.add_argument("--config", help="a YAML config file instead of a preset")
    t.add_argument("--run-dir", required=True, help="run directory (checkpoints, logs, grids, exports)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. --set "
                   "train.batch_size=64 (repeat for several)")
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
    t.set_defaults(fn=commands.cmd_train)


def add_sample(sub) -> None:
    s = sub.add_parser("sample", help="sample a PNG grid or an NPZ of class-balanced samples")
    _network(s)
    _sampler(s)
    s.add_argument("--steps", type=int, default=1, help="sampling steps (1 = one network evaluation)")
    s.add_argument("--classes", type=listed(int, "--classes"), nargs="+", metavar="CLASS",
                   help="class ids, e.g. --classes 0 3 7 (default: all)")
    s.add_argument("--rows", type=int, default=8, help="grid rows (samples per class)")
    s.add_argument("--num", type=int, help="number of samples for an .npz archive")
    s.add_argument("--batch-size", type=int, default=256, help="images per batch")
    s.add_argument("--out", default="grid.png", help="grid.png, or FILE.npz with --num")
    s.set_defaults(fn=commands.cmd_sample)


def add_eval(sub) -> None:
    e = sub.add_parser("eval", help="Frechet distance (Fashion-MNIST CNN, or Inception FID + IS) of 1/2/4-step "
                       "samples of a checkpoint (a sample archive: pmf eval-samples)")
    _network(e)
    _sampler(e)
    _metric(e)
    e.add_argument("--steps", type=listed(int, "--steps"), nargs="+", metavar="STEPS",
                   help="sampling step counts, e.g. --steps 1 2 4 (default: the run's eval.steps, else 1 2 4)")
    e.add_argument("--num", type=int, help="number of samples (default: the run's eval.num_samples, else 10000 "
                   "fmnist, 50000 inception)")
    e.add_argument("--batch-size", type=int, help="images per batch (default: the run's eval.batch_size, else 256)")
    e.add_argument("--out", help="write the metrics JSON here (default: RUN_DIR/metrics.json)")
    e.set_defaults(fn=commands.cmd_eval)


def add_eval_samples(sub) -> None:
    e = sub.add_parser("eval-samples", help="FID, sFID, IS, precision and recall of a sample archive, whatever "
                       "made it (one process)")
    e.add_argument("--samples", required=True, help="the archive (.npz: arr_0 uint8 N x H x W x C, optional arr_1 "
                   "labels; or images / labels)")
    _metric(e)
    e.add_argument("--num", type=int, help="evaluate only the first N samples (default: the whole file)")
    e.add_argument("--k", type=int, default=3, help="k of the k-NN manifolds of precision / recall")
    e.add_argument("--batch-size", type=int, default=256, help="images per batch")
    _device(e)
    e.add_argument("--out", help="also write the metrics JSON here")
    e.set_defaults(fn=commands.cmd_eval_samples)


def add_ref_stats(sub) -> None:
    r = sub.add_parser("ref-stats", help="Inception reference statistics of real images as an .npz: mu, sigma (FID), "
                       "mu_s, sigma_s (sFID), features (precision / recall)")
    r.add_argument("--images", required=True, help="image folder (ADM center crop) or .npz of uint8 images")
    r.add_argument("--out", required=True, help="output .npz")
    r.add_argument("--inception", help=INCEPTION_HELP)
    r.add_argument("--resolution", type=int, default=256, help="center-crop size for an image folder")
    r.add_argument("--num", type=int, help="use only the first N images (sorted paths / archive order)")
    r.add_argument("--batch-size", type=int, default=250)
    r.add_argument("--pr-num", type=int, default=10_000,
                   help="keep the pool features of the first N images for precision / recall (ADM: 10000; 0: none)")
    r.add_argument("--workers", type=int, default=4, help="image decoding processes for a folder")
    _device(r)
    r.set_defaults(fn=commands.cmd_ref_stats)


def add_prepare_data(sub) -> None:
    d = sub.add_parser("prepare-data", help="ImageFolder -> center-cropped uint8 shards for data.dataset=shards")
    d.add_argument("--source", help="(required unless --check) image folder with one subfolder per class (e.g. "
                   "ImageNet train), a Hugging Face datasets folder (.parquet / .arrow), an EDM2 .zip, or WebDataset "
                   ".tar shards")
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
    d.set_defaults(fn=commands.cmd_prepare_data)


def add_guidance_search(sub) -> None:
    g = sub.add_parser("guidance-search", help="grid over omega x interval x EMA, then the full count at the best")
    g.add_argument("--checkpoint", required=True, help="run directory, network folder or Hub repo id")
    _metric(g)
    g.add_argument("--omegas", type=listed(float, "--omegas"), nargs="+", required=True, metavar="OMEGA",
                   help="guidance scales, e.g. --omegas 1 2 3 4")
    g.add_argument("--interval", type=listed(float, "--interval"), nargs=2, action="append",
                   metavar=("T_MIN", "T_MAX"), help="a guidance interval to search; repeat for several, e.g. "
                   "--interval 0 1 --interval 0.1 0.8 (default: 0 1)")
    g.add_argument("--emas", type=listed(str, "--emas"), nargs="+", metavar="EMA",
                   help="EMA copies, e.g. --emas ema_hl500 model (default: the run's sample.ema)")
    g.add_argument("--num-search", type=int, default=5000, help="samples per grid point")
    g.add_argument("--num-final", type=int, help="samples at the best point (default 10000 fmnist, 50000 inception)")
    g.add_argument("--steps", type=int, default=1, help="sampling steps")
    g.add_argument("--out", required=True, help="output directory (search.json, search.csv, search.png)")
    g.add_argument("--seed", type=int, default=0, help="search seed; the final run uses seed + 1")
    g.add_argument("--batch-size", type=int, default=256, help="images per batch")
    _device(g)
    g.set_defaults(fn=commands.cmd_guidance_search)


def add_toy(sub) -> None:
    y = sub.add_parser("toy", help="the paper's toy study: x- vs u-prediction as the dimension grows")
    y.add_argument("--out", required=True)
    y.add_argument("--preset", default="quick", choices=["quick", "paper"], help="quick: ~6 min on 2 cores")
    y.add_argument("--dims", type=listed(int, "--dims"), nargs="+", default=[2, 8, 16, 512], metavar="D",
                   help="ambient dimensions, e.g. --dims 2 8 16 512 (the default)")
    y.add_argument("--dataset", default="swiss_roll", help="swiss_roll | 8gaussians | checkerboard")
    y.add_argument("--train-steps", type=int, metavar="N", help="training steps of each network (default: the "
                   "preset's)")
    y.add_argument("--seed", type=int, default=0)
    y.set_defaults(fn=commands.cmd_toy)


def add_import_official(sub) -> None:
    i = sub.add_parser("import-official", help="convert an official checkpoint: a PyTorch .pt to the Hugging Face "
                       "layout; a JAX (Orbax) checkpoint to exports, or to a run directory that pmf train continues")
    i.add_argument("input", help="official .pt file, or an Orbax checkpoint_<step> directory (its workdir, or a .zip)")
    i.add_argument("--model", help="size, e.g. pMF-B/16 (a .pt needs it; an Orbax checkpoint needs it or "
                   "--model-kwargs)")
    i.add_argument("--out", required=True, help=".pt: output directory (config.json, model.safetensors, README.md); "
                   "Orbax: an export directory, or with --preset/--config/--set a run directory")
    i.add_argument("--model-kwargs", metavar="JSON", help="Orbax: the official pmfDiT constructor kwargs, e.g. "
                   "'{\"hidden_size\": 768, \"depth\": 16, ...}' (any size; overrides --model's)")
    i.add_argument("--preset", help="Orbax: write a run directory for this training preset (as pmf train --preset)")
    i.add_argument("--config", help="Orbax: ... or this YAML config")
    i.add_argument("--set", action="append", metavar="KEY=VALUE", help="Orbax: ... with these config overrides "
                   "(as pmf train --set)")
    i.add_argument("--images-per-step", type=int, default=1024, help="Orbax run: images per official step (the "
                   "official global batch, 1024); images seen = step x this")
    i.set_defaults(fn=commands.cmd_import)


def add_export(sub) -> None:
    x = sub.add_parser("export", help="save any checkpoint (e.g. a run's EMA copy) in the Hugging Face layout")
    x.add_argument("--checkpoint", required=True, help="run directory, network folder (config.json + model.safetensors) "
                   "or Hub repo id")
    x.add_argument("--ema", help="weights to export, e.g. ema_hl500 (default: the run's sample.ema)")
    x.add_argument("--out", required=True, help="output directory (config.json, model.safetensors, README.md)")
    x.add_argument("--format", default="hf", choices=["hf", "official-jax"], help="hf: the Hugging Face layout; "
                   "official-jax: an Orbax checkpoint_<step>/ of the official JAX TrainState (docs/hub.md)")
    x.set_defaults(fn=commands.cmd_export)


def add_ablate(sub) -> None:
    a = sub.add_parser("ablate", help="the paper's ablations, small: arms x seeds, a table and a figure per claim")
    a.add_argument("--suite", default="paper", help="declared list of arms (pmf.studies.ablate.SUITES)")
    a.add_argument("--out", required=True, help="output directory (runs/, report.md, claim*.png, results.json)")
    a.add_argument("--kimg", type=listed(float, "--kimg"), nargs="+", default=[30.0], metavar="KIMG",
                   help="training images per run, in thousands; several budgets (e.g. --kimg 30 60 120) continue "
                        "each run from one to the next, every run reaching a budget before any goes past it, and "
                        "each is evaluated")
    a.add_argument("--eval-num", type=int, default=10_000, help="samples per evaluation")
    a.add_argument("--jobs", type=int, default=1, help="runs side by side, one thread each")
    a.add_argument("--only", type=listed(str, "--only"), nargs="+", metavar="ARM",
                   help="arm names or claim numbers to run, worked in this order at each budget")
    a.add_argument("--weight-file", type=key_value("--weight-file", "perceptual.lpips_vgg_path=vgg16-397923af.pth"),
                   action="append", metavar="KEY=PATH", help="a perceptual weight file the arms that need it use, "
                   "e.g. --weight-file perceptual.lpips_vgg_path=vgg16-397923af.pth (repeat for several)")
    a.add_argument("--dry-run", action="store_true", help="list the arms, overrides and estimated CPU time")
    a.add_argument("--report-only", action="store_true",
                   help="train and evaluate nothing: write the report from the evaluations already in --out")
    a.set_defaults(fn=commands.cmd_ablate)


SUBCOMMANDS = (add_train, add_sample, add_eval, add_eval_samples, add_ref_stats, add_prepare_data,
               add_guidance_search, add_toy, add_import_official, add_export, add_ablate)


def build_parser() -> Parser:
    p = Parser(prog="pmf", description="pixel MeanFlow: one-step image generation in pixels")
    sub = p.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    for sp in sub.choices.values():
        sp.add_argument("--debug", action="store_true", help="print the traceback of an expected error too")
    return p
