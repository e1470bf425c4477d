"""The lean network passes of the pMF objective: the same two passes as the reference path of
:func:`pmf.method.objective.pmf_loss` (official ``pmf.py``: ``guidance_fn``'s network calls and ``jax.jvp(u_fn, ...)``),
on fewer rows and with cheaper tangents. The loss itself (targets, V, weights) is assembled in
:mod:`pmf.method.objective`.

Where the savings come from (each exact, not an approximation; ``tests/test_objective.py`` holds the contract
``test_lean_matches_reference``):

* **du/dt only where it is used.** du/dt enters the loss as (t - r) sg(du/dt) [pMF Eq. 12], so the r = t rows (half
  the batch by default) run a plain forward instead of the tangent pass.
* **An explicit tangent pass through trunk + u-head only** (:meth:`pmf.method.model.PMFDiT.u_and_tangent`): each layer's
  closed-form tangent as plain tensor ops, without autograd history and without the zero tangent terms of
  constant operands (weights, gates, RoPE tables, the other conditions); attention's tangent in the centred float32
  form (:func:`pmf.method.attention.attention_tangent`). The same code runs eagerly and inside ``torch.compile`` as one
  graph. The v-head output is an auxiliary primal of ``u_fn``: it runs on the trunk's output after the pass.
* **Fewer guidance rows.** ``guidance_fn`` needs v(z_t | y, omega') and v(z_t | null, 1). A non-dropped r = t sample's
  conditional row has exactly the inputs of its own training forward (h = 0, interval [0, 1], omega' = omega, label
  y), so its v_c is that forward's boundary velocity (the *shared* rows); dropped samples train on v_g = v_t and need
  no unconditional row; outside [t_min, t_max], 1 - 1/omega' = 0 and v_u is not needed either.

Which rows each pass computes is a :class:`RowPlan` of index tensors built on the host from host-known draws, so the
passes read no device value (no ``nonzero``, no boolean-mask indexing, no ``.item()``): every shape is known before a
kernel runs. The row counts are rounded up to a multiple of 1/``ROW_BUCKETS`` of the micro-batch (padding rows whose
result the loss never uses), so a compiled step sees a few fixed shapes per run and compiles a bounded number of
times (:func:`row_buckets`). This module imports nothing from :mod:`pmf`; :mod:`pmf.method.objective` builds the plan
and calls the passes.

**Under FSDP2** (``fully_shard``; tests/test_fsdp_lean.py: the same u, du/dt, losses, reduce-scattered gradients and
weights after k steps as one process and as the reference path under FSDP2). The tangent pass holds plain tensors
only, so FSDP's hooks see nothing unusual: the root's ``u_and_tangent`` is a registered FSDP forward method
(``pmf.train.fsdp.FORWARD_METHODS``) and every block takes its tangent through ``forward``. Two rules remain:

1. *The same collective calls on every rank.* Each unit call all-gathers, so every rank must call the same units
   the same number of times in the same order, whatever its rows: sharded, the tangent, plain and guidance passes
   always run, on zero rows if a rank's plan has none.
2. *No autocast weight cache* in the passes with gradients (:func:`_without_autocast_weight_cache`): with it, on
   a sharded network run through more than one forward before the backward, parameters lost their gradients.
   The guidance pass runs under ``no_grad`` (never inference mode: FSDP's all-gather buffers would become inference
   tensors, which the next all-gather may not write).

FSDP's post-backward (the reduce-scatter) then runs as for any forward (``pmf.train.fsdp.check_gradients_reduced``
checks every parameter).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

ROW_BUCKETS = 4  # row counts are rounded up to a multiple of ceil(B / ROW_BUCKETS): at most 5 (tangent pass)
#   and 9 (guidance call) shapes per micro-batch size

# ----------------------------------------------------------------------------------------------------------------
# Which rows each pass computes


def bucket(n: int, batch: int, cap: int) -> int:
    """n rounded up to a multiple of ceil(batch / ROW_BUCKETS), at most ``cap``."""
    g = -(-batch // ROW_BUCKETS)
    return min(cap, -(-n // g) * g)


def row_buckets(batch: int) -> int:
    """How many distinct shapes the plans of a micro-batch of ``batch`` rows can give, over every draw: the tangent
    pass's row count (a multiple of the granule in [0, B]: at most ROW_BUCKETS + 1 values) plus the guidance
    call's (a multiple in [0, 2B]: at most 2 ROW_BUCKETS + 1). The bound on compilations of a compiled step."""
    g = -(-batch // ROW_BUCKETS)
    return (-(-batch // g) + 1) + (-(-2 * batch // g) + 1)


@dataclass(frozen=True)
class RowPlan:
    """Row indices (int64, on the host) of the batch for each lean pass, and the masks that place their results.
    The counts are padded to buckets (:func:`bucket`) with rows whose result the loss does not use."""

    batch: int  # B
    jvp: torch.Tensor  # rows through the tangent pass: every r != t row, padded with r = t rows (whose du/dt has the
    #   factor t - r = 0)
    plain: torch.Tensor  # the other rows (r = t): a plain forward, du/dt = 0
    order: torch.Tensor  # (B,) position of batch row i in cat(jvp, plain): gathers the two passes back
    guide: torch.Tensor  # batch row of each row of the one guidance call
    guide_null: torch.Tensor  # bool, per guidance row: v(z_t | null, 1) (else v(z_t | y, omega'))
    guide_slot: torch.Tensor  # where each guidance row's velocity goes: i for v_c' of row i, B + i for its v_u
    shared: torch.Tensor  # (B,) bool: rows whose v_c is their own training forward's boundary velocity

    @staticmethod
    def from_host_masks(t, r, t_min, t_max, fm, drop, inside, guidance: bool) -> "RowPlan":
        """The plan from host (CPU) draws: ``inside`` is the guidance mask of :func:`pmf.method.objective.masked_omega`.
        Shared rows: r = t samples, not dropped, with interval [0, 1] (so their forward has the guidance row's
        inputs). Conditional rows: every other sample that still needs v_c (the tangent on r != t rows; the target on
        the rest, unless dropped). Unconditional rows: samples inside their interval, not dropped. Padding: r = t
        rows for the tangent pass; unconditional rows of samples that need none (their v_u meets the factor
        1 - 1/omega' = 0 or the dropped target v_t), then conditional rows of samples that need none (shared rows
        take v_c from their forward; dropped r = t rows use it nowhere)."""
        flat = [a.detach().reshape(-1) for a in (t, r, t_min, t_max, fm, drop, inside)]
        if any(a.device.type != "cpu" for a in flat):
            raise ValueError("RowPlan.from_host_masks needs CPU tensors; use RowPlan.every_row for device draws")
        t, r, t_min, t_max, fm, drop, inside = flat
        B = len(t)
        same = t == r
        shared = fm & same & ~drop & (t_min == 0) & (t_max == 1)
        cond = ~same | ~(shared | drop)
        null = inside & ~drop if guidance else torch.zeros_like(drop)
        jvp = _padded(~same, bucket(int((~same).sum()), B, B))
        n_c, n_u = int(cond.sum()), int(null.sum())
        n_g = bucket(n_c + n_u, B, 2 * B)
        extra_u = min(n_g - n_c - n_u, B - n_u)  # padding as unconditional rows first, then as conditional ones
        return RowPlan.from_rows(B, jvp, _padded(cond, n_g - n_u - extra_u), _padded(null, n_u + extra_u), shared)

    @staticmethod
    def from_rows(batch: int, jvp, cond, null, shared) -> "RowPlan":
        """The plan for given row lists (host int64): the tangent pass on ``jvp`` (the rest plain), conditional
        guidance rows ``cond``, unconditional ones ``null``; ``shared``: (B,) bool."""
        jvp = torch.as_tensor(jvp, dtype=torch.long)
        in_jvp = torch.zeros(batch, dtype=torch.bool)
        in_jvp[jvp] = True
        plain = (~in_jvp).nonzero().squeeze(1)  # host tensors: no device read
        order = torch.empty(batch, dtype=torch.long)
        order[torch.cat([jvp, plain])] = torch.arange(batch)
        cond, null = torch.as_tensor(cond, dtype=torch.long), torch.as_tensor(null, dtype=torch.long)
        guide_null = torch.cat([torch.zeros(len(cond), dtype=torch.bool), torch.ones(len(null), dtype=torch.bool)])
        return RowPlan(batch, jvp, plain, order, torch.cat([cond, null]), guide_null,
                       torch.cat([cond, null + batch]), torch.as_tensor(shared, dtype=torch.bool))

    def to(self, device) -> "RowPlan":
        """The plan's tensors on ``device`` (copies that do not block the host). Done before a compiled step, so the
        compiled graphs take device inputs only (CUDA graphs capture no host-to-device copy)."""
        return RowPlan(self.batch, *(_rows(getattr(self, f), device) for f in
                                     ("jvp", "plain", "order", "guide", "guide_null", "guide_slot", "shared")))

    @staticmethod
    def every_row(batch: int, guidance: bool) -> "RowPlan":
        """No split (for draws that live on the device: their masks cannot be read without a sync): the tangent
        pass on every row, a conditional and an unconditional guidance row per sample."""
        every = torch.arange(batch)
        return RowPlan.from_rows(batch, every, every, every if guidance else every[:0],
                                 torch.zeros(batch, dtype=torch.bool))


def _padded(mask: torch.Tensor, n: int) -> torch.Tensor:
    """The rows of ``mask``, then the first rows outside it, n rows in all (n >= mask.sum())."""
    return torch.cat([mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)])[:n]


def _rows(idx: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on ``device``, without blocking the host (a copy to the device, never a read back)."""
    return idx.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------------------------
# guidance_fn's network calls on the planned rows


@torch.no_grad()
def guidance_velocities(net, z_t, y, t, omega_m, rows: RowPlan, use_v_head: bool, null_label: int):
    """(v_c', v_u), each (B, ...): v(z_t | y, omega') on the conditional rows and v(z_t | null, 1) on the
    unconditional ones (zeros where neither ran), from ONE call on the planned rows (official ``pmf.py: v_fn /
    v_cond_fn``: h = 0, interval [0, 1]; the v-head, or the u-head's boundary value u(z, t, t) without one
    [pMF Alg. 1]). Fixed shapes: (2B, ...) slots filled by one index_copy at distinct positions."""
    dev, B = z_t.device, z_t.shape[0]
    slots = z_t.new_zeros((2 * B, *z_t.shape[1:]))
    if len(rows.guide) == 0 and fsdp_root(net) is None:  # sharded: every rank calls every unit, even on no rows
        return slots[:B], slots[B:]
    i, null = _rows(rows.guide, dev), _rows(rows.guide_null, dev)
    tt = t.index_select(0, i)
    w = torch.where(null, torch.ones_like(tt), omega_m.index_select(0, i))
    yy = torch.where(null, torch.full_like(i, null_label), y.index_select(0, i))
    zero = torch.zeros_like(tt)
    u, v = net(z_t.index_select(0, i), tt, zero, w, zero, torch.ones_like(tt), yy, heads="v" if use_v_head else "u")
    out = v if use_v_head else u
    # in z_t's dtype (a sharded net with a low-precision MixedPrecisionPolicy returns its compute dtype)
    slots = slots.index_copy(0, _rows(rows.guide_slot, dev), out.to(slots.dtype))
    return slots[:B], slots[B:]


def with_shared_rows(v_c, v_boundary, rows: RowPlan):
    """v_c with the shared rows taken from the training forward's boundary velocity (detached): the r = t samples'
    own forward ran on exactly the inputs of their conditional guidance row."""
    shared = _rows(rows.shared, v_c.device).reshape(-1, *([1] * (v_c.ndim - 1)))
    return torch.where(shared, v_boundary.detach().to(v_c.dtype), v_c)


# ----------------------------------------------------------------------------------------------------------------
# jax.jvp(u_fn, (z_t, t, r), (v_c, 1, 0)) by the explicit tangent pass on the planned rows


def fsdp_root(net):
    """The FSDP2 root module of ``net`` (``net`` itself, or the module a ``torch.compile`` wrapper holds as
    ``_orig_mod``) when it is ``fully_shard``-ed, else None."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule

    module = getattr(net, "_orig_mod", net)
    return module if isinstance(module, FSDPModule) else None


def tangent_pass(net, z_t, tangent_v, t, r, omega, t_min, t_max, y):
    """(u, du/dt, trunk output): (z, t, r) moved along (v, 1, 0) through the trunk and the u-head [MF Eq. 8:
    du/dt = v d_z u + d_t u, with h = t - r moving with t]. du/dt carries no autograd history."""
    return net.u_and_tangent(z_t, t, r, omega, t_min, t_max, y, tangent_v, torch.ones_like(t), torch.zeros_like(r))


def _plain_trunk(net, z_t, t, r, omega, t_min, t_max, y):
    """(u, trunk output) of a plain forward through the trunk and the u-head."""
    trunk = net.trunk(z_t, t, t - r, omega, t_min, t_max, y)
    return net.to_velocity(z_t, t, net.head(trunk, "u")), trunk


def u_and_dudt(net, z_t, d, y, tangent_v, with_v: bool, rows: RowPlan):
    """(u, du/dt, v) as :func:`pmf.method.objective.u_and_dudt` computes them (``d``: a
    :class:`pmf.method.objective.Draws`), with the tangent pass on ``rows.jvp`` and a plain forward on ``rows.plain``,
    whose du/dt is 0 (the network is row-independent, so splitting the batch changes no value). The v-head runs
    afterwards on the trunk's output.
    du/dt carries no autograd history."""
    if fsdp_root(net) is None:
        return _u_and_dudt(net, z_t, d, y, tangent_v, with_v, rows, sharded=False)
    with _without_autocast_weight_cache():
        return _u_and_dudt(net, z_t, d, y, tangent_v, with_v, rows, sharded=True)


@contextlib.contextmanager
def _without_autocast_weight_cache():
    """Autocast's cache of low-precision weight copies off (restored after). On an FSDP2-sharded net, with more
    than one forward with gradients through a unit before the backward (the tangent and the plain pass),
    parameters lost their gradient with the cache on (torch 2.13, CPU; tests/test_fsdp_lean.py). Each call then
    casts its weights again: nothing under a MixedPrecisionPolicy, whose gathered parameters are already low
    precision."""
    was = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(was)


def _u_and_dudt(net, z_t, d, y, tangent_v, with_v: bool, rows: RowPlan, sharded: bool):
    args = (d.t, d.r, d.omega, d.t_min, d.t_max, y)
    # sharded: both passes always (on no rows if need be), so that every rank makes the same collective calls
    if len(rows.plain) == 0 and not sharded:
        u, dudt, trunk = tangent_pass(net, z_t, tangent_v, *args)
    elif len(rows.jvp) == 0 and not sharded:
        u, trunk = _plain_trunk(net, z_t, *args)
        dudt = torch.zeros_like(u)
    else:
        dev = z_t.device
        j, p, order = _rows(rows.jvp, dev), _rows(rows.plain, dev), _rows(rows.order, dev)
        u_j, dudt_j, trunk_j = tangent_pass(net, z_t.index_select(0, j), tangent_v.index_select(0, j),
                                            *(a.index_select(0, j) for a in args))
        u_p, trunk_p = _plain_trunk(net, z_t.index_select(0, p), *(a.index_select(0, p) for a in args))
        u = torch.cat([u_j, u_p]).index_select(0, order)
        dudt = torch.cat([dudt_j, torch.zeros_like(u_p, dtype=dudt_j.dtype)]).index_select(0, order)
        trunk = torch.cat([trunk_j, trunk_p]).index_select(0, order)
    v = net.to_velocity(z_t, d.t, net.head(trunk, "v")) if with_v else None
    return u, dudt, v
