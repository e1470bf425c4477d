"""Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019), as the ADM evaluator computes them.

Each set of features is taken to cover the union of balls around its points, the ball around point j reaching its
k-th nearest neighbour in the same set (k = 3):

    r_j = || f_j - NN_k(f_j) ||,   covered(q; F) = 1  iff  there is a j with || q - f_j || <= r_j.

    precision = mean over generated g of covered(g; real)   (how much of what is generated looks real)
    recall    = mean over real x of covered(x; generated)    (how much of the real set is reproduced)

Conventions of guided-diffusion's ``evaluations/evaluator.py`` (``ManifoldEstimator``, ``DistanceBlock``), kept here:
squared Euclidean distances ||a||^2 - 2 a.b + ||b||^2 clamped at 0 (comparing squares is the same test); the radius
is the (k+1)-th smallest distance of a point to its own set *including itself* (distance 0), i.e. its k-th nearest
other point; ``<=``; distances in blocks of 10,000 x 10,000 so memory stays bounded for 50k samples; one pass over
the (real block, generated block) pairs decides both coverages. Here distances are float32 (``dtype``); ADM first
tries float16 and falls back to float32 when a block overflows, which moves P and R by about 1e-3 (documented in
docs/evaluation.md). The answer does not depend on the block size (tested against one all-at-once computation).
"""

from __future__ import annotations

import torch

NEIGHBOURHOOD_K = 3  # k of the k-NN radius (Kynkaanniemi et al. 2019; ADM evaluator, torch-fidelity)
BLOCK = 10_000  # rows / columns of one distance block (ADM's row_batch_size / col_batch_size)


def pairwise_sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(m, F), (n, F) -> (m, n) squared Euclidean distances ||a_i||^2 - 2 a_i.b_j + ||b_j||^2, clamped at 0 (the
    expansion can round a tiny distance below 0)."""
    d = (a * a).sum(1, keepdim=True) - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
    return d.clamp_(min=0.0)


def _prepare(features, dtype, device) -> torch.Tensor:
    f = torch.as_tensor(features)
    if f.ndim != 2 or f.shape[0] == 0:
        raise ValueError(f"expected features (N, F) with N > 0, got {tuple(f.shape)}")
    return f.to(device=device if device is not None else f.device, dtype=dtype)


def knn_radii(features, k: int = NEIGHBOURHOOD_K, block: int = BLOCK, dtype=torch.float32,
              device=None) -> torch.Tensor:
    """(N,) squared distance of each point to its k-th nearest neighbour in the same set (the (k+1)-th smallest
    distance counting itself). Rows are processed ``block`` at a time, and within a row block the columns ``block``
    at a time, keeping a running k+1 smallest; memory O(block^2)."""
    f = _prepare(features, dtype, device)
    n = f.shape[0]
    if n <= k:
        raise ValueError(f"a k = {k} neighbourhood needs more than {k} points, have {n}")
    radii = torch.empty(n, dtype=dtype, device=f.device)
    for i in range(0, n, block):
        rows = f[i : i + block]
        smallest = None  # (rows, <= k+1) the smallest distances seen so far, ascending
        for j in range(0, n, block):
            d = pairwise_sq_distances(rows, f[j : j + block])
            cand = d if smallest is None else torch.cat([smallest, d], 1)
            smallest = cand.topk(min(k + 1, cand.shape[1]), dim=1, largest=False, sorted=True).values
        radii[i : i + block] = smallest[:, k]
    return radii


def precision_recall(real, fake, k: int = NEIGHBOURHOOD_K, block: int = BLOCK, dtype=torch.float32,
                     device=None) -> tuple[float, float]:
    """(precision, recall) of generated features ``fake`` (M, F) against real features ``real`` (N, F), with
    k-NN radii (see the module docstring). ``device``: where to compute (default: the features' own)."""
    x = _prepare(real, dtype, device)
    g = _prepare(fake, dtype, x.device)
    if x.shape[1] != g.shape[1]:
        raise ValueError(f"feature dims differ: real {x.shape[1]}, generated {g.shape[1]}")
    r_real, r_fake = knn_radii(x, k, block, dtype), knn_radii(g, k, block, dtype)
    real_covered = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    fake_covered = torch.zeros(g.shape[0], dtype=torch.bool, device=x.device)
    for i in range(0, x.shape[0], block):
        for j in range(0, g.shape[0], block):
            d = pairwise_sq_distances(x[i : i + block], g[j : j + block])  # (real block, generated block)
            real_covered[i : i + block] |= (d <= r_fake[None, j : j + block]).any(1)
            fake_covered[j : j + block] |= (d <= r_real[i : i + block, None]).any(0)
    return float(fake_covered.double().mean()), float(real_covered.double().mean())
