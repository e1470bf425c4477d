"""Guidance search with tiny random models and a random-weight extractor (CPU, seconds): the grid, the argmin, the
final run at the best point, the files, and the ``pmf guidance-search`` command."""

import csv
import itertools
import json

import numpy as np
import pytest
import torch

from pmf.eval.generate import Metric, compute_stats, evaluate_generator, generate
from pmf.eval.guidance_search import guidance_search
import pmf.eval.metrics
from pmf.method.model import MODELS, PMFDiT


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def tiny_net(seed):
    torch.manual_seed(seed)
    net = PMFDiT(**{**MODELS["pMF-tiny"].kwargs, "v_head": False})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():  # off the zero init, so the samples depend on omega and the interval
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return net.eval()


def extractor_fn(seed=0):
    g = torch.Generator().manual_seed(seed)
    wf, wl = torch.randn(64, 6, generator=g), torch.randn(64, 5, generator=g)

    def extractor(x):
        v = x.float().flatten(1) / 127.5 - 1
        return v @ wf, v @ wl

    return extractor


OMEGAS = [1.0, 1.5, 2.0]
INTERVALS = [(0.0, 1.0), (0.2, 0.8)]
NUM_SEARCH = 20


def test_guidance_search_grid_argmin_final_and_files(tmp_path):
    nets = {"ema_a": tiny_net(0), "ema_b": tiny_net(1)}
    extractor = extractor_fn()
    # The reference is the search set of one grid point itself (same net, guidance and seeds): its distance is 0
    # there and positive elsewhere, so the search must pick exactly that point.
    target = dict(ema="ema_b", omega=1.5, t_min=0.2, t_max=0.8)
    images = generate(nets["ema_b"], NUM_SEARCH, 3, (1, 8, 8), 1.0, 1, 1.5, 0.2, 0.8, batch_size=8, seed=0)
    reference = compute_stats(images, extractor).mean_cov()
    metric = Metric(extractor, reference, "fd", accuracy=False, is_classes=5, info={"extractor": "random"})
    loads = []

    def load_net(name):
        loads.append(name)
        return nets[name]

    res = guidance_search(load_net, metric, ["ema_a", "ema_b"], OMEGAS, INTERVALS, NUM_SEARCH, 30, tmp_path / "gs",
                          batch_size=8, seed=0, log=lambda s: None)
    grid = res["grid"]
    assert len(grid) == 2 * len(INTERVALS) * len(OMEGAS) == 12
    assert [(r["ema"], (r["t_min"], r["t_max"]), r["omega"]) for r in grid] == list(
        itertools.product(["ema_a", "ema_b"], INTERVALS, OMEGAS))  # every point once, in grid order
    assert all(r["n"] == NUM_SEARCH and np.isfinite(r["fd"]) for r in grid)
    fds = [r["fd"] for r in grid]
    best = res["best"]
    assert best == grid[int(np.argmin(fds))]
    assert {k: best[k] for k in target} == target and best["fd"] < 1e-6 * max(fds)
    assert loads == ["ema_a", "ema_b", "ema_b"]  # each EMA once for the grid, then the best one again
    # final: the full count at the best point, with seed + 1 (no samples shared with the search), IS included
    final = res["final"]
    assert final["n"] == 30 and final["seed"] == 1 and {"fd", "is", "is_std"} <= final.keys()
    direct = evaluate_generator(nets["ema_b"], metric, 30, (1,), omega=1.5, t_min=0.2, t_max=0.8, batch_size=8,
                                seed=1)
    assert final["fd"] == pytest.approx(direct["fd_1step"], rel=1e-12) and final["fd"] > 0
    assert final["is"] == pytest.approx(direct["is_1step"], rel=1e-12)
    # files: JSON = the returned dict, CSV one row per grid point, a PNG plot
    out = tmp_path / "gs"
    assert json.loads((out / "search.json").read_text()) == json.loads(json.dumps(res))
    with open(out / "search.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and rows[0].keys() >= {"ema", "omega", "t_min", "t_max", "n", "fd"}
    assert [float(r["fd"]) for r in rows] == pytest.approx(fds, rel=1e-12)
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["search.csv", "search.json", "search.png"]


def test_cli_guidance_search(tmp_path, monkeypatch):
    from pmf.cli import main

    run = tmp_path / "run"
    meta = {"noise_scale": 1.0, "omega": 1.0, "t_min": 0.0, "t_max": 1.0}
    for i, name in enumerate(["ema_hl500", "model"]):
        tiny_net(i).save_pretrained(run / "export" / name, meta=meta)
    (run / "config.json").write_text(json.dumps({"sample": {"ema": "ema_hl500"}}))
    rng = np.random.default_rng(0)
    metric = Metric(extractor_fn(), (rng.standard_normal(6), np.eye(6)), "fid", accuracy=False, is_classes=5)
    monkeypatch.setattr(pmf.eval.metrics, "setup_metric", lambda *a, **k: metric)
    out = tmp_path / "gs"
    argv = ["guidance-search", "--checkpoint", str(run), "--extractor", "inception", "--omegas", "1", "2",
            "--interval", "0.0", "1.0", "--interval", "0.1", "0.8", "--emas", "ema_hl500", "model", "--num-search", "12",
            "--num-final", "15", "--batch-size", "6", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    res = json.loads((out / "search.json").read_text())
    assert len(res["grid"]) == 8 and res["metric"] == "fid" and res["final"]["n"] == 15
    assert res["best"] == min(res["grid"], key=lambda r: r["fid"])
    assert {r["ema"] for r in res["grid"]} == {"ema_hl500", "model"}
    assert (out / "search.csv").exists() and (out / "search.png").exists()
