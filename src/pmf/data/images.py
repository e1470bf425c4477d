"""Pixels and image files: the [-1, 1] <-> uint8 conversions, sample grids (PNG) and sample archives (NPZ, the
ADM evaluator's layout: ``arr_0`` images, ``arr_1`` labels)."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pmf.util.atomic import atomic_path


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


def png_grid_bytes(num: int, nrow: int, channels: int, height: int, width: int, scale: int = 1, pad: int = 2) -> int:
    """Raw pixel bytes of a grid of ``num`` images (the PNG's size when its pixels do not compress, plus 1 %)."""
    rows = math.ceil(num / nrow)
    raw = (rows * (height + pad) + pad) * scale * ((nrow * (width + pad) + pad) * scale * channels + 1)
    return raw + raw // 100 + 4096


class PngGridWriter:
    """A sample grid written as a PNG row of images by row of images (the layout of :func:`make_grid`, enlarged
    ``scale`` times as :func:`save_grid`): memory holds one row of ``nrow`` images whatever the number of images.
    PNG (RFC 2083): signature, IHDR, the deflated filter-0 scanlines as IDAT chunks, IEND."""

    def __init__(self, f, num: int, nrow: int, channels: int, height: int, width: int, scale: int = 1, pad: int = 2):
        if channels not in (1, 3):
            raise ValueError(f"a PNG grid holds 1- or 3-channel images, got {channels}")
        self.f, self.num, self.nrow, self.scale, self.pad = f, int(num), int(nrow), int(scale), int(pad)
        self.cell = (int(channels), int(height), int(width))
        self.count, self._pending = 0, []
        self.width = (self.nrow * (width + pad) + pad) * self.scale
        self.height = (math.ceil(self.num / self.nrow) * (height + pad) + pad) * self.scale
        self._z = zlib.compressobj(6)
        f.write(b"\x89PNG\r\n\x1a\n")
        self._chunk(b"IHDR", struct.pack(">IIBBBBB", self.width, self.height, 8, 0 if channels == 1 else 2, 0, 0, 0))
        self._lines(np.zeros((pad, self.width // self.scale, channels), np.uint8))  # the top border

    def _chunk(self, tag: bytes, data: bytes) -> None:
        self.f.write(struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data)))

    def _lines(self, block: np.ndarray) -> None:
        """Deflate the unscaled pixel rows ``block`` (rows, W, C), each enlarged ``scale`` times."""
        if self.scale > 1:
            block = block.repeat(self.scale, axis=0).repeat(self.scale, axis=1)
        rows = np.zeros((block.shape[0], 1 + block.shape[1] * block.shape[2]), np.uint8)  # column 0: filter "none"
        rows[:, 1:] = block.reshape(block.shape[0], -1)
        if data := self._z.compress(rows.tobytes()):
            self._chunk(b"IDAT", data)

    def _emit_row(self) -> None:
        C, H, W = self.cell
        block = np.zeros((H + self.pad, self.width // self.scale, C), np.uint8)
        for c, img in enumerate(self._pending):
            x0 = self.pad + c * (W + self.pad)
            block[:H, x0 : x0 + W] = img.permute(1, 2, 0).numpy()
        self._pending = []
        self._lines(block)

    def write(self, images: torch.Tensor) -> None:
        """uint8 (B, C, H, W), the next B cells in row-major order."""
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != self.cell:
            raise ValueError(f"expected uint8 images (B, {', '.join(map(str, self.cell))}), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if self.count + images.shape[0] > self.num:
            raise ValueError(f"the grid was opened for {self.num} images; {self.count + images.shape[0]} written")
        for img in images.cpu():
            self._pending.append(img)
            self.count += 1
            if len(self._pending) == self.nrow or self.count == self.num:
                self._emit_row()

    def finish(self) -> None:
        if self.count != self.num:
            raise ValueError(f"the grid was opened for {self.num} images but {self.count} were written")
        self._chunk(b"IDAT", self._z.flush())
        self._chunk(b"IEND", b"")


@contextlib.contextmanager
def png_grid_writer(path, num: int, nrow: int, channels: int, height: int, width: int, scale: int = 1):
    """Write a grid of ``num`` images, ``nrow`` per row, to the PNG ``path`` as they come (``writer.write(images)``);
    the same pixels :func:`save_grid` writes. Atomic: the file appears complete or not at all."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        writer = PngGridWriter(f, num, nrow, channels, height, width, scale)
        yield writer
        writer.finish()


# ----------------------------------------------------------------------------------------------------------------
# Sample archives (.npz): the ADM layout arr_0 = uint8 images (N, H, W, C), arr_1 = int labels (N,), written and
# read in batches, so 50k 512 x 512 samples (39 GB) never sit in memory at once.

IMAGES_KEY, LABELS_KEY = "arr_0", "arr_1"  # guided-diffusion's sampler and the ADM evaluator (np.savez positional)


NPY_HEADER_BYTES = 4096  # an upper bound of one .npy header plus its zip entry records (zip64 included)


def npz_archive_bytes(num: int, height: int, width: int, channels: int) -> int:
    """Bytes of a sample archive of ``num`` images (uncompressed ``arr_0`` uint8 and ``arr_1`` int64), plus the
    label spool :class:`NpzSampleWriter` keeps until the images are written: what must be free before writing."""
    return int(num) * (int(height) * int(width) * int(channels) + 2 * 8) + 2 * NPY_HEADER_BYTES


class NpzSampleWriter:
    """Appends uint8 batches to ``arr_0.npy`` inside an open zip, and their labels to an anonymous temporary file
    (a zip takes one member at a time), copied in as ``arr_1.npy`` at the end: memory holds one batch whatever
    ``num``; see :func:`npz_sample_writer`."""

    def __init__(self, zf: zipfile.ZipFile, num: int, height: int, width: int, channels: int, spool_dir=None):
        self.num, self.shape = int(num), (int(num), int(height), int(width), int(channels))
        self.count = 0
        self._labels = tempfile.TemporaryFile(dir=spool_dir)  # int64 labels as written; gone when closed
        self._zf = zf
        self._f = zf.open(f"{IMAGES_KEY}.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": self.shape}
        np.lib.format.write_array_header_2_0(self._f, header)

    def write(self, images: torch.Tensor, labels) -> None:
        """images uint8 (B, C, H, W) (the pmf layout; stored as (B, H, W, C)), labels (B,)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (
                self.shape[3], self.shape[1], self.shape[2]):
            raise ValueError(f"expected uint8 images (B, {self.shape[3]}, {self.shape[1]}, {self.shape[2]}), got "
                             f"{images.dtype} {tuple(images.shape)}")
        b = images.shape[0]
        if self.count + b > self.num:
            raise ValueError(f"the archive was opened for {self.num} samples; {self.count + b} written")
        labels = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64).reshape(-1)
        if labels.shape != (b,):
            raise ValueError(f"need one label per image: {b} images, {labels.size} labels")
        self._f.write(np.ascontiguousarray(images.permute(0, 2, 3, 1).cpu().numpy()).tobytes())
        self._labels.write(labels.astype("<i8").tobytes())
        self.count += b

    def _finish(self) -> None:
        self._f.close()
        if self.count != self.num:
            raise ValueError(f"the archive was opened for {self.num} samples but {self.count} were written")
        with self._zf.open(f"{LABELS_KEY}.npy", "w", force_zip64=True) as f:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<i8")), "fortran_order": False,
                      "shape": (self.num,)}
            np.lib.format.write_array_header_2_0(f, header)
            self._labels.seek(0)
            shutil.copyfileobj(self._labels, f, 1 << 20)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._labels.close()


@contextlib.contextmanager
def npz_sample_writer(path, num: int, height: int, width: int, channels: int):
    """Write ``num`` samples to ``path`` batch by batch (``writer.write(images, labels)``), in the ADM layout:
    ``arr_0`` uint8 (N, H, W, C), ``arr_1`` int64 (N,), uncompressed, as ``np.savez(path, images, labels)`` would
    write them (readable by ``np.load``, the ADM evaluator and its ports). Atomic: the file appears complete, with
    exactly ``num`` samples, or not at all."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        writer = NpzSampleWriter(zf, num, height, width, channels, spool_dir=Path(tmp).parent)
        try:
            yield writer
            writer._finish()
        finally:
            writer.close()


def _npz_member(zf: zipfile.ZipFile, keys) -> str | None:
    names = set(zf.namelist())
    return next((k for k in keys if f"{k}.npy" in names), None)


def npz_sample_keys(path) -> tuple[str, str | None]:
    """(images key, labels key or None) of a sample archive in the ADM layout: ``arr_0`` / ``arr_1``."""
    with zipfile.ZipFile(path) as zf:
        if _npz_member(zf, (IMAGES_KEY,)) is None:
            raise KeyError(f"{path} holds {sorted(n.removesuffix('.npy') for n in zf.namelist())}; expected uint8 "
                           f"images under '{IMAGES_KEY}' (the ADM layout)")
        return IMAGES_KEY, _npz_member(zf, (LABELS_KEY,))


def _check_image_array(shape, dtype, path) -> tuple[int, ...]:
    """(N, H, W, C) of a stored image array; grey (N, H, W) counts as C = 1."""
    if dtype != np.uint8:
        raise ValueError(f"{path}: images must be uint8 [0, 255], got {dtype} (convert with pmf.data.images.to_uint8)")
    shape = tuple(shape) + ((1,) if len(shape) == 3 else ())
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise ValueError(f"{path}: expected images (N, H, W, 1 or 3), got {tuple(shape)}")
    return shape


def _read_npy_header(f, path):
    """(shape, fortran_order, dtype) from an open .npy stream positioned at its start."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"{path}: .npy format version {version} is not supported (re-save it with np.savez)")


def npz_sample_shape(path) -> tuple[int, int, int, int]:
    """(N, H, W, C) of the images in a sample archive, from the .npy header alone."""
    key, _ = npz_sample_keys(path)
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        shape, _, dtype = _read_npy_header(f, path)
    return _check_image_array(shape, dtype, path)


def iter_npz_samples(path, batch_size: int = 500, num: int | None = None):
    """Yield (uint8 images (b, C, H, W), labels (b,) int64 or None) of the first ``num`` samples of an archive in
    either layout, reading the .npy member inside the zip sequentially (memory: one batch)."""
    key, label_key = npz_sample_keys(path)
    labels = None
    if label_key is not None:
        with np.load(path) as f:
            labels = torch.from_numpy(f[label_key].astype(np.int64).reshape(-1))
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        shape, fortran, dtype = _read_npy_header(f, path)
        n, h, w, c = _check_image_array(shape, dtype, path)
        if labels is not None and labels.shape[0] != n:
            raise ValueError(f"{path}: {n} images but {labels.shape[0]} labels")
        total = n if num is None else min(int(num), n)
        if fortran:  # not what np.save writes for C-contiguous arrays; read it whole
            arr = np.load(path)[key].reshape(n, h, w, c)
        for start in range(0, total, batch_size):
            b = min(batch_size, total - start)
            if fortran:
                chunk = np.ascontiguousarray(arr[start : start + b])
            else:
                raw = f.read(b * h * w * c)
                if len(raw) != b * h * w * c:
                    raise ValueError(f"{path}: the image array ends early (truncated file?)")
                chunk = np.frombuffer(raw, dtype=np.uint8).reshape(b, h, w, c)
            images = torch.from_numpy(chunk.copy()).permute(0, 3, 1, 2).contiguous()
            yield images, (None if labels is None else labels[start : start + b])


def load_npz_samples(path, num: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All (or the first ``num``) samples of an archive in either layout: uint8 (N, C, H, W), labels (N,) or None."""
    parts = list(iter_npz_samples(path, batch_size=4096, num=num))
    if not parts:
        n, h, w, c = npz_sample_shape(path)
        return torch.zeros(0, c, h, w, dtype=torch.uint8), None
    images = torch.cat([p[0] for p in parts])
    labels = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
    return images, labels
