"""pmf.method.perceptual: paired RandomResizedCrop, LPIPS-VGG16, ConvNeXt-V2 feature loss, the hook in pmf_loss
(official `utils/auxloss_util.py`). Backbones have random weights (no downloads); crops are tiny (32 px) and the
ConvNeXt
and VGG widths small, so the suite runs in seconds. Full-size modules are built on the meta device (shapes only)."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pmf.method.model import build_model
from pmf.method.objective import ObjectiveConfig, pmf_loss, sample_draws
from pmf.method.rng import PerSampleGenerator
from pmf.method.perceptual import (
    CONVNEXT_V2_BASE,
    GRN,
    LPIPS,
    LPIPS_TAPS,
    ConvNeXtV2,
    PerceptualConfig,
    PerceptualLoss,
    build_perceptual,
    convnext_state_to_hf,
    crop_params_from_uniforms,
    crop_uniforms,
    load_convnext,
    load_lpips,
    paired_random_resized_crop,
    resized_crop,
    sample_crop_params,
    unit_normalize,
)

TINY_VGG = (4, 8, 8, 16, 16)
TINY_CNX = dict(depths=(1, 1, 2, 1), dims=(8, 16, 16, 32))
CROP = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _tiny_lpips(seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = LPIPS(TINY_VGG)
    with torch.no_grad():  # LPIPS heads are non-negative in the published weights
        for k in range(5):
            getattr(m, f"lin{k}").model[1].weight.uniform_(0.1, 1.0)
    return m


def _tiny_convnext(seed=1):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = ConvNeXtV2(**TINY_CNX)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "grn" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return m


def _hook(seed=0):
    return PerceptualLoss(_tiny_lpips(seed), _tiny_convnext(seed + 1), crop_size=CROP)


def _images(B, C=3, H=16, W=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, C, H, W, generator=g) * 2 - 1


# ----------------------------------------------------------------------------------------------------------------
# Crop (official utils/auxloss_util.py: paired_random_resized_crop)


def _official_rule(u, H, W, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """The official ``sample_params`` written as scalar Python, fed from the same 4 uniforms: one draw, sides
    rounded (half to even) and clipped to [1, H] / [1, W], top and left uniform integers over the valid range."""
    target = H * W * (scale[0] + (scale[1] - scale[0]) * float(u[0]))
    lr = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = math.exp(lr[0] + (lr[1] - lr[0]) * float(u[1]))
    w = min(max(round(math.sqrt(target * aspect)), 1), W)
    h = min(max(round(math.sqrt(target / aspect)), 1), H)
    return [int(float(u[2]) * (H - h + 1)), int(float(u[3]) * (W - w + 1)), h, w]


@pytest.mark.parametrize("H,W", [(16, 16), (28, 28), (12, 40), (40, 9), (256, 256)])
def test_crop_params_follow_the_official_rule(H, W):
    """The vectorised rule equals the scalar official one on 3000 random draws; boxes lie inside the image."""
    u = torch.rand(3000, 4, generator=torch.Generator().manual_seed(H * W), dtype=torch.float64)
    got = crop_params_from_uniforms(u, H, W)
    want = torch.tensor([_official_rule(u[i], H, W) for i in range(len(u))])
    assert torch.equal(got, want)
    top, left, h, w = got.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    assert (h >= 1).all() and (w >= 1).all()


def test_crop_params_distribution():
    """20000 boxes on a 256 x 256 image: the area fraction h w / (H W) has the CDF of U(0.08, 1) (below 0.7, where
    no side can be clipped), log(w / h) that of U(log 3/4, log 4/3) (on those boxes), top / left are uniform over
    the valid range, every box lies inside the image, and near-whole-image draws are clipped (not redrawn)."""
    H = W = 256
    n = 20000
    top, left, h, w = sample_crop_params(n, H, W, torch.Generator().manual_seed(0)).double().T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    frac = h * w / (H * W)
    for q in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7):
        assert abs((frac <= q).double().mean().item() - (q - 0.08) / 0.92) < 0.015, q
    small = frac < 0.7
    log_aspect = torch.log(w[small] / h[small])
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    for q in torch.linspace(lo, hi, 9)[1:-1].tolist():
        assert abs((log_aspect <= q).double().mean().item() - (q - lo) / (hi - lo)) < 0.02, q
    for pos, side in ((top, h), (left, w)):
        room = side <= H - 100  # uniform on {0..H-side}, >= 101 values: pos / (H - side) is ~U(0, 1) to 0.005
        rel = pos[room] / (H - side[room])
        for q in (0.25, 0.5, 0.75):
            assert abs((rel <= q).double().mean().item() - q) < 0.02
    assert ((h == H) | (w == W)).sum() > 0  # clipped sides occur (torchvision would redraw instead)


def test_paired_crop_uses_one_box_for_both_images():
    """Both images get the same box per sample: crops of x and x + 0.5 differ by exactly 0.5 everywhere (the
    weights sum to 1), crops of x and x are equal, and the samples' boxes differ."""
    a = _images(6, seed=1)
    a_c, b_c = paired_random_resized_crop(a, a + 0.5, CROP, PerSampleGenerator([11, 12, 13, 14, 15, 16]))
    torch.testing.assert_close(b_c - a_c, torch.full_like(a_c, 0.5), atol=1e-5, rtol=0)
    a_c2, b_c2 = paired_random_resized_crop(a, a.clone(), CROP, PerSampleGenerator([11, 12, 13, 14, 15, 16]))
    assert torch.equal(a_c2, b_c2) and torch.equal(a_c2, a_c)
    params = sample_crop_params(6, 16, 16, PerSampleGenerator([11, 12, 13, 14, 15, 16]))
    assert len({tuple(p) for p in params.tolist()}) > 1
    assert torch.equal(resized_crop(a, params, CROP), a_c)


@pytest.mark.parametrize("H,W", [(224, 224), (28, 28), (256, 256), (20, 30)])
def test_full_image_box_reproduces_the_input_up_to_resampling(H, W):
    """A whole-image box is the input resampled: exactly the input at 224 x 224 (the cubic kernel is 1 at 0 and 0
    at +-1, +-2), and torch's own antialiased bicubic resize (Keys a = -0.5, renormalised at the borders) elsewhere.
    scale = (1, 1) with the image's own aspect makes the sampled box the whole image."""
    x = torch.randn(3, 2, H, W, generator=torch.Generator().manual_seed(H), dtype=torch.float64)
    a, b = paired_random_resized_crop(x, x.clone(), 224, torch.Generator().manual_seed(1), scale=(1.0, 1.0),
                                      ratio=(W / H, W / H))
    ref = x if (H, W) == (224, 224) else F.interpolate(x, size=(224, 224), mode="bicubic", antialias=True,
                                                        align_corners=False)
    torch.testing.assert_close(a, ref, atol=1e-12, rtol=0)
    assert torch.equal(a, b)


def test_interior_crop_of_a_linear_ramp_is_the_ramp_at_half_pixel_centres():
    """Keys' cubic reproduces linear functions, so away from the image border the crop of I(y, x) = a y + b x + c
    is the ramp sampled at the box's half-pixel centres, top + (i + 0.5) h / S - 0.5: checks the box's position
    and scale, per sample. Enlarging: exact for any box. Shrinking (the kernel widened by h / S): exact when h / S
    is an integer (then the taps lie symmetrically around each centre), here 2."""
    H, W, S = 64, 80, 24
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    img = (0.3 * yy - 0.7 * xx + 2.0).expand(2, 1, H, W)
    params = torch.tensor([[8, 20, 48, 48], [20, 9, 7, 11]])  # 48 x 48 -> 24: shrink; 7 x 11 -> 24: enlarge
    out = resized_crop(img, params, S)
    i = torch.arange(S, dtype=torch.float64)
    for b, (top, left, h, w) in enumerate(params.tolist()):
        ys, xs = top + (i + 0.5) * h / S - 0.5, left + (i + 0.5) * w / S - 0.5
        want = 0.3 * ys[:, None] - 0.7 * xs[None, :] + 2.0
        torch.testing.assert_close(out[b, 0], want, atol=1e-10, rtol=0)


def test_crop_reproducible_per_sample_and_independent_of_batch_position():
    """With a PerSampleGenerator a sample's box depends only on its seed (not on batch size or position); the same
    seeds replay the same boxes; a torch.Generator with the same seed replays its batch too."""
    p1 = sample_crop_params(3, 16, 16, PerSampleGenerator([5, 6, 7]))
    p2 = sample_crop_params(4, 16, 16, PerSampleGenerator([9, 7, 5, 8]))
    assert torch.equal(p1[0], p2[2]) and torch.equal(p1[2], p2[1])
    assert torch.equal(p1, sample_crop_params(3, 16, 16, PerSampleGenerator([5, 6, 7])))
    x = _images(3, seed=2)
    y1 = paired_random_resized_crop(x, x, CROP, PerSampleGenerator([5, 6, 7]))[0]
    y2 = paired_random_resized_crop(x[[2, 0]], x[[2, 0]], CROP, PerSampleGenerator([7, 5]))[0]
    torch.testing.assert_close(y1[[2, 0]], y2)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(sample_crop_params(8, 16, 16, g()), sample_crop_params(8, 16, 16, g()))


def test_crop_stream_is_not_the_objectives_stream():
    """The crop uniforms of a sample are not the first uniforms its generator gives the objective (same seed, but
    a salted, separate host stream), so the crop is independent of the sample's t, r and masks."""
    seeds = list(range(100, 164))
    u_crop = crop_uniforms(64, PerSampleGenerator(seeds))
    u_obj = torch.stack([torch.rand(4, generator=g, dtype=torch.float64)
                         for g in PerSampleGenerator(seeds).generators])
    assert abs(torch.corrcoef(torch.stack([u_crop[:, 0], u_obj[:, 0]]))[0, 1].item()) < 0.4
    assert not torch.isclose(u_crop, u_obj).any()


def test_crop_never_reads_the_images_device():
    """Nothing in the crop reads a device value on the host: the whole paired crop runs on meta tensors (which
    hold no data, so any .item() / .tolist() / .cpu() of them would raise)."""
    a = torch.empty(4, 3, 32, 32, device="meta")
    a_c, b_c = paired_random_resized_crop(a, a, 224, PerSampleGenerator([1, 2, 3, 4]))
    assert a_c.shape == b_c.shape == (4, 3, 224, 224) and a_c.device.type == "meta"
    paired_random_resized_crop(a, a, 224, torch.Generator().manual_seed(0))
    paired_random_resized_crop(a, a, 224, None)


def test_crop_is_differentiable_wrt_the_prediction():
    """Gradients reach the box and the kernel's reach around it (at most 2 pixels when enlarging), nothing else."""
    x = _images(2).requires_grad_(True)
    params = torch.tensor([[1, 2, 9, 11], [0, 0, 16, 16]])
    resized_crop(x, params, CROP).square().sum().backward()
    assert x.grad[0, :, 1:10, 2:13].abs().sum() > 0
    assert x.grad[0, :, 12:].abs().sum() == 0 and x.grad[0, :, :, 15:].abs().sum() == 0
    assert x.grad[1].abs().min() > 0


# ----------------------------------------------------------------------------------------------------------------
# LPIPS


def test_lpips_state_dict_layout_matches_published_files():
    """Our LPIPS state dict = torchvision vgg16 ``features.*`` (under ``net.``) + LPIPS v0.1 ``lin{k}.model.1.weight``,
    with VGG16's shapes; the scaling layer holds LPIPS's shift/scale constants and is not in the state dict."""
    with torch.device("meta"):
        m = LPIPS()
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    want = {}
    for i, (idx, c) in enumerate(zip(convs, widths)):
        c_in = 3 if i == 0 else widths[i - 1]
        want[f"net.features.{idx}.weight"], want[f"net.features.{idx}.bias"] = (c, c_in, 3, 3), (c,)
    for k, c in enumerate([64, 128, 256, 512, 512]):
        want[f"lin{k}.model.1.weight"] = (1, c, 1, 1)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == want
    assert len(m.net.features) == 31 and LPIPS_TAPS == (3, 8, 15, 22, 29)
    for i in LPIPS_TAPS:
        assert isinstance(m.net.features[i], torch.nn.ReLU)
    torch.testing.assert_close(LPIPS().shift.flatten(), torch.tensor([-0.030, -0.088, -0.188]))
    torch.testing.assert_close(LPIPS().scale.flatten(), torch.tensor([0.458, 0.448, 0.450]))


def test_lpips_formula():
    """d = sum_l mean_hw sum_c w_lc (n0 - n1)^2 with n = f / ||f||_c of the relu taps of the scaled input,
    recomputed here by running the VGG layers by hand."""
    m = _tiny_lpips()
    x0, x1 = _images(2, H=CROP, W=CROP, seed=3), _images(2, H=CROP, W=CROP, seed=4)

    def taps(x):
        h, out = (x - m.shift) / m.scale, []
        for i, layer in enumerate(m.net.features[:30]):
            h = layer(h)
            if i in (3, 8, 15, 22, 29):
                out.append(h / (h.norm(dim=1, keepdim=True) + 1e-10))
        return out

    want = sum(((a - b) ** 2 * getattr(m, f"lin{k}").model[1].weight).sum(1).mean((1, 2))
               for k, (a, b) in enumerate(zip(taps(x0), taps(x1))))
    torch.testing.assert_close(m(x0, x1), want, rtol=1e-5, atol=1e-6)
    f = unit_normalize(torch.randn(2, 5, 3, 3))
    torch.testing.assert_close(f.norm(dim=1), torch.ones(2, 3, 3))


def test_load_lpips_from_files(tmp_path):
    """Loads a torchvision-layout VGG file (classifier keys ignored) + an LPIPS lin file; bad keys and missing files
    raise errors that name the problem / where to download."""
    ref = _tiny_lpips(seed=5)
    vgg = {k: v.clone() for k, v in ref.net.state_dict().items()}
    vgg["classifier.6.bias"] = torch.zeros(3)
    lin = {f"lin{k}.model.1.weight": getattr(ref, f"lin{k}").model[1].weight.clone() for k in range(5)}
    torch.save(vgg, tmp_path / "vgg.pth")
    torch.save(lin, tmp_path / "lin.pth")
    m = load_lpips(tmp_path / "vgg.pth", tmp_path / "lin.pth", widths=TINY_VGG)
    x0, x1 = _images(2, H=CROP, W=CROP, seed=1), _images(2, H=CROP, W=CROP, seed=2)
    torch.testing.assert_close(m(x0, x1), ref(x0, x1))
    assert not any(p.requires_grad for p in m.parameters()) and not m.training

    lin["lin5.model.1.weight"] = lin.pop("lin4.model.1.weight")
    torch.save(lin, tmp_path / "lin_bad.pth")
    with pytest.raises(ValueError, match="lin5.model.1.weight"):
        load_lpips(tmp_path / "vgg.pth", tmp_path / "lin_bad.pth", widths=TINY_VGG)
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        load_lpips(tmp_path / "nope.pth", tmp_path / "lin.pth")
    with pytest.raises(FileNotFoundError, match="weights/v0.1/vgg.pth"):
        load_lpips(tmp_path / "vgg.pth", "")


# ----------------------------------------------------------------------------------------------------------------
# ConvNeXt-V2


def test_grn_formula():
    grn = GRN(6)
    x = torch.randn(2, 3, 4, 6)
    torch.testing.assert_close(grn(x), x)  # zero init: identity
    with torch.no_grad():
        grn.gamma.normal_(), grn.beta.normal_()
    g = x.pow(2).sum((1, 2), keepdim=True).sqrt()
    torch.testing.assert_close(grn(x), grn.gamma * x * g / (g.mean(-1, keepdim=True) + 1e-6) + grn.beta + x)


def test_convnext_base_hf_layout():
    """The base config maps onto HF's facebook/convnextv2-base-22k-224 names with their shapes (378 keys)."""
    with torch.device("meta"):
        m = ConvNeXtV2(**CONVNEXT_V2_BASE)
    hf = {k: tuple(v.shape) for k, v in convnext_state_to_hf(m.state_dict()).items()}
    assert len(hf) == 4 + 3 * 4 + 36 * 10 + 2
    assert hf["convnextv2.embeddings.patch_embeddings.weight"] == (128, 3, 4, 4)
    assert hf["convnextv2.embeddings.layernorm.bias"] == (128,)
    assert hf["convnextv2.encoder.stages.1.downsampling_layer.0.weight"] == (128,)
    assert hf["convnextv2.encoder.stages.3.downsampling_layer.1.weight"] == (1024, 512, 2, 2)
    assert hf["convnextv2.encoder.stages.2.layers.26.dwconv.weight"] == (512, 1, 7, 7)
    assert hf["convnextv2.encoder.stages.2.layers.26.layernorm.weight"] == (512,)
    assert hf["convnextv2.encoder.stages.2.layers.26.pwconv1.weight"] == (2048, 512)
    assert hf["convnextv2.encoder.stages.2.layers.26.grn.weight"] == (1, 1, 1, 2048)
    assert hf["convnextv2.encoder.stages.0.layers.2.pwconv2.bias"] == (128,)
    assert hf["convnextv2.layernorm.weight"] == (1024,)
    assert not any("stages.0.downsampling" in k for k in hf)


@pytest.mark.parametrize("fmt", ["bin", "safetensors", "dir"])
def test_convnext_hf_round_trip(tmp_path, fmt):
    """ours -> HF layout (+ a classifier head) -> file -> load_convnext reproduces the pooled features exactly."""
    ref = _tiny_convnext(seed=7)
    hf = {k: v.clone().contiguous() for k, v in convnext_state_to_hf(ref.state_dict()).items()}
    hf["classifier.weight"], hf["classifier.bias"] = torch.zeros(5, 32), torch.zeros(5)
    if fmt == "bin":
        path = tmp_path / "pytorch_model.bin"
        torch.save(hf, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "model.safetensors"
        save_file(hf, str(path))
        path = tmp_path if fmt == "dir" else path
    m = load_convnext(path, **TINY_CNX)
    x = _images(2, H=CROP, W=CROP)
    assert m(x).shape == (2, 32)
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=0)
    assert not any(p.requires_grad for p in m.parameters()) and not m.training


def test_convnext_wrong_or_missing_keys_raise_listing(tmp_path):
    hf = {k: v.clone() for k, v in convnext_state_to_hf(_tiny_convnext().state_dict()).items()}
    hf["convnextv2.encoder.stages.1.layers.0.grn.gamma"] = hf.pop("convnextv2.encoder.stages.1.layers.0.grn.weight")
    torch.save(hf, tmp_path / "bad.bin")
    with pytest.raises(ValueError) as err:
        load_convnext(tmp_path / "bad.bin", **TINY_CNX)
    assert "unmatched checkpoint key 'convnextv2.encoder.stages.1.layers.0.grn.gamma'" in str(err.value)
    assert "missing key 'convnextv2.encoder.stages.1.layers.0.grn.weight'" in str(err.value)
    with pytest.raises(FileNotFoundError, match="huggingface-cli download facebook/convnextv2-base-22k-224"):
        load_convnext(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------------------------
# The hook


def test_hook_zero_for_identical_positive_otherwise_grayscale_ok():
    hook = _hook()
    for C in (3, 1):
        x = _images(4, C=C, seed=C)
        same = hook(x, x.clone(), PerSampleGenerator([1, 2, 3, 4]))
        assert set(same) == {"lpips", "convnext"} and all(v.shape == (4,) for v in same.values())
        for v in same.values():
            torch.testing.assert_close(v, torch.zeros(4), atol=1e-6, rtol=0)
        diff = hook(x + 0.3 * _images(4, C=C, seed=9), x, PerSampleGenerator([1, 2, 3, 4]))
        assert all((v > 0).all() for v in diff.values())


def test_hook_gradients_reach_only_the_prediction():
    hook = _hook().train()  # train() must not leave eval mode
    assert not hook.training and not hook.lpips.training and not hook.convnext.training
    x_pred = _images(3, seed=1).requires_grad_(True)
    x = _images(3, seed=2).requires_grad_(True)
    out = hook(x_pred, x, torch.Generator().manual_seed(0))
    (out["lpips"].sum() + out["convnext"].sum()).backward()
    assert x_pred.grad is not None and torch.isfinite(x_pred.grad).all() and x_pred.grad.abs().sum() > 0
    assert x.grad is None
    assert all(p.grad is None and not p.requires_grad for p in hook.parameters())


def test_pmf_loss_perceptual_gate_by_t():
    """In pmf_loss with a tiny PMFDiT and explicit draws: loss_with - loss_without = mean_b 1[t_b < max_t]
    sum_k w_k adp(L_k,b) with the values the hook returned; with every t >= max_t the perceptual term adds
    nothing, to the loss or to any parameter gradient."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = build_model("pMF-tiny")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    B = 6
    x = _images(B, C=1, H=8, W=8, seed=3)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    cfg = ObjectiveConfig(perceptual_max_t=0.8, perceptual_weights={"lpips": 0.4, "convnext": 0.1})
    d = sample_draws(x, y, cfg, torch.Generator().manual_seed(4))
    t = torch.tensor([0.1, 0.5, 0.79, 0.8, 0.9, 0.95])
    d = dataclasses.replace(d, t=t, r=t * torch.tensor([1.0, 0.5, 0.2, 1.0, 0.5, 0.3]))
    hook, seen = _hook(), {}

    def recording(x_pred, x_, gen):
        seen.update(hook(x_pred, x_, gen))
        return seen

    seeds = [10, 11, 12, 13, 14, 15]
    l_with, m = pmf_loss(net, x, y, cfg, draws=d, perceptual=recording, generator=PerSampleGenerator(seeds))
    l_without, _ = pmf_loss(net, x, y, cfg, draws=d)
    mask = (t < 0.8).float()
    adp = lambda v: v / (v + 0.01)  # noqa: E731
    want = (mask * (0.4 * adp(seen["lpips"]) + 0.1 * adp(seen["convnext"]))).mean()
    assert want > 0 and (seen["lpips"][3:] > 0).all()  # the masked samples did have a non-zero loss
    torch.testing.assert_close(l_with - l_without, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m["perc_lpips"], (seen["lpips"] * mask).mean())

    high = dataclasses.replace(d, t=torch.full((B,), 0.85), r=torch.full((B,), 0.4))
    grads = []
    for perc in (recording, None):
        net.zero_grad()
        loss, _ = pmf_loss(net, x, y, cfg, draws=high, perceptual=perc, generator=PerSampleGenerator(seeds))
        loss.backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_config_and_build(tmp_path):
    """Recipe crop defaults; build_perceptual returns None without positive weights, rejects unknown terms, names the
    missing file, and reports a weights file that does not match the architecture."""
    cfg = PerceptualConfig()
    assert cfg.crop_size == 224 and cfg.crop_scale == (0.08, 1.0) and cfg.crop_ratio == (3 / 4, 4 / 3)
    assert build_perceptual(cfg, None) is None and build_perceptual(cfg, {"lpips": 0.0}) is None
    with pytest.raises(ValueError, match="unknown perceptual terms"):
        build_perceptual(cfg, {"dino": 1.0})
    with pytest.raises(FileNotFoundError, match="vgg16-397923af"):
        build_perceptual(cfg, {"lpips": 0.4, "convnext": 0.1})
    ref = _tiny_convnext()
    torch.save(convnext_state_to_hf(ref.state_dict()), tmp_path / "pytorch_model.bin")
    only_cnx = dataclasses.replace(cfg, convnext_path=str(tmp_path), crop_size=CROP)
    with pytest.raises(ValueError, match="does not match"):  # tiny file vs the base architecture: listed mismatch
        build_perceptual(only_cnx, {"convnext": 0.1})
