"""pmf.method.objective: the pMF loss as the official code implements it (official `pmf.py`: `sample_tr`, `guidance_fn`,
`cond_drop`, `forward`).

Every test checks against an independent truth: finite differences, closed-form distributions (Kolmogorov-Smirnov
with a fixed seed, p > 1e-3), a fake network whose velocities are known in closed form, or the algebra of the loss
recomputed from the draws. The real network is ``build_model("pMF-tiny")`` with its zero-init parameters perturbed
by small noise (otherwise every head outputs 0 and u = z / t, which hides most mistakes).
"""

import math
from dataclasses import fields

import numpy as np
import pytest
import torch
from scipy import stats

from pmf.method.model import TimestepEmbedder, build_model
import pmf.method.objective as obj
import pmf.method.objective_lean as lean
from pmf.method.objective import (
    Draws,
    ObjectiveConfig,
    adaptive_weight,
    compound_velocity,
    conditional_velocity,
    guided_velocity,
    lean_rows,
    masked_omega,
    noisy_image,
    objective_at,
    per_sample_sq_error,
    pmf_loss,
    sample_draws,
    u_and_dudt,
)
from pmf.method.rng import PerSampleGenerator, keyed_normal

F64 = torch.float64
NULL = 3  # pMF-tiny has num_classes = 3; label 3 is the null class
KS_P = 1e-3  # KS tolerance: with the fixed seeds below every p-value must exceed this
IMPLS = ("reference", "lean")  # the plain torch.func.jvp step and the forward-AD trunk + u-head step


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ----------------------------------------------------------------------------------------------------------------
# Oracles: the official guidance_fn / cond_drop written line by line (not used by training)


@torch.no_grad()
def guided_target(net, z_t, v_t, y, d, cfg, null_label: int):
    """(v_g, v_c): the guided velocity target and the tangent for the JVP, line by line as official ``pmf.py:
    guidance_fn`` computes them [P Alg. 2]; the specification that the objective's two passes are tested against.

    v_c, v_u = v(z | y, omega), v(z | null, 1). For r = t samples, v_g = v_t + (1 - 1/omega)(v_c - v_u).
    Otherwise omega is reset to 1 outside [t_min, t_max], v_c recomputed with that masked omega', and
    v_g = v_t + (1 - 1/omega')(v_c' - v_u). v_c' is the tangent (equal to v_c wherever the mask changed nothing).
    Without guidance: v_g = v_t and the tangent is v(z | y, 1).
    """
    B = z_t.shape[0]
    if not cfg.guidance:
        return v_t, obj.boundary_velocity(net, z_t, d.t, d.omega, y, cfg.use_v_head)
    both = obj.boundary_velocity(net, torch.cat([z_t, z_t]), torch.cat([d.t, d.t]),
                                 torch.cat([d.omega, torch.ones_like(d.omega)]),
                                 torch.cat([y, torch.full_like(y, null_label)]), cfg.use_v_head)
    v_c, v_u = both[:B], both[B:]
    v_g_fm = obj.guided_velocity(v_t, v_c, v_u, d.omega, z_t, d.t, cfg.guidance_parallel)
    omega_m = torch.where(obj.interval_mask(d), d.omega, torch.ones_like(d.omega))
    v_c = obj.boundary_velocity(net, z_t, d.t, omega_m, y, cfg.use_v_head)
    v_g = obj.guided_velocity(v_t, v_c, v_u, omega_m, z_t, d.t, cfg.guidance_parallel)
    return torch.where(obj._b(d.fm_mask, z_t), v_g_fm, v_g), v_c


def drop_labels(y, v_t, v_g, d, null_label: int):
    """Class dropout [official ``pmf.py: cond_drop``]: dropped samples get the null label and the unguided target
    v_g = v_t."""
    return torch.where(d.drop_mask, null_label, y), torch.where(obj._b(d.drop_mask, v_t), v_t, v_g)


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def _net(seed=0, dtype=F64, noise=0.1, **kw):
    """pMF-tiny with every parameter perturbed by N(0, noise^2), so gates and final layers are non-zero."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = build_model("pMF-tiny", **kw).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def _data(B, seed=0, shape=(1, 8, 8), dtype=F64):
    g = torch.Generator().manual_seed(100 + seed)
    x = 0.5 * torch.randn(B, *shape, generator=g, dtype=dtype)
    y = torch.randint(0, NULL, (B,), generator=g)
    return x, y


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _f64(d: Draws) -> Draws:
    """Draws with every floating field in float64 (sample_draws returns float32 times)."""
    return Draws(**{f.name: (v.to(F64) if v.is_floating_point() else v)
                    for f in fields(Draws) for v in [getattr(d, f.name)]})


def _b(t, like):
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def _embed_f64(self, s):
    """TimestepEmbedder.forward with the sinusoid in the weights' dtype (the model computes it in float32, which
    would swamp a 1e-6 finite difference); same formula: [cos, sin](s * 10000^(-k/128)) -> MLP."""
    half, dt = self.freq_dim // 2, self.mlp[0].weight.dtype
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=dt) / half)
    args = s.to(dt)[:, None] * freqs[None]
    return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class FakeNet:
    """A stand-in network with closed-form heads, recording every call.

    v(z | y, omega) = 0.1 (y + 1) z + 0.2 omega^2 + y        (depends on the label and on omega)
    u(z, t, h)      = -0.5 z + 0.3 t + h                     so along the tangent (v_c, 1, 0) over (z, t, r),
                                                              du/dt = -0.5 v_c + 0.3 + 1 (h = t - r moves with t).
    """

    num_classes = NULL

    def __init__(self, has_v_head=True):
        self.has_v_head = has_v_head
        self.calls = []

    @staticmethod
    def v_of(z, y, omega):
        return 0.1 * _b(y + 1.0, z) * z + 0.2 * _b(omega, z) ** 2 + _b(y.to(z.dtype), z)

    @staticmethod
    def u_of(z, t, h):
        return -0.5 * z + 0.3 * _b(t, z) + _b(h, z)

    def __call__(self, z, t, h, omega, t_min, t_max, y, heads="uv"):
        rec = dict(heads=heads, nograd=not torch.is_grad_enabled(), y=y.clone(), omega=omega.clone(),
                   t_min=t_min.clone(), t_max=t_max.clone())
        if rec["nograd"]:  # outside the JVP (guided_target runs under no_grad): plain tensors, safe to keep
            rec.update(h=h.clone(), t=t.clone(), z=z.clone())
        self.calls.append(rec)
        u = self.u_of(z, t, h) if "u" in heads else None
        v = self.v_of(z, y, omega) if ("v" in heads and self.has_v_head) else None
        return u, v


@torch.no_grad()  # as in pmf_loss: the target is a constant
def guided_target_lean(net, z_t, v_t, y, d, cfg, null_label):
    """(v_g, v_c) from the lean guidance pass (pmf.method.objective_lean.guidance_velocities: one inference call with a
    conditional row for every sample and an unconditional one for each guided sample) and the target formula."""
    guided, omega_m = masked_omega(d)
    every, none = torch.arange(len(d.t)), torch.zeros(0, dtype=torch.long)
    rows = lean.RowPlan.from_rows(len(d.t), every, every, guided.nonzero().squeeze(1) if cfg.guidance else none,
                                  torch.zeros(len(d.t), dtype=torch.bool))
    v_c, v_u = lean.guidance_velocities(net, z_t, y, d.t, omega_m, rows, cfg.use_v_head, null_label)
    v_g = guided_velocity(v_t, v_c, v_u, omega_m, z_t, d.t, cfg.guidance_parallel) if cfg.guidance else v_t
    return v_g, v_c


def _steps(net, x, y, d, cfg, with_v=True, impl="reference"):
    """The objective's named steps in the order of the official ``forward`` (guidance_fn, cond_drop, jvp), for
    building partial losses: the reference transcription, or the lean passes with pmf_loss's row plan."""
    z_t = noisy_image(x, d.t, d.e)
    v_t = conditional_velocity(z_t, x, d.t)
    if impl == "reference":
        v_g, v_c = guided_target(net, z_t, v_t, y, d, cfg, NULL)
        y_in, v_g = drop_labels(y, v_t, v_g, d, NULL)
        u, dudt, v = u_and_dudt(net, z_t, d, y_in, v_c, with_v)
    else:
        v_g, v_c = guided_target_lean(net, z_t, v_t, y, d, cfg, NULL)
        y_in, v_g = drop_labels(y, v_t, v_g, d, NULL)
        u, dudt, v = lean.u_and_dudt(net, z_t, d, y_in, v_c, with_v, lean_rows(net, d, cfg))
    return dict(z_t=z_t, v_t=v_t, v_g=v_g, v_c=v_c, y_in=y_in, u=u, dudt=dudt, v=v)


def _spy_jvp(monkeypatch, record):
    """Wrap both JVP passes (pmf.method.objective.u_and_dudt, pmf.method.objective_lean.u_and_dudt) so every call's
    tangent and
    outputs are recorded, with fn = "reference" or "lean"."""
    for module, name in ((obj, "reference"), (lean, "lean")):
        real = module.u_and_dudt

        def spy(net_, z_, d_, y_, tangent_v, with_v, *rows, _real=real, _name=name):
            out = _real(net_, z_, d_, y_, tangent_v, with_v, *rows)
            record.append(dict(fn=_name, tangent=tangent_v, u=out[0], dudt=out[1], v=out[2]))
            return out

        monkeypatch.setattr(module, "u_and_dudt", spy)


def _big_draws(cfg, B=20000, seed=0):
    """Draws for a large batch of cheap 1x2x2 images (only the draws are used)."""
    x = torch.zeros(B, 1, 2, 2)
    y = torch.zeros(B, dtype=torch.long)
    return sample_draws(x, y, cfg, generator=_gen(seed))


def _logit(p):
    p = p.double()
    return torch.log(p) - torch.log1p(-p)


# ----------------------------------------------------------------------------------------------------------------
# The JVP


@pytest.mark.parametrize("impl", IMPLS)
def test_dudt_is_the_directional_derivative(impl, monkeypatch):
    """du/dt from u_and_dudt (and its lean twin) = d/ds u(z + s v, t + s, r)|_{s=0} with h = t - r (MF Eq. 8:
    tangent (v, 1, 0) over (z, t, r)), checked against the central difference [f(eps) - f(-eps)] / (2 eps),
    eps = 1e-6, float64 (truncation O(eps^2), round-off O(1e-16 / eps)); the primal u and the aux v are the plain
    forward's outputs. The model's float32 sinusoid is swapped for a float64 one here (see _embed_f64)."""
    monkeypatch.setattr(TimestepEmbedder, "forward", _embed_f64)
    net = _net()
    g = _gen(1)
    z = torch.randn(3, 1, 8, 8, generator=g, dtype=F64)
    v = torch.randn(3, 1, 8, 8, generator=g, dtype=F64)
    t = torch.tensor([0.3, 0.6, 0.9], dtype=F64)
    r = torch.tensor([0.1, 0.6, 0.2], dtype=F64)  # the middle sample has r = t
    omega = torch.tensor([1.0, 2.5, 6.0], dtype=F64)
    t_min = torch.tensor([0.0, 0.2, 0.1], dtype=F64)
    t_max = torch.tensor([1.0, 0.8, 0.95], dtype=F64)
    y = torch.tensor([0, 2, NULL])
    d = Draws(t, r, t == r, torch.zeros_like(z), omega, t_min, t_max, torch.zeros(3, dtype=torch.bool))

    if impl == "reference":
        u, dudt, vv = u_and_dudt(net, z, d, y, v, with_v=True)
    else:  # every row through the forward-mode pass (the row split is test_lean_row_split_is_exact)
        u, dudt, vv = lean.u_and_dudt(net, z, d, y, v, True, lean.RowPlan.every_row(3, guidance=True))

    def f(s):
        with torch.no_grad():
            return net(z + s * v, t + s, (t + s) - r, omega, t_min, t_max, y, heads="u")[0]

    eps = 1e-6
    fd = (f(eps) - f(-eps)) / (2 * eps)
    with torch.no_grad():
        u0, v0 = net(z, t, t - r, omega, t_min, t_max, y)
    torch.testing.assert_close(u.detach(), u0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vv.detach(), v0, rtol=1e-12, atol=1e-12)
    assert fd.abs().max() > 1e-2  # non-trivial
    assert (dudt.detach() - fd).abs().max() <= 1e-6 * max(1.0, fd.abs().max().item())

    # power: the time part of the tangent matters (the z-only derivative, tangent (v, 0, 0), is different)
    def f_z(s):
        with torch.no_grad():
            return net(z + s * v, t, t - r, omega, t_min, t_max, y, heads="u")[0]

    assert ((f_z(eps) - f_z(-eps)) / (2 * eps) - fd).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# Where gradients flow


@pytest.mark.parametrize("impl", IMPLS)
def test_no_gradient_through_dudt(impl, monkeypatch):
    """V = u + (t - r) sg(du/dt) (P Eq. 12): d/dtheta ||V - v_g||^2 must equal the gradient with du/dt replaced by
    a constant copy; and inside pmf_loss a hook on du/dt (when du/dt is differentiable at all) never receives a
    gradient while the parameters do."""
    net = _net()
    x, y = _data(4)
    cfg = ObjectiveConfig(impl=impl)
    d = sample_draws(x, y, cfg, generator=_gen(0))
    s = _steps(net, x, y, d, cfg, with_v=False, impl=impl)
    params = [p for p in net.parameters()]

    def grads(V):
        loss = per_sample_sq_error(V, s["v_g"]).sum()
        return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)

    g_obj = grads(compound_velocity(s["u"], s["dudt"], d.t, d.r))
    g_const = grads(s["u"] + _b(d.t - d.r, s["u"]) * s["dudt"].detach().clone())
    for a, b in zip(g_obj, g_const):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    # inside pmf_loss
    rec, hit = [], []
    _spy_jvp(monkeypatch, rec)
    loss, _ = pmf_loss(net, x, y, cfg, draws=d)
    assert [r["fn"] for r in rec] == [impl]
    if rec[0]["dudt"].requires_grad:
        rec[0]["dudt"].register_hook(lambda gr: hit.append(gr))
    loss.backward()
    assert hit == []
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_no_gradient_through_target_or_tangent(monkeypatch):
    """v_g and the tangent v_c are computed under no_grad (official stop-gradients): even with z_t and every
    parameter requiring grad their outputs have requires_grad False, and the tangent pmf_loss hands to the JVP is
    constant for both tangent modes."""
    net = _net()
    x, y = _data(4)
    cfg = ObjectiveConfig()
    d = sample_draws(x, y, cfg, generator=_gen(0))
    z_t = noisy_image(x, d.t, d.e).requires_grad_(True)
    v_t = conditional_velocity(z_t, x, d.t)
    v_g, v_c = guided_target(net, z_t, v_t, y, d, cfg, NULL)
    assert not v_g.requires_grad and not v_c.requires_grad
    assert v_c.abs().sum() > 0

    assert not any(t.requires_grad for t in guided_target_lean(net, z_t, v_t, y, d, cfg, NULL))

    rec = []
    _spy_jvp(monkeypatch, rec)
    for impl in IMPLS:
        for tangent in ("predicted", "target"):
            pmf_loss(net, x, y, ObjectiveConfig(tangent=tangent, impl=impl), draws=d)
    assert len(rec) == 4 and not any(r["tangent"].requires_grad for r in rec)


@pytest.mark.parametrize("impl", IMPLS)
def test_heads_get_gradient_only_from_their_own_loss(impl):
    """loss_u = sum (V - v_g)^2 depends on the u-head (and the trunk) only: its gradient into v_heads /
    v_final_layer is None or 0; loss_v = sum (v - v_g)^2 gives none into u_heads / u_final_layer. Both reach the
    shared trunk."""
    net = _net()
    x, y = _data(4)
    cfg = ObjectiveConfig(impl=impl)
    d = sample_draws(x, y, cfg, generator=_gen(0))
    s = _steps(net, x, y, d, cfg, with_v=True, impl=impl)
    V = compound_velocity(s["u"], s["dudt"], d.t, d.r)
    loss_u = adaptive_weight(per_sample_sq_error(V, s["v_g"]), cfg).mean()
    loss_v = adaptive_weight(per_sample_sq_error(s["v"], s["v_g"]), cfg).mean()

    def grad_norms(loss, modules):
        params = [p for m in modules for p in m.parameters()]
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return [0.0 if g is None else g.abs().sum().item() for g in gs]

    u_side, v_side = [net.u_heads, net.u_final_layer], [net.v_heads, net.v_final_layer]
    assert all(n == 0 for n in grad_norms(loss_u, v_side))
    assert all(n == 0 for n in grad_norms(loss_v, u_side))
    assert sum(grad_norms(loss_u, u_side)) > 0 and sum(grad_norms(loss_v, v_side)) > 0
    assert sum(grad_norms(loss_u, [net.shared_blocks])) > 0 and sum(grad_norms(loss_v, [net.shared_blocks])) > 0


# ----------------------------------------------------------------------------------------------------------------
# The lean implementation is the reference implementation


def test_lean_matches_reference():
    """impl = "lean" (batched guidance rows, forward-AD through trunk + u-head only) computes the same function as
    impl = "reference" (two guidance calls, torch.func.jvp over the whole net): guided_target_lean ==
    guided_target on a batch with r = t, inside- and outside-interval samples; pmf_loss values, metrics and
    parameter gradients agree (1e-10 / 1e-8, float64) for the default config (with dropped samples), without a
    v-head, without guidance, with APG-style guidance (guidance_parallel) and with a perceptual term."""
    net = _net()
    x, y = _data(8)
    d = _f64(sample_draws(x, y, ObjectiveConfig(class_drop=0.5), generator=_gen(6)))
    inside = (d.t >= d.t_min) & (d.t <= d.t_max)
    assert d.fm_mask.any() and (~d.fm_mask & inside).any() and (~d.fm_mask & ~inside).any() and d.drop_mask.any()
    cfg = ObjectiveConfig()
    z_t = noisy_image(x, d.t, d.e)
    v_t = conditional_velocity(z_t, x, d.t)
    ref, fast = guided_target(net, z_t, v_t, y, d, cfg, NULL), guided_target_lean(net, z_t, v_t, y, d, cfg, NULL)
    for a, b in zip(ref, fast):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    def perc(x_pred, x_, gen):
        return {"l2": (x_pred - x_).pow(2).flatten(1).sum(1)}

    params = list(net.parameters())
    for kw, hook in ((dict(), None), (dict(use_v_head=False), None), (dict(guidance=False), None),
                     (dict(guidance_parallel=0.25), None),
                     (dict(perceptual_weights={"l2": 0.5}, perceptual_max_t=0.9), perc)):
        out = {}
        for impl in IMPLS:
            loss, m = pmf_loss(net, x, y, ObjectiveConfig(impl=impl, **kw), draws=d, perceptual=hook)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            out[impl] = (m, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
        (m_r, g_r), (m_l, g_l) = out["reference"], out["lean"]
        assert m_r.keys() == m_l.keys()
        for k in m_r:
            torch.testing.assert_close(m_r[k], m_l[k], rtol=1e-10, atol=1e-12)
        for a, b in zip(g_r, g_l):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# Reduction to flow matching


def test_r_eq_t_without_guidance_is_flow_matching():
    """With r = t everywhere, no guidance and no class dropout: V = u (t - r = 0) and v_g = v_t = e - x (t >= 0.05),
    so the per-sample loss_u is sum (u(z_t, t, h=0, omega=1, [0,1], y) - (e - x))^2, likewise loss_v with the v-head;
    with norm_p = 0 the loss is mean(sum_u) + mean(sum_v) and loss_u = mean(sum_u) / (C H W). Computed directly from
    the draws with the plain network forward."""
    net = _net()
    x, y = _data(4)
    cfg = ObjectiveConfig(time_region="r_eq_t", guidance=False, class_drop=0.0, norm_p=0.0)
    d = sample_draws(x, y, cfg, generator=_gen(3))
    assert torch.equal(d.r, d.t) and (d.t >= 0.05).all()
    loss, m = pmf_loss(net, x, y, cfg, draws=d)

    t, e = d.t.to(F64), d.e
    z = (1 - _b(t, x)) * x + _b(t, x) * e
    one = torch.ones_like(t)
    with torch.no_grad():
        u, v = net(z, t, torch.zeros_like(t), one, torch.zeros_like(t), one, y)
    su = ((u - (e - x)) ** 2).flatten(1).sum(1)
    sv = ((v - (e - x)) ** 2).flatten(1).sum(1)
    D = x[0].numel()
    torch.testing.assert_close(m["loss_u"], su.mean() / D, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m["loss_v"], sv.mean() / D, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss.detach(), su.mean() + sv.mean(), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Draw distributions (B = 20000, fixed seed, KS p > 1e-3)


def test_draws_time_distributions():
    """Recipe 1.6: t, r iid logit-normal(P_mean, P_std); r <- t on the r = t samples, then (t, r) = (max, min).
    So logit(t) ~ N(P_mean, P_std) on r = t samples (a single draw), and on r != t samples t = max, r = min of two
    iid draws: CDF_t = F^2, CDF_r = 1 - (1 - F)^2 with F the logit-normal CDF. Exactly data_proportion of the
    batch has r = t. e = noise_scale * N(0, 1)."""
    cfg = ObjectiveConfig(P_mean=0.8, P_std=0.8, noise_scale=2.0)
    d = _big_draws(cfg)
    fm = d.fm_mask
    assert int(fm.sum()) == 10000
    assert torch.equal(d.r[fm], d.t[fm]) and (d.r[~fm] <= d.t[~fm]).all()

    def F(p):
        return stats.norm.cdf((_logit(torch.as_tensor(p)).numpy() - cfg.P_mean) / cfg.P_std)

    assert stats.kstest(_logit(d.t[fm]).numpy(), "norm", args=(cfg.P_mean, cfg.P_std)).pvalue > KS_P
    assert stats.kstest(d.t[~fm].double().numpy(), lambda p: F(p) ** 2).pvalue > KS_P
    assert stats.kstest(d.r[~fm].double().numpy(), lambda p: 1 - (1 - F(p)) ** 2).pvalue > KS_P
    assert stats.kstest(d.e[:2000].flatten().double().numpy(), "norm", args=(0, 2.0)).pvalue > KS_P


def test_draws_separate_std_for_flow_matching_samples():
    """P_std_fm: logit(t) ~ N(P_mean, P_std_fm) on the r = t samples, while the r != t samples keep max / min of two
    logit-normal(P_mean, P_std) draws (CDFs F^2 and 1 - (1 - F)^2), bit for bit the draws without the knob."""
    cfg = ObjectiveConfig(P_mean=0.3, P_std=1.0, P_std_fm=0.5)
    d, d0 = _big_draws(cfg), _big_draws(ObjectiveConfig(P_mean=0.3, P_std=1.0))
    fm = d.fm_mask

    def F(p):
        return stats.norm.cdf((_logit(torch.as_tensor(p)).numpy() - cfg.P_mean) / cfg.P_std)

    assert stats.kstest(_logit(d.t[fm]).numpy(), "norm", args=(cfg.P_mean, 0.5)).pvalue > KS_P
    assert stats.kstest(_logit(d.t[fm]).numpy(), "norm", args=(cfg.P_mean, 1.0)).pvalue < 1e-6  # the test can fail
    assert stats.kstest(d.t[~fm].double().numpy(), lambda p: F(p) ** 2).pvalue > KS_P
    assert stats.kstest(d.r[~fm].double().numpy(), lambda p: 1 - (1 - F(p)) ** 2).pvalue > KS_P
    assert torch.equal(d.t[~fm], d0.t[~fm]) and torch.equal(d.r[~fm], d0.r[~fm]) and torch.equal(d.r[fm], d.t[fm])


@pytest.mark.parametrize("p", [0.25, 0.5, 0.75])
def test_draws_fm_fraction_is_exact(p):
    """fm_pattern: exactly floor(B p) of a batch of B (here B p is an integer) has r = t."""
    d = _big_draws(ObjectiveConfig(data_proportion=p), B=2000)
    assert int(d.fm_mask.sum()) == round(2000 * p)


def test_fm_warmup_schedule():
    """fm_warmup_kimg = W: the r = t fraction is 1 at 0 images, 1 - (1 - p) s at s W kimg, p from W kimg on; the
    per-sample class-dropout marginal stays class_drop (its r = t rate is class_drop / fraction)."""
    cfg = ObjectiveConfig(data_proportion=0.5, fm_warmup_kimg=10.0)
    assert objective_at(ObjectiveConfig(), 12345) == ObjectiveConfig()
    for nimg, frac in ((0, 1.0), (2500, 0.875), (5000, 0.75), (10000, 0.5), (20000, 0.5)):
        at = objective_at(cfg, nimg)
        assert at.data_proportion == pytest.approx(frac) and at.fm_warmup_kimg == 0
        d = _big_draws(at, B=4000)
        assert int(d.fm_mask.sum()) == round(4000 * frac)
        assert abs(d.drop_mask.double().mean().item() - cfg.class_drop) < 3 * (0.1 * 0.9 / 4000) ** 0.5
    with pytest.raises(ValueError, match="fm_warmup_kimg"):
        ObjectiveConfig(fm_warmup_kimg=-1)
    with pytest.raises(ValueError, match="guidance_parallel"):
        ObjectiveConfig(guidance_parallel=-0.5)


def test_draws_tr_uniform():
    """tr_uniform = 1: t, r iid U[0, 1] before the sort, so on r != t samples t = max (CDF x^2), r = min (CDF
    1 - (1 - x)^2), and on r = t samples t ~ U[0, 1]."""
    d = _big_draws(ObjectiveConfig(tr_uniform=1.0))
    fm = d.fm_mask
    assert stats.kstest(d.t[~fm].double().numpy(), lambda p: p**2).pvalue > KS_P
    assert stats.kstest(d.r[~fm].double().numpy(), lambda p: 1 - (1 - p) ** 2).pvalue > KS_P
    assert stats.kstest(d.t[fm].double().numpy(), "uniform").pvalue > KS_P


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_draws_omega(beta):
    """omega on [1, 1 + s], density ~ omega^-beta (official `pmf.py`: `sample_cfg_scale`), s = 7: beta = 1 gives CDF ln
    w / ln(1 + s);
    beta = 2 gives CDF (1 - 1/w) / (1 - 1/(1 + s))."""
    s = 7.0
    w = _big_draws(ObjectiveConfig(cfg_beta=beta, cfg_max=s)).omega.double().numpy()
    assert w.min() >= 1.0 and w.max() <= 1.0 + s + 1e-5
    if beta == 1.0:
        cdf = lambda a: np.log(a) / math.log1p(s)  # noqa: E731
    else:
        cdf = lambda a: (1 - 1 / a) / (1 - 1 / (1 + s))  # noqa: E731
    assert stats.kstest(w, cdf).pvalue > KS_P


def test_draws_interval():
    """t_min ~ U[0, 0.5], t_max ~ U[0.5, 1] on r != t samples; exactly [0, 1] on r = t samples (official `pmf.py`: `guidance_fn`)."""
    d = _big_draws(ObjectiveConfig())
    fm = d.fm_mask
    assert (d.t_min[fm] == 0).all() and (d.t_max[fm] == 1).all()
    assert stats.kstest(d.t_min[~fm].double().numpy(), "uniform", args=(0.0, 0.5)).pvalue > KS_P
    assert stats.kstest(d.t_max[~fm].double().numpy(), "uniform", args=(0.5, 0.5)).pvalue > KS_P


def test_draws_class_drop():
    """drop_among_fm: every dropped sample has r = t, each r = t sample dropped w.p. q = p / data_proportion, so the
    overall fraction is p; tolerance 4 binomial std of the count (n_fm, q). drop_among_fm = False: each sample
    w.p. p (4 std of Binomial(B, p)), and r != t samples are dropped too."""
    p, B = 0.1, 20000
    d = _big_draws(ObjectiveConfig(class_drop=p, data_proportion=0.5))
    n_fm, q = int(d.fm_mask.sum()), p / 0.5
    assert not (d.drop_mask & ~d.fm_mask).any()
    assert abs(int(d.drop_mask.sum()) - n_fm * q) < 4 * math.sqrt(n_fm * q * (1 - q))
    d2 = _big_draws(ObjectiveConfig(class_drop=p, drop_among_fm=False), seed=1)
    assert abs(int(d2.drop_mask.sum()) - B * p) < 4 * math.sqrt(B * p * (1 - p))
    assert (d2.drop_mask & ~d2.fm_mask).any()


# ----------------------------------------------------------------------------------------------------------------
# The guided target (fake net with known heads)


def _fake_case(cfg, B=64, seed=0):
    x, y = _data(B, seed=seed, shape=(1, 2, 2))
    d = _f64(sample_draws(x, y, cfg, generator=_gen(seed)))
    assert (d.t >= 0.05).all()
    return x, y, d


@pytest.mark.parametrize("gt", [guided_target, guided_target_lean], ids=IMPLS)
def test_guided_target_formula_and_interval(gt):
    """Recipe 1.5 / P Alg. 2 with v(z | y, omega) known: omega' = omega on r = t samples and inside [t_min, t_max],
    1 outside; v_g = v_t + (1 - 1/omega')(v(y, omega') - v(null, 1)) with v_t = e - x; the tangent is
    v(y, omega'); outside the interval v_g = v_t exactly. Every guided_target call uses h = 0 and the interval
    [0, 1], and the unconditional call has the null label with omega = 1."""
    cfg = ObjectiveConfig()
    x, y, d = _fake_case(cfg)
    net = FakeNet()
    z_t = noisy_image(x, d.t, d.e)
    v_t = conditional_velocity(z_t, x, d.t)
    torch.testing.assert_close(v_t, d.e - x, rtol=1e-12, atol=1e-12)
    v_g, v_c = gt(net, z_t, v_t, y, d, cfg, NULL)

    inside = (d.t >= d.t_min) & (d.t <= d.t_max)
    outside = ~d.fm_mask & ~inside
    assert outside.any() and (~d.fm_mask & inside).any() and d.fm_mask.any()
    w = torch.where(d.fm_mask | inside, d.omega, torch.ones_like(d.omega))
    v_u = FakeNet.v_of(z_t, torch.full_like(y, NULL), torch.ones_like(w))
    exp_vc = FakeNet.v_of(z_t, y, w)
    exp_vg = (d.e - x) + _b(1 - 1 / w, x) * (exp_vc - v_u)
    torch.testing.assert_close(v_c, exp_vc, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v_g, exp_vg, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v_g[outside], v_t[outside], rtol=0, atol=0)
    # on r = t samples the full (un-masked) omega is used
    fm = d.fm_mask
    v_u_fm = FakeNet.v_of(z_t[fm], torch.full_like(y[fm], NULL), torch.ones_like(d.omega[fm]))
    exp_fm = (d.e - x)[fm] + _b(1 - 1 / d.omega[fm], x[fm]) * (FakeNet.v_of(z_t[fm], y[fm], d.omega[fm]) - v_u_fm)
    torch.testing.assert_close(v_g[fm], exp_fm, rtol=1e-12, atol=1e-12)

    assert all(c["nograd"] and c["heads"] == "v" for c in net.calls)
    for c in net.calls:
        assert (c["h"] == 0).all() and (c["t_min"] == 0).all() and (c["t_max"] == 1).all()
    null_rows = [(c["y"] == NULL, c["omega"]) for c in net.calls]
    assert any(m.any() for m, _ in null_rows)
    assert all((om[m] == 1).all() for m, om in null_rows)


@pytest.mark.parametrize("gt", [guided_target, guided_target_lean], ids=IMPLS)
def test_guidance_parallel_splits_the_image_space_update(gt):
    """guidance_parallel = eta (APG): the guided image x_g = z_t - t v_g differs from the unguided x_t = z_t - t v_t
    by (1 - 1/omega') * (-t) D', where D' is the plain CFG difference D = v_c' - v_u with its component along the
    conditional image x_c = z_t - t v_c' scaled by eta. Checked per sample against explicit projections: at eta = 0
    the update is orthogonal to x_c; for any eta, D' = D_perp + eta D_par with D_perp + D_par = D; eta = 1 is
    plain CFG."""
    x, y, d = _fake_case(ObjectiveConfig())
    net = FakeNet()
    z_t = noisy_image(x, d.t, d.e)
    v_t = conditional_velocity(z_t, x, d.t)
    plain, v_c = gt(net, z_t, v_t, y, d, ObjectiveConfig(), NULL)
    w = torch.where(d.fm_mask | ((d.t >= d.t_min) & (d.t <= d.t_max)), d.omega, torch.ones_like(d.omega))
    g = _b(1 - 1 / w, x)
    D = FakeNet.v_of(z_t, y, w) - FakeNet.v_of(z_t, torch.full_like(y, NULL), torch.ones_like(w))
    x_c = (z_t - _b(d.t, x) * v_c).flatten(1)
    D_par = (((D.flatten(1) @ x_c.T).diagonal() / (x_c * x_c).sum(1))[:, None] * x_c).view_as(D)
    torch.testing.assert_close(plain, v_t + g * D, rtol=1e-12, atol=1e-12)
    guided = g.flatten() != 0
    assert guided.sum() > 10
    for eta in (0.0, 0.3):
        v_g, v_c_eta = gt(net, z_t, v_t, y, d, ObjectiveConfig(guidance_parallel=eta), NULL)
        torch.testing.assert_close(v_c_eta, v_c, rtol=0, atol=0)  # the tangent does not change
        torch.testing.assert_close(v_g, v_t + g * (D - D_par + eta * D_par), rtol=1e-10, atol=1e-12)
        update = (z_t - _b(d.t, x) * v_g) - (z_t - _b(d.t, x) * v_t)
        along = (update.flatten(1) * x_c).sum(1)
        if eta == 0.0:
            torch.testing.assert_close(along, torch.zeros_like(along), rtol=0, atol=1e-10)
        else:  # eta of the plain update's component along x_c
            plain_along = ((z_t - _b(d.t, x) * plain) - (z_t - _b(d.t, x) * v_t)).flatten(1).mul(x_c).sum(1)
            torch.testing.assert_close(along[guided], eta * plain_along[guided], rtol=1e-8, atol=1e-10)
            assert (plain_along[guided].abs() > 1e-3).any()


def test_guided_target_dropout_and_jvp_inputs_end_to_end():
    """Through pmf_loss with the fake net and norm_p = 0: the JVP call gets the null label on dropped samples (y
    elsewhere), the un-masked omega and the sampled [t_min, t_max]; dropped samples have v_g = v_t, others the
    guided formula; the tangent is v(y_before_dropout, omega'). So with du/dt = -0.5 v_c + 1.3 (FakeNet):
    loss_v = mean((v(y_in, omega) - v_g)^2), loss_u = mean((u + (t - r) du/dt - v_g)^2) with u = u(z_t, t, t - r)."""
    cfg = ObjectiveConfig(class_drop=0.3, norm_p=0.0)
    x, y, d = _fake_case(cfg, B=128, seed=1)
    assert d.drop_mask.any() and (d.fm_mask & ~d.drop_mask).any() and (~d.fm_mask).any()
    net = FakeNet()
    loss, m = pmf_loss(net, x, y, cfg, draws=d)

    jvp_calls = [c for c in net.calls if not c["nograd"]]
    assert len(jvp_calls) == 1 and jvp_calls[0]["heads"] == "uv"
    c = jvp_calls[0]
    y_in = torch.where(d.drop_mask, NULL, y)
    assert torch.equal(c["y"], y_in)
    assert torch.equal(c["omega"], d.omega) and torch.equal(c["t_min"], d.t_min) and torch.equal(c["t_max"], d.t_max)

    z_t = (1 - _b(d.t, x)) * x + _b(d.t, x) * d.e
    v_t = d.e - x
    inside = d.fm_mask | ((d.t >= d.t_min) & (d.t <= d.t_max))
    w = torch.where(inside, d.omega, torch.ones_like(d.omega))
    v_u = FakeNet.v_of(z_t, torch.full_like(y, NULL), torch.ones_like(w))
    v_c = FakeNet.v_of(z_t, y, w)
    v_g = torch.where(d.drop_mask.view(-1, 1, 1, 1), v_t, v_t + _b(1 - 1 / w, x) * (v_c - v_u))
    v = FakeNet.v_of(z_t, y_in, d.omega)
    V = FakeNet.u_of(z_t, d.t, d.t - d.r) + _b(d.t - d.r, x) * (-0.5 * v_c + 1.3)
    torch.testing.assert_close(m["loss_v"], ((v - v_g) ** 2).mean(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m["loss_u"], ((V - v_g) ** 2).mean(), rtol=1e-10, atol=1e-12)
    expected = ((V - v_g) ** 2).flatten(1).sum(1).mean() + ((v - v_g) ** 2).flatten(1).sum(1).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Replay and shard parity


def test_replay_and_seed_determinism():
    """pmf_loss(draws=sample_draws(g)) equals pmf_loss(generator=g') bit for bit when g, g' have the same state;
    the same seed twice gives the same loss, another seed a different one."""
    net = _net()
    x, y = _data(4)
    cfg = ObjectiveConfig()
    l_gen, _ = pmf_loss(net, x, y, cfg, generator=_gen(7))
    l_rep, _ = pmf_loss(net, x, y, cfg, draws=sample_draws(x, y, cfg, generator=_gen(7)))
    l_again, _ = pmf_loss(net, x, y, cfg, generator=_gen(7))
    l_other, _ = pmf_loss(net, x, y, cfg, generator=_gen(8))
    assert torch.equal(l_gen, l_rep) and torch.equal(l_gen, l_again)
    assert not torch.equal(l_gen, l_other)


def test_shard_parity():
    """PerSampleGenerator: sample i's draws depend only on (seed_i, global index i), so the draws of a batch of 8
    equal the concatenation of the draws of its halves (indices 0..3, 4..7), and the full-batch loss equals the
    mean of the two half-batch losses (within 1e-6, float64)."""
    net = _net()
    x, y = _data(8)
    cfg = ObjectiveConfig(class_drop=0.3)
    seeds = [11 * i + 5 for i in range(8)]
    full = sample_draws(x, y, cfg, PerSampleGenerator(seeds))
    halves = [sample_draws(x[s], y[s], cfg, PerSampleGenerator(seeds[s], list(range(8))[s]))
              for s in (slice(0, 4), slice(4, 8))]
    for f in fields(Draws):
        assert torch.equal(getattr(full, f.name), torch.cat([getattr(h, f.name) for h in halves])), f.name
    assert full.fm_mask.any() and (~full.fm_mask).any()

    l_full, _ = pmf_loss(net, x, y, cfg, generator=PerSampleGenerator(seeds))
    l_a, _ = pmf_loss(net, x[:4], y[:4], cfg, generator=PerSampleGenerator(seeds[:4], [0, 1, 2, 3]))
    l_b, _ = pmf_loss(net, x[4:], y[4:], cfg, generator=PerSampleGenerator(seeds[4:], [4, 5, 6, 7]))
    assert abs((l_full - (l_a + l_b) / 2).item()) < 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Ablation switches


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tangent", ["predicted", "target"])
def test_tangent_switch(tangent, impl, monkeypatch):
    """tangent = "predicted": the JVP tangent is v_c (guided_target's second output); "target": it is the final
    target v_g (after dropout), as in the original MeanFlow."""
    net = _net()
    x, y = _data(4)
    cfg = ObjectiveConfig(tangent=tangent, class_drop=0.5, impl=impl)
    d = sample_draws(x, y, cfg, generator=_gen(2))
    rec = []
    _spy_jvp(monkeypatch, rec)
    pmf_loss(net, x, y, cfg, draws=d)
    seen = [r["tangent"] for r in rec]
    z_t = noisy_image(x, d.t, d.e)
    v_t = conditional_velocity(z_t, x, d.t)
    v_g, v_c = guided_target(net, z_t, v_t, y, d, cfg, NULL)
    _, v_g = drop_labels(y, v_t, v_g, d, NULL)
    expected = v_c if tangent == "predicted" else v_g
    if impl == "reference":
        torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)
    else:  # the lean step runs the JVP on r != t rows only; the r = t rows' tangent is never used
        j = d.t != d.r
        assert j.any() and (~j).any()
        torch.testing.assert_close(seen[0][j], expected[j], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(v_c, v_g)


def test_lean_guidance_rows(monkeypatch):
    """The lean step's single inference call has one conditional row per r != t sample and one unconditional row
    per non-dropped sample inside its interval; the non-dropped r = t samples' conditional rows come from their own
    training forward (test_lean_matches_reference shows the values are the same)."""
    net = _net()
    x, y = _data(16)
    cfg = ObjectiveConfig(class_drop=0.3)
    d = _f64(sample_draws(x, y, cfg, generator=_gen(3)))
    inside = (d.t >= d.t_min) & (d.t <= d.t_max)
    assert d.drop_mask.any() and (d.fm_mask & ~d.drop_mask).any() and (~d.fm_mask & ~inside).any()
    rows, real = [], net.forward

    def spy(z, *a, **k):  # the guidance pass calls the network; the u / du/dt pass its trunk and heads
        rows.append(z.shape[0])
        return real(z, *a, **k)

    monkeypatch.setattr(net, "forward", spy)
    pmf_loss(net, x, y, cfg, draws=d)
    needed = int((~d.fm_mask).sum() + (inside & ~d.drop_mask).sum())
    assert rows == [lean.bucket(needed, 16, 32)]  # padded to a multiple of ceil(B / 4) (static shapes)
    assert needed < 16 + int(inside.sum())  # guided_target_lean alone: B + #inside


def test_no_v_head():
    """use_v_head = False with a net built with v_head = False: the loss runs and backpropagates, has no loss_v
    metric, and equals mean(adp(sum (V - v_g)^2)). A default config (use_v_head = True) on that net falls back to
    the same loss. With a fake net the tangent comes from the u-head boundary value u(z, t, h = 0)."""
    net = _net(v_head=False)
    x, y = _data(4)
    cfg = ObjectiveConfig(use_v_head=False)
    d = sample_draws(x, y, cfg, generator=_gen(0))
    loss, m = pmf_loss(net, x, y, cfg, draws=d)
    assert "loss_v" not in m and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    with torch.no_grad():
        s = _steps(net, x, y, d, cfg, with_v=False)
    lu = per_sample_sq_error(s["u"] + _b(d.t - d.r, x) * s["dudt"], s["v_g"])
    torch.testing.assert_close(loss.detach(), (lu / (lu + 0.01)).mean(), rtol=1e-10, atol=1e-12)
    loss_default, m2 = pmf_loss(net, x, y, ObjectiveConfig(), draws=d)
    assert "loss_v" not in m2
    torch.testing.assert_close(loss_default.detach(), loss.detach(), rtol=0, atol=0)

    fake = FakeNet()
    pmf_loss(fake, x, y, ObjectiveConfig(use_v_head=False), draws=d)
    pre = [c for c in fake.calls if c["nograd"]]
    assert pre and all(c["heads"] == "u" and (c["h"] == 0).all() for c in pre)
    assert [c["heads"] for c in fake.calls if not c["nograd"]] == ["u"]


def test_time_region_and_guidance_switches():
    """r_eq_0: r = 0 for every sample; boundaries: r in {0, t} with exactly data_proportion at r = t; r_eq_t: r = t
    everywhere; guidance = False: omega = 1 and interval [0, 1]. Each runs through pmf_loss (fake net)."""
    x = torch.zeros(2000, 1, 2, 2)
    y = torch.zeros(2000, dtype=torch.long)
    d0 = sample_draws(x, y, ObjectiveConfig(time_region="r_eq_0"), generator=_gen(0))
    assert (d0.r == 0).all() and not d0.fm_mask.any() and (d0.t > 0).all()
    db = sample_draws(x, y, ObjectiveConfig(time_region="boundaries"), generator=_gen(0))
    assert ((db.r == 0) | (db.r == db.t)).all() and int((db.r == db.t).sum()) == 1000 and (db.r == 0).sum() == 1000
    dt = sample_draws(x, y, ObjectiveConfig(time_region="r_eq_t"), generator=_gen(0))
    assert torch.equal(dt.r, dt.t)
    dg = sample_draws(x, y, ObjectiveConfig(guidance=False), generator=_gen(0))
    assert (dg.omega == 1).all() and (dg.t_min == 0).all() and (dg.t_max == 1).all()

    xs, ys = _data(8, shape=(1, 2, 2))
    for kw in (dict(time_region="r_eq_0"), dict(time_region="boundaries"), dict(guidance=False),
               dict(interval=False), dict(tr_uniform=0.5), dict(drop_among_fm=False)):
        loss, _ = pmf_loss(FakeNet(), xs, ys, ObjectiveConfig(**kw), generator=_gen(1))
        assert torch.isfinite(loss), kw
    with pytest.raises(ValueError):
        ObjectiveConfig(time_region="r_eq_1")


# ----------------------------------------------------------------------------------------------------------------
# Metrics and the loss


def test_adaptive_weight_value_and_stop_gradient():
    """adp(l) = l / sg((l + eps)^p) (MF section 4.3): value l / (l + eps)^p and derivative d adp/dl = 1 / (l + eps)^p
    (the weight is a constant), for p in {0, 0.5, 1}, eps = 0.01."""
    l = torch.tensor([0.0, 0.5, 3.0], dtype=F64, requires_grad=True)
    for p in (0.0, 0.5, 1.0):
        a = adaptive_weight(l, ObjectiveConfig(norm_p=p, norm_eps=0.01))
        (g,) = torch.autograd.grad(a.sum(), l)
        w = (l.detach() + 0.01) ** -p
        torch.testing.assert_close(a.detach(), l.detach() * w, rtol=1e-14, atol=0)
        torch.testing.assert_close(g, w, rtol=1e-14, atol=0)


def test_metrics_and_adaptive_weighting():
    """Recomputed from the named steps with the same draws: loss_u = mean((V - v_g)^2), loss_v = mean((v - v_g)^2),
    loss = mean_b[ l_u/(l_u + eps)^p + l_v/(l_v + eps)^p ] with l the per-sample sums (p = 1, eps = 0.01); with
    p = 0 it is mean(l_u) + mean(l_v)."""
    net = _net()
    x, y = _data(4)
    cfg = ObjectiveConfig()
    d = sample_draws(x, y, cfg, generator=_gen(4))
    with torch.no_grad():
        s = _steps(net, x, y, d, cfg)
    V = s["u"] + _b(d.t - d.r, x) * s["dudt"]
    lu = ((V - s["v_g"]) ** 2).flatten(1).sum(1)
    lv = ((s["v"] - s["v_g"]) ** 2).flatten(1).sum(1)

    loss, m = pmf_loss(net, x, y, cfg, draws=d)
    torch.testing.assert_close(m["loss_u"], ((V - s["v_g"]) ** 2).mean(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m["loss_v"], ((s["v"] - s["v_g"]) ** 2).mean(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss.detach(), (lu / (lu + 0.01) + lv / (lv + 0.01)).mean(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m["loss"], loss.detach())

    loss0, _ = pmf_loss(net, x, y, ObjectiveConfig(norm_p=0.0), draws=d)
    torch.testing.assert_close(loss0.detach(), lu.mean() + lv.mean(), rtol=1e-10, atol=1e-12)


def test_perceptual_term_masked_by_t():
    """Perceptual hook (P section 4.4): called with x_pred = z_t - t u (u = u(z_t, t, t - r)), x and the generator;
    its {"l2": l} term enters as mean_b[ 1.0 * adp(l * 1[t < perceptual_max_t]) ] (strict <) on top of the pMF loss,
    and perc_l2 logs mean(l * mask). A returned term without a weight raises KeyError."""
    x, y = _data(16, shape=(1, 2, 2))
    base_cfg = ObjectiveConfig()
    d = _f64(sample_draws(x, y, base_cfg, generator=_gen(5)))
    thr = float(d.t.median())
    cfg = ObjectiveConfig(perceptual_max_t=thr, perceptual_weights={"l2": 1.0})
    mask = (d.t < thr).to(F64)
    assert 0 < mask.sum() < len(mask)
    seen = {}

    def perc(x_pred, x_, gen):
        seen.update(x_pred=x_pred.detach(), x=x_, gen=gen)
        return {"l2": ((x_pred - x_) ** 2).flatten(1).sum(1)}

    g = _gen(9)
    l_with, m = pmf_loss(FakeNet(), x, y, cfg, draws=d, perceptual=perc, generator=g)
    l_without, _ = pmf_loss(FakeNet(), x, y, cfg, draws=d)

    z_t = (1 - _b(d.t, x)) * x + _b(d.t, x) * d.e
    x_pred = z_t - _b(d.t, x) * FakeNet.u_of(z_t, d.t, d.t - d.r)
    torch.testing.assert_close(seen["x_pred"], x_pred, rtol=1e-12, atol=1e-12)
    assert seen["x"] is x and seen["gen"] is g
    l2 = ((x_pred - x) ** 2).flatten(1).sum(1) * mask
    torch.testing.assert_close(m["perc_l2"], l2.mean(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(l_with - l_without, (l2 / (l2 + 0.01)).mean(), rtol=1e-10, atol=1e-12)

    with pytest.raises(KeyError):
        pmf_loss(FakeNet(), x, y, cfg, draws=d, perceptual=lambda a, b, g: {"l2": a.flatten(1).sum(1),
                                                                            "lpips": a.flatten(1).sum(1)})


# ----------------------------------------------------------------------------------------------------------------
# The lean row plan and the keyed noise


def test_lean_row_split_is_exact():
    """objective_lean.u_and_dudt with a host RowPlan (forward-mode pass on the r != t rows, a plain forward on the
    others) returns the same u and v on every row and the same du/dt on the r != t rows as the pass over every row
    (float64), and du/dt = 0 on the plain pass's rows. The plan comes from host tensors only (pmf_loss reads no device
    value), and its rows are the r != t / r = t rows. (Moved from test_speed.py, where it tested the former
    tangent_rows context variable.)"""
    net = _net()
    g = _gen(1)
    B = 5
    z, v = (torch.randn(B, 1, 8, 8, generator=g, dtype=F64) for _ in range(2))
    t = torch.tensor([0.3, 0.6, 0.9, 0.5, 0.7], dtype=F64)
    r = torch.tensor([0.1, 0.6, 0.2, 0.5, 0.0], dtype=F64)
    d = Draws(t, r, t == r, torch.zeros_like(z), torch.tensor([1.0, 2.5, 6.0, 1.5, 3.0], dtype=F64),
              torch.zeros(B, dtype=F64), torch.ones(B, dtype=F64), torch.zeros(B, dtype=torch.bool))
    y = torch.tensor([0, 2, 3, 1, 0])
    plan = lean_rows(net, d, ObjectiveConfig())
    mask = t != r
    # every r != t row goes through the tangent pass, padded with r = t rows to a multiple of ceil(B / 4) = 2
    assert set(mask.nonzero().squeeze(1).tolist()) <= set(plan.jvp.tolist()) and len(plan.jvp) == 4
    assert sorted(plan.jvp.tolist() + plan.plain.tolist()) == list(range(B))
    full = lean.u_and_dudt(net, z, d, y, v, True, lean.RowPlan.every_row(B, guidance=True))
    part = lean.u_and_dudt(net, z, d, y, v, True, plan)
    torch.testing.assert_close(part[0], full[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(part[2], full[2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(part[1][mask], full[1][mask], rtol=1e-12, atol=1e-12)
    # du/dt = 0 on the plain pass's rows; a padded r = t row of the tangent pass meets the factor t - r = 0 in V
    assert (part[1][plan.plain] == 0).all() and (full[1][~mask] != 0).any()


def test_lean_without_a_host_plan_matches_reference(monkeypatch):
    """Draws that live on an accelerator get RowPlan.every_row (no split, nothing read back). Forced here on CPU:
    the loss, metrics and gradients still equal the reference's (float64, 1e-10 / 1e-8)."""
    net = _net()
    x, y = _data(8)
    d = _f64(sample_draws(x, y, ObjectiveConfig(class_drop=0.5), generator=_gen(6)))
    params = list(net.parameters())
    out = {}
    for impl in IMPLS:
        with monkeypatch.context() as m:
            m.setattr(Draws, "on_host", lambda self: False)
            if impl == "lean":
                assert lean_rows(net, d, ObjectiveConfig()).jvp.tolist() == list(range(len(d.t)))
            loss, met = pmf_loss(net, x, y, ObjectiveConfig(impl=impl), draws=d)
        out[impl] = (met, torch.autograd.grad(loss, params, allow_unused=True))
    for k in out["reference"][0]:
        torch.testing.assert_close(out["lean"][0][k], out["reference"][0][k], rtol=1e-10, atol=1e-12)
    for a, b in zip(out["lean"][1], out["reference"][1]):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_per_sample_generator_draws_on_the_host():
    """A PerSampleGenerator's per-sample scalars are host tensors (so the lean row plan needs no device read), its
    noise is keyed_normal of the seeds times noise_scale, and its generators are host generators."""
    x, y = _data(6)
    cfg = ObjectiveConfig(noise_scale=2.0)
    gen = PerSampleGenerator([5, 6, 7, 8, 9, 10], [10, 11, 12, 13, 14, 15])
    d = sample_draws(x, y, cfg, gen)
    assert d.on_host() and all(g.device.type == "cpu" for g in gen.generators)
    torch.testing.assert_close(d.e, 2.0 * keyed_normal([5, 6, 7, 8, 9, 10], (1, 8, 8), "cpu", F64),
                               rtol=0, atol=0)
    assert torch.equal(d.fm_mask, obj.fm_pattern(torch.arange(10, 16), 0.5))
