"""A newcomer's two stumbles: the progress bar under --minutes, and sampling a run before its first export."""

import json

import pytest
import torch

from pmf.errors import PmfError
from pmf.train.progress import bar_total


def test_bar_total_follows_the_time_budget():
    """10 min at 100 img/s: the bar ends near 60k images, not at total_kimg; without --minutes, or before any step
    was timed, it is total_kimg; it never ends before the images already seen, nor after total_kimg."""
    t0 = 1000.0
    # 30 s into the loop at 100 img/s (3000 images), deadline 600 s after t0: 3000 + 570 * 100 images reachable.
    assert bar_total(500_000, 3000, 0, t0, t0 + 600, t0 + 30) == 3000 + 57_000
    assert bar_total(500_000, 3000, 0, t0, None, t0 + 30) == 500_000
    assert bar_total(500_000, 0, 0, t0, t0 + 600, t0) == 500_000
    assert bar_total(40_000, 3000, 0, t0, t0 + 600, t0 + 30) == 40_000
    assert bar_total(500_000, 3000, 0, t0, t0 + 10, t0 + 30) == 3000  # past the deadline


def test_training_bar_total_under_minutes(tmp_path, monkeypatch):
    """`pmf train --minutes`: the bar's final total is the images the run reached (within a step), far below the
    preset's total."""
    import tqdm

    from pmf.train.config import load_config
    from pmf.train.loop import train

    bars = []

    class Recording(tqdm.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            bars.append(self)

    monkeypatch.setattr(tqdm, "tqdm", Recording)
    cfg = load_config("tiny-test", None, ["train.total_kimg=1000", "train.batch_size=8", "data.path=",
                                          "train.ckpt_every_kimg=1000"])
    try:
        summary = train(cfg, tmp_path / "run", minutes=0.1)
    except (OSError, RuntimeError) as e:  # Fashion-MNIST not available offline
        pytest.skip(f"Fashion-MNIST unavailable: {e}")
    assert summary["stop_reason"] == "time budget"
    nimg = int(round(summary["kimg"] * 1000))
    assert bars and nimg - 8 * 3 <= bars[0].total <= nimg + 8 * 3 < 1_000_000


def _tiny_run(tmp_path):
    from pmf.train.config import load_config
    from pmf.train.loop import train

    cfg = load_config("tiny-test", None, ["train.total_kimg=0.032", "train.batch_size=16"])
    try:
        train(cfg, tmp_path / "run", quiet=True)
    except (OSError, RuntimeError) as e:
        pytest.skip(f"Fashion-MNIST unavailable: {e}")
    return tmp_path / "run"


def test_sample_before_first_export_uses_training_state(tmp_path):
    """A run whose export/ is gone (as before the first export) samples from its newest training state: the same
    weights as the export of the same EMA copy."""
    import shutil

    from pmf.method.model import PMFDiT
    from pmf.train.load import load_checkpoint

    run = _tiny_run(tmp_path)
    exported = PMFDiT.from_pretrained(run / "export" / "ema_hl1")
    shutil.rmtree(run / "export")
    net, meta = load_checkpoint(str(run))
    assert meta["ema"] == "ema_hl1" and "training state" in meta["source"]
    assert all(torch.equal(v, exported.state_dict()[k]) for k, v in net.state_dict().items())
    raw, meta = load_checkpoint(str(run), "model")
    assert meta["ema"] == "model" and not all(torch.equal(v, net.state_dict()[k]) for k, v in raw.state_dict().items())


def test_sample_with_no_weights_says_when(tmp_path):
    """A run with only config.json: one line saying when the first weights will exist (exit status 2)."""
    from pmf.cli import main
    from pmf.train.load import load_checkpoint
    from pmf.train.config import load_config, to_json

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(to_json(load_config("tiny-test")))
    with pytest.raises(PmfError, match=r"no weights yet .* train.ckpt_every_kimg=0.128 kimg"):
        load_checkpoint(str(tmp_path / "run"))
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "g.png")]) == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]
