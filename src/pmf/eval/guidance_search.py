"""Guidance search (official protocol, pMF App. A.1; official `train.py`: `just_evaluate`): "FID results are
evaluated at optimal guidance scale and interval". A grid over EMA copies x guidance intervals (t_min, t_max) x guidance
scales omega, each point scored on ``num_search`` samples; then the full ``num_final`` samples (50k for ImageNet) at the
best point, with IS.

The final run uses seed ``final_seed`` (default ``seed + 1``): its samples share no noise with the search's, so the
reported number carries no selection bias from having picked the minimum over the grid.

Outputs (rank 0 writes) in ``out_dir``: ``search.json`` (grid rows, best point, final metrics, settings),
``search.csv`` (one row per grid point) and ``search.png`` (distance vs omega, one line per interval, one panel per
EMA; the best point starred).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from pmf.eval.generate import Metric, evaluate_generator
from pmf.parallel import dist
from pmf.util.atomic import atomic_write_bytes

CSV_FIELDS = ("ema", "omega", "t_min", "t_max", "n", "steps")


def plot_search(rows: list[dict], key: str, best: dict, path: Path) -> Path:
    """Distance vs omega, one line per interval, one panel per EMA (matplotlib's Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    emas = list(dict.fromkeys(r["ema"] for r in rows))
    fig = Figure(figsize=(5.0 * len(emas), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(emas), squeeze=False)[0]
    for ax, ema in zip(axes, emas):
        intervals = list(dict.fromkeys((r["t_min"], r["t_max"]) for r in rows if r["ema"] == ema))
        for lo, hi in intervals:
            pts = sorted((r["omega"], r[key]) for r in rows if r["ema"] == ema and (r["t_min"], r["t_max"]) == (lo, hi))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"[{lo:g}, {hi:g}]")
        if best["ema"] == ema:
            ax.plot([best["omega"]], [best[key]], marker="*", markersize=14, color="k", linestyle="none", label="best")
        ax.set_title(ema)
        ax.set_xlabel("guidance scale omega")
        ax.set_ylabel(key.upper())
        ax.grid(alpha=0.3)
        ax.legend(title="interval", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())
    return path


def guidance_search(
    load_net: Callable[[str], object],
    metric: Metric,
    emas: Sequence[str],
    omegas: Sequence[float],
    intervals: Sequence[tuple[float, float]],
    num_search: int,
    num_final: int,
    out_dir,
    steps: int = 1,
    noise_scale: float | None = None,
    batch_size: int = 256,
    seed: int = 0,
    final_seed: int | None = None,
    device="cpu",
    log: Callable[[str], None] | None = None,
) -> dict:
    """Score every (ema, interval, omega) on ``num_search`` samples with ``steps`` steps, pick the argmin of the
    distance (``metric.fd_key``; first in grid order on ties), then evaluate ``num_final`` samples there (IS too
    when the metric has it). ``load_net(ema_name)`` returns the network (eval mode, on ``device``); ``noise_scale``
    defaults to the network's own ``noise_scale`` (PMFDiT keeps the one it was trained with). Every rank runs
    this (generation is split over ranks, see :func:`pmf.eval.generate.evaluate_generator`); rank 0 writes the files.
    Returns the content of ``search.json``."""
    log = log or dist.print0
    if not (emas and omegas and intervals):
        raise ValueError("need at least one EMA, one omega and one interval")
    key = metric.fd_key
    out_dir = Path(out_dir)
    final_seed = seed + 1 if final_seed is None else final_seed
    common = dict(batch_size=batch_size, device=device)

    def scale(net) -> float:
        return float(getattr(net, "noise_scale", 1.0)) if noise_scale is None else noise_scale

    rows = []
    for ema in emas:
        net = load_net(ema)
        for (t_min, t_max), omega in itertools.product(intervals, omegas):
            res = evaluate_generator(net, metric, num_search, (steps,), scale(net), omega, t_min, t_max, seed=seed,
                                     inception_score=False, **common)
            row = {"ema": ema, "omega": float(omega), "t_min": float(t_min), "t_max": float(t_max), "n": num_search,
                   "steps": steps, key: res[f"{key}_{steps}step"]}
            if f"class_acc_{steps}step" in res:
                row["class_acc"] = res[f"class_acc_{steps}step"]
            rows.append(row)
            log(f"guidance search {len(rows)}/{len(emas) * len(intervals) * len(omegas)}: {ema} omega {omega:g} "
                f"interval [{t_min:g}, {t_max:g}]: {key} {row[key]:.4f}")
        del net
    scores = [r[key] if math.isfinite(r[key]) else math.inf for r in rows]
    best = rows[min(range(len(rows)), key=scores.__getitem__)]
    log(f"best: {best['ema']} omega {best['omega']:g} interval [{best['t_min']:g}, {best['t_max']:g}]; "
        f"evaluating {num_final} samples")
    net = load_net(best["ema"])
    res = evaluate_generator(net, metric, num_final, (steps,), scale(net), best["omega"], best["t_min"],
                             best["t_max"], seed=final_seed, **common)
    final = {"ema": best["ema"], "omega": best["omega"], "t_min": best["t_min"], "t_max": best["t_max"],
             "n": num_final, "steps": steps, "seed": final_seed, "noise_scale": scale(net),
             **{k.removesuffix(f"_{steps}step"): v for k, v in res.items()}}
    result = {"metric": key, "grid": rows, "best": best, "final": final,
              "settings": {"emas": list(emas), "omegas": [float(w) for w in omegas],
                           "intervals": [list(map(float, i)) for i in intervals], "num_search": num_search,
                           "num_final": num_final, "steps": steps, "seed": seed, "final_seed": final_seed,
                           **metric.info}}
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / "search.json", (json.dumps(result, indent=2) + "\n").encode())
        fields = list(CSV_FIELDS) + [k for k in rows[0] if k not in CSV_FIELDS]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(out_dir / "search.csv", text.getvalue().encode())
        plot_search(rows, key, best, out_dir / "search.png")
        log(f"final ({num_final} samples): " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()
                                                        if isinstance(v, float) and k not in CSV_FIELDS))
        log(f"wrote {out_dir}/search.json, search.csv, search.png")
    return result
