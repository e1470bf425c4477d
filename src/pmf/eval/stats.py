"""Pure statistics of feature streams: first and second moments, per-class spread, Inception Score splits, the
Frechet distance, and reference-statistics files. No generation and no networks here (see :mod:`pmf.eval.generate`).

Everything streams: a :class:`FeatureStats` keeps count, sum and sum of outer products in float64, so features are
never kept whole; ``all_reduce_()`` sums the buffers over ranks (a no-op in one process).

Inception Score: 10 splits of a fixed permutation (``np.random.RandomState(2020)``, as the official JAX pipeline and
torch-fidelity). Rather than keeping every sample's softmax, :class:`InceptionScoreStats` maps each sample's global
index to its split and keeps, per split, the count, sum_i p_i and sum_i sum_k p_ik log p_ik, which determine that
split's score exactly; so IS streams and all-reduces like the Frechet statistics.

Reference statistics: ``.npz`` files with ``mu`` and ``sigma`` (the ADM / JiT / pMF format).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

IS_SPLITS = 10  # Inception Score splits (official JAX pipeline, torch-fidelity)
IS_SEED = 2020  # seed of the fixed permutation that assigns samples to splits (ditto)
ADM_IS_SPLIT_SIZE = 5000  # the ADM evaluator's Inception Score: consecutive splits of 5000 samples, in file order

# ----------------------------------------------------------------------------------------------------------------
# Streaming first and second moments


class _SummedBuffer:
    """Streaming state held as one float64 buffer of sums: merging two sets adds buffers, and so does the all-reduce
    across processes (one SUM of one buffer)."""

    buffer: torch.Tensor

    def merge(self, other):
        """In place: self += other (the state of the union of the two sets)."""
        if other.buffer.shape != self.buffer.shape:
            raise ValueError(f"cannot merge states of shapes {tuple(self.buffer.shape)} and {tuple(other.buffer.shape)}")
        self.buffer.add_(other.buffer.to(self.buffer.device))
        return self

    def all_reduce_(self, group=None):
        """Sum the state over all processes; a no-op without torch.distributed."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.buffer, op=dist.ReduceOp.SUM, group=group)
        return self


class FeatureStats(_SummedBuffer):
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


class ClassSpread(_SummedBuffer):
    """Per-class spread of features: for each class c the count n_c, the sum S1_c = sum f_i and the sum of squared
    norms Q_c = sum ||f_i||^2, in float64, so tr(Sigma_c) = (Q_c - ||S1_c||^2 / n_c) / (n_c - 1) (ddof = 1).

    :meth:`diversity` compares two sets class by class: mean over classes of tr(Sigma_c) / tr(Sigma_c^ref), the
    within-class feature variance of generated samples as a fraction of the real one (1: as diverse as the data;
    a blurry or mode-collapsed class scores well below 1). A Frechet distance mixes this with mean shifts and
    between-class structure; this number isolates "diversity within a class". Streams and all-reduces like
    :class:`FeatureStats` (one buffer of sums).
    """

    def __init__(self, num_classes: int, dim: int, device="cpu"):
        self.num_classes, self.dim = num_classes, dim
        self.buffer = torch.zeros(num_classes * (dim + 2), dtype=torch.float64, device=device)  # rows [n | S1 | Q]

    @property
    def _rows(self) -> torch.Tensor:  # (K, F + 2)
        return self.buffer.view(self.num_classes, self.dim + 2)

    def update(self, feats: torch.Tensor, labels: torch.Tensor):
        """Add features (B, F) of samples with labels (B,) in [0, num_classes)."""
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (B, {self.dim}), got {tuple(feats.shape)}")
        f = feats.detach().to(self.buffer.device, torch.float64)
        y = labels.to(self.buffer.device, torch.long)
        if y.numel() and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}); got [{int(y.min())}, {int(y.max())}]")
        rows = torch.cat([torch.ones_like(f[:, :1]), f, (f * f).sum(1, keepdim=True)], dim=1)
        self._rows.index_add_(0, y, rows)
        return self

    def traces(self) -> torch.Tensor:
        """(K,) tr(Sigma_c), NaN for a class with fewer than 2 samples."""
        n, s1, q = self._rows[:, 0], self._rows[:, 1:-1], self._rows[:, -1]
        tr = (q - (s1 * s1).sum(1) / n.clamp(min=1)) / (n - 1)
        return torch.where(n >= 2, tr, torch.full_like(tr, float("nan")))

    def diversity(self, reference: "ClassSpread") -> float:
        """Mean over the classes present in both sets of tr(Sigma_c) / tr(Sigma_c^reference)."""
        ratio = self.traces() / reference.traces().to(self.buffer.device)
        ok = torch.isfinite(ratio)
        if not bool(ok.any()):
            raise ValueError("no class has at least 2 samples in both sets")
        return float(ratio[ok].mean())

    def class_means(self) -> torch.Tensor:
        """(K, F) per-class feature means (NaN rows for classes without samples)."""
        n, s1 = self._rows[:, :1], self._rows[:, 1:-1]
        return torch.where(n > 0, s1 / n.clamp(min=1), torch.full_like(s1, float("nan")))

    def class_aligned(self, stats: FeatureStats, reference: "ClassSpread") -> FeatureStats:
        """The :class:`FeatureStats` of the same features with each class's mean moved onto the reference's class
        mean, f_i + d_c (d_c = mu_c^ref - mu_c), in closed form from the sums: S1 + sum_c n_c d_c and
        S2 + sum_c (S1_c d_c^T + d_c S1_c^T + n_c d_c d_c^T). ``stats`` must hold exactly the features folded into
        this spread (same samples). The Frechet distance of the result to the reference set is the error left when
        every class is drawn around the right mean: its within-class shape and spread; the rest of the full distance
        comes from where the class means lie."""
        dev = stats.buffer.device
        n, s1 = self._rows[:, 0].to(dev), self._rows[:, 1:-1].to(dev)
        if stats.dim != self.dim or abs(stats.count - float(n.sum())) > 0.5:
            raise ValueError(f"stats (n={stats.count:g}, dim {stats.dim}) do not hold this spread's samples "
                             f"(n={float(n.sum()):g}, dim {self.dim})")
        d = reference.class_means().to(dev) - self.class_means().to(dev)
        d = torch.where(torch.isfinite(d), d, torch.zeros_like(d))  # a class missing in either set: left as is
        out = FeatureStats(self.dim, device=dev)
        out.buffer.copy_(stats.buffer)
        out.sum.add_((n[:, None] * d).sum(0))
        cross = s1.T @ d  # sum_c S1_c d_c^T
        out.outer.add_(cross + cross.T + (n[:, None] * d).T @ d)
        return out


# ----------------------------------------------------------------------------------------------------------------
# Streaming Inception Score


def is_split_assignment(n: int, splits: int = IS_SPLITS, seed: int = IS_SEED) -> np.ndarray:
    """(n,) int64: the split of each sample index, laid out as torch-fidelity does (the official JAX pipeline also
    uses 10 splits of a seed-2020 permutation): the samples are permuted by ``np.random.RandomState(seed)
    .permutation(n)`` and position q of the permuted array falls in split s when ``s n // splits <= q < (s + 1) n //
    splits``; sample ``perm[q]`` therefore belongs to that split."""
    if n < splits:
        raise ValueError(f"need at least {splits} samples for {splits} Inception Score splits, have {n}")
    perm = np.random.RandomState(seed).permutation(n)
    bounds = np.array([s * n // splits for s in range(splits + 1)])
    split_of_position = np.searchsorted(bounds, np.arange(n), side="right") - 1
    out = np.empty(n, dtype=np.int64)
    out[perm] = split_of_position
    return out


def adm_is_split_assignment(n: int, split_size: int = ADM_IS_SPLIT_SIZE) -> np.ndarray:
    """(n,) int64: the split of each sample index as the ADM evaluator forms them (guided-diffusion
    ``evaluations/evaluator.py``: ``compute_inception_score``): consecutive runs of ``split_size`` samples in file
    order, the last one shorter when ``split_size`` does not divide n (10 splits for 50k samples). ADM reports the
    mean over splits only."""
    if n < 1:
        raise ValueError("need at least one sample for an Inception Score")
    return np.arange(n, dtype=np.int64) // split_size


class InceptionScoreStats(_SummedBuffer):
    """Streaming Inception Score over ``n`` samples with global indices 0..n-1, in float64.

    IS_s = exp( mean_{i in s} KL(p_i || pbar_s) ),  pbar_s = mean_{i in s} p_i,  p_i = softmax(logits_i);
    and since KL(p_i || pbar) = sum_k p_ik log p_ik - sum_k p_ik log pbar_k, averaging over the split gives
        log IS_s = (1/n_s) sum_i sum_k p_ik log p_ik  -  sum_k pbar_sk log pbar_sk,
    so per split s the state is [n_s, sum_i sum_k p_ik log p_ik, sum_i p_i (K)]: one float64 buffer (splits, K + 2)
    that adds across batches and ranks (:meth:`all_reduce_`). The reported score is the mean over splits, with the
    standard deviation (ddof = 0, as ``np.std``) over splits.

    ``split_of``: another assignment of sample indices to splits, e.g. :func:`adm_is_split_assignment` (then
    ``splits`` and ``seed`` are not used).
    """

    def __init__(self, n: int, num_classes: int, splits: int = IS_SPLITS, seed: int = IS_SEED, device="cpu",
                 split_of: np.ndarray | None = None):
        if split_of is None:
            split_of = is_split_assignment(n, splits, seed)
        split_of = np.asarray(split_of, dtype=np.int64)
        if split_of.shape != (n,) or split_of.min() < 0:
            raise ValueError(f"split_of must give a split index >= 0 for each of the {n} samples")
        splits = int(split_of.max()) + 1
        self.n, self.num_classes, self.splits = n, num_classes, splits
        self.split_of = torch.from_numpy(split_of)  # (n,) on CPU
        self.buffer = torch.zeros(splits, 2 + num_classes, dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor, indices: torch.Tensor) -> "InceptionScoreStats":
        """Add a batch: logits (B, K) of the samples with global indices (B,) in [0, n)."""
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"expected logits of shape (B, {self.num_classes}), got {tuple(logits.shape)}")
        indices = torch.as_tensor(indices, dtype=torch.int64).cpu()
        if indices.shape != logits.shape[:1] or ((indices < 0) | (indices >= self.n)).any():
            raise ValueError(f"need one index in [0, {self.n}) per logit row")
        log_p = torch.log_softmax(logits.detach().to(self.buffer.device, torch.float64), dim=1)  # (B, K)
        p = log_p.exp()
        rows = torch.cat([torch.ones_like(p[:, :1]), (p * log_p).sum(1, keepdim=True), p], 1)  # (B, K + 2)
        self.buffer.index_add_(0, self.split_of[indices].to(self.buffer.device), rows)
        return self

    @property
    def count(self) -> float:
        return float(self.buffer[:, 0].sum())

    def split_scores(self) -> np.ndarray:
        """(splits,) IS of each split; all n samples must have been added."""
        if self.count != self.n:
            raise ValueError(f"Inception Score needs all {self.n} samples, have {self.count:g}")
        b = self.buffer.cpu().numpy()
        n_s, sum_plogp, pbar = b[:, 0], b[:, 1], b[:, 2:] / b[:, :1]
        neg_entropy = np.sum(np.where(pbar > 0, pbar * np.log(np.where(pbar > 0, pbar, 1.0)), 0.0), axis=1)
        return np.exp(sum_plogp / n_s - neg_entropy)

    def inception_score(self) -> tuple[float, float]:
        """(mean, std) over splits."""
        scores = self.split_scores()
        return float(np.mean(scores)), float(np.std(scores))


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
# Reference statistics (.npz with mu, sigma: the ADM / JiT / pMF format)


def save_ref_stats(path, mu: np.ndarray, sigma: np.ndarray, **extra) -> Path:
    """Write ``mu`` (F,) and ``sigma`` (F, F) in float64 (plus any ``extra`` arrays, e.g. ``num``) to an .npz,
    atomically."""
    path = Path(path)
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        raise ValueError(f"expected mu (F,) and sigma (F, F), got {mu.shape} and {sigma.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")  # np.savez appends .npz to names without it
    np.savez(tmp, mu=mu, sigma=sigma, **{k: np.asarray(v) for k, v in extra.items()})
    os.replace(tmp, path)
    return path


def load_ref_stats(path) -> tuple[np.ndarray, np.ndarray]:
    """(mu (F,), sigma (F, F)) as float64 from an .npz holding ``mu`` and ``sigma`` (ADM reference batches, JiT's
    ``jit_in256_stats.npz``, pMF's ``imagenet_256_fid_stats.npz``, or :func:`save_ref_stats`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} not found (compute them with `pmf ref-stats`)")
    with np.load(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise KeyError(f"{path} holds {sorted(f.keys())}, not the reference statistics 'mu' and 'sigma'")
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
    return mu, sigma


def as_mean_cov(reference) -> tuple[np.ndarray, np.ndarray]:
    """A reference given as :class:`FeatureStats`, a (mu, sigma) pair or an .npz path -> (mu, sigma)."""
    if isinstance(reference, FeatureStats):
        return reference.mean_cov()
    if isinstance(reference, (str, os.PathLike)):
        return load_ref_stats(reference)
    mu, sigma = reference
    return np.asarray(mu, np.float64), np.asarray(sigma, np.float64)


