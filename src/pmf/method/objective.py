"""The pixel MeanFlow objective (pMF Eq. 12, Algorithm 2; official ``pmf.py`` ``forward``).

    L = E || V_theta - sg(v_g) ||^2,   V_theta = u_theta + (t - r) sg(du_theta/dt)

with u_theta = (z_t - x_theta) / max(t, 0.05) (the network does that conversion), du/dt a JVP with tangent
(v_c, 1, 0) over (z, t, r), v_g the guided target built from the auxiliary v-head, per-sample summed squared errors
and adaptive weighting. :func:`pmf_loss` reads top to bottom like the algorithm box, one named step a line: draws
(official ``sample_tr``, ``sample_cfg_interval``, ``sample_cfg_scale``), noisy image, ``guidance_fn``'s network
velocities, ``cond_drop``, u and du/dt (``jax.jvp(u_fn, ...)``), the guided target, compound V, adaptive weights
(``adp_wt_fn``), the heads' losses. ``impl`` only picks who computes the two network passes: the reference functions
here, or :mod:`pmf.method.objective_lean` on the rows a host-side :class:`~pmf.method.objective_lean.RowPlan` names.

The step reads no device value on the host (no ``.item()``, ``bool(tensor)``, ``nonzero`` or data-dependent shapes):
the r = t rows are a pattern over the host-known batch indices, a :class:`PerSampleGenerator` draws the per-sample
scalars on the host and the noise on the device, and everything shaped by them is planned on the host.

All randomness of one evaluation is drawn up front into :class:`Draws` by :func:`sample_draws`, so a loss can be
replayed exactly (``pmf_loss(..., draws=d)``). Draws are *per sample*: with a :class:`PerSampleGenerator` every
sample's draws depend only on its own seed and its index in the global batch, so 1 process and N processes
(each holding a slice of the global batch) compute the same losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Callable

import torch

from pmf.method import objective_lean
from pmf.method.model import T_CLIP, bcast as _b  # _b: (B,) -> (B, 1, ..., 1)
from pmf.method.objective_lean import RowPlan
from pmf.method.rng import PerSampleGenerator, keyed_normal


@dataclass
class ObjectiveConfig:
    # --- time sampling [P Tab. 8; official pmf.py: sample_tr] ---
    P_mean: float = 0.8  # logit-normal mean; positive pushes t toward 1 = noise (pMF's time convention)
    P_std: float = 0.8  # logit-normal std
    P_std_fm: float | None = None  # std for the r = t samples only (None: P_std, as official); a CPU-demo knob
    data_proportion: float = 0.5  # fraction of samples with r = t (plain flow matching); "ratio of r != t = 50%"
    fm_warmup_kimg: float = 0.0  # r = t fraction falls linearly from 1 to data_proportion over the first N kimg
    #   (a curriculum, not in the paper: the JVP target bootstraps from the model's own v; see objective_at)
    tr_uniform: float = 0.0  # probability of replacing (t, r) by independent U[0, 1] draws (0.1 in the H configs)
    time_region: str = "full"  # Tab. 3b ablation: "full" | "r_eq_t" | "r_eq_0" | "boundaries" (r = t or r = 0)
    noise_scale: float = 1.0  # e = noise_scale * N(0, I); image_size / 256 in the paper
    # --- guidance-conditioned training [P Alg. 2; official pmf.py: sample_cfg_scale, sample_cfg_interval] ---
    guidance: bool = True  # sample omega / interval and train on the guided target v_g; False: omega = 1, v_g = v_t
    cfg_max: float = 7.0  # omega in [1, 1 + cfg_max]
    cfg_beta: float = 1.0  # density of omega proportional to omega^-beta (1: log-uniform)
    interval: bool = True  # sample the guidance interval t_min ~ U[0, .5], t_max ~ U[.5, 1]; False: [0, 1]
    guidance_parallel: float = 1.0  # eta: weight of the guidance update's component along the conditional image
    #   prediction (1: plain CFG, as official; 0: only the orthogonal part, APG, Sadat et al. 2024; see guided_velocity)
    class_drop: float = 0.1  # probability of the null label (and v_g = v_t) for a sample
    drop_among_fm: bool = True  # official: dropped samples are r = t samples (the first ones of the batch)
    # --- the JVP and the heads ---
    tangent: str = "predicted"  # "predicted": v_c from the model (iMF/pMF); "target": the target v_g (original MF)
    use_v_head: bool = True  # False: v from the u-head at r = t (Alg. 1); no loss_v
    impl: str = "lean"  # "lean": batched guidance, JVP through trunk + u-head only; "reference": the plain step
    # --- loss [P Eq. 12, section 4.4; official pmf.py: adp_wt_fn] ---
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
# Randomness (per-sample streams: pmf.method.rng)

_NUM_UNIFORMS = 9  # columns: unif_mask, t_unif, r_unif, omega, t_min, t_max, drop, (2 spare for stable layout)
_NUM_NORMALS = 2  # columns: t, r (logit-normal)


def _raw_draws(x: torch.Tensor, generator):
    """(uniforms (B, 9), normals (B, 2), e0 (B, ...) ~ N(0, I), global indices (B,) on the host).

    PerSampleGenerator: uniforms and normals on the host, e0 on x's device. Otherwise (a ``torch.Generator`` on x's
    device, or None for the global one): everything on x's device, in one call per kind (the plain batched draws)."""
    B, dev = x.shape[0], x.device
    if isinstance(generator, PerSampleGenerator):
        if len(generator.generators) != B:
            raise ValueError(f"PerSampleGenerator has {len(generator.generators)} seeds for a batch of {B}")
        uni = torch.stack([torch.rand(_NUM_UNIFORMS, generator=g) for g in generator.generators])
        nor = torch.stack([torch.randn(_NUM_NORMALS, generator=g) for g in generator.generators])
        e0 = keyed_normal(generator.seeds, x.shape[1:], dev, x.dtype)
        return uni, nor, e0, generator.indices
    uni = torch.rand(B, _NUM_UNIFORMS, generator=generator, device=dev)
    nor = torch.randn(B, _NUM_NORMALS, generator=generator, device=dev)
    e0 = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype)
    return uni, nor, e0, torch.arange(B)


@dataclass
class Draws:
    """Every random quantity of one loss evaluation. All (B,) except e (B, C, H, W), already noise-scaled.
    Invariant (what :func:`sample_draws` returns): r = t on the ``fm_mask`` rows, whose interval is [0, 1].
    The scalars may live on the host while e lives on the batch's device (:class:`PerSampleGenerator`);
    :func:`pmf_loss` moves them over."""

    t: torch.Tensor
    r: torch.Tensor
    fm_mask: torch.Tensor  # bool: r = t (flow-matching) samples
    e: torch.Tensor
    omega: torch.Tensor  # sampled guidance scale (un-masked)
    t_min: torch.Tensor
    t_max: torch.Tensor
    drop_mask: torch.Tensor  # bool: label replaced by the null class

    def to(self, device) -> "Draws":
        """On ``device``. Copies to an accelerator do not block the host (nothing is read back); copies to the host
        do (their values are about to be read)."""
        non_blocking = torch.device(device).type != "cpu"
        return Draws(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def on_host(self) -> bool:
        """Whether every per-sample scalar is a CPU tensor (then row plans can be read without a device sync)."""
        return all(getattr(self, f.name).device.type == "cpu" for f in fields(self) if f.name != "e")


def fm_pattern(indices: torch.Tensor, proportion: float) -> torch.Tensor:
    """Which global batch positions get r = t: exactly ``proportion`` of any contiguous run (within one sample),
    interleaved: floor((i + 1) p) > floor(i p). The official code takes the first p*B of each device's batch; an
    interleaved pattern gives the same proportion per batch and does not depend on how the batch is sharded."""
    i = indices.double()
    return torch.floor((i + 1) * proportion) > torch.floor(i * proportion)


def fm_proportion(cfg: "ObjectiveConfig") -> float:
    """The r = t fraction of the batch for the time region (Tab. 3b)."""
    return {"full": cfg.data_proportion, "boundaries": cfg.data_proportion, "r_eq_t": 1.0, "r_eq_0": 0.0}[
        cfg.time_region]


def sample_t_r(uni, nor, fm_mask, cfg: ObjectiveConfig):
    """t, r ~ logit-normal(P_mean, P_std) independently (std ``P_std_fm`` on the r = t samples when set); optional
    U[0, 1] replacement with prob tr_uniform; r = t on the flow-matching samples ``fm_mask``; then (t, r) = (max, min)
    [official ``pmf.py: sample_tr``; Tab. 3b regions]."""
    std = cfg.P_std if cfg.P_std_fm is None else torch.where(fm_mask, cfg.P_std_fm, cfg.P_std).to(nor)
    t = torch.sigmoid(nor[:, 0] * std + cfg.P_mean)
    r = torch.sigmoid(nor[:, 1] * std + cfg.P_mean)
    unif = uni[:, 0] < cfg.tr_uniform
    t, r = torch.where(unif, uni[:, 1], t), torch.where(unif, uni[:, 2], r)
    r = torch.where(fm_mask, t, r)  # r <- t *before* the sort (official order): t stays one draw on r = t samples
    t, r = torch.maximum(t, r), torch.minimum(t, r)
    if cfg.time_region in ("r_eq_0", "boundaries"):
        r = torch.where(fm_mask, t, torch.zeros_like(r))  # the other boundary of the (r, t) triangle: r = 0
    return t, r


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


def sample_drop_mask(u, fm_mask, any_fm: bool, cfg: ObjectiveConfig) -> torch.Tensor:
    """Class dropout [official ``pmf.py: cond_drop``]. Official: the first Binomial(B, p) samples of the batch, which
    are r = t samples, so each r = t sample is dropped with probability p / data_proportion. With ``drop_among_fm``
    we draw that per sample (same marginal, shard-independent); otherwise, or when the batch has no r = t sample
    (``any_fm``, known on the host from the pattern), each sample with probability p."""
    if cfg.drop_among_fm and any_fm and cfg.data_proportion > 0:
        p = min(1.0, cfg.class_drop / cfg.data_proportion) if cfg.time_region != "r_eq_t" else cfg.class_drop
        return fm_mask & (u < p)
    return u < cfg.class_drop


def sample_draws(x: torch.Tensor, y: torch.Tensor | None, cfg: ObjectiveConfig, generator=None) -> Draws:
    """All random draws of one loss evaluation [official ``pmf.py: forward``: ``sample_tr``, the noise e,
    ``sample_cfg_interval``, ``sample_cfg_scale``, ``cond_drop``'s mask], from a ``torch.Generator`` or a
    :class:`PerSampleGenerator`. Reads no device value: the r = t rows are a pattern over the (host) indices."""
    uni, nor, e0, indices = _raw_draws(x, generator)
    fm_host = fm_pattern(indices, fm_proportion(cfg))
    fm_mask = fm_host.to(uni.device, non_blocking=True)
    t, r = sample_t_r(uni, nor, fm_mask, cfg)
    omega = sample_cfg_scale(uni[:, 3], cfg)
    t_min, t_max = sample_cfg_interval(uni[:, 4], uni[:, 5], fm_mask, cfg)
    drop = sample_drop_mask(uni[:, 6], fm_mask, bool(fm_host.any()), cfg)  # a host tensor: no device sync
    return Draws(t, r, fm_mask, e0 * cfg.noise_scale, omega, t_min, t_max, drop)


# ----------------------------------------------------------------------------------------------------------------
# The steps of the objective


def noisy_image(x, t, e):
    """z_t = (1 - t) x + t e  [P Eq. 1]."""
    return (1 - _b(t, x)) * x + _b(t, x) * e


def conditional_velocity(z_t, x, t):
    """v_t = (z_t - x) / clip(t, 0.05) = e - x for t >= 0.05  [P Eq. 2; official code]."""
    return (z_t - x) / _b(t.clamp(min=T_CLIP), x)


def boundary_velocity(net, z, t, omega, y, use_v_head: bool):
    """Instantaneous velocity v(z_t, t | y, omega) predicted by the model, with h = 0 and interval [0, 1]
    (official ``v_cond_fn``): the v-head, or the u-head's boundary value u(z, t, t) without a v-head (Alg. 1)."""
    h, lo, hi = torch.zeros_like(t), torch.zeros_like(t), torch.ones_like(t)
    use_v_head = use_v_head and getattr(net, "has_v_head", True)  # same fallback as pmf_loss for a v-head-less net
    u, v = net(z, t, h, omega, lo, hi, y, heads="v" if use_v_head else "u")
    return v if use_v_head else u


def interval_mask(d: Draws) -> torch.Tensor:
    """t in [t_min, t_max]: where the guidance interval applies [official ``pmf.py: guidance_fn``]. The one place
    that tests the interval."""
    return (d.t >= d.t_min) & (d.t <= d.t_max)


def masked_omega(d: Draws) -> tuple[torch.Tensor, torch.Tensor]:
    """(guided, omega'): guided = inside the interval or an r = t sample (``guidance_fn`` gives those v_g_fm with the
    un-masked omega); omega' = omega there, 1 elsewhere (then 1 - 1/omega' = 0 and v_g = v_t)."""
    guided = d.fm_mask | interval_mask(d)
    return guided, torch.where(guided, d.omega, torch.ones_like(d.omega))


def guided_velocity(v_t, v_c, v_u, omega_m, z_t, t, parallel: float = 1.0):
    """v_g = v_t + (1 - 1/omega')(v_c' - v_u)  [P Alg. 2]; outside the interval omega' = 1 and v_g = v_t.

    ``parallel`` (eta) < 1 scales the part of the guidance difference D = v_c' - v_u that lies along the conditional
    image prediction x_c = z_t - t v_c' (per sample): D <- D - (1 - eta) <D, x_c> / |x_c|^2 x_c. Since x = z_t - t v,
    this is the same split of the image-space update -t D (APG, Sadat et al. 2024: the parallel part is what
    over-saturates at high omega). eta = 1 is the official guidance_fn."""
    D = v_c - v_u
    if parallel != 1.0:
        x_c = (z_t - _b(t, z_t) * v_c).flatten(1)
        coef = (D.flatten(1) * x_c).sum(1) / x_c.pow(2).sum(1).clamp(min=1e-12)
        D = D - (1.0 - parallel) * _b(coef, D) * x_c.view_as(D)
    return v_t + (1 - 1 / _b(omega_m, v_t)) * D


@torch.no_grad()
def guidance_velocities(net, z_t, y, d: Draws, omega_m, cfg: ObjectiveConfig, null_label: int):
    """(v_c', v_u) = (v(z_t | y, omega'), v(z_t | null, 1)) for every sample, in one call on 2B rows (official
    ``pmf.py: v_fn``, with the masked omega' of ``v_cond_fn``'s second call; on r = t samples omega' = omega, so
    these are both of ``guidance_fn``'s conditional velocities). Without guidance only v(z_t | y, omega') (v_u = 0:
    the target is v_t)."""
    if not cfg.guidance:
        return boundary_velocity(net, z_t, d.t, omega_m, y, cfg.use_v_head), torch.zeros_like(z_t)
    both = boundary_velocity(net, torch.cat([z_t, z_t]), torch.cat([d.t, d.t]),
                             torch.cat([omega_m, torch.ones_like(omega_m)]),
                             torch.cat([y, torch.full_like(y, null_label)]), cfg.use_v_head)
    return both[: len(y)], both[len(y):]


def target_velocity(v_t, v_c, v_u, omega_m, z_t, d: Draws, cfg: ObjectiveConfig):
    """sg(v_g): the guided velocity v_g = v_t + (1 - 1/omega')(v_c' - v_u) (``guidance_fn``; v_t without guidance),
    and v_t on the dropped samples (``cond_drop``)."""
    v_g = guided_velocity(v_t, v_c, v_u, omega_m, z_t, d.t, cfg.guidance_parallel) if cfg.guidance else v_t
    return torch.where(_b(d.drop_mask, v_t), v_t, v_g).detach()


def u_and_dudt(net, z_t, d: Draws, y, tangent_v, with_v: bool):
    """(u, du/dt, v) = jvp of (z, t, r) -> net(z, t, h = t - r, omega, t_min, t_max, y) along (v, 1, 0)
    [MF Eq. 8: du/dt = v d_z u + d_t u; official ``pmf.py: forward``, ``jax.jvp(u_fn, (z_t, t, r), (v_c, 1, 0))``].
    The net sees the *un-masked* omega and the labels after dropout (official). The v-head output is an auxiliary
    primal (no tangent needed for the loss)."""

    def u_fn(z, t, r):
        u, v = net(z, t, t - r, d.omega, d.t_min, d.t_max, y, heads="uv" if with_v else "u")
        return u, (() if v is None else (v,))  # torch.func.jvp's aux must hold tensors only, never None

    u, dudt, aux = torch.func.jvp(u_fn, (z_t, d.t, d.r), (tangent_v, torch.ones_like(d.t), torch.zeros_like(d.r)),
                                  has_aux=True)
    return u, dudt, (aux[0] if aux else None)


def lean_rows(net, d: Draws, cfg: ObjectiveConfig) -> RowPlan | None:
    """The rows each lean pass computes (:mod:`pmf.method.objective_lean`), or None for the reference passes (``impl``
    "reference", or a network without the trunk / head split). Read from host draws (a :class:`PerSampleGenerator`'s,
    or any on a CPU run); draws that live on an accelerator get the plan without a split, since reading their
    masks would stall the device."""
    if cfg.impl != "lean" or not hasattr(net, "trunk"):
        return None
    if not d.on_host():
        return RowPlan.every_row(len(d.t), cfg.guidance)
    guided, _ = masked_omega(d)
    return RowPlan.from_host_masks(d.t, d.r, d.t_min, d.t_max, d.fm_mask, d.drop_mask, guided, cfg.guidance)


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
             perceptual: Callable | None = None, compiler: Callable | None = None):
    """The pMF training loss [P Alg. 2; official ``pmf.py: forward``]. x: (B, C, H, W) clean images in [-1, 1];
    y: (B,) labels or None (unconditional). Returns (loss, metrics): loss = mean_batch(adp(loss_u) + adp(loss_v) +
    perceptual). ``impl`` picks the network passes (reference, or the lean ones of :mod:`pmf.method.objective_lean`);
    the steps and values are the same. Reads no device value on the host when the draws come from a
    :class:`PerSampleGenerator` or live on the host (the lean rows are planned there).

    Two device steps follow the host's draws and row plan: :func:`guidance_step` (no gradient) and
    :func:`heads_step` (u, du/dt, v and the heads' losses). ``compiler(fn)`` returns the callable that runs each
    (``pmf.train.speed.StepCompiler``: each compiled as one graph); None runs them as they are. The perceptual hook
    (host generators for its crops) runs after them, eagerly."""
    null_label = net.num_classes
    if y is None:
        y = torch.full((x.shape[0],), null_label, dtype=torch.long, device=x.device)
    # sample_tr, the noise, sample_cfg_interval, sample_cfg_scale and cond_drop's mask, all up front
    d = draws if draws is not None else sample_draws(x, y, cfg, generator)
    rows = lean_rows(net, d, cfg)  # None: the reference passes
    d = d.to(x.device)
    if rows is not None and compiler is not None:  # compiled graphs take device inputs only (CUDA-graph capture)
        rows = rows.to(x.device)
    run = compiler or (lambda fn: fn)
    z_t, v_t, omega_m, v_c, v_u = run(guidance_step)(net, x, y, d, rows, cfg, null_label)
    total, metrics, u = run(heads_step)(net, y, d, rows, cfg, null_label, z_t, v_t, omega_m, v_c, v_u)
    if perceptual is not None:
        term, logs = perceptual_term(perceptual, z_t, u, x, d, cfg, generator)
        total = total + term
        metrics.update(logs)
    loss = total.mean()
    metrics["loss"] = loss.detach()
    return loss, metrics


def guidance_step(net, x, y, d: Draws, rows: RowPlan | None, cfg: ObjectiveConfig, null_label: int):
    """(z_t, v_t, omega', v_c', v_u): the noisy image, its conditional velocity and ``guidance_fn``'s network
    velocities, without gradient."""
    z_t = noisy_image(x, d.t, d.e)  # z_t = (1 - t) x + t e
    v_t = conditional_velocity(z_t, x, d.t)  # v_t = (z_t - x) / t = e - x
    # guidance_fn, network part: v_c' = v(z_t | y, omega'), v_u = v(z_t | null, 1), without gradient
    _, omega_m = masked_omega(d)
    use_v = cfg.use_v_head and getattr(net, "has_v_head", True)
    v_c, v_u = (guidance_velocities(net, z_t, y, d, omega_m, cfg, null_label) if rows is None else
                objective_lean.guidance_velocities(net, z_t, y, d.t, omega_m, rows, use_v, null_label))
    return z_t, v_t, omega_m, v_c, v_u


def heads_step(net, y, d: Draws, rows: RowPlan | None, cfg: ObjectiveConfig, null_label: int, z_t, v_t, omega_m,
               v_c, v_u):
    """((B,) adaptively weighted losses of both heads, metrics, u): cond_drop, the JVP, the guided target,
    V = u + (t - r) sg(du/dt) and the heads' losses."""
    use_v = cfg.use_v_head and getattr(net, "has_v_head", True)
    y_in = torch.where(d.drop_mask, null_label, y)  # cond_drop: the null label (and, below, the target v_t)
    # jvp(u_fn, (z_t, t, r), (v_c, 1, 0)): pMF's tangent is the predicted v_c; the original MeanFlow's the target
    tangent_v = v_c if cfg.tangent == "predicted" else target_velocity(v_t, v_c, v_u, omega_m, z_t, d, cfg)
    u, dudt, v = (u_and_dudt(net, z_t, d, y_in, tangent_v, use_v) if rows is None else
                  objective_lean.u_and_dudt(net, z_t, d, y_in, tangent_v, use_v, rows))
    if rows is not None:  # the lean plan's r = t samples take v_c from this forward (same inputs as their guidance row)
        v_c = objective_lean.with_shared_rows(v_c, v if use_v else u, rows)
    v_g = target_velocity(v_t, v_c, v_u, omega_m, z_t, d, cfg)  # sg(v_g), v_t where dropped
    V = compound_velocity(u, dudt, d.t, d.r)  # V = u + (t - r) sg(du/dt)

    # the heads' losses, per-sample sums with adaptive weights (adp_wt_fn); the perceptual terms follow (aux_fn)
    total = adaptive_weight(per_sample_sq_error(V, v_g), cfg)
    metrics = {"loss_u": (V - v_g).pow(2).mean().detach()}
    if use_v:
        total = total + adaptive_weight(per_sample_sq_error(v, v_g), cfg)
        metrics["loss_v"] = (v - v_g).pow(2).mean().detach()
    return total, metrics, u
