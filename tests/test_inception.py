"""The FID InceptionV3 without its weights: the state-dict layout of the published file (golden key list), output
shapes, the preprocessing (resize modes, value scaling, grey input), the FID-specific pooling, and strict loading."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pmf.data.images import to_model_range
from pmf.eval import inception as inc

GOLDEN = Path(__file__).parent / "golden" / "inception_keys.txt"
TOP_LEVEL = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "Mixed_5b",
             "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b",
             "Mixed_7c", "fc"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return inc.InceptionV3FID().eval().requires_grad_(False)


def golden_layout() -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in GOLDEN.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split()
            rows.append((name, tuple(int(d) for d in shape.split(","))))
    return rows


def test_state_dict_matches_the_published_layout(model):
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert ours == golden_layout()  # names, shapes and order (94 conv + BN units, then fc 2048 -> 1008)
    assert [name for name, _ in model.named_children()] == TOP_LEVEL
    assert not any(k.startswith("AuxLogits") for k, _ in ours)
    # torchvision's inception_v3 has 27,161,264 parameters; minus its aux head (conv 768->128 1x1 + BN, conv
    # 128->768 5x5 + BN, fc 768->1000: 3,326,696), plus 8 more logits (8 * 2048 + 8 = 16,392)
    assert sum(p.numel() for p in model.parameters()) == 27_161_264 - 3_326_696 + 16_392
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 94 and all(m.eps == 1e-3 for m in bns)


def test_output_shapes_and_input_forms(model):
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (1, 3, 37, 23), dtype=torch.uint8, generator=g)
    pool, logits = model(u8)
    assert pool.shape == (1, inc.FEATURE_DIM) == (1, 2048) and logits.shape == (1, 1008)
    assert pool.dtype == logits.dtype == torch.float32 and torch.isfinite(pool).all()
    f, is_logits = model.features_and_logits(u8)
    torch.testing.assert_close(f, pool)
    torch.testing.assert_close(is_logits, logits - model.fc.bias, rtol=1e-5, atol=1e-7)  # IS logits: no fc bias
    # preprocessing: uint8 and its [-1, 1] image agree; grey is RGB with equal channels; values (v - 128) / 128
    x = model.preprocess(u8)
    assert x.shape == (1, 3, 299, 299)
    torch.testing.assert_close(model.preprocess(to_model_range(u8)), x, rtol=0, atol=1e-5)
    grey = u8[:, :1]
    torch.testing.assert_close(model.preprocess(grey), model.preprocess(grey.expand(-1, 3, -1, -1)))
    full = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8, generator=g)
    torch.testing.assert_close(model.preprocess(full), (full.float() - 128) / 128, rtol=0, atol=0)
    with pytest.raises(ValueError):
        model.preprocess(torch.zeros(1, 2, 8, 8, dtype=torch.uint8))


def test_resize_modes():
    g = torch.Generator().manual_seed(1)
    for size_in in [(28, 28), (512, 384)]:  # up and down (no antialias in either pipeline)
        x = torch.rand(1, 3, *size_in, generator=g, dtype=torch.float64) * 255
        ref = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        torch.testing.assert_close(inc.resize_bilinear(x, 299, "torch"), ref, rtol=0, atol=1e-9)
    # TF1 ResizeBilinear, align_corners = False: source coordinate i * in / out, no half-pixel shift, clamped
    a, b = 10.0, 30.0
    x = torch.tensor([[a, b], [a, b]], dtype=torch.float64).view(1, 1, 2, 2)
    assert inc.resize_bilinear(x, 4, "tf1")[0, 0, 0].tolist() == [a, (a + b) / 2, b, b]
    x = torch.arange(16.0, dtype=torch.float64).view(1, 1, 4, 4)
    torch.testing.assert_close(inc.resize_bilinear(x, 2, "tf1"), x[..., ::2, ::2])  # 4 -> 2 picks rows 0, 2
    torch.testing.assert_close(inc.resize_bilinear(x, 4, "tf1"), x)
    with pytest.raises(ValueError):
        inc.InceptionV3FID(resize="bicubic")


def test_fid_pooling_variants(model):
    """FIDInceptionA/C/E_1 average without the padding; E_2 (Mixed_7c) max-pools in its pool branch."""
    g = torch.Generator().manual_seed(2)
    const = torch.full((1, 288, 7, 7), 0.5)
    out = model.Mixed_5d(const)[:, -64:]  # the pool branch of a constant input: constant when padding is ignored
    assert (out - out[..., :1, :1]).abs().max() < 1e-6
    x = torch.randn(1, 1280, 5, 5, generator=g)
    e1 = model.Mixed_7b
    torch.testing.assert_close(e1(x)[:, -192:], e1.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)))
    x = torch.randn(1, 2048, 5, 5, generator=g)
    e2 = model.Mixed_7c
    torch.testing.assert_close(e2(x)[:, -192:], e2.branch_pool(F.max_pool2d(x, 3, 1, 1)))


def test_load_inception_strict(tmp_path, model, monkeypatch):
    monkeypatch.delenv(inc.ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError) as e:
        inc.load_inception(tmp_path / "missing.pth")
    msg = str(e.value)
    assert inc.WEIGHTS_URL in msg and "github.com/mseitzer/pytorch-fid/releases" in msg and "--inception" in msg
    with pytest.raises(FileNotFoundError, match=inc.ENV_VAR):
        inc.load_inception(None)
    # a file laid out like the published one (no num_batches_tracked counters) loads; the weights arrive
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / inc.WEIGHTS_NAME
    torch.save(state, path)
    monkeypatch.setenv(inc.ENV_VAR, str(path))
    loaded = inc.load_inception()
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(loaded.Mixed_7c.branch_pool.conv.weight, model.Mixed_7c.branch_pool.conv.weight)
    torch.testing.assert_close(loaded.fc.bias, model.fc.bias)
    # anything else is refused: an extra key, a missing key, a wrong shape
    for bad in ({**state, "AuxLogits.fc.bias": torch.zeros(1000)},
                {k: v for k, v in state.items() if k != "fc.bias"},
                {**state, "fc.weight": torch.zeros(1000, 2048)}):
        torch.save(bad, path)
        with pytest.raises(ValueError, match="not the FID Inception"):
            inc.load_inception(path)


def test_spatial_features_are_mixed_6d_branch1x1_first_7_channels_nhwc(model):
    """sFID's features (ADM: ``mixed_6/conv:0``, ``[..., :7]``, flattened NHWC) are the post-ReLU output of
    Mixed_6d's 1x1 branch inside the ordinary forward pass, captured here with a hook; extract() returns the same
    pool features as forward() and the unbiased logits."""
    g = torch.Generator().manual_seed(3)
    u8 = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8, generator=g)
    seen = {}
    hook = model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.setdefault("out", o.clone()))
    try:
        pool, logits = model(u8)
    finally:
        hook.remove()
    out = model.extract(u8)
    assert seen["out"].shape == (2, 192, 17, 17) and out["spatial"].shape == (2, inc.SPATIAL_DIM) == (2, 2023)
    want = seen["out"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # (h, w, c) order: index (h * 17 + w) * 7 + c
    torch.testing.assert_close(out["spatial"], want, rtol=0, atol=0)
    assert out["spatial"][1, (5 * 17 + 2) * 7 + 4] == seen["out"][1, 4, 5, 2]
    assert (out["spatial"] >= 0).all()  # after the ReLU, as the TF graph's mixed_6/conv
    torch.testing.assert_close(out["pool"], pool, rtol=0, atol=0)
    torch.testing.assert_close(out["logits"], logits - model.fc.bias, rtol=1e-5, atol=1e-6)
