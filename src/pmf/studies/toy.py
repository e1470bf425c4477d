"""The paper's toy study: x-prediction vs u-prediction as the ambient dimension grows (pMF section 5, Fig. 2).

Setting (pMF Fig. 2 and Sec. 5, after JiT Sec. 3.3): 2-D data (a Swiss roll by default) is embedded linearly in
D dimensions by a fixed column-orthonormal D x 2 matrix P (``x_D = x_2 P^T``); a MeanFlow model, a 7-layer ReLU MLP
with 256 hidden units, is trained with the *same* pMF objective (:func:`pmf.method.objective.pmf_loss`) either as
x-prediction (the net outputs x, converted by ``u = (z - x) / max(t, 0.05)``) or as u-prediction (the net outputs u);
1-NFE samples (:func:`pmf.method.sampler.sample`, one step) are projected back to 2-D (``x_2 = x_D P``) and compared
with held-out data. The expected finding: both work at D = 2; as D grows u-prediction degrades and fails at D = 512 (the
256-wide MLP cannot carry the D-dimensional noise that u contains), while x-prediction keeps working (x lies in a
2-D subspace).

What the quick preset gets (seed 0; `pmf toy --out runs/toy`): see the README's table (filled from
``metrics.json``). In short, x-prediction stays within a small factor of the sliced-W2 floor at every D (2.0-3.9x),
u-prediction is a blob with about the prior's own score (~6x) from D = 8 on, with the D-dim noise left off the
data plane at D = 512. At D = 2 u-prediction needed its own settings (``ToyConfig.u_overrides``, ``u_lr_factor``,
``u_steps_factor``): with the shared ones its 1-NFE samples collapse onto the inner roll (6.7-15x over several
sampler variants and 4x more steps), while its 2- and 4-step samples are fine (2.3-2.9x): the 1-NFE query
(t, r) = (1, 0) lies where logit-normal draws never put h = t - r, and a u-net, unlike an x-net (whose output is
bounded to the data), does not extrapolate there. Trained on the r = 0 boundary with t ~ U[0, 1] (and
t-conditioning, iMF-style), adaptive-weight power 0.5, a third of the lr and twice the steps, it reaches 2.9x at
D = 2 (x-prediction: 2.0x), though its outer arm stays fuzzier than x-prediction's (nearest-neighbour distance 0.136
vs 0.044); the same settings leave u-prediction at D = 512 as bad as before (5.7x, off-manifold 20.6).

Choices the paper does not report (pMF does not report the steps, optimizer, time sampler or noise), made here
and tuned on a 2-core CPU for the "quick" preset (:data:`PRESETS`; the whole 2 x 4 grid takes ~6 min there):

* "7-layer" = 7 linear layers on the u path: input -> 256, five 256 -> 256, 256 -> D, ReLU between them. The
  training-only v-head is one more 256 -> D output layer on the same trunk, so the default objective (auxiliary
  v-head, predicted JVP tangent, adaptive weighting) runs unchanged; guidance is off and labels are the null label.
* Conditioning: z concatenated with features [s, sin(pi 2^k s), cos(pi 2^k s)], k < 3, of h = t - r, 1 - 1/omega,
  t_min and t_max, plus a label embedding. t itself is NOT embedded for x-prediction, like the image model (it is
  for u-prediction: ``u_overrides``). We tried embedding it (Fourier features or the raw scalar): it made
  x-prediction clearly worse (Swiss roll, 2500 steps, D = 2: sliced W2 0.44-0.52 with Fourier-t vs 0.10-0.20
  without; D = 512: 0.13 vs 0.05) and did not on its own fix u-prediction at D = 2 (0.2-0.4 with or without it).
  For D >= 8 the MLP can read t off |z| anyway; at D = 2 x-prediction still gets t through the x -> u conversion
  u = (z - x) / t, and the 1-NFE query (h = 1) implies t = 1.
* Time sampler (x-prediction) logit-normal(-0.7, 0.5) (t mostly in [0.2, 0.5], i.e. toward data), Adam lr 3e-3 with
  100 warmup steps and cosine decay to 5 %, batch 128, 2500 steps, noise scale 1, data scaled to unit std. Sampling
  more t near noise (the paper's logit-normal(0.8, 0.8), wider P_std, 10-25 % uniform (t, r)) made x-prediction
  worse at this budget: the 1-NFE map collapsed toward the posterior mean. Fewer steps than ~2000 leave
  x-prediction's outer arm smeared.

Metrics (2-D, N = num_samples points each):

* ``distance``: sliced Wasserstein-2 with 256 fixed random directions (seed 1234): both point sets are projected on
  each direction and sorted; W2^2 is the mean squared difference of the sorted projections; ``distance = sqrt(mean
  over directions of W2^2)``. ``floor``: the same between two independent true samples (a perfect sampler).
  ``noise_distance``: the same for the projected prior itself, N(0, I_2): what a model that learned nothing scores.
  Sliced W2 only sees 1-D marginals, so a unit Gaussian blob scores only ~6x the floor on the unit-std Swiss roll.
* ``nn_distance``: mean distance from each sample to its nearest held-out point (``nn_floor`` for true data):
  structure-sensitive, it separates samples on the roll from a blob.
* ``off_manifold``: mean norm of the component of the D-dim samples orthogonal to the data plane.
* ``final_loss``: raw per-coordinate MSE of V against the target (``loss_u``), mean over the last 10 % of steps.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from pmf.method.model import precondition, velocity_from_output
from pmf.method.objective import ObjectiveConfig, pmf_loss
from pmf.method.sampler import sample

__all__ = [
    "DATASETS", "ToyDataset", "get_dataset", "embedding_matrix", "embed", "project", "off_manifold",
    "sliced_w2", "nn_distance", "ToyMLP", "ToyConfig", "PRESETS", "build_toy_model", "train_toy", "sample_toy", "true_samples", "run_toy",
]


# ----------------------------------------------------------------------------------------------------------------
# 2-D distributions. Each returns (x (n, 2) float32, labels (n,) int64); scaled to roughly unit std per coordinate.

_SWISS_CENTER = (2.0, 0.2)  # mean of (s cos s, s sin s), s ~ U[1.5 pi, 4.5 pi], rounded
_SWISS_SCALE = 6.8  # its std (both coordinates together), rounded


def _swiss_roll(n: int, g: torch.Generator, noise: float = 0.25):
    u = torch.rand(n, generator=g)
    s = 1.5 * math.pi * (1 + 2 * u)  # the roll's angle parameter (sklearn's make_swiss_roll)
    x = torch.stack([s * torch.cos(s), s * torch.sin(s)], dim=1) + noise * torch.randn(n, 2, generator=g)
    x = (x - torch.tensor(_SWISS_CENTER)) / _SWISS_SCALE
    return x, (u * 4).long().clamp(max=3)  # label: which quarter of the roll (by arc parameter)


def _eight_gaussians(n: int, g: torch.Generator, radius: float = math.sqrt(2.0), std: float = 0.1):
    k = torch.randint(0, 8, (n,), generator=g)
    ang = k.float() * (2 * math.pi / 8)
    x = radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1) + std * torch.randn(n, 2, generator=g)
    return x, k  # label: which mode


def _checkerboard(n: int, g: torch.Generator):
    # 4 x 4 board on [-2, 2]^2, the 8 squares with (row + col) even; uniform coordinates have std 4 / sqrt(12).
    k = torch.randint(0, 8, (n,), generator=g)
    row = k // 2
    col = 2 * (k % 2) + (row % 2)
    x = torch.stack([col.float(), row.float()], dim=1) - 2 + torch.rand(n, 2, generator=g)
    return x / (4 / math.sqrt(12)), k  # label: which square


@dataclass(frozen=True)
class ToyDataset:
    name: str
    fn: object
    num_classes: int  # classes of the class-conditional variant (labels = arm / mode / square)

    def sample(self, n: int, generator: torch.Generator):
        return self.fn(n, generator)


DATASETS = {
    "swiss_roll": ToyDataset("swiss_roll", _swiss_roll, 4),
    "8gaussians": ToyDataset("8gaussians", _eight_gaussians, 8),
    "checkerboard": ToyDataset("checkerboard", _checkerboard, 8),
}


def get_dataset(name: str) -> ToyDataset:
    if name not in DATASETS:
        raise KeyError(f"unknown toy dataset {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name]


# ----------------------------------------------------------------------------------------------------------------
# The linear embedding in D dimensions


def embedding_matrix(dim: int, seed: int = 0) -> torch.Tensor:
    """A fixed column-orthonormal (dim, 2) matrix P (P^T P = I): Q of the QR decomposition of a seeded Gaussian."""
    if dim < 2:
        raise ValueError(f"ambient dimension must be >= 2, got {dim}")
    g = torch.Generator().manual_seed(10_000 + int(seed))
    a = torch.randn(dim, 2, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))  # unique QR (positive diagonal of R)
    return q.float()


def embed(x2: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """(n, 2) -> (n, D): x_D = x_2 P^T."""
    return x2 @ P.T


def project(xD: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """(n, D) -> (n, 2): x_2 = x_D P (the inverse of :func:`embed` on its range)."""
    return xD @ P


def off_manifold(xD: torch.Tensor, P: torch.Tensor) -> float:
    """Mean Euclidean norm of the component of x_D orthogonal to the data plane: ||x_D - (x_D P) P^T||."""
    return float((xD - project(xD, P) @ P.T).norm(dim=1).mean())


# ----------------------------------------------------------------------------------------------------------------
# Metric

NUM_DIRECTIONS = 256
_DIRECTION_SEED = 1234


def sliced_w2(a, b, num_directions: int = NUM_DIRECTIONS, seed: int = _DIRECTION_SEED) -> float:
    """Sliced Wasserstein-2 distance between two equally sized 2-D point sets (module docstring)."""
    a, b = torch.as_tensor(np.asarray(a), dtype=torch.float64), torch.as_tensor(np.asarray(b), dtype=torch.float64)
    if a.shape != b.shape or a.shape[1] != 2:
        raise ValueError(f"need two (N, 2) sets of equal size, got {tuple(a.shape)} and {tuple(b.shape)}")
    ang = torch.rand(num_directions, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 * math.pi
    dirs = torch.stack([torch.cos(ang), torch.sin(ang)], dim=0)  # (2, K) unit vectors
    pa, _ = torch.sort(a @ dirs, dim=0)
    pb, _ = torch.sort(b @ dirs, dim=0)
    return float((pa - pb).pow(2).mean(0).mean().sqrt())


def nn_distance(samples, reference, chunk: int = 1024) -> float:
    """Mean Euclidean distance from each sample to its nearest reference point (a precision-like number: it is
    large for samples off the data, e.g. a Gaussian blob, even when the sliced W2 of the blob is moderate)."""
    a, b = torch.as_tensor(np.asarray(samples), dtype=torch.float64), torch.as_tensor(np.asarray(reference), dtype=torch.float64)
    return float(torch.cat([torch.cdist(a[i:i + chunk], b).min(1).values for i in range(0, len(a), chunk)]).mean())


# ----------------------------------------------------------------------------------------------------------------
# The network


def fourier_features(s: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """(B,) scalar in ~[0, 1] -> (B, 1 + 2 * num_freqs): [s, sin(pi 2^k s), cos(pi 2^k s)], k < num_freqs.
    Smooth in s, so the JVP along t (tangent 1 on t) is well defined."""
    s = s.float()[:, None]
    freqs = math.pi * 2.0 ** torch.arange(num_freqs, device=s.device, dtype=s.dtype)
    return torch.cat([s, torch.sin(s * freqs), torch.cos(s * freqs)], dim=1)


class ToyMLP(nn.Module):
    """A 7-layer ReLU MLP with PMFDiT's interface: ``net(z, t, h, omega, t_min, t_max, y, heads="uv") -> (u, v)``.

    z: (B, D); conditions (B,); y: (B,) int64 with ``num_classes`` the null label. The head outputs go through
    :func:`pmf.method.model.precondition` and :func:`pmf.method.model.velocity_from_output`, exactly like PMFDiT: for
    "x" the output is x_theta and u = (z - x_theta) / max(t, 0.05); for "u" the output is u.
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 7, num_classes: int = 0, prediction: str = "x",
                 v_head: bool = True, embed_t: bool | str = False, num_freqs: int = 3, label_dim: int = 16,
                 omega_max: float = 1.0, noise_scale: float = 1.0, sigma_data: float = 0.5):
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth (number of linear layers) must be >= 2, got {depth}")
        precondition(torch.zeros(1), prediction)  # validates the name
        self.dim, self.hidden, self.depth = dim, hidden, depth
        self.num_classes, self.prediction, self.has_v_head, self.embed_t = num_classes, prediction, v_head, embed_t
        self.num_freqs, self.omega_max, self.noise_scale, self.sigma_data = num_freqs, omega_max, noise_scale, sigma_data
        self.y_embedder = nn.Embedding(num_classes + 1, label_dim)
        if embed_t not in (True, False, "raw"):
            raise ValueError("embed_t must be True (Fourier features), 'raw' (t as one scalar) or False")
        t_dim = {True: 1 + 2 * num_freqs, "raw": 1, False: 0}[embed_t]
        in_dim = dim + t_dim + 4 * (1 + 2 * num_freqs) + label_dim  # z, (t), h, 1 - 1/omega, t_min, t_max, y
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        self.layers = nn.Sequential(*layers)
        self.u_out = nn.Linear(hidden, dim)
        self.v_out = nn.Linear(hidden, dim) if v_head else None

    # The same pieces as PMFDiT (trunk / head / to_velocity), so the objective's lean path runs on the MLP too.
    def trunk(self, z, t, h, omega, t_min, t_max, y) -> torch.Tensor:
        """Shared features (B, hidden) of [c_in z | Fourier((t,) h, 1 - 1/omega, t_min, t_max) | label embedding]."""
        c_in, _, _ = precondition(t, self.prediction, self.noise_scale, self.sigma_data)
        cond = [fourier_features(s, self.num_freqs) for s in (h, 1 - 1 / omega, t_min, t_max)]
        if self.embed_t == "raw":
            cond.append(t.float()[:, None])
        elif self.embed_t:
            cond.append(fourier_features(t, self.num_freqs))
        cond.append(self.y_embedder(y))
        return self.layers(torch.cat([c_in[:, None] * z] + cond, dim=1))

    def head(self, trunk_out: torch.Tensor, which: str = "u") -> torch.Tensor:
        """Raw output (B, D) of the u- or v-head's last linear layer."""
        return (self.u_out if which == "u" else self.v_out)(trunk_out)

    def to_velocity(self, z, t, out):
        """Raw head output -> velocity, through the one x -> u place (:func:`pmf.method.model.velocity_from_output`)."""
        _, c_skip, c_out = precondition(t, self.prediction, self.noise_scale, self.sigma_data)
        return velocity_from_output(z, t, out, c_skip, c_out, self.prediction)

    def u_and_tangent(self, z, t, r, omega, t_min, t_max, y, dz, dt, dr):
        """(u, du, trunk output) as :meth:`pmf.method.model.PMFDiT.u_and_tangent` gives them, for the lean objective:
        here by forward-mode AD (the MLP is small; u and the trunk output keep their autograd history, du none)."""
        import torch.autograd.forward_ad as fwAD

        with fwAD.dual_level():
            z_d, t_d, r_d = fwAD.make_dual(z, dz), fwAD.make_dual(t, dt), fwAD.make_dual(r, dr)
            s = self.trunk(z_d, t_d, t_d - r_d, omega, t_min, t_max, y)
            u = fwAD.unpack_dual(self.to_velocity(z_d, t_d, self.head(s, "u")))
            s = fwAD.unpack_dual(s).primal
        return u.primal, u.tangent.detach(), s

    def forward(self, z, t, h, omega, t_min, t_max, y, heads: str = "uv"):
        s = self.trunk(z, t, h, omega, t_min, t_max, y)
        u = self.to_velocity(z, t, self.head(s, "u")) if "u" in heads else None
        v = self.to_velocity(z, t, self.head(s, "v")) if ("v" in heads and self.has_v_head) else None
        return u, v


# ----------------------------------------------------------------------------------------------------------------
# Training and sampling


@dataclass
class ToyConfig:
    """Everything a toy run depends on besides (dim, prediction, dataset, seed)."""

    steps: int = 2500
    batch_size: int = 128
    lr: float = 3e-3
    adam_b2: float = 0.999
    lr_min_frac: float = 0.05  # cosine decay from lr to lr * lr_min_frac
    warmup: int = 100
    ema: float = 0.0  # EMA decay of the weights used for sampling (0: sample with the trained weights)
    grad_clip: float = 0.0  # max global grad norm (0: off)
    hidden: int = 256
    depth: int = 7
    embed_t: bool | str = False  # True: Fourier features of t; "raw": t as one scalar; False: t not embedded
    num_freqs: int = 3
    conditional: bool = False  # class-conditional variant (labels = arm / mode / square)
    num_samples: int = 2000  # 1-NFE samples and held-out data points (each)
    # objective (pmf.method.objective.ObjectiveConfig fields); guidance off and no class dropout for the unconditional
    # toy
    P_mean: float = -0.7  # logit-normal(-0.7, 0.5): t mostly in [0.2, 0.5], see the module docstring
    P_std: float = 0.5
    data_proportion: float = 0.5
    time_region: str = "full"
    tr_uniform: float = 0.0
    noise_scale: float = 1.0
    use_v_head: bool = True
    tangent: str = "predicted"
    norm_p: float = 1.0
    # Fields replaced for u-prediction (the iMF-style baseline): the u-net is also conditioned on t (a u-net sees
    # no t otherwise: x-prediction gets it through u = (z - x) / t), and it is trained where the 1-NFE query lies:
    # t ~ U[0, 1], r = 0 on the r != t samples (Tab. 3b's "boundaries" region), 75 % of them; milder adaptive
    # weighting (p = 0.5), a third of the lr and 2x the steps (``u_lr_factor``, ``u_steps_factor``). Tuned at D = 2
    # only (Swiss roll, 1-NFE sliced W2 / floor): the shared settings give u-prediction 6.7-15x (its samples
    # collapse onto the inner roll: the net never sees h near 1); the time sampling alone 4.1-4.5x (seeds 0, 1);
    # + p = 0.5 and lr 1e-3 2.4-4.1x (seeds 0-2); + 5000 steps 2.9 / 3.2x (seeds 0 / 2). x-prediction with u's time
    # sampling is 8.2x (2.0x with its own). Each prediction gets the settings that serve it best, u the larger
    # budget: the dimension study is then, if anything, kind to u.
    u_overrides: dict = field(default_factory=lambda: dict(
        embed_t=True, tr_uniform=1.0, time_region="boundaries", data_proportion=0.25, norm_p=0.5))
    u_lr_factor: float = 1 / 3  # u-prediction's lr = lr * this (quick: 1e-3)
    u_steps_factor: float = 2.0  # u-prediction's steps = steps * this (quick: 5000)

    def for_prediction(self, prediction: str) -> "ToyConfig":
        """This config with ``u_overrides`` and the u factors applied when ``prediction == "u"``."""
        if prediction != "u":
            return self
        scaled = dict(lr=self.lr * self.u_lr_factor, steps=round(self.steps * self.u_steps_factor))
        return replace(self, **{**scaled, **self.u_overrides}, u_overrides={}, u_lr_factor=1.0, u_steps_factor=1.0)

    def objective(self) -> ObjectiveConfig:
        return ObjectiveConfig(P_mean=self.P_mean, P_std=self.P_std, data_proportion=self.data_proportion,
                               time_region=self.time_region, tr_uniform=self.tr_uniform,
                               tangent=self.tangent, norm_p=self.norm_p,
                               noise_scale=self.noise_scale, guidance=False,
                               class_drop=0.1 if self.conditional else 0.0, use_v_head=self.use_v_head)


PRESETS = {
    "quick": ToyConfig(),
    "paper": ToyConfig(steps=10000, batch_size=256, lr=2e-3, num_samples=5000),  # ~8x the compute of "quick"
}


def _lr_factor(step: int, cfg: ToyConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr_min_frac + (1 - cfg.lr_min_frac) * 0.5 * (1 + math.cos(math.pi * p))


def build_toy_model(dim: int, prediction: str, cfg: ToyConfig, num_classes: int = 0, seed: int = 0) -> ToyMLP:
    cfg = cfg.for_prediction(prediction)
    torch.manual_seed(seed)
    return ToyMLP(dim, cfg.hidden, cfg.depth, num_classes=num_classes, prediction=prediction,
                  v_head=cfg.use_v_head, embed_t=cfg.embed_t, num_freqs=cfg.num_freqs, noise_scale=cfg.noise_scale)


def train_toy(dim: int, prediction: str, cfg: ToyConfig, dataset: str = "swiss_roll", seed: int = 0,
              log_every: int = 0):
    """Train one toy model with :func:`pmf.method.objective.pmf_loss` and Adam. Returns (net, P, history) where history
    is a list of per-step dicts {loss, loss_u, loss_v}: ``loss`` the adaptively weighted objective, ``loss_u`` /
    ``loss_v``
    the raw per-coordinate MSEs of V and v against the target."""
    cfg = cfg.for_prediction(prediction)
    ds = get_dataset(dataset)
    num_classes = ds.num_classes if cfg.conditional else 0
    P = embedding_matrix(dim, seed)
    net = build_toy_model(dim, prediction, cfg, num_classes, seed)
    obj = cfg.objective()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, cfg.adam_b2))
    g = torch.Generator().manual_seed(seed)
    ema = copy.deepcopy(net).requires_grad_(False) if cfg.ema > 0 else None
    history = []
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg)
        x2, labels = ds.sample(cfg.batch_size, g)
        loss, m = pmf_loss(net, embed(x2, P), labels if cfg.conditional else None, obj, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for pe, pn in zip(ema.parameters(), net.parameters()):
                    pe.lerp_(pn, 1 - cfg.ema)
        history.append({k: float(v) for k, v in m.items()})
        if log_every and (step % log_every == 0 or step == cfg.steps - 1):
            print(f"  [{prediction}-pred D={dim}] step {step:5d} " +
                  " ".join(f"{k}={v:.4f}" for k, v in history[-1].items()), flush=True)
    return (ema if ema is not None else net), P, history


@torch.no_grad()
def sample_toy(net: ToyMLP, P: torch.Tensor, n: int, seed: int = 0, labels=None, noise_scale: float = 1.0):
    """n 1-NFE samples with :func:`pmf.method.sampler.sample` (num_steps=1). Returns (x_D (n, D), x_2 (n, 2))."""
    g = torch.Generator().manual_seed(20_000 + int(seed))
    noise = noise_scale * torch.randn(n, P.shape[0], generator=g)
    y = torch.full((n,), net.num_classes, dtype=torch.long) if labels is None else labels
    xD = sample(net, noise, y, num_steps=1)
    return xD, project(xD, P)


def true_samples(dataset: str, n: int, seed: int):
    """Two independent held-out true sets (n, 2) (and the first one's labels); training never sees these seeds."""
    ds = get_dataset(dataset)
    a, la = ds.sample(n, torch.Generator().manual_seed(30_000 + int(seed)))
    b, _ = ds.sample(n, torch.Generator().manual_seed(40_000 + int(seed)))
    return a, la, b


# ----------------------------------------------------------------------------------------------------------------
# The study


def _plot(records, samples, truth, dims, predictions, path: Path, dataset: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(predictions), len(dims), figsize=(3.0 * len(dims), 3.1 * len(predictions)),
                             squeeze=False)
    lim = float(np.abs(truth).max()) * 1.3
    for i, pred in enumerate(predictions):
        for j, D in enumerate(dims):
            ax = axes[i][j]
            rec = next(r for r in records if r["dim"] == D and r["prediction"] == pred)
            ax.scatter(truth[:, 0], truth[:, 1], s=2, c="0.8", lw=0)
            s = samples[(pred, D)]
            ax.scatter(s[:, 0], s[:, 1], s=2, c="tab:blue" if pred == "x" else "tab:red", lw=0, alpha=0.7)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{pred}-pred, D={D}\nSW2 {rec['distance']:.3f} ({rec['distance'] / rec['floor']:.1f}x floor)",
                         fontsize=9)
    noise = records[0]["noise_distance"]
    fig.suptitle(f"pMF toy ({dataset}): 1-NFE samples projected to 2-D (grey: held-out data). Sliced W2 floor "
                 f"{records[0]['floor']:.3f}; the prior itself scores {noise:.3f} ({noise / records[0]['floor']:.1f}x)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_toy(out_dir, preset: str = "quick", dims=(2, 8, 16, 512), predictions=("x", "u"),
            dataset: str = "swiss_roll", seed: int = 0, steps: int | None = None, verbose: bool = True,
            config: ToyConfig | None = None) -> list[dict]:
    """Train and evaluate the grid predictions x dims; write toy.png, metrics.json (a list of records),
    config.json, samples_<pred>_<D>.npy and true_heldout.npy into out_dir. Returns the metric records."""
    cfg = config if config is not None else PRESETS[preset]
    if steps is not None:
        cfg = replace(cfg, steps=int(steps))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    truth, truth_labels, truth2 = true_samples(dataset, cfg.num_samples, seed)
    floor = sliced_w2(truth, truth2)
    nn_floor = nn_distance(truth2, truth)
    prior = cfg.noise_scale * torch.randn(cfg.num_samples, 2, generator=torch.Generator().manual_seed(50_000 + seed))
    noise_distance = sliced_w2(prior, truth)  # the 2-D projection of the prior itself: "learned nothing"
    np.save(out / "true_heldout.npy", truth.numpy())
    records, samples = [], {}
    for pred in predictions:
        for D in dims:
            t0 = time.perf_counter()
            net, P, hist = train_toy(D, pred, cfg, dataset, seed, log_every=cfg.steps // 4 if verbose else 0)
            train_s = time.perf_counter() - t0
            net.eval()
            xD, x2 = sample_toy(net, P, cfg.num_samples, seed, truth_labels if cfg.conditional else None,
                                cfg.noise_scale)
            tail = hist[-max(1, len(hist) // 10):]  # final_*: averaged over the last 10 % of steps
            rec = {
                "dim": D, "prediction": pred, "dataset": dataset, "seed": seed,
                "distance": sliced_w2(x2, truth), "floor": floor, "noise_distance": noise_distance,
                "nn_distance": nn_distance(x2, truth), "nn_floor": nn_floor,
                "off_manifold": off_manifold(xD, P),
                "final_loss": float(np.mean([h["loss_u"] for h in tail])),
                "final_loss_v": float(np.mean([h.get("loss_v", float("nan")) for h in tail])),
                "final_weighted_loss": float(np.mean([h["loss"] for h in tail])),
                "steps": len(hist), "batch_size": cfg.batch_size, "num_samples": cfg.num_samples,
                "seconds": time.perf_counter() - t0, "train_seconds": train_s,
            }
            rec["ratio"] = rec["distance"] / floor
            records.append(rec)
            samples[(pred, D)] = x2.numpy()
            np.save(out / f"samples_{pred}_{D}.npy", x2.numpy())
            if verbose:
                print(f"{pred}-pred D={D:4d}: SW2 {rec['distance']:.4f} (floor {floor:.4f}, {rec['ratio']:.2f}x) "
                      f"nn {rec['nn_distance']:.4f} (floor {nn_floor:.4f}) off-manifold {rec['off_manifold']:.4f} "
                      f"loss_u {rec['final_loss']:.4f} "
                      f"{rec['seconds']:.1f}s", flush=True)
    meta = {"preset": preset, "config": asdict(cfg), "objective": asdict(cfg.objective()), "dataset": dataset,
            "seed": seed, "metric": f"sliced W2 in 2-D, {NUM_DIRECTIONS} random directions (seed {_DIRECTION_SEED})",
            "final_loss": "raw MSE per coordinate of V vs target (loss_u), mean over the last 10% of steps"}
    (out / "metrics.json").write_text(json.dumps(records, indent=2))  # a list of records, one per (prediction, D)
    (out / "config.json").write_text(json.dumps(meta, indent=2))  # what produced them
    _plot(records, samples, truth.numpy(), list(dims), list(predictions), out / "toy.png", dataset)
    return records


def toy_cli(out, preset: str = "quick", dims=(2, 8, 16, 512), dataset: str = "swiss_roll", seed: int = 0,
            steps: int | None = None) -> list[dict]:
    """Run the study and print the table."""
    records = run_toy(out, preset, tuple(int(d) for d in dims), dataset=dataset, seed=seed, steps=steps)
    print(f"{'dim':>5} {'pred':>4} {'distance':>9} {'floor':>7} {'ratio':>6} {'nn_dist':>8} {'off_manifold':>12} "
          f"{'final_loss':>10}")
    for r in records:
        print(f"{r['dim']:5d} {r['prediction']:>4} {r['distance']:9.4f} {r['floor']:7.4f} {r['ratio']:6.2f} "
              f"{r['nn_distance']:8.4f} {r['off_manifold']:12.4f} {r['final_loss']:10.4f}")
    print(f"prior noise projected to 2-D: distance {records[0]['noise_distance']:.4f}; nn floor {records[0]['nn_floor']:.4f}")
    print(f"wrote {Path(out) / 'toy.png'} and {Path(out) / 'metrics.json'}")
    return records
