"""bf16 autocast numerics of the pMF step on the CPU, against float64 (the independent truth), and a short bf16
training run against fp32. Tolerances (stated here and in docs/scale-out.md):

- du/dt (the JVP through the network, attention tangent in its centred form): relative L2 error <= 2e-2
  (measured 3.2e-3 on this model; bf16 keeps 8 bits of mantissa, 2^-8 = 3.9e-3);
- parameter gradients of ``pmf_loss``: cosine to float64 >= 0.999 (measured 0.99999) and relative L2 error <= 5e-2
  (measured 4.1e-3);
- fp32 is checked the same way at 1e-5 / 1 - 1e-9, so the comparison itself is sound.
"""

import dataclasses

import pytest
import torch

from pmf.method.model import build_model
from pmf.method.objective import Draws, ObjectiveConfig, pmf_loss, sample_draws
from pmf.train.precision import autocast_context

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(hidden_size=64, depth=4, aux_head_depth=1, num_heads=4, input_size=16, patch_size=4, in_channels=3,
          num_classes=10)
B = 16


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    net = build_model("pMF-tiny", **KW)
    with torch.no_grad():  # away from the zero-init gates / final layers, so every block contributes
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    net64 = build_model("pMF-tiny", **KW).double()
    net64.load_state_dict(net.state_dict())
    return net, net64


def _inputs():
    g = torch.Generator().manual_seed(0)
    z, v = torch.randn(B, 3, 16, 16, generator=g), torch.randn(B, 3, 16, 16, generator=g)
    t = torch.rand(B, generator=g) * 0.9 + 0.1
    r = t * torch.rand(B, generator=g)
    y = torch.randint(0, 10, (B,), generator=g)
    return z, v, t, r, y


def _dudt(net, precision, dtype):
    z, v, t, r, y = (a.to(dtype) if a.is_floating_point() else a for a in _inputs())
    w, lo, hi = torch.full_like(t, 3.0), torch.zeros_like(t), torch.ones_like(t)

    def u_fn(z_, t_, r_):
        return net(z_, t_, t_ - r_, w, lo, hi, y, heads="u")[0]

    with autocast_context("cpu", precision):
        _, dudt = torch.func.jvp(u_fn, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    return dudt.double()


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_dudt_against_float64(nets, precision, tol):
    net, net64 = nets
    ref = _dudt(net64, None, torch.float64)
    err = ((_dudt(net, precision, torch.float32) - ref).norm() / ref.norm()).item()
    assert err <= tol, err


def _loss_grads(net, precision, draws, x, y):
    net.zero_grad(set_to_none=True)
    with autocast_context("cpu", precision):
        loss, _ = pmf_loss(net, x, y, ObjectiveConfig(), draws=draws)  # default objective: lean path, guidance
    loss.backward()
    return torch.cat([p.grad.flatten().double() for p in net.parameters() if p.grad is not None])


@pytest.mark.parametrize("precision,min_cos,max_rel", [("fp32", 1 - 1e-9, 1e-5), ("bf16", 0.999, 5e-2)])
def test_pmf_loss_gradients_against_float64(nets, precision, min_cos, max_rel):
    net, net64 = nets
    g = torch.Generator().manual_seed(1)
    x = torch.rand(B, 3, 16, 16, generator=g) * 2 - 1
    y = torch.randint(0, 10, (B,), generator=g)
    d = sample_draws(x, y, ObjectiveConfig(), torch.Generator().manual_seed(3))
    d64 = Draws(**{f.name: getattr(d, f.name).double() if getattr(d, f.name).is_floating_point()
                   else getattr(d, f.name) for f in dataclasses.fields(d)})
    ref = _loss_grads(net64, None, d64, x.double(), y)
    got = _loss_grads(net, precision, d, x, y)
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=0).item()
    rel = ((got - ref).norm() / ref.norm()).item()
    assert cos >= min_cos and rel <= max_rel, (cos, rel)


def _short_run(precision, steps=40):
    """Adam on pMF-tiny, synthetic class-structured 8x8 images (class c: a bright row c); same seeds for both
    precisions. Returns the per-step flow-matching losses loss_u."""
    torch.manual_seed(0)
    net = build_model("pMF-tiny")
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    cfg = ObjectiveConfig()
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        y = torch.randint(0, 3, (32,), generator=g)
        x = -torch.ones(32, 1, 8, 8)
        x[torch.arange(32), 0, 2 * y + 1] = 1.0
        x = x + 0.1 * torch.randn(x.shape, generator=g)
        with autocast_context("cpu", precision):
            loss, metrics = pmf_loss(net, x, y, cfg, torch.Generator().manual_seed(1000 + step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(metrics["loss_u"]))
    return torch.tensor(losses)


def test_bf16_training_tracks_fp32():
    """The bf16 loss curve follows fp32's: both fall by more than half, and the mean over each block of 10 steps
    agrees within 5 %."""
    fp32, bf16 = _short_run("fp32"), _short_run("bf16")
    assert fp32[-10:].mean() < 0.5 * fp32[:5].mean() and bf16[-10:].mean() < 0.5 * bf16[:5].mean()
    blocks32, blocks16 = fp32.view(-1, 10).mean(1), bf16.view(-1, 10).mean(1)
    assert ((blocks16 - blocks32).abs() / blocks32).max() < 0.05, (blocks32, blocks16)  # measured: 0.1 %
