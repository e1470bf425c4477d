"""Activation checkpointing (``train.activation_checkpointing``, :meth:`pmf.method.model.PMFDiT.run_blocks`): the same
loss and parameter gradients as the plain forward, through both JVP paths of ``pmf_loss`` (the lean forward-mode
dual numbers and ``torch.func.jvp``), and less memory kept for the backward."""

import pytest
import torch

from pmf.method.model import build_model
from pmf.method.objective import ObjectiveConfig, pmf_loss
from pmf.train.plan import loss_saved_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


def _perturbed_tiny(seed=0):
    torch.manual_seed(seed)
    net = build_model("pMF-tiny")
    with torch.no_grad():  # zero-init gates and final layers would hide most of the network from the gradients
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net


def _grads(net, impl, checkpointing):
    net.activation_checkpointing = checkpointing
    net.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(8, 1, 8, 8, generator=gen) * 2 - 1
    y = torch.randint(0, 3, (8,), generator=gen)
    loss, _ = pmf_loss(net, x, y, ObjectiveConfig(impl=impl), torch.Generator().manual_seed(2))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("impl", ["lean", "reference"])
def test_checkpointing_gives_the_same_gradients(impl):
    """fp32, every parameter's gradient within 1e-6 relative (to its tensor's largest entry), both JVP paths."""
    net = _perturbed_tiny()
    loss0, g0 = _grads(net, impl, False)
    loss1, g1 = _grads(net, impl, True)
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys() and len(g0) > 20
    for name in g0:
        scale = g0[name].abs().max().clamp_min(1e-12)
        assert ((g0[name] - g1[name]).abs().max() / scale) <= 1e-6, name
    # the block parameters really received gradients (the comparison is not between zeros)
    assert g0["shared_blocks.0.mlp.w1.weight"].abs().max() > 0 and g0["v_heads.0.attn.q_proj.weight"].abs().max() > 0


def test_checkpointing_keeps_less_for_the_backward():
    """Saved-tensor bytes of the lean loss: a checkpointed block keeps only its input."""
    net = build_model("pMF-tiny", hidden_size=64, depth=6, aux_head_depth=2)
    plain = loss_saved_bytes(net, ObjectiveConfig(), 8)
    net.activation_checkpointing = True
    assert loss_saved_bytes(net, ObjectiveConfig(), 8) < 0.5 * plain


def test_checkpointing_is_off_without_gradients():
    """Sampling (no_grad) runs the plain blocks: identical outputs either way."""
    net = _perturbed_tiny()
    z = torch.randn(4, 1, 8, 8)
    args = (torch.ones(4), torch.ones(4), torch.full((4,), 2.0), torch.zeros(4), torch.ones(4), torch.arange(4) % 3)
    with torch.no_grad():
        u0, _ = net(z, *args)
        net.activation_checkpointing = True
        u1, _ = net(z, *args)
    assert torch.equal(u0, u1)
