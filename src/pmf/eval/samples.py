"""Evaluate a sample archive (ours or any other model's) the way the ADM evaluator does: FID, sFID, Inception Score,
improved precision and recall in one pass over the file, against a reference.

Sample archive: an .npz with uint8 images ``arr_0`` (N, H, W, C) and optional labels ``arr_1`` (the layout of
guided-diffusion's sampler, the ADM evaluator and ``pmf sample --num N --out FILE.npz``), or pmf's older ``images`` /
``labels``; read in batches (:func:`pmf.data.images.iter_npz_samples`).

Reference (:func:`load_reference`), an .npz holding any of:

- ``mu``, ``sigma`` (pool statistics; FID): ADM's reference batches, JiT's ``jit_in256_stats.npz``, pMF's stats,
  ``pmf ref-stats``;
- ``mu_s``, ``sigma_s`` (spatial statistics; sFID): ADM's reference batches, ``pmf ref-stats``;
- ``arr_0`` uint8 reference images (ADM's ``VIRTUAL_imagenet256_labeled.npz`` holds 10,000): their pool features
  give precision / recall, and the statistics when the file has none (as ADM's ``read_statistics``);
- ``features`` (M, 2048) pool features of reference images (``pmf ref-stats`` keeps the first 10,000), for
  precision / recall without the images.

What the ADM evaluator (guided-diffusion ``evaluations/evaluator.py``: ``Evaluator``, ``ManifoldEstimator``) reports
and how it is computed here:

- FID: Frechet distance of the pool_3 statistics (float64, :func:`pmf.eval.stats.frechet_distance`);
- sFID: the same on the 2023 spatial features (:meth:`pmf.eval.inception.InceptionV3FID.trunk`);
- IS: softmax of the unbiased logits; ``is`` / ``is_std`` over torch-fidelity's 10 seeded-permutation splits (what
  JiT and the pMF torch branch report), ``is_adm`` over ADM's consecutive 5000-sample splits (mean only);
- precision / recall: k = 3 manifolds of the reference's pool features and the samples' (:mod:`pmf.eval.manifold`).

Everything but precision / recall streams (sums in float64); precision / recall keep the pool features (N x 2048
float32: 400 MB for 50k). One process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from pmf.data.images import iter_npz_samples, npz_sample_keys, npz_sample_shape
from pmf.eval.manifold import NEIGHBOURHOOD_K, precision_recall
from pmf.eval.stats import (
    ClassSpread,
    FeatureStats,
    InceptionScoreStats,
    IS_SPLITS,
    adm_is_split_assignment,
    frechet_distance,
    is_split_assignment,
)

PR_REFERENCE_N = 10_000  # reference features kept for precision / recall (the size of ADM's reference batches)


@dataclasses.dataclass
class Extractor:
    """A feature network as the sample evaluation uses it."""

    extract: Callable[[torch.Tensor], dict]  # uint8 (B, C, H, W) -> {"pool": (B, F), "logits"?: (B, K), "spatial"?}
    fd_key: str = "fid"  # key of the pool Frechet distance: "fid" (Inception), "fd" (Fashion-MNIST CNN)
    is_key: str | None = "is"  # key of the Inception Score of "logits"; None: do not report one
    accuracy: bool = False  # the logits' classes are the samples' labels: report the class accuracy
    info: dict = dataclasses.field(default_factory=dict)  # reported alongside the metrics
    feature_dim: int | None = None  # F of "pool", when known before any image is seen (reference files are checked
    #   against it before any feature is computed: pmf.io.userfiles.check_reference_file)


@dataclasses.dataclass
class Reference:
    """What samples are compared with; every part but the pool statistics is optional."""

    mu: np.ndarray  # (F,) pool feature mean (FID)
    sigma: np.ndarray  # (F, F) pool feature covariance, ddof = 1
    mu_s: np.ndarray | None = None  # (S,) spatial feature mean (sFID)
    sigma_s: np.ndarray | None = None  # (S, S) spatial covariance
    features: torch.Tensor | None = None  # (M, F) pool features of reference images (precision / recall)
    class_spread: ClassSpread | None = None  # per-class spread of labelled reference features (diversity)
    source: str = ""  # where it came from, for the report
    num: float | None = None  # number of images behind the statistics, when known


@dataclasses.dataclass
class FeatureSummary:
    """One pass over a set of images: streamed statistics plus the first ``keep`` pool features."""

    pool: FeatureStats
    spatial: FeatureStats | None
    kept: torch.Tensor | None  # (min(n, keep), F) float32 pool features in index order
    inception_scores: dict  # name -> InceptionScoreStats
    spread: ClassSpread | None

    def reference(self, source: str = "") -> Reference:
        mu, sigma = self.pool.mean_cov()
        mu_s, sigma_s = self.spatial.mean_cov() if self.spatial is not None else (None, None)
        return Reference(mu, sigma, mu_s, sigma_s, self.kept, self.spread, source, self.pool.count)


@torch.no_grad()
def summarize(stream: Iterable, extract: Callable, n: int, keep: int | None = None, is_splits: dict | None = None,
              accuracy: bool = False, num_classes: int | None = None, device="cpu") -> FeatureSummary:
    """Fold a stream of ``(uint8 images, labels or None, global indices)`` over ``n`` images (an upper bound is
    enough without Inception Scores) into a
    :class:`FeatureSummary`: pool (and spatial, if extracted) statistics, the pool features of indices < ``keep``
    (default all n), an :class:`InceptionScoreStats` per entry of ``is_splits`` (name -> split assignment, when the
    extractor gives logits), class-accuracy counts (``accuracy``) and a per-class spread (``num_classes``) from the
    labels. Indices may come in any order and from any rank's share (:meth:`FeatureStats.all_reduce_` and a SUM of
    ``kept`` combine ranks)."""
    keep = n if keep is None else min(int(keep), n)
    pool = spatial = kept = spread = None
    scores = {}
    for images, labels, indices in stream:
        out = extract(images)
        f = out["pool"]
        if pool is None:
            pool = FeatureStats(f.shape[1], device=device)
            if out.get("spatial") is not None:
                spatial = FeatureStats(out["spatial"].shape[1], device=device)
            kept = torch.zeros(keep, f.shape[1], dtype=torch.float32, device=device) if keep else None
            if out.get("logits") is not None:
                scores = {name: InceptionScoreStats(n, out["logits"].shape[1], device=device, split_of=split_of)
                          for name, split_of in (is_splits or {}).items()}
            if num_classes is not None:
                spread = ClassSpread(num_classes, f.shape[1], device=device)
        indices = torch.as_tensor(indices, dtype=torch.int64)
        logits = out.get("logits")
        pool.update(f, logits if accuracy and labels is not None else None, labels)
        if spatial is not None:
            spatial.update(out["spatial"])
        for s in scores.values():
            s.update(logits, indices)
        if spread is not None and labels is not None:
            spread.update(f, labels)
        if kept is not None:
            sel = indices < keep
            kept[indices[sel].to(device)] = f[sel.to(f.device)].to(device, torch.float32)
    if pool is None:
        raise ValueError("no images to evaluate")
    return FeatureSummary(pool, spatial, kept, scores, spread)


def is_split_layouts(n: int) -> dict:
    """The two Inception Score conventions: ``is`` (torch-fidelity, JiT, pMF torch: 10 splits of a seed-2020
    permutation; needs n >= 10) and ``is_adm`` (ADM: consecutive 5000-sample splits)."""
    out = {"is_adm": adm_is_split_assignment(n)}
    if n >= IS_SPLITS:
        out["is"] = is_split_assignment(n)
    return out


def npz_stream(path, batch_size: int, num: int | None = None):
    """(images, labels, global indices) batches of a sample archive."""
    start = 0
    for images, labels in iter_npz_samples(path, batch_size, num):
        yield images, labels, torch.arange(start, start + images.shape[0])
        start += images.shape[0]


def load_reference(path, extractor: Extractor | None = None, batch_size: int = 250, device="cpu",
                   keep: int | None = None) -> Reference:
    """A :class:`Reference` from an .npz (see the module docstring for the keys). Stored statistics win over ones
    computed from stored images (as ADM's ``read_statistics``); images (``arr_0``) are run through ``extractor`` for
    the precision / recall features (all of them unless ``keep``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference {path} not found: give reference statistics (`pmf ref-stats`, JiT's or "
                                f"ADM's .npz) or an .npz of reference images (arr_0)")
    with np.load(path) as f:
        keys = set(f.keys())
        arrays = {k: f[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "features") if k in keys}
    has_images = "arr_0" in keys
    if "mu" not in arrays and not has_images:
        raise KeyError(f"{path} holds {sorted(keys)}: neither reference statistics (mu, sigma) nor reference "
                       f"images (arr_0)")
    ref = None
    if has_images:
        if extractor is None:
            raise ValueError(f"{path} holds reference images: an extractor is needed to compute their features")
        n = npz_sample_shape(path)[0] if keep is None else min(keep, npz_sample_shape(path)[0])
        summary = summarize(npz_stream(path, batch_size, n), extractor.extract, n, device=device)
        ref = summary.reference(str(path))
    if "mu" in arrays:
        mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
        if mu.ndim != 1 or sigma.shape != mu.shape * 2:
            raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
        mu_s = arrays["mu_s"].astype(np.float64) if "mu_s" in arrays else None
        sigma_s = arrays["sigma_s"].astype(np.float64) if "sigma_s" in arrays else None
        feats = torch.from_numpy(arrays["features"].astype(np.float32)) if "features" in arrays else None
        if ref is None:
            ref = Reference(mu, sigma, mu_s, sigma_s, feats, None, str(path))
        else:  # ADM reference batch: the file's statistics, the images' features
            ref.mu, ref.sigma = mu, sigma
            if mu_s is not None:
                ref.mu_s, ref.sigma_s = mu_s, sigma_s
    return ref


def evaluate_samples(path, extractor: Extractor, reference: Reference, batch_size: int = 250,
                     num: int | None = None, k: int = NEIGHBOURHOOD_K, precision_recall_: bool = True,
                     device="cpu") -> dict:
    """All metrics of the sample archive ``path`` (first ``num`` samples) against ``reference`` that the extractor
    and the reference support: ``{fd_key}`` (pool Frechet distance), ``sfid`` (both have spatial features),
    ``{is_key}`` / ``{is_key}_std`` (torch-fidelity splits) and ``{is_key}_adm`` (ADM splits) from the logits,
    ``precision`` / ``recall`` (the reference has features; k-NN with ``k``), ``class_acc`` and ``diversity`` (the
    archive has labels and the extractor's logits are its classes). Also ``n``, ``labels`` (whether the file has
    them) and the extractor's ``info``."""
    n_file = npz_sample_shape(path)[0]
    n = n_file if num is None else min(int(num), n_file)
    if n < 2:
        raise ValueError(f"{path}: need at least 2 samples, have {n}")
    has_labels = npz_sample_keys(path)[1] is not None
    want_pr = precision_recall_ and reference.features is not None
    spread_classes = reference.class_spread.num_classes if (reference.class_spread is not None and has_labels) else None
    layouts = is_split_layouts(n) if extractor.is_key else {}
    summary = summarize(npz_stream(path, batch_size, n), extractor.extract, n, keep=n if want_pr else 0,
                        is_splits=layouts, accuracy=extractor.accuracy and has_labels, num_classes=spread_classes,
                        device=device)
    out = {"n": n, "labels": has_labels}
    mu, sigma = summary.pool.mean_cov()
    out[extractor.fd_key] = frechet_distance(mu, sigma, reference.mu, reference.sigma)
    if summary.spatial is not None and reference.mu_s is not None:
        out["sfid"] = frechet_distance(*summary.spatial.mean_cov(), reference.mu_s, reference.sigma_s)
    if "is" in summary.inception_scores:
        out[extractor.is_key], out[f"{extractor.is_key}_std"] = summary.inception_scores["is"].inception_score()
    if "is_adm" in summary.inception_scores:
        out[f"{extractor.is_key}_adm"] = summary.inception_scores["is_adm"].inception_score()[0]
    if want_pr:
        p, r = precision_recall(reference.features, summary.kept, k=k, device=device)
        out.update(precision=p, recall=r, k=k, pr_reference_n=int(reference.features.shape[0]))
    if extractor.accuracy and has_labels:
        out["class_acc"] = summary.pool.class_accuracy()
    if summary.spread is not None:
        out["diversity"] = summary.spread.diversity(reference.class_spread)
    out.update(extractor.info)
    out["reference"] = reference.source
    return out


def reference_from_source(source, extractor: Extractor, resolution: int | None = 256, batch_size: int = 250,
                          num: int | None = None, num_workers: int = 0, keep: int = PR_REFERENCE_N,
                          device="cpu") -> Reference:
    """The :class:`Reference` of real images (a folder, ADM center-cropped to ``resolution``, or an .npz of uint8
    images; :func:`pmf.eval.generate.image_source_batches`): pool and spatial statistics and the pool features of
    the first ``keep`` images (precision / recall). Split over the ranks of a process group and combined (the same
    on every rank)."""
    from pmf.eval.generate import image_source_batches
    from pmf.parallel import dist

    rank, world = dist.rank(), dist.world_size()
    stream = image_source_batches(source, resolution, batch_size, num, rank, world, num_workers)
    summary = summarize(stream, extractor.extract, keep, keep=keep, device=device)
    summary.pool.all_reduce_()
    if summary.spatial is not None:
        summary.spatial.all_reduce_()
    if summary.kept is not None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(summary.kept)  # each row was written by exactly one rank
        summary.kept = summary.kept[: min(keep, int(summary.pool.count))]
    return summary.reference(str(source))


def save_reference(path, reference: Reference, **extra) -> Path:
    """Write ``mu``, ``sigma`` and, when present, ``mu_s``, ``sigma_s`` (the ADM reference-batch keys) and
    ``features`` to an .npz (:func:`pmf.eval.stats.save_ref_stats`)."""
    from pmf.eval.stats import save_ref_stats

    more = {}
    if reference.mu_s is not None:
        more.update(mu_s=reference.mu_s, sigma_s=reference.sigma_s)
    if reference.features is not None:
        more["features"] = reference.features.cpu().numpy().astype(np.float32)
    if reference.num is not None:
        more["num"] = reference.num
    return save_ref_stats(path, reference.mu, reference.sigma, **more, **extra)


# ----------------------------------------------------------------------------------------------------------------
# The two extractors


def inception_extractor(weights=None, device="cpu") -> Extractor:
    """The FID InceptionV3 (:func:`pmf.eval.inception.load_inception`, local weights file): pool, unbiased logits,
    spatial features."""
    from pmf.eval.inception import load_inception

    model = load_inception(weights, device=device)
    from pmf.eval.inception import FEATURE_DIM

    return Extractor(model.extract, "fid", "is", accuracy=False, info={"extractor": "inception"},
                     feature_dim=FEATURE_DIM)


def fmnist_extractor_and_reference(device="cpu", batch_size: int = 500, cache_dir=None, classifier=None,
                                   keep: int | None = None) -> tuple[Extractor, Reference]:
    """The Fashion-MNIST CNN (:mod:`pmf.eval.fmnist`; trained and cached on first use) and its reference, the full
    test set: pool = the 256-d penultimate features (Frechet distance ``fd``, precision / recall), logits = the 10
    classes (class accuracy; their Inception-Score formula is reported as ``cs``, the classifier score, at most 10).
    No spatial features, so no sFID."""
    from pmf.eval.fmnist import _load_fmnist, get_fmnist_classifier

    model, info = get_fmnist_classifier(cache_dir) if classifier is None else classifier
    model = model.to(device).eval()

    def extract(images):
        feats, logits = model.features_and_logits(images)
        return {"pool": feats, "logits": logits}

    test_x, test_y = _load_fmnist("test")
    n = test_x.shape[0]
    stream = ((test_x[i : i + batch_size], test_y[i : i + batch_size], torch.arange(i, min(i + batch_size, n)))
              for i in range(0, n, batch_size))
    summary = summarize(stream, extract, n, keep=keep, num_classes=model.num_classes, device=device)
    reference = summary.reference(f"Fashion-MNIST test set ({n} images)")
    extractor = Extractor(extract, "fd", "cs", accuracy=True,
                          info={"extractor": "fmnist", "classifier_test_accuracy": info.get("test_accuracy")})
    return extractor, reference
