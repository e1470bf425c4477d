"""The bounded training grid (pmf.train.loop.sample_grid): at most 64 images, classes spread over the label set,
fixed seeds, sampled in chunks under the training precision, a PNG a few hundred pixels wide; each tile is the
image its (class, seed) gives when sampled alone."""

import numpy as np
import pytest
import torch
from PIL import Image

from pmf.data.images import to_uint8
from pmf.method.model import build_model
from pmf.method.sampler import noise_from_seeds, sample
from pmf.train.config import load_config
from pmf.train.loop import GRID_CHUNK, grid_layout, sample_grid

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(**kw):
    torch.manual_seed(0)
    net = build_model("pMF-tiny", v_head=False, **kw).eval()
    with torch.no_grad():  # non-zero output layer: tiles differ by class and seed
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


def test_layout_is_bounded_and_spread():
    assert grid_layout(10) == (list(range(10)), 6)  # every Fashion-MNIST class, 60 images
    assert grid_layout(3) == ([0, 1, 2], 8)
    classes, rows = grid_layout(1000)
    assert classes == [0, 125, 250, 375, 500, 625, 750, 875] and rows == 8
    for c in (1, 2, 7, 16, 17, 100, 1000, 21843):
        classes, rows = grid_layout(c)
        assert len(classes) * rows <= 64 and len(set(classes)) == len(classes) and max(classes) < c


def test_grid_of_a_1000_class_model(tmp_path):
    net = _net(num_classes=1000)
    cfg = load_config("tiny-test", overrides=["train.precision=bf16", "sample.grid_seed=3"])
    calls = []
    forward = net.forward

    def spy(z, *args, **kwargs):
        calls.append((z.shape[0], torch.is_autocast_enabled("cpu")))
        return forward(z, *args, **kwargs)

    net.forward = spy
    path = sample_grid(net, cfg, 1000, tmp_path / "grid.png")
    assert len(calls) == 4 and all(b <= GRID_CHUNK and bf16 for b, bf16 in calls)  # 64 images in 4 bf16 chunks
    img = np.asarray(Image.open(path))
    assert 200 <= img.shape[1] <= 800 and img.shape[0] <= img.shape[1] * 1.1  # 8 x 8 tiles, ~640 px wide
    # tile (row 2, column 5) is class 625 from seed 3 * 100000 + 2 * 8 + 5, sampled on its own
    net.forward = forward
    i = 2 * 8 + 5
    noise = noise_from_seeds([3 * 100000 + i], (1, 8, 8), cfg.objective.noise_scale)
    with torch.autocast("cpu", torch.bfloat16):
        alone = to_uint8(sample(net, noise, torch.tensor([625]), 1, cfg.sample.omega, cfg.sample.t_min,
                                cfg.sample.t_max).float())[0, 0].numpy()
    scale = img.shape[1] // (8 * (8 + 2) + 2)  # 8-px tiles with 2-px borders, enlarged (nearest) by an integer
    grid = img[::scale, ::scale]
    tile = grid[2 + 2 * 10: 2 + 2 * 10 + 8, 2 + 5 * 10: 2 + 5 * 10 + 8]
    diff = np.abs(tile.astype(int) - alone.astype(int))
    assert diff.max() <= 8 and diff.mean() < 1.5  # bf16: the batch shape changes the rounding a little
    other = grid[2 + 2 * 10: 2 + 2 * 10 + 8, 2 + 4 * 10: 2 + 4 * 10 + 8]  # the neighbouring class differs
    assert np.abs(other.astype(int) - alone.astype(int)).mean() > 10


def test_large_images_are_averaged_down(tmp_path):
    net = _net(num_classes=1000, input_size=128, patch_size=32)
    path = sample_grid(net, load_config("tiny-test"), 1000, tmp_path / "g.png")
    w = Image.open(path).width
    assert 200 <= w <= 800  # 8 x 128 px = 1024 px of samples, pooled 2x
