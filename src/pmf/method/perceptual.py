"""Perceptual losses of pMF: LPIPS-VGG16 and a ConvNeXt-V2 feature distance on paired random crops
[P section 4.4, App. A.1; official ``utils/auxloss_util.py``, ``models/convnext.py``].

    x_pred, x  --paired RandomResizedCrop (one crop per sample, same for both)-->  x_pred', x'   (B, 3, 224, 224)
    L_lpips(b)    = sum_l mean_hw  w_l . (n_l(x_pred') - n_l(x'))^2        n_l = unit-normalised VGG16 relu features
    L_convnext(b) = || phi(x_pred') - phi(x') ||^2                        phi = LayerNorm(avgpool(ConvNeXt-V2 stage 4))

:class:`PerceptualLoss` is the hook :func:`pmf.method.objective.perceptual_term` calls as
``perceptual(x_pred, x, generator) -> {"lpips": (B,), "convnext": (B,)}``; the objective then masks samples with
t >= ``perceptual_max_t``, applies adaptive weighting and the weights 0.4 / 0.1. One crop per sample is shared by
both terms: the official ``auxloss_fn`` (``utils/auxloss_util.py``) crops the pair once and runs LPIPS and
ConvNeXt on that pair.

The crop is the official ``paired_random_resized_crop``: ONE draw per sample (area fraction ~ U(0.08, 1), log-uniform
aspect in [3/4, 4/3], sides rounded and clipped to the image, top/left uniform), not torchvision's 10-attempt rule;
both images are resampled with the same box to 224 x 224 by the cubic, antialiased ``jax.image.scale_and_translate``
the official ``_resample_crop_to_square`` calls (:func:`resample_weights` reproduces it as two matrices).

Both backbones are written here (no torchvision, no transformers) and load published weights from local files:

- VGG16 ``features`` in torchvision's layout (``features.{0,2,5,...,28}.{weight,bias}``), e.g. torchvision's
  ``vgg16-397923af.pth``; the LPIPS v0.1 linear heads in the LPIPS repo's layout (``lin{0..4}.model.1.weight``,
  ``weights/v0.1/vgg.pth``). The official JAX code uses ``lpips_j``, a port of the same network and weights.
- ConvNeXt-V2 in the layout of the ConvNeXt-V2 authors' code (``downsample_layers`` / ``stages`` / ``norm``),
  loaded from the Hugging Face checkpoint ``facebook/convnextv2-base-22k-224`` (``convnextv2.*`` keys) through an
  explicit key map, :func:`convnext_key_to_hf`.

Randomness: crop parameters are drawn on the host (CPU), so choosing a crop never reads a device value (no
synchronisation). With a :class:`pmf.method.rng.PerSampleGenerator` sample i draws its 4 uniforms from a CPU
generator seeded from its own seed, so its crop depends only on that seed, never on its batch position or the batch
size. A plain CPU ``torch.Generator`` (or None: the global CPU RNG) draws a (B, 4) block: reproducible for a given
batch, but a sample's crop then depends on its position (:func:`crop_uniforms`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pmf.method.rng import PerSampleGenerator, mix_seeds

# ----------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class PerceptualConfig:
    """Where the perceptual backbones' weights are and how pairs are cropped. Which terms run, their lambdas and the
    t gate are the objective's (``objective.perceptual_weights`` = {lpips: 0.4, convnext: 0.1} and
    ``objective.perceptual_max_t`` in the official presets [P Tab. 8; official configs]): one source of truth."""

    lpips_vgg_path: str = ""  # torchvision VGG16 ImageNet weights (vgg16-397923af.pth), see load_lpips
    lpips_lin_path: str = ""  # LPIPS v0.1 linear heads (LPIPS repo weights/v0.1/vgg.pth)
    convnext_path: str = ""  # facebook/convnextv2-base-22k-224: model.safetensors / pytorch_model.bin / its folder
    crop_size: int = 224  # paired crop output side [official auxloss_util.py: out_size=224]
    crop_scale: tuple = (0.08, 1.0)  # crop area fraction ~ U(0.08, 1) [official `utils/auxloss_util.py`]
    crop_ratio: tuple = (3 / 4, 4 / 3)  # aspect ratio, log-uniform [official `utils/auxloss_util.py`]


# ----------------------------------------------------------------------------------------------------------------
# Paired RandomResizedCrop (official ``utils/auxloss_util.py``: ``paired_random_resized_crop``)

_CROP_UNIFORMS = 4  # per sample: area fraction, log aspect ratio, top, left
_CROP_SALT = 0x5EED_C409  # keeps the crop stream apart from the objective's draws made from the same seed


def _host_generator(g: torch.Generator) -> torch.Generator:
    """A CPU generator for the crop draws of device generator ``g``, seeded from host-side state only (its seed and,
    where torch exposes it, its Philox offset), so no device value is read."""
    try:
        offset = int(g.get_offset())
    except (AttributeError, RuntimeError):
        offset = 0
    return torch.Generator().manual_seed(mix_seeds([mix_seeds([g.initial_seed() ^ _CROP_SALT])[0] ^ offset])[0])


def crop_uniforms(batch: int, generator=None) -> torch.Tensor:
    """(B, 4) float64 U[0, 1) draws for the crop parameters, made on the host (CPU) so that choosing a crop never
    reads a device tensor (no host-device synchronisation).

    PerSampleGenerator: sample i draws from a CPU generator seeded from ``generators[i].initial_seed()`` (mixed with
    a salt), so its crop depends only on its seed, not on its batch position or the batch size, and whichever device
    the per-sample generators live on. A CPU ``torch.Generator`` is drawn from directly; a device one is replaced by
    a CPU generator seeded from its host-side state (:func:`_host_generator`); None: the global CPU RNG."""
    if isinstance(generator, PerSampleGenerator):
        if len(generator.generators) != batch:
            raise ValueError(f"PerSampleGenerator has {len(generator.generators)} seeds for a batch of {batch}")
        seeds = mix_seeds([g.initial_seed() ^ _CROP_SALT for g in generator.generators])
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return torch.stack([torch.rand(_CROP_UNIFORMS, generator=g, dtype=torch.float64) for g in gens])
    if isinstance(generator, torch.Generator) and generator.device.type != "cpu":
        generator = _host_generator(generator)
    return torch.rand(batch, _CROP_UNIFORMS, generator=generator, dtype=torch.float64)


def crop_params_from_uniforms(u: torch.Tensor, height: int, width: int, scale=(0.08, 1.0),
                              ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """The official rule (``utils/auxloss_util.py``: ``paired_random_resized_crop``, ``sample_params``), one draw
    per sample, from given uniforms u (B, 4). Returns (B, 4) int64 rows (top, left, h, w):

        area = H W U(scale),  aspect = exp(U(log ratio[0], log ratio[1]))
        w = clip(round(sqrt(area aspect)), 1, W),  h = clip(round(sqrt(area / aspect)), 1, H)   (round half to even)
        top ~ U{0..H-h},  left ~ U{0..W-w}

    Unlike torchvision's RandomResizedCrop there are no retries and no centre-crop fallback: a side longer than the
    image is clipped to it (so near-whole-image draws give boxes whose aspect lies outside ``ratio``). Computed in
    float64 (the official code uses float32; the two differ only when sqrt lands within float32 rounding of a .5)."""
    u = u.double()
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
    aspect = torch.exp(lo + (hi - lo) * u[:, 1])
    w = torch.round(torch.sqrt(area * aspect)).clamp(1, width)
    h = torch.round(torch.sqrt(area / aspect)).clamp(1, height)
    # floor(u (n + 1)) is uniform on {0..n}; the min only guards u -> 1 in floating point
    top = torch.minimum(torch.floor(u[:, 2] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u[:, 3] * (width - w + 1)), width - w)
    return torch.stack([top, left, h, w], dim=1).long()


def sample_crop_params(batch: int, height: int, width: int, generator=None, scale=(0.08, 1.0),
                       ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """(B, 4) int64 CPU (top, left, h, w) boxes, one per sample (see :func:`crop_uniforms`)."""
    return crop_params_from_uniforms(crop_uniforms(batch, generator), height, width, scale, ratio)


def _keys_cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (the kernel of ``jax.image`` "cubic" and of PIL's bicubic)."""
    x = x.abs()
    near = ((1.5 * x - 2.5) * x) * x + 1.0
    far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """(B, out_size, in_size) weights that map one image axis to ``out_size`` samples of the window
    [start, start + length) (in pixels, per sample), as ``jax.image.scale_and_translate(method="cubic",
    antialias=True)`` with scale = out/length and translation = -start * scale, the official resampling.

    Output sample i sits at input coordinate s_i = (i + 0.5) length / out + start - 0.5 (half-pixel centres). Its
    weights are the Keys kernel at |s_i - j| / k, k = max(length / out, 1) (widened when shrinking: the
    antialiasing), normalised to sum 1 over the input pixels j (so a kernel reaching past the image edge is
    renormalised) and zero when s_i lies outside [-0.5, in - 0.5]. Pixels outside the window but inside the image
    do contribute near the window's edges, as in the official code."""
    dtype = start.dtype
    inv = length / out_size  # (B,)
    i = torch.arange(out_size, device=start.device, dtype=dtype)
    j = torch.arange(in_size, device=start.device, dtype=dtype)
    s = (i[None, :] + 0.5) * inv[:, None] + start[:, None] - 0.5  # (B, out)
    k = torch.clamp(inv, min=1.0)[:, None, None]
    w = _keys_cubic((s[:, :, None] - j[None, None, :]) / k)  # (B, out, in)
    total = w.sum(dim=2, keepdim=True)
    w = torch.where(total.abs() > 1000 * torch.finfo(torch.float32).eps, w / torch.where(total != 0, total, 1), 0)
    inside = (s >= -0.5) & (s <= in_size - 0.5)
    return w * inside[:, :, None]


def resized_crop(img: torch.Tensor, params: torch.Tensor, size: int) -> torch.Tensor:
    """img (B, ...C, H, W) -> (B, ...C, size, size): sample b's box params[b] = (top, left, h, w) resampled to
    size x size by :func:`resample_weights` (cubic, antialiased, as the official ``_resample_crop_to_square``).
    Two batched matmuls, no per-sample Python loop and no host read of device values: ``params`` (on the host) is
    copied to img's device. Differentiable w.r.t. img. No clamping to [-1, 1]."""
    B, H, W = img.shape[0], img.shape[-2], img.shape[-1]
    wdtype = torch.float64 if img.dtype == torch.float64 else torch.float32
    p = params.to(device=img.device, dtype=wdtype, non_blocking=True)
    wy = resample_weights(p[:, 0], p[:, 2], H, size).to(img.dtype)  # (B, S, H)
    wx = resample_weights(p[:, 1], p[:, 3], W, size).to(img.dtype)  # (B, S, W)
    x = img.reshape(B, -1, H, W)
    out = wy[:, None] @ x @ wx[:, None].transpose(-1, -2)  # (B, K, S, S)
    return out.reshape(*img.shape[:-2], size, size)


def paired_random_resized_crop(a: torch.Tensor, b: torch.Tensor, size: int = 224, generator=None,
                               scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """The same box for a[i] and b[i] (one draw per sample, a different box per i), each resampled to size x size:
    the official ``paired_random_resized_crop``. a, b: (B, C, H, W). Returns (a', b'); gradients flow to whichever
    input requires them."""
    if a.shape != b.shape:
        raise ValueError(f"paired crop needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    B, _, H, W = a.shape
    params = sample_crop_params(B, H, W, generator, scale, ratio)
    pair = resized_crop(torch.stack([a, b], dim=1), params, size)  # (B, 2, C, S, S): one resample for the pair
    return pair[:, 0], pair[:, 1]


# ----------------------------------------------------------------------------------------------------------------
# LPIPS-VGG16 (Zhang et al. 2018, LPIPS v0.1)

VGG16_WIDTHS = (64, 128, 256, 512, 512)
_VGG16_CONVS_PER_BLOCK = (2, 2, 3, 3, 3)
LPIPS_TAPS = (3, 8, 15, 22, 29)  # indices in ``features`` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
# LPIPS ScalingLayer: inputs in [-1, 1] -> (x - shift) / scale, i.e. ImageNet mean/std re-expressed for [-1, 1]
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"


class VGG16Features(nn.Module):
    """torchvision's ``vgg16().features`` layout: 13 conv3x3 (+ReLU) in 5 blocks separated by 2x2 max pools
    (31 modules, convs at 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28). ``widths`` other than VGG16's are for
    tests. forward returns the 5 LPIPS taps (the relu outputs at ``LPIPS_TAPS``)."""

    def __init__(self, widths=VGG16_WIDTHS, in_channels: int = 3):
        super().__init__()
        layers, c = [], in_channels
        for block, (width, n) in enumerate(zip(widths, _VGG16_CONVS_PER_BLOCK)):
            if block > 0:
                layers.append(nn.MaxPool2d(2, 2))
            for _ in range(n):
                layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]
                c = width
        layers.append(nn.MaxPool2d(2, 2))  # pool5: in the layout (no parameters), never run
        self.features = nn.Sequential(*layers)
        self.widths = tuple(widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in LPIPS_TAPS:
                taps.append(x)  # (B, widths[k], H / 2^k, W / 2^k)
                if i == LPIPS_TAPS[-1]:
                    break
        return taps


class LinearHead(nn.Module):
    """LPIPS ``NetLinLayer``: (dropout, 1x1 conv C -> 1 without bias). Key ``model.1.weight`` (1, C, 1, 1). The
    dropout is inactive in the evaluation mode LPIPS is used in, so it is an Identity here (no parameters)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


def unit_normalize(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """f / (||f||_channels + eps) at every position (LPIPS ``normalize_tensor``)."""
    # The clamp keeps the gradient finite where a feature vector is exactly 0 (all ReLUs off): d sqrt(s)/ds is
    # infinite at s = 0, and 0 * inf = NaN would poison the whole backward. Forward is unchanged for s > 1e-20.
    norm = torch.sqrt(f.pow(2).sum(dim=1, keepdim=True).clamp_min(1e-20))
    return f / (norm + eps)


class LPIPS(nn.Module):
    """LPIPS v0.1 with a VGG16 trunk: d(x0, x1) = sum_l mean_hw lin_l((n_l(x0) - n_l(x1))^2), (B,).
    Inputs (B, 3, H, W) in [-1, 1]. State dict: ``net.features.*`` (torchvision) + ``lin{0..4}.model.1.weight``."""

    def __init__(self, widths=VGG16_WIDTHS):
        super().__init__()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Features(widths)
        for k, c in enumerate(widths):
            self.add_module(f"lin{k}", LinearHead(c))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised VGG16 features of the 5 taps."""
        return [unit_normalize(f) for f in self.net((x - self.shift) / self.scale)]

    def distance(self, f0: list[torch.Tensor], f1: list[torch.Tensor]) -> torch.Tensor:
        total = 0
        for k, (a, b) in enumerate(zip(f0, f1)):
            total = total + getattr(self, f"lin{k}")((a - b).pow(2)).mean(dim=(1, 2, 3))  # spatial average
        return total

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        return self.distance(self.features(x0), self.features(x1))


# ----------------------------------------------------------------------------------------------------------------
# ConvNeXt-V2 (Woo et al. 2023)

CONVNEXT_V2_BASE = dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024))  # facebook/convnextv2-base-22k-224
CONVNEXT_HF_REPO = "facebook/convnextv2-base-22k-224"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (ConvNeXt's "channels_first" LayerNorm), eps 1e-6."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__(channels, eps=eps)

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalization [ConvNeXt-V2 Eq. 1-3], channels last (B, H, W, C):
    G = ||x||_2 over (H, W);  N = G / (mean_C G + 1e-6);  y = gamma (x N) + beta + x.  gamma = beta = 0 at init."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x):
        g = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)  # (B, 1, 1, C)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * n) + self.beta + x


class ConvNeXtV2Block(nn.Module):
    """x + pwconv2(GRN(GELU(pwconv1(LN(dwconv7x7(x)))))) (no layer scale in V2; no drop path: frozen use only)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x):  # (B, C, H, W)
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))  # (B, H, W, C)
        y = self.pwconv2(self.grn(F.gelu(self.pwconv1(y))))  # exact (erf) GELU, as HF's "gelu"
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtV2(nn.Module):
    """ConvNeXt-V2 trunk -> pooled feature: LayerNorm(mean_hw(stage 4)), (B, dims[-1]). The classifier is not used.
    Stem: conv4x4/4 + LN; stages 2-4 start with LN + conv2x2/2. ``head_eps`` is the final LayerNorm's epsilon:
    1e-12 in HF's config for the convnextv2-base checkpoints (the ConvNeXt-V2 authors' code uses 1e-6)."""

    def __init__(self, depths=CONVNEXT_V2_BASE["depths"], dims=CONVNEXT_V2_BASE["dims"], in_channels: int = 3,
                 head_eps: float = 1e-12):
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_channels, dims[0], 4, stride=4), LayerNorm2d(dims[0]))]
            + [nn.Sequential(LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dims[i], 2, stride=2))
               for i in range(1, len(dims))])
        self.stages = nn.ModuleList(nn.Sequential(*[ConvNeXtV2Block(d) for _ in range(n)])
                                    for n, d in zip(depths, dims))
        self.norm = nn.LayerNorm(dims[-1], eps=head_eps)
        self.depths, self.dims = tuple(depths), tuple(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))  # (B, dims[i], H / 2^(i+2), W / 2^(i+2))
        return self.norm(x.mean(dim=(-2, -1)))  # (B, dims[-1])


# ours <-> Hugging Face (transformers ConvNextV2ForImageClassification; every HF name carries "convnextv2.").
# One row per parameter family; {name} fields must agree on both sides. HF stage 0 has no downsampling layer: its
# stem is "embeddings", so downsample index {ds} starts at 1.
_CONVNEXT_KEY_MAP = [
    ("downsample_layers.0.0.{p}", "embeddings.patch_embeddings.{p}"),
    ("downsample_layers.0.1.{p}", "embeddings.layernorm.{p}"),
    ("downsample_layers.{ds}.{j}.{p}", "encoder.stages.{ds}.downsampling_layer.{j}.{p}"),
    ("stages.{s}.{m}.{conv}.{p}", "encoder.stages.{s}.layers.{m}.{conv}.{p}"),
    ("stages.{s}.{m}.norm.{p}", "encoder.stages.{s}.layers.{m}.layernorm.{p}"),
    ("stages.{s}.{m}.grn.gamma", "encoder.stages.{s}.layers.{m}.grn.weight"),
    ("stages.{s}.{m}.grn.beta", "encoder.stages.{s}.layers.{m}.grn.bias"),
    ("norm.{p}", "layernorm.{p}"),
]
_FIELDS = {"p": "weight|bias", "ds": "[1-9][0-9]*", "j": "[01]", "s": "[0-9]+", "m": "[0-9]+",
           "conv": "dwconv|pwconv1|pwconv2"}
_HF_PREFIX = "convnextv2."


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    return re.compile("".join(re.escape(x) if i % 2 == 0 else f"(?P<{x}>{_FIELDS[x]})" for i, x in enumerate(parts)))


_CONVNEXT_RULES = [(_pattern(ours), ours, _pattern(hf), hf) for ours, hf in _CONVNEXT_KEY_MAP]


def convnext_key_to_hf(key: str) -> str:
    """Our ConvNeXt-V2 parameter name -> the HF checkpoint's (with the ``convnextv2.`` prefix)."""
    for ours_re, _, _, hf in _CONVNEXT_RULES:
        m = ours_re.fullmatch(key)
        if m:
            return _HF_PREFIX + hf.format(**m.groupdict())
    raise KeyError(f"no HF name for ConvNeXt-V2 key {key!r}")


def convnext_key_from_hf(key: str) -> str | None:
    """HF name (with or without the ``convnextv2.`` prefix) -> ours; None if no rule matches."""
    key = key[len(_HF_PREFIX):] if key.startswith(_HF_PREFIX) else key
    for _, ours, hf_re, _ in _CONVNEXT_RULES:
        m = hf_re.fullmatch(key)
        if m:
            return ours.format(**m.groupdict())
    return None


def convnext_state_to_hf(sd: dict) -> dict:
    return {convnext_key_to_hf(k): v for k, v in sd.items()}


def convnext_state_from_hf(sd: dict, model: ConvNeXtV2) -> dict:
    """Map an HF state dict onto ``model``'s names; the classifier head (``classifier.*``) is dropped. Raises
    ValueError listing every unmatched, duplicate, wrongly shaped and missing key."""
    want = model.state_dict()
    out, seen, problems = {}, set(), []
    for k, v in sd.items():
        if k.startswith("classifier."):
            continue
        name = convnext_key_from_hf(k)
        if name is None or name not in want:
            problems.append(f"unmatched checkpoint key {k!r}")
        elif name in seen:
            problems.append(f"duplicate checkpoint key {k!r} (-> {name})")
        elif tuple(v.shape) != tuple(want[name].shape):
            problems.append(f"shape of {k!r}: checkpoint {tuple(v.shape)}, model {tuple(want[name].shape)}")
        else:
            out[name] = v
        seen.add(name)
    problems += [f"missing key {convnext_key_to_hf(k)!r}" for k in want if k not in seen]
    if problems:
        raise ValueError(f"ConvNeXt-V2 checkpoint does not match the model (depths={model.depths}, "
                         f"dims={model.dims}):\n  " + "\n  ".join(problems))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Loading weights from local files


def _read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    from pmf.util.safe_load import load_torch_file

    obj = load_torch_file(path, "the perceptual network's weights", "download the released weights file again")
    for wrapper in ("state_dict", "model"):  # common checkpoint wrappers (e.g. the ConvNeXt-V2 authors' "model")
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def _freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def load_lpips(vgg_path, lpips_path, widths=VGG16_WIDTHS) -> LPIPS:
    """LPIPS-VGG16 from two local files, frozen (requires_grad False, eval):

    - ``vgg_path``: torchvision's VGG16 ImageNet state dict (``features.*``; ``classifier.*`` keys are ignored),
      ``vgg16-397923af.pth`` from https://download.pytorch.org/models/vgg16-397923af.pth
    - ``lpips_path``: the LPIPS v0.1 linear heads (``lin0..lin4.model.1.weight``), ``weights/v0.1/vgg.pth`` of
      https://github.com/richzhang/PerceptualSimilarity (also shipped inside the ``lpips`` pip package).
    Every other key, a missing key or a wrong shape raises."""
    vgg_path, lpips_path = Path(vgg_path or ""), Path(lpips_path or "")
    for p, what, url in ((vgg_path, "VGG16 weights (torchvision vgg16-397923af.pth)", VGG16_URL),
                         (lpips_path, "LPIPS v0.1 linear heads (LPIPS repo weights/v0.1/vgg.pth)", LPIPS_LIN_URL)):
        if not p.is_file():
            raise FileNotFoundError(f"{what} not found at {str(p)!r}; download it from {url} and pass its path "
                                    "(perceptual.lpips_vgg_path / perceptual.lpips_lin_path)")
    model = LPIPS(widths)
    vgg = _read_state_dict(vgg_path)
    extra = sorted(k for k in vgg if not k.startswith(("features.", "classifier.")))
    if extra:
        raise ValueError(f"{vgg_path}: not a torchvision VGG16 state dict; unexpected keys {extra}")
    _load_strict(model.net, {k: v for k, v in vgg.items() if k.startswith("features.")}, vgg_path)
    heads = nn.ModuleDict({f"lin{k}": getattr(model, f"lin{k}") for k in range(len(widths))})
    _load_strict(heads, _read_state_dict(lpips_path), lpips_path)
    return _freeze(model)


def _load_strict(module: nn.Module, sd: dict, path) -> None:
    """load_state_dict(strict=True), with every missing / unexpected / wrongly shaped key in one ValueError."""
    want = module.state_dict()
    problems = [f"unexpected key {k!r}" for k in sd if k not in want]
    problems += [f"missing key {k!r}" for k in want if k not in sd]
    problems += [f"shape of {k!r}: file {tuple(sd[k].shape)}, model {tuple(v.shape)}" for k, v in want.items()
                 if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if problems:
        raise ValueError(f"{path}: weights do not match the model:\n  " + "\n  ".join(problems))
    module.load_state_dict(sd, strict=True)


def load_convnext(path, depths=CONVNEXT_V2_BASE["depths"], dims=CONVNEXT_V2_BASE["dims"],
                  head_eps: float = 1e-12) -> ConvNeXtV2:
    """ConvNeXt-V2 from a local Hugging Face checkpoint of ``facebook/convnextv2-base-22k-224``: a
    ``model.safetensors`` or ``pytorch_model.bin`` file, or a folder holding one. Keys are mapped explicitly
    (:func:`convnext_key_to_hf`); a checkpoint already in our layout (the ConvNeXt-V2 authors' ``downsample_layers``
    names, ``head.*`` ignored) also loads. Frozen (requires_grad False, eval)."""
    p = Path(path or "")
    if p.is_dir():
        p = next((p / n for n in ("model.safetensors", "pytorch_model.bin") if (p / n).is_file()),
                 p / "model.safetensors")
    if not p.is_file():
        raise FileNotFoundError(
            f"ConvNeXt-V2 weights not found at {str(path)!r}. Get them with "
            f"`huggingface-cli download {CONVNEXT_HF_REPO} --local-dir <dir>` (on a machine with internet) and pass "
            "<dir>/model.safetensors or <dir>/pytorch_model.bin (perceptual.convnext_path)")
    model = ConvNeXtV2(depths, dims, head_eps=head_eps)
    sd = _read_state_dict(p)
    if any(k.startswith("downsample_layers.") for k in sd):
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    else:
        sd = convnext_state_from_hf(sd, model)
    model.load_state_dict(sd, strict=True)
    return _freeze(model)


# ----------------------------------------------------------------------------------------------------------------
# The hook


class PerceptualLoss(nn.Module):
    """``forward(x_pred, x, generator) -> {"lpips": (B,), "convnext": (B,)}`` (only the terms it holds).

    x_pred, x: (B, C, H, W) in [-1, 1], C = 3 or 1 (grayscale is repeated to 3 channels). One paired
    RandomResizedCrop per sample feeds both terms. The target x is a constant: its crop and features are computed
    without a graph (saves the target's activations), so gradients reach only x_pred. ConvNeXt sees [-1, 1]
    without ImageNet normalisation, as the official code feeds it
    (`utils/auxloss_util.py`). Backbones are frozen and stay in
    eval mode whatever ``train()`` is called with."""

    def __init__(self, lpips: LPIPS | None = None, convnext: ConvNeXtV2 | None = None, crop_size: int = 224,
                 crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3)):
        super().__init__()
        if lpips is None and convnext is None:
            raise ValueError("PerceptualLoss needs at least one of lpips / convnext")
        self.lpips = _freeze(lpips) if lpips is not None else None
        self.convnext = _freeze(convnext) if convnext is not None else None
        self.crop_size, self.crop_scale, self.crop_ratio = int(crop_size), tuple(crop_scale), tuple(crop_ratio)

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x_pred: torch.Tensor, x: torch.Tensor, generator=None) -> dict:
        if x_pred.ndim != 4 or x_pred.shape[1] not in (1, 3):
            raise ValueError(f"expected (B, 1 or 3, H, W) images, got {tuple(x_pred.shape)}")
        dtype = next(self.parameters()).dtype
        p, t = paired_random_resized_crop(x_pred.to(dtype), x.detach().to(dtype), self.crop_size, generator,
                                          self.crop_scale, self.crop_ratio)
        t = t.detach()
        if p.shape[1] == 1:  # grayscale (e.g. Fashion-MNIST) -> RGB
            p, t = p.expand(-1, 3, -1, -1), t.expand(-1, 3, -1, -1)
        out = {}
        if self.lpips is not None:
            with torch.no_grad():
                f_t = self.lpips.features(t)
            out["lpips"] = self.lpips.distance(self.lpips.features(p), f_t).to(x_pred.dtype)
        if self.convnext is not None:
            with torch.no_grad():
                phi_t = self.convnext(t)
            out["convnext"] = (self.convnext(p) - phi_t).pow(2).sum(dim=1).to(x_pred.dtype)
        return out


def build_perceptual(cfg: PerceptualConfig, weights: dict | None, device="cpu") -> PerceptualLoss | None:
    """The hook for ``pmf_loss(..., perceptual=...)``: loads the terms of ``weights`` (``objective.perceptual_weights``)
    with a positive lambda, or returns None when there are none. A missing weight file raises FileNotFoundError
    saying where to get it; an unknown term name raises ValueError."""
    terms = {k for k, v in (weights or {}).items() if v > 0}
    unknown = terms - {"lpips", "convnext"}
    if unknown:
        raise ValueError(f"unknown perceptual terms {sorted(unknown)} in objective.perceptual_weights; "
                         "known: lpips, convnext")
    if not terms:
        return None
    lpips = load_lpips(cfg.lpips_vgg_path, cfg.lpips_lin_path) if "lpips" in terms else None
    convnext = load_convnext(cfg.convnext_path) if "convnext" in terms else None
    return PerceptualLoss(lpips, convnext, cfg.crop_size, cfg.crop_scale, cfg.crop_ratio).to(device)
