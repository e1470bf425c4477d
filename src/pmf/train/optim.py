"""Optimizer (Muon for matrices, Nesterov Adam for the rest) and the learning-rate schedule; EMA: :mod:`pmf.train.ema`.

The official code (`utils/trainstate_util.py`, `utils/ema_util.py`) calls ``optax.contrib.muon(lr, adam_b2=0.95)``:

* every 2-D array gets Muon: Nesterov momentum 0.95, 5 quintic Newton-Schulz steps, update scaled by
  sqrt(max(1, fan_out / fan_in)), no weight decay, times lr;
* everything else gets optax Adam with ``nesterov=True``, (b1, b2) = (0.9, 0.95), eps 1e-8, no weight decay, same lr;
* lr is constant 1e-3 (warmup 0);
* three EDM-style EMAs with half-lives of 500, 1000 and 2000 kimg (:mod:`pmf.train.ema`).

Schedules are keyed to images seen, never to steps, and there is no hidden batch-size constant.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from pmf.parallel import ns_partition
from pmf.train import precision

__all__ = [
    "OptimConfig",
    "param_groups",
    "NesterovAdam",
    "MuonWithAdam",
    "BatchedMuon",
    "build_optimizer",
    "lr_at",
    "set_lr",
]


# ----------------------------------------------------------------------------------------------------------------
# Config


NS_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}  # optim.muon_ns_precision


@dataclass
class OptimConfig:
    name: str = "muon"  # "muon": Muon on matrices + Adam on the rest (official); "adam": Adam on all (Fig. 3a)
    # The learning rate and its schedule may change when a run resumes (pmf.train.config.RESUMABLE).
    lr: float = field(default=1e-3, metadata={"resumable": True})  # peak learning rate, shared by the Muon and the
    #   Adam parts (official: constant 1e-3)
    betas: tuple[float, float] = (0.9, 0.95)  # Adam (b1, b2); the official run sets b2 = 0.95
    eps: float = 1e-8  # Adam denominator eps; also Muon's Frobenius-normalisation eps, as in optax
    weight_decay: float = 0.0  # decoupled (AdamW-style, times lr) for both parts; official 0
    nesterov_adam: bool = True  # optax adam(nesterov=True): bias-corrected Nesterov first moment
    muon_momentum: float = 0.95  # Muon's Nesterov momentum beta
    muon_ns_steps: int = 5  # Newton-Schulz iterations (coefficients 3.4445, -4.7750, 2.0315)
    muon_ns_precision: str = field(default="auto", metadata={"resumable": True})  # Newton-Schulz dtype: "auto"
    #   (bf16 on GPUs and native-bf16 CPUs, else fp32) | "bf16" | "fp32"
    muon_partition: bool = field(default=True, metadata={"resumable": True})  # W > 1 processes (any
    #   train.parallel): each rank runs Newton-Schulz on its FLOP-balanced share of the matrices, one all-gather
    #   shares the results (pmf.parallel.ns_partition); the same update as one process. false: every rank
    #   orthogonalises every matrix. No effect in one process.
    warmup_kimg: float = field(default=0.0, metadata={"resumable": True})  # linear warmup from 0 to lr over this
    #   many thousand images (official 0)
    schedule: str = field(default="constant", metadata={"resumable": True})  # "constant" | "cosine" (after warmup)
    total_kimg: float = field(default=0.0, metadata={"resumable": True})  # cosine: lr reaches min_lr_ratio * lr at
    #   this many thousand images
    min_lr_ratio: float = field(default=0.0, metadata={"resumable": True})  # cosine floor as a fraction of lr


# ----------------------------------------------------------------------------------------------------------------
# Which parameter goes to which optimizer


def _embedding_tables(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}


def param_groups(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """Split ``model``'s parameters into ``(muon_params, adam_params)``, each a list of ``(name, param)``.

    The optax rule is "every 2-D array gets Muon, everything else Adam", applied to Flax shapes. Translated to
    PyTorch shapes this is "2-D and not an embedding table":

    * Muon: every ``nn.Linear`` weight (q/k/v/o, SwiGLU w1/w2/w3, the condition-embedder MLPs, both final layers).
    * Adam: the label-embedding table. It is 2-D here (``nn.Embedding``, (num_classes + 1, D)) but the Flax code
      stores it as a 3-D (1, 1001, D) array, so optax gives it Adam; a lookup table is also not an operator whose
      update should be orthogonalised (each row only sees the gradient of its own class).
    * Adam: the learned token blocks and pos-embed (3-D, (1, n, D)), the patch-embed conv kernels (4-D), and all
      1-D parameters (biases, RMSNorm scales, the zero-init gates).

    Every parameter (shared ones once) lands in exactly one list, in ``named_parameters`` order.
    """
    tables = _embedding_tables(model)
    muon, adam = [], []
    for name, p in model.named_parameters():
        (muon if p.ndim == 2 and id(p) not in tables else adam).append((name, p))
    return muon, adam


# ----------------------------------------------------------------------------------------------------------------
# Strict state-dict checks shared by the optimizers below


def _check_optimizer_state(opt: torch.optim.Optimizer, sd: dict) -> None:
    """Raise ValueError unless ``sd`` was saved by an optimizer with the same groups, hyperparameter names,
    parameter names (when recorded) and parameter shapes as ``opt``. torch's own load only checks group sizes."""
    if set(sd) != {"state", "param_groups"}:
        raise ValueError(f"optimizer state dict must have keys 'state' and 'param_groups', got {sorted(sd)}")
    groups, saved = opt.param_groups, sd["param_groups"]
    if len(groups) != len(saved):
        raise ValueError(f"optimizer state dict has {len(saved)} parameter groups, expected {len(groups)}")
    index_to_param = {}
    for i, (g, s) in enumerate(zip(groups, saved)):
        if len(g["params"]) != len(s["params"]):
            raise ValueError(f"group {i}: {len(s['params'])} saved parameters, expected {len(g['params'])}")
        if set(g) != set(s):
            raise ValueError(f"group {i}: hyperparameters {sorted(set(s) ^ set(g))} differ (wrong optimizer kind?)")
        if "param_names" in g and list(g["param_names"]) != list(s["param_names"]):
            raise ValueError(f"group {i}: parameter names differ from the saved ones")
        index_to_param.update(zip(s["params"], g["params"]))
    for idx, st in sd["state"].items():
        if idx not in index_to_param:
            raise ValueError(f"optimizer state for unknown parameter index {idx!r}")
        p = index_to_param[idx]
        for key, v in st.items():
            if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape != p.shape:
                raise ValueError(f"state {key!r} of parameter {idx} has shape {tuple(v.shape)}, expected {tuple(p.shape)}")


def _own_state_tensors(opt: torch.optim.Optimizer) -> None:
    """torch's load keeps the caller's tensors when no cast is needed; clone so later in-place steps never write
    into the dict that was loaded (e.g. a checkpoint still held in memory)."""
    for st in opt.state.values():
        for k, v in list(st.items()):
            if isinstance(v, torch.Tensor):
                st[k] = v.clone()


def _closure_loss(closure):
    """torch's optimizer convention: re-evaluate the loss with gradients enabled when a closure is given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


# ----------------------------------------------------------------------------------------------------------------
# Adam with optax's Nesterov momentum


class NesterovAdam(torch.optim.Optimizer):
    """optax ``adamw(lr, b1, b2, eps, eps_root=0, weight_decay, nesterov)`` as a torch optimizer.

    With t the 1-based step count, g_t the gradient:

        m_t = b1 m_{t-1} + (1 - b1) g_t,            v_t = b2 v_{t-1} + (1 - b2) g_t^2
        m_hat = b1 m_t / (1 - b1^(t+1)) + (1 - b1) g_t / (1 - b1^t)     (nesterov; else m_t / (1 - b1^t))
        v_hat = v_t / (1 - b2^t)
        theta <- theta - lr (m_hat / (sqrt(v_hat) + eps) + wd theta)

    Why not ``torch.optim.NAdam``: it scales momentum by a schedule mu_t = b1 (1 - 0.5 * 0.96^(t psi)), so even with
    momentum_decay psi = 0 it uses mu = b1 / 2, and with the default psi = 0.004 mu grows slowly from 0.45 to 0.9;
    it equals the formula above only in the limit psi -> inf. ``torch.optim.Adam`` has no Nesterov option.
    State per parameter: ``step`` (CPU int64 scalar), ``exp_avg`` (m), ``exp_avg_sq`` (v), in the param's dtype.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        nesterov: bool = True,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid Adam hyperparameters lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, nesterov=nesterov))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            # Bucket by (device, dtype, step) so each bucket is updated with a few foreach kernels.
            buckets: dict[tuple, list[tuple[torch.Tensor, torch.Tensor, dict]]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("NesterovAdam does not support sparse gradients")
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.int64)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] += 1
                buckets[(p.device, p.dtype, int(st["step"]))].append((p, p.grad, st))
            for (_, _, t), items in buckets.items():
                ps = [p for p, _, _ in items]
                gs = [g for _, g, _ in items]
                ms = [st["exp_avg"] for _, _, st in items]
                vs = [st["exp_avg_sq"] for _, _, st in items]
                torch._foreach_lerp_(ms, gs, 1 - b1)  # m = b1 m + (1 - b1) g
                torch._foreach_mul_(vs, b2)
                torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)  # v = b2 v + (1 - b2) g^2
                denom = torch._foreach_div(vs, 1 - b2**t)
                torch._foreach_sqrt_(denom)
                torch._foreach_add_(denom, eps)  # sqrt(v_hat) + eps
                if group["nesterov"]:
                    num = torch._foreach_mul(ms, b1 / (1 - b1 ** (t + 1)))
                    torch._foreach_add_(num, gs, alpha=(1 - b1) / (1 - b1**t))
                else:
                    num = torch._foreach_div(ms, 1 - b1**t)
                if wd != 0:
                    torch._foreach_mul_(ps, 1 - lr * wd)  # decoupled: theta - lr wd theta
                torch._foreach_addcdiv_(ps, num, denom, value=-lr)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Strict: the saved groups, hyperparameter names, parameter names and shapes must match."""
        _check_optimizer_state(self, state_dict)
        super().load_state_dict(state_dict)
        _own_state_tensors(self)


# ----------------------------------------------------------------------------------------------------------------
# Muon + Adam as one optimizer


class MuonWithAdam(torch.optim.Optimizer):
    """One optimizer object for ``torch.optim.Muon`` (2-D weights) and :class:`NesterovAdam` (everything else).

    ``param_groups`` is the Muon groups followed by the Adam groups; they are the very dicts the two inner
    optimizers read, so setting ``group["lr"]`` (or any LR scheduler) drives both. The inner optimizers share this
    object's ``state``, so the inherited ``state_dict`` / ``zero_grad`` cover everything and a checkpoint is a
    normal torch optimizer state dict.
    """

    def __init__(self, muon: torch.optim.Optimizer, adam: torch.optim.Optimizer):
        self.muon, self.adam = muon, adam
        self._n_muon = len(muon.param_groups)
        super().__init__([*muon.param_groups, *adam.param_groups], {})  # shares the group dicts (not copies)
        self._link()

    def _link(self) -> None:
        self.muon.param_groups = self.param_groups[: self._n_muon]
        self.adam.param_groups = self.param_groups[self._n_muon :]
        self.muon.state = self.state  # parameters are disjoint, so one dict keyed by parameter serves both
        self.adam.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        self.muon.step()
        self.adam.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Strict: the saved groups, hyperparameter names, parameter names and shapes must match."""
        _check_optimizer_state(self, state_dict)
        super().load_state_dict(state_dict)  # replaces self.param_groups and self.state with new objects
        _own_state_tensors(self)
        self._link()


class BatchedMuon(torch.optim.Muon):
    """``torch.optim.Muon`` with the Newton-Schulz orthogonalisation batched over matrices of the same shape.

    Per matrix the arithmetic is torch's (``_single_tensor_muon``): B <- lerp(B, G, 1 - mu); U = lerp(G, B, mu)
    (Nesterov); X = U / max(||U||_F, eps) in ``ns_dtype`` (torch: bfloat16; here bfloat16 where it is fast, see
    below), transposed when tall; 5 quintic steps
    A = X X^T, X <- a X + (b A + c A^2) X; theta <- theta (1 - lr wd) - lr sqrt(max(1, rows / cols)) X.
    Matrices of one (shape, dtype, device) run as one stack of ``bmm`` calls instead of one small ``mm`` chain each:
    the optimizer step of the 0.82M-parameter demo model (53 matrices in 5 shapes) took 45 ms of a 243 ms training
    step on 2 CPU cores, and about 12 ms batched. Same state (``momentum_buffer``) and hyperparameters as torch's
    Muon, so checkpoints are interchangeable. Batched bf16 matmuls may round differently from per-matrix ones
    (equal up to bf16 precision; tested against torch's Muon and against a float64 per-matrix reference).

    ``ns_dtype=None`` (default) picks the dtype per device (:func:`pmf.train.precision.internal_dtype`): bfloat16 on GPUs
    and on CPUs with native bf16, float32 on other CPUs, where bf16 matmuls are emulated: the demo model's step took
    690 ms with bf16 Newton-Schulz against 24 ms in float32 on a 2-core EPYC without AVX-512. float32 is the more
    accurate of the two, so the update differs only by bf16 rounding. An explicit ``ns_dtype=torch.bfloat16`` is
    obeyed, with a one-time warning on such CPUs.

    ``partition=True`` (replicated parameters on every rank of ``process_group``, e.g. DDP mode): each rank runs
    Newton-Schulz only on its FLOP-balanced share of the matrices and one all-gather shares the results
    (:mod:`pmf.parallel.ns_partition`); momentum stays replicated and the state dict is unchanged. In one process it
    is the same code path with every matrix owned by rank 0."""

    def __init__(self, params, *args, ns_dtype: torch.dtype | None = None, partition: bool = False,
                 process_group=None, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.ns_dtype = ns_dtype
        # Not hyperparameters of a group: the state dict (and so a checkpoint) is the same with or without them.
        self.partition = partition  # split Newton-Schulz over the ranks of process_group (replicated parameters)
        self.process_group = process_group  # None: the default group

    def _full(self, update: torch.Tensor) -> torch.Tensor:
        """The whole matrix of an update (a hook: sharded subclasses gather it here)."""
        return update

    def _like(self, ortho: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """The orthogonalised matrix laid out like ``update`` (a hook: sharded subclasses keep their rows)."""
        return ortho

    def dtype_for(self, device: torch.device) -> torch.dtype:
        """The Newton-Schulz dtype on ``device``: ``ns_dtype``, or when None bf16 where native, else float32."""
        if self.ns_dtype is None:
            return precision.internal_dtype(device)
        if self.ns_dtype == torch.bfloat16:
            precision.warn_if_slow_bf16(torch.device(device).type, "Muon's Newton-Schulz in bf16 (ns_dtype)")
        return self.ns_dtype

    def orthogonalize(self, mats: list[torch.Tensor], group: dict) -> list[torch.Tensor]:
        """Newton-Schulz on each matrix of ``mats``, batched by (shape, dtype, device); results in the dtype
        :meth:`dtype_for` gives the device."""
        a, b, c = group["ns_coefficients"]
        out: list[torch.Tensor | None] = [None] * len(mats)
        buckets: dict[tuple, list[int]] = defaultdict(list)
        for i, m in enumerate(mats):
            buckets[(tuple(m.shape), m.dtype, m.device)].append(i)
        for (shape, _, device), idx in buckets.items():
            tall = shape[0] > shape[1]  # iterate on the wide orientation: the Gram matrix is the smaller one
            X = torch.stack([mats[i].T if tall else mats[i] for i in idx]).to(self.dtype_for(device))
            X = X / X.flatten(1).norm(dim=1).clamp(min=group["eps"])[:, None, None]  # spectral norm <= 1
            for _ in range(group["ns_steps"]):
                A = X @ X.mT
                X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)  # a X + (b A + c A^2) X
            for k, i in enumerate(idx):
                out[i] = X[k].T if tall else X[k]
        return out

    def orthogonalize_shared(self, work: list[tuple[dict, list[torch.Tensor]]]) -> list[list[torch.Tensor]]:
        """Newton-Schulz of every matrix of ``work`` ([(group, matrices)]), the results per group as in
        :meth:`orthogonalize`. With ``partition`` on and W > 1 ranks, each rank orthogonalises only the matrices
        :func:`pmf.parallel.ns_partition.assign_owners` gives it (balanced by FLOPs, the same on every rank) and one
        all-gather shares the results; otherwise this rank owns every matrix and nothing is communicated. A
        collective when partitioned: every rank must step the same matrices (in DDP mode
        :func:`pmf.parallel.dist.all_reduce_grads` gives every parameter a gradient on every rank)."""
        world, rank = ns_partition.active_world(self.partition, self.process_group)
        flat = [(gi, m) for gi, (_, mats) in enumerate(work) for m in mats]
        owners = ns_partition.assign_owners([ns_partition.ns_flops(m.shape, work[gi][0]["ns_steps"])
                                             for gi, m in flat], world)
        mine: dict[int, torch.Tensor] = {}
        for gi, (group, _) in enumerate(work):
            idx = [i for i, (g, _) in enumerate(flat) if g == gi and owners[i] == rank]
            mine.update(zip(idx, self.orthogonalize([flat[i][1] for i in idx], group)))
        devices = {m.device for _, m in flat}
        if world > 1 and len(devices) > 1:
            raise ValueError(f"optim.muon_partition needs every Muon matrix on one device, got {sorted(map(str, devices))}"
                             "; set optim.muon_partition=false")
        dev = devices.pop() if devices else torch.device("cpu")
        shared = ns_partition.share(mine, [m.shape for _, m in flat], owners, world, rank, self.dtype_for(dev), dev,
                                    self.process_group)  # world 1: returns this rank's results, no communication
        out: list[list[torch.Tensor]] = [[] for _ in work]
        for (gi, _), o in zip(flat, shared):
            out[gi].append(o)
        return out

    @torch.no_grad()
    def step(self, closure=None):
        from torch.optim._muon import _adjust_lr  # torch's rule: lr * sqrt(max(1, rows / cols)) for "original"

        loss = _closure_loss(closure)
        work = []  # (group, params, momentum-updated matrices U): all groups first, so the shared NS is one collective
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            if not params:
                continue
            mu = group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1 - mu)
            updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
            work.append((group, params, updates))
        orthos = self.orthogonalize_shared([(g, [self._full(u) for u in us]) for g, _, us in work])
        for (group, params, updates), os_ in zip(work, orthos):
            lr, wd = float(group["lr"]), group["weight_decay"]
            for p, u, o in zip(params, updates, os_):
                if wd != 0:
                    p.mul_(1 - lr * wd)
                p.add_(self._like(o.to(p.dtype), u), alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


def build_optimizer(model: nn.Module, cfg: OptimConfig, partition_ns: bool = False) -> torch.optim.Optimizer:
    """The official optimizer ("muon") or the all-Adam ablation ("adam", Fig. 3a) over ``model``'s parameters.
    ``partition_ns``: the parameters are replicated on every rank of the default process group (DDP mode), so
    Muon may split its Newton-Schulz work across the ranks (:class:`BatchedMuon` ``partition``)."""
    adam_kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                   nesterov=cfg.nesterov_adam)
    if cfg.name == "adam":
        return NesterovAdam(list(model.named_parameters()), **adam_kw)
    if cfg.name != "muon":
        raise ValueError(f"optimizer name must be 'muon' or 'adam', got {cfg.name!r}")
    if cfg.muon_ns_precision not in NS_DTYPES:
        raise ValueError(f"optim.muon_ns_precision must be one of {', '.join(NS_DTYPES)}, got {cfg.muon_ns_precision!r}")
    if not hasattr(torch.optim, "Muon"):
        raise RuntimeError(f"torch.optim.Muon needs torch >= 2.9 (found {torch.__version__}); use name='adam'")
    muon_params, adam_params = param_groups(model)
    if not muon_params:
        return NesterovAdam(adam_params, **adam_kw)
    muon = BatchedMuon(
        muon_params,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,  # torch's default is 0.1; the recipe uses 0
        momentum=cfg.muon_momentum,
        nesterov=True,
        ns_coefficients=(3.4445, -4.7750, 2.0315),
        eps=cfg.eps,  # optax normalises by ||X||_F + eps with the same eps as Adam (torch default 1e-7)
        ns_steps=cfg.muon_ns_steps,
        ns_dtype=NS_DTYPES[cfg.muon_ns_precision],
        partition=partition_ns,
        # sqrt(max(1, rows / cols)) of a torch (out, in) weight = optax's sqrt(max(1, fan_out / fan_in)).
        adjust_lr_fn="original",
    )
    if not adam_params:
        return muon
    return MuonWithAdam(muon, NesterovAdam(adam_params, **adam_kw))


# ----------------------------------------------------------------------------------------------------------------
# Learning-rate schedule (keyed to images seen)


def lr_at(cfg: OptimConfig, kimg_seen: float) -> float:
    """Learning rate after ``kimg_seen`` thousand images (pass the count *before* the step it is used for).

    warmup:  lr * kimg / warmup_kimg                         for kimg < warmup_kimg (0 at the first step)
    constant: lr
    cosine:  lr_min + (lr - lr_min) (1 + cos(pi p)) / 2,     p = clip((kimg - warmup) / (total - warmup), 0, 1),
             lr_min = min_lr_ratio * lr
    """
    if cfg.schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {cfg.schedule!r}")
    if cfg.warmup_kimg > 0 and kimg_seen < cfg.warmup_kimg:
        return cfg.lr * max(kimg_seen, 0.0) / cfg.warmup_kimg
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.total_kimg <= cfg.warmup_kimg:
        raise ValueError(f"cosine schedule needs total_kimg ({cfg.total_kimg}) > warmup_kimg ({cfg.warmup_kimg})")
    p = min(max((kimg_seen - cfg.warmup_kimg) / (cfg.total_kimg - cfg.warmup_kimg), 0.0), 1.0)
    lr_min = cfg.min_lr_ratio * cfg.lr
    return lr_min + (cfg.lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * p))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr (Muon scales its own per-shape factor on top of this)."""
    for g in optimizer.param_groups:
        g["lr"] = lr
