"""The default objective's step reads no device value on the host (issue: a step without host syncs).

On PyTorch's ``meta`` device tensors have shapes and no data: ``.item()``, ``bool(tensor)``, ``.tolist()``,
``.cpu()`` reads, ``nonzero`` and boolean-mask indexing all raise. So ``pmf_loss`` + ``backward()`` running end to end
with the network and the batch on ``meta`` shows that the step decides nothing from device values: every shape (the
lean rows included) is known on the host.
"""

import contextlib

import pytest
import torch

from pmf.method.model import build_model
from pmf.method.objective import ObjectiveConfig, pmf_loss
from pmf.method.rng import PerSampleGenerator

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture
def meta_autocast(monkeypatch):
    """``torch.autocast("meta", enabled=False)`` (pmf.method.attention's tangent rule turns autocast off) raises
    "unsupported
    scalarType" in torch 2.13: no autocast exists for meta. A no-op there; every other device keeps torch's."""
    real = torch.autocast

    def autocast(device_type, *args, **kwargs):
        return contextlib.nullcontext() if device_type == "meta" else real(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", autocast)


def _meta_net_and_batch(B=8):
    with torch.device("meta"):
        net = build_model("pMF-tiny")
    x = torch.empty(B, net.in_channels, net.input_size, net.input_size, device="meta")
    y = torch.zeros(B, dtype=torch.long, device="meta")
    return net, x, y


def test_meta_device_really_refuses_host_reads():
    """The premise: on meta, the host reads a sync would need raise."""
    t = torch.zeros(4, device="meta")
    for read in (lambda: t.sum().item(), lambda: bool(t.any()), lambda: t.tolist(), lambda: t.nonzero(),
                 lambda: t[t > 0], lambda: t.cpu().numpy()):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()


@pytest.mark.parametrize("impl", ["lean", "reference"])
def test_default_step_runs_on_meta(impl, meta_autocast):
    """pmf_loss (default objective: guidance, interval, class dropout, v-head; ``impl`` lean = the default, or
    reference) + backward on meta, with the training loop's PerSampleGenerator (host scalars, the lean rows planned
    on the host) and with the global generator (draws on the device: the lean plan without a split). Every
    parameter gets a gradient of its own shape."""
    net, x, y = _meta_net_and_batch()
    seeds, idx = list(range(100, 108)), torch.arange(8, 16)
    for gen in (PerSampleGenerator(seeds, idx), None):
        net.zero_grad(set_to_none=True)
        loss, metrics = pmf_loss(net, x, y, ObjectiveConfig(impl=impl), gen)
        assert loss.device.type == "meta" and loss.shape == ()
        assert set(metrics) == {"loss", "loss_u", "loss_v"}
        loss.backward()
        grads = [p.grad for p in net.parameters() if p.requires_grad]
        assert all(g is not None and g.device.type == "meta" for g in grads)
        assert all(g.shape == p.shape for g, p in zip(grads, (p for p in net.parameters() if p.requires_grad)))
