"""Run configuration: typed dataclasses, named presets (YAML in ``pmf/configs``), ``key=value`` overrides, JSON dump.

Each concept owns its section's dataclass (``ObjectiveConfig`` in :mod:`pmf.method.objective`, ``OptimConfig`` in
:mod:`pmf.train.optim`); this module composes them into :class:`RunConfig` and is the only place that parses text.
Nothing downstream receives an argparse Namespace.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from pmf.method.model import MODELS
from pmf.method.objective import ObjectiveConfig
from pmf.method.perceptual import PerceptualConfig
from pmf.train.optim import OptimConfig
from pmf.util.safe_load import load_yaml

PRESET_DIR = Path(__file__).parent.parent / "configs"
# Field metadata of settings that may change when a run is resumed: they do not change what the training state
# holds (its tensors, their shapes and meaning), only how the run goes on from it (check_resume_config in
# pmf.train.loop). A section marked so is resumable as a whole. Other modules' config dataclasses use the same literal.
RESUMABLE = {"resumable": True}


@dataclass
class ModelConfig:
    name: str = "pMF-T/7-28"  # a key of pmf.method.model.MODELS
    overrides: dict = field(default_factory=dict)  # PMFDiT kwargs replacing the registry's (e.g. {"depth": 4})


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"  # "fashion_mnist" | "imagefolder" (JPEG decode + crop per sample) | "shards"
    # (`pmf prepare-data` output: the same pixels, cropped once, memory-mapped; docs/data.md)
    path: str = field(default="", metadata=RESUMABLE)  # imagefolder root, shards: the prepare-data --out directory
    #   (or a Fashion-MNIST folder; empty = search the usual places)
    resolution: int = 28  # imagefolder: ADM center crop to this size; shards: must equal the prepared resolution
    num_workers: int = field(default=0, metadata=RESUMABLE)  # imagefolder / shards DataLoader workers
    class_conditional: bool = True  # False: all labels are the null class (unconditional training)
    verify: bool = field(default=False, metadata=RESUMABLE)  # shards: check every shard's SHA-256 against the
    #   manifest when opened (reads every byte once; `pmf prepare-data --check` does the same alone)


@dataclass
class TrainConfig:
    total_kimg: float = field(default=1000.0, metadata=RESUMABLE)  # length of the run in thousands of training images
    batch_size: int = 128  # global batch (all processes together)
    accum_steps: int | str = field(default=1, metadata=RESUMABLE)  # micro-batches per optimizer step (batch_size
    #   must divide by world_size * accum_steps); "auto": micro-batch, accumulation and activation checkpointing
    #   from the memory plan for the devices at hand, global batch kept (pmf.train.plan.auto_settings). Resumable:
    #   the per-sample draws make any split of the global batch the same step
    seed: int = 0  # all randomness derives from (seed, images seen, sample index)
    ema: list = field(default_factory=lambda: ["hl500", "hl1000", "hl2000"])  # EMA copies (see pmf.train.ema.EMASpec)
    ema_ramp: float = 0.05  # EDM ramp-up of the half-life: min(half-life, ramp * images seen)
    grad_clip: float = field(default=0.0, metadata=RESUMABLE)  # max global grad norm; 0 = off (official: off)
    max_nonfinite: int = field(default=10, metadata=RESUMABLE)  # stop (with a checkpoint) after this many non-finite
    #   steps in a row
    log_every_kimg: float = field(default=2.0, metadata=RESUMABLE)  # JSONL / TensorBoard log interval
    sample_every_kimg: float = field(default=50.0, metadata=RESUMABLE)  # 1-NFE sample grid interval (PNG); 0 = only at
    #   the end
    ckpt_every_kimg: float = field(default=50.0, metadata=RESUMABLE)  # training-state checkpoint interval
    ckpt_every_minutes: float = field(default=5.0, metadata=RESUMABLE)  # ... and at least this often in wall-clock time
    check_every_kimg: float = field(default=100.0, metadata=RESUMABLE)  # cross-rank parameter-consistency check
    #   interval (multi-process only)
    device: str = field(default="auto", metadata=RESUMABLE)  # "auto" | "cpu" | "cuda"
    compile: bool = field(default=False, metadata=RESUMABLE)  # torch.compile the whole lean step: guidance, tangent
    #   pass, losses and backward as whole graphs (pmf.train.speed.StepCompiler; a failure is an error, not eager)
    compile_mode: str = "default"  # torch.compile mode: "default", or "reduce-overhead" (CUDA graphs on CUDA)
    precision: str = "fp32"  # "fp32" | "bf16" autocast of the forward passes (params, grads, optimizer in fp32)
    tf32: bool = field(default=True, metadata=RESUMABLE)  # CUDA: fp32 matmuls / convolutions on TF32 tensor cores
    #   (10-bit mantissa inputs); false: true fp32
    activation_checkpointing: bool = field(default=False, metadata=RESUMABLE)  # recompute each transformer block in
    #   the backward (non-reentrant torch.utils.checkpoint): keeps only block inputs, about one extra forward of
    #   compute (pmf.train.plan)
    threads: int = field(default=0, metadata=RESUMABLE)  # torch CPU threads; 0 = torch's default
    consistency_check: bool = field(default=True, metadata=RESUMABLE)  # check parameters agree across ranks at start
    #   and periodically
    parallel: str = field(default="ddp", metadata=RESUMABLE)  # "ddp": bare module + explicit gradient all-reduce;
    #   "fsdp": FSDP2 shards over all ranks; "hsdp": FSDP2 shards within a group of hsdp_shard_size ranks (a node),
    #   replicated across groups (pmf.train.modes, docs/scale-out.md)
    hsdp_shard_size: int = field(default=0, metadata=RESUMABLE)  # hsdp: ranks per shard group (the inner mesh
    #   dimension; all-gathers and reduce-scatters stay inside it); 0 = the processes per node (LOCAL_WORLD_SIZE).
    #   Must divide the world size
    fsdp_reshard_after_forward: bool = field(default=True, metadata=RESUMABLE)  # fsdp: free each block's gathered
    #   weights after its forward (less memory, one more all-gather per block in backward); False keeps them until
    #   the backward (ZeRO-2-like)


@dataclass
class SampleConfig:
    """Guidance used for the training-time grids and the evaluation (1-NFE unless ``steps`` says otherwise)."""

    omega: float = 3.0
    t_min: float = 0.0
    t_max: float = 1.0
    steps: int = 1
    ema: str = "ema_hl500"  # which EMA copy samples and exports use ("" = raw weights)
    grid_seed: int = 0


@dataclass
class EvalConfig:
    """Defaults of `pmf eval --checkpoint RUN` for this run (its flags override them)."""

    num_samples: int = 10000  # samples per evaluation (class-balanced)
    steps: list = field(default_factory=lambda: [1, 2, 4])  # sampling step counts to score
    batch_size: int = 256  # images per generation / feature batch


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)  # weight files + crop (lambdas: objective)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig, metadata=RESUMABLE)
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=RESUMABLE)


# ----------------------------------------------------------------------------------------------------------------


def _coerce(value, tp):
    """Convert a YAML / command-line value to the field's declared type (bool, int, float, str, tuple, list, dict)."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected a boolean, got {value!r}")
        return bool(value)
    if tp in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        v = tp(value)
        if tp is int and isinstance(value, float) and not float(value).is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return v
    if tp is str:
        return str(value)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if type(None) in typing.get_args(tp) and (
                value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        for a in args[:-1]:  # the first type that takes the value (int | str: 2 -> 2, "auto" -> "auto")
            try:
                return _coerce(value, a)
            except (TypeError, ValueError):
                pass
        return _coerce(value, args[-1])
    if origin is tuple or tp is tuple:
        value = load_yaml(value, repr(value)) if isinstance(value, str) else value
        return tuple(value)
    if origin is list or tp is list:
        value = load_yaml(value, repr(value)) if isinstance(value, str) else value
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if origin is dict or tp is dict:
        value = load_yaml(value, repr(value)) if isinstance(value, str) else value
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {value!r}")
        return value
    return value


def _field_types(dc) -> dict:
    hints = typing.get_type_hints(type(dc))
    return {f.name: hints[f.name] for f in dataclasses.fields(dc)}


def set_value(cfg: RunConfig, dotted: str, value) -> None:
    """Set ``section.field`` (e.g. ``objective.P_mean``) with type conversion; unknown keys raise, naming the valid
    ones."""
    parts = dotted.split(".")
    node = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            raise KeyError(f"{'.'.join(parts[:i])} is not a section; cannot set {dotted}")
        types = _field_types(node)
        if part not in types:
            raise KeyError(f"unknown config key {'.'.join(parts[:i + 1])!r}; valid here: {', '.join(types)}")
        if i == len(parts) - 1:
            try:
                coerced = _coerce(value, types[part])
            except (TypeError, ValueError) as e:
                tp = getattr(types[part], "__name__", str(types[part]))
                raise ValueError(f"{dotted}={value!r} is not a valid {tp} ({e}); give e.g. {dotted}="
                                 f"{getattr(node, part)!r}") from None
            setattr(node, part, coerced)
        else:
            node = getattr(node, part)


def apply_mapping(cfg: RunConfig, mapping: dict, prefix: str = "") -> None:
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        target = cfg
        for part in full.split("."):
            target = getattr(target, part, None)
        if isinstance(value, dict) and dataclasses.is_dataclass(target):
            apply_mapping(cfg, value, full + ".")
        else:
            set_value(cfg, full, value)


def list_presets() -> list[str]:
    """Preset names; files starting with an underscore are shared bases (``base:``), not presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml_with_base(path: Path, _seen: tuple = ()) -> dict:
    """A config file's mapping with its ``base:`` (a file name without ``.yaml``, looked up next to the file, then
    in the preset folder) merged underneath it, recursively: the file's own keys win, section by section."""
    path = Path(path)
    if path in _seen:
        raise ValueError(f"config files include each other in a loop: {' -> '.join(map(str, (*_seen, path)))}")
    mapping = load_yaml(path.read_text(), f"config file {path}") or {}
    if not isinstance(mapping, dict):
        raise ValueError(f"config file {path} holds a YAML {type(mapping).__name__}, not a mapping of sections "
                         "(train:, data:, ...)")
    base = mapping.pop("base", None)
    if base is None:
        return mapping
    for folder in (path.parent, PRESET_DIR):
        if (folder / f"{base}.yaml").exists():
            return _deep_merge(read_yaml_with_base(folder / f"{base}.yaml", (*_seen, path)), mapping)
    raise FileNotFoundError(f"{path}: base {base!r} not found as {base}.yaml next to it or in {PRESET_DIR}")


# Config keys whose value ``registry`` means "the model registry's value for model.name" (pmf.method.model.MODELS): the
# noise scale and the released 1-NFE sampling settings live there once.
REGISTRY_KEYS = {
    ("objective", "noise_scale"): lambda spec: spec.noise_scale,
    ("sample", "omega"): lambda spec: spec.omega,
    ("sample", "t_min"): lambda spec: spec.t_min,
    ("sample", "t_max"): lambda spec: spec.t_max,
    ("sample", "ema"): lambda spec: f"ema_hl{spec.ema_halflife_kimg:g}" if spec.ema_halflife_kimg else "",
}


def resolve_registry_values(mapping: dict) -> dict:
    """Replace the ``registry`` placeholders of :data:`REGISTRY_KEYS` with the values of
    ``MODELS[mapping["model"]["name"]]``; any other ``registry`` value is an error naming the allowed keys."""
    from pmf.method.model import MODELS

    name = (mapping.get("model") or {}).get("name", ModelConfig.name)
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in mapping.items()}
    for section, values in out.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if value != "registry":
                continue
            if (section, key) not in REGISTRY_KEYS:
                raise ValueError(f"{section}.{key}: 'registry' is allowed only for "
                                 f"{', '.join('.'.join(k) for k in REGISTRY_KEYS)}")
            if name not in MODELS:
                raise KeyError(f"{section}.{key}: 'registry' needs a registered model.name, got {name!r}")
            values[key] = REGISTRY_KEYS[(section, key)](MODELS[name])
    return out


def load_config(preset: str | None = None, config_file: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults <- preset YAML (``pmf/configs/NAME.yaml``, with its ``base:`` file underneath) or a YAML file <-
    ``key=value`` overrides. ``registry`` values are taken from the model registry (:data:`REGISTRY_KEYS`)."""
    cfg = RunConfig()
    if preset and config_file:
        raise ValueError("give --preset or --config, not both")
    path = None
    if preset:
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.exists() or preset.startswith("_"):
            raise FileNotFoundError(f"unknown preset {preset!r}; available: {', '.join(list_presets())}")
    elif config_file:
        path = Path(config_file)
    if path is not None:
        apply_mapping(cfg, resolve_registry_values(read_yaml_with_base(path)))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        set_value(cfg, key.strip(), load_yaml(value, f"--set {item}") if value.strip() else value)
    return cfg


def config_differences(old: dict, new: RunConfig) -> list[str]:
    """"section.key: old -> new" for every setting of ``new`` that differs from the saved config ``old`` (a
    :func:`to_dict` dict, e.g. config.json), except fields (or whole sections) marked with :data:`RESUMABLE` metadata.
    Keys present on one side only count as differences."""
    diffs = []

    def walk(node, old_d: dict, prefix: str):
        types = {f.name: f for f in dataclasses.fields(node)}
        as_json = json.loads(json.dumps(dataclasses.asdict(node)))  # tuples -> lists, as in config.json
        for key in sorted(set(types) | set(old_d)):
            f = types.get(key)
            if f is not None and f.metadata.get("resumable"):
                continue
            value = getattr(node, key) if f is not None else None
            if f is not None and dataclasses.is_dataclass(value):
                sub = old_d.get(key)
                walk(value, sub if isinstance(sub, dict) else {}, f"{prefix}{key}.")
                continue
            new_v = as_json[key] if f is not None else None
            if old_d.get(key) != new_v:
                diffs.append(f"{prefix}{key}: {old_d.get(key)!r} -> {new_v!r}")

    walk(new, old, "")
    return diffs


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_json(cfg) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=False)


def from_dict(d: dict) -> RunConfig:
    """The config a resolved config.json describes: the inverse of :func:`to_dict`."""
    cfg = RunConfig()
    apply_mapping(cfg, d)
    return cfg


def model_kwargs(cfg: RunConfig) -> dict:
    """PMFDiT kwargs of the run (a validated config): registry entry + overrides, with the objective's noise scale
    and guidance range."""
    spec = MODELS[cfg.model.name]
    omega_max = 1.0 + cfg.objective.cfg_max if cfg.objective.guidance else 1.0
    kw = {**spec.kwargs, "noise_scale": cfg.objective.noise_scale, "omega_max": omega_max, **cfg.model.overrides}
    if not cfg.data.class_conditional:
        kw.setdefault("num_classes", spec.kwargs.get("num_classes", 1))
    return kw
