"""Muon's Newton-Schulz work per rank, with and without ``optim.muon_partition``: arithmetic from the shapes of a
preset's network (built on the meta device: no memory, no GPU), not a timing.

    python benchmarks/muon_partition.py [--preset pmf-b16-in256 pmf-h16-in256] [--world 8] [--ns-steps 5]
                                        [--ns-bytes 2]

For each preset: the Muon matrices (shape x count), the Newton-Schulz FLOPs of one optimizer step that every rank
runs today, and under the partition (:func:`pmf.parallel.ns_partition.assign_owners` over ``--world`` ranks) each rank's
share, the largest share against the mean (1.000 = perfect balance) and the speed-up of the step's NS part
(total / largest share). Communication per rank and step for sharing the results, in the NS dtype (``--ns-bytes``: 2
for bf16, the GPU default): the padded all-gather that :func:`pmf.parallel.ns_partition.share` does ((W - 1) x largest
share received), against an all-reduce of a zero-filled buffer of all results (2 (W - 1) / W x all, ring) and one
broadcast per owner (all minus own share).
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from pmf.method.model import PMFDiT
from pmf.parallel.ns_partition import assign_owners, loads, ns_flops
from pmf.train.config import load_config, model_kwargs
from pmf.train.optim import param_groups


def muon_shapes(preset: str) -> tuple[str, list[tuple[int, int]]]:
    cfg = load_config(preset)
    with torch.device("meta"):
        net = PMFDiT(**model_kwargs(cfg))
    muon, _ = param_groups(net)
    return cfg.model.name, [tuple(p.shape) for _, p in muon]


def report(preset: str, world: int, steps: int, nbytes: int) -> None:
    name, shapes = muon_shapes(preset)
    costs = [ns_flops(s, steps) for s in shapes]
    owners = assign_owners(costs, world)
    load = loads(costs, owners, world)
    total, mean = sum(costs), sum(costs) / world
    numel = [s[0] * s[1] for s in shapes]
    elems = [0] * world
    for n, r in zip(numel, owners):
        elems[r] += n
    N = sum(numel)
    kinds = ", ".join(f"{m}x{n} x{c}" for (m, n), c in sorted(Counter(shapes).items()))
    print(f"{name} ({preset}): {len(shapes)} Muon matrices ({kinds}); {N / 1e6:.1f}M elements")
    print(f"  NS FLOPs per step per rank: {total / 1e12:.3f} TFLOP without partition; partitioned over {world} ranks: "
          f"largest share {max(load) / 1e12:.3f} TFLOP ({100 * max(load) / total:.2f} % of the total, ideal "
          f"{100 / world:.2f} %), smallest {min(load) / 1e12:.3f}; largest / mean = {max(load) / mean:.4f}; NS part "
          f"{total / max(load):.2f}x faster")
    print("  per-rank share of the NS FLOPs (%): " + " ".join(f"{100 * x / total:.2f}" for x in load))
    mb = nbytes / 2**20
    gather = (world - 1) * max(elems) * mb
    reduce = 2 * (world - 1) / world * N * mb
    bcast = max(N - e for e in elems) * mb
    print(f"  results shared per rank and step ({nbytes}-byte NS dtype): all-gather of padded shares {gather:.1f} MiB "
          f"(largest share / mean {max(elems) / (N / world):.4f} in elements); all-reduce of a zero-filled buffer "
          f"{reduce:.1f} MiB; broadcast per owner {bcast:.1f} MiB in {world} collectives")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", nargs="+", default=["pmf-b16-in256", "pmf-h16-in256"])
    ap.add_argument("--world", type=int, default=8, help="number of data-parallel ranks")
    ap.add_argument("--ns-steps", type=int, default=5, help="Newton-Schulz iterations (optim.muon_ns_steps)")
    ap.add_argument("--ns-bytes", type=int, default=2, help="bytes per element of the NS dtype (bf16: 2, fp32: 4)")
    args = ap.parse_args()
    for preset in args.preset:
        report(preset, args.world, args.ns_steps, args.ns_bytes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
