"""Model compute (pmf.method.compute): the meta-device count equals a hand count of the layers, and the six paper sizes
match the paper's parameters and Gflops (multiply-accumulates, generator only; pMF Sec. 6.3, Tab. 5-7) within 2 %."""

import pytest
import torch

from pmf.method.compute import compute_report, macs_per_forward, param_counts
from pmf.method.model import MODELS, PMFDiT

# (generator params in M, Gflops per forward) as the paper reports them
PAPER = {"pMF-B/16": (118, 33), "pMF-L/16": (410, 117), "pMF-H/16": (956, 271),
         "pMF-B/32": (120, 34), "pMF-L/32": (413, 117), "pMF-H/32": (959, 272)}


def hand_count(kw: dict, net: PMFDiT, batch: int = 1) -> int:
    """Multiply-accumulates of a generator forward from the architecture (paper Sec. 6 / Tab. 8): bottleneck patch
    embedding, four condition MLPs (256 -> D -> D), ``depth`` transformer blocks over L = prefix + N tokens
    (q, k, v, out projections; Q K^T and P V; SwiGLU with three matrices), and the final linear layer on the N image
    tokens. Element-wise work (norms, RoPE, activations, softmax) is not a multiply-accumulate and is left out."""
    C, p, D = kw.get("in_channels", 3), kw["patch_size"], kw["hidden_size"]
    b = net.x_embedder.proj1.out_channels  # the bottleneck width (official default 128 for D <= 1024)
    N = (kw["input_size"] // p) ** 2
    L = net.num_prefix + N
    F = net.shared_blocks[0].mlp.w1.out_features
    patch = N * (p * p * C * b + b * D)
    conditions = 4 * (256 * D + D * D)
    block = 4 * L * D * D + 2 * L * L * D + 3 * L * D * F
    final = N * D * p * p * C
    return batch * (patch + conditions + kw["depth"] * block + final)


@pytest.mark.parametrize("batch", [1, 3])
def test_meta_count_equals_hand_count(batch):
    kw = dict(MODELS["pMF-tiny"].kwargs)
    net = PMFDiT(**kw, v_head=False)
    assert macs_per_forward(kw, batch) == hand_count(kw, net, batch)


def test_hand_count_matches_at_paper_width():
    """The same hand count at B/16's width and depth, where attention and SwiGLU dominate."""
    kw = dict(MODELS["pMF-B/16"].kwargs)
    with torch.device("meta"):
        net = PMFDiT(**kw, v_head=False)
    assert macs_per_forward("pMF-B/16") == hand_count(kw, net)


def test_v_head_is_counted_in_training_params_only():
    net = PMFDiT(**MODELS["pMF-tiny"].kwargs)
    gen, train = param_counts(net)
    v = sum(p.numel() for m in (net.v_heads, net.v_final_layer) for p in m.parameters())
    assert train == sum(p.numel() for p in net.parameters()) and gen == train - v > 0


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_sizes_match_the_paper(name):
    report = compute_report(name)
    params_M, gflops = PAPER[name]
    assert report["params_generator_M"] == pytest.approx(params_M, rel=0.02)
    assert report["gflops_per_forward"] == pytest.approx(gflops, rel=0.02)
    assert report["params_training_M"] > report["params_generator_M"]
