"""Training-state save and load in one process: the state directory every mode writes (:mod:`pmf.train.checkpoint`,
torch.distributed.checkpoint) against one ``torch.save`` file of the same state with a SHA-256 of the file, the
baseline measured in the same run.

    python benchmarks/checkpoint_io.py --preset fmnist-demo [--repeat 3] [--out /tmp/pmf-ckpt-bench]
    python benchmarks/checkpoint_io.py --preset pmf-b16-in256 --repeat 2

The preset's network on the CPU with its optimizer state (after one step with random gradients: every moment
exists) and its EMA copies, plus the loader position and counters. Per form, the median seconds of save (write, fsync,
hashes; for the directory also the rotation) and load (hash check, read, load into the network, optimizer and EMAs)
and the bytes on disk; then the ratios directory / file.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch

from pmf.train import modes
from pmf.train.checkpoint import load_training_state, open_latest
from pmf.train.config import load_config, model_kwargs
from pmf.train.ema import EMA
from pmf.util.atomic import atomic_save, sha256_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fmnist-demo")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="/tmp/pmf-ckpt-bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.preset, overrides=["train.device=cpu"])
    strategy = modes.make_strategy(cfg, torch.device("cpu"), world=1)
    net = strategy.build_net(model_kwargs(cfg))
    opt = strategy.build_optimizer(net)
    for p in net.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    ema = EMA(net, cfg.train.ema, ramp=cfg.train.ema_ramp)
    rest = {"loader": {"nimg": 0, "seed": 0, "num_items": 1}, "nimg": 0, "nonfinite_run": 0, "nonfinite_total": 0,
            "config": "{}"}
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    times = {k: [] for k in ("dir_save", "dir_load", "file_save", "file_load")}

    def timed(key, fn):
        t = time.perf_counter()
        fn()
        times[key].append(time.perf_counter() - t)

    def file_save(step):
        path = out / "file" / f"state-{step:09d}.pt"
        atomic_save({"net": net.state_dict(), "optimizer": opt.state_dict(), "ema": ema.state_dict(), **rest}, path)
        path.with_suffix(".sha256").write_text(sha256_file(path))
        for old in (out / "file").glob(f"state-{step - 2:09d}.*"):  # keep 2, as the directory form does
            old.unlink()

    def file_load(step):
        path = out / "file" / f"state-{step:09d}.pt"
        if sha256_file(path) != path.with_suffix(".sha256").read_text():
            raise RuntimeError(f"{path} damaged")
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])

    for i in range(args.repeat):
        step = i + 1
        timed("dir_save", lambda: strategy.save_training_state(out / "dir", step, net, opt, ema, rest))
        timed("dir_load", lambda: load_training_state(open_latest(out / "dir"), net, opt, ema))
        timed("file_save", lambda: file_save(step))
        timed("file_load", lambda: file_load(step))
    newest = sorted((out / "dir" / "checkpoints").glob("state-*"))[-1]
    dir_bytes = sum(f.stat().st_size for f in newest.iterdir())
    file_bytes = (out / "file" / f"state-{args.repeat:09d}.pt").stat().st_size
    med = {k: statistics.median(v) for k, v in times.items()}
    n = sum(p.numel() for p in net.parameters())
    print(f"{args.preset} ({cfg.model.name}): {n / 1e6:.2f} M parameters, EMA {list(cfg.train.ema)}, "
          f"{args.repeat} repeats, {torch.get_num_threads()} threads")
    print(f"  bytes  directory {dir_bytes / 2**20:9.1f} MiB   file {file_bytes / 2**20:9.1f} MiB")
    for k, v in med.items():
        print(f"  {k:9s} median {v:7.3f} s   all {' '.join(f'{x:.3f}' for x in times[k])}")
    print(f"  directory / file: save {med['dir_save'] / med['file_save']:.2f}x, load "
          f"{med['dir_load'] / med['file_load']:.2f}x, bytes {dir_bytes / file_bytes:.3f}x")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
