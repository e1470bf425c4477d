"""The official JAX training state (a flax ``TrainState`` in an Orbax checkpoint) <-> pmf's network, EMAs and optimizer.

The tree (`utils/trainstate_util.py`: ``TrainState`` with ``ema_params``; `train.py`: ``pixelMeanFlow`` holds the
network as ``net``):

    step                                     int32 scalar: optimizer steps taken
    params/net/...                           the network, v-head included (absent with ``eval=True``)
    ema_params/<v>/net/...                   one copy per ``training.ema_val`` v: a half-life in kimg with
                                             ``ema_type: edm`` (official configs: 500, 1000, 2000), else a decay
    opt_state/inner_states/{muon,adam}/inner_state/{0,1,2}
                                             optax.contrib.muon = partition(muon: chain(scale_by_muon,
                                             add_decayed_weights, scale_by_learning_rate), adam: adamw(nesterov))

Leaf names follow the flax modules of `models/pmfDiT.py`, `models/embedder.py`, `models/torch_models.py`. They map
to the official *torch* branch's names (what :mod:`pmf.io.convert` maps to ours) by

    shared_blocks_3 / u_heads_0 / v_heads_0         shared_blocks.3 / u_heads.0 / v_heads.0
    <embedder>/mlp/layers_0, layers_2               <embedder>.mlp.0, .mlp.2 (nn.Sequential)
    .../_flax_linear/kernel (in, out)               ..._flax_linear.weight (out, in): transposed
    x_embedder/proj{1,2}/kernel (kh, kw, in, out)   x_embedder.proj{1,2}.weight (out, in, kh, kw)
    y_embedder/embedding_table/embedding (1, K+1, D)  y_embedder.embedding_table._flax_embedding.weight (K+1, D)
    RMSNorm .../kernel (D,)                         ....weight
    tokens, pos_embed, attn_scale, mlp_scale, biases  unchanged

EMA copies keep their half-life: ``ema_params/2000`` is pmf's ``ema_hl2000`` (a key below 1 is a constant decay,
``ema_0.9999``). Optimizer state, per parameter (Muon takes every 2-D flax array, Adam the rest, as in
:func:`pmf.train.optim.param_groups`):

    maps:  adam  inner_state/0/{mu, nu}          NesterovAdam exp_avg / exp_avg_sq (same layout changes as above)
           adam  inner_state/0/count             NesterovAdam step (the same count for every parameter)
           muon  inner_state/0/mu                torch Muon momentum_buffer (transposed)
    not:   muon  inner_state/0/count             torch's Muon keeps no count: optax bias-corrects the Muon momentum
                                                 by 1 / (1 - 0.95^t), torch does not; after 200 steps the factor
                                                 differs from 1 by < 4e-5. Written back as the Adam count.
           muon  inner_state/0/ns_coeffs         pmf's Newton-Schulz coefficients are fixed (3.4445, -4.7750,
                                                 2.0315), the optax default; other values are refused.
           */inner_state/2/count                 the learning-rate schedule's step: pmf's schedule follows images
                                                 seen (pmf.train.optim.lr_at), set from step x --images-per-step.
           */inner_state/1                       add_decayed_weights: stateless (masked None leaves).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from pmf.errors import PmfError
from pmf.io.convert import official_to_ours, ours_to_official
from pmf.train.ema import EMASpec

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # optax.contrib.muon's default and pmf's (pmf.train.optim.build_optimizer)
OFFICIAL_IMAGES_PER_STEP = 1024  # the official configs' training.batch_size: images per optimizer step
_BLOCK_FLAX = re.compile(r"^(shared_blocks|u_heads|v_heads)_(\d+)$")
_LAYER_FLAX = re.compile(r"^layers_(\d+)$")
_CONV = ("proj", "proj1", "proj2")  # x_embedder convolutions
MUON, ADAM = "muon", "adam"
PREFIX_ADAM = ("opt_state", "inner_states", ADAM, "inner_state")
PREFIX_MUON = ("opt_state", "inner_states", MUON, "inner_state")


# ----------------------------------------------------------------------------------------------------------------
# One array: flax path <-> official torch key


def _flax_leaf_to_torch(path: tuple[str, ...], a: np.ndarray) -> tuple[str, np.ndarray]:
    """A leaf of params/net (path relative to ``net``) -> (official torch key, array in torch layout)."""
    parts = []
    for p in path[:-1]:
        if m := _BLOCK_FLAX.match(p):
            parts += [m.group(1), m.group(2)]
        elif m := _LAYER_FLAX.match(p):
            parts.append(m.group(1))
        else:
            parts.append(p)
    leaf = path[-1]
    if leaf == "kernel" and parts[-1:] == ["_flax_linear"]:
        return ".".join(parts + ["weight"]), a.T
    if leaf == "kernel" and parts[-1:] and parts[-1] in _CONV:
        return ".".join(parts + ["weight"]), a.transpose(3, 2, 0, 1)
    if leaf == "embedding":
        return ".".join(parts + ["_flax_embedding", "weight"]), a.reshape(a.shape[-2:])
    if leaf == "kernel":  # RMSNorm scale
        return ".".join(parts + ["weight"]), a
    return ".".join(parts + [leaf]), a


def _torch_key_to_flax(key: str, a: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """The inverse of :func:`_flax_leaf_to_torch`."""
    parts, out = key.split("."), []
    i = 0
    while i < len(parts):
        p = parts[i]
        if p in ("shared_blocks", "u_heads", "v_heads") and i + 1 < len(parts):
            out.append(f"{p}_{parts[i + 1]}")
            i += 2
            continue
        out.append(f"layers_{p}" if p.isdigit() else p)
        i += 1
    leaf = out[-1]
    if leaf == "weight" and out[-2:-1] == ["_flax_linear"]:
        return tuple(out[:-1] + ["kernel"]), a.T
    if leaf == "weight" and out[-2:-1] == ["_flax_embedding"]:
        return tuple(out[:-2] + ["embedding"]), a[None]
    if leaf == "weight" and out[-2] in _CONV:
        return tuple(out[:-1] + ["kernel"]), a.transpose(2, 3, 1, 0)
    if leaf == "weight":
        return tuple(out[:-1] + ["kernel"]), a
    return tuple(out), a


def net_to_ours(net_tree: dict[tuple, np.ndarray]) -> dict[str, torch.Tensor]:
    """params/net (paths relative to ``net``) -> our state dict (key names through :func:`pmf.io.convert.
    official_to_ours`, which reports any name the official port would not spell)."""
    official = {}
    for path, a in net_tree.items():
        key, arr = _flax_leaf_to_torch(path, a)
        official[key] = torch.from_numpy(np.ascontiguousarray(arr))
    return official_to_ours(official)


def ours_to_net(state_dict: dict[str, torch.Tensor]) -> dict[tuple, np.ndarray]:
    """Our state dict -> params/net leaves (the inverse of :func:`net_to_ours`)."""
    out = {}
    for key, t in ours_to_official(state_dict, with_rope_freqs=False).items():
        path, arr = _torch_key_to_flax(key, t.detach().cpu().numpy())
        out[path] = np.ascontiguousarray(arr)
    return out


def _ours_key_to_net_path(key: str, shape: tuple) -> tuple[str, ...]:
    return _torch_key_to_flax(next(iter(ours_to_official({key: torch.empty(0)}, with_rope_freqs=False))),
                              np.empty(shape))[0]


# ----------------------------------------------------------------------------------------------------------------
# The whole TrainState tree


def ema_name(key: str) -> str:
    """An ``ema_params`` key -> pmf's EMA name: "2000" -> "ema_hl2000" (a half-life in kimg, ``ema_type: edm``),
    "0.9999" -> "ema_0.9999" (a constant decay, ``ema_type: const``)."""
    v = float(key)
    return EMASpec(halflife_kimg=v).name if v >= 1 else EMASpec(decay=v).name


def ema_key(name: str) -> str:
    """pmf's EMA name -> the official ``ema_params`` key (the inverse of :func:`ema_name`)."""
    spec = EMASpec.parse(name)
    v = spec.halflife_kimg if spec.halflife_kimg is not None else spec.decay
    return str(int(v)) if float(v).is_integer() else repr(float(v))


@dataclass
class OfficialState:
    """An official TrainState split into its parts, each network in our key names (torch tensors)."""

    step: int
    params: dict[str, torch.Tensor]
    emas: dict[str, dict[str, torch.Tensor]]  # pmf EMA name -> state dict
    opt_tree: dict[tuple, np.ndarray | None] = field(default_factory=dict)  # opt_state leaves, paths after opt_state
    has_optimizer: bool = False  # a Muon opt_state (not the eval-only sgd(0) state)


def _subtree(tree: dict, prefix: tuple) -> dict:
    n = len(prefix)
    return {k[n:]: v for k, v in tree.items() if k[:n] == prefix}


def split_tree(tree: dict[tuple, np.ndarray | None]) -> OfficialState:
    """An Orbax-restored TrainState ({key tuple: array}) -> :class:`OfficialState`. Raises PmfError when the tree
    is not the official one (no params/net)."""
    net = {k: v for k, v in _subtree(tree, ("params", "net")).items() if v is not None}
    if not net:
        tops = sorted({k[0] for k in tree})
        raise PmfError(f"not an official pMF TrainState: no params/net/... arrays (top-level keys {tops})")
    step = tree.get(("step",))
    emas = {}
    for key in sorted({k[1] for k in tree if k[0] == "ema_params"}, key=float):
        emas[ema_name(key)] = net_to_ours({k: v for k, v in _subtree(tree, ("ema_params", key, "net")).items()
                                           if v is not None})
    opt = _subtree(tree, ("opt_state",))
    return OfficialState(step=int(step) if step is not None else 0, params=net_to_ours(net), emas=emas, opt_tree=opt,
                         has_optimizer=any(k[:2] == ("inner_states", MUON) for k in opt))


def build_tree(step: int, params: dict[str, torch.Tensor], emas: dict[str, dict[str, torch.Tensor]],
               opt_tree: dict[tuple, np.ndarray | None] | None) -> dict[tuple, np.ndarray | None]:
    """The inverse of :func:`split_tree`: a TrainState tree in Orbax key tuples. ``opt_tree`` None writes the
    eval-only ``optax.sgd(0)`` state of `train.py`'s ``just_evaluate`` (two empty states)."""
    tree: dict[tuple, np.ndarray | None] = {("step",): np.asarray(step, np.int32)}
    tree.update({("params", "net", *k): v for k, v in ours_to_net(params).items()})
    if opt_tree is None:
        opt_tree = {("0",): None, ("1",): None}
    tree.update({("opt_state", *k): v for k, v in opt_tree.items()})
    for name, sd in emas.items():
        tree.update({("ema_params", ema_key(name), "net", *k): v for k, v in ours_to_net(sd).items()})
    return tree


# ----------------------------------------------------------------------------------------------------------------
# Optimizer state: optax.contrib.muon <-> pmf's MuonWithAdam (pmf.train.optim)


def _is_muon(shape: tuple) -> bool:
    """optax.contrib.muon's rule on the *flax* array: 2-D goes to Muon."""
    return len(shape) == 2


def optimizer_state_to_ours(state: OfficialState, net: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """Load the official Muon / Adam moments of ``state`` into ``opt`` (pmf's MuonWithAdam over ``net``, whose
    parameter names are our state-dict keys). Returns notes on what did not map."""
    tree = state.opt_tree
    coeffs = tree.get(("inner_states", MUON, "inner_state", "0", "ns_coeffs"))
    if coeffs is not None and not np.allclose(np.asarray(coeffs, np.float64).reshape(-1)[-3:], NS_COEFFS, atol=1e-6):
        raise PmfError(f"the checkpoint's Muon ns_coeffs {np.asarray(coeffs).tolist()} differ from pmf's fixed "
                       f"{list(NS_COEFFS)}; its optimizer state cannot continue in pmf (use --init-from for the "
                       "weights only)")
    count = tree.get(("inner_states", ADAM, "inner_state", "0", "count"))
    count = int(count) if count is not None else 0
    missing = []
    for name, p in net.named_parameters():
        path = _ours_key_to_net_path(name, tuple(p.shape))
        if _is_muon(_flax_shape(name, p)):
            mu = tree.get(("inner_states", MUON, "inner_state", "0", "mu", "net", *path))
            st = {} if mu is None else {"momentum_buffer": _to_torch_layout(name, mu, p)}
        else:
            m, v = (tree.get(("inner_states", ADAM, "inner_state", "0", k, "net", *path)) for k in ("mu", "nu"))
            st = {} if m is None or v is None else {"step": torch.tensor(count, dtype=torch.int64),
                                                    "exp_avg": _to_torch_layout(name, m, p),
                                                    "exp_avg_sq": _to_torch_layout(name, v, p)}
        if st:
            opt.state[p] = st
        else:
            missing.append(name)
    if not missing:
        return []
    return [f"no optimizer moments for {len(missing)} parameter(s) (they start fresh): " + ", ".join(missing[:6])
            + (" ..." if len(missing) > 6 else "")]


def _flax_shape(name: str, p: torch.Tensor) -> tuple:
    return _torch_key_to_flax(ours_to_official_key(name), np.empty(tuple(p.shape), np.float32))[1].shape


def ours_to_official_key(name: str) -> str:
    return next(iter(ours_to_official({name: torch.empty(0)}, with_rope_freqs=False)))


def _to_torch_layout(name: str, a: np.ndarray, p: torch.Tensor) -> torch.Tensor:
    _, arr = _flax_leaf_to_torch(_torch_key_to_flax(ours_to_official_key(name), np.empty(tuple(p.shape)))[0], a)
    t = torch.from_numpy(np.ascontiguousarray(arr)).to(p.dtype)
    if tuple(t.shape) != tuple(p.shape):
        raise PmfError(f"optimizer moment of {name} has shape {tuple(t.shape)}, the parameter {tuple(p.shape)}")
    return t


def optimizer_state_to_official(net: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[tuple, np.ndarray | None]:
    """pmf's MuonWithAdam state -> the ``opt_state`` leaves of optax.contrib.muon (paths after ``opt_state``), masked
    entries as None. Counts (Adam, Muon, both schedules) are the Adam step; a parameter never stepped gets zeros."""
    counts = [int(st["step"]) for st in opt.state.values() if "step" in st]
    count = np.asarray(max(counts) if counts else 0, np.int32)
    adam_mu, adam_nu, muon_mu = {}, {}, {}
    for name, p in net.named_parameters():
        path = _ours_key_to_net_path(name, tuple(p.shape))
        st = opt.state.get(p, {})

        def flax(t):
            t = torch.zeros_like(p) if t is None else t
            return _torch_key_to_flax(ours_to_official_key(name), t.detach().cpu().numpy())[1]

        if _is_muon(_flax_shape(name, p)):
            muon_mu[path] = flax(st.get("momentum_buffer"))
            adam_mu[path] = adam_nu[path] = None
        else:
            adam_mu[path], adam_nu[path] = flax(st.get("exp_avg")), flax(st.get("exp_avg_sq"))
            muon_mu[path] = None
    out: dict[tuple, np.ndarray | None] = {}
    adam, muon = ("inner_states", ADAM, "inner_state"), ("inner_states", MUON, "inner_state")
    out[(*adam, "0", "count")] = count
    out.update({(*adam, "0", "mu", "net", *k): _c(v) for k, v in adam_mu.items()})
    out.update({(*adam, "0", "nu", "net", *k): _c(v) for k, v in adam_nu.items()})
    out[(*adam, "1")] = None
    out[(*adam, "2", "count")] = count.copy()
    out[(*muon, "0", "count")] = count.copy()
    out.update({(*muon, "0", "mu", "net", *k): _c(v) for k, v in muon_mu.items()})
    out[(*muon, "0", "ns_coeffs")] = np.asarray(NS_COEFFS, np.float32)
    out[(*muon, "1")] = None
    out[(*muon, "2", "count")] = count.copy()
    return out


def _c(a):
    return None if a is None else np.ascontiguousarray(a)


def nimg_of_step(step: int, images_per_step: int) -> int:
    """Images seen after ``step`` official optimizer steps of ``images_per_step`` images (the global batch)."""
    if images_per_step < 1:
        raise PmfError(f"--images-per-step={images_per_step} must be >= 1 (the official global batch, 1024)")
    return int(step) * int(images_per_step)

