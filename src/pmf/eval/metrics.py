"""Metrics by name: ``fmnist`` (the Fashion-MNIST CNN's Frechet distance and class accuracy) and ``inception``
(FID + Inception Score against a reference-statistics file). Each returns a :class:`pmf.eval.generate.Metric` for
:func:`pmf.eval.generate.evaluate_generator`; the extractor is built here and injected there."""

from __future__ import annotations

from pmf.eval.fmnist import fmnist_metric
from pmf.eval.generate import Metric
from pmf.eval.inception import NUM_LOGITS, load_inception
from pmf.eval.stats import load_ref_stats


def setup_metric(kind: str = "fmnist", inception=None, ref_stats=None, device="cpu", batch_size: int = 500,
                 cache_dir=None) -> Metric:
    """``fmnist``: the cached Fashion-MNIST CNN (:mod:`pmf.eval.fmnist`; trained on first use), reference = the test
    set, key ``fd``, class accuracy on. ``inception``: the FID InceptionV3 from the local file ``inception``
    (:func:`pmf.eval.inception.load_inception`), reference = the ``ref_stats`` .npz, key ``fid``, plus IS."""
    if kind == "fmnist":
        return fmnist_metric(device=device, batch_size=batch_size, cache_dir=cache_dir)[0]
    if kind == "inception":
        if ref_stats is None:
            raise ValueError("the Inception metric needs reference statistics: --ref-stats NPZ (mu, sigma; e.g. "
                             "JiT's jit_in256_stats.npz, pMF's imagenet_256_fid_stats.npz, or `pmf ref-stats`)")
        model = load_inception(inception, device=device)
        return Metric(model.features_and_logits, load_ref_stats(ref_stats), "fid", accuracy=False,
                      is_classes=NUM_LOGITS, info={"ref_stats": str(ref_stats)})
    raise ValueError(f"unknown extractor {kind!r} (fmnist or inception)")
