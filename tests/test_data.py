"""pmf.data.datasets: IDX parsing and checksums, pixel range, the sharded resumable sampler, ImageFolder + ADM crop.

No test touches the network: the downloader is monkeypatched wherever the lookup could reach it.
"""

import gzip
import struct
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pmf.data import datasets
from pmf.data.images import to_model_range, to_uint8
from pmf.data.datasets import (
    ChecksumError,
    EpochSampler,
    ImageFolderDataset,
    ShardedLoader,
    center_crop_adm,
    collate_uint8,
    load_fashion_mnist,
    parse_idx,
)

DEB = Path(datasets.DEBIAN_DIR)
_REAL_DOWNLOAD = datasets._download  # kept before the fixture below replaces it
_HAVE_DEB = all((DEB / f"{s}.gz").is_file() for pair in datasets._FILES.values() for s in pair)
needs_fmnist = pytest.mark.skipif(
    not _HAVE_DEB, reason=f"Fashion-MNIST files absent from {DEB} (apt-get install dataset-fashion-mnist)"
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """Every test: an empty cache dir, no $PMF_FASHION_MNIST, and a downloader that fails like a machine offline."""
    monkeypatch.setenv("PMF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PMF_FASHION_MNIST", raising=False)

    def offline(url, timeout=datasets.DOWNLOAD_TIMEOUT_S):
        raise urllib.error.URLError("[Errno -2] Name or service not known (test: offline)")

    monkeypatch.setattr(datasets, "_download", offline)


def _idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype("uint8"): 0x08, np.dtype(">i4"): 0x0C}[arr.dtype]
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


# ---------------------------------------------------------------------------------------------------------- IDX files


def test_parse_idx_synthetic():
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    out = parse_idx(_idx_bytes(a), expected_ndim=3)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4) and np.array_equal(out, a)
    b = np.array([1, -2, 70000], dtype=">i4")  # big-endian int32 decodes to native int32
    assert parse_idx(_idx_bytes(b)).tolist() == [1, -2, 70000]


def test_parse_idx_rejects_truncated_and_bad_magic():
    raw = _idx_bytes(np.zeros((5, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="truncated"):
        parse_idx(raw[:-1])
    with pytest.raises(ValueError, match="truncated"):
        parse_idx(raw[:10])
    with pytest.raises(ValueError, match="magic"):
        parse_idx(b"\x12\x34" + raw[2:])
    with pytest.raises(ValueError, match="rank"):
        parse_idx(raw, expected_ndim=1)


@needs_fmnist
def test_fashion_mnist_shapes_dtypes_labels():
    x, y = load_fashion_mnist("train")
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert torch.bincount(y, minlength=10).tolist() == [6000] * 10  # 0..9, balanced
    xt, yt = load_fashion_mnist("test")
    assert xt.shape == (10000, 1, 28, 28) and yt.shape == (10000,)
    assert yt.min() == 0 and yt.max() == 9
    assert 0 < x.float().mean() < 255 and x.max() == 255
    # returned tensors are copies: editing one does not alter the in-memory cache
    xt[0] = 0
    assert load_fashion_mnist("test")[0][0].any()


@needs_fmnist
def test_md5_rejects_corrupted_file(tmp_path):
    """One label changed, recompressed: a valid gzip and a valid IDX, but the content MD5 catches it."""
    raw = bytearray(gzip.decompress((DEB / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    raw[8 + 123] = (raw[8 + 123] + 1) % 10
    root = tmp_path / "fm"
    root.mkdir()
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(ChecksumError, match="MD5"):
        load_fashion_mnist("test", root=root)
    # the same file read without verification parses (the bad value is a legal label)
    assert load_fashion_mnist("test", root=root, verify=False)[1].shape == (10000,)


@needs_fmnist
def test_truncated_gz_is_a_clear_error(tmp_path):
    root = tmp_path / "fm"
    root.mkdir()
    gz = (DEB / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_fashion_mnist("test", root=root)


@needs_fmnist
def test_env_root_with_unpacked_files(tmp_path, monkeypatch):
    root = tmp_path / "fm"
    root.mkdir()
    for stem in datasets._FILES["test"]:
        (root / stem).write_bytes(gzip.decompress((DEB / f"{stem}.gz").read_bytes()))
    monkeypatch.setenv("PMF_FASHION_MNIST", str(root))
    monkeypatch.setattr(datasets, "DEBIAN_DIR", str(tmp_path / "nothing"))
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and torch.bincount(y).tolist() == [1000] * 10


def test_no_data_error_names_both_fixes(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(datasets, "DEBIAN_DIR", str(tmp_path / "no-debian"))
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist("train", root=empty)
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "PMF_FASHION_MNIST" in msg and "train-images-idx3-ubyte.gz" in msg
    assert "URLError" in msg and str(empty) in msg  # why the download failed, and where it looked
    assert isinstance(info.value.__cause__, urllib.error.URLError)
    with pytest.raises(FileNotFoundError, match="download=False"):
        load_fashion_mnist("test", root=empty, download=False)


def test_download_gives_up_fast_when_the_connection_hangs(monkeypatch):
    """A hanging connect/DNS lookup (here: a fake urlopen that sleeps) ends in TimeoutError after `timeout` s."""
    import time

    monkeypatch.setattr(datasets.urllib.request, "urlopen", lambda url, timeout: time.sleep(5))
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="within 0.2 s"):
        _REAL_DOWNLOAD("http://example.invalid/x.gz", timeout=0.2)
    assert time.monotonic() - t0 < 2


def test_corrupt_download_is_rejected_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DEBIAN_DIR", str(tmp_path / "no-debian"))
    monkeypatch.setattr(datasets, "_download", lambda url, timeout=10: gzip.compress(b"\0\0\x08\x01garbage"))
    with pytest.raises(FileNotFoundError, match="ChecksumError"):
        load_fashion_mnist("test", root=tmp_path / "empty")
    cache = tmp_path / "cache" / "fashion-mnist"
    assert not cache.exists() or not any(cache.iterdir())


@needs_fmnist
def test_download_writes_verified_files_into_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DEBIAN_DIR", str(tmp_path / "no-debian"))
    urls = []

    def fake_download(url, timeout=10):  # serves the package's (recompressed) files: content MD5 matches
        urls.append(url)
        return (DEB / url.rsplit("/", 1)[1]).read_bytes()

    monkeypatch.setattr(datasets, "_download", fake_download)
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28)
    assert [u.rsplit("/", 1)[1] for u in urls] == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    assert all(u.startswith(datasets.FASHION_MNIST_URL) for u in urls)
    cache = tmp_path / "cache" / "fashion-mnist"
    assert sorted(p.name for p in cache.iterdir()) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    urls.clear()
    load_fashion_mnist("test")  # now served from the cache
    assert urls == []


# ------------------------------------------------------------------------------------------------------- pixel range


def test_range_round_trip():
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = to_model_range(u)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.allclose(x.flatten(), torch.arange(256) / 127.5 - 1)
    assert torch.equal(to_uint8(x), u)
    assert to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0])).tolist() == [0, 0, 128, 255, 255]  # clamped, rounded


# ------------------------------------------------------------------------------------------------------------ sampler


def test_each_index_once_per_epoch_across_two_ranks():
    N, G = 60, 12
    r0, r1 = (iter(EpochSampler(N, G, seed=3, rank=r, world_size=2)) for r in (0, 1))
    for epoch in range(3):
        seen = []
        for _ in range(N // G):
            a, b = next(r0), next(r1)
            assert len(a) == len(b) == G // 2
            assert not set(a.tolist()) & set(b.tolist())
            seen += a.tolist() + b.tolist()
        assert sorted(seen) == list(range(N)), epoch
    # epochs are reshuffled
    s = EpochSampler(N, G, seed=3)
    assert not torch.equal(s.permutation(0), s.permutation(1))


def test_ragged_tail_wraps_into_next_epoch_and_world_size_invariance():
    N, G = 23, 8
    ranks = [EpochSampler(N, G, seed=1, rank=r, world_size=2) for r in range(2)]
    one = EpochSampler(N, G, seed=1)
    stream = torch.cat([torch.cat([s.batch_at(n) for s in ranks]) for n in range(0, 5 * G, G)])  # 40 images
    assert torch.equal(stream[:N], one.permutation(0))  # each epoch window holds every index once
    assert torch.equal(stream[N:], one.permutation(1)[: 40 - N])
    for n in range(0, 5 * G, G):  # the global batch does not depend on the world size
        assert torch.equal(torch.cat([s.batch_at(n) for s in ranks]), one.batch_at(n))
    # batches larger than the dataset still follow the stream
    big = EpochSampler(5, 12, seed=2)
    assert torch.equal(big.batch_at(3), torch.cat([big.permutation(e) for e in range(3)])[3:15])


def test_resume_from_state_dict_and_batch_at_is_pure():
    a = EpochSampler(100, 16, seed=7, rank=1, world_size=4)
    it = iter(a)
    for _ in range(9):  # crosses an epoch end
        next(it)
    state = a.state_dict()
    assert state["nimg"] == 9 * 16
    expected = [next(it) for _ in range(5)]
    b = EpochSampler(100, 16, seed=7, rank=1, world_size=4)
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(iter(b), expected))
    fresh = EpochSampler(100, 16, seed=7, rank=1, world_size=4)
    assert torch.equal(fresh.batch_at(9 * 16), expected[0]) and torch.equal(a.batch_at(9 * 16), expected[0])
    assert not torch.equal(EpochSampler(100, 16, seed=8, rank=1, world_size=4).batch_at(0), fresh.batch_at(0))
    with pytest.raises(ValueError, match="seed"):
        EpochSampler(100, 16, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="multiple"):
        EpochSampler(100, 15, world_size=2)


def test_loader_over_tensors_resumes_at_consumed_position():
    images = torch.arange(30, dtype=torch.uint8).view(30, 1, 1, 1).expand(30, 1, 2, 2).contiguous()
    labels = torch.arange(30) % 10
    loader = ShardedLoader((images, labels), global_batch=8, seed=0, rank=1, world_size=2)
    it = iter(loader)
    for _ in range(3):
        x, y = next(it)
        assert x.shape == (4, 1, 2, 2) and x.dtype == torch.uint8 and torch.equal(y, x[:, 0, 0, 0].long() % 10)
    state = loader.state_dict()
    want = [next(it) for _ in range(3)]
    again = ShardedLoader((images, labels), global_batch=8, seed=0, rank=1, world_size=2)
    again.load_state_dict(state)
    got = [b for _, b in zip(range(3), again)]  # range first: zip must not pull a 4th batch
    assert all(torch.equal(g[0], w[0]) and torch.equal(g[1], w[1]) for g, w in zip(got, want))
    assert again.nimg == state["nimg"] + 3 * 8


# -------------------------------------------------------------------------------------------------------- ImageFolder


def _stripes(w: int, h: int) -> Image.Image:
    """Red | green | blue vertical bands: left quarter, middle half, right quarter."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 4, 0] = 255
    a[:, w // 4 : 3 * w // 4, 1] = 255
    a[:, 3 * w // 4 :, 2] = 255
    return Image.fromarray(a)


def test_center_crop_geometry():
    # 40x20, resolution 8: short side 20 >= 16 -> BOX to 20x10; 10 < 16 stops; BICUBIC to 16x8; crop x in [4, 12)
    img = _stripes(40, 20)
    out = center_crop_adm(img, 8)
    assert out.size == (8, 8)
    ref = img.resize((20, 10), Image.BOX).resize((16, 8), Image.BICUBIC).crop((4, 0, 12, 8))
    assert np.array_equal(np.asarray(out), np.asarray(ref))
    a = np.asarray(out).astype(int)  # the crop is the middle half of the width: green away from the band edges
    assert (a[:, 2:6, 1] == 255).all() and (a[:, 2:6, 0] == 0).all() and (a[:, 2:6, 2] == 0).all()
    # small image: upscale only. 5x7 -> short side 8 -> 8x11 (round(11.2)) -> rows [1, 9)
    small = Image.fromarray(np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8))
    ref = small.resize((8, 11), Image.BICUBIC).crop((0, 1, 8, 9))
    assert np.array_equal(np.asarray(center_crop_adm(small, 8)), np.asarray(ref))
    # two halvings: 70x33 at resolution 8 -> 35x16 -> 17x8; 8 == resolution -> crop x in [4, 12)
    big = Image.fromarray(np.random.default_rng(1).integers(0, 256, (33, 70, 3), dtype=np.uint8))
    ref = big.resize((35, 16), Image.BOX).resize((17, 8), Image.BOX).resize((17, 8), Image.BICUBIC)
    assert np.array_equal(np.asarray(center_crop_adm(big, 8)), np.asarray(ref.crop((4, 0, 12, 8))))


@pytest.fixture
def folder(tmp_path):
    """2 classes (sorted: 'cat' -> 0, 'dog' -> 1); odd sizes; PNG, JPEG, grayscale, palette; 2 bad files."""
    root = tmp_path / "imgs"
    (root / "dog" / "sub").mkdir(parents=True)
    (root / "cat").mkdir()
    _stripes(40, 20).save(root / "cat" / "a.png")
    Image.fromarray(np.full((13, 9, 3), 200, np.uint8)).save(root / "cat" / "b.JPEG", quality=95)
    (root / "cat" / "c_bad.png").write_bytes(b"this is not an image" * 10)  # garbage
    Image.fromarray(np.full((11, 17), 50, np.uint8), mode="L").save(root / "cat" / "d.png")  # grayscale
    jpg = root / "dog" / "e.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (31, 23, 3), dtype=np.uint8)).save(jpg)
    (root / "dog" / "f_cut.jpg").write_bytes(jpg.read_bytes()[:200])  # truncated JPEG
    _stripes(9, 15).convert("P").save(root / "dog" / "sub" / "g.bmp")  # nested dir, palette image
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_shapes_labels_and_skips(folder):
    ds = ImageFolderDataset(folder, resolution=8)
    assert ds.classes == ["cat", "dog"]
    names = [Path(p).name for p, _ in ds.samples]
    assert names == ["a.png", "b.JPEG", "c_bad.png", "d.png", "e.jpg", "f_cut.jpg", "g.bmp"]
    assert [lbl for _, lbl in ds.samples] == [0, 0, 0, 0, 1, 1, 1]
    x, y = ds[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.uint8 and y == 0
    assert torch.equal(x.permute(1, 2, 0), torch.from_numpy(np.array(center_crop_adm(_stripes(40, 20), 8))))
    assert (ds[3][0] == 50).all()  # grayscale -> RGB with equal channels
    assert ds.num_skipped == 0
    with pytest.warns(UserWarning, match="c_bad.png"):
        bad = ds[2]
    assert torch.equal(bad[0], ds[3][0]) and bad[1] == 0  # the next readable item, deterministically
    with pytest.warns(UserWarning, match="f_cut.jpg"):
        bad = ds[5]
    assert torch.equal(bad[0], ds[6][0]) and bad[1] == 1
    assert ds.num_skipped == 2 and sorted(Path(p).name for p in ds.skipped) == ["c_bad.png", "f_cut.jpg"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known bad files are skipped silently afterwards
        assert torch.equal(ds[2][0], ds[3][0])
    xb, yb = collate_uint8([ds[i] for i in range(len(ds))])
    assert xb.shape == (7, 3, 8, 8) and xb.dtype == torch.uint8 and yb.dtype == torch.int64


def test_image_folder_loader_with_worker_reports_skips_and_resumes(folder):
    ds = ImageFolderDataset(folder, resolution=8)
    loader = ShardedLoader(ds, global_batch=7, seed=0, num_workers=1)  # one epoch per batch
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        it = iter(loader)
        x, y = next(it)
    assert x.shape == (7, 3, 8, 8) and x.dtype == torch.uint8 and y.shape == (7,)
    assert ds.num_skipped == 2  # recorded in the worker, carried back to the main process's dataset
    state = loader.state_dict()
    want = next(it)
    plain = ShardedLoader(ImageFolderDataset(folder, resolution=8), global_batch=7, seed=0)  # no workers
    plain.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = next(iter(plain))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
