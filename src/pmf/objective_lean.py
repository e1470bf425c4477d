"""The lean network passes of the pMF objective: the same two passes as the reference path of
:func:`pmf.objective.pmf_loss` (official ``pmf.py``: ``guidance_fn``'s network calls and ``jax.jvp(u_fn, ...)``), on
fewer rows and with cheaper tangents. The loss itself (targets, V, weights) is assembled in :mod:`pmf.objective`.

Where the savings come from (each exact, not an approximation; ``tests/test_objective.py`` holds the contract
``test_lean_matches_reference``):

* **du/dt only where it is used.** du/dt enters the loss as (t - r) sg(du/dt) [pMF Eq. 12], so the r = t rows (half
  the batch by default) run a plain forward instead of the forward-mode pass.
* **Forward AD through trunk + u-head only.** The v-head output is an auxiliary primal of ``u_fn``: it needs gradients,
  not tangents, so it runs on the trunk's primal output after the dual pass.
* **Constant-operand tangent rules** (:class:`ConstantOperandTangents`): linear layers and products with a constant
  operand skip the zero tangent term.
* **Fewer guidance rows.** ``guidance_fn`` needs v(z_t | y, omega') and v(z_t | null, 1). A non-dropped r = t sample's
  conditional row has exactly the inputs of its own training forward (h = 0, interval [0, 1], omega' = omega, label
  y), so its v_c is that forward's boundary velocity (the *shared* rows); dropped samples train on v_g = v_t and need
  no unconditional row; outside [t_min, t_max], 1 - 1/omega' = 0 and v_u is not needed either.

Which rows each pass computes is a :class:`RowPlan` of index tensors built on the host from host-known draws, so the
passes read no device value (no ``nonzero``, no boolean-mask indexing, no ``.item()``): every shape is known before a
kernel runs. This module imports nothing from :mod:`pmf`; :mod:`pmf.objective` builds the plan and calls the passes.

**Under FSDP2** (``fully_shard``; tests/test_fsdp_lean.py: the same u, du/dt, losses, reduce-scattered gradients and
weights after k steps as one process and as the reference path under FSDP2). FSDP2 applies an identity
``autograd.Function`` (``RegisterPostBackwardFunction``) to every grad-requiring input of a unit in its pre-forward
hook, so that the unit's backward triggers its reduce-scatter. Forward AD rejects that Function ("A custom
Function's forward is returning a view (or an input as-is) but the jvp is not returning a view.", torch 2.13), so
no dual tensor may reach it. The rules, for anything that runs in the forward-mode region of a sharded network:

1. *Enter the root once, with plain tensors.* The whole forward-mode pass (trunk, u-head, velocity) is one call of
   a forward method registered on the root (:func:`_sharded_forward_ad`): FSDP gathers the root's own parameters
   around it and registers its gradient hooks on its outputs, as for ``forward``. Its arguments are primals and
   tangents as separate plain tensors; the dual level opens and closes inside it, so u and the trunk output leave
   it plain. Inside, call the network's *unwrapped* ``trunk`` / ``head`` (the class's methods): the registered
   ``net.trunk`` would re-enter the root's hooks and reshard the root half-way through the pass.
2. *Every other FSDP unit takes its dual inputs through* :class:`_dual_boundaries`: each dual tensor argument is
   split into primal and tangent in front of FSDP's pre-forward hook and made dual again after it, so FSDP gathers
   the unit and wraps the primal in its Function, and the unit's forward still sees the dual tensor. Dual inputs
   must therefore be top-level tensor arguments of a unit's call (positional or keyword), not inside containers.
   Outputs may be dual (FSDP's post-forward only reshards and registers a gradient hook).
3. *Tangents are never differentiated.* They are detached at every unit boundary (du/dt enters the loss through
   sg(.) anyway); a computation that needs gradients of a tangent cannot run in this region.
4. *No inference mode on a sharded network*: the parameters FSDP gathers inside it would become inference tensors,
   which the next all-gather outside it may not overwrite. The guidance pass runs under no_grad there.
5. *The same collective calls on every rank.* Each unit call all-gathers, so every rank must call the same units
   the same number of times in the same order, whatever its rows: sharded, the forward-mode, plain and guidance
   passes always run, on zero rows if a rank's plan has none.
6. *No autocast weight cache* in the passes with gradients (:func:`_without_autocast_weight_cache`): with it, on
   a sharded network run through more than one forward before the backward, parameters lost their gradients.

FSDP's post-backward (the reduce-scatter) then runs as for any forward: through the Function on each unit's primal
input, or the root's end-of-backward callback (``pmf.train.fsdp.check_gradients_reduced`` checks every parameter).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# ----------------------------------------------------------------------------------------------------------------
# Which rows each pass computes


@dataclass(frozen=True)
class RowPlan:
    """Row indices (int64, on the host) of the batch for each lean pass. ``None`` for ``jvp`` means every row."""

    batch: int  # B
    jvp: torch.Tensor | None  # rows with r != t: the forward-mode pass (None: all rows, no split)
    plain: torch.Tensor  # rows with r = t: a plain forward, du/dt = 0 (its factor t - r is 0)
    cond: torch.Tensor  # guidance rows v(z_t | y, omega')
    null: torch.Tensor  # guidance rows v(z_t | null, 1)
    shared: torch.Tensor  # rows whose v_c is their own training forward's boundary velocity

    @staticmethod
    def from_host_masks(t, r, t_min, t_max, fm, drop, inside, guidance: bool) -> "RowPlan":
        """The plan from host (CPU) draws: ``inside`` is the guidance mask of :func:`pmf.objective.masked_omega`.
        Shared rows: r = t samples, not dropped, with interval [0, 1] (so their forward has the guidance row's
        inputs). Conditional rows: every other sample that still needs v_c (the tangent on r != t rows; the target on
        the rest, unless dropped). Unconditional rows: samples inside their interval, not dropped."""
        flat = [a.detach().reshape(-1) for a in (t, r, t_min, t_max, fm, drop, inside)]
        if any(a.device.type != "cpu" for a in flat):
            raise ValueError("RowPlan.from_host_masks needs CPU tensors; use RowPlan.every_row for device draws")
        t, r, t_min, t_max, fm, drop, inside = flat

        def rows(mask):
            return mask.nonzero().squeeze(1)  # host tensors: no device read

        same = t == r
        shared = fm & same & ~drop & (t_min == 0) & (t_max == 1)
        null = inside & ~drop if guidance else torch.zeros_like(drop)
        return RowPlan(len(t), rows(~same), rows(same), rows(~same | ~(shared | drop)), rows(null), rows(shared))

    @staticmethod
    def every_row(batch: int, guidance: bool) -> "RowPlan":
        """No split (for draws that live on the device: their masks cannot be read without a sync): the
        forward-mode pass on every row, a conditional and an unconditional guidance row per sample."""
        all_rows, none = torch.arange(batch), torch.zeros(0, dtype=torch.long)
        return RowPlan(batch, None, none, all_rows, all_rows if guidance else none, none)


def _rows(idx: torch.Tensor, device) -> torch.Tensor:
    """A host index tensor on ``device``, without blocking the host (a copy to the device, never a read back)."""
    return idx.to(device, non_blocking=True)


def _scatter_rows(parts, index_parts):
    """Concatenated per-part rows back to batch order: out[index_parts[k][i]] = parts[k][i]. Differentiable."""
    order = torch.cat(index_parts)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(len(order))  # host permutation
    return torch.cat(parts).index_select(0, _rows(inv, parts[0].device))


# ----------------------------------------------------------------------------------------------------------------
# guidance_fn's network calls on the planned rows


@torch.no_grad()
def guidance_velocities(net, z_t, y, t, omega_m, rows: RowPlan, use_v_head: bool, null_label: int):
    """(v_c', v_u), each (B, ...): v(z_t | y, omega') on ``rows.cond`` and v(z_t | null, 1) on ``rows.null`` (zeros
    elsewhere), from ONE inference-mode call on just those rows (official ``pmf.py: v_fn / v_cond_fn``: h = 0,
    interval [0, 1]; the v-head, or the u-head's boundary value u(z, t, t) without one [pMF Alg. 1])."""
    dev = z_t.device
    i_c, i_u = _rows(rows.cond, dev), _rows(rows.null, dev)
    n_c = len(rows.cond)
    v_c, v_u = torch.zeros_like(z_t), torch.zeros_like(z_t)
    sharded = fsdp_root(net) is not None
    if n_c + len(rows.null) == 0 and not sharded:  # sharded: every rank calls every unit, even on no rows
        return v_c, v_u
    z = torch.cat([z_t.index_select(0, i_c), z_t.index_select(0, i_u)])
    tt = torch.cat([t.index_select(0, i_c), t.index_select(0, i_u)])
    w = torch.cat([omega_m.index_select(0, i_c), torch.ones_like(omega_m.index_select(0, i_u))])
    yy = torch.cat([y.index_select(0, i_c), torch.full_like(y.index_select(0, i_u), null_label)])
    heads = "v" if use_v_head else "u"
    # inference mode is cheaper than no_grad, but not on a sharded net: FSDP's all-gather buffers allocated in it
    # would become inference tensors, which the next all-gather outside it may not write (no_grad: the decorator)
    with contextlib.nullcontext() if sharded else torch.inference_mode():
        u, v = net(z, tt, torch.zeros_like(tt), w, torch.zeros_like(tt), torch.ones_like(tt), yy, heads=heads)
        out = v if use_v_head else u
    # inference tensors may not enter autograd or forward AD: index_copy (of copies) into normal tensors, in z_t's
    # dtype (a sharded net with a low-precision MixedPrecisionPolicy returns its compute dtype)
    return (v_c.index_copy(0, i_c, out[:n_c].to(v_c.dtype, copy=True)),
            v_u.index_copy(0, i_u, out[n_c:].to(v_u.dtype, copy=True)))


def with_shared_rows(v_c, v_boundary, rows: RowPlan):
    """v_c with the shared rows taken from the training forward's boundary velocity (detached): the r = t samples'
    own forward ran on exactly the inputs of their conditional guidance row."""
    if len(rows.shared) == 0:
        return v_c
    i = _rows(rows.shared, v_c.device)
    return v_c.index_copy(0, i, v_boundary.detach().index_select(0, i))


# ----------------------------------------------------------------------------------------------------------------
# jax.jvp(u_fn, (z_t, t, r), (v_c, 1, 0)) with forward AD on the r != t rows


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


def forward_ad_trunk(net, z_t, tangent_v, t, r, omega, t_min, t_max, y):
    """(u, du/dt, trunk output): dual numbers (z, t, r) + eps (v, 1, 0) through the trunk and the u-head
    [MF Eq. 8: du/dt = v d_z u + d_t u, with h = t - r moving with t]. u and the trunk output are plain tensors
    (the dual level is closed when they come back); du/dt carries no usable autograd history. On an FSDP2-sharded
    network the pass runs as one forward of the root (:func:`_sharded_forward_ad`; rules in the module doc)."""
    root = fsdp_root(net)
    if root is not None:
        return _sharded_forward_ad(root)(z_t, tangent_v, t, r, omega, t_min, t_max, y)
    return _forward_ad_pass(net, net.trunk, net.head, z_t, tangent_v, t, r, omega, t_min, t_max, y)


def _forward_ad_pass(net, trunk, head, z_t, tangent_v, t, r, omega, t_min, t_max, y):
    """The forward-mode pass with the given ``trunk`` and ``head`` callables (the network's methods)."""
    with fwAD.dual_level(), ConstantOperandTangents():
        z, t_d, r_d = fwAD.make_dual(z_t, tangent_v), fwAD.make_dual(t, torch.ones_like(t)), \
            fwAD.make_dual(r, torch.zeros_like(r))
        trunk_out = trunk(z, t_d, t_d - r_d, omega, t_min, t_max, y)
        u = net.to_velocity(z, t_d, head(trunk_out, "u"))
        dudt = fwAD.unpack_dual(u).tangent
    return u, dudt, trunk_out  # closing the level made u and trunk_out plain tensors (no views of a dual)


# ----------------------------------------------------------------------------------------------------------------
# The forward-AD pass on an FSDP2-sharded network (rules in the module doc)

_ROOT_METHOD = "_pmf_forward_ad"  # the root's registered forward method that runs the whole forward-mode pass


def fsdp_root(net):
    """The FSDP2 root module of ``net`` (``net`` itself, or the module a ``torch.compile`` wrapper holds as
    ``_orig_mod``) when it is ``fully_shard``-ed, else None."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule

    module = getattr(net, "_orig_mod", net)
    return module if isinstance(module, FSDPModule) else None


def _sharded_forward_ad(root):
    """The root's forward method for the forward-mode pass, registered with FSDP on first use (FSDP then all-gathers
    the root's own parameters around it, as around ``forward``). Its arguments and results are plain tensors; inside
    it the root's unwrapped ``trunk`` / ``head`` run (a call of the registered ``root.trunk`` would re-enter the
    root's hooks and reshard the root half-way through the pass), and every other FSDP unit is entered through
    :func:`_dual_boundaries`."""
    method = root.__dict__.get(_ROOT_METHOD)
    if method is None:
        from torch.distributed.fsdp import register_fsdp_forward_method

        cls = type(root)  # FSDP's subclass of the network's class; its trunk / head are the unwrapped methods

        def forward_ad(self, *args):
            with _dual_boundaries(self):
                return _forward_ad_pass(self, cls.trunk.__get__(self), cls.head.__get__(self), *args)

        object.__setattr__(root, _ROOT_METHOD, forward_ad.__get__(root))
        register_fsdp_forward_method(root, _ROOT_METHOD)
        method = root.__dict__[_ROOT_METHOD]
    return method


class _dual_boundaries:
    """Context: every FSDP unit below ``root`` takes dual inputs through FSDP's hooks as plain tensors. Two forward
    pre-hooks per unit, around FSDP's own (which runs first of the module's hooks: it is registered with prepend):
    the first, put in front of it, replaces each dual tensor argument by its primal and keeps the tangent
    (detached); FSDP's hook then all-gathers the unit and passes the primal through its post-backward autograd
    Function; the second, put after it, makes that Function's output dual again with the kept tangent. The unit's
    forward sees the dual tensors it was called with; FSDP's Function never sees a tangent (its ``jvp`` is what
    forward AD rejects). Outputs pass unchanged: FSDP's post-forward only reshards and registers a gradient hook,
    which forward AD does not touch. Only top-level tensor arguments (positional or keyword) are handled."""

    def __init__(self, root):
        from torch.distributed.fsdp import FSDPModule

        self.units = [m for m in root.modules() if m is not root and isinstance(m, FSDPModule)]
        self.handles = []

    def __enter__(self):
        for unit in self.units:
            kept: list = []
            self.handles.append(unit.register_forward_pre_hook(_strip_tangents(kept), prepend=True, with_kwargs=True))
            self.handles.append(unit.register_forward_pre_hook(_restore_tangents(kept), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _strip_tangents(kept: list):
    def hook(module, args, kwargs):
        found = []

        def strip(key, x):
            if isinstance(x, torch.Tensor):
                primal, tangent = fwAD.unpack_dual(x)
                if tangent is not None:
                    found.append((key, tangent.detach()))
                    return primal
            return x

        args, kwargs = tuple(strip(i, a) for i, a in enumerate(args)), {k: strip(k, v) for k, v in kwargs.items()}
        kept.append(found)
        return (args, kwargs) if found else None
    return hook


def _restore_tangents(kept: list):
    def hook(module, args, kwargs):
        found = kept.pop()
        if not found:
            return None
        args, kwargs = list(args), dict(kwargs)
        for key, tangent in found:
            where = args if isinstance(key, int) else kwargs
            where[key] = fwAD.make_dual(where[key], tangent.to(where[key].dtype))  # FSDP may have cast the primal
        return tuple(args), kwargs
    return hook


def _plain_trunk(net, z_t, t, r, omega, t_min, t_max, y):
    """(u, trunk output) of a plain forward through the trunk and the u-head."""
    trunk = net.trunk(z_t, t, t - r, omega, t_min, t_max, y)
    return net.to_velocity(z_t, t, net.head(trunk, "u")), trunk


def u_and_dudt(net, z_t, d, y, tangent_v, with_v: bool, rows: RowPlan):
    """(u, du/dt, v) as :func:`pmf.objective.u_and_dudt` computes them (``d``: a :class:`pmf.objective.Draws`), with
    the forward-mode pass on ``rows.jvp`` only; the ``rows.plain`` rows run a plain forward and get du/dt = 0 (the
    network is row-independent, so splitting the batch changes no value). The v-head runs afterwards on the trunk's
    primal output. du/dt carries no usable autograd history (the loss detaches it)."""
    if fsdp_root(net) is None:
        return _u_and_dudt(net, z_t, d, y, tangent_v, with_v, rows, sharded=False)
    with _without_autocast_weight_cache():
        return _u_and_dudt(net, z_t, d, y, tangent_v, with_v, rows, sharded=True)


@contextlib.contextmanager
def _without_autocast_weight_cache():
    """Autocast's cache of low-precision weight copies off (restored after). On an FSDP2-sharded net, with more
    than one forward with gradients through a unit before the backward (the forward-mode and the plain pass),
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
    split = rows.jvp is not None and (sharded or (len(rows.jvp) > 0 and len(rows.plain) > 0))
    if split:
        dev = z_t.device
        j, p = _rows(rows.jvp, dev), _rows(rows.plain, dev)
        u_j, dudt_j, trunk_j = forward_ad_trunk(net, z_t.index_select(0, j), tangent_v.index_select(0, j),
                                                *(a.index_select(0, j) for a in args))
        u_p, trunk_p = _plain_trunk(net, z_t.index_select(0, p), *(a.index_select(0, p) for a in args))
        idx = (rows.jvp, rows.plain)
        u = _scatter_rows((u_j, u_p), idx)
        dudt = _scatter_rows((dudt_j, torch.zeros_like(u_p)), idx)
        trunk = _scatter_rows((trunk_j, trunk_p), idx)
    elif rows.jvp is None or len(rows.plain) == 0:
        u, dudt, trunk = forward_ad_trunk(net, z_t, tangent_v, *args)
    else:
        u, trunk = _plain_trunk(net, z_t, *args)
        dudt = torch.zeros_like(u)
    v = net.to_velocity(z_t, d.t, net.head(trunk, "v")) if with_v else None
    return u, dudt, v
