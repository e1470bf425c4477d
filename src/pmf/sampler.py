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
import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import torch


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


NOISE_THREADS = min(8, os.cpu_count() or 1)  # CPU threads drawing the per-sample noise of one batch


def _fill_noise(out: torch.Tensor, seeds, rows) -> None:
    """out[i] = N(0, I) from a CPU generator seeded with seeds[i], for i in rows (in place)."""
    for i in rows:
        torch.randn(out.shape[1:], generator=torch.Generator().manual_seed(int(seeds[i])), out=out[i])


def _noise_cpu(seeds, shape, noise_scale: float, pin: bool) -> torch.Tensor:
    seeds = list(seeds)
    out = torch.empty(len(seeds), *shape, pin_memory=pin)
    parts = min(NOISE_THREADS, len(seeds))
    if parts <= 1:
        _fill_noise(out, seeds, range(len(seeds)))
    else:  # rows are independent (one generator each); torch releases the GIL while it draws
        with ThreadPoolExecutor(parts) as pool:
            list(pool.map(lambda k: _fill_noise(out, seeds, range(k, len(seeds), parts)), range(parts)))
    return out.mul_(noise_scale)


def noise_from_seeds(seeds, shape: tuple[int, ...], noise_scale: float = 1.0, device="cpu") -> torch.Tensor:
    """z_1 = noise_scale * N(0, I), one CPU ``torch.Generator`` per sample seed: (len(seeds), *shape). Sample i's
    noise depends only on seeds[i] (not on the batch, the device or the number of threads drawing it); rows are
    drawn by up to :data:`NOISE_THREADS` threads."""
    cuda = torch.device(device).type == "cuda"
    return _noise_cpu(seeds, shape, noise_scale, pin=cuda).to(device, non_blocking=cuda)


def noise_batches(seed_batches, shape: tuple[int, ...], noise_scale: float = 1.0, device="cpu", ahead: int = 2):
    """Yield :func:`noise_from_seeds` of each seed list in ``seed_batches``, drawn in a background thread up to
    ``ahead`` batches before they are used, so the device samples one batch while the CPU draws the next (the
    draw is ~200 images/s per thread at 256 px). Same values as :func:`noise_from_seeds`."""
    cuda = torch.device(device).type == "cuda"
    batches = iter(seed_batches)
    with ThreadPoolExecutor(1) as worker:
        pending = deque(worker.submit(_noise_cpu, list(s), shape, noise_scale, cuda)
                        for s in islice(batches, max(1, ahead)))
        while pending:
            noise = pending.popleft().result()
            nxt = next(batches, None)
            if nxt is not None:
                pending.append(worker.submit(_noise_cpu, list(nxt), shape, noise_scale, cuda))
            yield noise.to(device, non_blocking=cuda)


def step(net, z, t, r, y, omega=1.0, t_min=0.0, t_max=1.0, instantaneous: bool = False) -> torch.Tensor:
    """z_r = z_t - (t - r) u_theta(z_t, r, t | y, omega, t_min, t_max).  t, r: scalars or (B,).
    ``instantaneous``: use u_theta(z_t, t, t) = v (h = 0) instead, an Euler step of the flow-matching ODE."""
    B = z.shape[0]
    t, r = _per_sample(t, B, z), _per_sample(r, B, z)
    w, lo, hi = _per_sample(omega, B, z), _per_sample(t_min, B, z), _per_sample(t_max, B, z)
    h = torch.zeros_like(t) if instantaneous else t - r
    u, _ = net(z, t, h, w, lo, hi, y, heads="u")
    return z - (t - r).view(-1, *([1] * (z.ndim - 1))) * u


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
