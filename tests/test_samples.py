"""Sample archives in the ADM layout and ``pmf eval-samples``: the .npz round trip in both layouts (arr_0 / arr_1
and the older images / labels), the streamed writer's atomicity, and the five ADM-evaluator numbers of a sample file
(FID, sFID, IS, precision, recall) against an independent one-shot numpy / scipy computation, for each kind of
reference (statistics only, reference images, an ADM batch with both, `pmf ref-stats` output)."""

import json

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import torch

from pmf.eval import fmnist as clf, generate as ev, samples as sm
from pmf.eval.stats import frechet_distance
from pmf.data.images import (
    iter_npz_samples,
    load_npz_samples,
    npz_sample_shape,
    npz_sample_writer,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def save_npz(path, images: torch.Tensor, labels: torch.Tensor):
    """uint8 ``images`` (N, C, H, W) and ``labels`` (N,) as an ADM-layout .npz, through npz_sample_writer."""
    n, c, h, w = images.shape
    with npz_sample_writer(path, n, h, w, c) as writer:
        writer.write(images, labels)
    return path


def random_images(n, c=3, h=8, w=8, seed=0, shift=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, w), generator=g)
    return (x // 2 + shift).clamp(0, 255).to(torch.uint8)


def projection_extractor(seed=0, pixels=3 * 8 * 8, pool_dim=6, spatial_dim=5, num_logits=4) -> sm.Extractor:
    """Random projections of the pixels: pool (6), logits (4), spatial (5, after a ReLU)."""
    g = torch.Generator().manual_seed(seed)
    wf = torch.randn(pixels, pool_dim, generator=g) / 8
    wl = torch.randn(pixels, num_logits, generator=g) / 8
    ws = torch.randn(pixels, spatial_dim, generator=g) / 8

    def extract(x):
        v = x.float().flatten(1) / 127.5 - 1
        return {"pool": v @ wf, "logits": v @ wl, "spatial": torch.relu(v @ ws + 0.5)}

    return sm.Extractor(extract, "fid", "is", info={"extractor": "projection"})


def fd_scipy(a: np.ndarray, b_mu: np.ndarray, b_sigma: np.ndarray) -> float:
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma @ b_sigma).real
    return float(np.sum((mu - b_mu) ** 2) + np.trace(sigma) + np.trace(b_sigma) - 2 * np.trace(covmean))


def is_numpy(logits: np.ndarray, split_of: np.ndarray) -> np.ndarray:
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for s in range(split_of.max() + 1):
        ps = p[split_of == s]
        kl = (ps * (np.log(ps) - np.log(ps.mean(0, keepdims=True)))).sum(1).mean()
        scores.append(np.exp(kl))
    return np.array(scores)


def pr_brute_force(real, fake, k=3):
    r_real = np.sort(scipy.spatial.distance.cdist(real, real), axis=1)[:, k]
    r_fake = np.sort(scipy.spatial.distance.cdist(fake, fake), axis=1)[:, k]
    d = scipy.spatial.distance.cdist(real, fake)
    return float(np.mean((d <= r_real[:, None]).any(0))), float(np.mean((d <= r_fake[None, :]).any(1)))


# ---------------------------------------------------------------------------------------------------------------
# Sample archives


def test_npz_round_trip_in_the_adm_layout_and_the_old_one(tmp_path):
    x, y = random_images(11, seed=1), torch.arange(11) % 4
    path = save_npz(tmp_path / "s.npz", x, y)
    with np.load(path) as f:  # what the ADM evaluator reads: arr_0 uint8 (N, H, W, C), arr_1 labels
        assert sorted(f.keys()) == ["arr_0", "arr_1"]
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (11, 8, 8, 3)
        np.testing.assert_array_equal(f["arr_0"], x.permute(0, 2, 3, 1).numpy())
        np.testing.assert_array_equal(f["arr_1"], y.numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]  # no temp file left
    # the same data as np.savez writes it positionally (ADM's sampler); any other layout is refused
    np.savez(tmp_path / "adm.npz", x.permute(0, 2, 3, 1).numpy(), y.numpy())
    np.savez(tmp_path / "other.npz", images=x.permute(0, 2, 3, 1).numpy(), labels=y.numpy())
    np.savez_compressed(tmp_path / "nolabels.npz", arr_0=x.permute(0, 2, 3, 1).numpy())
    with pytest.raises(KeyError, match=r"other.npz holds \['images', 'labels'\]; expected uint8 images under 'arr_0'"):
        load_npz_samples(tmp_path / "other.npz")
    for name in ("s.npz", "adm.npz"):
        images, labels = load_npz_samples(tmp_path / name)
        torch.testing.assert_close(images, x, rtol=0, atol=0)
        torch.testing.assert_close(labels, y, rtol=0, atol=0)
        torch.testing.assert_close(ev.npz_images(tmp_path / name), x, rtol=0, atol=0)
        parts = list(iter_npz_samples(tmp_path / name, batch_size=4, num=10))  # streamed, first 10
        assert [p[0].shape[0] for p in parts] == [4, 4, 2]
        torch.testing.assert_close(torch.cat([p[0] for p in parts]), x[:10], rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([p[1] for p in parts]), y[:10], rtol=0, atol=0)
    images, labels = load_npz_samples(tmp_path / "nolabels.npz")
    assert labels is None and torch.equal(images, x)
    # grey: (N, H, W) and (N, H, W, 1) both read as (N, 1, H, W)
    grey = random_images(5, c=1, seed=2)
    np.savez(tmp_path / "grey.npz", arr_0=grey[:, 0].numpy())
    save_npz(tmp_path / "grey1.npz", grey, torch.zeros(5))
    for name in ("grey.npz", "grey1.npz"):
        assert torch.equal(load_npz_samples(tmp_path / name)[0], grey) and npz_sample_shape(tmp_path / name) == (
            5, 8, 8, 1)
    # bad files: a clear error naming the problem
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    np.savez(tmp_path / "other.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="uint8"):
        load_npz_samples(tmp_path / "float.npz")
    with pytest.raises(KeyError, match="arr_0"):
        load_npz_samples(tmp_path / "other.npz")


def test_streamed_writer_is_atomic_and_counts(tmp_path):
    x = random_images(6, seed=3)
    with npz_sample_writer(tmp_path / "w.npz", 6, 8, 8, 3) as w:
        w.write(x[:4], [0, 1, 2, 3])
        w.write(x[4:], torch.tensor([4, 5]))
    images, labels = load_npz_samples(tmp_path / "w.npz")
    assert torch.equal(images, x) and labels.tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="opened for 6 samples but 4"):  # too few: no file appears
        with npz_sample_writer(tmp_path / "short.npz", 6, 8, 8, 3) as w:
            w.write(x[:4], range(4))
    with pytest.raises(ValueError, match="expected uint8 images"):
        with npz_sample_writer(tmp_path / "bad.npz", 6, 8, 8, 3) as w:
            w.write(x.float(), range(6))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.npz"]


def test_image_source_batches_reads_adm_archives_and_splits_ranks(tmp_path):
    x = random_images(13, seed=4)
    np.savez(tmp_path / "adm.npz", x.permute(0, 2, 3, 1).numpy())  # positional, no labels: ADM's reference batches
    save_npz(tmp_path / "new.npz", x, torch.zeros(13))
    for name in ("adm.npz", "new.npz"):
        got = {}
        for rank in range(3):
            for images, _, idx in ev.image_source_batches(tmp_path / name, None, 2, num=12, rank=rank, world_size=3):
                assert (idx % 3 == rank).all()
                got.update({int(i): im for i, im in zip(idx, images)})
        assert sorted(got) == list(range(12))
        assert torch.equal(torch.stack([got[i] for i in range(12)]), x[:12])


# ---------------------------------------------------------------------------------------------------------------
# pmf eval-samples: the five numbers against one-shot numpy


def one_shot(extractor, images):
    out = extractor.extract(images)
    return {k: v.double().numpy() for k, v in out.items()}


@pytest.mark.parametrize("batch_size", [17, 1000])
def test_evaluate_samples_equals_one_shot_numpy(tmp_path, batch_size):
    ext = projection_extractor()
    fake, ref_images = random_images(230, seed=5), random_images(150, seed=6, shift=20)
    save_npz(tmp_path / "fake.npz", fake, torch.arange(230) % 4)
    np.savez(tmp_path / "ref_images.npz", arr_0=ref_images.permute(0, 2, 3, 1).numpy())
    ref = sm.load_reference(tmp_path / "ref_images.npz", ext, batch_size=batch_size)
    m = sm.evaluate_samples(tmp_path / "fake.npz", ext, ref, batch_size=batch_size)
    f, r = one_shot(ext, fake), one_shot(ext, ref_images)
    assert m["n"] == 230 and m["labels"] is True and m["extractor"] == "projection"
    assert m["fid"] == pytest.approx(fd_scipy(f["pool"], r["pool"].mean(0), np.cov(r["pool"], rowvar=False)),
                                     rel=1e-6)
    assert m["sfid"] == pytest.approx(fd_scipy(f["spatial"], r["spatial"].mean(0), np.cov(r["spatial"],
                                                                                         rowvar=False)), rel=1e-6)
    perm_split = np.empty(230, np.int64)
    perm_split[np.random.RandomState(2020).permutation(230)] = np.arange(230) * 10 // 230  # torch-fidelity splits
    scores = is_numpy(f["logits"], perm_split)
    assert m["is"] == pytest.approx(scores.mean(), rel=1e-9) and m["is_std"] == pytest.approx(scores.std(), rel=1e-6)
    assert m["is_adm"] == pytest.approx(is_numpy(f["logits"], np.zeros(230, np.int64))[0], rel=1e-9)  # one split
    p, rc = pr_brute_force(r["pool"], f["pool"])
    assert 0.02 < p < 0.98 and 0.02 < rc < 0.98
    assert (m["precision"], m["recall"]) == pytest.approx((p, rc), abs=0.5 / 230)
    assert m["k"] == 3 and m["pr_reference_n"] == 150
    # ADM's consecutive splits of 5000: with 12000 samples, splits of 5000, 5000 and 2000
    from pmf.eval.stats import adm_is_split_assignment

    assert np.bincount(adm_is_split_assignment(12000)).tolist() == [5000, 5000, 2000]
    # num: only the first samples
    assert sm.evaluate_samples(tmp_path / "fake.npz", ext, ref, num=100)["n"] == 100


def test_reference_kinds(tmp_path):
    """Statistics only (JiT): FID, no P / R; an ADM batch (images + mu/sigma/mu_s/sigma_s): the stored statistics
    for FID / sFID, the images' features for P / R; an images-only file: everything from the images."""
    ext = projection_extractor()
    fake, ref_images = random_images(60, seed=7), random_images(40, seed=8, shift=10)
    save_npz(tmp_path / "fake.npz", fake, torch.zeros(60))
    r = one_shot(ext, ref_images)
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(6), np.cov(rng.standard_normal((50, 6)), rowvar=False)
    mu_s, sigma_s = rng.standard_normal(5), np.cov(rng.standard_normal((50, 5)), rowvar=False)
    np.savez(tmp_path / "jit.npz", mu=mu, sigma=sigma)
    np.savez(tmp_path / "adm.npz", arr_0=ref_images.permute(0, 2, 3, 1).numpy(), mu=mu, sigma=sigma, mu_s=mu_s,
             sigma_s=sigma_s)
    f = one_shot(ext, fake)
    jit = sm.evaluate_samples(tmp_path / "fake.npz", ext, sm.load_reference(tmp_path / "jit.npz", ext))
    assert jit["fid"] == pytest.approx(fd_scipy(f["pool"], mu, sigma), rel=1e-6)
    assert "sfid" not in jit and "precision" not in jit and "is" in jit
    adm_ref = sm.load_reference(tmp_path / "adm.npz", ext)
    adm = sm.evaluate_samples(tmp_path / "fake.npz", ext, adm_ref)
    assert adm["fid"] == pytest.approx(jit["fid"], rel=1e-12)
    assert adm["sfid"] == pytest.approx(fd_scipy(f["spatial"], mu_s, sigma_s), rel=1e-6)
    assert (adm["precision"], adm["recall"]) == pytest.approx(pr_brute_force(r["pool"], f["pool"]), abs=0.5 / 60)
    with pytest.raises(KeyError, match="neither reference statistics"):
        np.savez(tmp_path / "bad.npz", x=np.zeros(3))
        sm.load_reference(tmp_path / "bad.npz", ext)
    with pytest.raises(FileNotFoundError, match="ref-stats"):
        sm.load_reference(tmp_path / "missing.npz", ext)


def test_fmnist_extractor_on_a_labelled_sample_file(tmp_path, monkeypatch):
    """The Fashion-MNIST CNN: Frechet distance, classifier score, P / R, class accuracy and diversity against the
    test set; no sFID. Random CNN and synthetic data; the class accuracy equals a direct argmax count."""
    g = torch.Generator().manual_seed(9)
    test_x = torch.randint(0, 256, (80, 1, 28, 28), dtype=torch.uint8, generator=g)
    test_y = torch.arange(80) % 10
    monkeypatch.setattr(clf, "_load_fmnist", lambda split: (test_x, test_y))
    torch.manual_seed(0)
    cnn = clf.FashionCNN().eval()
    ext, ref = sm.fmnist_extractor_and_reference(batch_size=32, classifier=(cnn, {"test_accuracy": 0.5}))
    fake = torch.randint(0, 256, (50, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.arange(50) % 10
    save_npz(tmp_path / "fake.npz", fake, labels)
    m = sm.evaluate_samples(tmp_path / "fake.npz", ext, ref, batch_size=16)
    assert {"fd", "cs", "cs_std", "cs_adm", "precision", "recall", "class_acc", "diversity"} <= set(m)
    assert "sfid" not in m and "fid" not in m and m["classifier_test_accuracy"] == 0.5
    feats, logits = cnn.features_and_logits(fake)
    assert m["class_acc"] == pytest.approx(float((logits.argmax(1) == labels).double().mean()), abs=1e-12)
    tf, _ = cnn.features_and_logits(test_x)
    d, e = tf.double().numpy(), feats.double().numpy()  # 256-d, fewer samples: singular, so not scipy's sqrtm here
    want = frechet_distance(e.mean(0), np.cov(e, rowvar=False), d.mean(0), np.cov(d, rowvar=False))
    assert m["fd"] == pytest.approx(want, rel=1e-6)
    assert 1.0 <= m["cs"] <= 10.0


# ---------------------------------------------------------------------------------------------------------------
# The command line


def test_cli_ref_stats_then_eval_samples(tmp_path, monkeypatch, capsys):
    from pmf.cli import main

    ext = projection_extractor()
    monkeypatch.setattr(sm, "inception_extractor", lambda weights=None, device="cpu": ext)
    ref_images = random_images(120, seed=10, shift=5)
    np.savez(tmp_path / "real.npz", arr_0=ref_images.permute(0, 2, 3, 1).numpy())
    assert main(["ref-stats", "--images", str(tmp_path / "real.npz"), "--out", str(tmp_path / "ref.npz"),
                 "--batch-size", "32", "--pr-num", "100", "--device", "cpu", "--workers", "0"]) == 0
    r = one_shot(ext, ref_images)
    with np.load(tmp_path / "ref.npz") as f:
        assert {"mu", "sigma", "mu_s", "sigma_s", "features", "num"} <= set(f.keys())
        np.testing.assert_allclose(f["mu"], r["pool"].mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(f["sigma_s"], np.cov(r["spatial"], rowvar=False), rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(f["features"], r["pool"][:100], rtol=1e-6, atol=1e-7)
        assert float(f["num"]) == 120
    # the reference's own first 100 images as samples: FID, sFID ~ 0 up to the 100-vs-120 sampling; P = R = 1
    save_npz(tmp_path / "same.npz", ref_images[:100], torch.zeros(100))
    capsys.readouterr()
    assert main(["eval-samples", "--samples", str(tmp_path / "same.npz"), "--extractor", "inception", "--ref-stats",
                 str(tmp_path / "ref.npz"), "--inception", "w.pth", "--device", "cpu", "--batch-size", "64",
                 "--out", str(tmp_path / "m.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    m = json.loads((tmp_path / "m.json").read_text())
    assert printed == m
    assert {"fid", "sfid", "is", "is_std", "is_adm", "precision", "recall"} <= set(m)
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    direct = sm.evaluate_samples(tmp_path / "same.npz", ext, sm.load_reference(tmp_path / "ref.npz", ext))
    for key in ("fid", "sfid", "is", "is_adm", "precision", "recall"):
        assert m[key] == pytest.approx(direct[key], rel=1e-12), key
    # argument errors exit with 2 and a message
    assert main(["eval-samples", "--samples", str(tmp_path / "same.npz"), "--extractor", "inception"]) == 2
    assert "needs a reference: --ref-stats" in capsys.readouterr().err
    assert main(["eval-samples", "--extractor", "inception"]) == 2
    assert "required: --samples" in capsys.readouterr().err
    assert main(["eval-samples", "--samples", str(tmp_path / "same.npz"), "--checkpoint", str(tmp_path)]) == 2
    assert "unrecognized arguments: --checkpoint" in capsys.readouterr().err
