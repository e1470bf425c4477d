"""Folder walks (pmf.data.filelist, shared by training, prepare-data and ref-stats) never follow a link out of the
source or into a loop, read file links only inside the source, say what they skipped, and warn about class folders
without images. The hostile tree of issue 33 is built here."""

import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from pmf.cli import main as cli_main
from pmf.data import filelist


def png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 10, 3), value, np.uint8)).save(path)


@pytest.fixture
def tree(tmp_path):
    """imgs/a: 3 images, imgs/b c: 2, imgs/d -> imgs/.hidden/x (1 image), imgs/empty: none; links: a loop to '.', a
    loop to the root, a folder outside, a file outside, a broken link, a duplicate folder, a file link inside."""
    root, outside = tmp_path / "imgs", tmp_path / "outside"
    for i in range(3):
        png(root / "a" / f"{i}.png", i)
    for i in range(2):
        png(root / "b c" / f"{i}.png", 10 + i)
    png(root / ".hidden" / "x" / "h.png", 20)
    (root / "empty").mkdir()
    png(outside / "secret.png", 99)
    png(outside / "deep" / "more.png", 98)
    os.symlink(".", root / "a" / "self")
    os.symlink("..", root / "b c" / "loop")
    os.symlink(outside, root / "a" / "etc")
    os.symlink(outside / "secret.png", root / "a" / "out.png")
    os.symlink(root / "nowhere.png", root / "a" / "broken.png")
    os.symlink("../b c", root / "a" / "dup")
    os.symlink("../a/0.png", root / "b c" / "in.png")
    os.symlink(".hidden/x", root / "d")
    return root


EXPECTED_FILES = ["a/0.png", "a/1.png", "a/2.png", "b c/0.png", "b c/1.png", "b c/in.png", "d/h.png"]
EXPECTED_SKIPPED = {
    "a/self": "a folder that contains it (a loop)",
    "b c/loop": "a link to the source root, a folder that contains it (a loop)",
    "a/etc": "outside the source: not followed",
    "a/out.png": "outside the source: not read",
    "a/broken.png": "a broken link",
    "a/dup": "a link to b c, which is listed as itself",
}


def test_the_walk_follows_links_only_inside_the_source_and_lists_what_it_skipped(tree):
    with pytest.warns(UserWarning) as record:
        index = filelist.scan_image_folder(tree, cache=False)
    assert index.files == EXPECTED_FILES
    assert index.classes == ["a", "b c", "d", "empty"]
    assert index.labels == [0, 0, 0, 1, 1, 1, 2]
    skipped = {s["path"]: s["reason"] for s in index.skipped}
    assert skipped.keys() == EXPECTED_SKIPPED.keys()
    for path, reason in EXPECTED_SKIPPED.items():
        assert reason in skipped[path], (path, skipped[path])
    said = " ".join(str(w.message) for w in record)
    assert "6 symbolic link(s) skipped" in said and "class folder(s) empty hold no image" in said


def test_a_cached_index_keeps_the_skipped_list_and_an_old_cache_is_not_trusted(tree, tmp_path):
    t = 1e9  # folders written long ago, so the index is cached
    for d in [tree, *(p for p in tree.rglob("*") if p.is_dir() and not p.is_symlink())]:
        os.utime(d, (t, t))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = filelist.scan_image_folder(tree)
        again = filelist.scan_image_folder(tree)
    assert again.from_cache and again.files == first.files and again.skipped == first.skipped
    cache = tmp_path / ".imgs.pmf-files.json"
    old = json.loads(cache.read_text())
    old.update(version=1)  # written by the walk that followed every link
    cache.write_text(json.dumps(old))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not filelist.scan_image_folder(tree).from_cache


def test_prepare_data_on_the_hostile_tree_reads_only_the_source_and_records_the_skips(tree, tmp_path, capsys):
    out = tmp_path / "shards"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = cli_main(["prepare-data", "--source", str(tree), "--resolution", "8", "--out", str(out), "--workers",
                       "1", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "dataset.json").read_text())
    assert m["num_images"] == len(EXPECTED_FILES) and m["classes"] == ["a", "b c", "d", "empty"]
    assert [f for f, _ in m["files"]] == EXPECTED_FILES
    assert EXPECTED_SKIPPED.keys() <= {s["path"] for s in m["skipped"]}
    images = np.concatenate([np.load(out / s["images"]) for s in m["shards"]])
    assert not (images == 99).all(axis=(1, 2, 3)).any()  # the outside file is not in the data
