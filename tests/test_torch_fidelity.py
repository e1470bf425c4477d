"""Cross-check against torch-fidelity (the tool behind JiT's and the pMF torch branch's FID): the same random
weights in torch-fidelity's ``FeatureExtractorInceptionV3`` and in pmf's InceptionV3FID give the same pool features
and unbiased logits on uint8 images of several sizes (both resize with TF1's bilinear rule); torch-fidelity's FID,
Inception Score and precision / recall formulas, run on the same features, give pmf's numbers.

torch-fidelity is an optional extra (``pip install torch-fidelity``; on a CPU-only torch use ``--no-deps``, since
it requires torchvision, which would pull a CUDA torch). Its package ``__init__`` imports torchvision, so the
modules used here are imported without it: the Inception module through a stand-in package object, the metric
formulas by compiling just their functions from torch-fidelity's own source files. Skipped when it is not installed.
Run with ``-s`` to see the measured agreement."""

import ast
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from pmf.eval.inception import InceptionV3FID
from pmf.eval.manifold import precision_recall
from pmf.eval.stats import FeatureStats, InceptionScoreStats, frechet_distance

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

FEATURE_TOL = 1e-4  # relative agreement asked of pool features and logits
FID_TOL = 1e-6  # relative agreement asked of the Frechet distance


def _package_dir() -> Path:
    spec = importlib.util.find_spec("torch_fidelity")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torch-fidelity is not installed (pip install --no-deps torch-fidelity)")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="module")
def tf_inception_module():
    """torch_fidelity.feature_extractor_inceptionv3, imported under a stand-in package object so that the real
    package __init__ (which imports torchvision) does not run; sys.modules is restored afterwards."""
    root = _package_dir()
    saved = {k: v for k, v in sys.modules.items() if k == "torch_fidelity" or k.startswith("torch_fidelity.")}
    for k in saved:
        del sys.modules[k]
    stand_in = types.ModuleType("torch_fidelity")
    stand_in.__path__ = [str(root)]
    sys.modules["torch_fidelity"] = stand_in
    try:
        module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    finally:
        for k in [k for k in sys.modules if k == "torch_fidelity" or k.startswith("torch_fidelity.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return module


def _functions_from(file_name: str, names: tuple[str, ...]) -> dict:
    """Compile only the named top-level functions of a torch-fidelity source file (its module imports pull in
    torchvision); their globals are numpy, torch and a silent vprint."""
    path = _package_dir() / file_name
    tree = ast.parse(path.read_text())
    defs = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
    assigns = [node for node in tree.body if isinstance(node, ast.Assign)]  # KEY_METRIC_* constants
    missing = set(names) - {d.name for d in defs}
    if missing:
        pytest.skip(f"this torch-fidelity's {file_name} has no {sorted(missing)}")
    namespace = {"np": np, "torch": torch, "vprint": lambda *a, **k: None}
    exec(compile(ast.Module(body=assigns + defs, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def same_weights(tmp_path_factory, tf_inception_module):
    """(pmf model, torch-fidelity model) holding the same random weights. BatchNorm running statistics are
    calibrated on a batch (momentum None: the running averages become that batch's statistics), so every layer's
    activations stay of order one and the pool features and logits are far from trivially zero."""
    torch.manual_seed(0)
    ours = InceptionV3FID()
    for m in ours.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.2, 0.2)
    ours.train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ours.pool_features(ours.preprocess(torch.randint(0, 256, (6, 3, 96, 96), dtype=torch.uint8, generator=g)))
    for m in ours.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    ours.eval().requires_grad_(False)
    torch.nn.init.normal_(ours.fc.weight, std=0.05)
    path = tmp_path_factory.mktemp("weights") / "inception_random.pth"
    torch.save(ours.state_dict(), path)
    theirs = tf_inception_module.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path))
    return ours, theirs


@pytest.mark.parametrize("size", [(28, 28), (64, 48), (512, 512), (1024, 768)])
def test_tf1_resize_equals_torch_fidelity(tf_inception_module, size):
    """The TF1 bilinear resize to 299 (float32 source coordinates, as TF1 and torch-fidelity) within a few float32
    ulps of pixel values up to 255; float64 coordinates would be off by up to 0.01 levels at 512 px."""
    from pmf.eval.inception import resize_bilinear

    theirs_fn = tf_inception_module.interpolate_bilinear_2d_like_tensorflow1x
    g = torch.Generator().manual_seed(size[0])
    x = torch.randint(0, 256, (2, 3, *size), generator=g).float()
    theirs = theirs_fn(x, size=(299, 299), align_corners=False)
    ours = resize_bilinear(x, 299, "tf1")
    assert ours.shape == theirs.shape == (2, 3, 299, 299)
    assert float((ours - theirs).abs().max()) <= 1e-4


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(||a - b|| / ||b||, max |a - b| / max |b|)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm()), float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("size", [(32, 32), (64, 48), (299, 299), (512, 512)])
def test_pool_features_and_logits_equal_torch_fidelity(same_weights, size):
    ours, theirs = same_weights
    g = torch.Generator().manual_seed(size[0] * 1000 + size[1])
    images = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8, generator=g)
    images[1] = images[1] // 4 + 96  # a low-contrast image too
    pool_t, logits_t = theirs(images)
    pool_o, logits_o = ours.features_and_logits(images)
    extracted = ours.extract(images)
    torch.testing.assert_close(extracted["pool"], pool_o, rtol=0, atol=0)
    assert float(pool_t.std()) > 1e-2 and float(logits_t.std()) > 1e-2  # the calibrated net is not degenerate
    rel_pool, rel_logits = _rel(pool_o, pool_t), _rel(logits_o, logits_t)
    print(f"\n{size[0]}x{size[1]}: pool rel {rel_pool[0]:.2e} (max {rel_pool[1]:.2e}), "
          f"logits rel {rel_logits[0]:.2e} (max {rel_logits[1]:.2e})")
    assert max(rel_pool) <= FEATURE_TOL and max(rel_logits) <= FEATURE_TOL


def test_fid_equals_torch_fidelity_formula():
    """Two float32 feature sets: torch-fidelity's statistics (np.mean / np.cov) and FID (eigenvalues of
    Sigma1 Sigma2) against pmf's streamed statistics and FID (singular values of Sigma1^1/2 Sigma2^1/2)."""
    tf = _functions_from("metric_fid.py", ("fid_features_to_statistics", "fid_statistics_to_metric"))
    g = torch.Generator().manual_seed(0)
    dim = 256
    mix = torch.randn(dim, dim, generator=g) / dim**0.5
    a = torch.relu(torch.randn(3000, dim, generator=g) @ mix + 0.3)  # ReLU features, like pool_3
    b = torch.relu(torch.randn(2500, dim, generator=g) @ (mix + 0.02 * torch.randn(dim, dim, generator=g)) + 0.35)
    stats_a, stats_b = tf["fid_features_to_statistics"](a), tf["fid_features_to_statistics"](b)
    theirs = tf["fid_statistics_to_metric"](stats_a, stats_b, False)["frechet_inception_distance"]
    ours_a, ours_b = FeatureStats(dim), FeatureStats(dim)
    for chunk in a.split(512):
        ours_a.update(chunk)
    for chunk in b.split(700):
        ours_b.update(chunk)
    ours = ours_a.frechet_distance(ours_b)
    # the formulas alone, on the same (float64) statistics
    same_stats = frechet_distance(stats_a["mu"], stats_a["sigma"], stats_b["mu"], stats_b["sigma"])
    print(f"\nFID torch-fidelity {theirs:.10g}, pmf {ours:.10g}: rel {abs(ours - theirs) / theirs:.2e}; "
          f"same statistics rel {abs(same_stats - theirs) / theirs:.2e}")
    assert theirs > 0.1
    assert abs(same_stats - theirs) <= FID_TOL * theirs
    assert abs(ours - theirs) <= FID_TOL * theirs


def test_inception_score_and_precision_recall_equal_torch_fidelity():
    """torch-fidelity's Inception Score (10 splits of a seed-2020 permutation) and improved precision / recall
    (k = 3, torch.cdist) on the same features."""
    isc = _functions_from("metric_isc.py", ("isc_features_to_metric",))["isc_features_to_metric"]
    prc = _functions_from("metric_prc.py", ("calc_cdist_full", "calculate_precision_recall_full"))
    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(1000, 50, generator=g)
    want = isc(logits)
    got = InceptionScoreStats(1000, 50).update(logits[500:], torch.arange(500, 1000)).update(logits[:500],
                                                                                            torch.arange(500))
    mean, std = got.inception_score()
    assert mean == pytest.approx(want["inception_score_mean"], rel=1e-10)
    assert std == pytest.approx(want["inception_score_std"], rel=1e-8)
    real = torch.randn(400, 32, generator=g)
    fake = 1.2 * torch.randn(300, 32, generator=g) + 0.3
    # torch-fidelity's convention: features_1 = generated, features_2 = real
    p_t, r_t = prc["calculate_precision_recall_full"](fake, real, neighborhood=3, batch_size=10000)
    p_o, r_o = precision_recall(real, fake, k=3, dtype=torch.float64)
    print(f"\nIS {mean:.6f} vs {want['inception_score_mean']:.6f}; P {p_o:.4f} vs {p_t:.4f}, R {r_o:.4f} vs {r_t:.4f}")
    assert 0.05 < p_t < 0.95 and 0.05 < r_t < 0.95
    # torch-fidelity averages in float32: compare the counts of covered points
    assert round(p_o * 300) == round(p_t * 300) and round(r_o * 400) == round(r_t * 400)
