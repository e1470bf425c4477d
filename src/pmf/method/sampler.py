"""Few-step sampling with an average-velocity network (pMF Sec. 6; official `pmf.py`: `generate`).

One step from time t to r < t: ``z_r = z_t - (t - r) * u(z_t, r, t)``, one network call, u-head only. With the time
grid ``linspace(1, 0, N + 1)`` this is the whole sampler for 1 and N steps alike; 1 step (t = 1, r = 0) returns
``z_1 - u = x_theta(z_1)``, the network's image output. Guidance costs no extra call: omega and the interval
[t_min, t_max] are network inputs.

The caller owns randomness: :func:`noise_from_seeds` draws each sample's noise from its own seed, so an image does
not depend on batch size or position.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch

from pmf.method.model import bcast
from pmf.method.rng import keyed_normal


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """How a network is sampled, apart from the number of steps: the guidance scale omega and interval
    [t_min, t_max] (network inputs), the noise scale of z_1, and the sampler (average-velocity steps, or Euler steps
    on the instantaneous velocity v = u(z, t, t)). Its fields are the keyword names of :func:`sample`,
    :func:`pmf.eval.generate.generate` / ``evaluate_generator`` and ``fmnist_metrics``: pass ``**settings.kwargs()``."""

    omega: float = 1.0
    t_min: float = 0.0
    t_max: float = 1.0
    noise_scale: float = 1.0
    instantaneous: bool = False

    @classmethod
    def from_meta(cls, meta: dict, omega: float | None = None, interval=None, instantaneous: bool = False,
                  net=None) -> "SamplerSettings":
        """A checkpoint's recommended settings (its ``meta``: omega, t_min, t_max, noise_scale), each overridden
        where given; the noise scale falls back to the network's own, then 1."""
        t_min, t_max = interval if interval is not None else (meta.get("t_min", 0.0), meta.get("t_max", 1.0))
        return cls(omega=float(omega if omega is not None else meta.get("omega", 1.0)), t_min=float(t_min),
                   t_max=float(t_max), noise_scale=float(meta.get("noise_scale", getattr(net, "noise_scale", 1.0))),
                   instantaneous=bool(instantaneous))

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)


def _per_sample(value, batch: int, ref: torch.Tensor) -> torch.Tensor:
    """Scalar or (B,) -> (B,) float tensor on ref's device."""
    return torch.as_tensor(value, dtype=torch.float32, device=ref.device).expand(batch).contiguous()


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def sampling_problems(omega=None, t_min=None, t_max=None, steps=None, num=None, prefix="--") -> list[str]:
    """Problems of sampling arguments (None = not given): omega finite, 0 <= t_min <= t_max <= 1, steps >= 1,
    num >= 1. ``prefix`` names them as command-line flags ("--") or config keys ("sample.")."""
    out = []
    if omega is not None and not _finite(omega):
        out.append(f"{prefix}omega={omega} must be a finite number (e.g. 1.0: no guidance)")
    if t_min is not None or t_max is not None:
        lo, hi = (0.0 if t_min is None else t_min), (1.0 if t_max is None else t_max)
        name = "--interval" if prefix == "--" else f"{prefix}t_min/{prefix}t_max"
        if not (_finite(lo) and _finite(hi) and 0.0 <= lo <= hi <= 1.0):
            out.append(f"{name} {lo} {hi} must satisfy 0 <= t_min <= t_max <= 1 (e.g. 0.1 0.7)")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        out.append(f"{prefix}steps={steps} must be >= 1")
    if num is not None and num < 1:
        out.append(f"{prefix}num={num} must be >= 1 (the number of samples)")
    return out


def noise_from_seeds(seeds, shape: tuple[int, ...], noise_scale: float = 1.0, device="cpu") -> torch.Tensor:
    """z_1 = noise_scale * N(0, I): (len(seeds), *shape), drawn on ``device``; sample i's noise is
    :func:`pmf.method.rng.keyed_normal` of seeds[i] alone (not of the batch, its position or the device kind)."""
    return keyed_normal(list(seeds), shape, device).mul_(noise_scale)


def noise_batches(seed_batches, shape: tuple[int, ...], noise_scale: float = 1.0, device="cpu"):
    """:func:`noise_from_seeds` of each seed list in ``seed_batches``, one batch at a time."""
    for seeds in seed_batches:
        yield noise_from_seeds(seeds, shape, noise_scale, device)


def step(net, z, t, r, y, omega=1.0, t_min=0.0, t_max=1.0, instantaneous: bool = False) -> torch.Tensor:
    """z_r = z_t - (t - r) u_theta(z_t, r, t | y, omega, t_min, t_max).  t, r: scalars or (B,).
    ``instantaneous``: use u_theta(z_t, t, t) = v (h = 0) instead, an Euler step of the flow-matching ODE."""
    B = z.shape[0]
    t, r = _per_sample(t, B, z), _per_sample(r, B, z)
    w, lo, hi = _per_sample(omega, B, z), _per_sample(t_min, B, z), _per_sample(t_max, B, z)
    h = torch.zeros_like(t) if instantaneous else t - r
    u, _ = net(z, t, h, w, lo, hi, y, heads="u")
    return z - bcast(t - r, z) * u


def check_omega(net, omega) -> None:
    """Warn when a guidance scale lies outside the range [1, omega_max] the model was trained with."""
    omega_max = getattr(net, "omega_max", None)
    w = torch.as_tensor(omega, dtype=torch.float32)
    if omega_max is not None and (w.max() > omega_max + 1e-6 or w.min() < 1.0):
        warnings.warn(
            f"guidance scale omega={w.max().item():g} lies outside the trained range [1, {omega_max:g}]: the model "
            "extrapolates (the official B/16 setting 8.5 does this knowingly)", stacklevel=3)


@torch.no_grad()
def sample(net, noise, y, num_steps: int = 1, omega=1.0, t_min=0.0, t_max=1.0,
           instantaneous: bool = False) -> torch.Tensor:
    """Integrate from t = 1 (noise) to t = 0 in ``num_steps`` equal steps; returns images (B, C, H, W) ~ [-1, 1].

    noise: z_1, already scaled by the noise scale (see :func:`noise_from_seeds`); y: (B,) labels, ``num_classes`` for
    unconditional. ``instantaneous``: Euler steps with the instantaneous velocity v = u(z_t, t, t) instead of the
    average velocity (a diagnostic: how good the learned flow-matching field is with many steps, and the sampler
    for a model trained with ``time_region="r_eq_t"``, whose u-head never saw h > 0).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    check_omega(net, omega)
    t_steps = torch.linspace(1.0, 0.0, num_steps + 1).tolist()
    z = noise
    for t, r in zip(t_steps[:-1], t_steps[1:]):
        z = step(net, z, t, r, y, omega, t_min, t_max, instantaneous)
    return z
