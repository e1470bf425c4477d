"""Data throughput: the ImageFolder path (JPEG decode + ADM center crop per sample) against prepared shards
(``pmf prepare-data``: the same pixels, cropped once, memory-mapped), measured in one run.

    python benchmarks/data.py [--num 192] [--size 500x375] [--quality 90] [--resolutions 256 512] [--batch 64]
                              [--loader-workers 0 2] [--repeats 3] [--dir DIR] [--json OUT]

1. Writes ``--num`` synthetic JPEGs (``--size``, ``--quality``; smooth random fields plus grain, in 4 class
   folders) into a temporary folder (or ``--dir``).
2. Per worker (one process, one thread): images/s of
   - jpeg:   ``ImageFolderDataset`` item reads (PIL decode, convert RGB, ADM crop, HWC -> CHW tensor);
   - shards: ``ShardDataset.get_batch`` on random index batches of ``--batch`` (the gather a loader worker does:
     memory-mapped rows -> uint8 (B, 3, R, R)), with the shard files in the page cache (read once first);
   at each resolution, alternating the two paths ``--repeats`` times (load drift hits both alike), medians.
   Wall time and process CPU time are both reported; on a shared machine CPU time is the uncontended cost.
   The ratio shards / jpeg is printed (target: >= 20x at 256 px).
3. ``pmf prepare-data`` throughput with ``max(--loader-workers)`` processes.
4. Loader images/s: ``ShardedLoader`` batches (the training loader, same sampler) with each ``--loader-workers``
   count, for both paths.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pmf.data.datasets import ImageFolderDataset, ShardedLoader
from pmf.data.prepare import prepare_data
from pmf.data.shards import ShardDataset


def write_jpegs(root: Path, num: int, size: tuple[int, int], quality: int, seed: int = 0) -> None:
    """Photo-like test images: a bicubic-upsampled 8x6 random colour field plus Gaussian grain (noise alone would
    make unusually large, slow JPEGs; flat images unusually fast ones)."""
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(num):
        d = root / f"class{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        arr = np.asarray(field, dtype=np.float32) + rng.normal(0, 12, (h, w, 3))
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(d / f"{i:06d}.jpg", quality=quality)


def timed(fn, n_images: int) -> tuple[float, float]:
    """(images/s by wall time, images/s by process CPU time) of fn()."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    w, c = time.perf_counter() - w0, time.process_time() - c0
    return n_images / max(w, 1e-9), n_images / max(c, 1e-9)


def per_worker(folder: ImageFolderDataset, shards: ShardDataset, batch: int, repeats: int) -> dict:
    n = len(folder)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, len(shards), batch) for _ in range(max(1, 4 * n // batch))]
    shards.get_batch(np.arange(len(shards)))  # page cache + maps warm, as after the first epoch

    def jpeg():
        for i in range(n):
            folder[i]

    def shard():
        for idx in batches:
            shards.get_batch(idx)

    res = {"jpeg": [], "shards": []}
    for _ in range(repeats):
        res["jpeg"].append(timed(jpeg, n))
        res["shards"].append(timed(shard, len(batches) * batch))
    return {k: (statistics.median(v[0] for v in r), statistics.median(v[1] for v in r)) for k, r in res.items()}


def loader_rate(data, workers: int, batch: int, n_batches: int) -> float:
    loader = ShardedLoader(data, batch, seed=0, num_workers=workers)
    it = iter(loader)
    next(it)  # start-up (worker processes, maps) excluded
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    rate = n_batches * batch / (time.perf_counter() - t0)
    del it, loader
    gc.collect()  # shut the persistent workers down now
    return rate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=192, help="synthetic JPEGs")
    p.add_argument("--size", default="500x375", help="JPEG size WxH (ImageNet's typical 500x375)")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    p.add_argument("--batch", type=int, default=64, help="loader / gather batch")
    p.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--loader-batches", type=int, default=6, help="timed batches per loader configuration")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", help="work directory (default: a temporary one, removed afterwards)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    w, h = (int(v) for v in args.size.lower().split("x"))

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp) / "train"
        t0 = time.perf_counter()
        write_jpegs(root, args.num, (w, h), args.quality)
        kb = sum(f.stat().st_size for f in root.rglob("*.jpg")) / args.num / 1e3
        print(f"# {args.num} synthetic JPEGs {w}x{h} q{args.quality} (~{kb:.0f} kB each) written in "
              f"{time.perf_counter() - t0:.1f} s; torch {torch.__version__}, {os.cpu_count()} CPUs, one thread")
        results = {"num": args.num, "size": [w, h], "quality": args.quality, "per_worker": {}, "prepare": {},
                   "loader": {}}
        for res in args.resolutions:
            out = Path(tmp) / f"shards{res}"
            pw = max(args.loader_workers + [1])
            t0 = time.perf_counter()
            prepare_data(root, out, res, workers=pw, shard_size=64, quiet=True)
            prep = args.num / (time.perf_counter() - t0)
            folder, shards = ImageFolderDataset(root, res), ShardDataset(out, res)
            r = per_worker(folder, shards, args.batch, args.repeats)
            ratio_wall, ratio_cpu = r["shards"][0] / r["jpeg"][0], r["shards"][1] / r["jpeg"][1]
            results["per_worker"][res] = {"jpeg_wall": r["jpeg"][0], "jpeg_cpu": r["jpeg"][1],
                                          "shards_wall": r["shards"][0], "shards_cpu": r["shards"][1],
                                          "ratio_wall": ratio_wall, "ratio_cpu": ratio_cpu}
            results["prepare"][res] = {"workers": pw, "images_per_s": prep}
            print(f"\n## {res} px, per worker (1 process, 1 thread), images/s [wall | CPU]")
            print(f"  jpeg   (decode + ADM crop)   {r['jpeg'][0]:10,.0f} | {r['jpeg'][1]:10,.0f}")
            print(f"  shards (mmap gather, B={args.batch:<3}) {r['shards'][0]:10,.0f} | {r['shards'][1]:10,.0f}")
            print(f"  ratio shards / jpeg          {ratio_wall:10.1f}x | {ratio_cpu:9.1f}x"
                  + ("   (target >= 20x)" if res == 256 else ""))
            print(f"  prepare-data, {pw} workers: {prep:,.0f} images/s (includes process start-up and writing)")
            print(f"  loader (ShardedLoader, batch {args.batch}), images/s:")
            results["loader"][res] = {}
            for nw in args.loader_workers:
                a = loader_rate(folder, nw, args.batch, args.loader_batches)
                b = loader_rate(shards, nw, args.batch, args.loader_batches)
                results["loader"][res][nw] = {"jpeg": a, "shards": b}
                print(f"    {nw} workers: jpeg {a:10,.0f}   shards {b:10,.0f}   ({b / a:.1f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
