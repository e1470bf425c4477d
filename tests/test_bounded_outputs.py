"""Outputs that grow with --num are written batch by batch (memory does not grow with N), and a request the disk
or memory cannot hold is refused before work with the size it needs (pmf.data.images writers, pmf.io.userfiles)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pmf.cli import main as cli_main
from pmf.data.images import npz_sample_writer, png_grid_writer, save_grid
from pmf.errors import EXIT_USAGE
import pmf.io.userfiles
from pmf.method.model import PMFDiT

KW = dict(input_size=4, patch_size=4, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=3,
          aux_head_depth=1, bottleneck_dim=4, num_class_tokens=1, num_time_tokens=1, num_cfg_tokens=1,
          num_interval_tokens=2, v_head=False)
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    torch.manual_seed(0)
    PMFDiT(**KW).save_pretrained(root, meta={"noise_scale": 1.0, "omega": 1.0})
    return root


@pytest.mark.parametrize("channels,n,nrow,scale", [(1, 13, 4, 3), (3, 7, 3, 1), (3, 1, 5, 2), (1, 8, 8, 1)])
def test_the_streamed_grid_has_the_pixels_of_save_grid(tmp_path, channels, n, nrow, scale):
    x = torch.randint(0, 256, (n, channels, 6, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    save_grid(x, tmp_path / "whole.png", nrow=nrow, scale=scale)
    with png_grid_writer(tmp_path / "streamed.png", n, nrow, channels, 6, 5, scale) as w:
        for part in x.split(3):
            w.write(part)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "whole.png")),
                          np.asarray(Image.open(tmp_path / "streamed.png")))


def test_the_streamed_archive_round_trips_images_and_labels(tmp_path):
    x = torch.randint(0, 256, (11, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(11) * 7 - 20
    with npz_sample_writer(tmp_path / "s.npz", 11, 4, 4, 3) as w:
        for i in range(0, 11, 4):
            w.write(x[i : i + 4], y[i : i + 4])
    with np.load(tmp_path / "s.npz") as f:
        assert np.array_equal(f["arr_0"], x.permute(0, 2, 3, 1).numpy())
        assert f["arr_1"].dtype == np.int64 and np.array_equal(f["arr_1"], y.numpy())
    assert sorted(os.listdir(tmp_path)) == ["s.npz"]  # the label spool is gone


@pytest.mark.parametrize("out,expect", [("big.npz", "1000000000000 samples of 4 x 4 x 1 need 32.0 TB"),
                                        ("big.png", "a grid of 1000000000000 samples need")])
def test_an_output_the_disk_cannot_hold_is_refused_before_sampling(export, tmp_path, capsys, monkeypatch, out,
                                                                   expect):
    monkeypatch.setattr("pmf.method.sampler.sample", lambda *a, **k: pytest.fail("sampled before the size check"))
    rc = cli_main(["sample", "--checkpoint", str(export), "--device", "cpu", "--num", str(10**12), "--out",
                   str(tmp_path / out)])
    err = capsys.readouterr().err.strip()
    assert rc == EXIT_USAGE and len(err.splitlines()) == 1, err
    assert expect in err and "are free on" in err and "lower --num" in err, err
    assert os.listdir(tmp_path) == []  # nothing written


def test_evaluations_too_large_for_memory_or_the_seeds_are_refused(export, tmp_path, capsys, monkeypatch):
    rc = cli_main(["eval", "--checkpoint", str(export), "--device", "cpu", "--num", str(10**7 + 1)])
    err = capsys.readouterr().err.strip()
    assert rc == EXIT_USAGE and "--num=10000001 exceeds 10,000,000" in err, err
    np.savez(tmp_path / "s.npz", np.zeros((1000, 28, 28, 1), np.uint8), np.zeros(1000, np.int64))
    monkeypatch.setattr(pmf.io.userfiles, "available_memory", lambda: 10**6)  # 1 MB left
    monkeypatch.setattr("pmf.eval.samples.fmnist_extractor_and_reference", lambda *a, **k: pytest.fail("too late"))
    rc = cli_main(["eval-samples", "--samples", str(tmp_path / "s.npz"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == EXIT_USAGE and "evaluating 1,000 samples needs 1.1 MB of memory" in err and "--num" in err, err


def _default_sigint():
    """In the child before exec: SIGINT back to its default. A suite started in the background by a shell without job
    control inherits SIGINT ignored, and Python then keeps ignoring it (no KeyboardInterrupt): the interrupt below
    would be lost and the run would finish its archive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _peak_rss_while_sampling(export, out: Path, num: int, written: int) -> int:
    """Run `pmf sample --num NUM --out OUT.npz`, wait until ``written`` samples are in its temp file, read the
    process's peak resident memory (VmHWM), then interrupt it (SIGINT: the temp file is removed)."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pmf", "sample", "--checkpoint", str(export), "--device", "cpu",
                             "--num", str(num), "--batch-size", "500", "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            tmps = [p for p in out.parent.glob(f".{out.name}.*.tmp")]
            if tmps and tmps[0].stat().st_size >= written * 16:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        status = Path(f"/proc/{proc.pid}/status").read_text()
        peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert list(out.parent.iterdir()) == []  # interrupted: no archive and no temp file left behind
    return peak


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_peak_memory_of_sample_does_not_grow_with_num(export, tmp_path):
    """--num 10,000 and --num 20,000,000, each stopped after 2,000 samples: the same peak memory (the labels of all
    N samples once sat in a Python list and an array: +320 MB at 20 M)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    small = _peak_rss_while_sampling(export, tmp_path / "a" / "s.npz", 10_000, 2000)
    big = _peak_rss_while_sampling(export, tmp_path / "b" / "s.npz", 20_000_000, 2000)
    assert big - small < 40e6, (small, big)
