"""The pixel MeanFlow objective (pMF Eq. 12, Algorithm 2; official ``pmf.py`` ``forward``).

    L = E || V_theta - sg(v_g) ||^2,   V_theta = u_theta + (t - r) sg(du_theta/dt)

with u_theta = (z_t - x_theta) / max(t, 0.05) (the network does that conversion), du/dt a JVP with tangent
(v_c, 1, 0) over (z, t, r), v_g the guided target built from the auxiliary v-head, per-sample summed squared errors
and adaptive weighting. :func:`pmf_loss` reads top to bottom like the algorithm box; each step is a named function.

All randomness of one evaluation is drawn up front into :class:`Draws` by :func:`sample_draws`, so a loss can be
replayed exactly (``pmf_loss(..., draws=d)``). Draws are *per sample*: with a :class:`PerSampleGenerator` every
sample's draws depend only on its own seed and its index in the global batch, so 1 process and N processes
(each holding a slice of the global batch) compute the same losses.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, fields, replace
from typing import Callable

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


@dataclass
class ObjectiveConfig:
    # --- time sampling [P Tab. 8; recipe 1.6] ---
    P_mean: float = 0.8  # logit-normal mean; positive pushes t toward 1 = noise (pMF's time convention)
    P_std: float = 0.8  # logit-normal std
    P_std_fm: float | None = None  # std for the r = t samples only (None: P_std, the recipe); a CPU-demo knob
    data_proportion: float = 0.5  # fraction of samples with r = t (plain flow matching); "ratio of r != t = 50%"
    fm_warmup_kimg: float = 0.0  # r = t fraction falls linearly from 1 to data_proportion over the first N kimg
    #   (a curriculum, not in the recipe: the JVP target bootstraps from the model's own v; see objective_at)
    tr_uniform: float = 0.0  # probability of replacing (t, r) by independent U[0, 1] draws (0.1 in the H configs)
    time_region: str = "full"  # Tab. 3b ablation: "full" | "r_eq_t" | "r_eq_0" | "boundaries" (r = t or r = 0)
    noise_scale: float = 1.0  # e = noise_scale * N(0, I); image_size / 256 in the paper
    # --- guidance-conditioned training [recipe 1.5] ---
    guidance: bool = True  # sample omega / interval and train on the guided target v_g; False: omega = 1, v_g = v_t
    cfg_max: float = 7.0  # omega in [1, 1 + cfg_max]
    cfg_beta: float = 1.0  # density of omega proportional to omega^-beta (1: log-uniform)
    interval: bool = True  # sample the guidance interval t_min ~ U[0, .5], t_max ~ U[.5, 1]; False: [0, 1]
    guidance_parallel: float = 1.0  # eta: weight of the guidance update's component along the conditional image
    #   prediction (1: plain CFG, the recipe; 0: only the orthogonal part, APG, Sadat et al. 2024; see guided_velocity)
    class_drop: float = 0.1  # probability of the null label (and v_g = v_t) for a sample
    drop_among_fm: bool = True  # official: dropped samples are r = t samples (the first ones of the batch)
    # --- the JVP and the heads ---
    tangent: str = "predicted"  # "predicted": v_c from the model (iMF/pMF); "target": the target v_g (original MF)
    use_v_head: bool = True  # False: v from the u-head at r = t (Alg. 1); no loss_v
    impl: str = "lean"  # "lean": batched guidance, JVP through trunk + u-head only; "reference": the plain step
    # --- loss [recipe 1.4] ---
    norm_p: float = 1.0  # adaptive weight: l / sg((l + eps)^p)
    norm_eps: float = 0.01
    perceptual_max_t: float = 0.8  # perceptual terms only for samples with t < this (strict)
    perceptual_weights: dict | None = None  # {name: lambda} for the terms the perceptual hook returns

    def __post_init__(self):
        if self.time_region not in ("full", "r_eq_t", "r_eq_0", "boundaries"):
            raise ValueError(f"time_region must be full | r_eq_t | r_eq_0 | boundaries, got {self.time_region!r}")
        if self.tangent not in ("predicted", "target"):
            raise ValueError(f"tangent must be 'predicted' or 'target', got {self.tangent!r}")
        if self.impl not in ("lean", "reference"):
            raise ValueError(f"impl must be 'lean' or 'reference', got {self.impl!r}")
        if not 0.0 <= self.data_proportion <= 1.0:
            raise ValueError(f"data_proportion must lie in [0, 1], got {self.data_proportion}")
        if self.guidance_parallel < 0:
            raise ValueError(f"guidance_parallel must be >= 0 (1: plain CFG), got {self.guidance_parallel}")
        if self.fm_warmup_kimg < 0:
            raise ValueError(f"fm_warmup_kimg must be >= 0 (0: no warm-up), got {self.fm_warmup_kimg}")


def objective_at(cfg: ObjectiveConfig, nimg: int) -> ObjectiveConfig:
    """The objective for the step at ``nimg`` images seen: with ``fm_warmup_kimg`` = W > 0 the r = t fraction is
    1 - (1 - data_proportion) * min(1, nimg / (1000 W)); otherwise ``cfg`` itself."""
    if cfg.fm_warmup_kimg <= 0:
        return cfg
    ramp = min(1.0, nimg / (1000.0 * cfg.fm_warmup_kimg))
    return replace(cfg, data_proportion=1.0 - (1.0 - cfg.data_proportion) * ramp, fm_warmup_kimg=0.0)


# ----------------------------------------------------------------------------------------------------------------
# Randomness


class PerSampleGenerator:
    """One ``torch.Generator`` per sample (EDM2's stacked generator): sample i's draws depend only on ``seeds[i]``.
    ``indices`` are the samples' positions in the global batch (they decide which samples have r = t)."""

    def __init__(self, seeds, indices=None, device="cpu"):
        self.generators = [torch.Generator(device=device).manual_seed(int(s) % (2**63)) for s in seeds]
        self.indices = torch.arange(len(seeds)) if indices is None else torch.as_tensor(indices)
        self.device = torch.device(device)


_NUM_UNIFORMS = 9  # columns: unif_mask, t_unif, r_unif, omega, t_min, t_max, drop, (2 spare for stable layout)
_NUM_NORMALS = 2  # columns: t, r (logit-normal)


def _raw_draws(x: torch.Tensor, generator):
    """(uniforms (B, 9), normals (B, 2), e0 (B, ...) ~ N(0, I), global indices (B,))."""
    B, dev = x.shape[0], x.device
    if isinstance(generator, PerSampleGenerator):
        if len(generator.generators) != B:
            raise ValueError(f"PerSampleGenerator has {len(generator.generators)} seeds for a batch of {B}")
        uni, nor, e0 = [], [], []
        for g in generator.generators:
            uni.append(torch.rand(_NUM_UNIFORMS, generator=g, device=g.device))
            nor.append(torch.randn(_NUM_NORMALS, generator=g, device=g.device))
            e0.append(torch.randn(x.shape[1:], generator=g, device=g.device))
        return (torch.stack(uni).to(dev), torch.stack(nor).to(dev), torch.stack(e0).to(dev, x.dtype),
                generator.indices.to(dev))
    uni = torch.rand(B, _NUM_UNIFORMS, generator=generator, device=dev)
    nor = torch.randn(B, _NUM_NORMALS, generator=generator, device=dev)
    e0 = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype)
    return uni, nor, e0, torch.arange(B, device=dev)


@dataclass
class Draws:
    """Every random quantity of one loss evaluation. All (B,) except e (B, C, H, W), already noise-scaled."""

    t: torch.Tensor
    r: torch.Tensor
    fm_mask: torch.Tensor  # bool: r = t (flow-matching) samples
    e: torch.Tensor
    omega: torch.Tensor  # sampled guidance scale (un-masked)
    t_min: torch.Tensor
    t_max: torch.Tensor
    drop_mask: torch.Tensor  # bool: label replaced by the null class

    def to(self, device) -> "Draws":
        return Draws(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def fm_pattern(indices: torch.Tensor, proportion: float) -> torch.Tensor:
    """Which global batch positions get r = t: exactly ``proportion`` of any contiguous run (within one sample),
    interleaved: floor((i + 1) p) > floor(i p). The official code takes the first p*B of each device's batch; an
    interleaved pattern gives the same proportion per batch and does not depend on how the batch is sharded."""
    i = indices.double()
    return torch.floor((i + 1) * proportion) > torch.floor(i * proportion)


def sample_t_r(uni, nor, indices, cfg: ObjectiveConfig):
    """t, r ~ logit-normal(P_mean, P_std) independently (std ``P_std_fm`` on the r = t samples when set); optional
    U[0, 1] replacement with prob tr_uniform; r = t on the flow-matching samples; then (t, r) = (max, min)
    [recipe 1.6; Tab. 3b regions]."""
    proportion = {"full": cfg.data_proportion, "boundaries": cfg.data_proportion, "r_eq_t": 1.0, "r_eq_0": 0.0}
    fm_mask = fm_pattern(indices, proportion[cfg.time_region])
    std = cfg.P_std if cfg.P_std_fm is None else torch.where(fm_mask, cfg.P_std_fm, cfg.P_std).to(nor)
    t = torch.sigmoid(nor[:, 0] * std + cfg.P_mean)
    r = torch.sigmoid(nor[:, 1] * std + cfg.P_mean)
    unif = uni[:, 0] < cfg.tr_uniform
    t, r = torch.where(unif, uni[:, 1], t), torch.where(unif, uni[:, 2], r)
    r = torch.where(fm_mask, t, r)  # r <- t *before* the sort (official order): t stays one draw on r = t samples
    t, r = torch.maximum(t, r), torch.minimum(t, r)
    if cfg.time_region in ("r_eq_0", "boundaries"):
        r = torch.where(fm_mask, t, torch.zeros_like(r))  # the other boundary of the (r, t) triangle: r = 0
    return t, r, fm_mask


def sample_cfg_scale(u: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """omega on [1, 1 + cfg_max] with density proportional to omega^-beta, by inverting the CDF of U ~ U[0, 1]:
    beta = 1: omega = (1 + s)^U;  else omega = (1 + U ((1 + s)^(1 - beta) - 1))^(1 / (1 - beta))."""
    if not cfg.guidance:
        return torch.ones_like(u)
    s, b = cfg.cfg_max, cfg.cfg_beta
    if b == 1.0:
        return torch.exp(u * math.log1p(s))
    return (1 + u * ((1 + s) ** (1 - b) - 1)) ** (1 / (1 - b))


def sample_cfg_interval(u_min, u_max, fm_mask, cfg: ObjectiveConfig):
    """t_min ~ U[0, 0.5], t_max ~ U[0.5, 1]; flow-matching samples are always guided: [0, 1]."""
    if not (cfg.guidance and cfg.interval):
        return torch.zeros_like(u_min), torch.ones_like(u_max)
    t_min, t_max = 0.5 * u_min, 0.5 + 0.5 * u_max
    return torch.where(fm_mask, 0.0, t_min), torch.where(fm_mask, 1.0, t_max)


def sample_drop_mask(u, fm_mask, cfg: ObjectiveConfig) -> torch.Tensor:
    """Class dropout. Official: the first Binomial(B, p) samples of the batch, which are r = t samples, so each r = t
    sample is dropped with probability p / data_proportion. With ``drop_among_fm`` we draw that per sample (same
    marginal, shard-independent); otherwise each sample with probability p."""
    if cfg.drop_among_fm and bool(fm_mask.any()) and cfg.data_proportion > 0:
        p = min(1.0, cfg.class_drop / cfg.data_proportion) if cfg.time_region != "r_eq_t" else cfg.class_drop
        return fm_mask & (u < p)
    return u < cfg.class_drop


def sample_draws(x: torch.Tensor, y: torch.Tensor | None, cfg: ObjectiveConfig, generator=None) -> Draws:
    """All random draws of one loss evaluation, from a ``torch.Generator`` or a :class:`PerSampleGenerator`."""
    uni, nor, e0, indices = _raw_draws(x, generator)
    t, r, fm_mask = sample_t_r(uni, nor, indices, cfg)
    omega = sample_cfg_scale(uni[:, 3], cfg)
    t_min, t_max = sample_cfg_interval(uni[:, 4], uni[:, 5], fm_mask, cfg)
    drop = sample_drop_mask(uni[:, 6], fm_mask, cfg)
    return Draws(t, r, fm_mask, e0 * cfg.noise_scale, omega, t_min, t_max, drop)


# ----------------------------------------------------------------------------------------------------------------
# The steps of the objective


def _b(t, like):
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def noisy_image(x, t, e):
    """z_t = (1 - t) x + t e  [P Eq. 1]."""
    return (1 - _b(t, x)) * x + _b(t, x) * e


def conditional_velocity(z_t, x, t):
    """v_t = (z_t - x) / clip(t, 0.05) = e - x for t >= 0.05  [P Eq. 2; official code]."""
    return (z_t - x) / _b(t.clamp(min=0.05), x)


def boundary_velocity(net, z, t, omega, y, use_v_head: bool):
    """Instantaneous velocity v(z_t, t | y, omega) predicted by the model, with h = 0 and interval [0, 1]
    (official ``v_cond_fn``): the v-head, or the u-head's boundary value u(z, t, t) without a v-head (Alg. 1)."""
    h, lo, hi = torch.zeros_like(t), torch.zeros_like(t), torch.ones_like(t)
    use_v_head = use_v_head and getattr(net, "has_v_head", True)  # same fallback as pmf_loss for a v-head-less net
    u, v = net(z, t, h, omega, lo, hi, y, heads="v" if use_v_head else "u")
    return v if use_v_head else u


@torch.no_grad()
def guided_target(net, z_t, v_t, y, d: Draws, cfg: ObjectiveConfig, null_label: int):
    """(v_g, v_c): the guided velocity target and the tangent for the JVP  [P Alg. 2; official ``guidance_fn``].

    v_c, v_u = v(z | y, omega), v(z | null, 1). For r = t samples, v_g = v_t + (1 - 1/omega)(v_c - v_u).
    Otherwise omega is reset to 1 outside [t_min, t_max], v_c recomputed with that masked omega', and
    v_g = v_t + (1 - 1/omega')(v_c' - v_u). v_c' is the tangent (equal to v_c wherever the mask changed nothing).
    Without guidance: v_g = v_t and the tangent is v(z | y, 1).
    """
    B = z_t.shape[0]
    if not cfg.guidance:
        return v_t, boundary_velocity(net, z_t, d.t, d.omega, y, cfg.use_v_head)
    both = boundary_velocity(net, torch.cat([z_t, z_t]), torch.cat([d.t, d.t]),
                             torch.cat([d.omega, torch.ones_like(d.omega)]),
                             torch.cat([y, torch.full_like(y, null_label)]), cfg.use_v_head)
    v_c, v_u = both[:B], both[B:]
    v_g_fm = guided_velocity(v_t, v_c, v_u, d.omega, z_t, d.t, cfg.guidance_parallel)
    inside = (d.t >= d.t_min) & (d.t <= d.t_max)
    omega_m = torch.where(inside, d.omega, torch.ones_like(d.omega))
    v_c = boundary_velocity(net, z_t, d.t, omega_m, y, cfg.use_v_head)
    v_g = guided_velocity(v_t, v_c, v_u, omega_m, z_t, d.t, cfg.guidance_parallel)
    return torch.where(_b(d.fm_mask, z_t), v_g_fm, v_g), v_c


def guided_velocity(v_t, v_c, v_u, omega_m, z_t, t, parallel: float = 1.0):
    """v_g = v_t + (1 - 1/omega')(v_c' - v_u)  [P Alg. 2]; outside the interval omega' = 1 and v_g = v_t.

    ``parallel`` (eta) < 1 scales the part of the guidance difference D = v_c' - v_u that lies along the conditional
    image prediction x_c = z_t - t v_c' (per sample): D <- D - (1 - eta) <D, x_c> / |x_c|^2 x_c. Since x = z_t - t v,
    this is the same split of the image-space update -t D (APG, Sadat et al. 2024: the parallel part is what
    over-saturates at high omega). eta = 1 is the recipe."""
    D = v_c - v_u
    if parallel != 1.0:
        x_c = (z_t - _b(t, z_t) * v_c).flatten(1)
        coef = (D.flatten(1) * x_c).sum(1) / x_c.pow(2).sum(1).clamp(min=1e-12)
        D = D - (1.0 - parallel) * _b(coef, D) * x_c.view_as(D)
    return v_t + (1 - 1 / _b(omega_m, v_t)) * D


def masked_omega(d: Draws) -> tuple[torch.Tensor, torch.Tensor]:
    """(inside, omega'): whether t lies in [t_min, t_max], and omega there, 1 outside."""
    inside = (d.t >= d.t_min) & (d.t <= d.t_max)
    return inside, torch.where(inside, d.omega, torch.ones_like(d.omega))


@torch.no_grad()
def guidance_velocities(net, z_t, y, d: Draws, omega_m, cond_rows, null_rows, use_v_head: bool, null_label: int):
    """(v_c', v_u), each (B, ...): v(z | y, omega') on the ``cond_rows`` and v(z | null, 1) on the ``null_rows``
    (zeros elsewhere), from ONE inference-mode call through the trunk and the v-head on just those rows."""
    i_c, i_u = cond_rows.nonzero().squeeze(1), null_rows.nonzero().squeeze(1)
    with torch.inference_mode():  # cheaper than no_grad; the copies below make the results normal tensors again
        out = boundary_velocity(net, torch.cat([z_t[i_c], z_t[i_u]]), torch.cat([d.t[i_c], d.t[i_u]]),
                                torch.cat([omega_m[i_c], torch.ones_like(omega_m[i_u])]),
                                torch.cat([y[i_c], torch.full_like(y[i_u], null_label)]), use_v_head)
    v_c, v_u = torch.zeros_like(z_t), torch.zeros_like(z_t)  # inference tensors may not enter autograd or forward AD
    v_c[i_c], v_u[i_u] = out[: len(i_c)], out[len(i_c):]
    return v_c, v_u


@torch.no_grad()
def guided_target_lean(net, z_t, v_t, y, d: Draws, cfg: ObjectiveConfig, null_label: int):
    """:func:`guided_target` in one inference-mode call through the trunk and the v-head, on B + (number of samples
    inside their interval) rows: [z | y, omega'] for every sample (omega' = omega inside [t_min, t_max], 1 outside:
    that is v_c' for all of them) and [z | null, 1] for the samples inside only. Outside, 1 - 1/omega' = 0, so
    v_g = v_t and v_u is not needed; flow-matching samples are always inside ([0, 1]), where omega' = omega and
    v_c' = v_c. One formula covers every sample: v_g = v_t + (1 - 1/omega')(v_c' - v_u)."""
    if not cfg.guidance:
        return guided_target(net, z_t, v_t, y, d, cfg, null_label)
    inside, omega_m = masked_omega(d)
    v_c, v_u = guidance_velocities(net, z_t, y, d, omega_m, torch.ones_like(inside), inside, cfg.use_v_head,
                                   null_label)
    v_u = torch.where(_b(inside, v_u), v_u, v_c)  # outside: v_c' - v_u = 0 (its factor 1 - 1/omega' is 0 anyway)
    return guided_velocity(v_t, v_c, v_u, omega_m, z_t, d.t, cfg.guidance_parallel), v_c


def drop_labels(y, v_t, v_g, d: Draws, null_label: int):
    """Class dropout: dropped samples get the null label and the unguided target v_g = v_t."""
    return torch.where(d.drop_mask, null_label, y), torch.where(_b(d.drop_mask, v_t), v_t, v_g)


def u_and_dudt(net, z_t, d: Draws, y, tangent_v, with_v: bool):
    """(u, du/dt, v) = jvp of (z, t, r) -> net(z, t, h = t - r, omega, t_min, t_max, y) along (v, 1, 0)
    [MF Eq. 8: du/dt = v d_z u + d_t u]. The net sees the *un-masked* omega and the labels after dropout (official).
    The v-head output is an auxiliary primal (no tangent needed for the loss)."""

    def u_fn(z, t, r):
        u, v = net(z, t, t - r, d.omega, d.t_min, d.t_max, y, heads="uv" if with_v else "u")
        return u, (() if v is None else (v,))  # torch.func.jvp's aux must hold tensors only, never None

    u, dudt, aux = torch.func.jvp(u_fn, (z_t, d.t, d.r), (tangent_v, torch.ones_like(d.t), torch.zeros_like(d.r)),
                                  has_aux=True)
    return u, dudt, (aux[0] if aux else None)


def _tangent(x):
    """The forward-mode tangent of ``x`` at the current dual level, or None (not a tensor, or not dual)."""
    return fwAD.unpack_dual(x).tangent if isinstance(x, torch.Tensor) else None


_MUL = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}
_ADD = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}
_SUB = {torch.sub, torch.Tensor.sub, torch.Tensor.__sub__}
_DIV = {torch.div, torch.Tensor.div, torch.Tensor.__truediv__}


class ConstantOperandTangents(TorchFunctionMode):
    """Forward-mode rules for ops with one dual and one constant tensor operand (a weight, a gate, RoPE's cos/sin,
    a time factor): only the non-zero tangent term is computed, under no_grad.

    PyTorch's generic rules materialise the constant operand's zero tangent and run the full product rule, so a
    linear layer costs three matmuls instead of two and ``x * w`` three products and an add (measured: the forward-AD
    pass through trunk + u-head ran at ~1.6x the cost it has with this mode; see benchmarks/README.md). Rules:

        linear(x, W, b): (x W^T + b,  dx W^T)      x * c, x / c: (.,  dx * c, dx / c)
        x + c, x - c:    (.,  dx)                  c - x: (.,  -dx)

    The tangents are built without autograd history (no_grad): the objective stops gradients through du/dt anyway
    (a detach), so recording them would only cost time and memory. Use only where tangents are never
    differentiated. Every other op keeps PyTorch's own rule. Results equal the generic rules' (the same products, minus
    the zero ones)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs or len(args) < 2:
            return func(*args, **(kwargs or {}))
        if func is F.linear:
            x, w, b = args[0], args[1], (args[2] if len(args) > 2 else None)
            dx = _tangent(x)
            if dx is None or _tangent(w) is not None or _tangent(b) is not None:
                return func(*args)
            out = F.linear(fwAD.unpack_dual(x).primal, w, b)
            with torch.no_grad():
                d_out = F.linear(dx, w)
            return fwAD.make_dual(out, d_out)  # outside no_grad: out keeps its autograd history
        if len(args) != 2 or not (func in _MUL or func in _ADD or func in _SUB or func in _DIV):
            return func(*args)
        a, b = args
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return func(*args)
        da, db = _tangent(a), _tangent(b)
        if (da is None) == (db is None) or (db is not None and func in _DIV):  # both/neither dual, or c / x
            return func(*args)
        out = func(fwAD.unpack_dual(a).primal if da is not None else a,
                   fwAD.unpack_dual(b).primal if db is not None else b)
        with torch.no_grad():
            if func in _MUL:
                d_out = da * b if da is not None else a * db
            elif func in _DIV:
                d_out = da / b
            elif func in _ADD:
                d_out = da if da is not None else db
            else:
                d_out = da if da is not None else -db
            if d_out.shape != out.shape:  # broadcast: x + c with c larger than x
                d_out = d_out.expand(out.shape)
            d_out = d_out.to(out.dtype)
        return fwAD.make_dual(out, d_out)


def _u_dudt_trunk(net, z_t, tangent_v, t, r, omega, t_min, t_max, y):
    """(u, du/dt, trunk primal): dual numbers (z, t, r) + eps (v, 1, 0) through the trunk and the u-head."""
    with fwAD.dual_level(), ConstantOperandTangents():
        z, t_d, r_d = fwAD.make_dual(z_t, tangent_v), fwAD.make_dual(t, torch.ones_like(t)), \
            fwAD.make_dual(r, torch.zeros_like(r))
        trunk_out = net.trunk(z, t_d, t_d - r_d, omega, t_min, t_max, y)
        u, dudt = fwAD.unpack_dual(net.to_velocity(z, t_d, net.head(trunk_out, "u")))
        return u, dudt, fwAD.unpack_dual(trunk_out).primal


# Rows of the batch whose du/dt the caller uses (a (B,) bool tensor), or None for all rows. pmf_loss sets it to t != r
# around its u_and_dudt_lean call: du/dt enters the loss as (t - r) sg(du/dt), so the r = t rows (half the batch by
# default) need no forward-mode pass. A context variable, not an argument, so the two JVP steps keep one signature.
_TANGENT_ROWS: ContextVar[torch.Tensor | None] = ContextVar("pmf_tangent_rows", default=None)


@contextmanager
def tangent_rows(mask: torch.Tensor | None):
    """Within this block, :func:`u_and_dudt_lean` computes du/dt only on the rows where ``mask`` is True (0 elsewhere)."""
    token = _TANGENT_ROWS.set(mask)
    try:
        yield
    finally:
        _TANGENT_ROWS.reset(token)


def u_and_dudt_lean(net, z_t, d: Draws, y, tangent_v, with_v: bool):
    """:func:`u_and_dudt` with forward-mode AD only where a tangent is needed: dual numbers through the trunk and
    the u-head; the v-head runs afterwards on the trunk's primal output (it needs gradients, not tangents).

    Inside ``with tangent_rows(mask)`` only the masked rows run the forward-mode pass; the others run a plain forward
    and get du/dt = 0 (the network is row-independent, so splitting the batch changes no value). The tangent rules
    of :class:`ConstantOperandTangents` apply: du/dt carries no usable autograd history (the loss detaches it)."""
    args = (d.t, d.r, d.omega, d.t_min, d.t_max, y)
    need = _TANGENT_ROWS.get()
    if need is None or bool(need.all()):
        u, dudt, trunk = _u_dudt_trunk(net, z_t, tangent_v, *args)
    else:
        j, p = need.nonzero().squeeze(1), (~need).nonzero().squeeze(1)
        us, dudts, trunks = [], [], []
        if len(j):
            u_j, dudt_j, trunk_j = _u_dudt_trunk(net, z_t[j], tangent_v[j], *(a[j] for a in args))
            us.append(u_j), dudts.append(dudt_j), trunks.append(trunk_j)
        z_p, (t_p, r_p, omega_p, lo_p, hi_p, y_p) = z_t[p], (a[p] for a in args)
        trunk_p = net.trunk(z_p, t_p, t_p - r_p, omega_p, lo_p, hi_p, y_p)
        u_p = net.to_velocity(z_p, t_p, net.head(trunk_p, "u"))
        us.append(u_p), dudts.append(torch.zeros_like(u_p)), trunks.append(trunk_p)
        inv = torch.argsort(torch.cat([j, p]))  # back to batch order
        u, dudt, trunk = (torch.cat(xs)[inv] for xs in (us, dudts, trunks))
    v = net.to_velocity(z_t, d.t, net.head(trunk, "v")) if with_v else None
    return u, dudt, v


def lean_guided_step(net, z_t, v_t, y, d: Draws, cfg: ObjectiveConfig, null_label: int, with_v: bool):
    """(u, du/dt, v, v_g): :func:`guided_target_lean`, :func:`drop_labels` and :func:`u_and_dudt_lean` (inside
    ``tangent_rows(t != r)``) in one, computing fewer guidance rows. The same values, because:

    * a non-dropped r = t sample's conditional guidance row v(z_t | y, omega') has exactly the inputs of its own
      training forward (h = 0, interval [0, 1], omega' = omega, label y), so its v_c is that forward's v-head output
      (the u-head's without a v-head), detached, not a separate inference row;
    * dropped samples have v_g = v_t, so they need no unconditional row (and dropped r = t ones no row at all).

    The inference call then has (r != t samples) + (non-dropped samples inside their interval) rows instead of
    B + (samples inside). The tangent only matters on r != t rows (r = t rows run no forward-mode pass)."""
    inside, omega_m = masked_omega(d)
    reuse = d.fm_mask & ~d.drop_mask  # v_c from the training forward
    need_u = inside & ~d.drop_mask  # v_u is used
    # conditional rows: the r != t samples only (r = t ones: reused, or dropped and then not needed at all)
    v_c, v_u = guidance_velocities(net, z_t, y, d, omega_m, ~d.fm_mask, need_u, cfg.use_v_head, null_label)
    y_in = torch.where(d.drop_mask, null_label, y)

    def target(v_c):
        v_g = guided_velocity(v_t, v_c, torch.where(_b(need_u, v_u), v_u, v_c), omega_m, z_t, d.t,
                              cfg.guidance_parallel)
        return torch.where(_b(d.drop_mask, v_t), v_t, v_g)

    tangent_v = v_c if cfg.tangent == "predicted" else target(v_c)  # final on every r != t row
    with tangent_rows(d.t != d.r):
        u, dudt, v = u_and_dudt_lean(net, z_t, d, y_in, tangent_v, with_v)
    v_c = torch.where(_b(reuse, v_c), (v if with_v else u).detach(), v_c)
    return u, dudt, v, target(v_c).detach()


def compound_velocity(u, dudt, t, r):
    """V = u + (t - r) sg(du/dt)  [P Eq. 7 / 12]. The stop-gradient is a detach (no_grad would not stop tangents)."""
    return u + _b(t - r, u) * dudt.detach()


def adaptive_weight(loss: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """l / sg((l + eps)^p), per sample  [MF section 4.3; official adp_wt_fn]."""
    return loss / (loss + cfg.norm_eps).pow(cfg.norm_p).detach()


def per_sample_sq_error(a, b):
    return (a - b).pow(2).flatten(1).sum(1)


def perceptual_term(perceptual, z_t, u, x, d: Draws, cfg: ObjectiveConfig, generator):
    """sum_k lambda_k adp(L_k(x_pred, x)) on samples with t < t_thr, x_pred = z_t - t u  [P section 4.4].
    ``perceptual(x_pred, x, generator) -> {name: (B,) loss}``. Returns ((B,) term, {name: mean loss})."""
    x_pred = z_t - _b(d.t, z_t) * u
    terms = perceptual(x_pred, x, generator)
    mask = (d.t < cfg.perceptual_max_t).to(x.dtype)
    weights = cfg.perceptual_weights or {}
    total = torch.zeros_like(d.t, dtype=x.dtype)
    logs = {}
    for name, value in terms.items():
        if name not in weights:
            raise KeyError(f"perceptual term {name!r} has no weight; set objective.perceptual_weights.{name}")
        value = value * mask
        total = total + weights[name] * adaptive_weight(value, cfg)
        logs[f"perc_{name}"] = value.detach().mean()
    return total, logs


def pmf_loss(net, x, y, cfg: ObjectiveConfig, generator=None, draws: Draws | None = None,
             perceptual: Callable | None = None):
    """The pMF training loss. x: (B, C, H, W) clean images in [-1, 1]; y: (B,) labels or None (unconditional).
    Returns (loss, metrics): loss = mean_batch(adp(loss_u) + adp(loss_v) + perceptual)."""
    null_label = net.num_classes
    if y is None:
        y = torch.full((x.shape[0],), null_label, dtype=torch.long, device=x.device)
    d = draws if draws is not None else sample_draws(x, y, cfg, generator)
    use_v = cfg.use_v_head and getattr(net, "has_v_head", True)

    lean = cfg.impl == "lean" and hasattr(net, "trunk")  # the lean path needs the trunk / head split
    z_t = noisy_image(x, d.t, d.e)
    v_t = conditional_velocity(z_t, x, d.t)
    if lean and cfg.guidance:  # the steps below, fused to share the r = t samples' forward with the guidance
        u, dudt, v, v_g = lean_guided_step(net, z_t, v_t, y, d, cfg, null_label, use_v)
    else:
        v_g, v_c = guided_target(net, z_t, v_t, y, d, cfg, null_label)  # lean without guidance: one call too
        y_in, v_g = drop_labels(y, v_t, v_g, d, null_label)
        v_g = v_g.detach()
        tangent_v = v_c if cfg.tangent == "predicted" else v_g
        with tangent_rows(d.t != d.r if lean else None):  # du/dt is multiplied by t - r: the r = t rows need none
            u, dudt, v = (u_and_dudt_lean if lean else u_and_dudt)(net, z_t, d, y_in, tangent_v.detach(), use_v)
    V = compound_velocity(u, dudt, d.t, d.r)

    loss_u = adaptive_weight(per_sample_sq_error(V, v_g), cfg)
    total = loss_u
    metrics = {"loss_u": (V - v_g).pow(2).mean().detach()}
    if use_v:
        total = total + adaptive_weight(per_sample_sq_error(v, v_g), cfg)
        metrics["loss_v"] = (v - v_g).pow(2).mean().detach()
    if perceptual is not None:
        term, logs = perceptual_term(perceptual, z_t, u, x, d, cfg, generator)
        total = total + term
        metrics.update(logs)
    loss = total.mean()
    metrics["loss"] = loss.detach()
    return loss, metrics
