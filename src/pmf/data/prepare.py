"""``pmf prepare-data``: an ImageFolder -> ADM-center-cropped uint8 shards, once, instead of a JPEG decode per
sample per epoch.

Every image is decoded and cropped by :func:`pmf.data.datasets.read_image_adm`, the function the ImageFolder training
path uses, so a shard holds exactly the pixels that path would feed the network (EDM2's ``dataset_tool.py`` likewise
crops once into an uncompressed archive; the official pMF decodes every epoch).  Output layout, manifest and reading:
:mod:`pmf.data.shards`.

- Deterministic: shard k is made from source files ``[k K, (k + 1) K)`` of the sorted file index
  (:func:`pmf.data.filelist.scan_image_folder`) and nothing else, so its bytes are the same for any worker count.
- Resumable: a shard is finished when its record ``shard-NNNNN.json`` exists (written last, atomically, after the
  ``.npy`` files); a rerun keeps a finished shard if the record's fingerprint (resolution, crop rule, file names and
  labels) matches and both files' SHA-256 checksums verify, and redoes every other shard.
- Unreadable or corrupt files are skipped, listed with the reason, and counted; so are files without an image
  extension and files outside the class folders.  Nothing else is dropped.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from pmf.data.filelist import IMG_EXTENSIONS
from pmf.data.shards import FORMAT, FORMAT_VERSION, MANIFEST, sha256_file
from pmf.data.sources import SourceOptions, index_source, read_item_adm
from pmf.util.atomic import atomic_path, atomic_write_text

__all__ = ["prepare_data", "CROP_RULE", "DEFAULT_SHARD_SIZE"]

DEFAULT_SHARD_SIZE = 1000  # images per shard: ~197 MB at 256 px, ~786 MB at 512 px
CROP_RULE = ("ADM center crop (guided-diffusion image_datasets.py: center_crop_arr): convert('RGB'), halve with "
             "BOX while the short side >= 2R, BICUBIC-resize the short side to R, cut the centered R x R square; "
             "no flip (pmf.data.datasets.center_crop_adm)")


def _shard_names(k: int) -> tuple[str, str, str]:
    return f"shard-{k:05d}.npy", f"shard-{k:05d}.labels.npy", f"shard-{k:05d}.json"


def _fingerprint(resolution: int, files: list[str], labels: list[int]) -> str:
    """What a shard is made from: resolution, crop rule, format version, its files' names and labels."""
    blob = json.dumps([FORMAT_VERSION, resolution, CROP_RULE, files, labels], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class _HashingWriter:
    """A file wrapper that hashes what is written (np.save writes through ``write``), so no second read is needed."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)


def _save_npy(path: Path, arr: np.ndarray) -> str:
    """Write ``arr`` as .npy atomically; return the SHA-256 of the file's bytes."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            w = _HashingWriter(f)
            np.save(w, arr, allow_pickle=False)
    return w.sha.hexdigest()


# Worker state: a shared counter of images processed (for the progress line).
_counter = None


def _init_worker(counter) -> None:
    global _counter
    _counter = counter
    try:  # decoding is single-threaded anyway; keep numpy/BLAS from oversubscribing the cores
        import torch

        torch.set_num_threads(1)
    except Exception:  # noqa: BLE001 - a thread setting is no reason to fail
        pass


def _count(n: int) -> None:
    if _counter is not None:
        with _counter.get_lock():
            _counter.value += n


def _mp_context():
    """Worker processes start clean (nothing inherited from a caller that may hold open DataLoaders or threads):
    forkserver where available, with this module preloaded in the server so each worker forks in milliseconds."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return mp.get_context("spawn")


def _make_shard(task: dict) -> dict:
    """Decode + crop the shard's files, write its .npy files, then its record. Returns the record."""
    out, k, R = Path(task["out"]), task["k"], task["resolution"]
    images = np.empty((len(task["files"]), R, R, 3), dtype=np.uint8)
    labels, skipped = [], []
    for rel, label in zip(task["files"], task["labels"]):
        try:
            images[len(labels)] = read_item_adm(task["kind"], task["source"], rel, R, task["options"])
            labels.append(label)
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
            reason = f"{type(e).__name__}: {e}".replace(os.path.join(task["source"], rel), rel)  # location-free
            skipped.append({"path": rel, "reason": reason})
        _count(1)
    img_name, lab_name, rec_name = _shard_names(k)
    record = {"index": k, "images": img_name, "labels": lab_name, "count": len(labels),
              "sha256_images": _save_npy(out / img_name, images[: len(labels)]),
              "sha256_labels": _save_npy(out / lab_name, np.asarray(labels, dtype=np.int64)),
              "bytes_images": (out / img_name).stat().st_size,
              "first_source": task["first_source"], "num_sources": len(task["files"]),
              "skipped": skipped, "fingerprint": task["fingerprint"]}
    atomic_write_text(out / rec_name, json.dumps(record, indent=1) + "\n")  # last: marks the shard finished
    return record


def _kept_record(out: Path, task: dict) -> dict | None:
    """The shard's record if the shard is finished, made from the same inputs, and its checksums verify."""
    img_name, lab_name, rec_name = _shard_names(task["k"])
    try:
        rec = json.loads((out / rec_name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if rec.get("fingerprint") != task["fingerprint"]:
        return None
    for key, name in (("images", img_name), ("labels", lab_name)):
        try:
            if sha256_file(out / name) != rec[f"sha256_{key}"]:
                return None
        except OSError:
            return None
    _count(task["num_sources"])
    return rec


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class _Progress:
    """``done/total images (x%), N images/s, ETA h:mm:ss`` on stderr: redrawn in place on a terminal, else a line
    every 10 s.  The rate counts only images decoded by this run (kept shards are excluded)."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.quiet = total, quiet
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.base: int | None = None  # images already counted when decoding started
        self.last = -math.inf

    def update(self, done: int, final: bool = False) -> None:
        if self.quiet:
            return
        now = time.perf_counter()
        if not final and now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last = now
        if self.base is None:
            self.base = done
        rate = (done - self.base) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else math.inf
        line = (f"prepare-data: {done:,}/{self.total:,} images ({100 * done / max(self.total, 1):.1f}%), "
                f"{rate:,.0f} images/s, ETA {_fmt_eta(eta)}")
        print(("\r" + line) if self.tty else line, end="\n" if final or not self.tty else "", file=sys.stderr,
              flush=True)

    def start_decoding(self, done: int) -> None:
        self.t0, self.base = time.perf_counter(), done


def _manifest_text(manifest: dict) -> str:
    """JSON with one top-level key per line and one list element per line (readable, diffable, deterministic)."""
    parts = []
    for key, value in manifest.items():
        if isinstance(value, list) and value and isinstance(value[0], (dict, list)):
            body = ",\n".join("  " + json.dumps(v, separators=(", ", ": ")) for v in value)
            parts.append(f" {json.dumps(key)}: [\n{body}\n ]")
        else:
            parts.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def prepare_data(source, out, resolution: int, workers: int = 1, shard_size: int = DEFAULT_SHARD_SIZE,
                 quiet: bool = False, min_free_bytes: int | None = None,
                 source_options: SourceOptions | None = None) -> dict:
    """Prepare ``source`` (class folders of images, or a Hugging Face / EDM2 zip / WebDataset source:
    :mod:`pmf.data.sources`, read as ``source_options`` say) as shards in ``out``; returns the manifest (also
    written to ``out/dataset.json``). ``workers`` decoding processes (1 = in this process). Raises before any work if
    the disk holding ``out`` has less free space than the shards still to write need. Rerunning keeps the finished
    shards whose checksums verify."""
    resolution, shard_size, workers = int(resolution), int(shard_size), int(workers)
    if resolution <= 0 or shard_size <= 0 or workers <= 0:
        raise ValueError(f"--resolution ({resolution}), --shard-size ({shard_size}) and --workers ({workers}) must "
                         "be positive")
    source = Path(os.path.realpath(source))
    out = Path(out)
    if out.resolve() == source or source in out.resolve().parents:
        raise ValueError(f"--out {out} lies inside --source {source}: it would be read as images; choose another")
    options = source_options or SourceOptions()
    kind, index = index_source(source, options)
    samples = [(f, y) for f, y in zip(index.files, index.labels) if y >= 0]
    not_read = _files_not_read(index)
    if not samples:
        raise FileNotFoundError(f"no images with extensions {IMG_EXTENSIONS} under {source}/<class>/")
    tasks = _plan_shards(samples, shard_size, source=str(source), kind=kind, options=options, out=str(out),
                         resolution=resolution)
    _clear_stale(out, len(tasks))
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(f"prepare-data: {len(samples):,} image files in {len(index.classes)} classes under {source} "
        f"({len(not_read)} other files skipped) -> {len(tasks)} shards of <= {shard_size} at "
        f"{resolution} px in {out}")
    records = _write_shards(tasks, out, workers, resolution, min_free_bytes, quiet, say)
    manifest = _manifest(records, samples, not_read + index.skipped, index.classes, out, source=str(source),
                         resolution=resolution, shard_size=shard_size)
    atomic_write_text(out / MANIFEST, _manifest_text(manifest))
    skipped, first = manifest["skipped"], manifest["num_images"]
    say(f"prepare-data: wrote {first:,} images in {len(tasks)} shards ({_fmt_bytes(first * resolution ** 2 * 3)}) "
        f"and {out / MANIFEST}; {manifest['num_unreadable']} unreadable files skipped" + (
            "".join(f"\n  skipped {s['path']}: {s['reason']}" for s in skipped[:20])
            + (f"\n  ... and {len(skipped) - 20} more (see dataset.json)" if len(skipped) > 20 else "")))
    return json.loads(_manifest_text(manifest))


def _files_not_read(index) -> list[dict]:
    """The source's files that are not training images, each with the reason (they go to the manifest's skipped)."""
    outside = [{"path": f, "reason": "not inside a class folder (training reads root/<class>/...)"}
               for f, y in zip(index.files, index.labels) if y < 0]
    ignored = [{"path": f, "reason": f"not an image file (extension not one of {', '.join(IMG_EXTENSIONS)})"}
               for f in index.ignored]
    return outside + ignored


def _plan_shards(samples: list, shard_size: int, **common) -> list[dict]:
    """One task per shard: its files and labels, where they start in the source, and the fingerprint that tells
    whether a shard already on disk was made from them."""
    tasks = []
    for k in range(math.ceil(len(samples) / shard_size)):
        chunk = samples[k * shard_size: (k + 1) * shard_size]
        files, labels = [f for f, _ in chunk], [y for _, y in chunk]
        tasks.append({"k": k, **common, "files": files, "labels": labels, "first_source": k * shard_size,
                      "num_sources": len(files), "fingerprint": _fingerprint(common["resolution"], files, labels)})
    return tasks


def _clear_stale(out: Path, n_shards: int) -> None:
    """Remove temp files of a killed run and shards beyond this plan (a previous, larger --shard-size run)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    for old in out.glob("shard-*"):
        try:
            if int(old.name[6:11]) >= n_shards:
                old.unlink()
        except ValueError:
            pass


def _write_shards(tasks: list[dict], out: Path, workers: int, resolution: int, min_free_bytes: int | None,
                  quiet: bool, say) -> dict[int, dict]:
    """Every shard's record, keeping finished shards whose checksums verify and writing the others (``workers``
    decoding processes), after checking the disk has room for them."""
    global _counter
    ctx = _mp_context()
    counter = _counter = ctx.Value("q", 0)  # this process counts too (kept shards, workers == 1)
    n = sum(t["num_sources"] for t in tasks)
    progress = _Progress(n, quiet)
    records: dict[int, dict] = {}
    with cf.ThreadPoolExecutor(max(1, min(workers, 8))) as pool:  # read back in parallel: hashing is I/O-bound
        for task, rec in zip(tasks, pool.map(lambda t: _kept_record(out, t), tasks)):
            if rec is not None:
                records[task["k"]] = rec
    todo = [t for t in tasks if t["k"] not in records]
    per_image = resolution * resolution * 3
    need = sum(t["num_sources"] for t in todo) * per_image + sum(t["num_sources"] * 8 + 256 for t in todo)
    free = shutil.disk_usage(out).free
    say(f"prepare-data: disk space needed {_fmt_bytes(n * per_image)} in all ({n:,} x {resolution} x {resolution} "
        f"x 3 bytes); {len(records)} finished shards kept (checksums verified), {len(todo)} to write needing "
        f"{_fmt_bytes(need)}; {_fmt_bytes(free)} free on {out}")
    if need > (free if min_free_bytes is None else min_free_bytes):
        raise ValueError(f"not enough disk space on {out}: the remaining shards need {_fmt_bytes(need)}, "
                         f"{_fmt_bytes(free)} are free; free some space or choose another --out")
    progress.start_decoding(counter.value)
    if todo and workers == 1:
        for t in todo:
            records[t["k"]] = _make_shard(t)
            progress.update(counter.value)
    elif todo:
        with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(counter,)) as pool:
            pending = {pool.submit(_make_shard, t) for t in todo}
            try:
                while pending:
                    finished, pending = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
                    for fut in finished:
                        rec = fut.result()
                        records[rec["index"]] = rec
                    progress.update(counter.value)
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
    progress.update(counter.value, final=True)
    return records


def _manifest(records: dict[int, dict], samples: list, not_read: list[dict], classes: list, out: Path, *,
              source: str, resolution: int, shard_size: int) -> dict:
    """dataset.json: the shards in order with their checksums, class counts, every source file used and every file
    skipped with its reason."""
    shards, skipped, first = [], [], 0
    for k in range(len(records)):
        rec = records[k]
        shards.append({"images": rec["images"], "labels": rec["labels"], "count": rec["count"], "first": first,
                       "first_source": rec["first_source"], "num_sources": rec["num_sources"],
                       "sha256_images": rec["sha256_images"], "sha256_labels": rec["sha256_labels"],
                       "bytes_images": rec["bytes_images"]})
        first += rec["count"]
        skipped += rec["skipped"]
    unreadable = len(skipped)
    skipped = sorted(skipped + not_read, key=lambda s: s["path"])  # not_read includes links not followed
    class_counts = [0] * len(classes)
    for k in range(len(records)):
        for y in np.load(out / records[k]["labels"]).tolist():
            class_counts[y] += 1
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "resolution": resolution,
        "layout": "uint8 (count, R, R, 3) RGB (HWC) per shard .npy; labels int64 (count,) .npy",
        "crop": CROP_RULE, "source": source, "shard_size": shard_size,
        "num_images": first, "num_classes": len(classes), "num_sources": len(samples),
        "num_skipped": len(skipped), "num_unreadable": unreadable,
        "classes": classes, "class_to_idx": {c: i for i, c in enumerate(classes)},
        "class_counts": class_counts, "shards": shards,
        "files": [[f, y] for f, y in samples], "skipped": skipped,
    }
