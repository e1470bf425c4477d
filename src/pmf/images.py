"""Pixels and image files: the [-1, 1] <-> uint8 conversions, sample grids (PNG) and sample archives (NPZ)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_model_range(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]: x / 127.5 - 1.  Call it on the device, after the uint8 transfer."""
    return x.to(dtype) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8: round((x + 1) * 127.5), clamped to [0, 255].  Inverse of :func:`to_model_range`."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 (B, C, H, W) -> uint8 (rows*(H+pad)+pad, nrow*(W+pad)+pad, C) with a black border; C = 1 or 3."""
    if images.dtype != torch.uint8:
        raise TypeError(f"make_grid wants uint8 images, got {images.dtype}")
    B, C, H, W = images.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    rows = math.ceil(B / nrow)
    grid = np.zeros((rows * (H + pad) + pad, nrow * (W + pad) + pad, C), dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = arr[i]
    return grid


def save_grid(images: torch.Tensor, path, nrow: int | None = None, scale: int = 1) -> Path:
    """Write a PNG grid atomically; ``scale`` enlarges small images (nearest) so 28 px samples are visible."""
    grid = make_grid(images, nrow)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def save_npz(path, images: torch.Tensor, labels: torch.Tensor) -> Path:
    """``images`` uint8 (N, H, W, C) and ``labels`` int64 (N,), the ADM / JiT sample-archive layout."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, images=images.permute(0, 2, 3, 1).cpu().numpy(), labels=labels.cpu().numpy())
    os.replace(tmp, path)
    return path
