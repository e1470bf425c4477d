"""Keyed per-sample randomness: every draw of sample i is a function of its seed alone, so results do not depend on
batch size, position, device or process count (EDM2's ``StackedRandomGenerator``, made counter-based).

* :class:`PerSampleGenerator`: the training step's draws (times, guidance, dropout, perceptual crops from host
  generators; the noise from :func:`keyed_normal`).
* :func:`keyed_normal`: standard normals keyed by the seed, for a whole batch in one set of kernels on its device:
  the objective's noise e and the sampler's z_1.
* :func:`mix_seeds`: host integers -> well-mixed 63-bit seeds for ``torch.Generator.manual_seed`` (the crop streams).

All of it is SplitMix64 (Steele, Lea, Flood 2014; the finaliser is Stafford's "Mix13"): word n of the stream with key
k is mix(k + n gamma). int64 tensors wrap modulo 2^64 like the unsigned arithmetic it is defined with; >> on int64 is
arithmetic, so each shift masks off the sign-extended bits.
"""

from __future__ import annotations

import math

import torch

GAMMA, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
MASK64 = (1 << 64) - 1
NOISE_STREAM = 0x6E6F697365  # "noise": the key of the noise stream is mix(seed ^ this), apart from other uses of seed


def _signed(c: int) -> int:
    """A uint64 value as the int64 with the same bits."""
    c &= MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    return (z >> k) & ((1 << (64 - k)) - 1)  # logical right shift of a 64-bit word held in int64


def splitmix64(z: torch.Tensor) -> torch.Tensor:
    """The SplitMix64 output function on int64 tensors (bit pattern of the uint64 result)."""
    z = (z ^ _shr(z, 30)) * _signed(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed(_MIX2)
    return z ^ _shr(z, 31)


def mix_seeds(xs) -> list[int]:
    """Host integers -> 63-bit seeds: word 1 of the SplitMix64 stream keyed x, mix(x + gamma), top bit cleared."""
    words = splitmix64(torch.tensor([_signed(int(x) + GAMMA) for x in xs], dtype=torch.long))
    return [w & ((1 << 63) - 1) for w in words.tolist()]


def keyed_normal(seeds, shape, device, dtype=torch.float32) -> torch.Tensor:
    """(B, *shape) standard normals; row i is a fixed function of ``seeds[i]`` alone (any batch, any device kind
    gives it the same values up to rounding of log / cos). Box-Muller on two 24-bit uniforms per 64-bit SplitMix64
    word, u1 in (0, 1) so log u1 is finite: |e| <= 5.9, a tail mass of 4e-9 cut off."""
    n = math.prod(shape)
    words = (n + 1) // 2
    keys = splitmix64(torch.tensor([_signed(int(s) ^ NOISE_STREAM) for s in seeds], dtype=torch.long))
    keys = keys.to(device, non_blocking=True)  # a host -> device copy; nothing is read back
    counter = torch.arange(1, words + 1, device=device, dtype=torch.long) * _signed(GAMMA)
    w = splitmix64(keys[:, None] + counter[None, :])
    u1 = (_shr(w, 40).float() + 0.5) * 2.0**-24
    u2 = (_shr(w, 16) & 0xFFFFFF).float() * 2.0**-24
    radius, angle = torch.sqrt(-2.0 * torch.log(u1)), (2 * math.pi) * u2
    z = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=2).flatten(1)[:, :n]
    return z.reshape(len(seeds), *shape).to(dtype)


class PerSampleGenerator:
    """Per-sample random streams: sample i's draws depend only on ``seeds[i]`` (and, through the objective's
    ``fm_pattern``, on ``indices[i]``, its position in the global batch), so 1 process and N processes holding slices
    of the global batch draw the same values, and a step replays from (run seed, images seen).

    * the per-sample scalars (times, guidance scale and interval, dropout) come from ``generators[i]``, a host
      ``torch.Generator`` seeded with ``seeds[i]``: a few numbers per sample, drawn on the host, so everything derived
      from them (which rows need which network pass) is known on the host;
    * the noise e comes from :func:`keyed_normal`, keyed by the seed, for the whole batch on the batch's device.

    ``generators`` also serve other per-sample draws that follow (the perceptual crops)."""

    def __init__(self, seeds, indices=None):
        self.seeds = [int(s) % (2**63) for s in seeds]
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]
        self.indices = torch.arange(len(self.seeds)) if indices is None else torch.as_tensor(indices).cpu()
