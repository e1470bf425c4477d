"""Reading a prepared dataset (``pmf prepare-data``): memory-mapped uint8 shards and their manifest.

Layout of the output directory (written by :mod:`pmf.data.prepare`):

- ``dataset.json``: the manifest (format, resolution, crop rule, classes, per-class counts, shards with their
  image counts and SHA-256 checksums, the sorted source file list, the skipped files with the reason);
- ``shard-00000.npy``: uint8 (n, R, R, 3) RGB images, HWC, already ADM center-cropped to R (the ``.npy`` format,
  so ``np.load(mmap_mode="r")`` maps it without reading it); ``shard-00000.labels.npy``: int64 (n,) class labels;
- ``shard-00000.json``: the shard's own record (the manifest's entry plus a fingerprint of what it was made from),
  written last, so its presence marks a finished shard (what a resumed ``prepare-data`` keeps).

Shard k holds the readable images among source files ``[k K, (k + 1) K)`` of the sorted list (K = shard size), in
order, so each shard's bytes depend only on its files, never on the worker count.  The dataset's image i is image
``i - first[k]`` of the shard k with ``first[k] <= i < first[k + 1]``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from pmf.util.atomic import sha256_file

__all__ = ["MANIFEST", "FORMAT", "ShardDataset", "is_shard_dir", "sha256_file", "check_shards"]

MANIFEST = "dataset.json"
FORMAT = "pmf-shards"
FORMAT_VERSION = 1


def is_shard_dir(path) -> bool:
    """Whether ``path`` is a directory holding a prepared dataset (its manifest)."""
    return (Path(path) / MANIFEST).is_file()


class ShardDataset(torch.utils.data.Dataset):
    """The images of a prepared dataset, memory-mapped: items ``(uint8 (3, R, R) tensor, int label)`` like
    :class:`pmf.data.datasets.ImageFolderDataset`'s, and :meth:`get_batch` for a whole index batch at once.

    Opening reads only the manifest and checks every shard file's size and ``.npy`` header (cheap); ``verify=True``
    also recomputes the SHA-256 checksums (reads every byte).  ``resolution`` (if given) must equal the prepared
    one.  The maps are opened lazily in each process (DataLoader workers map the files themselves)."""

    def __init__(self, root, resolution: int | None = None, verify: bool = False):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: data.path must be an output directory of "
                                    "`pmf prepare-data --source TRAIN_DIR --resolution R --out DIR`")
        m = json.loads(path.read_text(encoding="utf-8"))
        if m.get("format") != FORMAT or m.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} manifest (format {m.get('format')!r}, "
                             f"version {m.get('version')!r}); rerun `pmf prepare-data` with this version")
        self.manifest = m
        self.resolution = int(m["resolution"])
        if resolution is not None and int(resolution) != self.resolution:
            raise ValueError(f"{self.root} holds images prepared at {self.resolution} px but {resolution} px were "
                             f"asked for: set data.resolution={self.resolution} (pmf ref-stats: --resolution "
                             f"{self.resolution}), or prepare the data again with --resolution {resolution}")
        self.classes: list[str] = list(m["classes"])
        self.shards: list[dict] = list(m["shards"])
        counts = np.array([s["count"] for s in self.shards], dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(counts)])  # first[k] = global index of shard k's image 0
        if int(self.first[-1]) != int(m["num_images"]):
            raise ValueError(f"{path}: shards hold {int(self.first[-1])} images, the manifest says {m['num_images']}")
        if int(m["num_images"]) == 0:
            raise ValueError(f"{path}: the prepared dataset holds no image")
        self._check_files(verify)
        self._maps: list | None = None
        self.skipped: dict[str, str] = {}  # same interface as ImageFolderDataset: nothing is skipped at read time

    @property
    def num_skipped(self) -> int:
        return 0

    def _check_files(self, verify: bool) -> None:
        R = self.resolution
        for s in self.shards:
            for key, shape, dtype in (("images", (s["count"], R, R, 3), np.uint8), ("labels", (s["count"],), np.int64)):
                f = self.root / s[key]
                if not f.is_file():
                    raise FileNotFoundError(f"{f} is missing: rerun `pmf prepare-data` (it redoes missing shards)")
                arr = np.load(f, mmap_mode="r")
                if arr.shape != shape or arr.dtype != dtype:
                    raise ValueError(f"{f}: {arr.dtype} {arr.shape}, the manifest says {np.dtype(dtype)} {shape} "
                                     "(a damaged or foreign file): rerun `pmf prepare-data` to redo it")
                if verify and sha256_file(f) != s[f"sha256_{key}"]:
                    raise ValueError(f"{f}: SHA-256 differs from the manifest's (a damaged or altered file): delete "
                                     "it and rerun `pmf prepare-data` to redo it")

    def _open(self) -> list:
        if self._maps is None:
            self._maps = [(np.load(self.root / s["images"], mmap_mode="r"), np.load(self.root / s["labels"]))
                          for s in self.shards]
        return self._maps

    def __getstate__(self):  # DataLoader workers (spawn) re-map the files rather than pickling the maps
        return {**self.__dict__, "_maps": None}

    def __len__(self) -> int:
        return int(self.first[-1])

    def locate(self, index) -> tuple[np.ndarray, np.ndarray]:
        """(shard numbers, positions inside the shard) of global indices ``index``."""
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"index out of range [0, {len(self)})")
        k = np.searchsorted(self.first, index, side="right") - 1
        return k, index - self.first[k]

    def get_batch(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, 3, R, R) and int64 (B,) for global indices ``index`` (any order, repeats allowed).

        The images are copied once, row by row, from the maps into an HWC buffer (B, R, R, 3), and returned as its
        (B, 3, R, R) *view*: the same values as the ImageFolder path's contiguous batch, with channels-last strides.
        Transposing uint8 HWC -> CHW on the CPU would cost several times the copy itself (benchmarks/data.py), so the
        training step makes the batch contiguous on the device.  In a DataLoader worker the buffer is allocated in
        shared memory, so handing the batch to the main process copies nothing."""
        maps = self._open()
        k, j = self.locate(index)
        R = self.resolution
        shape = (len(k), R, R, 3)
        if torch.utils.data.get_worker_info() is None:
            buf = torch.empty(shape, dtype=torch.uint8)
        else:
            buf = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(math.prod(shape))).view(shape)
        images = buf.numpy()
        labels = np.empty(len(k), dtype=np.int64)
        for b, (shard, pos) in enumerate(zip(k.tolist(), j.tolist())):
            imgs, labs = maps[shard]
            images[b] = imgs[pos]  # one memcpy of this image's pages
            labels[b] = labs[pos]
        return buf.permute(0, 3, 1, 2), torch.from_numpy(labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, labels = self.get_batch([int(index)])
        return images[0], int(labels[0])

    def load(self, index: int, warn: bool = True) -> tuple[torch.Tensor, int, dict[str, str]]:
        """(image, label, {}): the interface :class:`pmf.data.datasets.ShardedLoader` uses for ImageFolders."""
        image, label = self[index]
        return image, label, {}

    def source_files(self) -> list[str]:
        """Relative source path of each image, in dataset order (the sorted list minus the skipped files)."""
        skipped = {s["path"] for s in self.manifest["skipped"]}
        return [f for f, _ in self.manifest["files"] if f not in skipped]


def check_shards(root) -> dict:
    """``pmf prepare-data --check``: the manifest, every shard file's size and header, then every file's SHA-256
    against the manifest (reads every byte). Returns {"shards", "images", "bytes"}; a mismatch raises ValueError
    listing every damaged file."""
    ds = ShardDataset(root)  # manifest, shapes and dtypes
    bad, total = [], 0
    for s in ds.shards:
        for key in ("images", "labels"):
            f = ds.root / s[key]
            total += f.stat().st_size
            if sha256_file(f) != s[f"sha256_{key}"]:
                bad.append(s[key])
    if bad:
        raise ValueError(f"{ds.root}: {len(bad)} shard file(s) differ from the manifest's SHA-256 ({', '.join(bad[:5])}"
                         f"{', ...' if len(bad) > 5 else ''}): damaged or altered; delete them and rerun `pmf "
                         "prepare-data` with the same arguments to redo them")
    return {"shards": len(ds.shards), "images": len(ds), "bytes": total}
