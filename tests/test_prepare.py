"""``pmf prepare-data`` (pmf.data.prepare), the memory-mapped shards (pmf.data.shards) and the one file index
(pmf.data.filelist): manifest and skipped list on a tree with odd files, byte-identical output for 1 and 3 workers,
resume after damage and after a killed run, pixels equal to the ImageFolder path, the same training losses, and the
reference-statistics scanner reading the same list."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pmf.cli import main as cli_main
from pmf.data.datasets import ImageFolderDataset, ShardedLoader
import pmf.data.filelist as filelist
from pmf.data.prepare import prepare_data
from pmf.data.shards import ShardDataset
from pmf.eval.generate import _ImageFiles, image_source_batches
from pmf.train.config import load_config
from pmf.train.dryrun import dataset_size
from pmf.train.loop import train

R = 16
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _noise(rng, h, w, c):
    return rng.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)


def make_tree(root: Path, seed: int = 0, bad: bool = True) -> dict:
    """Three classes of images in odd sizes and modes (RGB JPEG, grayscale PNG, CMYK JPEG, RGBA PNG, palette PNG,
    one large enough for the BOX halvings, one in a nested folder); with ``bad``, also a truncated JPEG, a garbage
    .jpg, a text file, an image outside the class folders and a hidden file.  Returns what the manifest must say."""
    rng = np.random.default_rng(seed)
    good: dict[str, int] = {}
    classes = ["ant", "bee", "cat"]
    for label, c in enumerate(classes):
        (root / c / "sub").mkdir(parents=True)
        Image.fromarray(_noise(rng, 23 + label, 37, 3)).save(root / c / "a_rgb.jpg", quality=90)
        Image.fromarray(_noise(rng, 19, 16 + 3 * label, 1), "L").save(root / c / "b_gray.png")
        Image.fromarray(_noise(rng, 29, 21, 4), "CMYK").save(root / c / "c_cmyk.jpg")
        Image.fromarray(_noise(rng, 17, 40, 4), "RGBA").save(root / c / "d_rgba.png")
        Image.fromarray(_noise(rng, 33, 18, 3)).convert("P").save(root / c / "e_pal.png")
        Image.fromarray(_noise(rng, 70 + label, 90, 3)).save(root / c / "f_big.JPG", quality=85)
        Image.fromarray(_noise(rng, 20, 20, 3)).save(root / c / "sub" / "g_nested.png")
        for name in ("a_rgb.jpg", "b_gray.png", "c_cmyk.jpg", "d_rgba.png", "e_pal.png", "f_big.JPG",
                     "sub/g_nested.png"):
            good[f"{c}/{name}"] = label
    skipped = {}
    if bad:
        data = (root / "bee" / "a_rgb.jpg").read_bytes()
        (root / "bee" / "h_truncated.jpg").write_bytes(data[: len(data) // 2])
        (root / "cat" / "h_garbage.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
        (root / "ant" / "notes.txt").write_text("not an image")
        Image.fromarray(_noise(rng, 20, 20, 3)).save(root / "loose.png")
        (root / "ant" / ".hidden.jpg").write_bytes(b"ignored entirely")
        skipped = {"bee/h_truncated.jpg": "OSError", "cat/h_garbage.jpg": "UnidentifiedImageError",
                   "ant/notes.txt": "not an image file", "loose.png": "not inside a class folder"}
    return {"classes": classes, "good": good, "skipped": skipped,
            "files": sorted([*good, *(p for p in skipped if p.startswith(("bee/", "cat/")) and p.endswith(".jpg"))],
                            key=lambda p: (p.split("/")[0], p.count("/"), p))}


def dir_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree") / "train"
    expect = make_tree(root)
    out = root.parent / "shards"
    manifest = prepare_data(root, out, R, workers=1, shard_size=5, quiet=True)
    return root, out, manifest, expect


# ----------------------------------------------------------------------------------------------------------------
# Manifest, skipped files, determinism


def test_manifest_lists_classes_files_counts_checksums_and_skips(tree):
    root, out, m, expect = tree
    assert m == json.loads((out / "dataset.json").read_text())
    assert m["resolution"] == R and m["classes"] == expect["classes"]
    assert m["class_to_idx"] == {"ant": 0, "bee": 1, "cat": 2}
    # Sorted source list: every image-extension file in the class folders (readable or not), with its label.
    assert [f for f, _ in m["files"]] == expect["files"]
    assert all(y == expect["classes"].index(f.split("/")[0]) for f, y in m["files"])
    # Skipped: the two unreadable images with PIL's reason, the text file, the image outside the class folders.
    got = {s["path"]: s["reason"] for s in m["skipped"]}
    assert set(got) == set(expect["skipped"])
    for path, reason in expect["skipped"].items():
        assert got[path].startswith(reason), (path, got[path])
    assert str(root) not in json.dumps(m["skipped"])  # reasons name files relative to the source
    assert m["num_skipped"] == 4 and m["num_unreadable"] == 2
    assert m["num_sources"] == len(expect["files"]) and m["num_images"] == len(expect["good"]) == 21
    assert m["class_counts"] == [7, 7, 7]
    # Shards: fixed source ranges of 5 files, counts add up, checksums are the files' SHA-256, shapes as stated.
    assert [s["first_source"] for s in m["shards"]] == list(range(0, m["num_sources"], 5))
    assert sum(s["count"] for s in m["shards"]) == 21 and m["shards"][-1]["first"] + m["shards"][-1]["count"] == 21
    for s in m["shards"]:
        for key in ("images", "labels"):
            assert hashlib.sha256((out / s[key]).read_bytes()).hexdigest() == s[f"sha256_{key}"]
        assert np.load(out / s["images"]).shape == (s["count"], R, R, 3)
        assert np.load(out / s["labels"]).dtype == np.int64
    assert not list(out.glob(".*.tmp"))


def test_same_bytes_for_1_and_3_workers_and_through_the_cli(tree, tmp_path, capsys):
    root, out, m, _ = tree
    assert cli_main(["prepare-data", "--source", str(root), "--resolution", str(R), "--out", str(tmp_path / "w3"),
                     "--workers", "3", "--shard-size", "5"]) == 0
    captured = capsys.readouterr()
    assert "21 images, 3 classes, 5 shards at 16 px; 4 files skipped (2 unreadable)" in captured.out
    assert "disk space needed" in captured.err and "images/s, ETA" in captured.err
    one, three = dir_bytes(out), dir_bytes(tmp_path / "w3")
    assert set(one) == set(three) and len(one) == 1 + 3 * 5
    assert all(one[k] == three[k] for k in one), [k for k in one if one[k] != three[k]]


def test_not_enough_disk_space_is_refused_before_any_work(tree, tmp_path):
    root = tree[0]
    with pytest.raises(ValueError, match="not enough disk space"):
        prepare_data(root, tmp_path / "o", R, quiet=True, min_free_bytes=1000)
    assert not list((tmp_path / "o").glob("shard-*"))


# ----------------------------------------------------------------------------------------------------------------
# Resume


def test_rerun_keeps_verified_shards_and_redoes_damaged_ones(tree, tmp_path, capsys):
    root, clean, _, _ = tree
    out = tmp_path / "out"
    prepare_data(root, out, R, shard_size=5, quiet=True)
    shard0 = (out / "shard-00000.npy").stat().st_mtime_ns
    # Damage three shards in three ways: truncated images, a deleted record, one flipped byte (same size).
    with open(out / "shard-00001.npy", "r+b") as f:
        f.truncate(200)
    (out / "shard-00002.json").unlink()
    lab = bytearray((out / "shard-00003.labels.npy").read_bytes())
    lab[-1] ^= 1
    (out / "shard-00003.labels.npy").write_bytes(bytes(lab))
    (out / "dataset.json").unlink()
    (out / ".shard-00004.npy.123.dead.tmp").write_bytes(b"left by a killed run")
    capsys.readouterr()
    prepare_data(root, out, R, shard_size=5, quiet=False)
    assert "2 finished shards kept (checksums verified), 3 to write" in capsys.readouterr().err
    assert (out / "shard-00000.npy").stat().st_mtime_ns == shard0  # kept, not rewritten
    assert dir_bytes(out) == dir_bytes(clean)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe to stop the run at a known file")
def test_resume_after_a_killed_run(tmp_path):
    """SIGKILL a `pmf prepare-data` process while it is blocked on a named pipe in the last shard (so earlier shards
    are finished and the last is in flight), then make the file a real image and rerun: the finished shards are
    kept and the output equals a clean run's, byte for byte."""
    root = tmp_path / "train"
    make_tree(root, bad=False)
    fifo = root / "cat" / "sub" / "z_pipe.png"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "pmf", "prepare-data", "--source", str(root), "--resolution", str(R), "--out",
           str(out), "--workers", "1", "--shard-size", "4"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("shard-*.json"))) < 5 and time.monotonic() < deadline:  # 22 files: 6 shards
            assert proc.poll() is None, "prepare-data ended before reaching the pipe"
            time.sleep(0.1)
        time.sleep(0.3)
        assert proc.poll() is None and len(list(out.glob("shard-*.json"))) == 5
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "dataset.json").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npy")}
    fifo.unlink()
    Image.fromarray(np.full((20, 20, 3), 7, np.uint8)).save(fifo)
    m = prepare_data(root, out, R, shard_size=4, quiet=True)
    assert m["num_images"] == 22 and m["num_skipped"] == 0
    assert all((out / n).stat().st_mtime_ns == t for n, t in kept.items())
    prepare_data(root, tmp_path / "clean", R, shard_size=4, quiet=True)
    assert dir_bytes(out) == dir_bytes(tmp_path / "clean")


# ----------------------------------------------------------------------------------------------------------------
# Same pixels and the same training as the ImageFolder path


def test_shard_pixels_equal_the_imagefolder_path(tree):
    root, out, _, expect = tree
    shards = ShardDataset(out, resolution=R, verify=True)
    folder = ImageFolderDataset(root, R)
    position = {os.path.relpath(p, folder.root.resolve()): i for i, (p, _) in enumerate(folder.samples)}
    files = shards.source_files()
    assert len(shards) == len(files) == 21 and set(files) == set(expect["good"])
    for i, rel in enumerate(files):
        image, label = shards[i]
        ref_image, ref_label = folder[position[rel]]
        assert image.dtype == torch.uint8 and image.shape == (3, R, R)
        assert torch.equal(image, ref_image) and label == ref_label == expect["good"][rel], rel
    # A batch gather across shards, out of order and with a repeat, equals the item-wise reads.
    idx = np.array([20, 3, 7, 3, 0, 14])
    images, labels = shards.get_batch(idx)
    assert torch.equal(images, torch.stack([shards[i][0] for i in idx]))
    assert labels.tolist() == [shards[i][1] for i in idx]


def test_wrong_resolution_and_damaged_shard_are_clear_errors(tree, tmp_path):
    _, out, _, _ = tree
    with pytest.raises(ValueError, match=r"prepared at 16 px.*data.resolution=16"):
        ShardDataset(out, resolution=32)
    copy = tmp_path / "copy"
    copy.mkdir()
    for name, data in dir_bytes(out).items():
        (copy / name).write_bytes(data)
    data = bytearray((copy / "shard-00002.npy").read_bytes())
    data[-1] ^= 0xFF
    (copy / "shard-00002.npy").write_bytes(bytes(data))
    ShardDataset(copy)  # the cheap open checks shapes only
    with pytest.raises(ValueError, match=r"shard-00002.npy: SHA-256 differs"):
        ShardDataset(copy, verify=True)
    (copy / "shard-00001.labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match="rerun `pmf prepare-data`"):
        ShardDataset(copy)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A tree without unreadable files: the ImageFolder and shard datasets then list the same images in order."""
    root = tmp_path_factory.mktemp("clean") / "train"
    make_tree(root, seed=1, bad=False)
    out = root.parent / "shards"
    prepare_data(root, out, R, workers=2, shard_size=6, quiet=True)
    return root, out


def test_loader_batches_equal_imagefolder_loader_batches(clean):
    """Same sampler, same positions: the shard loader (one worker process, memory maps opened there) yields the
    ImageFolder loader's batches bit for bit, across an epoch boundary and after a resume."""
    root, out = clean
    folder, shards = ImageFolderDataset(root, R), ShardDataset(out, R)
    assert len(folder) == len(shards) == 21
    a = ShardedLoader(folder, 8, seed=3)
    b = ShardedLoader(shards, 8, seed=3, num_workers=1)
    for (xa, ya), (xb, yb), _ in zip(a, b, range(4)):  # 32 images: wraps into epoch 1
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = ShardedLoader(shards, 8, seed=3)
    c.load_state_dict(b.state_dict())
    assert torch.equal(next(iter(c))[0], next(iter(a))[0])


def test_training_from_shards_has_the_imagefolder_losses(clean, tmp_path):
    root, out = clean
    model = ("model.overrides={input_size: 16, patch_size: 4, in_channels: 3, num_classes: 3, hidden_size: 32, "
             "depth: 2, num_heads: 2, aux_head_depth: 1, bottleneck_dim: 8}")
    common = [model, "data.resolution=16", "train.batch_size=4", "train.total_kimg=0.016",
              "train.log_every_kimg=0.004", "train.sample_every_kimg=0", "train.ckpt_every_kimg=1000",
              "train.ckpt_every_minutes=1000", "train.threads=1"]
    n = torch.get_num_threads()
    try:
        cfg_f = load_config("tiny-test", overrides=[*common, "data.dataset=imagefolder", f"data.path={root}"])
        cfg_s = load_config("tiny-test", overrides=[*common, "data.dataset=shards", f"data.path={out}"])
        train(cfg_f, tmp_path / "folder", quiet=True)
        train(cfg_s, tmp_path / "shards", quiet=True)
    finally:
        torch.set_num_threads(n)
    logs = [[json.loads(x) for x in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("folder", "shards")]
    assert len(logs[0]) == len(logs[1]) == 4
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]
    assert dataset_size(cfg_s)[0] == 21


# ----------------------------------------------------------------------------------------------------------------
# One file index


def backdate(root: Path, seconds: float = 10.0) -> None:
    """Set every directory's mtime `seconds` into the past (as for a folder written long ago)."""
    t = time.time() - seconds
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        os.utime(d, (t, t))


def test_file_index_is_cached_validated_and_shared_with_ref_stats(tmp_path, monkeypatch):
    root = tmp_path / "train"
    make_tree(root, seed=2, bad=False)
    cache_file = tmp_path / ".train.pmf-files.json"
    filelist.scan_image_folder(root)
    assert not cache_file.exists()  # just written folders: their next change may not move the mtime
    backdate(root)
    first = filelist.scan_image_folder(root)
    assert not first.from_cache and cache_file.is_file()

    def no_walk(*a, **k):
        raise AssertionError("the cached index should be used, not a walk")

    monkeypatch.setattr(filelist.os, "walk", no_walk)
    folder = ImageFolderDataset(root, R)  # a second start: reads the cache, walks nothing
    again = filelist.scan_image_folder(root)
    assert again.from_cache and again.files == first.files
    # Reference statistics read the same list in the same order, with the same pixels.
    ref = _ImageFiles(root, R)
    assert ref.paths == [p for p, _ in folder.samples]
    assert torch.equal(ref[5][0], folder[5][0])
    monkeypatch.undo()
    # A new file (or folder) changes its directory's mtime: the index is rebuilt and includes it.
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "bee" / "sub" / "new.png")
    rebuilt = filelist.scan_image_folder(root)
    assert not rebuilt.from_cache and "bee/sub/new.png" in rebuilt.files
    backdate(root)
    filelist.scan_image_folder(root)
    assert filelist.scan_image_folder(root).from_cache
    (root / "cat" / "sub" / "g_nested.png").unlink()  # a removal too
    assert "cat/sub/g_nested.png" not in filelist.scan_image_folder(root).files


def test_ref_stats_source_reads_shards_like_the_folder(clean):
    root, out = clean
    from_folder = list(image_source_batches(root, R, batch_size=8))
    from_shards = list(image_source_batches(out, R, batch_size=8))
    assert len(from_folder) == len(from_shards) == 3
    for (xa, _, ia), (xb, _, ib) in zip(from_folder, from_shards):
        assert torch.equal(xa, xb) and torch.equal(ia, ib)
