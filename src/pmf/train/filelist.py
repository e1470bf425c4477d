"""One file index for an image folder: the list of images that training, ``pmf prepare-data`` and the reference
statistics (``pmf ref-stats``) all read, built once and cached.

Walking ImageNet's 1.28 M files takes minutes on a network filesystem, and every rank did it at every start. The
index is built by one walk and cached as JSON; a later start checks it cheaply, by the modification time of every
directory it lists (adding, removing or renaming a file or a folder changes its parent directory's mtime), i.e. ~1000
``stat`` calls for ImageNet instead of listing 1.28 M entries.  An index is not cached while a directory was
modified in the last 2 s (its next change might not move its mtime): a folder still being written is walked again.

Order and contents (those :class:`pmf.train.data.ImageFolderDataset` trains on): ``os.walk(root)``
top-down, directories and files sorted by name, following symlinks; classes are the non-hidden subfolders of root,
sorted by name -> labels 0..C-1; an image is a non-hidden file whose lower-cased name ends in one of the extensions.
Files directly in root get label -1 (a flat folder: what ``pmf ref-stats`` may read; training uses class folders
only). Files with other extensions are listed as ``ignored``.

Cache location: next to the data, as the hidden sibling file ``<parent>/.<root name>.pmf-files.json`` (not inside
root: writing there would change root's mtime and invalidate the cache), else, when the parent is not writable,
``$PMF_CACHE/file-index/<hash of root>.json`` (default ``~/.cache/pmf``). Ranks that build it at the same moment
each write it atomically; the content is the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from pathlib import Path

from pmf.atomic import atomic_write_text

__all__ = ["IMG_EXTENSIONS", "FileIndex", "scan_image_folder", "index_cache_paths"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
INDEX_VERSION = 1
RACY_NS = 2_000_000_000  # 2 s: directories modified this recently are not trusted to show the next change


@dataclasses.dataclass
class FileIndex:
    """The images under ``root``: ``files[i]`` (path relative to root, '/'-separated) has label ``labels[i]``
    (-1 = directly in root); ``classes[label]`` is the class folder's name."""

    root: str
    classes: list[str]
    files: list[str]
    labels: list[int]
    ignored: list[str]  # files in the walked folders without an image extension (relative paths)
    from_cache: bool = False  # whether this index was read from a valid cache file

    def class_samples(self) -> list[tuple[str, int]]:
        """(absolute path, label) of the images in class folders, in index order (the training list)."""
        return [(os.path.join(self.root, f), y) for f, y in zip(self.files, self.labels) if y >= 0]


def _user_cache_dir() -> Path:
    base = os.environ.get("PMF_CACHE")
    if not base:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pmf")
    return Path(base) / "file-index"


def index_cache_paths(root) -> list[Path]:
    """Where the index of ``root`` is looked for, in order: next to the data, then the user cache."""
    root = Path(os.path.realpath(root))
    key = hashlib.sha256(str(root).encode()).hexdigest()[:20]
    return [root.parent / f".{root.name}.pmf-files.json", _user_cache_dir() / f"{key}.json"]


def _walk(root: Path, exts: tuple[str, ...]) -> dict:
    """One walk: {"classes", "dirs": [{"path", "mtime_ns", "files", "ignored"}, ...]} in index order."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    dirs = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        rel = os.path.relpath(dirpath, root)
        if rel == ".":
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # hidden top-level folders are no class
        dirnames.sort()
        names = sorted(f for f in filenames if not f.startswith("."))
        dirs.append({"path": "" if rel == "." else Path(rel).as_posix(), "mtime_ns": os.stat(dirpath).st_mtime_ns,
                     "files": [f for f in names if f.lower().endswith(exts)],
                     "ignored": [f for f in names if not f.lower().endswith(exts)]})
    return {"classes": classes, "dirs": dirs}


def _valid(cached: dict, root: Path, exts: tuple[str, ...]) -> bool:
    """The cheap check: same format, root and extensions, and every listed directory's mtime unchanged."""
    if cached.get("version") != INDEX_VERSION or cached.get("root") != str(root):
        return False
    if tuple(cached.get("extensions", ())) != exts:
        return False
    try:
        return all(os.stat(root / d["path"]).st_mtime_ns == d["mtime_ns"] for d in cached["dirs"])
    except OSError:  # a listed directory is gone
        return False


def _to_index(walk: dict, root: Path, from_cache: bool) -> FileIndex:
    class_to_idx = {c: i for i, c in enumerate(walk["classes"])}
    files, labels, ignored = [], [], []
    for d in walk["dirs"]:
        label = class_to_idx[d["path"].split("/", 1)[0]] if d["path"] else -1
        prefix = d["path"] + "/" if d["path"] else ""
        files += [prefix + f for f in d["files"]]
        labels += [label] * len(d["files"])
        ignored += [prefix + f for f in d["ignored"]]
    return FileIndex(str(root), list(walk["classes"]), files, labels, ignored, from_cache)


def scan_image_folder(root, extensions=IMG_EXTENSIONS, cache: bool = True) -> FileIndex:
    """The :class:`FileIndex` of ``root``: read from a valid cache file, else walked once and cached (``cache``)."""
    root = Path(os.path.realpath(root))
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist (expected root/<class>/<image> folders)")
    exts = tuple(e.lower() for e in extensions)
    paths = index_cache_paths(root)
    if cache:
        for p in paths:
            try:
                cached = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if _valid(cached, root, exts):
                return _to_index(cached, root, from_cache=True)
    started_ns = time.time_ns()
    walk = _walk(root, exts)
    # A directory changed within RACY_NS of the walk could change again within its mtime's granularity (1 s or
    # coarser on some network filesystems) without a visible mtime change: such an index is not cached.
    if cache and any(d["mtime_ns"] >= started_ns - RACY_NS for d in walk["dirs"]):
        cache = False
    if cache:
        text = json.dumps({"version": INDEX_VERSION, "root": str(root), "extensions": list(exts), **walk},
                          separators=(",", ":"))
        for p in paths:
            try:
                atomic_write_text(p, text)
                break
            except OSError:
                continue
        else:
            warnings.warn(f"could not cache the file index of {root} (tried {', '.join(map(str, paths))}); "
                          "the folder will be walked again next time")
    return _to_index(walk, root, from_cache=False)
