"""One file index for an image folder: the list of images that training, ``pmf prepare-data`` and the reference
statistics (``pmf ref-stats``) all read, built once and cached.

Walking ImageNet's 1.28 M files takes minutes on a network filesystem, and every rank did it at every start. The
index is built by one walk and cached as JSON; a later start checks it cheaply, by the modification time of every
directory it lists (adding, removing or renaming a file or a folder changes its parent directory's mtime), i.e. ~1000
``stat`` calls for ImageNet instead of listing 1.28 M entries.  An index is not cached while a directory was
modified in the last 2 s (its next change might not move its mtime): a folder still being written is walked again.

Order and contents (those :class:`pmf.data.datasets.ImageFolderDataset` trains on): ``os.walk(root)`` top-down,
directories and files sorted by name; classes are the walked non-hidden subfolders of root, sorted by name -> labels
0..C-1 (one without images is warned about); an image is a non-hidden file whose lower-cased name ends in one of the
extensions. Files directly in root get label -1 (a flat folder: what ``pmf ref-stats`` may read; training uses class
folders only). Files with other extensions are listed as ``ignored``.

Symbolic links: a link to a file is read only when the file lies inside root; a link to a folder is followed only
when the folder lies inside root, does not contain the link (a loop) and is not walked anyway (only folders under
a hidden top-level folder are not), once. Every link not followed is listed in ``skipped`` with the reason and
warned about: a link to ``/`` or a loop cannot multiply the files or leak outside files into the data.

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

from pmf.util.atomic import atomic_write_text

__all__ = ["IMG_EXTENSIONS", "FileIndex", "scan_image_folder", "index_cache_paths"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
INDEX_VERSION = 2  # 2: symbolic links checked (skipped ones listed), walked top-level folders are the classes
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
    skipped: list[dict] = dataclasses.field(default_factory=list)  # {"path", "reason"}: links not followed
    #   (out of the source, loops, duplicates) and broken ones

    @property
    def empty_classes(self) -> list[str]:
        """Class folders without any image (they still get a label, in sorted order)."""
        counts = [0] * len(self.classes)
        for y in self.labels:
            if y >= 0:
                counts[y] += 1
        return [c for c, n in zip(self.classes, counts) if n == 0]

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


def _inside(real: str, root: Path) -> bool:
    return real == str(root) or real.startswith(str(root) + os.sep)


def _dir_link_problem(link: str, dirpath: str, root: Path, followed: set) -> str | None:
    """Why the directory link ``link`` (found in ``dirpath``) is not followed, or None to follow it: only a link to
    a folder inside the source that the walk does not reach otherwise (one under a hidden top-level folder), once."""
    real = os.path.realpath(link)
    if not _inside(real, root):
        return f"a link to {real}, outside the source: not followed"
    rel = Path(os.path.relpath(real, root)).as_posix()
    here = os.path.realpath(dirpath)
    if here == real or here.startswith(real.rstrip(os.sep) + os.sep):
        return f"a link to {'the source root' if rel == '.' else rel}, a folder that contains it (a loop): not followed"
    if not rel.split("/", 1)[0].startswith(".") or real in followed:
        return f"a link to {rel}, which is listed as itself: not followed (its images would count twice)"
    followed.add(real)
    return None


def _file_link_problem(path: str, root: Path) -> str | None:
    """Why the file link ``path`` is not read, or None: only links to files inside the source are read."""
    real = os.path.realpath(path)
    if not os.path.exists(real):
        return "a broken link: not read"
    if not _inside(real, root):
        return f"a link to {real}, outside the source: not read"
    return None


def _walk(root: Path, exts: tuple[str, ...]) -> dict:
    """One walk: {"classes", "dirs": [{"path", "mtime_ns", "files", "ignored"}, ...], "skipped": [{"path",
    "reason"}]} in index order. Directory links are followed only into the source and never into a folder that
    contains them or is listed anyway (:func:`_dir_link_problem`); file links only to files inside the source."""
    dirs, skipped, followed = [], [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else Path(rel).as_posix() + "/"
        if rel == ".":
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # hidden top-level folders are no class
        keep = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            why = _dir_link_problem(full, dirpath, root, followed) if os.path.islink(full) else None
            if why is None:
                keep.append(d)
            else:
                skipped.append({"path": prefix + d, "reason": why})
        dirnames[:] = keep
        names = []
        for f in sorted(f for f in filenames if not f.startswith(".")):
            full = os.path.join(dirpath, f)
            why = _file_link_problem(full, root) if os.path.islink(full) else None
            if why is None:
                names.append(f)
            else:
                skipped.append({"path": prefix + f, "reason": why})
        dirs.append({"path": prefix.rstrip("/"), "mtime_ns": os.stat(dirpath).st_mtime_ns,
                     "files": [f for f in names if f.lower().endswith(exts)],
                     "ignored": [f for f in names if not f.lower().endswith(exts)]})
    classes = sorted(d["path"] for d in dirs if d["path"] and "/" not in d["path"])  # the walked top-level folders
    return {"classes": classes, "dirs": dirs, "skipped": skipped}


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
    return FileIndex(str(root), list(walk["classes"]), files, labels, ignored, from_cache, list(walk["skipped"]))


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
                return _said(_to_index(cached, root, from_cache=True))
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
    return _said(_to_index(walk, root, from_cache=False))


def _said(index: FileIndex) -> FileIndex:
    """Warn about what the walk skipped (links) and about class folders without images; return the index."""
    if index.skipped:
        listed = "; ".join(f"{s['path']}: {s['reason']}" for s in index.skipped[:5])
        more = f"; and {len(index.skipped) - 5} more" if len(index.skipped) > 5 else ""
        warnings.warn(f"{index.root}: {len(index.skipped)} symbolic link(s) skipped ({listed}{more})", stacklevel=3)
    if empty := index.empty_classes:
        warnings.warn(f"{index.root}: class folder(s) {', '.join(empty[:10])}{', ...' if len(empty) > 10 else ''} "
                      "hold no image; they still count as classes (labels in sorted order): add images or remove "
                      "them", stacklevel=3)
    return index
