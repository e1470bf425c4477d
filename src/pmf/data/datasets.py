"""Data: Fashion-MNIST (IDX files), ImageFolder with the ADM center crop, and a resumable sharded sampler.

Batches stay uint8 until they reach the device; :func:`pmf.data.images.to_model_range` maps them to [-1, 1] there.

Data position is one integer, ``nimg`` (global images seen).  The sampler reads the data as an endless stream, the
concatenation of per-epoch permutations ``perm(seed, 0), perm(seed, 1), ...``; the global batch at ``nimg`` is
``stream[nimg : nimg + G]`` and rank r takes the r-th contiguous slice of it.  So a restart, a new world size or a
new global batch size continue from exactly the same image.
"""

from __future__ import annotations

import atexit
import gzip
import hashlib
import os
import tempfile
import threading
import urllib.request
import warnings
import weakref
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pmf.data.filelist import IMG_EXTENSIONS, scan_image_folder
from pmf.util.preempt import ignore_stop_signals

__all__ = [
    "load_fashion_mnist",
    "FASHION_MNIST_CLASSES",
    "parse_idx",
    "ChecksumError",
    "EpochSampler",
    "ImageFolderDataset",
    "center_crop_adm",
    "read_image_adm",
    "collate_uint8",
    "ShardedLoader",
]

# ----------------------------------------------------------------------------------------------------------------------
# Fashion-MNIST

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"  # `apt-get install dataset-fashion-mnist`
DOWNLOAD_TIMEOUT_S = 10.0

_FILES = {  # split -> (images file, labels file), names without ".gz"
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_COUNTS = {"train": 60000, "test": 10000}

# MD5 of the .gz files as published in the Fashion-MNIST README (what the canonical server sends).
_GZ_MD5 = {
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
# MD5 of the decompressed IDX bytes, computed from the Debian package's files.  Those .gz files were recompressed by
# the packager (gzip mtime 2020-06-05), so their .gz MD5 differs from the README's while the content is the same;
# checking the content lets any copy (recompressed, or unpacked) pass and any altered one fail.
_RAW_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}

# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class ChecksumError(ValueError):
    """A data file's MD5 does not match the known value (corrupt, truncated or a different file)."""


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def parse_idx(data: bytes, expected_ndim: int | None = None, name: str = "IDX data") -> np.ndarray:
    """Decode an (uncompressed) IDX file: magic = 0x00 0x00 <type code> <ndim>, ndim big-endian int32 sizes, data.

    Raises ValueError on a bad magic number, an unexpected rank, or a length that disagrees with the header.
    """
    if len(data) < 4:
        raise ValueError(f"{name}: {len(data)} bytes, too short for an IDX header (corrupt or truncated file)")
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES:
        raise ValueError(f"{name}: bad IDX magic number 0x{data[:4].hex()} (not an IDX file, or corrupt)")
    if expected_ndim is not None and ndim != expected_ndim:
        raise ValueError(f"{name}: IDX rank {ndim}, expected {expected_ndim} (magic 0x{data[:4].hex()})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{name}: truncated IDX header ({len(data)} bytes)")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{name}: IDX header says shape {shape} ({expected} bytes) but the file holds {len(data)} bytes "
            "(truncated or corrupt file)"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _read_idx_file(path: Path, stem: str, verify: bool) -> np.ndarray:
    """Read `path` (.gz or raw IDX), check the content MD5 against the known value when `verify`, decode."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, ValueError) as e:  # BadGzipFile is an OSError; a cut stream raises EOFError
            raise ValueError(f"{path}: cannot decompress ({e}); the file is corrupt or truncated") from e
    if verify and _md5(raw) != _RAW_MD5[stem]:
        raise ChecksumError(
            f"{path}: MD5 of the decompressed content is {_md5(raw)}, expected {_RAW_MD5[stem]}: the file is "
            "corrupt or not the original Fashion-MNIST file; delete it (a download will refetch it) or pass verify=False"
        )
    return parse_idx(raw, expected_ndim=3 if "images" in stem else 1, name=str(path))


def _cache_dir() -> Path:
    """$PMF_CACHE/fashion-mnist, else $XDG_CACHE_HOME/pmf/fashion-mnist, else ~/.cache/pmf/fashion-mnist."""
    base = os.environ.get("PMF_CACHE")
    if not base:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pmf")
    return Path(base) / "fashion-mnist"


def _download(url: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> bytes:
    """GET `url` and return the body.  Fails within ~`timeout` s when there is no network, including a hanging DNS
    lookup (which the socket timeout does not cover): the connection is opened in a helper thread."""
    box: dict = {}

    def connect():
        try:
            box["resp"] = urllib.request.urlopen(url, timeout=timeout)
        except BaseException as e:  # handed to the caller below
            box["err"] = e

    th = threading.Thread(target=connect, daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        raise TimeoutError(f"no connection to {url} within {timeout:g} s")
    if "err" in box:
        raise box["err"]
    with box["resp"] as resp:  # each read also times out after `timeout` s of silence
        return resp.read()


def _fetch_to_cache(stem: str, cache: Path) -> Path:
    """Download <stem>.gz, check its MD5, and write it into `cache` atomically (tmp file + os.replace)."""
    url = FASHION_MNIST_URL + stem + ".gz"
    data = _download(url)
    # The README MD5 identifies the served file; the content MD5 also accepts a mirror that recompressed it.
    ok = _md5(data) == _GZ_MD5[stem]
    if not ok:
        try:
            ok = _md5(gzip.decompress(data)) == _RAW_MD5[stem]
        except (OSError, EOFError, ValueError):
            ok = False
    if not ok:
        raise ChecksumError(f"{url}: downloaded {len(data)} bytes with MD5 {_md5(data)}, expected {_GZ_MD5[stem]}")
    cache.mkdir(parents=True, exist_ok=True)
    dst = cache / (stem + ".gz")
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{stem}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)  # atomic: other ranks/processes see the whole file or none
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst


def _find(stem: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        for name in (stem + ".gz", stem):
            if (d / name).is_file():
                return d / name
    return None


def _no_data_message(split: str, searched: list[Path], cache: Path, reason: str) -> str:
    names = ", ".join(f"{s}.gz" for pair in _FILES.values() for s in pair)
    where = ", ".join(str(d) for d in searched)
    return (
        f"Fashion-MNIST ({split}) not found, and {reason}\n"
        f"Searched: {where}.\n"
        "Get the data one of these ways:\n"
        "  1. apt-get install dataset-fashion-mnist   (puts the original files in /usr/share/datasets/fashion-mnist)\n"
        f"  2. set PMF_FASHION_MNIST=/path/to/folder holding the 4 files {names}\n"
        f"     (or pass root=...), or allow network access to {FASHION_MNIST_URL} so they download into {cache}"
    )


def _resolve(split: str, root, download: bool) -> tuple[Path, Path]:
    """Paths of (images, labels) for `split`, in lookup order: root / $PMF_FASHION_MNIST, the Debian package dir,
    the cache dir; else download into the cache."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = root if root is not None else os.environ.get("PMF_FASHION_MNIST")
    cache = _cache_dir()
    dirs = ([Path(root).expanduser()] if root else []) + [Path(DEBIAN_DIR), cache]
    paths = []
    for stem in _FILES[split]:
        p = _find(stem, dirs)
        if p is None:
            if not download:
                raise FileNotFoundError(_no_data_message(split, dirs, cache, "downloading is off (download=False)."))
            try:
                p = _fetch_to_cache(stem, cache)
            except Exception as e:  # no network, DNS failure, timeout, HTTP error, bad checksum, read-only cache
                reason = f"downloading {stem}.gz failed: {type(e).__name__}: {e}"
                raise FileNotFoundError(_no_data_message(split, dirs, cache, reason)) from e
        paths.append(p)
    return paths[0], paths[1]


@lru_cache(maxsize=4)
def _load_arrays(images_path: Path, labels_path: Path, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx_file(images_path, images_path.name.removesuffix(".gz"), verify)
    labels = _read_idx_file(labels_path, labels_path.name.removesuffix(".gz"), verify)
    if images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images of 28x28, got {images.dtype} {images.shape}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{labels_path}: labels outside 0..9")
    images.setflags(write=False)  # shared by every caller; they get copies
    labels.setflags(write=False)
    return images, labels


def load_fashion_mnist(split: str = "train", root=None, *, download: bool = True, verify: bool = True):
    """Fashion-MNIST as ``(images uint8 (N, 1, 28, 28), labels int64 (N,))``; N = 60000 (train) or 10000 (test).

    Lookup order: `root` (else $PMF_FASHION_MNIST), /usr/share/datasets/fashion-mnist (Debian package
    ``dataset-fashion-mnist``), the cache ($PMF_CACHE/fashion-mnist or ~/.cache/pmf/fashion-mnist), else a download
    from the canonical server (10 s timeout, MD5-checked, atomic write into the cache).  A folder may hold the .gz
    files or the unpacked IDX files.  Every file's content MD5 is checked (`verify`).  Decoded arrays are cached in
    memory; each call returns fresh tensors.
    """
    images_path, labels_path = _resolve(split, root, download)
    images, labels = _load_arrays(images_path.resolve(), labels_path.resolve(), verify)
    if verify and images.shape[0] != _COUNTS[split]:
        raise ValueError(f"{images_path}: {images.shape[0]} images, expected {_COUNTS[split]} for {split!r}")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


# ----------------------------------------------------------------------------------------------------------------------
# Pixel range


# ----------------------------------------------------------------------------------------------------------------------
# Sampler


class EpochSampler:
    """Deterministic, resumable, rank-sharded index batches over a dataset of `num_items`.

    The data is an endless stream: epoch e is the permutation ``perm(seed, e)`` of range(N), identical on all ranks
    (identity when ``shuffle=False``).  The global batch at position ``nimg`` (global images seen) is
    ``stream[nimg : nimg + G]``; rank r gets its contiguous slice ``[r * B, (r + 1) * B)`` with B = G / world_size,
    so the ranks' batches concatenated in rank order are the global batch, the same for any world size.

    The ragged tail *wraps*: a batch that crosses an epoch end takes the last images of epoch e and the first of
    epoch e + 1.  Nothing is dropped, and each window ``stream[e * N : (e + 1) * N]`` holds every index exactly once.

    State is just ``nimg``: iterating yields ``batch_at(nimg)`` and advances nimg by G; ``state_dict()`` /
    ``load_state_dict()`` restore the position.  ``batch_at`` is a pure function of nimg.  With a prefetching
    DataLoader the sampler runs ahead of training: checkpoint the consumer's nimg (see :class:`ShardedLoader`).
    """

    def __init__(self, num_items: int, global_batch: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, nimg: int = 0):
        if num_items <= 0:
            raise ValueError(f"num_items must be positive, got {num_items}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank {rank} / world_size {world_size}")
        if global_batch <= 0 or global_batch % world_size:
            raise ValueError(f"global_batch {global_batch} must be a positive multiple of world_size {world_size}")
        self.num_items, self.global_batch, self.seed = int(num_items), int(global_batch), int(seed)
        self.rank, self.world_size, self.shuffle = int(rank), int(world_size), bool(shuffle)
        self.batch_size = self.global_batch // self.world_size  # per rank
        self.nimg = int(nimg)
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def epoch(self) -> int:
        return self.nimg // self.num_items

    def permutation(self, epoch: int) -> torch.Tensor:
        """perm(seed, epoch): int64 (N,), from a numpy PCG64 stream seeded by (seed, epoch); same on every rank."""
        perm = self._perms.get(epoch)
        if perm is None:
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
                perm = torch.from_numpy(rng.permutation(self.num_items).astype(np.int64))
            else:
                perm = torch.arange(self.num_items, dtype=torch.int64)
            if len(self._perms) >= 2:  # consecutive batches touch at most this and the next epoch
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def batch_at(self, nimg: int) -> torch.Tensor:
        """This rank's indices (int64, (B,)) of the global batch that starts at stream position `nimg`."""
        pos = int(nimg) + self.rank * self.batch_size + torch.arange(self.batch_size, dtype=torch.int64)
        epochs, offsets = pos // self.num_items, pos % self.num_items
        out = torch.empty_like(pos)
        for e in torch.unique(epochs).tolist():  # 1 or 2 epochs unless B > N
            m = epochs == e
            out[m] = self.permutation(e)[offsets[m]]
        return out

    def __iter__(self):
        while True:
            idx = self.batch_at(self.nimg)
            self.nimg += self.global_batch
            yield idx

    def state_dict(self) -> dict:
        return {"nimg": self.nimg, "seed": self.seed, "num_items": self.num_items}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "num_items"):
            if k in state and int(state[k]) != getattr(self, k):
                raise ValueError(f"sampler state has {k}={state[k]}, this sampler has {getattr(self, k)}")
        self.nimg = int(state["nimg"])


# ----------------------------------------------------------------------------------------------------------------------
# ImageFolder with the ADM center crop

def center_crop_adm(img: Image.Image, resolution: int) -> Image.Image:
    """ADM center crop (guided-diffusion `image_datasets.py`: `center_crop_arr`, as the official pMF data): halve with
    BOX filtering while the short side is at least
    2 * resolution, BICUBIC-resize so the short side equals `resolution`, then cut the centered square."""
    while min(img.size) >= 2 * resolution:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    scale = resolution / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def read_image_adm(path, resolution: int) -> np.ndarray:
    """One image file -> RGB, ADM center crop -> uint8 (resolution, resolution, 3): the one decode used by training,
    ``pmf prepare-data`` and the reference statistics.  Any mode (L, P, CMYK, RGBA, I;16 ...) goes through PIL's
    ``convert("RGB")`` (alpha dropped); a truncated or corrupt file raises (OSError, ValueError, SyntaxError, ...)."""
    with Image.open(path) as im:
        im = im.convert("RGB")  # forces the full decode: truncated/corrupt data raises here
    return np.array(center_crop_adm(im, resolution), dtype=np.uint8)


class ImageFolderDataset(torch.utils.data.Dataset):
    """``root/<class_name>/**/<image>``; classes sorted by name -> label 0..C-1; items are
    ``(uint8 (3, resolution, resolution) RGB tensor, int label)`` after :func:`center_crop_adm`.  No flip.

    An unreadable or corrupt file never stops a run: it is recorded in ``skipped`` (path -> error), warned about once,
    and the next readable item (index + 1, + 2, ... cyclically) is returned instead, deterministically.  In DataLoader
    worker processes the record lives in the worker's copy; :class:`ShardedLoader` carries it back to this object.
    """

    def __init__(self, root, resolution: int, extensions=IMG_EXTENSIONS):
        self.root = Path(root)
        self.resolution = int(resolution)
        index = scan_image_folder(self.root, extensions)  # the one file index (pmf.data.filelist), cached
        self.classes = index.classes
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = index.class_samples()
        if not self.samples:
            raise FileNotFoundError(f"no images with extensions {tuple(extensions)} under {self.root}/<class>/")
        self.skipped: dict[str, str] = {}  # reported record: path -> error
        self._bad: set[str] = set()  # paths this process knows to be unreadable (skipped without a retry)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, path: str) -> torch.Tensor:
        arr = read_image_adm(path, self.resolution)  # (H, W, 3)
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (3, H, W)

    def record_skipped(self, path: str, error: str) -> None:
        self._bad.add(path)
        if path not in self.skipped:
            self.skipped[path] = error
            warnings.warn(f"skipping unreadable image {path}: {error} ({len(self.skipped)} skipped so far)")

    def load(self, index: int, warn: bool = True) -> tuple[torch.Tensor, int, dict[str, str]]:
        """(image, label, {bad path: error}) for `index`, substituting the next readable item for bad files."""
        bad: dict[str, str] = {}
        n = len(self.samples)
        for k in range(n):
            path, label = self.samples[(index + k) % n]
            if path in self._bad:
                continue
            try:
                return self._read(path), label, bad
            except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
                err = f"{type(e).__name__}: {e}"
                bad[path] = err
                if warn:
                    self.record_skipped(path, err)
                else:  # a worker's copy: the caller reports `bad` (ShardedLoader does, in the main process)
                    self._bad.add(path)
        raise RuntimeError(f"none of the {n} images under {self.root} could be read")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label, _ = self.load(int(index))
        return image, label


def collate_uint8(samples) -> tuple[torch.Tensor, torch.Tensor]:
    """[(uint8 (C, H, W), label), ...] -> (uint8 (B, C, H, W), int64 (B,))."""
    images, labels = zip(*samples)
    return torch.stack(images), torch.as_tensor(labels, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------------------------
# Loader: EpochSampler positions -> uint8 batches, resumable at the consumer's nimg


class _BatchFetch(torch.utils.data.Dataset):
    """Fetches a whole batch from an index tensor (so workers can also report skipped files).
    Returns (images uint8 (B, C, H, W), labels int64 (B,), {bad path: error})."""

    def __init__(self, data):
        self.data = data

    def __getitem__(self, idx: torch.Tensor):
        if isinstance(self.data, tuple):  # in-memory tensors: one gather
            images, labels = self.data
            return images[idx], labels[idx], {}
        if hasattr(self.data, "get_batch"):  # memory-mapped shards (pmf.data.shards): one gather per shard
            return (*self.data.get_batch(idx.numpy()), {})
        bad: dict[str, str] = {}
        samples = []
        for i in idx.tolist():
            image, label, b = self.data.load(i, warn=False)
            samples.append((image, label))
            bad.update(b)
        return (*collate_uint8(samples), bad)

    def __len__(self):
        return len(self.data[1]) if isinstance(self.data, tuple) else len(self.data)


class _Positions:
    """Index batches from the loader's current nimg on; re-read each time a DataLoader iterator starts."""

    def __init__(self, loader: "ShardedLoader"):
        self.loader = loader

    def __iter__(self):
        nimg = self.loader.nimg
        while True:
            yield self.loader.sampler.batch_at(nimg)
            nimg += self.loader.sampler.global_batch


def _passthrough(batch):
    return batch


def _shutdown_workers(loader_ref) -> None:
    """At interpreter exit, before multiprocessing's own exit handler (registered earlier, so run later) would
    terminate the workers and wait for them without a time limit: end them the DataLoader's way (a sentinel each,
    bounded joins)."""
    loader = loader_ref()
    it = getattr(loader, "_iterator", None) if loader is not None else None
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()


SHM_PATH = "/dev/shm"  # where DataLoader workers put the batches they hand over (torch's file-descriptor sharing)


def shared_memory_need(batch_bytes: int, num_workers: int, prefetch_factor: int, processes: int = 1) -> int:
    """Bytes of shared memory the loaders of ``processes`` processes on one machine hold at once: each worker keeps
    ``prefetch_factor`` batches ready, and the batch the step is reading is still there until it is freed."""
    if num_workers <= 0:
        return 0
    return processes * (num_workers * prefetch_factor + 1) * batch_bytes


def shared_memory_line(batch_bytes: int, num_workers: int, prefetch_factor: int, processes: int = 1,
                       path: str = SHM_PATH) -> tuple[str, bool]:
    """(the start-up line about the loader's shared memory, whether ``path`` has room for it). A container's
    default /dev/shm is 64 MB (Docker); the workers then die with a bus error at the first batches that do not
    fit. The fix is the container's: ``docker run --ipc=host`` (or ``--shm-size=NNg``; Kubernetes: an
    ``emptyDir`` with ``medium: Memory`` mounted at /dev/shm), else fewer ``data.num_workers``."""
    need = shared_memory_need(batch_bytes, num_workers, prefetch_factor, processes)
    try:
        st = os.statvfs(path)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    who = f" x {processes} processes on this machine" if processes > 1 else ""
    line = (f"data loader: {num_workers} workers x {prefetch_factor} prefetched batches of {batch_bytes / 1e6:.1f} MB"
            f"{who} need {need / 1e9:.2f} GB of shared memory; {path}: "
            + ("size unknown" if free is None else f"{free / 1e9:.2f} GB free"))
    fits = free is None or need <= free
    if not fits:
        line += (f". Too little: the workers would die with a bus error. Give the container more shared memory "
                 f"(docker run --ipc=host, or --shm-size={max(1, -(-int(need * 1.5) // 10**9))}g) or lower "
                 f"data.num_workers (docs/data.md)")
    return line, fits


class ShardedLoader:
    """Endless iterator of this rank's ``(images uint8 (B, C, H, W), labels int64 (B,))`` batches.

    `data` is a map-style dataset returning (uint8 image, label), e.g. :class:`ImageFolderDataset` or
    :class:`pmf.data.shards.ShardDataset` (batches gathered from its memory maps), or a pair of
    in-memory tensors ``(images, labels)`` such as :func:`load_fashion_mnist` returns.  Order comes from
    :class:`EpochSampler`; ``nimg`` counts global images *delivered to the caller* (not prefetched), so
    ``state_dict()`` taken between steps resumes with exactly the next batch.  With ``num_workers > 0`` a torch
    DataLoader loads ahead in worker processes; skipped-file records come back with the batches into
    ``data.skipped``.
    """

    def __init__(self, data, global_batch: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, shuffle: bool = True, pin_memory: bool = False, prefetch_factor: int = 2,
                 nimg: int = 0):
        self.data = data
        n = len(data[1]) if isinstance(data, tuple) else len(data)
        self.sampler = EpochSampler(n, global_batch, seed, rank, world_size, shuffle=shuffle)
        self.nimg = int(nimg)
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        self._fetch = _BatchFetch(data)
        self._dataloader = None

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    def __iter__(self):
        if self.num_workers == 0:
            batches = (self._fetch[idx] for idx in _Positions(self))
        else:
            if self._dataloader is None:
                self._report_shared_memory()
                self._dataloader = torch.utils.data.DataLoader(
                    self._fetch, sampler=_Positions(self), batch_size=None, collate_fn=_passthrough,
                    num_workers=self.num_workers, pin_memory=self.pin_memory,
                    prefetch_factor=self.prefetch_factor, persistent_workers=True,
                    worker_init_fn=ignore_stop_signals)  # a preempted run stops after its step (pmf.util.preempt)
                atexit.register(_shutdown_workers, weakref.ref(self._dataloader))
            batches = iter(self._dataloader)
        for images, labels, bad in batches:
            if bad and isinstance(self.data, ImageFolderDataset):
                for path, err in bad.items():
                    self.data.record_skipped(path, err)
            self.nimg += self.sampler.global_batch
            yield images, labels

    def _report_shared_memory(self) -> None:
        """One line at start (first process of each machine) on the shared memory the workers need; a warning when
        /dev/shm is too small (:func:`shared_memory_line`)."""
        idx = torch.arange(min(len(self._fetch), 1))
        images, labels, _ = self._fetch[idx]
        per_image = (images.numel() * images.element_size() + labels.numel() * labels.element_size()) / max(len(idx), 1)
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        line, fits = shared_memory_line(int(per_image * self.batch_size), self.num_workers, self.prefetch_factor,
                                        processes)
        if not fits:
            warnings.warn(line, RuntimeWarning, stacklevel=3)
        elif int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(line, flush=True)

    def state_dict(self) -> dict:
        return {"nimg": self.nimg, "seed": self.sampler.seed, "num_items": self.sampler.num_items}

    def load_state_dict(self, state: dict) -> None:
        """Set the position; takes effect at the next ``iter(loader)``."""
        self.sampler.load_state_dict(state)
        self.nimg = self.sampler.nimg
