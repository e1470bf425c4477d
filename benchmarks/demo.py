"""Quality per CPU-minute of the Fashion-MNIST demo, as ratios against reference image sets measured in the same run.

    python benchmarks/demo.py [--minutes 10] [--run-dir runs/bench-demo] [--set key=value ...] [--steps 1 2 4]

Trains the ``fmnist-demo`` preset (plus overrides) for a wall-clock budget with the same commands as ``make demo``,
then evaluates 10k class-balanced samples with ``pmf eval`` and prints, for each number of sampling steps, the
Frechet distance in the Fashion-MNIST classifier's features and its ratio to three reference sets scored in the
same features (the training set = the floor, the test set blurred 2x, the test set plus N(0, 0.1^2) noise).
A ratio below 1 against ``blur2x`` means the samples are closer to the test set than a 2x-blurred copy of it.
``diversity`` is the within-class feature variance of the samples over the test set's (1 = as varied as the data);
``FD within`` is the distance left after moving each class's feature mean onto the test set's class mean (the rest
of FD comes from where the class means lie).
Reruns with the same --run-dir resume training; use a fresh directory per configuration.
At start it prints the CPU's capability (SIMD level, native bf16 or not) and, once the first log record is written,
the training speed in images/s, so a slow machine shows itself within the first minute.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def train_with_start_report(cmd: list[str], run_dir: Path) -> None:
    """Run the training command; print the images/s of the first new log record as soon as it appears."""
    log = run_dir / "log.jsonl"
    seen = len(log.read_text().splitlines()) if log.exists() else 0  # a resumed run: skip the old records
    proc = subprocess.Popen(cmd)
    reported = False
    while proc.poll() is None:
        time.sleep(1.0)
        lines = log.read_text().splitlines() if log.exists() else []
        if not reported and len(lines) > seen:
            rec = json.loads(lines[seen])
            if "img_per_s" in rec:
                print(f"training at {rec['img_per_s']:.0f} img/s (at {rec.get('kimg', 0):.0f} kimg)", flush=True)
            reported = True
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--run-dir", default="runs/bench-demo")
    p.add_argument("--preset", default="fmnist-demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--num", type=int, default=10000)
    a = p.parse_args()

    py = sys.executable
    train = [py, "-m", "pmf", "train", "--preset", a.preset, "--run-dir", a.run_dir, "--minutes", str(a.minutes),
             "--quiet"]
    for s in a.set:
        train += ["--set", s]
    from pmf.train.precision import cpu_capability

    print(f"CPU: {cpu_capability()}", flush=True)
    train_with_start_report(train, Path(a.run_dir))
    out = Path(a.run_dir) / "bench-metrics.json"
    subprocess.run([py, "-m", "pmf", "eval", "--checkpoint", a.run_dir, "--num", str(a.num), "--steps",
                    *map(str, a.steps), "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    m = json.loads(out.read_text())
    summary = json.loads((Path(a.run_dir) / "summary.json").read_text())
    print(f"trained {summary['kimg']:.1f} kimg in {summary['seconds'] / 60:.1f} min "
          f"({summary['kimg'] * 1000 / summary['seconds']:.0f} img/s), {summary['params_M']:.2f}M params")
    print(f"reference FDs: floor {m['fd_floor']:.2f}  blur2x {m['fd_blur2x']:.2f}  noise0.1 {m['fd_noise0.1']:.2f}")
    print(f"{'steps':>5} {'FD':>8} {'/floor':>8} {'/blur2x':>8} {'/noise0.1':>9} {'class_acc':>9} {'diversity':>9} "
          f"{'FD within':>9}")
    for k in a.steps:
        fd = m[f"fd_{k}step"]
        print(f"{k:>5} {fd:8.2f} {fd / m['fd_floor']:8.1f} {fd / m['fd_blur2x']:8.3f} {fd / m['fd_noise0.1']:9.3f} "
              f"{m[f'class_acc_{k}step']:9.4f} {m[f'diversity_{k}step']:9.3f} {m[f'fd_within_{k}step']:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
