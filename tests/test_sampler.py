"""pmf.method.sampler: z_r = z_t - (t - r) u(z_t, r, t) (official `pmf.py`: `generate`): identity at t = r, the 1-NFE
output is the u-head's image output, N steps are N calls of `step` on linspace(1, 0, N + 1), the equivalent
interpolation form, per-sample
seeds independent of the batch, and the guidance-range warning."""

import warnings

import pytest
import torch

from pmf.method.model import Block, FinalLayer, build_model
from pmf.method.rng import keyed_normal
from pmf.method.sampler import noise_batches, noise_from_seeds, sample, step

F64 = torch.float64


@pytest.fixture(scope="module")
def net():
    """pMF-tiny in float64, zero-initialised gates / final layers perturbed so x_theta is a non-trivial function."""
    torch.manual_seed(0)
    m = build_model("pMF-tiny").double().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, Block):
                for p in (mod.attn_scale, mod.mlp_scale):
                    p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=F64))
            elif isinstance(mod, FinalLayer):
                for p in (mod.linear.weight, mod.linear.bias):
                    p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=F64))
    return m


def _noise(seed=0, B=3):
    return torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _x_theta(net, z, t, r, y, omega=2.0, t_min=0.0, t_max=1.0):
    """The u-head's raw image output x_theta(z_t, r, t) = head_u(trunk(z, t, h = t - r, ...)), conditions rounded to
    float32 as the sampler passes them."""
    B = z.shape[0]

    def full(v):
        return torch.full((B,), float(v), dtype=torch.float32).double()

    s = net.trunk(z, full(t), (full(t).float() - full(r).float()).double(), full(omega), full(t_min), full(t_max), y)
    return net.head(s, "u")


Y = torch.tensor([0, 2, 3])  # 3 = num_classes: the null class


def test_step_with_t_equal_r_is_identity(net):
    """z_r = z_t - (t - r) u = z_t exactly when r = t (for any t, including t < 0.05)."""
    z = _noise()
    for t in (1.0, 0.5, 0.02):
        assert torch.equal(step(net, z, t, t, Y, omega=2.0), z)


def test_one_step_returns_x_head_output(net):
    """1-NFE (t = 1, r = 0): z_0 = z_1 - u(z_1, 0, 1) = z_1 - (z_1 - x_theta) / 1 = x_theta(z_1), the u-head's image
    output at t = 1, h = 1; `sample` with one step gives the same."""
    z1 = _noise(1)
    x = _x_theta(net, z1, 1.0, 0.0, Y, omega=2.0, t_min=0.1, t_max=0.7)
    assert x.abs().max() > 0.1  # non-trivial network
    out = step(net, z1, 1.0, 0.0, Y, omega=2.0, t_min=0.1, t_max=0.7)
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sample(net, z1, Y, 1, omega=2.0, t_min=0.1, t_max=0.7), x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("num_steps", [2, 3])
def test_n_steps_equal_n_calls_of_step(net, num_steps):
    """sample(N) == step applied N times on the grid linspace(1, 0, N + 1) (bit-identical); the network is called N
    times, u-head only, with t = t_k = 1 - k/N and h = 1/N (to float32 rounding)."""
    z = _noise(2)
    calls = []
    hook = net.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((args[1].clone(), args[2].clone(), kwargs.get("heads"))),
        with_kwargs=True)
    try:
        got = sample(net, z, Y, num_steps, omega=2.0)
    finally:
        hook.remove()
    grid = torch.linspace(1, 0, num_steps + 1)
    manual = z
    for k in range(num_steps):
        manual = step(net, manual, grid[k], grid[k + 1], Y, omega=2.0)
    assert torch.equal(got, manual)
    ts = [1 - k / num_steps for k in range(num_steps + 1)]
    assert len(calls) == num_steps
    for k, (t, h, heads) in enumerate(calls):
        torch.testing.assert_close(t.double(), torch.full((3,), ts[k], dtype=F64), rtol=0, atol=1e-6)
        torch.testing.assert_close(h.double(), torch.full((3,), 1 / num_steps, dtype=F64), rtol=0, atol=1e-6)
        assert heads == "u"


@pytest.mark.parametrize("t,r", [(1.0, 0.5), (0.8, 0.3), (0.5, 0.1), (0.3, 0.29), (0.05, 0.0)])
def test_step_interpolation_form(net, t, r):
    """For t >= 0.05, u = (z_t - x_theta)/t, so z_r = z_t - (t - r) u = (r/t) z_t + (1 - r/t) x_theta(z_t, r, t)."""
    z = _noise(3)
    x = _x_theta(net, z, t, r, Y)
    expected = (r / t) * z + (1 - r / t) * x
    torch.testing.assert_close(step(net, z, t, r, Y, omega=2.0), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_steps", [1, 4])
def test_instantaneous_sampler_is_euler_on_v(net, num_steps):
    """instantaneous=True: each step is z_r = z_t - (t - r) v(z_t, t) with v = u(z_t, t, t), the u-head at h = 0:
    the flow-matching Euler sampler, here written out with x_theta at r = t, (z - x_theta) / t."""
    z = _noise(4)
    grid = torch.linspace(1, 0, num_steps + 1).tolist()
    manual = z
    for t, r in zip(grid[:-1], grid[1:]):
        v = (manual - _x_theta(net, manual, t, t, Y)) / t
        manual = manual - (t - r) * v
    got = sample(net, z, Y, num_steps, omega=2.0, instantaneous=True)
    torch.testing.assert_close(got, manual, rtol=1e-6, atol=1e-6)
    assert (got - sample(net, z, Y, num_steps, omega=2.0)).abs().max() > 1e-3  # h = 0 changes the output


def test_per_sample_seeds_independent_of_batch(net):
    """noise_from_seeds draws sample i as keyed_normal of seed_i alone: the noise (and the sampled image) for a seed
    does not depend on batch size, position, or the other seeds; noise_scale multiplies it."""
    shape = (1, 8, 8)
    ref = {s: keyed_normal([s], shape, "cpu")[0] for s in (3, 7, 11)}
    batches = [[3, 7, 11], [11, 3], [7], [3, 3, 7, 11]]
    labels = {3: 0, 7: 1, 11: 3}
    images = {}
    for seeds in batches:
        noise = noise_from_seeds(seeds, shape, noise_scale=2.0)
        assert noise.shape == (len(seeds), *shape)
        for i, s in enumerate(seeds):
            assert torch.equal(noise[i], 2.0 * ref[s])
        y = torch.tensor([labels[s] for s in seeds])
        out = sample(net, noise.double(), y, num_steps=2, omega=2.0)
        for i, s in enumerate(seeds):
            images.setdefault(s, []).append(out[i])
    assert not torch.allclose(images[3][0], images[7][0])
    for s, imgs in images.items():
        for img in imgs[1:]:
            torch.testing.assert_close(img, imgs[0], rtol=1e-10, atol=1e-10)


def test_guidance_range_warning(net):
    """omega > net.omega_max (and omega < 1) warns that the model extrapolates; omega in [1, omega_max] does not."""
    z = _noise(4, B=1)
    y = Y[:1]
    with pytest.warns(UserWarning, match="omega"):
        sample(net, z, y, 1, omega=net.omega_max + 0.5)
    with pytest.warns(UserWarning, match="omega"):
        sample(net, z, y, 1, omega=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for w in (1.0, 2.0, net.omega_max):
            sample(net, z, y, 1, omega=w)


def test_num_steps_zero_raises(net):
    with pytest.raises(ValueError):
        sample(net, _noise(), Y, num_steps=0)


def test_noise_batches_equal_noise_from_seeds():
    """noise_batches yields, batch by batch, what noise_from_seeds gives for all the seeds at once."""
    seeds = [11, 3, 10**7 + 5, 42, 7, 8, 9, 1234567]
    whole = noise_from_seeds(seeds, (3, 4, 4), 2.0)
    batches = list(noise_batches([seeds[:3], seeds[3:5], seeds[5:]], (3, 4, 4), 2.0))
    assert torch.equal(torch.cat(batches), whole) and [b.shape[0] for b in batches] == [3, 2, 3]


def test_sampler_settings_resolve_meta_and_fit_every_sampling_entry_point():
    """SamplerSettings: the checkpoint's recommendations, each overridden where given (noise scale: meta, then the
    network's own); its field names are keywords of every function that samples, so one object serves them all."""
    import inspect

    from pmf.eval.fmnist import fmnist_metrics
    from pmf.eval.generate import evaluate_generator, generate
    from pmf.method.sampler import SamplerSettings, sample

    meta = {"omega": 3.0, "t_min": 0.1, "t_max": 0.7, "noise_scale": 2.0}
    assert SamplerSettings.from_meta(meta) == SamplerSettings(3.0, 0.1, 0.7, 2.0, False)
    got = SamplerSettings.from_meta(meta, omega=1.5, interval=(0.2, 0.9), instantaneous=True)
    assert got == SamplerSettings(1.5, 0.2, 0.9, 2.0, True)

    class Net:
        noise_scale = 4.0

    assert SamplerSettings.from_meta({}, net=Net()) == SamplerSettings(1.0, 0.0, 1.0, 4.0, False)
    assert SamplerSettings.from_meta({}) == SamplerSettings()
    names = set(SamplerSettings().kwargs())
    for fn in (generate, evaluate_generator, fmnist_metrics):
        assert names <= set(inspect.signature(fn).parameters), fn.__name__
    assert names - {"noise_scale"} <= set(inspect.signature(sample).parameters)  # the caller scales the noise
