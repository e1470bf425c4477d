"""Frechet distance of the Fashion-MNIST demo against training minutes: does the one-step gap narrow with training?

    python benchmarks/demo_curve.py [--minutes 5 10 20 40] [--run-dir runs/demo-curve] [--preset fmnist-demo]
                                    [--set key=value ...] [--num 10000] [--inst-steps 32]
                                    [--png docs/demo-curve.png] [--md docs/demo-curve.md]

One training run of the preset, stopped and evaluated at each cumulative budget in ``--minutes`` (the run resumes
bit-identically between budgets, so the points are one trajectory). At each point ``pmf eval`` scores ``--num``
class-balanced samples in the Fashion-MNIST classifier's features with

  - 1 and 2 average-velocity steps (the pMF sampler: 1 and 2 network evaluations), and
  - ``--inst-steps`` Euler steps on the instantaneous velocity v = u(z, t, t) (``--instantaneous``): the
    flow-matching bound, what the same network gives as a many-step flow model,

and the figure plots the three Frechet distances against images seen (kimg: minutes on a shared machine buy very
different numbers of images), with the reference distances of the training set (the floor) and of the test set blurred 2x. The markdown table adds kimg, class accuracy (next to the
classifier's accuracy on real test images) and the ratios to the floor.

Points already in RUN_DIR/curve.json are not retrained or re-evaluated: rerun the command to continue after an
interruption, or to add budgets. Training minutes are the wall-clock seconds of the training invocations (start-up
included), as ``pmf train --minutes`` counts them; evaluation time is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def run_point(a, py: str, run_dir: Path, train_minutes: float, rows: list) -> dict:
    """Train ``train_minutes`` more (resuming), evaluate, and return the point's row."""
    cmd = [py, "-m", "pmf", "train", "--preset", a.preset, "--run-dir", str(run_dir), "--minutes",
           f"{train_minutes:.4f}", "--quiet"]
    for s in a.set:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    avg, inst = run_dir / "curve-eval-average.json", run_dir / "curve-eval-instantaneous.json"
    ev = [py, "-m", "pmf", "eval", "--checkpoint", str(run_dir), "--num", str(a.num)]
    subprocess.run(ev + ["--steps", "1", "2", "--out", str(avg)], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(ev + ["--steps", str(a.inst_steps), "--instantaneous", "--out", str(inst)], check=True,
                   stdout=subprocess.DEVNULL)
    m, mi = json.loads(avg.read_text()), json.loads(inst.read_text())
    k = a.inst_steps
    seconds = (rows[-1]["train_seconds"] if rows else 0.0) + summary["seconds"]
    return {"budget_minutes": None, "train_seconds": seconds, "kimg": summary["kimg"], "n": a.num,
            "fd_1step": m["fd_1step"], "fd_2step": m["fd_2step"], f"fd_inst_{k}step": mi[f"fd_{k}step"],
            "class_acc_1step": m["class_acc_1step"], "class_acc_2step": m["class_acc_2step"],
            f"class_acc_inst_{k}step": mi[f"class_acc_{k}step"],
            "classifier_test_accuracy": m.get("classifier_test_accuracy"),
            "fd_floor": m["fd_floor"], "fd_blur2x": m["fd_blur2x"]}


DEMO_KIMG = 235  # images the fmnist-demo preset trains in its ten minutes on an idle 2-core CPU (392 img/s)


def plot(rows: list, k: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # images seen, not minutes: on a shared machine the minutes of a budget buy very different numbers of images
    kimg = [r["kimg"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for key, label, style in (("fd_1step", "1 step (1 NFE)", "o-"), ("fd_2step", "2 steps (2 NFE)", "s-"),
                              (f"fd_inst_{k}step", f"flow-matching bound ({k} instantaneous steps)", "^--")):
        ax.plot(kimg, [r[key] for r in rows], style, label=label)
    ax.axhline(rows[-1]["fd_blur2x"], color="gray", ls=":", lw=1, label="test set blurred 2x")
    ax.axhline(rows[-1]["fd_floor"], color="black", ls=":", lw=1, label="training set (floor)")
    ax.set_xlabel(f"kimg seen (idle 2-core CPU: {DEMO_KIMG} kimg = the demo's 10 minutes)")
    ax.set_ylabel(f"Frechet distance, classifier features (n={rows[-1]['n']})")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def table(rows: list, k: int, command: str) -> str:
    acc_real = rows[-1].get("classifier_test_accuracy")
    lines = [f"Command: `{command}`", "",
             f"Class accuracy is the classifier's agreement with the intended labels; on real test images the same "
             f"classifier scores {acc_real:.4f}." if acc_real is not None else "", "",
             f"| minutes | kimg | FD 1-step | FD 2-step | FD inst. {k}-step | 1-step / floor | 1-step / 2-step | "
             f"class acc 1-step | class acc inst. {k}-step |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['train_seconds'] / 60:.1f} | {r['kimg']:.1f} | {r['fd_1step']:.2f} | {r['fd_2step']:.2f} | "
                     f"{r[f'fd_inst_{k}step']:.2f} | {r['fd_1step'] / r['fd_floor']:.1f} | "
                     f"{r['fd_1step'] / r['fd_2step']:.2f} | {r['class_acc_1step']:.4f} | "
                     f"{r[f'class_acc_inst_{k}step']:.4f} |")
    lines += ["", f"Reference distances at n={rows[-1]['n']}: training set (floor) {rows[-1]['fd_floor']:.2f}, "
              f"test set blurred 2x {rows[-1]['fd_blur2x']:.2f}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, nargs="+", default=[5, 10, 20, 40], help="cumulative training budgets")
    p.add_argument("--run-dir", default="runs/demo-curve")
    p.add_argument("--preset", default="fmnist-demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--num", type=int, default=10000, help="samples per evaluation")
    p.add_argument("--inst-steps", type=int, default=32, help="Euler steps of the instantaneous (flow-matching) curve")
    p.add_argument("--png", default="docs/demo-curve.png")
    p.add_argument("--md", default="docs/demo-curve.md")
    a = p.parse_args()
    if sorted(a.minutes) != a.minutes or a.minutes[0] <= 0:
        p.error("--minutes must be positive and increasing (cumulative budgets)")

    py, run_dir = sys.executable, Path(a.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    curve_path = run_dir / "curve.json"
    rows = json.loads(curve_path.read_text()) if curve_path.exists() else []
    done = {r["budget_minutes"] for r in rows}
    for budget in a.minutes:
        if budget in done:
            continue
        if rows and budget < max(done):
            p.error(f"budget {budget} min lies before points already trained in {run_dir}; use a new --run-dir")
        row = run_point(a, py, run_dir, budget - (max(done) if done else 0.0), rows)
        row["budget_minutes"] = budget
        rows.append(row)
        done.add(budget)
        curve_path.write_text(json.dumps(rows, indent=1) + "\n")
        k = a.inst_steps
        print(f"{budget:g} min ({row['train_seconds'] / 60:.1f} measured, {row['kimg']:.1f} kimg): FD 1-step "
              f"{row['fd_1step']:.2f}, 2-step {row['fd_2step']:.2f}, instantaneous {k}-step "
              f"{row[f'fd_inst_{k}step']:.2f} (floor {row['fd_floor']:.2f})", flush=True)

    rows = [r for r in rows if r["budget_minutes"] in set(a.minutes)]
    command = "python benchmarks/demo_curve.py " + " ".join(sys.argv[1:])
    plot(rows, a.inst_steps, Path(a.png), f"{a.preset}: one-step vs multi-step FD over training")
    Path(a.md).parent.mkdir(parents=True, exist_ok=True)
    link = os.path.relpath(Path(a.png).resolve(), Path(a.md).resolve().parent)
    Path(a.md).write_text(f"# {a.preset}: Frechet distance against training images\n\n![curve]({link})\n\n"
                          + table(rows, a.inst_steps, command.strip()))
    print(f"figure {a.png}, table {a.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
