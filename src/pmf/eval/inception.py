"""The FID InceptionV3: the network of the published ``pt_inception-2015-12-05-6726825d.pth`` weights (the 2015 TF
Inception graph used by the original FID code, as converted by pytorch-fid and also used by torch-fidelity), written
here without torchvision.

It is torchvision's Inception3 layout without the auxiliary head and with 1008 logits, with the FID variants of the
blocks (these are what make the numbers match TF's FID):

- InceptionA / InceptionC / InceptionE_1 (Mixed_5b-d, Mixed_6b-e, Mixed_7b): the pool branch averages with
  ``count_include_pad=False`` (TF's average pool ignores padding);
- InceptionE_2 (Mixed_7c): the pool branch is a 3x3 *max* pool (a quirk of the TF graph).

Input: uint8 [0, 255] or float [-1, 1] images (B, C, H, W), C = 1 (repeated to RGB) or 3, any H, W. Preprocessing:

1. float [-1, 1] is mapped to the uint8 scale by v = 127.5 (x + 1) (not rounded); uint8 is used as it is;
2. resized to 299 x 299 with TF1's ``ResizeBilinear`` (align_corners = False, no half-pixel offset: source
   coordinate = dst * in / out), as in the original TF FID graph and torch-fidelity (``resize="tf1"``, the default,
   because JiT's reference statistics come from torch-fidelity); ``resize="torch"`` gives
   ``F.interpolate(mode="bilinear", align_corners=False)`` (half-pixel centres, no antialias) as in pytorch-fid;
3. normalised to (v - 128) / 128, what the TF graph feeds the network (pytorch-fid's 2 v / 255 - 1 differs by <0.4%).

Output: pool features (B, 2048) (the "pool_3" FID features) and logits (B, 1008); :meth:`InceptionV3FID.extract`
adds the 2023 spatial features of sFID (``mixed_6/conv``, first 7 channels; :meth:`InceptionV3FID.trunk`). The Inception
Score uses ``pool @ fc.weight^T`` *without* the fc bias, as the original IS code, the ADM evaluator and torch-fidelity
do (:meth:`InceptionV3FID.features_and_logits`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
ENV_VAR = "PMF_INCEPTION"  # a default path for --inception
RESOLUTION = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008  # 1000 ImageNet classes + 8 unused outputs of the 2015 graph (index 0 = "background")
SPATIAL_CHANNELS = 7  # sFID: the first 7 channels of mixed_6/conv (ADM evaluator)
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023 spatial features per image


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, as TF) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # TF averages over valid pixels only


class InceptionA(nn.Module):
    """FID InceptionA: (B, c_in, H, W) -> (B, 224 + pool_features, H, W)."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Grid reduction (Mixed_6a): (B, c_in, 35, 35) -> (B, 384 + 96 + c_in, 17, 17)."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, b3d, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """FID InceptionC (factorised 7x7): (B, 768, 17, 17) -> (B, 768, 17, 17)."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            b7d = layer(b7d)
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b7, b7d, bp], 1)


class InceptionD(nn.Module):
    """Grid reduction (Mixed_7a): (B, 768, 17, 17) -> (B, 320 + 192 + 768, 8, 8)."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """FID InceptionE (expanded filter bank): (B, c_in, 8, 8) -> (B, 2048, 8, 8). ``max_pool=False``: Mixed_7b
    (E_1, average pool without padding); ``max_pool=True``: Mixed_7c (E_2, max pool)."""

    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        # the TF graph's last block max-pools here (pytorch-fid's FIDInceptionE_2); the others average
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_3x3(x)
        return torch.cat([b1, b3, b3d, self.branch_pool(pooled)], 1)


def _resize_matrix(n_in: int, n_out: int, mode: str) -> torch.Tensor:
    """(n_out, n_in) float64 matrix of 1-D linear interpolation weights: row i samples the input at source
    coordinate s_i and mixes pixels floor(s_i) and floor(s_i) + 1 (clamped to the last pixel).

    tf1:   s_i = i * n_in / n_out                          (TF1 ResizeBilinear, align_corners = False)
    torch: s_i = max((i + 0.5) * n_in / n_out - 0.5, 0)    (F.interpolate bilinear, align_corners = False)

    TF1 computes s_i and the weight s_i - floor(s_i) in float32 (``image_resizer_state.h``: a float scale; as
    torch-fidelity's ``interpolate_bilinear_2d_like_tensorflow1x``); so does the tf1 mode here. In float64 the
    weights would differ by up to ~1e-4 at 512 px, moving resized pixels by up to 0.01 levels.
    """
    i = torch.arange(n_out, dtype=torch.float64)
    if mode == "tf1":
        s32 = torch.arange(n_out, dtype=torch.float32) * torch.tensor(n_in / n_out, dtype=torch.float32)
        s = (s32 - s32.floor()).double() + s32.floor().double()  # the float32 coordinate, its float32 fraction
    elif mode == "torch":
        s = ((i + 0.5) * (n_in / n_out) - 0.5).clamp(min=0.0)
    else:
        raise ValueError(f"unknown resize mode {mode!r} (tf1 or torch)")
    i0 = s.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = s - i0
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m[torch.arange(n_out), i0] += 1.0 - w1
    m[torch.arange(n_out), i1] += w1
    return m


def resize_bilinear(x: torch.Tensor, size: int, mode: str = "tf1") -> torch.Tensor:
    """Separable bilinear resize of float (B, C, H, W) to (B, C, size, size): x' = R_h x R_w^T."""
    rh = _resize_matrix(x.shape[-2], size, mode).to(x.device, x.dtype)
    rw = _resize_matrix(x.shape[-1], size, mode).to(x.device, x.dtype)
    return rh @ x @ rw.T  # (size, H) @ (B, C, H, W) @ (W, size)


class InceptionV3FID(nn.Module):
    """The FID InceptionV3 (see the module docstring). Submodule names equal the published state dict's."""

    def __init__(self, resize: str = "tf1"):
        super().__init__()
        if resize not in ("tf1", "torch"):
            raise ValueError(f"unknown resize mode {resize!r} (tf1 or torch)")
        self.resize = resize
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_LOGITS)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] or float [-1, 1] (B, 1|3, H, W) -> float32 (B, 3, 299, 299) as (v - 128) / 128."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images (B, 1 or 3, H, W), got {tuple(images.shape)}")
        device = self.fc.weight.device
        v = images.to(device)
        v = v.float() if v.dtype == torch.uint8 else 127.5 * (v.float() + 1.0)  # the [0, 255] scale
        if v.shape[1] == 1:
            v = v.expand(-1, 3, -1, -1)
        if v.shape[-2:] != (RESOLUTION, RESOLUTION):
            v = resize_bilinear(v, RESOLUTION, self.resize)
        return (v - 128.0) / 128.0

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (B, 3, 299, 299) -> pool_3 features (B, 2048)."""
        return self.trunk(x)[0]

    def trunk(self, x: torch.Tensor, spatial: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised (B, 3, 299, 299) -> (pool_3 features (B, 2048), spatial features (B, 2023) or None).

        Spatial features (sFID, Nash et al. 2021, as the ADM evaluator defines them): the TF graph's
        ``mixed_6/conv:0`` tensor, i.e. the output (after BatchNorm and ReLU) of the 1x1 branch of the 7th mixed
        block, which is Mixed_6d here (the graph counts mixed, mixed_1, ... mixed_10 = Mixed_5b ... Mixed_7c), cut
        to its first 7 channels and flattened in the graph's NHWC order, 17 x 17 x 7 = 2023 values
        (guided-diffusion ``evaluations/evaluator.py``: ``_create_feature_graph``, ``spatial[..., :7]``). The order
        matters only for comparing with stored statistics (ADM's ``mu_s`` / ``sigma_s``): a Frechet distance is
        unchanged by permuting coordinates."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6c(self.Mixed_6b(x))  # (B, 768, 17, 17)
        s = None
        if spatial:  # Mixed_6d's 1x1 branch once more (1% of the network's cost), first 7 channels, NHWC order
            s = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # (B, 2023)
        x = self.Mixed_6e(self.Mixed_6d(x))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        return x.mean((2, 3)), s  # global average pool: (B, 2048)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 or [-1, 1] images (B, 1|3, H, W) -> (pool features (B, 2048), logits (B, 1008) with the fc bias)."""
        pool = self.pool_features(self.preprocess(images))
        return pool, self.fc(pool)

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The extractor interface of :mod:`pmf.eval.generate`: images -> (pool (B, 2048), IS logits (B, 1008)), the IS
        logits being pool @ W_fc^T *without* the bias (original IS code, ADM evaluator, torch-fidelity). On GPUs,
        PyTorch's default TF32 convolutions move features by ~1e-3 relative (as in pytorch-fid); turn TF32 off
        globally for bitwise-fp32 features."""
        pool = self.pool_features(self.preprocess(images))
        return pool, pool @ self.fc.weight.T

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything the ADM evaluator measures, in one pass: ``pool`` (B, 2048) (FID, precision / recall),
        ``logits`` (B, 1008) without the fc bias (Inception Score) and ``spatial`` (B, 2023) (sFID); see
        :meth:`trunk`."""
        pool, spatial = self.trunk(self.preprocess(images), spatial=True)
        return {"pool": pool, "logits": pool @ self.fc.weight.T, "spatial": spatial}


def load_inception(path=None, device="cpu", resize: str = "tf1") -> InceptionV3FID:
    """The FID InceptionV3 with the published weights, strictly loaded from a local file (never downloaded).

    ``path``: the ``pt_inception-2015-12-05-6726825d.pth`` file; default ``$PMF_INCEPTION``. Returns the model in
    eval mode on ``device`` with requires_grad off. Every parameter and running statistic must be present with its
    shape and no key may be extra; only BatchNorm's ``num_batches_tracked`` counters (unused in eval mode) may be
    absent from the file.
    """
    path = path or os.environ.get(ENV_VAR)
    if not path or not Path(path).is_file():
        where = f"at {path}" if path else f"(no path given and ${ENV_VAR} is not set)"
        raise FileNotFoundError(
            f"FID Inception weights not found {where}. Download {WEIGHTS_NAME} from {WEIGHTS_URL} "
            f"(the pytorch-fid 'fid_weights' release on GitHub) and pass its path with --inception PATH "
            f"(pmf eval / ref-stats / guidance-search), or set ${ENV_VAR}.")
    from pmf.util.safe_load import load_torch_file

    state = load_torch_file(path, "--inception", f"download {WEIGHTS_NAME} again from {WEIGHTS_URL}")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    model = InceptionV3FID(resize=resize)
    expected = model.state_dict()
    state = dict(state)
    for k, v in expected.items():  # absent counters are harmless: eval-mode BatchNorm never reads them
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = v
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & state.keys() if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(f"{path} is not the FID Inception state dict ({WEIGHTS_NAME}): missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False)
