"""pmf.method.attention: the three backends agree; the custom forward-mode rule of "jvp_sdpa" equals autodiff through
the math path and finite differences; its backward equals autograd; training's backward through the primal output of
torch.func.jvp gives the math path's gradients; plain SDPA cannot be forward-differentiated."""

import itertools
import math

import pytest
import torch

from pmf.method.attention import BACKENDS, attention
from pmf.method.model import Block, FinalLayer, build_model

F64 = torch.float64


def qkv(dtype=F64, shape=(2, 3, 7, 8), seed=0, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return tuple(scale * torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))


def naive_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v written out: P_ij = exp(S_ij - max_j S) / sum_j exp(S_ij - max_j S), float64."""
    q, k, v = (x.double() for x in (q, k, v))
    S = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    E = torch.exp(S - S.amax(-1, keepdim=True))
    return (E / E.sum(-1, keepdim=True)) @ v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (torch.float32, 2e-6)])
def test_backends_agree_in_the_primal(backend, dtype, tol):
    """Every backend computes softmax(q k^T / sqrt(d)) v: equal to the written-out float64 formula to dtype
    precision, and keeps the input dtype."""
    q, k, v = qkv(dtype)
    out = attention(q, k, v, backend)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), naive_attention(q, k, v), rtol=tol, atol=tol)


def test_unknown_backend_raises():
    with pytest.raises(ValueError):
        attention(*qkv(), backend="flash")


def _jvp(backend, primals, tangents):
    return torch.func.jvp(lambda q, k, v: attention(q, k, v, backend), primals, tangents)


def _fd(primals, tangents, eps=1e-6):
    """Central difference of the float64 reference along the tangent."""
    plus = naive_attention(*(p + eps * t for p, t in zip(primals, tangents)))
    minus = naive_attention(*(p - eps * t for p, t in zip(primals, tangents)))
    return (plus - minus) / (2 * eps)


MASKS = [m for m in itertools.product([0, 1], repeat=3) if any(m)]  # which of (dq, dk, dv) are non-zero


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "d" + "".join(n for n, b in zip("qkv", m) if b))
def test_custom_jvp_equals_autodiff_and_finite_differences(mask):
    """The closed-form tangent dO = P dv + (P*dS) v - rowsum(P*dS) O, dS = (dq k^T + q dk^T)/sqrt(d), equals forward
    AD through the math path and the central difference (eps 1e-6) in float64, for every non-empty subset of non-zero
    tangents (the others exactly zero); the primal output is unchanged."""
    primals = qkv()
    g = torch.Generator().manual_seed(1)
    tangents = tuple(torch.randn(p.shape, generator=g, dtype=F64) * b for p, b in zip(primals, mask))
    out, d_custom = _jvp("jvp_sdpa", primals, tangents)
    out_m, d_math = _jvp("math", primals, tangents)
    torch.testing.assert_close(out, out_m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d_custom, d_math, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(d_custom, _fd(primals, tangents), rtol=1e-6, atol=1e-7)


def test_custom_jvp_forward_ad_api_partial_duals():
    """With the low-level forward-AD API, only k carries a tangent (q, v are plain tensors): the tangent still equals
    the math path's."""
    import torch.autograd.forward_ad as fwAD

    q, k, v = qkv()
    dk = torch.randn(k.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    res = {}
    for backend in ("jvp_sdpa", "math"):
        with fwAD.dual_level():
            out = attention(q, fwAD.make_dual(k, dk), v, backend)
            res[backend] = fwAD.unpack_dual(out).tangent.clone()
    torch.testing.assert_close(res["jvp_sdpa"], res["math"], rtol=1e-10, atol=1e-10)


def test_custom_jvp_float32_close_to_float64():
    """In float32, the custom tangent (P*dS terms in float32) matches the float64 math-path tangent to float32
    precision."""
    p64 = qkv()
    g = torch.Generator().manual_seed(3)
    t64 = tuple(torch.randn(p.shape, generator=g, dtype=F64) for p in p64)
    _, d32 = _jvp("jvp_sdpa", tuple(p.float() for p in p64), tuple(t.float() for t in t64))
    _, d64 = _jvp("math", p64, t64)
    assert d32.dtype == torch.float32
    torch.testing.assert_close(d32.double(), d64, rtol=1e-4, atol=1e-4 * d64.abs().max().item())


def test_custom_backward_equals_autograd_through_math():
    """Reverse mode: d<G, O>/d(q, k, v) through "jvp_sdpa" equals autograd through the explicit math path (float64)."""
    G = torch.randn(2, 3, 7, 8, generator=torch.Generator().manual_seed(4), dtype=F64)
    grads = {}
    for backend in ("jvp_sdpa", "math"):
        q, k, v = (x.requires_grad_(True) for x in qkv())
        grads[backend] = torch.autograd.grad((attention(q, k, v, backend) * G).sum(), (q, k, v))
    for a, b in zip(grads["jvp_sdpa"], grads["math"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gradcheck_custom_backward():
    """torch.autograd.gradcheck (finite differences vs the backward, fast mode: random projections) on a small
    float64 case."""
    q, k, v = (x[:1, :1, :3, :4].clone().requires_grad_(True) for x in qkv())
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, "jvp_sdpa"), (q, k, v), fast_mode=True)


def _perturbed_tiny(backend):
    torch.manual_seed(0)
    net = build_model("pMF-tiny", attn_backend=backend).double()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, Block):
                for p in (m.attn_scale, m.mlp_scale):
                    p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=F64))
            elif isinstance(m, FinalLayer):
                for p in (m.linear.weight, m.linear.bias):
                    p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=F64))
    return net


def test_backward_through_jvp_primal_matches_math_path():
    """Training computes (u, du/dt) = jvp(net, (z, t, r), (v, 1, 0)) and backpropagates
    L = |u + (t - r) sg(du/dt) - v_target|^2 through the primal u only. The parameter gradients with the custom
    backend equal those with the math backend (plain autograd), and so do u and du/dt."""
    B = 2
    g = torch.Generator().manual_seed(8)
    z = torch.randn(B, 1, 8, 8, generator=g, dtype=F64)
    tang = torch.randn(B, 1, 8, 8, generator=g, dtype=F64)
    target = torch.randn(B, 1, 8, 8, generator=g, dtype=F64)
    t, r = torch.tensor([0.8, 0.4], dtype=F64), torch.tensor([0.3, 0.0], dtype=F64)
    om, lo, hi, y = torch.tensor([2.0, 1.5], dtype=F64), torch.zeros(B, dtype=F64), torch.ones(B, dtype=F64), \
        torch.tensor([0, 3])
    res = {}
    for backend in ("jvp_sdpa", "math"):
        net = _perturbed_tiny(backend)

        def f(z, t, r):
            return net(z, t, t - r, om, lo, hi, y, heads="u")[0]

        u, dudt = torch.func.jvp(f, (z, t, r), (tang, torch.ones_like(t), torch.zeros_like(r)))
        V = u + (t - r).view(-1, 1, 1, 1) * dudt.detach()
        loss = (V - target).pow(2).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        res[backend] = (u.detach(), dudt.detach(), grads)
    (u1, d1, g1), (u2, d2, g2) = res["jvp_sdpa"], res["math"]
    torch.testing.assert_close(u1, u2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(d1, d2, rtol=1e-9, atol=1e-9)
    assert g1.keys() == g2.keys() and len(g1) > 0
    assert any(g.abs().max() > 0 for n, g in g1.items() if ".attn." in n)  # gradients do flow through attention
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-9, atol=1e-10, msg=n)


def test_plain_sdpa_raises_under_jvp():
    """The fused kernel has no forward-mode rule: torch.func.jvp through backend "sdpa" raises (why "jvp_sdpa"
    exists), while "jvp_sdpa" and "math" work."""
    primals = qkv(shape=(1, 2, 5, 8))
    with pytest.raises((NotImplementedError, RuntimeError)):
        _jvp("sdpa", primals, primals)
    for backend in ("jvp_sdpa", "math"):
        _jvp(backend, primals, primals)


def test_tangent_has_no_autograd_history():
    """The forward-mode rule builds its tangent under no_grad: with q, k, v requiring grad (a training forward), the
    tangent of the output carries no grad_fn, so its float32 (B, H, L, L) temporaries are freed at once instead of
    living until the dual level closes."""
    import torch.autograd.forward_ad as fwAD

    q, k, v = (x.float().requires_grad_(True) for x in qkv())
    dq, dk, dv = (torch.randn_like(x) for x in (q, k, v))
    with fwAD.dual_level():
        out = attention(*(fwAD.make_dual(x, d) for x, d in ((q, dq), (k, dk), (v, dv))), "jvp_sdpa")
        primal, tangent = fwAD.unpack_dual(out)
        assert primal.grad_fn is not None and tangent.grad_fn is None and not tangent.requires_grad


@pytest.mark.parametrize("autocast", [False, True])
def test_output_saved_for_backward_only_where_read(autocast):
    """The CPU flash-kernel path (float32, no autocast) saves its output and logsumexp for the kernel's backward;
    the other path (here: CPU bf16 autocast) recomputes the forward and saves no output."""
    q, k, v = (x.float().requires_grad_(True) for x in qkv())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            attention(q, k, v, "jvp_sdpa")
    assert saved.count(tuple(q.shape)) == (3 if autocast else 4)  # q, k, v (+ out)
