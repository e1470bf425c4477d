"""Training-state save and load under FSDP2: full gather to rank 0 + one file, against every rank writing its shards
(torch.distributed.checkpoint, :mod:`pmf.train.sharded_state`). Same run, same model, same state.

    torchrun --standalone --nproc-per-node 2 benchmarks/checkpoint_io.py [--hidden 256] [--depth 8] [--repeat 2]
             [--out /tmp/ckpt-bench]

The model is tiny-test's architecture widened to ``--hidden`` x ``--depth`` with Muon + Adam state (after one step)
and tiny-test's EMA copies. Prints the state size and, per form, the median seconds of save (gather + write, or DCP
write + hashes) and load (every rank reads the file memory-mapped, checks its digest and cuts its chunks, or the
ranks check the shard files' hashes, split between them, and DCP reads each rank's shards; ``sharded_hash_check``
is the hash part alone), and the ratios full / sharded. On one machine with a shared disk the write bandwidth is the
same for both forms; what the sharded form removes is the gather to one rank and that rank's whole-state host copy (peak
host memory on rank 0: the full state, against one shard per rank).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch

from pmf.parallel import dist
from pmf.train import fsdp, modes, sharded_state
from pmf.train.checkpoint import load_latest, save_training_state
from pmf.train.config import load_config, model_kwargs
from pmf.train.ema import EMA


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default="/tmp/pmf-ckpt-bench")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init("cpu")
    try:
        run(args)
    finally:
        dist.shutdown()


def run(args) -> None:
    cfg = load_config("tiny-test", overrides=[
        "train.device=cpu", "train.parallel=fsdp", "objective.impl=reference",
        f"model.overrides={{hidden_size: {args.hidden}, depth: {args.depth}, num_heads: 4, aux_head_depth: 2, "
        "bottleneck_dim: 16}"])
    cpu = torch.device("cpu")
    strategy = modes.make_strategy(cfg, cpu)
    kw = model_kwargs(cfg)
    net = strategy.build_net(kw)
    opt = strategy.build_optimizer(net)
    for p in net.parameters():  # one step with random gradients: every optimizer state tensor exists
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    ema = EMA(net, cfg.train.ema, ramp=cfg.train.ema_ramp)
    rest = {"loader": {"nimg": 0, "seed": 0, "num_items": 1}, "nimg": 0, "nonfinite_run": 0, "nonfinite_total": 0,
            "config": "{}"}
    out = Path(args.out)
    if dist.is_main():
        shutil.rmtree(out, ignore_errors=True)
    dist.barrier()
    times = {k: [] for k in ("full_save", "sharded_save", "full_load", "sharded_load", "sharded_hash_check")}

    def timed(key, fn):
        dist.barrier()
        t = time.perf_counter()
        fn()
        dist.barrier()
        times[key].append(time.perf_counter() - t)

    def full_save(step):
        state = {"net": fsdp.full_model_state_dict(net), "optimizer": fsdp.gather_full(opt.state_dict()),
                 "ema": fsdp.gather_full(ema.state_dict()), **rest}
        if dist.is_main():
            save_training_state(out / "full", state, step)

    def full_load():
        state = load_latest(out / "full")
        strategy.load_training_state(state, net, opt, ema)  # a single-file state: every rank cuts its chunks

    def sharded_load():
        state = load_latest(out / "sharded", lazy_sharded=True)
        strategy.load_training_state(state, net, opt, ema)

    for i in range(args.repeat):
        timed("full_save", lambda: full_save(i + 1))
        timed("sharded_save", lambda: strategy.save_training_state(out / "sharded", i + 1, net, opt, ema, rest))
        timed("full_load", full_load)
        timed("sharded_load", sharded_load)
        timed("sharded_hash_check", lambda: sharded_state.verify_sharded_state(
            sorted((out / "sharded" / "checkpoints").glob("state-*"))[-1]))
    size = sum(f.stat().st_size for f in (out / "full" / "checkpoints").glob("*.pt")) / max(
        1, len(list((out / "full" / "checkpoints").glob("*.pt"))))
    med = {k: statistics.median(v) for k, v in times.items()}
    dist.print0(f"{dist.world_size()} ranks, params {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M, state "
                f"{size / 2**20:.1f} MiB")
    for k, v in med.items():
        dist.print0(f"  {k:13s} {v:7.3f} s")
    dist.print0(f"  save full/sharded {med['full_save'] / med['sharded_save']:.2f}x, "
                f"load full/sharded {med['full_load'] / med['sharded_load']:.2f}x")


if __name__ == "__main__":
    main()
