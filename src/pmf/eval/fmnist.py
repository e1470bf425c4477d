"""The offline Fashion-MNIST metric: Frechet distance in the features of a small CNN ("FID with a LeNet").

No Inception weights can be downloaded here, so quality on Fashion-MNIST is measured in the 256-d penultimate
features of a small classifier trained on the Fashion-MNIST training set on first use and cached (state dict + a
JSON with its measured test accuracy) under ``$PMF_CACHE`` or ``~/.cache/pmf/``. Its logits give a second number:
the accuracy with which generated images are classified as the class they were generated for.

Reference set: every distance here (real train, blurred, noisy, generated) is measured against the statistics of
the full Fashion-MNIST *test* set (10,000 images), so all numbers share one reference and are comparable.
Reference points calibrate the scale: real train vs test (the floor), 2x-blurred train vs test, noisy train vs test.
These numbers are only comparable between runs that use the same cached classifier (see ``info``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pmf.data.datasets import load_fashion_mnist
from pmf.data.images import to_model_range, to_uint8
from pmf.eval.generate import ClassSpread, FeatureStats, Metric, batches, compute_stats, evaluate_generator
from pmf.parallel import dist
from pmf.util.atomic import atomic_save, atomic_write_text

CACHE_NAME = "fmnist_cnn_v1"  # bump when the architecture or the training recipe changes
REFERENCE_N = 10_000


class FashionCNN(nn.Module):
    """conv32 - pool - conv64 - pool - conv128 - pool -> fc 256 (features) -> fc 10 (logits); 3x3 convs, each
    followed by 2x2 max-pool, BatchNorm and ReLU. Input (B, 1, 28, 28) in [-1, 1]; 390k parameters, ~7.7M
    multiply-adds per image."""

    feature_dim = 256
    num_classes = 10

    def __init__(self):
        super().__init__()

        def conv(c_in, c_out):  # 3x3 same conv, 2x2 max-pool, BN, ReLU: (B, c_in, H, W) -> (B, c_out, H/2, W/2)
            # pooling before BN/ReLU gives them 4x fewer pixels: ~20% faster training on CPU than conv-BN-ReLU-pool
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2),
                                 nn.BatchNorm2d(c_out), nn.ReLU())

        self.convs = nn.Sequential(conv(1, 32), conv(32, 64), conv(64, 128))  # 28 -> 14 -> 7 -> 3
        self.fc = nn.Linear(128 * 3 * 3, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, self.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) in [-1, 1] -> penultimate features (B, 256), after ReLU."""
        return F.relu(self.fc(self.convs(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) in [-1, 1] -> logits (B, 10)."""
        return self.head(self.features(x))

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The extractor interface of :mod:`pmf.eval.generate`: uint8 (B, 1, 28, 28) -> (feats (B, 256), logits (B,
        10)),
        on the model's device. Scales to [-1, 1] as x / 127.5 - 1. Call on a model in eval mode."""
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {images.dtype}")
        device = next(self.parameters()).device
        x = to_model_range(images.to(device))
        feats = self.features(x)
        return feats, self.head(feats)


# ----------------------------------------------------------------------------------------------------------------
# Data, training, cache


def _load_fmnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 1, 28, 28), int64 (N,); one place, so tests can substitute synthetic data."""
    return load_fashion_mnist(split)


def _default_data():
    return (*_load_fmnist("train"), *_load_fmnist("test"))


@torch.no_grad()
def test_accuracy(model: FashionCNN, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    stats = compute_stats(batches(images, labels, batch_size), model.features_and_logits)
    return stats.class_accuracy()


def train_fmnist_classifier(
    data=None,
    epochs: int = 2,
    batch_size: int = 256,  # 256 trains ~15% faster per image than 128 on 2 CPU cores, at the same accuracy
    lr: float = 4e-3,
    seed: int = 0,
    max_steps: int | None = None,
    log=None,
) -> tuple[FashionCNN, dict]:
    """Train :class:`FashionCNN` deterministically (fixed seed for init and for the per-epoch permutation; one
    random horizontal flip per image from the same generator); Adam with a one-cycle learning rate. Sets
    ``torch.set_flush_denormal(True)``.

    data: (train_images, train_labels, test_images, test_labels), uint8 (N, 1, 28, 28) and int64 (N,); default:
    Fashion-MNIST via :mod:`pmf.data.datasets`. max_steps: stop early (tests). Returns (model in eval mode, info).
    """
    x_tr, y_tr, x_te, y_te = _default_data() if data is None else data
    # Denormal arithmetic on CPU stalled some steps for seconds: flush them to zero.
    # Process-wide and left on, as in pmf training; it changes no result beyond ~1e-38.
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)  # parameter init
    model = FashionCNN()
    gen = torch.Generator().manual_seed(seed)
    n = x_tr.shape[0]
    steps_per_epoch = max(n // batch_size, 1)
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    t0 = time.perf_counter()
    step = 0
    model.train()
    while step < total:
        perm = torch.randperm(n, generator=gen)
        flip = torch.rand(n, generator=gen) < 0.5
        for i in range(steps_per_epoch):
            if step >= total:
                break
            idx = perm[i * batch_size : (i + 1) * batch_size]
            x = to_model_range(x_tr[idx])
            x = torch.where(flip[idx].view(-1, 1, 1, 1), x.flip(-1), x)  # garments are left-right symmetric
            loss = F.cross_entropy(model(x), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if log is not None and step % 100 == 0:
                log(f"classifier step {step}/{total} loss {loss.item():.4f}")
    train_seconds = time.perf_counter() - t0
    model.eval()
    info = {
        "name": CACHE_NAME,
        "test_accuracy": test_accuracy(model, x_te, y_te),
        "train_seconds": round(train_seconds, 2),
        "steps": step,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "num_train": int(n),
        "num_test": int(x_te.shape[0]),
        "torch": torch.__version__,
    }
    return model, info


def cache_dir_path(cache_dir=None) -> Path:
    """cache_dir, else ``$PMF_CACHE``, else ``~/.cache/pmf``."""
    return Path(cache_dir or os.environ.get("PMF_CACHE") or Path.home() / ".cache" / "pmf")


def save_classifier(model: FashionCNN, info: dict, cache_dir=None) -> Path:
    """Write ``<name>.pt`` (state dict) then ``<name>.json`` (info), each atomically; returns the folder."""
    root = cache_dir_path(cache_dir)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save(state, root / f"{CACHE_NAME}.pt")
    _save_info(info, root)
    return root


def _save_info(info: dict, root: Path) -> None:
    atomic_write_text(root / f"{CACHE_NAME}.json", json.dumps(info, indent=2))


def get_fmnist_classifier(cache_dir=None, train_if_missing: bool = True, data=None, **train_kwargs):
    """Load the cached classifier, training and caching it first if missing (about a minute on 2 CPU cores).

    Returns (model in eval mode on CPU with requires_grad off, info) with ``info["test_accuracy"]``. With
    ``train_if_missing=False`` a missing cache raises FileNotFoundError. ``data``/``train_kwargs`` go to
    :func:`train_fmnist_classifier`. Under torchrun, call it on rank 0 first, then barrier, then on the others.
    """
    root = cache_dir_path(cache_dir)
    weights, meta = root / f"{CACHE_NAME}.pt", root / f"{CACHE_NAME}.json"
    if weights.exists() and meta.exists():
        model = FashionCNN()
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
        info = json.loads(meta.read_text())
    elif not train_if_missing:
        raise FileNotFoundError(f"no cached Fashion-MNIST classifier at {weights}")
    else:
        model, info = train_fmnist_classifier(data=data, **train_kwargs)
        save_classifier(model, info, root)
    model.eval().requires_grad_(False)
    return model, info


# ----------------------------------------------------------------------------------------------------------------
# Reference points and the metric


def blur2x(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> 2x2 average pool, then *nearest* upsample back to (H, W), re-quantised to uint8."""
    x = F.avg_pool2d(images.float(), 2)
    return F.interpolate(x, scale_factor=2, mode="nearest").round().clamp(0, 255).to(torch.uint8)


def add_noise(images: torch.Tensor, std: float = 0.1, seed: int = 0) -> torch.Tensor:
    """uint8 -> [-1, 1] + N(0, std^2) (seeded), clamped to [-1, 1], back to uint8."""
    x = to_model_range(images)
    x = x + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return to_uint8(x.clamp(-1.0, 1.0))


def reference_points(
    extractor,
    n: int = REFERENCE_N,
    reference: FeatureStats | None = None,
    train_images: torch.Tensor | None = None,
    test_images: torch.Tensor | None = None,
    batch_size: int = 500,
    seed: int = 0,
) -> dict:
    """Frechet distances, all against the test-set statistics (``reference``; computed from ``test_images`` or
    the full Fashion-MNIST test set if not given), of the first ``n`` training images:

      floor:     as they are (real vs real: the best a generator can hope for at this n);
      blur2x:    2x2 average-pooled, nearest-upsampled back to 28x28 (:func:`blur2x`);
      noise0.1:  plus N(0, 0.1^2) in the [-1, 1] range, clamped (:func:`add_noise`).
    """
    if train_images is None:
        train_images = _load_fmnist("train")[0]
    if reference is None:
        if test_images is None:
            test_images = _load_fmnist("test")[0]
        reference = compute_stats(batches(test_images, None, batch_size), extractor)
    x = train_images[:n]
    out = {}
    for name, imgs in (("floor", x), ("blur2x", blur2x(x)), ("noise0.1", add_noise(x, 0.1, seed))):
        out[name] = compute_stats(batches(imgs, None, batch_size), extractor).frechet_distance(reference)
    return out


def fmnist_metric(device="cpu", batch_size: int = 500, cache_dir=None, classifier=None):
    """(:class:`~pmf.eval.generate.Metric`, reference :class:`FeatureStats` of the full test set, classifier info) of
    the Fashion-MNIST metric: the CNN's features and logits, key ``fd``, class accuracy on, and the test set's
    per-class :class:`~pmf.eval.generate.ClassSpread` for the within-class diversity. ``classifier``: (model, info),
    default :func:`get_fmnist_classifier` (trained and cached on first use)."""
    model, info = get_fmnist_classifier(cache_dir) if classifier is None else classifier
    model = model.to(device).eval()
    test_x, test_y = _load_fmnist("test")
    spread = ClassSpread(model.num_classes, model.feature_dim, device=device)
    reference = compute_stats(batches(test_x, test_y, batch_size), model.features_and_logits, spread=spread)
    metric = Metric(model.features_and_logits, reference.mean_cov(), "fd", accuracy=True, class_spread=spread,
                    info={"classifier_test_accuracy": info.get("test_accuracy")})
    return metric, reference, info


def fmnist_metrics(
    net,
    n: int = 10_000,
    steps=(1, 2, 4),
    omega=1.0,
    t_min=0.0,
    t_max=1.0,
    batch_size: int = 500,
    noise_scale: float = 1.0,
    seed: int = 0,
    device="cpu",
    classifier=None,
    cache_dir=None,
    with_reference_points: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    instantaneous: bool = False,
) -> dict:
    """Fashion-MNIST quality of a class-conditional 28x28 net: for each number of sampling steps k, the Frechet
    distance of n generated images (class-balanced labels, per-sample seeds; see :func:`pmf.eval.generate.generate`) to
    the test set in the classifier's features (``fd_{k}step``) and the accuracy with which the classifier recovers
    the intended labels (``class_acc_{k}step``), the within-class diversity (``diversity_{k}step``: mean over
    classes of the samples' feature variance over the test set's, :class:`pmf.eval.generate.ClassSpread`); plus the
    reference points ``fd_floor``, ``fd_blur2x``, ``fd_noise0.1`` at the same n (cached in the classifier's JSON
    after the first computation) and the classifier's own test accuracy. ``classifier``: (model, info), default
    :func:`get_fmnist_classifier`.

    The samples go through :func:`pmf.eval.generate.evaluate_generator`, the same streaming path as the Inception FID;
    under torchrun each rank generates its share and the statistics are all-reduced (rank / world size default to
    the process group's). Create the classifier cache on rank 0 first (see :func:`get_fmnist_classifier`).
    ``instantaneous``: Euler steps on v = u(z, t, t) instead of average-velocity steps
    (:func:`pmf.method.sampler.sample`).
    """
    own = classifier is None
    if own:
        classifier = get_fmnist_classifier(cache_dir)
    metric, reference, info = fmnist_metric(device, batch_size, classifier=classifier)
    out = {"n": n, "classifier_test_accuracy": info.get("test_accuracy")}
    out.update(evaluate_generator(net, metric, n, steps, noise_scale, omega, t_min, t_max, batch_size, seed, device,
                                  rank, world_size, instantaneous=instantaneous))
    if with_reference_points:
        cached = info.get("reference_points", {}).get(str(n))
        if cached is None:
            cached = reference_points(metric.extractor, n, reference=reference, batch_size=batch_size)
            if own and dist.is_main():  # remember them next to the classifier: they depend on nothing else
                info.setdefault("reference_points", {})[str(n)] = cached
                _save_info(info, cache_dir_path(cache_dir))
        out.update({f"fd_{name}": v for name, v in cached.items()})
    return out
