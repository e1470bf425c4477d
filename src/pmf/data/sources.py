"""Where ``pmf prepare-data --source`` reads images from, besides class folders: the forms datasets ship in.

* **Hugging Face ``datasets``** files: a folder (a Hub snapshot, a ``save_to_disk`` folder or a cache directory) of
  ``.parquet`` or ``.arrow`` files with an image column (the ``Image`` feature, a struct of ``bytes`` / ``path``, or
  plain binary) and an integer class-label column. Columns are found by type and name (``image``/``img``/``jpg``;
  ``label``/``labels``/``class``/``cls``/``target``) or given (``--image-column``, ``--label-column``). When file
  names mark splits (``train-00000-of-00004.parquet``, ``imagenet-1k-train.arrow``), only ``--split`` (default
  train) is read. Class names come from the ``ClassLabel`` feature when the files carry it.
* **EDM2-style zip** (``dataset_tool.py``): image files plus ``dataset.json`` ``{"labels": [[name, label], ...]}``.
* **WebDataset** tar shards (a ``.tar`` file, or a folder of them, in name order): samples grouped by key (the
  member name up to the first dot of its base name), image ``.jpg``/``.jpeg``/``.png``/``.webp``, label ``.cls``.

Each image is an *item* named by a string (``file.parquet:row``, the zip member, ``shard.tar:key``); the items and
their labels, in a fixed order, play the part of :func:`pmf.data.filelist.scan_image_folder`'s file list, so the
shards, manifest, fingerprints (resumability) and determinism of :mod:`pmf.data.prepare` are the same as for a
folder, and every item is decoded and cropped by the same :func:`pmf.data.datasets.read_image_adm`. pyarrow is the
optional ``data`` extra (``pip install 'pixel-meanflow[data]'``); tar and zip need only the standard library.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import tarfile
import zipfile
from pathlib import Path

from pmf.data.datasets import read_image_adm
from pmf.data.filelist import IMG_EXTENSIONS, FileIndex, scan_image_folder
from pmf.errors import PmfError

__all__ = ["SourceOptions", "source_kind", "index_source", "read_item_adm"]

IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "class", "cls", "class_label", "target", "y")
SPLITS = ("train", "validation", "valid", "val", "test")
_SPLIT_RE = re.compile(r"(?:^|[-_./])(" + "|".join(SPLITS) + r")(?:[-_./]|$)")
ARROW_HINT = "pip install 'pixel-meanflow[data]' (pyarrow)"


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """How to read a Hugging Face source (ignored by the other kinds)."""

    image_column: str | None = None  # None: found by type and name
    label_column: str | None = None
    split: str = "train"  # used when file names mark splits


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise PmfError(f"reading Hugging Face parquet / arrow files needs pyarrow: {ARROW_HINT}") from None
    return pyarrow


# ----------------------------------------------------------------------------------------------------------------
# What kind of source


def _tables(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in (".parquet", ".arrow") and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def source_kind(source) -> str:
    """"folder" (class folders), "hf" (parquet / arrow files), "zip" (EDM2) or "tar" (WebDataset)."""
    p = Path(source)
    if p.is_file():
        if p.suffix == ".zip":
            return "zip"
        if p.suffix == ".tar":
            return "tar"
        if p.suffix in (".parquet", ".arrow"):
            return "hf"
        raise PmfError(f"--source {p}: a file must be a .zip (EDM2), a .tar (WebDataset) or a .parquet / .arrow file")
    if not p.is_dir():
        raise FileNotFoundError(f"--source {p} does not exist")
    names = [q.name for q in p.iterdir()]
    if any(n.endswith(".tar") for n in names) and not any((p / n).is_dir() for n in names if not n.startswith(".")):
        return "tar"
    if any(n.endswith((".parquet", ".arrow")) for n in names) or (p / "dataset_info.json").exists() or \
            (p / "state.json").exists() or (not _has_class_images(p) and _tables(p)):
        return "hf"
    return "folder"


def _has_class_images(root: Path) -> bool:
    for d in root.iterdir():
        if d.is_dir() and not d.name.startswith("."):
            for _, _, files in os.walk(d):
                if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
                    return True
    return False


# ----------------------------------------------------------------------------------------------------------------
# Indexes: (classes, items, labels) in a fixed order


def index_source(source, options: SourceOptions = SourceOptions()) -> tuple[str, FileIndex]:
    """``(kind, index)``: the items of ``source`` as a :class:`pmf.data.filelist.FileIndex` whose ``files`` are item
    names (:func:`read_item_adm` reads them) and whose ``root`` is the source path."""
    kind = source_kind(source)
    root = Path(os.path.realpath(source))
    if kind == "folder":
        return kind, scan_image_folder(root)
    items, labels, names, ignored = {"hf": _index_hf, "zip": _index_zip, "tar": _index_tar}[kind](root, options)
    if not items:
        raise FileNotFoundError(f"--source {root}: no labelled images found ({kind} source)")
    n_classes = max(max(labels) + 1, len(names))
    classes = [names[i] if i < len(names) else str(i) for i in range(n_classes)]
    return kind, FileIndex(str(root), classes, items, labels, ignored)


def _hf_files(root: Path, split: str) -> list[Path]:
    files = [root] if root.is_file() else _tables(root)
    rel = [f.name.lower() if root.is_file() else f.relative_to(root).as_posix().lower() for f in files]
    marked = [_SPLIT_RE.search(r) for r in rel]
    if any(marked):
        files = [f for f, m in zip(files, marked) if m and m.group(1) == split]
        if not files:
            found = sorted({m.group(1) for m in marked if m})
            raise PmfError(f"--source {root}: no {split!r} files (splits found: {found}); pass --split")
    parquet = [f for f in files if f.suffix == ".parquet"]
    return parquet or files  # a folder with both (a cache beside a snapshot): the parquet files


def _open_table(path: Path, columns: list[str] | None = None):
    """A whole parquet / arrow file as a pyarrow Table (arrow: memory-mapped, stream or file format)."""
    pa = _pyarrow()
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path, columns=columns)
    source = pa.memory_map(str(path), "r")
    try:
        reader = pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(source)
    table = reader.read_all()
    return table.select(columns) if columns else table


def _schema(path: Path):
    pa = _pyarrow()
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_schema(path)
    source = pa.memory_map(str(path), "r")
    try:
        return pa.ipc.open_stream(source).schema
    except pa.ArrowInvalid:
        return pa.ipc.open_file(source).schema


def _columns(schema, options: SourceOptions, where: Path) -> tuple[str, str]:
    pa = _pyarrow()

    def is_image(f):
        t = f.type
        return (pa.types.is_struct(t) and "bytes" in [t.field(i).name for i in range(t.num_fields)]) or \
            pa.types.is_binary(t) or pa.types.is_large_binary(t)

    names = schema.names
    image = options.image_column or next((n for n in IMAGE_COLUMNS if n in names and is_image(schema.field(n))),
                                         next((f.name for f in schema if is_image(f)), None))
    label = options.label_column or next((n for n in LABEL_COLUMNS if n in names
                                          and pa.types.is_integer(schema.field(n).type)), None)
    for what, col, flag in (("image", image, "--image-column"), ("class-label", label, "--label-column")):
        if col is None or col not in names:
            raise PmfError(f"--source {where}: cannot find the {what} column among {names}; name it with {flag}")
    return image, label


def _class_names(schema, label: str) -> list[str]:
    """The ClassLabel names of the ``datasets`` features in the file's schema metadata, if any."""
    meta = (schema.metadata or {}).get(b"huggingface")
    try:
        feature = json.loads(meta)["info"]["features"][label]
        return list(feature.get("names") or [])
    except (TypeError, ValueError, KeyError, AttributeError):
        return []


def _index_hf(root: Path, options: SourceOptions):
    files = _hf_files(root, options.split)
    if not files:
        raise FileNotFoundError(f"--source {root}: no .parquet or .arrow files")
    base = root.parent if root.is_file() else root
    image, label = _columns(_schema(files[0]), options, files[0])
    names = _class_names(_schema(files[0]), label)
    items, labels, ignored = [], [], []
    for f in files:
        column = _open_table(f, [label]).column(label).to_pylist()
        rel = f.relative_to(base).as_posix()
        for row, y in enumerate(column):
            if y is None or y < 0:  # unlabelled rows (e.g. a test split's -1) cannot train a class-conditional net
                ignored.append(f"{rel}:{row}")
                continue
            items.append(f"{rel}:{row}")
            labels.append(int(y))
    return items, labels, names, ignored


def _index_zip(root: Path, options: SourceOptions):
    with zipfile.ZipFile(root) as z:
        names = set(z.namelist())
        meta = next((n for n in ("dataset.json",) if n in names), None)
        if meta is None:
            raise PmfError(f"--source {root}: no dataset.json with labels in the zip (EDM2 dataset_tool layout)")
        labels_list = json.loads(z.read(meta)).get("labels")
    if not labels_list:
        raise PmfError(f"--source {root}: dataset.json has no labels (an unconditional dataset); class-conditional "
                       "training needs them")
    pairs = sorted((str(n), int(y)) for n, y in labels_list if y is not None)
    missing = [n for n, _ in pairs if n not in names]
    if missing:
        raise PmfError(f"--source {root}: dataset.json lists {len(missing)} file(s) not in the zip, e.g. {missing[0]}")
    labelled = {n for n, _ in pairs}
    ignored = sorted(n for n in names if n != "dataset.json" and not n.endswith("/") and n not in labelled)
    return [n for n, _ in pairs], [y for _, y in pairs], [], ignored


def _tar_files(root: Path) -> list[Path]:
    return [root] if root.is_file() else sorted(p for p in root.iterdir() if p.suffix == ".tar")


def _split_key(member: str) -> tuple[str, str]:
    """WebDataset's key / extension split: the extension starts at the first dot of the base name."""
    directory, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _index_tar(root: Path, options: SourceOptions):
    base = root.parent if root.is_file() else root
    items, labels, ignored = [], [], []
    for shard in _tar_files(root):
        rel = shard.relative_to(base).as_posix()
        samples: dict[str, dict[str, str]] = {}
        with tarfile.open(shard) as t:
            for m in t:
                if m.isfile():
                    key, ext = _split_key(m.name)
                    samples.setdefault(key, {})[ext] = m.name
            cls = {k: t.extractfile(s["cls"]).read().decode().strip() for k, s in samples.items() if "cls" in s}
        for key in sorted(samples):
            image = next((e for e in ("jpg", "jpeg", "png", "webp") if e in samples[key]), None)
            if image is None or key not in cls:
                ignored.append(f"{rel}:{key}")
                continue
            items.append(f"{rel}:{samples[key][image]}")
            labels.append(int(cls[key]))
    return items, labels, [], ignored


# ----------------------------------------------------------------------------------------------------------------
# Reading one item (in the prepare-data worker processes; containers are opened once per process)

_OPEN: dict[tuple, object] = {}


def _cached(key: tuple, opener):
    if key not in _OPEN:
        if len(_OPEN) > 4:  # a few containers at a time: shards are read in order
            _OPEN.pop(next(iter(_OPEN)))
        _OPEN[key] = opener()
    return _OPEN[key]


def _item_bytes(kind: str, root: Path, item: str, options: SourceOptions) -> bytes:
    if kind == "zip":
        return _cached(("zip", root), lambda: zipfile.ZipFile(root)).read(item)
    path, _, inner = item.rpartition(":")
    base = root.parent if root.is_file() else root
    if kind == "tar":
        t = _cached(("tar", base / path), lambda: tarfile.open(base / path))
        return t.extractfile(inner).read()
    table = _cached(("hf", base / path, options), lambda: _open_hf_images(base / path, options))
    value = table[int(inner)].as_py()
    if isinstance(value, dict):  # the Image feature: {"bytes", "path"}; bytes empty when it points at a local file
        return value.get("bytes") or (Path(value["path"]).read_bytes() if value.get("path") else None)
    return value


def _open_hf_images(path: Path, options: SourceOptions):
    image, _ = _columns(_schema(path), options, path)
    return _open_table(path, [image]).column(image)


def read_item_adm(kind: str, source, item: str, resolution: int, options: SourceOptions = SourceOptions()):
    """One item of ``source`` -> uint8 (R, R, 3) through :func:`pmf.data.datasets.read_image_adm` (the folder path's
    decode and crop)."""
    root = Path(source)
    if kind == "folder":
        return read_image_adm(os.path.join(source, item), resolution)
    data = _item_bytes(kind, root, item, options)
    if data is None:
        raise ValueError("the image cell is empty")
    return read_image_adm(io.BytesIO(data), resolution)
