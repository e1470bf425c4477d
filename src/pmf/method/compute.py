"""Model compute: parameter counts and multiply-accumulates per forward (paper Sec. 6.3, Tab. 5-7).

The paper reports "Gflops" per forward of the generator as multiply-accumulates (one fused multiply-add = one flop,
the DiT convention) and counts only the generator: the auxiliary v-head is used in training only and is left out.
Here the count comes from the network's actual layers: the generator (built without its v-head) runs one forward on
PyTorch's ``meta`` device under ``torch.utils.flop_counter.FlopCounterMode``, which sees every matmul, convolution and
attention call with its shapes and no data, so even pMF-H/32 is counted in a second without memory.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from pmf.method.model import MODELS, PMFDiT

V_HEAD_PREFIXES = ("v_heads.", "v_final_layer.")  # parameters of the training-only auxiliary head


def _kwargs(model: str | dict) -> dict:
    if isinstance(model, str):
        if model not in MODELS:
            raise KeyError(f"unknown model {model!r}; registered sizes: {', '.join(MODELS)}")
        return dict(MODELS[model].kwargs)
    return dict(model)


def param_counts(net: PMFDiT) -> tuple[int, int]:
    """(generator parameters, training parameters): the generator leaves out the auxiliary v-head."""
    total = sum(p.numel() for p in net.parameters())
    v_head = sum(p.numel() for n, p in net.named_parameters() if n.startswith(V_HEAD_PREFIXES))
    return total - v_head, total


def macs_per_forward(model: str | dict, batch: int = 1) -> int:
    """Multiply-accumulates of one generator forward (u-head only) for ``batch`` images, counted on the meta device."""
    kwargs = _kwargs(model)
    kwargs["v_head"] = False
    with torch.device("meta"):
        net = PMFDiT(**kwargs)
    R, C = net.input_size, net.in_channels
    z = torch.zeros(batch, C, R, R, device="meta")
    s = torch.ones(batch, device="meta")  # t, h, omega, t_max; the values do not change the count
    y = torch.zeros(batch, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(z, s, s, s, s * 0, s, y, heads="u")
    return counter.get_total_flops() // 2  # the counter counts a multiply-add as 2 flops


def compute_report(model: str | dict) -> dict:
    """The dry run's compute keys: ``params_generator_M``, ``params_training_M`` (with the v-head) and
    ``gflops_per_forward`` (multiply-accumulates of one 1-image generator forward, in billions)."""
    kwargs = _kwargs(model)
    with torch.device("meta"):
        net = PMFDiT(**kwargs)
    gen, train = param_counts(net)
    return {"params_generator_M": round(gen / 1e6, 3), "params_training_M": round(train / 1e6, 3),
            "gflops_per_forward": round(macs_per_forward(kwargs) / 1e9, 4)}
