"""Streaming evaluation: generate -> uint8 -> features -> Frechet distance (and class accuracy).

Everything streams: :func:`generate` yields batches, :func:`compute_stats` folds them into a :class:`FeatureStats`
(count, sum, sum of outer products, in float64), so neither images nor features are ever kept whole and no PNG
folder is needed. The feature extractor is injected: any callable ``uint8 (B, C, H, W) -> feats (B, F)`` or
``-> (feats (B, F), logits (B, K))``; with logits, the accuracy against the *intended* labels is counted too.
For ImageNet that callable wraps an Inception network loaded from a user-given path; for Fashion-MNIST it is the
small CNN in :mod:`pmf.eval.fmnist`.

Protocol (pMF Sec. 6; official `pmf.py`): class-balanced labels ``y_i = i mod num_classes`` (50 per class for 50k
ImageNet), per-sample seeds ``seed * 10**7 + i`` so an image depends on neither batch size nor rank, Frechet distance in
float64. Multi-process: give each rank ``rank, world_size`` in :func:`generate`, then call
``stats.all_reduce_()`` before :meth:`FeatureStats.mean_cov`; in one process that call does nothing.
:func:`evaluate_generator` does all of this for a list of step counts, and is the one code path behind both the
Fashion-MNIST metric (:func:`pmf.eval.fmnist.fmnist_metrics`) and the ImageNet FID / IS (:func:`setup_metric`).

Statistics, Frechet distance, Inception Score and reference files: :mod:`pmf.eval.stats`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from pmf.data.datasets import IMG_EXTENSIONS, read_image_adm
from pmf.data.filelist import scan_image_folder
from pmf.data.images import to_uint8  # round(127.5 (x + 1)) clamped to [0, 255]; re-exported here
from pmf.data.images import iter_npz_samples, load_npz_samples, npz_sample_shape
from pmf.data.shards import ShardDataset, is_shard_dir
from pmf.eval.stats import FeatureStats, ClassSpread, InceptionScoreStats, frechet_distance, as_mean_cov
from pmf.method.sampler import noise_batches, sample

SEED_STRIDE = 10**7  # per-sample seed = seed * SEED_STRIDE + index: runs with different `seed` never share noise

Extractor = Callable[[torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]


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
    return_indices: bool = False,
    instantaneous: bool = False,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield (uint8 images (b, *shape), labels (b,)) for sample indices i = rank, rank + world_size, ... < n; with
    ``return_indices`` also the global indices (b,) (what :class:`InceptionScoreStats` needs).

    Sample i has label ``i mod num_classes`` and noise ``noise_scale * N(0, I)`` drawn from its own generator seeded
    with ``seed * 10**7 + i``, so every image is a function of (net, seed, i) alone: the same for any batch size
    and any number of ranks (the union over ranks is the 1-process set), up to the last-bit float differences of
    batched kernels (rarely one uint8 level on a pixel). ``net`` is used as it is (call ``.eval()``
    and move it to ``device`` first); images are sampled with :func:`pmf.method.sampler.sample` and quantised with
    :func:`pmf.data.images.to_uint8` (round(127.5 (x + 1)), clamped); ``instantaneous`` is passed on to it (Euler steps
    with v = u(z, t, t)). Images are yielded on ``device``, labels on CPU.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    if seed < 0 or n > SEED_STRIDE:
        raise ValueError(f"need seed >= 0 and n <= {SEED_STRIDE} so per-sample seeds stay distinct")
    labels_all = class_balanced_labels(n, num_classes)
    indices = torch.arange(rank, n, world_size)
    chunks = indices.split(batch_size)
    # noise keyed by each sample's seed, drawn on the device batch by batch (pmf.method.sampler.noise_batches)
    noises = noise_batches(((seed * SEED_STRIDE + c).tolist() for c in chunks), tuple(shape), noise_scale, device)
    for chunk, noise in zip(chunks, noises):
        y = labels_all[chunk]
        x = sample(net, noise, y.to(device), num_steps=num_steps, omega=omega, t_min=t_min, t_max=t_max,
                   instantaneous=instantaneous)
        yield (to_uint8(x), y, chunk) if return_indices else (to_uint8(x), y)


def batches(images: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 500):
    """Iterate a stored uint8 tensor (N, C, H, W) (and labels) in batches, in the form :func:`compute_stats` takes."""
    for i in range(0, images.shape[0], batch_size):
        yield images[i : i + batch_size], (None if labels is None else labels[i : i + batch_size])


@torch.no_grad()
def compute_stats(
    image_iter: Iterable,
    extractor: Extractor,
    stats: FeatureStats | None = None,
    *,
    accuracy: bool = True,
    inception_score: InceptionScoreStats | None = None,
    spread: ClassSpread | None = None,
) -> FeatureStats:
    """Fold a stream of uint8 image batches into feature statistics.

    ``image_iter`` yields ``images``, ``(images, labels)`` or ``(images, labels, global indices)`` (as
    :func:`generate` and :func:`batches` do). ``extractor(images)`` returns feats (B, F) or (feats, logits). With
    logits and labels and ``accuracy``, the stats also count the class accuracy (:meth:`FeatureStats.class_accuracy`;
    turn it off where the logits' classes are not the labels', e.g. Inception's 1008 outputs). With logits and an
    ``inception_score`` accumulator, the logits are added to it under the items' global indices (without indices:
    their position in this stream, which is only right in one process). Pass ``stats`` to add to existing statistics,
    and a :class:`ClassSpread` as ``spread`` to fold the labelled features into it as well.
    """
    position = 0
    for item in image_iter:
        if isinstance(item, (tuple, list)):
            images, labels, indices = (*item, None)[:3]
        else:
            images, labels, indices = item, None, None
        out = extractor(images)
        feats, logits = out if isinstance(out, (tuple, list)) else (out, None)
        if stats is None:
            stats = FeatureStats(feats.shape[1], device=feats.device)  # on the features' device: NCCL-ready
        stats.update(feats, logits if accuracy else None, labels)
        if spread is not None:
            if labels is None:
                raise ValueError("a ClassSpread needs labelled batches")
            spread.update(feats, labels)
        if inception_score is not None:
            if logits is None:
                raise ValueError("the Inception Score needs an extractor that returns (feats, logits)")
            if indices is None:
                indices = torch.arange(position, position + feats.shape[0])
            inception_score.update(logits, indices)
        position += feats.shape[0]
    if stats is None:
        raise ValueError("compute_stats got an empty image stream")
    return stats


def npz_images(path) -> torch.Tensor:
    """uint8 (N, C, H, W) from an .npz sample archive in either layout: ``arr_0`` (ADM, pmf) or ``images`` (older
    pmf files), stored as (N, H, W, C) with C = 1 or 3 (or (N, H, W) grey); see :mod:`pmf.data.images`."""
    return load_npz_samples(path)[0]


class _ImageFiles(torch.utils.data.Dataset):
    """Every image file under ``root`` (a flat folder or class folders) in the order of the one file index that
    training also reads (:func:`pmf.data.filelist.scan_image_folder`), each ADM center-cropped to ``resolution``
    (:func:`pmf.data.datasets.read_image_adm`): uint8 (3, R, R) RGB and its index."""

    def __init__(self, root, resolution: int):
        self.resolution = int(resolution)
        index = scan_image_folder(root)
        self.paths = [os.path.join(index.root, f) for f in index.files]
        if not self.paths:
            raise FileNotFoundError(f"no images with extensions {IMG_EXTENSIONS} under {root}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return torch.from_numpy(read_image_adm(self.paths[i], self.resolution)).permute(2, 0, 1), i


def image_source_batches(source, resolution: int | None = 256, batch_size: int = 250, num: int | None = None,
                         rank: int = 0, world_size: int = 1, num_workers: int = 0):
    """Yield (uint8 images (b, C, H, W), None, global indices (b,)) for this rank's share (i = rank, rank + world,
    ...) of the first ``num`` images of ``source``: an .npz of uint8 images (used as stored), a ``pmf prepare-data``
    output directory (its shards, at their prepared resolution), or a folder of image files (ADM center crop to
    ``resolution``, as the training data, in the order of the training file index)."""
    source = Path(source)
    if source.is_file():  # read in blocks of batch_size * world_size; each rank keeps its indices of the block
        total = npz_sample_shape(source)[0] if num is None else min(num, npz_sample_shape(source)[0])
        start = 0
        for images, _ in iter_npz_samples(source, batch_size * world_size, total):
            idx = torch.arange(start, start + images.shape[0])
            mine = idx % world_size == rank
            if bool(mine.any()):
                yield images[mine], None, idx[mine]
            start += images.shape[0]
        return
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is neither an image folder nor an .npz file")
    if is_shard_dir(source):  # `pmf prepare-data` output: already cropped, read memory-mapped
        shards = ShardDataset(source, resolution)
        total = len(shards) if num is None else min(num, len(shards))
        for chunk in torch.arange(rank, total, world_size).split(batch_size):
            yield shards.get_batch(chunk.numpy())[0].contiguous(), None, chunk
        return
    if resolution is None:
        raise ValueError("an image folder needs a resolution for the ADM center crop")
    files = _ImageFiles(source, resolution)
    total = len(files) if num is None else min(num, len(files))
    shard = torch.utils.data.Subset(files, list(range(rank, total, world_size)))
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    for images, indices in loader:
        yield images, None, indices


def reference_stats(source, extractor: Extractor, resolution: int | None = 256, batch_size: int = 250,
                    num: int | None = None, num_workers: int = 0, rank: int | None = None,
                    world_size: int | None = None) -> FeatureStats:
    """Feature statistics of a real image set (folder or .npz; see :func:`image_source_batches`), split over
    ranks and all-reduced (the same on every rank)."""
    from pmf.parallel import dist

    rank = dist.rank() if rank is None else rank
    world_size = dist.world_size() if world_size is None else world_size
    stream = image_source_batches(source, resolution, batch_size, num, rank, world_size, num_workers)
    return compute_stats(stream, extractor).all_reduce_()


# ----------------------------------------------------------------------------------------------------------------
# The metric: an extractor, its reference and what to report


@dataclasses.dataclass
class Metric:
    """What :func:`evaluate_generator` needs besides the network: the extractor, the reference statistics, the key
    prefix of the distance (``fd`` for the Fashion-MNIST CNN, ``fid`` for Inception), whether the logits' classes
    are the labels (class accuracy), and the number of logits to compute the Inception Score from (None: no IS)."""

    extractor: Extractor
    reference: tuple  # (mu (F,), sigma (F, F)) float64
    fd_key: str = "fd"
    accuracy: bool = False
    is_classes: int | None = None
    info: dict = dataclasses.field(default_factory=dict)
    class_spread: ClassSpread | None = None  # the reference's per-class spread: also report diversity_{k}step


@torch.no_grad()
def evaluate_generator(
    net,
    metric: Metric,
    n: int,
    steps=(1,),
    noise_scale: float = 1.0,
    omega=1.0,
    t_min=0.0,
    t_max=1.0,
    batch_size: int = 256,
    seed: int = 0,
    device="cpu",
    rank: int | None = None,
    world_size: int | None = None,
    inception_score: bool = True,
    instantaneous: bool = False,
) -> dict:
    """For each k in ``steps``: generate n class-balanced samples with k steps (:func:`generate`, this rank's
    share), stream them through ``metric.extractor``, all-reduce, and report the Frechet distance to
    ``metric.reference`` as ``{fd_key}_{k}step``, plus ``class_acc_{k}step`` (if ``metric.accuracy``) and
    ``is_{k}step`` / ``is_std_{k}step`` (if ``metric.is_classes`` and ``inception_score``), and the within-class
    diversity ``diversity_{k}step`` and the distance with class means aligned, ``{fd_key}_within_{k}step`` (if
    ``metric.class_spread``; :meth:`ClassSpread.diversity`, :meth:`ClassSpread.class_aligned`). The class count and
    image shape come from ``net`` (``num_classes``, ``in_channels``, ``input_size``). Rank and world size default to
    the process group's (:mod:`pmf.parallel.dist`); every rank returns the same numbers. ``instantaneous``: sample with
    Euler
    steps on v = u(z, t, t) (see :func:`pmf.method.sampler.sample`)."""
    from pmf.parallel import dist

    rank = dist.rank() if rank is None else rank
    world_size = dist.world_size() if world_size is None else world_size
    mu_ref, sigma_ref = as_mean_cov(metric.reference)
    shape = (net.in_channels, net.input_size, net.input_size)
    out = {}
    for k in steps:
        k = int(k)
        is_stats = (InceptionScoreStats(n, metric.is_classes, device=device)
                    if metric.is_classes and inception_score else None)
        images = generate(net, n, net.num_classes, shape, noise_scale, k, omega, t_min, t_max, batch_size, seed=seed,
                          device=device, rank=rank, world_size=world_size, return_indices=True,
                          instantaneous=instantaneous)
        spread = (ClassSpread(metric.class_spread.num_classes, metric.class_spread.dim, device=device)
                  if metric.class_spread is not None else None)
        stats = compute_stats(images, metric.extractor, accuracy=metric.accuracy, inception_score=is_stats,
                              spread=spread)
        stats.all_reduce_()
        if spread is not None:
            out[f"diversity_{k}step"] = spread.all_reduce_().diversity(metric.class_spread)
            aligned = spread.class_aligned(stats, metric.class_spread)
            out[f"{metric.fd_key}_within_{k}step"] = frechet_distance(*aligned.mean_cov(), mu_ref, sigma_ref)
        out[f"{metric.fd_key}_{k}step"] = frechet_distance(*stats.mean_cov(), mu_ref, sigma_ref)
        if metric.accuracy:
            out[f"class_acc_{k}step"] = stats.class_accuracy()
        if is_stats is not None:
            out[f"is_{k}step"], out[f"is_std_{k}step"] = is_stats.all_reduce_().inception_score()
    return out
