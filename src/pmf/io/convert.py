"""Official pMF PyTorch checkpoints <-> :class:`pmf.method.model.PMFDiT` (official torch branch, `models/pmfDiT.py`).

Our parameter names are the official torch names minus two wrappers the authors' Flax-to-torch port adds:

    official                                           ours
    <linear>._flax_linear.{weight,bias}                <linear>.{weight,bias}
    y_embedder.embedding_table._flax_embedding.weight  y_embedder.embedding_table.weight
    rope_freqs (N, head_dim/2) complex64 buffer        (none: RoPE is recomputed as real cos/sin)

Every other key is identical. The linear layers are listed explicitly in ``_LINEARS`` (not found by scanning a
model) so that a key spelled wrongly in a checkpoint is reported rather than guessed at. The official loader uses
``load_state_dict(strict=False)``, which accepts a checkpoint with wrong keys without complaint.
:func:`load_official` instead maps and shape-checks every key first, reports every problem in one error, and then
loads with ``strict=True``.

``rope_freqs`` is a buffer derived from the grid and head_dim, so we drop it. Before dropping it we check that it
holds exactly the interleaved 2-D RoPE that :func:`pmf.method.model.rope_2d_angles` implements. A checkpoint whose RoPE
differs (another layout, or the real-valued buffer left by the official ``Module.to(dtype)`` trap of the torch branch)
would otherwise load and then produce wrong images without any error.

The authors' JAX "full" checkpoints (Orbax, with v-head, EMA copies and optimizer state) are converted by
:mod:`pmf.train.official_jax`: its flax-path -> official-torch-name pass feeds :func:`official_to_ours`.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import warnings
from collections.abc import Mapping

import torch

from pmf.method.model import MODELS, PMFDiT, rope_2d_angles

ROPE_KEY = "rope_freqs"
ROPE_ATOL = 1e-5
V_HEAD_PREFIXES = ("v_heads.", "v_final_layer.")
# Prefixes stripped when *every* key carries them: the official pixelMeanFlow wrapper ("net."), DDP ("module."),
# torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("net.", "module.", "_orig_mod.")
# Top-level keys under which training scripts commonly nest the state dict.
NESTING_KEYS = ("ema", "model_ema", "ema_model", "state_dict", "model", "net")

# The official constructor's kwargs (``models/pmfDiT.py``: ``pmfDiT.__init__`` on the torch branch, the dataclass
# fields of ``pmfDiT`` on the JAX main branch) that PMFDiT does not take under the same name. The *_init_constant
# ones only scale the random initialisation, which the loaded weights replace, so they are accepted and ignored.
# ``eval_mode`` (torch) / ``eval`` (JAX) build the network without its v-head: our ``v_head=False``.
OFFICIAL_INIT_ONLY_KWARGS = ("token_init_constant", "embedding_init_constant", "weight_init_constant")
OFFICIAL_EVAL_KWARGS = ("eval_mode", "eval")

# Every nn.Linear of PMFDiT (ours), as a regex over the module path. The official port wraps each one as
# <path>._flax_linear.
_BLOCK = r"(?:shared_blocks|u_heads|v_heads)\.\d+"
_LINEARS = (
    rf"{_BLOCK}\.attn\.(?:q|k|v|out)_proj",  # bias-free
    rf"{_BLOCK}\.mlp\.w[123]",  # SwiGLU, bias-free
    r"(?:h|omega|cfg_t_start|cfg_t_end)_embedder\.mlp\.[02]",  # Linear(256, D), SiLU, Linear(D, D)
    r"[uv]_final_layer\.linear",
)
_LINEAR_RE = re.compile(rf"^({'|'.join(_LINEARS)})\.(weight|bias)$")
_EMBEDDING_RE = re.compile(r"^(y_embedder\.embedding_table)\.weight$")
_WRAPPED_RE = re.compile(r"^(.*)\._flax_(?:linear|embedding)\.(weight|bias)$")


# ----------------------------------------------------------------------------------------------------------------
# Key names


def ours_key_to_official(key: str) -> str:
    """Our parameter name -> the official torch name (adds the ``_flax_linear`` / ``_flax_embedding`` wrapper)."""
    key = _LINEAR_RE.sub(r"\1._flax_linear.\2", key)
    return _EMBEDDING_RE.sub(r"\1._flax_embedding.weight", key)


def official_key_to_ours(key: str) -> str | None:
    """Official torch name -> ours, or None when ``key`` is not spelled as the official port would spell it.

    Examples of None: a linear weight without its wrapper, or a wrapper on something that is not a linear layer.
    The inverse is defined through :func:`ours_key_to_official`, so the two maps are each other's inverse.
    """
    ours = _WRAPPED_RE.sub(r"\1.\2", key)
    return ours if ours_key_to_official(ours) == key else None


def _strip_wrapper_prefix(state_dict: Mapping) -> tuple[dict, str]:
    """Remove the wrapper prefixes that every key carries. Returns (state dict, prefix removed)."""
    sd, removed = dict(state_dict), ""
    while sd:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            break
        sd = {k[len(prefix) :]: v for k, v in sd.items()}
        removed += prefix
    return sd, removed


# ----------------------------------------------------------------------------------------------------------------
# RoPE buffer


def rope_freqs(grid: int, head_dim: int) -> torch.Tensor:
    """The official ``rope_freqs`` buffer: exp(i * angle), complex64 (N, head_dim/2), the angles ours uses."""
    ang = rope_2d_angles(grid, head_dim)
    return torch.polar(torch.ones_like(ang), ang)


def _rope_problem(value: torch.Tensor, grid: int | None = None, head_dim: int | None = None) -> str | None:
    """Return None if ``value`` equals :func:`rope_freqs` within ROPE_ATOL, else a message saying what is wrong.

    When grid/head_dim are None they are read from the buffer's shape (N must be a perfect square).
    """
    shape = tuple(value.shape)
    if len(shape) != 2:
        return f"'{ROPE_KEY}' has shape {shape}; expected (N, head_dim/2)"
    n, half = shape
    grid = math.isqrt(n) if grid is None else grid
    head_dim = 2 * half if head_dim is None else head_dim
    if shape != (grid * grid, head_dim // 2):
        return f"'{ROPE_KEY}' has shape {shape}; the model needs {(grid * grid, head_dim // 2)}"
    if not value.is_complex():
        return (
            f"'{ROPE_KEY}' is real ({value.dtype}), not complex: the checkpoint was probably saved after the official "
            "model's Module.to(dtype), which discards RoPE's imaginary part"
        )
    err = (value.to(torch.complex128) - rope_freqs(grid, head_dim).to(torch.complex128)).abs().max().item()
    if not err <= ROPE_ATOL:
        return (
            f"'{ROPE_KEY}' differs from the interleaved 2-D RoPE pmf implements by up to {err:.3g} (tolerance "
            f"{ROPE_ATOL}): these weights expect another positional rotation"
        )
    return None


_ROPE_HINT = (
    "The weights themselves may be fine (rope_freqs is a derived buffer); if you know the network was trained "
    f"with pmf's RoPE, delete '{ROPE_KEY}' from the state dict and import again."
)


# ----------------------------------------------------------------------------------------------------------------
# Whole state dicts


def official_to_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official torch state dict (with or without a ``net.`` prefix) -> our key names. Tensors are not copied.

    ``rope_freqs``, if present, is checked against our RoPE and then dropped. Raises ValueError listing every key
    not spelled as the official port spells it. Keys that are merely unknown (not in any model) pass through
    unchanged. :func:`load_official` checks them against a concrete model.
    """
    sd, _ = _strip_wrapper_prefix(state_dict)
    problems = []
    if ROPE_KEY in sd and (msg := _rope_problem(sd.pop(ROPE_KEY))):
        problems.append(f"{msg}. {_ROPE_HINT}")
    out = {}
    for key, value in sd.items():
        ours = official_key_to_ours(key)
        if ours is None:
            problems.append(f"'{key}' is not an official key name (the official name would be "
                            f"'{ours_key_to_official(key)}')")
            continue
        out[ours] = value
    if problems:
        raise ValueError("cannot convert the official state dict:\n  " + "\n  ".join(sorted(problems)))
    return out


def _geometry(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(grid, head_dim) of a state dict in our naming, read from pos_embed, the token blocks and a q-norm."""
    prefix = sum(state_dict[f"{g}_tokens"].shape[1] for g in ("class", "omega", "t_min", "t_max", "time"))
    n = state_dict["pos_embed"].shape[1] - prefix
    q_norm = next((v for k, v in state_dict.items() if k.endswith(".attn.q_norm.weight")), None)
    if q_norm is None or math.isqrt(n) ** 2 != n:
        raise ValueError("cannot infer the RoPE grid/head_dim from this state dict (no blocks, or N not square)")
    return math.isqrt(n), q_norm.shape[0]


def ours_to_official(
    state_dict: Mapping[str, torch.Tensor], with_rope_freqs: bool = True, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Our state dict -> the official torch layout, keys prefixed with ``prefix`` (e.g. "net."). The inverse of
    :func:`official_to_ours`. With ``with_rope_freqs`` the complex ``rope_freqs`` buffer is rebuilt from the grid
    and head_dim and placed after ``pos_embed``, as in the official state dict."""
    out = {}
    for key, value in state_dict.items():
        out[prefix + ours_key_to_official(key)] = value
        if key == "pos_embed" and with_rope_freqs:
            out[prefix + ROPE_KEY] = rope_freqs(*_geometry(state_dict))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Loading into a model


def _read_state_dict(obj) -> dict[str, torch.Tensor]:
    """Path or dict -> a flat {name: tensor} dict, unwrapping the usual nesting ({"model": sd}, {"ema": sd}, ...)."""
    if isinstance(obj, (str, os.PathLike)):
        from pmf.util.safe_load import load_torch_file  # never unpickles arbitrary objects

        obj = load_torch_file(obj, "the official checkpoint", "give the authors' released .pt (a state dict of "
                              "tensors), or load it yourself if you trust it and pass its state dict")
    for _ in range(3):  # e.g. {"state_dict": {"model": sd}}
        if not isinstance(obj, Mapping):
            raise ValueError(f"expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        nested = [k for k in NESTING_KEYS if isinstance(obj.get(k), Mapping)]
        if len(nested) != 1:
            found = f"several candidates {nested}" if nested else f"top-level keys {sorted(map(str, obj))[:10]}"
            raise ValueError(
                f"cannot find the state dict in this checkpoint ({found}). Load it yourself and pass the "
                f"dict of tensors you want, e.g. load_official(torch.load(path)['ema'], ...)"
            )
        obj = obj[nested[0]]
    raise ValueError("checkpoint is nested too deeply to find its state dict")


def official_kwargs_to_ours(official_kwargs: Mapping) -> dict:
    """The official ``pmfDiT(**kwargs)`` constructor kwargs -> PMFDiT kwargs.

    Every architecture kwarg of the official constructor has the same name and meaning in PMFDiT (including
    ``num_interval_tokens``, tokens *per endpoint*), and PMFDiT's own extras (v_head, bottleneck_dim, ...) pass
    through. ``eval_mode`` / ``eval`` become ``v_head=not eval_mode``; the init-only constants are dropped with a
    warning saying so. Any other name is an error that lists it.
    """
    ours = set(inspect.signature(PMFDiT.__init__).parameters) - {"self"}
    kwargs, ignored = {}, []
    unknown = sorted(k for k in official_kwargs if k not in ours and k not in OFFICIAL_INIT_ONLY_KWARGS
                     and k not in OFFICIAL_EVAL_KWARGS)
    if unknown:
        raise TypeError(f"unknown PMFDiT / official pmfDiT kwarg(s) {unknown}; PMFDiT takes {sorted(ours)}, and the "
                        f"official {list(OFFICIAL_INIT_ONLY_KWARGS + OFFICIAL_EVAL_KWARGS)} are also accepted")
    for key, value in official_kwargs.items():
        if key in OFFICIAL_INIT_ONLY_KWARGS:
            ignored.append(f"{key}={value!r}")
        elif key not in OFFICIAL_EVAL_KWARGS:
            kwargs[key] = value
    # has the network a v-head? eval_mode / eval say "no" when true; all that are given must agree
    says = {f"{k}={official_kwargs[k]!r}": not official_kwargs[k] for k in OFFICIAL_EVAL_KWARGS if k in official_kwargs}
    if says and "v_head" in official_kwargs:
        says[f"v_head={official_kwargs['v_head']!r}"] = bool(official_kwargs["v_head"])
    if len(set(says.values())) > 1:
        raise ValueError(f"{', '.join(says)} disagree on whether the network has a v-head; give one of them")
    if says:
        kwargs["v_head"] = next(iter(says.values()))
    if ignored:
        warnings.warn(f"ignored official kwarg(s) {', '.join(ignored)}: they only scale the random initialisation, "
                      "which the loaded weights replace", stacklevel=3)
    return kwargs


def _resolve_kwargs(model: str | None, model_kwargs: dict) -> dict:
    """PMFDiT kwargs: a registered size's kwargs (as in pmf.method.model.build_model), then explicit overrides, which
    may be
    given in the official constructor's spelling (:func:`official_kwargs_to_ours`)."""
    model_kwargs = official_kwargs_to_ours(model_kwargs)
    if model is None:
        return dict(model_kwargs)
    if model not in MODELS:
        raise KeyError(f"unknown model {model!r}; registered: {', '.join(MODELS)}")
    spec = MODELS[model]
    return {"noise_scale": spec.noise_scale, **spec.kwargs, **model_kwargs}


def _meta_model(kwargs: dict) -> PMFDiT:
    """PMFDiT built on the meta device: shapes without memory, milliseconds even for H."""
    with torch.device("meta"):
        return PMFDiT(**kwargs)


def _shapes(net: PMFDiT) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _compare(sd: dict, expected_ours: dict, rope, grid: int, head_dim: int) -> list[str]:
    """Problems with an official-layout state dict ``sd`` (prefix and rope_freqs removed) against a model's shapes.
    Keys are compared in the official namespace so that a key lacking its wrapper is reported, never accepted."""
    expected = {ours_key_to_official(k): s for k, s in expected_ours.items()}
    problems = [f"unexpected key '{k}' {tuple(sd[k].shape)}" for k in sd.keys() - expected.keys()]
    problems += [f"missing key '{k}' (model expects {expected[k]})" for k in expected.keys() - sd.keys()]
    problems += [
        f"shape mismatch '{k}': checkpoint {tuple(sd[k].shape)}, model {expected[k]}"
        for k in sd.keys() & expected.keys()
        if tuple(sd[k].shape) != expected[k]
    ]
    if rope is not None and (msg := _rope_problem(rope, grid, head_dim)):
        problems.append(msg)
    return sorted(problems, key=lambda p: p.split("'")[1] if "'" in p else p)


def _matching_sizes(sd: dict, v_head: bool) -> list[str]:
    """Registered sizes whose keys and shapes match ``sd`` exactly (used for the error hint)."""
    matches, width = [], tuple(sd["pos_embed"].shape)[-1:] if "pos_embed" in sd else None
    for name in MODELS:
        if width and (MODELS[name].kwargs.get("hidden_size"),) != width:  # cheap filter before building
            continue
        shapes = _shapes(_meta_model(_resolve_kwargs(name, {"v_head": v_head})))
        if {ours_key_to_official(k): s for k, s in shapes.items()} == {k: tuple(v.shape) for k, v in sd.items()}:
            matches.append(name)
    return matches


def infer_model(state_dict_or_path) -> str:
    """The registered size (a key of :data:`pmf.method.model.MODELS`) whose keys and shapes match an official checkpoint
    exactly; a ValueError names the candidates when there is not exactly one. Lets a bare official ``.pt`` be
    loaded without ``--model``."""
    sd, _ = _strip_wrapper_prefix(_read_state_dict(state_dict_or_path))
    sd.pop(ROPE_KEY, None)
    matches = _matching_sizes(sd, any(k.startswith(V_HEAD_PREFIXES) for k in sd))
    if len(matches) != 1:
        found = f"several registered sizes match ({matches})" if matches else "no registered size matches its keys"
        raise ValueError(f"cannot tell the model size of this official checkpoint: {found}. Import it with "
                         "'pmf import-official FILE.pt --model SIZE --out DIR' and use DIR.")
    return matches[0]


def load_official(state_dict_or_path, model: str | None = None, **model_kwargs) -> PMFDiT:
    """Build a :class:`PMFDiT` and load official torch weights into it with ``strict=True``.

    state_dict_or_path: a state dict in the official layout, or a path to a ``.pt`` (loaded with weights_only=True;
        a state dict nested under one of NESTING_KEYS is found).
    model: a registered size (e.g. "pMF-B/16") whose kwargs are used; ``model_kwargs`` override them (or are the
        full PMFDiT kwargs when ``model`` is None). The official constructor's kwargs are accepted unchanged, e.g.
        ``load_official(sd, input_size=256, patch_size=16, hidden_size=768, depth=16, num_heads=12,
        aux_head_depth=8, eval_mode=True)`` (see :func:`official_kwargs_to_ours`).
    ``v_head`` is inferred from the presence of ``v_heads.*`` / ``v_final_layer.*`` keys unless given (the
    released inference checkpoints have none). Every key is mapped and every shape checked *before* the model is
    built; all problems are raised together in one ValueError. Returns the model in eval mode, on CPU, in float32
    (load_state_dict copies bf16 / fp16 weights into the float32 parameters).
    """
    sd, prefix = _strip_wrapper_prefix(_read_state_dict(state_dict_or_path))
    rope = sd.pop(ROPE_KEY, None)
    kwargs = _resolve_kwargs(model, model_kwargs)
    kwargs.setdefault("v_head", any(k.startswith(V_HEAD_PREFIXES) for k in sd))
    skeleton = _meta_model(kwargs)
    expected = _shapes(skeleton)
    head_dim = 2 * skeleton.rope_cos.shape[1]  # rope_cos is (N, head_dim/2)

    problems = _compare(sd, expected, rope, skeleton.grid, head_dim)
    if problems:
        raise ValueError(_load_error(problems, sd, prefix, model, kwargs))

    net = PMFDiT(**kwargs)
    to_ours = {ours_key_to_official(k): k for k in expected}
    net.load_state_dict({to_ours[k]: v for k, v in sd.items()}, strict=True)
    return net.eval()


def _load_error(problems: list[str], sd: dict, prefix: str, model: str | None, kwargs: dict) -> str:
    """The one error message of load_official: a summary, a hint on how to fix it, then every problem."""
    what = f"model {model!r}" if model else "the given PMFDiT kwargs"
    lines = [f"official checkpoint does not fit {what} (v_head={kwargs['v_head']}): {len(problems)} problem(s)."]
    if not kwargs["v_head"] and any(k.startswith(V_HEAD_PREFIXES) for k in sd):
        lines.append("The checkpoint has a v-head but v_head=False was asked for: pass v_head=True or leave it out.")
    if any(not p.startswith(f"'{ROPE_KEY}'") for p in problems):  # key or shape problems
        matches = _matching_sizes(sd, kwargs["v_head"])
        if matches and model not in matches:
            lines.append(f"Its keys and shapes match registered size(s) {matches}: wrong --model size?")
        elif not any("_flax_" in k for k in sd):
            lines.append("No key has a '_flax_linear' wrapper: this looks like a pmf state dict, not the official "
                         "layout; load it with PMFDiT.load_state_dict, or a saved folder with PMFDiT.from_pretrained.")
        else:
            lines.append("Check --model (size, patch, resolution) or pass the architecture kwargs explicitly "
                         "(hidden_size, depth, num_heads, aux_head_depth, input_size, patch_size, ...).")
    if any(p.startswith(f"'{ROPE_KEY}'") and "has shape" not in p for p in problems):  # a value, not a size
        lines.append(_ROPE_HINT)
    if prefix:
        lines.append(f"(prefix '{prefix}' was removed from every key before comparing.)")
    return "\n".join(lines + [f"  - {p}" for p in problems])


# ----------------------------------------------------------------------------------------------------------------
# CLI: pmf import-official IN.pt --model pMF-B/16 --out DIR


def official_meta(model: str, source: str) -> dict:
    """Sampling defaults and provenance of imported official weights: the registered size's noise scale and its
    released 1-step omega / interval (:data:`pmf.method.model.MODELS`)."""
    spec = MODELS[model]
    return {"model": model, "noise_scale": spec.noise_scale, "omega": spec.omega, "t_min": spec.t_min,
            "t_max": spec.t_max, "num_steps": 1, "ema_halflife_kimg": spec.ema_halflife_kimg, "source": source,
            "imported_from_official": True}


def import_official_main(in_path: str, model: str, out_dir: str) -> None:
    """Import an official checkpoint and save it as a network folder (:mod:`pmf.method.pretrained`: config.json with
    the model kwargs and the registered sampling settings, model.safetensors, a README.md model card), then print a
    one-line summary."""
    net = load_official(in_path, model=model)
    meta = official_meta(model, os.path.basename(str(in_path)))
    net.save_pretrained(out_dir, meta=meta)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"imported {in_path} as {model}: {n_params / 1e6:.2f}M params, v-head {'yes' if net.has_v_head else 'no'} "
          f"-> {out_dir} (config.json, model.safetensors, README.md)")
