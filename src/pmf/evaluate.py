"""Streaming evaluation: generate -> uint8 -> features -> Frechet distance (and class accuracy).

Everything streams: :func:`generate` yields batches, :func:`compute_stats` folds them into a :class:`FeatureStats`
(count, sum, sum of outer products, in float64), so neither images nor features are ever kept whole and no PNG
folder is needed. The feature extractor is injected: any callable ``uint8 (B, C, H, W) -> feats (B, F)`` or
``-> (feats (B, F), logits (B, K))``; with logits, the accuracy against the *intended* labels is counted too.
For ImageNet that callable wraps an Inception network loaded from a user-given path; for Fashion-MNIST it is the
small CNN in :mod:`pmf.classifier`.

Protocol (recipe section 5): class-balanced labels ``y_i = i mod num_classes`` (50 per class for 50k ImageNet),
per-sample seeds ``seed * 10**7 + i`` so an image depends on neither batch size nor rank, Frechet distance in
float64. Multi-process: give each rank ``rank, world_size`` in :func:`generate`, then call
``stats.all_reduce_()`` before :meth:`FeatureStats.mean_cov`; in one process that call does nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from pmf.data import to_uint8  # round(127.5 (x + 1)) clamped to [0, 255]; re-exported here
from pmf.sampler import noise_from_seeds, sample

SEED_STRIDE = 10**7  # per-sample seed = seed * SEED_STRIDE + index: runs with different `seed` never share noise

Extractor = Callable[[torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]


# ----------------------------------------------------------------------------------------------------------------
# Streaming first and second moments


class FeatureStats:
    """Running count n, sum S1 = sum_i f_i and outer-product sum S2 = sum_i f_i f_i^T of features, in float64.

    mu = S1 / n;  Sigma = (S2 - n mu mu^T) / (n - 1)  (unbiased, ddof = 1, as ``np.cov`` and pytorch-fid).
    Optionally also counts ``argmax(logits) == label`` for a class accuracy. All state lives in one float64 buffer
    (:attr:`buffer`), so a caller can ``torch.distributed.all_reduce`` it in one call (:meth:`all_reduce_`), and
    :meth:`merge` is plain addition. The one-pass formula cancels digits when |mu| >> std (relative error
    ~1e-16 (|mu| / std)^2 in float64), negligible for network features; float32 would not be.
    """

    def __init__(self, dim: int, device="cpu"):
        self.dim = dim
        # layout: [count, correct, labelled, sum (F), outer (F*F)]; counts are exact in float64 up to 2**53
        self.buffer = torch.zeros(3 + dim + dim * dim, dtype=torch.float64, device=device)

    # views into the buffer
    @property
    def count(self) -> float:
        return float(self.buffer[0])

    @property
    def sum(self) -> torch.Tensor:  # (F,)
        return self.buffer[3 : 3 + self.dim]

    @property
    def outer(self) -> torch.Tensor:  # (F, F)
        return self.buffer[3 + self.dim :].view(self.dim, self.dim)

    def update(self, feats: torch.Tensor, logits: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        """Add a batch of features (B, F); with logits (B, K) and labels (B,), also count correct argmaxes."""
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (B, {self.dim}), got {tuple(feats.shape)}")
        f = feats.detach().to(self.buffer.device, torch.float64)
        self.buffer[0] += f.shape[0]
        self.sum.add_(f.sum(0))
        self.outer.add_(f.T @ f)
        if logits is not None and labels is not None:
            pred = logits.detach().argmax(1).to(self.buffer.device)
            self.buffer[1] += (pred == labels.to(self.buffer.device)).sum()
            self.buffer[2] += labels.numel()
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """In place: self += other (stats of the union of the two sets)."""
        if other.dim != self.dim:
            raise ValueError(f"feature dims differ: {self.dim} vs {other.dim}")
        self.buffer.add_(other.buffer.to(self.buffer.device))
        return self

    def all_reduce_(self, group=None) -> "FeatureStats":
        """Sum the state over all processes (SUM all-reduce of one buffer); a no-op without torch.distributed."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.buffer, op=dist.ReduceOp.SUM, group=group)
        return self

    def state_dict(self) -> dict:
        return {"dim": self.dim, "buffer": self.buffer.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        if int(state["dim"]) != self.dim:
            raise ValueError(f"feature dims differ: {self.dim} vs {state['dim']}")
        self.buffer.copy_(state["buffer"])

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (F,), Sigma (F, F)) as float64 numpy arrays; Sigma with ddof = 1."""
        n = self.count
        if n < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {n:g}")
        mu = self.sum / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        sigma = 0.5 * (sigma + sigma.T)  # exact symmetry; the subtraction can leave ~1e-16 asymmetry
        return mu.cpu().numpy(), sigma.cpu().numpy()

    def class_accuracy(self) -> float | None:
        """Fraction of labelled samples whose argmax logit equals the intended label; None if none were labelled."""
        labelled = float(self.buffer[2])
        return float(self.buffer[1]) / labelled if labelled else None

    def frechet_distance(self, other: "FeatureStats") -> float:
        return frechet_distance(*self.mean_cov(), *other.mean_cov())


# ----------------------------------------------------------------------------------------------------------------
# Frechet distance


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root via eigh; eigenvalues below 0 (round-off) are clipped to 0."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, Sigma1) and N(mu2, Sigma2), in float64:

        d^2 = |mu1 - mu2|^2 + tr(Sigma1) + tr(Sigma2) - 2 tr((Sigma1 Sigma2)^{1/2}).

    Matrix square root method: with A = Sigma1^{1/2} Sigma2^{1/2} (both symmetric PSD square roots from ``eigh``,
    round-off negative eigenvalues clipped to 0), A A^T = Sigma1^{1/2} Sigma2 Sigma1^{1/2}, which is similar to
    Sigma1 Sigma2; so tr((Sigma1 Sigma2)^{1/2}) = sum_i sqrt(eig_i(Sigma1^{1/2} Sigma2 Sigma1^{1/2})) = sum of the
    singular values of A (its nuclear norm). Taking singular values of A instead of square roots of the
    eigenvalues of A A^T keeps the error in null directions at ~eps instead of ~sqrt(eps), which matters for
    rank-deficient covariances (dead ReLU units, n < dim). Unlike ``scipy.linalg.sqrtm`` of the non-symmetric
    Sigma1 Sigma2 this needs no complex arithmetic and no ``eps * I`` retry; it agrees with sqrtm within 1e-9
    relative where sqrtm is well-behaved (tested).
    Returns the squared distance (the number reported as FID).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape}, {mu2.shape}; sigma {s1.shape}, {s2.shape}")
    s1, s2 = 0.5 * (s1 + s1.T), 0.5 * (s2 + s2.T)
    tr_covmean = np.linalg.svd(_psd_sqrt(s1) @ _psd_sqrt(s2), compute_uv=False).sum()  # tr((Sigma1 Sigma2)^1/2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


# ----------------------------------------------------------------------------------------------------------------
# Generation


def class_balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """y_i = i mod num_classes, (n,) int64: exactly n / num_classes per class when it divides (official protocol)."""
    return torch.arange(n, dtype=torch.int64) % num_classes


@torch.no_grad()
def generate(
    net,
    n: int,
    num_classes: int,
    shape: tuple[int, ...],
    noise_scale: float = 1.0,
    num_steps: int = 1,
    omega=1.0,
    t_min=0.0,
    t_max=1.0,
    batch_size: int = 256,
    seed: int = 0,
    device="cpu",
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (uint8 images (b, *shape), labels (b,)) for sample indices i = rank, rank + world_size, ... < n.

    Sample i has label ``i mod num_classes`` and noise ``noise_scale * N(0, I)`` drawn from its own generator seeded
    with ``seed * 10**7 + i``, so every image is a function of (net, seed, i) alone: the same for any batch size
    and any number of ranks (the union over ranks is the 1-process set), up to the last-bit float differences of
    batched kernels (rarely one uint8 level on a pixel). ``net`` is used as it is (call ``.eval()``
    and move it to ``device`` first); images are sampled with :func:`pmf.sampler.sample` and quantised with
    :func:`pmf.data.to_uint8` (round(127.5 (x + 1)), clamped). Images are yielded on ``device``, labels on CPU.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    if seed < 0 or n > SEED_STRIDE:
        raise ValueError(f"need seed >= 0 and n <= {SEED_STRIDE} so per-sample seeds stay distinct")
    labels_all = class_balanced_labels(n, num_classes)
    indices = torch.arange(rank, n, world_size)
    for chunk in indices.split(batch_size):
        seeds = (seed * SEED_STRIDE + chunk).tolist()
        noise = noise_from_seeds(seeds, tuple(shape), noise_scale, device=device)
        y = labels_all[chunk]
        x = sample(net, noise, y.to(device), num_steps=num_steps, omega=omega, t_min=t_min, t_max=t_max)
        yield to_uint8(x), y


def batches(images: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 500):
    """Iterate a stored uint8 tensor (N, C, H, W) (and labels) in batches, in the form :func:`compute_stats` takes."""
    for i in range(0, images.shape[0], batch_size):
        yield images[i : i + batch_size], (None if labels is None else labels[i : i + batch_size])


@torch.no_grad()
def compute_stats(image_iter: Iterable, extractor: Extractor, stats: FeatureStats | None = None) -> FeatureStats:
    """Fold a stream of uint8 image batches into feature statistics.

    ``image_iter`` yields either ``images`` or ``(images, labels)`` (as :func:`generate` and :func:`batches` do).
    ``extractor(images)`` returns feats (B, F) or (feats, logits); with logits and labels the stats also count the
    class accuracy (:meth:`FeatureStats.class_accuracy`). Pass ``stats`` to keep adding to existing statistics.
    """
    for item in image_iter:
        images, labels = item if isinstance(item, (tuple, list)) else (item, None)
        out = extractor(images)
        feats, logits = out if isinstance(out, (tuple, list)) else (out, None)
        if stats is None:
            stats = FeatureStats(feats.shape[1], device=feats.device)  # on the features' device: NCCL-ready
        stats.update(feats, logits, labels)
    if stats is None:
        raise ValueError("compute_stats got an empty image stream")
    return stats
