"""pmf.method.rng: SplitMix64 against a pure-Python computation and its published first output, keyed_normal as its
Box-Muller transform, distribution and per-seed independence, and the host seed mixer."""

import math

import torch
from scipy import stats

from pmf.method import rng

F64 = torch.float64
KS_P = 1e-3  # KS tolerance: with the fixed seeds below every p-value must exceed this


def _splitmix64_py(z: int) -> int:
    """SplitMix64's output function on Python integers (mod 2^64): the independent truth for rng.splitmix64."""
    m = (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_keyed_normal_is_splitmix64_box_muller():
    """keyed_normal against a pure-Python computation: word n of sample i is mix(mix(seed_i ^ "noise") + (n + 1)
    gamma) (SplitMix64, mod 2^64; this also checks that int64 tensor arithmetic wraps here), and element 2n, 2n + 1
    are the Box-Muller pair of its top two 24-bit fields. Also SplitMix64's published first output for seed 0
    (0xE220A8397B1DCDAF)."""
    m = (1 << 64) - 1
    assert _splitmix64_py((0 + 0x9E3779B97F4A7C15) & m) == 0xE220A8397B1DCDAF
    z = torch.tensor([1, -1, 2**62, -(2**63)], dtype=torch.long)
    got = [v & m for v in rng.splitmix64(z).tolist()]
    assert got == [_splitmix64_py(v & m) for v in z.tolist()]

    seeds = [0, 12345, 2**63 - 1]
    e = rng.keyed_normal(seeds, (1, 3, 3), "cpu", F64)
    assert e.shape == (3, 1, 3, 3)
    for i, s in enumerate(seeds):
        key = _splitmix64_py(s ^ 0x6E6F697365)
        for n in range(5):  # 9 values: 5 words, the last one's second normal unused
            w = _splitmix64_py((key + (n + 1) * 0x9E3779B97F4A7C15) & m)
            u1, u2 = ((w >> 40) + 0.5) * 2.0**-24, ((w >> 16) & 0xFFFFFF) * 2.0**-24
            rad = math.sqrt(-2 * math.log(u1))
            for k, val in enumerate((rad * math.cos(2 * math.pi * u2), rad * math.sin(2 * math.pi * u2))):
                if 2 * n + k < 9:
                    assert abs(e[i].flatten()[2 * n + k].item() - val) < 2e-6 * max(1.0, abs(val))


def test_keyed_normal_distribution_and_independence():
    """Standard normal (KS p > 1e-3 over 200 x 256 values, and per-column means of the first two elements across
    4000 seeds within 4 standard errors); row i depends on seeds[i] only (another batch around it, another
    position: the same values); neighbouring seeds are uncorrelated (|corr| < 4 / sqrt(n))."""
    e = rng.keyed_normal(list(range(200)), (256,), "cpu")
    assert stats.kstest(e.flatten().double().numpy(), "norm").pvalue > KS_P
    col = rng.keyed_normal(list(range(1000, 5000)), (2,), "cpu").double()
    assert (col.mean(0).abs() < 4 / math.sqrt(4000)).all()
    again = rng.keyed_normal([7, 3, 150], (256,), "cpu")
    assert torch.equal(again[1], e[3]) and torch.equal(again[2], e[150]) and torch.equal(again[0], e[7])
    a, b = e[:-1].flatten().double(), e[1:].flatten().double()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 4 / math.sqrt(a.numel())


def test_mix_seeds_is_word_one_of_the_stream():
    """mix_seeds(x) = SplitMix64's first output for state x (mix(x + gamma)) with the top bit cleared, on Python
    integers; any batch of inputs gives each the same seed."""
    m = (1 << 64) - 1
    xs = [0, 1, 2**63 - 1, 2**64 - 1, 0x5EED_C409 ^ 12345]
    want = [_splitmix64_py((x + 0x9E3779B97F4A7C15) & m) & ((1 << 63) - 1) for x in xs]
    assert rng.mix_seeds(xs) == want
    assert want[0] == 0xE220A8397B1DCDAF & ((1 << 63) - 1)
    assert [rng.mix_seeds([x])[0] for x in reversed(xs)] == want[::-1]
