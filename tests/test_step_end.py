"""The end of a training step (pmf.train.step_end, pmf.train.loop.train_step): one host read of the device per
step, counted on the meta device (every read of a meta tensor's value passes through a counting TorchFunctionMode),
one reduction, and the gradient norm and clipping of it against torch.nn.utils.clip_grad_norm_."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from pmf.method.model import PMFDiT
from pmf.train import step_end
from pmf.train.config import load_config, model_kwargs
from pmf.train.loop import train_step
from pmf.train.optim import build_optimizer
from pmf.train.step_end import end_of_step

HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__bool__,
              torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy}


class CountHostReads(TorchFunctionMode):
    """Counts reads of a meta tensor's value on the host (on a GPU: a synchronisation each), answering each with
    zeros of its shape so the step runs on."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS and isinstance(args[0], torch.Tensor) and args[0].device.type == "meta":
            self.reads.append(func.__name__)
            return func(torch.zeros(args[0].shape, dtype=args[0].dtype), *args[1:], **kwargs)
        return func(*args, **kwargs)


@pytest.mark.parametrize("sets", [["train.accum_steps=2"], ["train.accum_steps=1", "train.grad_clip=1.0"]])
def test_a_step_reads_the_device_once(sets, monkeypatch):
    """train_step of tiny-test with its network, batch and gradients on the meta device: the micro-batches, the
    gradient norm, clipping, the metrics and the end-of-step flags read the device once in all (one ``tolist``),
    after one reduction (a no-op in one process; its call is counted)."""
    real = torch.autocast  # autocast has no meta backend; the attention's autocast-off region asks for one
    monkeypatch.setattr(torch, "autocast", lambda device_type, *a, **k: real(
        "cpu" if device_type == "meta" else device_type, *a, **k))
    cfg = load_config("tiny-test", overrides=["train.device=cpu", *sets])
    with torch.device("meta"):
        net = PMFDiT(**model_kwargs(cfg))
    opt = build_optimizer(net, cfg.optim)
    images, labels = torch.zeros(8, 1, 28, 28, dtype=torch.uint8), torch.arange(8) % 10
    reductions = []
    real_reduce = step_end.dist.all_reduce_sum_
    monkeypatch.setattr(step_end.dist, "all_reduce_sum_", lambda t: reductions.append(t.numel()) or real_reduce(t))
    with CountHostReads() as counter:
        res = train_step(net, opt, images, labels, cfg, 0, torch.device("meta"), end_flags=lambda: (False, True))
    assert counter.reads == ["tolist"], counter.reads
    # one reduction: the metrics, ||g||^2, the missing-gradient count and the two flags
    assert reductions == [len(res.metrics) + 2 + 2], reductions
    assert set(res.metrics) >= {"loss", "loss_u"} and len(res.flags) == 2


@pytest.mark.parametrize("max_norm", [0.0, 0.5, 1e3])
def test_grad_norm_and_clipping_equal_torch(max_norm):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((7, 5), (5,), (3, 2, 2))]
    for p in params:
        p.grad = torch.randn_like(p)
    want = [p.grad.clone() for p in params]
    norm = torch.cat([w.flatten() for w in want]).double().norm()
    if max_norm > 0:
        ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for r, w in zip(ref, want):
            r.grad = w.clone()
        torch.nn.utils.clip_grad_norm_(ref, max_norm)
        want = [r.grad for r in ref]
    end = end_of_step(params, {"loss": torch.tensor(2.0), "x": 3.0}, (True, False), 0, torch.device("cpu"), max_norm)
    assert end.grad_norm == pytest.approx(float(norm), rel=1e-6)
    assert end.metrics == {"loss": 2.0, "x": 3.0} and end.flags == (True, False) and end.missing_gradients == 0
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w, rtol=1e-6, atol=0)
