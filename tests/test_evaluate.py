"""Evaluation: Frechet distance math, streamed moments, the streamed Inception Score, reference statistics files,
class-balanced labels, seed-stable generation, the shared evaluation path and the ``pmf eval`` command, and the
Fashion-MNIST classifier metric (fast smoke tests; the real classifier training is marked slow).

Covariances use ddof = 1 throughout (FeatureStats, np.cov default)."""

import json
import time
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from pmf.eval import fmnist as clf, generate as ev
import pmf.eval.metrics
from pmf.eval.generate import (
    Metric,
    batches,
    class_balanced_labels,
    compute_stats,
    evaluate_generator,
    generate,
)
from pmf.eval.stats import (
    ClassSpread,
    FeatureStats,
    InceptionScoreStats,
    frechet_distance,
    is_split_assignment,
    load_ref_stats,
    save_ref_stats,
)
from pmf.data.datasets import center_crop_adm
from pmf.data.images import to_uint8
from pmf.method.model import PMFDiT, build_model
from pmf.method.sampler import noise_from_seeds


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tiny tensors: one intra-op thread is faster and immune to OpenMP spin-waits on a shared 2-core machine.
    The slow test keeps the default (its timing is the one users see)."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_spd(rng, d, cond=10.0):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.geomspace(1.0, cond, d)) @ q.T


def fd_scipy(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


# ---------------------------------------------------------------------------------------------------------------
# Frechet distance


def test_fd_of_a_set_with_itself_is_zero():
    feats = torch.randn(3000, 32, dtype=torch.float64) @ torch.randn(32, 32, dtype=torch.float64) + 3.0
    mu, sigma = FeatureStats(32).update(feats).mean_cov()
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_fd_closed_form_commuting_covariances():
    # S1 = Q diag(a) Q^T and S2 = Q diag(b) Q^T commute: tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) = sum (a^.5 - b^.5)^2
    rng = np.random.default_rng(0)
    d = 16
    a, b = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("d", [2, 10, 64])
def test_fd_agrees_with_scipy_sqrtm_on_random_spd(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d, cond=100.0)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(fd_scipy(mu1, s1, mu2, s2), rel=1e-9, abs=1e-9)
    assert ours == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)  # symmetric
    assert ours > 0


def test_fd_handles_singular_covariances():
    # rank-deficient covariances (dead ReLU units, n < dim) stay finite and real; a PSD-consistent answer
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, 50))  # 20 samples in 50-d: rank 19
    y = rng.standard_normal((20, 50)) + 0.5
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    fd = frechet_distance(x.mean(0), s1, y.mean(0), s2)
    assert np.isfinite(fd) and fd > 0
    assert abs(frechet_distance(x.mean(0), s1, x.mean(0), s1)) < 1e-8 * np.trace(s1)


# ---------------------------------------------------------------------------------------------------------------
# Streaming statistics


def test_streamed_stats_equal_one_shot_numpy():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1000, 12)) * rng.uniform(0.5, 5, 12) + rng.uniform(-10, 10, 12)
    stats = FeatureStats(12)
    for chunk in np.array_split(x, [7, 300, 301, 650]):  # uneven batches, one of size 1
        stats.update(torch.from_numpy(chunk).float())
    mu, sigma = stats.mean_cov()
    xf = torch.from_numpy(x).float().double().numpy()  # the same float32-rounded features
    np.testing.assert_allclose(mu, xf.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(xf, rowvar=False, ddof=1), rtol=1e-10, atol=1e-10)
    assert stats.count == 1000 and mu.dtype == sigma.dtype == np.float64


def test_merge_state_dict_and_all_reduce_noop():
    x = torch.randn(100, 5)
    whole = FeatureStats(5).update(x)
    a, b = FeatureStats(5).update(x[:40]), FeatureStats(5).update(x[40:])
    torch.testing.assert_close(a.merge(b).buffer, whole.buffer)
    c = FeatureStats(5)
    c.load_state_dict(whole.state_dict())
    before = c.buffer.clone()
    assert not torch.distributed.is_initialized()
    c.all_reduce_()  # one process: nothing happens
    torch.testing.assert_close(c.buffer, before, rtol=0, atol=0)
    with pytest.raises(ValueError):
        FeatureStats(5).update(torch.randn(3, 4))


def test_class_spread_traces_and_diversity():
    """Per-class tr(Sigma_c) streamed in uneven batches equals numpy's trace of np.cov (ddof = 1) per class; a set
    against itself has diversity 1; scaling one class's features about its mean by a scales that class's ratio by
    a^2 (diversity = mean over classes); a class with < 2 samples is left out; merge = one pass; bad labels refused."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 500)
    x = rng.standard_normal((500, 6)) * rng.uniform(0.5, 3, 6) + 5 * y[:, None]
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    s = ClassSpread(5, 6)  # class 4 never appears
    for idx in np.array_split(np.arange(500), [1, 120, 121, 400]):
        s.update(xt[idx], yt[idx])
    tr = s.traces()
    for c in range(4):
        assert tr[c].item() == pytest.approx(np.trace(np.cov(x[y == c], rowvar=False, ddof=1)), rel=1e-12)
    assert torch.isnan(tr[4])
    assert s.diversity(s) == pytest.approx(1.0, rel=1e-12)
    x2 = x.copy()
    mu0 = x[y == 0].mean(0)
    x2[y == 0] = mu0 + 3.0 * (x[y == 0] - mu0)  # class 0 three times as spread out: ratio 9, others 1
    s2 = ClassSpread(5, 6).update(torch.from_numpy(x2), yt)
    assert s2.diversity(s) == pytest.approx((9 + 1 + 1 + 1) / 4, rel=1e-10)
    a, b = ClassSpread(5, 6).update(xt[:200], yt[:200]), ClassSpread(5, 6).update(xt[200:], yt[200:])
    torch.testing.assert_close(a.merge(b).buffer, s.buffer)
    with pytest.raises(ValueError, match="labels must lie"):
        ClassSpread(5, 6).update(xt[:3], torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="labelled batches"):
        compute_stats([xt[:4].to(torch.uint8)], lambda im: im.flatten(1).double(), spread=ClassSpread(5, 6))


def test_class_aligned_stats_equal_explicitly_shifted_features():
    """ClassSpread.class_aligned = the FeatureStats of the features with each class's mean moved onto the reference's
    (f_i + mu_{y_i}^ref - mu_{y_i}), computed here explicitly with numpy: same mean and covariance (ddof 1); a class
    the reference lacks stays where it is; aligning a set to itself changes nothing; the Frechet distance of a set
    whose classes differ from the reference only by mean shifts drops to ~0 once aligned. Stats of other samples are
    refused."""
    rng = np.random.default_rng(5)
    y = rng.integers(0, 4, 400)
    x = rng.standard_normal((400, 5)) @ rng.standard_normal((5, 5)) + 3 * rng.standard_normal((4, 5))[y]
    y_ref = rng.integers(0, 3, 300)  # the reference has no class 3
    x_ref = rng.standard_normal((300, 5)) + 2 * rng.standard_normal((4, 5))[y_ref]
    f, f_ref = torch.from_numpy(x), torch.from_numpy(x_ref)
    spread = ClassSpread(4, 5).update(f, torch.from_numpy(y))
    ref = ClassSpread(4, 5).update(f_ref, torch.from_numpy(y_ref))
    stats = FeatureStats(5).update(f)
    shifted = x.copy()
    for c in range(3):
        shifted[y == c] += x_ref[y_ref == c].mean(0) - x[y == c].mean(0)
    mu, sigma = spread.class_aligned(stats, ref).mean_cov()
    np.testing.assert_allclose(mu, shifted.mean(0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(sigma, np.cov(shifted, rowvar=False, ddof=1), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(spread.class_aligned(stats, spread).buffer, stats.buffer, rtol=1e-12, atol=1e-9)
    # a set = the reference's features with every class moved: far before aligning, at the reference after
    moved = x_ref + 4 * rng.standard_normal((4, 5))[y_ref]
    m_spread = ClassSpread(4, 5).update(torch.from_numpy(moved), torch.from_numpy(y_ref))
    m_stats, r_stats = FeatureStats(5).update(torch.from_numpy(moved)), FeatureStats(5).update(f_ref)
    assert m_stats.frechet_distance(r_stats) > 10
    assert m_spread.class_aligned(m_stats, ref).frechet_distance(r_stats) < 1e-6
    with pytest.raises(ValueError, match="do not hold"):
        spread.class_aligned(FeatureStats(5).update(f[:10]), ref)


def test_all_reduce_in_a_one_process_gloo_group(tmp_path):
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        s = FeatureStats(3).update(torch.randn(10, 3))
        before = s.buffer.clone()
        s.all_reduce_()
        torch.testing.assert_close(s.buffer, before)
        acc = InceptionScoreStats(10, 4).update(torch.randn(10, 4), torch.arange(10))
        before = acc.buffer.clone()
        acc.all_reduce_()
        torch.testing.assert_close(acc.buffer, before)
    finally:
        torch.distributed.destroy_process_group()


def test_compute_stats_counts_class_accuracy():
    labels = torch.arange(20) % 4
    images = torch.zeros(20, 1, 2, 2, dtype=torch.uint8)

    def extractor(imgs, _state={"i": 0}):  # predicts the right class for the first 15 images, class 0 afterwards
        i0 = _state["i"]
        _state["i"] += imgs.shape[0]
        idx = torch.arange(i0, i0 + imgs.shape[0])
        pred = torch.where(idx < 15, idx % 4, torch.zeros_like(idx))
        return torch.randn(imgs.shape[0], 3), torch.nn.functional.one_hot(pred, 4).float()

    stats = compute_stats(batches(images, labels, batch_size=6), extractor)
    wrong = int(((torch.arange(15, 20) % 4) != 0).sum())
    assert stats.count == 20 and stats.class_accuracy() == pytest.approx((20 - wrong) / 20)
    assert compute_stats(batches(images, None, 6), lambda x: torch.randn(x.shape[0], 3)).class_accuracy() is None


# ---------------------------------------------------------------------------------------------------------------
# Inception Score


def is_numpy(logits: np.ndarray, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """The direct computation (as torch-fidelity / the official pipeline): permute with RandomState(seed), softmax,
    split positions [s N // splits, (s + 1) N // splits), exp(mean KL(p_i || mean p)) per split; mean and std."""
    n = logits.shape[0]
    logits = logits[np.random.RandomState(seed).permutation(n)]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for s in range(splits):
        part = p[s * n // splits : (s + 1) * n // splits]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_streamed_over_ranks_equals_numpy():
    rng = np.random.default_rng(3)
    n, k = 103, 7  # 103 / 10 splits: unequal split sizes
    logits = rng.standard_normal((n, k)) * 3 + rng.standard_normal(k)
    expected = is_numpy(logits)
    # two "ranks" (indices i = r, r + 2, ...), uneven batches, then the all-reduce (a sum, here a merge)
    parts = []
    for r in range(2):
        acc = InceptionScoreStats(n, k)
        for chunk in torch.arange(r, n, 2).split(9):
            acc.update(torch.from_numpy(logits[chunk.numpy()]).float(), chunk)
        parts.append(acc)
    merged = parts[0].merge(parts[1])
    assert merged.count == n
    ours = merged.inception_score()
    # float32 logits in the stream vs float64 in numpy
    assert ours[0] == pytest.approx(expected[0], rel=1e-6) and ours[1] == pytest.approx(expected[1], rel=1e-4)
    with pytest.raises(ValueError):
        parts[1].inception_score()  # incomplete: half the samples


def test_inception_score_uniform_is_one_and_confident_is_k():
    n, k = 100, 5
    assert InceptionScoreStats(n, k).update(torch.zeros(n, k), torch.arange(n)).inception_score() == (
        pytest.approx(1.0, abs=1e-12), pytest.approx(0.0, abs=1e-12))
    # one-hot predictions, each class used equally often within every split (2 of each of 5 in a split of 10)
    split = is_split_assignment(n)
    assert np.bincount(split).tolist() == [10] * 10
    cls = np.zeros(n, dtype=np.int64)
    for s in range(10):
        members = np.flatnonzero(split == s)
        cls[members] = np.arange(members.size) % k
    logits = 1e4 * torch.nn.functional.one_hot(torch.from_numpy(cls), k).double()
    mean, std = InceptionScoreStats(n, k).update(logits, torch.arange(n)).inception_score()
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)


def test_compute_stats_feeds_the_inception_score_and_skips_accuracy():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (30, 1, 4, 4), dtype=torch.uint8, generator=g)
    labels = torch.arange(30) % 3
    proj = torch.randn(16, 6, generator=g)

    def extractor(x):
        f = x.float().flatten(1) / 255
        return f, f @ proj

    acc = InceptionScoreStats(30, 6)
    stats = compute_stats(batches(images, labels, 7), extractor, accuracy=False, inception_score=acc)
    assert stats.class_accuracy() is None  # the logits' classes are not the labels
    logits = (images.float().flatten(1) / 255 @ proj).double().numpy()
    assert acc.inception_score()[0] == pytest.approx(is_numpy(logits)[0], rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Reference statistics


def test_ref_stats_npz_round_trip_and_adm_layout(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((50, 6))
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    path = save_ref_stats(tmp_path / "ref.npz", mu, sigma, num=50)
    mu2, sigma2 = load_ref_stats(path)
    assert mu2.dtype == sigma2.dtype == np.float64
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]
    # an ADM reference batch: images, mu, sigma, spatial stats (float32)
    np.savez(tmp_path / "adm.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=mu.astype(np.float32),
             sigma=sigma.astype(np.float32), mu_s=mu, sigma_s=sigma)
    np.testing.assert_allclose(load_ref_stats(tmp_path / "adm.npz")[1], sigma, rtol=1e-6)
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(KeyError):
        load_ref_stats(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        load_ref_stats(tmp_path / "missing.npz")


def test_reference_stats_from_folder_and_npz(tmp_path):
    """A folder (class subfolders or flat) is ADM center-cropped; an npz is used as stored; ranks split the set."""
    g = np.random.default_rng(5)
    arrays = [g.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(20, 30), (24, 12), (16, 16), (40, 19)]]
    for i, a in enumerate(arrays):
        d = tmp_path / "imgs" / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(d / f"{i}.png")
    paths = sorted((tmp_path / "imgs").rglob("*.png"))
    cropped = np.stack([np.asarray(center_crop_adm(Image.open(p).convert("RGB"), 8)) for p in paths])
    np.savez(tmp_path / "imgs.npz", arr_0=cropped)

    def extractor(x):
        return x.double().flatten(1)[:, :5]

    want_mu = cropped.transpose(0, 3, 1, 2).reshape(4, -1)[:, :5].astype(np.float64).mean(0)
    for source in (tmp_path / "imgs", tmp_path / "imgs.npz"):
        stats = ev.reference_stats(source, extractor, resolution=8, batch_size=3)
        assert stats.count == 4
        np.testing.assert_allclose(stats.mean_cov()[0], want_mu, rtol=1e-12)
        ranks = [compute_stats(ev.image_source_batches(source, 8, 1, rank=r, world_size=2), extractor)
                 for r in range(2)]
        torch.testing.assert_close(ranks[0].merge(ranks[1]).buffer, stats.buffer)
    assert ev.reference_stats(tmp_path / "imgs.npz", extractor, num=2).count == 2


# ---------------------------------------------------------------------------------------------------------------
# Labels and generation


def test_class_balanced_labels():
    y = class_balanced_labels(50_000, 1000)
    assert y.dtype == torch.int64 and y.shape == (50_000,)
    assert torch.equal(torch.bincount(y), torch.full((1000,), 50))
    assert class_balanced_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_to_uint8():
    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 1.0, 3.0])
    assert to_uint8(x).tolist() == [0, 0, 0, 128, 255, 255]  # 127.5 rounds half to even -> 128


def randomised(net, seed=0, scale=0.3):
    """Perturb every parameter: the zero-init gates and final layer would otherwise make x_theta = 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net.eval()


def test_generate_noise_is_bitwise_independent_of_batch_size():
    # what generate feeds the sampler for sample i: noise from seed * 10**7 + i, whatever the batching
    seeds = [3 * 10**7 + i for i in range(6)]
    whole = noise_from_seeds(seeds, (1, 8, 8), 2.0)
    parts = torch.cat([noise_from_seeds(seeds[:1], (1, 8, 8), 2.0), noise_from_seeds(seeds[1:], (1, 8, 8), 2.0)])
    assert torch.equal(whole, parts)


def test_generate_is_independent_of_batch_size_and_ranks():
    net = randomised(build_model("pMF-tiny", v_head=False))
    kw = dict(net=net, n=11, num_classes=3, shape=(1, 8, 8), noise_scale=1.0, num_steps=2, omega=1.5,
              t_min=0.0, t_max=1.0, seed=3)

    def run(**extra):
        out = list(generate(**kw, **extra))
        return torch.cat([x for x, _ in out]), torch.cat([y for _, y in out])

    x_ref, y_ref = run(batch_size=11)
    assert x_ref.dtype == torch.uint8 and x_ref.shape == (11, 1, 8, 8)
    assert y_ref.tolist() == [i % 3 for i in range(11)]
    assert x_ref.float().std() > 5  # non-trivial images

    def same(a, b):
        # The noise is bitwise the same (per-sample generators); the network's float output may differ in the last
        # bits between batch sizes (BLAS kernels and memory alignment vary), which can flip a pixel's uint8 rounding.
        d = (a.int() - b.int()).abs()
        return d.max() <= 1 and (d > 0).float().mean() < 0.01

    for bs in (1, 4):
        x, y = run(batch_size=bs)
        assert same(x, x_ref) and torch.equal(y, y_ref)
    # two ranks: rank r gets indices r, r + 2, ...; together they are the 1-process set
    x0, y0 = run(batch_size=3, rank=0, world_size=2)
    x1, y1 = run(batch_size=3, rank=1, world_size=2)
    assert same(x0, x_ref[0::2]) and same(x1, x_ref[1::2])
    assert torch.equal(y0, y_ref[0::2]) and torch.equal(y1, y_ref[1::2])
    kw["seed"] = 4
    assert not torch.equal(run(batch_size=11)[0], x_ref)


def projection_metric(seed=0, num_logits=4, fd_key="fid", reference=None):
    """A random-weight extractor on flattened uint8 images: 6 features and ``num_logits`` logits."""
    g = torch.Generator().manual_seed(seed)
    wf, wl = torch.randn(64, 6, generator=g), torch.randn(64, num_logits, generator=g)

    def extractor(x):
        v = x.float().flatten(1) / 127.5 - 1
        return v @ wf, v @ wl

    rng = np.random.default_rng(seed)
    reference = reference or (rng.standard_normal(6), random_spd(rng, 6))
    return Metric(extractor, reference, fd_key, accuracy=False, is_classes=num_logits)


def test_evaluate_generator_equals_one_shot_numpy():
    net = randomised(build_model("pMF-tiny", v_head=False))
    metric = projection_metric()
    kw = dict(omega=1.5, t_min=0.0, t_max=1.0, batch_size=5, seed=2)
    res = evaluate_generator(net, metric, 23, steps=(1, 2), **kw)
    assert sorted(res) == ["fid_1step", "fid_2step", "is_1step", "is_2step", "is_std_1step", "is_std_2step"]
    for k in (1, 2):
        x = torch.cat([b for b, _ in generate(net, 23, 3, (1, 8, 8), 1.0, k, **kw)])  # the same images, kept whole
        f, logits = (t.double().numpy() for t in metric.extractor(x))
        fid = frechet_distance(f.mean(0), np.cov(f, rowvar=False), *metric.reference)
        assert res[f"fid_{k}step"] == pytest.approx(fid, rel=1e-6)
        mean, std = is_numpy(logits)
        assert res[f"is_{k}step"] == pytest.approx(mean, rel=1e-6) and res[f"is_std_{k}step"] == pytest.approx(
            std, rel=1e-4, abs=1e-9)
    assert res["fid_1step"] != res["fid_2step"]


def _two_rank_eval(rank, port, out_dir):
    import os

    from pmf.parallel import dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init("cpu")
    try:
        torch.manual_seed(0)  # the same init on both ranks
        net = randomised(build_model("pMF-tiny", v_head=False))
        res = evaluate_generator(net, projection_metric(), 21, (1,), omega=1.5, batch_size=1, seed=2)
        (out_dir / f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.shutdown()


def test_evaluate_generator_two_processes_match_one(tmp_path):
    """2 gloo ranks each generate half of the samples (i = rank, rank + 2, ...); the all-reduced statistics give the
    1-process numbers on every rank (batch size 1, so every image is computed alone and is bitwise the same)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_two_rank_eval, args=(port, tmp_path), nprocs=2, join=True, start_method="spawn")
    torch.manual_seed(0)
    one = evaluate_generator(randomised(build_model("pMF-tiny", v_head=False)), projection_metric(), 21, (1,),
                             omega=1.5, batch_size=1, seed=2)
    for r in range(2):
        two = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert two.keys() == one.keys()
        for key in one:
            assert two[key] == pytest.approx(one[key], rel=1e-9), key


def tiny_run_dir(tmp_path, ema="ema_hl500"):
    """A run directory as training leaves it: config.json (sample.ema) and export/{ema}/ (a network folder)."""
    from pmf.method.model import MODELS

    kwargs = {**MODELS["pMF-tiny"].kwargs, "v_head": False}
    net = randomised(PMFDiT(**kwargs))
    run = tmp_path / "run"
    net.save_pretrained(run / "export" / ema, meta={"noise_scale": 1.0, "omega": 1.0, "t_min": 0.0, "t_max": 1.0})
    (run / "config.json").write_text(json.dumps({"sample": {"ema": ema}}))
    return run, net


def test_cli_eval_inception_path_writes_metrics(tmp_path, monkeypatch):
    from pmf.cli import build_parser, main

    run, net = tiny_run_dir(tmp_path)
    metric = projection_metric(seed=1)
    seen = {}

    def fake_setup(kind, inception, ref_stats, device, batch_size):
        seen.update(kind=kind, inception=inception, ref_stats=ref_stats)
        return metric

    monkeypatch.setattr(pmf.eval.metrics, "setup_metric", fake_setup)
    argv = ["eval", "--checkpoint", str(run), "--extractor", "inception", "--inception", "w.pth", "--ref-stats",
            "r.npz", "--num", "20", "--steps", "1", "2", "--omega", "1.0", "--batch-size", "7", "--device", "cpu"]
    assert main(argv) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert seen == {"kind": "inception", "inception": "w.pth", "ref_stats": "r.npz"}
    assert m["n"] == 20 and m["steps"] == [1, 2] and m["ema"] == "ema_hl500" and m["extractor"] == "inception"
    want = evaluate_generator(net, metric, 20, (1, 2), omega=1.0, batch_size=7)
    for key, value in want.items():
        assert m[key] == pytest.approx(value, rel=1e-9), key
    assert m["sampler"] == "average"
    # --instantaneous: Euler steps on v = u(z, t, t), passed through to the generator (2 steps differ from average)
    assert main(argv + ["--instantaneous"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    want_v = evaluate_generator(net, metric, 20, (1, 2), omega=1.0, batch_size=7, instantaneous=True)
    assert m["sampler"] == "instantaneous"
    for key, value in want_v.items():
        assert m[key] == pytest.approx(value, rel=1e-9), key
    key = f"{metric.fd_key}_2step"
    assert want_v[key] != pytest.approx(want[key], rel=1e-6)
    # the defaults: Fashion-MNIST extractor; steps, count and batch from the run's eval section (else 1 2 4, the
    # extractor's count, 256)
    args = build_parser().parse_args(["eval", "--checkpoint", str(run)])
    assert args.extractor == "fmnist" and args.steps is None and args.num is None and args.batch_size is None
    assert build_parser().parse_args(["eval", "--checkpoint", "x", "--steps", "1", "2"]).steps == [1, 2]
    (run / "config.json").write_text(json.dumps({"sample": {"ema": "ema_hl500"},
                                                 "eval": {"num_samples": 12, "steps": [2], "batch_size": 5}}))
    short = [a for a in argv if a not in ("--num", "20", "--steps", "1", "2", "--batch-size", "7")]
    assert main(short) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["n"] == 12 and m["steps"] == [2]
    want = evaluate_generator(net, metric, 12, (2,), omega=1.0, batch_size=5)
    assert m[f"{metric.fd_key}_2step"] == pytest.approx(want[f"{metric.fd_key}_2step"], rel=1e-9)


def test_cli_sample_precision_and_compile_flags(tmp_path):
    """`pmf sample --precision bf16` and `--compile` write the same samples as the plain float32 call: bf16 close on
    average (it keeps ~3 significant digits), the compiled float32 path within one uint8 level (rounding at a level
    boundary); labels identical."""
    from pmf.cli import main

    run, _ = tiny_run_dir(tmp_path)
    base = ["sample", "--checkpoint", str(run), "--num", "12", "--steps", "1", "--omega", "1.0", "--device", "cpu"]
    outs = {}
    for name, extra in (("fp32", []), ("bf16", ["--precision", "bf16"]), ("compiled", ["--compile"])):
        path = tmp_path / f"{name}.npz"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an eager fallback, should compiling fail here
            assert main(base + extra + ["--out", str(path)]) == 0
        outs[name] = np.load(path)
    ref = outs["fp32"]["arr_0"].astype(int)
    assert ref.std() > 10  # the randomised tiny net draws images, not a constant
    for name in outs:
        assert (outs[name]["arr_1"] == outs["fp32"]["arr_1"]).all()
    # bf16 on a randomised net: on average under one uint8 level (measured 0.8), a few pixels near saturating
    # activations further off (measured max 18); it must differ at all, or the flag did nothing.
    d16 = np.abs(outs["bf16"]["arr_0"].astype(int) - ref)
    assert 0 < d16.mean() <= 2 and d16.max() <= 32
    assert np.abs(outs["compiled"]["arr_0"].astype(int) - ref).max() <= 1


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST classifier (synthetic data in the fast tests)


def synthetic(n, seed=0):
    """Class-dependent blobs so that a couple of steps of training see a signal; uint8 (n, 1, 28, 28), labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    base = torch.rand(10, 1, 28, 28, generator=g) * 255
    x = (base[y] + 40 * torch.randn(n, 1, 28, 28, generator=g)).clamp(0, 255).to(torch.uint8)
    return x, y


def test_classifier_shapes_and_cache_round_trip(tmp_path):
    data = (*synthetic(512), *synthetic(128, seed=1))
    model, info = clf.get_fmnist_classifier(tmp_path, data=data, epochs=1, max_steps=3, batch_size=64)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"{clf.CACHE_NAME}.json", f"{clf.CACHE_NAME}.pt"]  # no temp files left behind
    assert 0.0 <= info["test_accuracy"] <= 1.0 and info["steps"] == 3
    assert json.loads((tmp_path / f"{clf.CACHE_NAME}.json").read_text())["test_accuracy"] == info["test_accuracy"]
    feats, logits = model.features_and_logits(data[2][:5])
    assert feats.shape == (5, 256) and logits.shape == (5, 10) and (feats >= 0).all()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    loaded, info2 = clf.get_fmnist_classifier(tmp_path, train_if_missing=False)
    assert info2 == info
    f2, l2 = loaded.features_and_logits(data[2][:5])
    torch.testing.assert_close(f2, feats, rtol=0, atol=0)
    torch.testing.assert_close(l2, logits, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError):
        clf.get_fmnist_classifier(tmp_path / "empty", train_if_missing=False)
    with pytest.raises(TypeError):
        model.features_and_logits(data[2][:5].float())


def test_blur_and_noise_transforms():
    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4) * 10
    b = clf.blur2x(x)
    assert b.dtype == torch.uint8 and b.shape == x.shape
    assert b[0, 0, :2, :2].unique().tolist() == [round((0 + 10 + 40 + 50) / 4)]  # 2x2 mean, nearest upsample
    n = clf.add_noise(torch.full((1, 1, 28, 28), 128, dtype=torch.uint8), 0.1)
    assert abs((n.float() / 127.5 - 1).std().item() - 0.1) < 0.02 and torch.equal(n, clf.add_noise(
        torch.full((1, 1, 28, 28), 128, dtype=torch.uint8), 0.1))


def test_fmnist_metrics_smoke(monkeypatch):
    # random-weight CNN, random-weight 28x28 pMF, synthetic "Fashion-MNIST": checks keys, plumbing and caching
    fake = {"train": synthetic(64), "test": synthetic(64, seed=1)}
    monkeypatch.setattr(clf, "_load_fmnist", lambda split: fake[split])
    torch.manual_seed(0)
    cnn = clf.FashionCNN().eval()
    net = randomised(PMFDiT(input_size=28, patch_size=7, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                            num_classes=10, aux_head_depth=1, bottleneck_dim=8, v_head=False), scale=0.05)
    m = clf.fmnist_metrics(net, n=30, steps=(1, 2), omega=1.0, batch_size=16, classifier=(cnn, {"test_accuracy": 0.1}))
    for k in ("fd_1step", "fd_2step", "class_acc_1step", "class_acc_2step", "diversity_1step", "diversity_2step",
              "fd_within_1step", "fd_within_2step", "fd_floor", "fd_blur2x", "fd_noise0.1"):
        assert np.isfinite(m[k]), k
    assert m["classifier_test_accuracy"] == 0.1 and m["n"] == 30
    assert m["fd_1step"] > m["fd_floor"] >= 0
    # the same numbers from the shared streaming path, with the extractor injected
    spread = ClassSpread(10, cnn.feature_dim)
    ref = compute_stats(batches(*fake["test"], 16), cnn.features_and_logits, spread=spread)
    direct = evaluate_generator(net, Metric(cnn.features_and_logits, ref.mean_cov(), "fd", accuracy=True,
                                            class_spread=spread), 30, (1, 2), omega=1.0, batch_size=16)
    assert set(direct) == {"fd_1step", "fd_2step", "class_acc_1step", "class_acc_2step", "diversity_1step",
                           "diversity_2step", "fd_within_1step", "fd_within_2step"}
    for key, value in direct.items():
        assert m[key] == pytest.approx(value, rel=1e-9), key


# ---------------------------------------------------------------------------------------------------------------
# The real classifier (about a minute on 2 CPU cores)


@pytest.mark.slow
def test_real_classifier_accuracy_and_reference_points(tmp_path):
    try:
        clf._load_fmnist("test")
    except Exception as e:  # no local copy and no network
        pytest.skip(f"Fashion-MNIST unavailable: {e}")
    t0 = time.perf_counter()
    model, info = clf.get_fmnist_classifier(tmp_path)
    print(f"\nclassifier: test accuracy {info['test_accuracy']:.4f}, training {info['train_seconds']:.1f} s "
          f"(total with evaluation {time.perf_counter() - t0:.1f} s)")
    assert info["test_accuracy"] >= 0.90
    t0 = time.perf_counter()
    ref = clf.reference_points(model.features_and_logits, n=10_000)
    print(f"reference points (n=10k vs test 10k): {ref}  ({time.perf_counter() - t0:.1f} s)")
    assert 0 <= ref["floor"] < ref["noise0.1"] and ref["floor"] < ref["blur2x"]
    assert ref["floor"] < 0.05 * ref["blur2x"]
