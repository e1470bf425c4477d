"""Improved precision and recall (pmf.eval.manifold): known answers on synthetic features, a brute-force
all-at-once computation with scipy's cdist as the independent truth, and block-size independence (the streaming
computation equals the all-at-once one)."""

import numpy as np
import pytest
import scipy.spatial.distance
import torch

from pmf.eval.manifold import knn_radii, pairwise_sq_distances, precision_recall

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def brute_force(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkaanniemi et al. 2019 written out with full distance matrices (float64, plain Euclidean)."""
    r_real = np.sort(scipy.spatial.distance.cdist(real, real), axis=1)[:, k]  # column 0 is the point itself
    r_fake = np.sort(scipy.spatial.distance.cdist(fake, fake), axis=1)[:, k]
    d = scipy.spatial.distance.cdist(real, fake)  # (N, M)
    precision = np.mean((d <= r_real[:, None]).any(0))
    recall = np.mean((d <= r_fake[None, :]).any(1))
    return float(precision), float(recall)


def blobs(rng, n, dim, centre):
    return (rng.standard_normal((n, dim)) + centre).astype(np.float32)


def test_pairwise_sq_distances_match_cdist():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((7, 5)), rng.standard_normal((4, 5))
    ours = pairwise_sq_distances(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(ours, scipy.spatial.distance.cdist(a, b, "sqeuclidean"), rtol=1e-12, atol=1e-12)
    assert (pairwise_sq_distances(torch.from_numpy(a), torch.from_numpy(a)) >= 0).all()  # clamped, never < 0


def test_knn_radii_are_the_kth_neighbour_distance():
    # points on a line at 0, 1, 3, 6, 10: for k = 1 the radii are the gaps to the nearest other point
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]], dtype=torch.float64)
    torch.testing.assert_close(knn_radii(x, k=1, dtype=torch.float64), torch.tensor([1.0, 1.0, 4.0, 9.0, 16.0],
                                                                                    dtype=torch.float64))
    # k = 3: the third nearest other point (squared distances)
    torch.testing.assert_close(knn_radii(x, k=3, dtype=torch.float64),
                               torch.tensor([36.0, 25.0, 9.0, 25.0, 81.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="more than 3"):
        knn_radii(x[:3], k=3)


def test_identical_sets_have_precision_and_recall_one():
    x = blobs(np.random.default_rng(1), 200, 16, 0.0)
    assert precision_recall(x, x.copy()) == (1.0, 1.0)


def test_disjoint_clusters_have_precision_and_recall_zero():
    rng = np.random.default_rng(2)
    real, fake = blobs(rng, 150, 16, 0.0), blobs(rng, 120, 16, 100.0)  # 100 apart, radii ~ a few units
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_a_subset_has_precision_one_and_recall_below_one():
    # real = two far clusters A and B; generated = the points of A (mode dropping): every generated point is a real
    # point (precision 1), only A's real points are covered (recall = |A| / (|A| + |B|))
    rng = np.random.default_rng(3)
    a, b = blobs(rng, 90, 8, 0.0), blobs(rng, 60, 8, 50.0)
    real = np.concatenate([a, b])
    p, r = precision_recall(real, a[rng.permutation(90)])
    assert p == 1.0
    assert r == pytest.approx(90 / 150, abs=1e-12) and r < 1


@pytest.mark.parametrize("block", [7, 64, 10_000])
def test_blocked_computation_equals_all_at_once(block):
    """Overlapping Gaussians (P and R strictly between 0 and 1): every block size gives the brute-force answer."""
    rng = np.random.default_rng(4)
    real = blobs(rng, 300, 12, 0.0)
    fake = (rng.standard_normal((250, 12)) * 1.3 + 0.4).astype(np.float32)
    want = brute_force(real.astype(np.float64), fake.astype(np.float64))
    assert 0.05 < want[0] < 0.95 and 0.05 < want[1] < 0.95
    got = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), block=block)
    # float32 distances vs float64: a point exactly on a ball's surface could flip; none does here
    assert got == pytest.approx(want, abs=0.5 / 300)
    got64 = precision_recall(real, fake, block=block, dtype=torch.float64)
    assert got64 == want
    radii = knn_radii(real, block=block, dtype=torch.float64).sqrt().numpy()
    np.testing.assert_allclose(radii, np.sort(scipy.spatial.distance.cdist(real, real), axis=1)[:, 3], rtol=1e-10)


def test_k_and_argument_checks():
    rng = np.random.default_rng(5)
    real, fake = blobs(rng, 100, 4, 0.0), blobs(rng, 100, 4, 0.5)
    for k in (1, 5):
        assert precision_recall(real, fake, k=k, dtype=torch.float64) == brute_force(real, fake, k)
    # larger neighbourhoods only grow the balls: both numbers can only go up with k
    p1, r1 = precision_recall(real, fake, k=1)
    p5, r5 = precision_recall(real, fake, k=5)
    assert p5 >= p1 and r5 >= r1
    with pytest.raises(ValueError, match="dims differ"):
        precision_recall(real, fake[:, :3])
    with pytest.raises(ValueError, match="expected features"):
        precision_recall(real, np.zeros((0, 4), np.float32))
