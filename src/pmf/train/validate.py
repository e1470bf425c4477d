"""Checks of a resolved run configuration and of sampling arguments, before any work is done.

Everything here reads no data and allocates nothing, so ``pmf train --dry-run`` runs the same checks as a real run.
A failure is a :class:`ConfigError` naming the key, the bad value and the fix; all problems of a config are reported
together, on one line.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from pmf.errors import PmfError
from pmf.method.model import MODELS, pmfdit_kwargs
from pmf.method.sampler import sampling_problems


class ConfigError(PmfError, ValueError):
    """A setting or argument that cannot work."""


def device_problem(name: str, key: str) -> str | None:
    """Why the torch device ``name`` cannot be used here, or None. "auto" always works."""
    if name == "auto":
        return None
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        return f"{key}={name!r} is not a device; use auto, cpu, cuda or cuda:N"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA device is visible"
            return f"{key}={name!r} but CUDA is not available ({why}); use {key}=cpu (or auto)"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"{key}={name!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        return f"{key}={name!r} but MPS is not available; use {key}=cpu"
    elif dev.type not in ("cpu", "cuda", "mps"):
        return f"{key}={name!r}: unsupported device type; use auto, cpu or cuda"
    return None


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def config_problems(cfg) -> list[str]:
    """Every problem of a resolved RunConfig, as "key=value: what is wrong; the fix"."""
    from pmf.train.ema import EMASpec
    from pmf.train.precision import PRECISIONS

    p = []
    t, d, s, e = cfg.train, cfg.data, cfg.sample, cfg.eval

    def positive(key, value, integer=False):
        ok = _finite(value) and value > 0 and (not integer or float(value).is_integer())
        if not ok:
            p.append(f"{key}={value!r} must be a positive {'integer' if integer else 'number'}")

    def non_negative(key, value):
        if not (_finite(value) and value >= 0):
            p.append(f"{key}={value!r} must be >= 0")

    if t.parallel not in ("ddp", "fsdp", "hsdp"):
        p.append(f"train.parallel={t.parallel!r} must be ddp, fsdp or hsdp (hsdp: sharded within a node, replicated "
                 "across nodes)")
    if not (isinstance(t.hsdp_shard_size, int) and t.hsdp_shard_size >= 0):
        p.append(f"train.hsdp_shard_size={t.hsdp_shard_size!r} must be >= 0 (0: the processes per node)")
    if str(t.precision).lower() not in PRECISIONS:
        fp16 = str(t.precision).lower() in ("fp16", "float16", "half")
        p.append(f"train.precision={t.precision!r} must be one of {', '.join(PRECISIONS)}"
                 + (" (fp16 needs loss scaling; use bf16)" if fp16 else ""))
    positive("train.total_kimg", t.total_kimg)
    positive("train.batch_size", t.batch_size, integer=True)
    if t.accum_steps != "auto":  # auto: chosen from the plan (pmf.train.plan.auto_settings)
        positive("train.accum_steps", t.accum_steps, integer=True)
    if t.accum_steps != "auto" and t.batch_size > 0 and t.accum_steps > 0 and t.batch_size % t.accum_steps:
        p.append(f"train.batch_size={t.batch_size} must be divisible by train.accum_steps={t.accum_steps}")
    positive("train.max_nonfinite", t.max_nonfinite, integer=True)
    for key in ("log_every_kimg", "ckpt_every_kimg", "ckpt_every_minutes", "check_every_kimg"):
        positive(f"train.{key}", getattr(t, key))
    for key in ("sample_every_kimg", "grad_clip", "ema_ramp", "threads"):
        non_negative(f"train.{key}", getattr(t, key))
    if (why := device_problem(t.device, "train.device")) is not None:
        p.append(why)
    if t.compile_mode not in ("default", "reduce-overhead"):
        p.append(f"train.compile_mode={t.compile_mode!r} must be 'default' or 'reduce-overhead' (CUDA graphs)")
    if t.compile and t.parallel in ("fsdp", "hsdp"):
        p.append(f"train.compile=true with train.parallel={t.parallel}: FSDP2 runs its hooks outside torch.compile "
                 "(torch 2.13 wraps them in torch._dynamo.disable, 'skipping FSDP hooks'), so the whole-step graph "
                 "(fullgraph) cannot span its units; use train.parallel=ddp, or train.compile=false")
    if t.compile and cfg.objective.impl != "lean":
        p.append(f"train.compile=true compiles the lean objective only (objective.impl={cfg.objective.impl!r}); set "
                 "objective.impl=lean or train.compile=false")
    ema_names = []
    for spec in t.ema:
        try:
            ema_names.append(EMASpec.parse(spec).name)
        except ValueError as err:
            p.append(f"train.ema: {err}")
    if s.ema and s.ema not in ema_names:
        p.append(f"sample.ema={s.ema!r} is not one of train.ema's copies ({', '.join(ema_names) or 'none'}); use one "
                 "of them, or '' for the raw weights")
    p += sampling_problems(s.omega, s.t_min, s.t_max, s.steps, prefix="sample.")
    positive("eval.num_samples", e.num_samples, integer=True)
    positive("eval.batch_size", e.batch_size, integer=True)
    if not e.steps or any(not isinstance(k, int) or k < 1 for k in e.steps):
        p.append(f"eval.steps={e.steps!r} must be a list of step counts >= 1")
    positive("data.resolution", d.resolution, integer=True)
    non_negative("data.num_workers", d.num_workers)
    if d.dataset not in ("fashion_mnist", "imagefolder", "shards"):
        p.append(f"data.dataset={d.dataset!r} must be fashion_mnist, imagefolder or shards")
    try:  # the objective section's own rules (pmf.method.objective.ObjectiveConfig), reported here with the rest
        cfg.objective.__post_init__()
    except ValueError as err:
        p.append(f"objective.{err}")
    if not (_finite(cfg.optim.lr) and cfg.optim.lr > 0):
        p.append(f"optim.lr={cfg.optim.lr!r} must be a positive number")
    positive("objective.noise_scale", cfg.objective.noise_scale)
    if cfg.model.name not in MODELS:
        p.append(f"model.name={cfg.model.name!r} is not registered; use one of {', '.join(MODELS)}")
    overrides = cfg.model.overrides or {}
    if not isinstance(overrides, dict):
        p.append(f"model.overrides={overrides!r} must be a mapping of PMFDiT keyword arguments")
    else:
        known = pmfdit_kwargs()
        unknown = sorted(k for k in overrides if k not in known)
        if unknown:
            p.append(f"model.overrides has unknown PMFDiT argument(s) {', '.join(map(repr, unknown))}; known: "
                     f"{', '.join(known)}")
        for k in ("hidden_size", "depth", "num_heads", "input_size", "patch_size"):
            if k in overrides and not (isinstance(overrides[k], int) and overrides[k] > 0):
                p.append(f"model.overrides.{k}={overrides[k]!r} must be a positive integer")
    return p


def validate_config(cfg) -> None:
    """Raise :class:`ConfigError` listing every problem of ``cfg`` (one line)."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("invalid settings: " + "; ".join(problems))


def check_writable_dir(path: str | os.PathLike, flag: str = "--run-dir") -> None:
    """Raise :class:`ConfigError` unless ``path`` is a writable directory or can be created as one (its nearest
    existing ancestor is a writable directory, and creating it works). Leaves nothing created."""
    path = Path(path).absolute()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{flag} {path}: {probe} is a file, not a directory; choose another {flag}")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == path else f"cannot be created ({probe} is not writable)"
        raise ConfigError(f"{flag} {path} {what}; choose a writable directory or fix its permissions")
    if probe != path:  # permissions can pass where creation cannot (/proc, a read-only mount as root): try it
        created = []
        try:
            for d in reversed([path, *path.parents]):
                if not d.exists():
                    try:
                        d.mkdir()
                    except FileExistsError:  # another process (a rank of the same run) made it meanwhile
                        continue
                    created.append(d)
        except OSError as e:
            raise ConfigError(f"{flag} {path} cannot be created ({e.strerror or e}); choose another {flag}") from None
        finally:
            for d in reversed(created):
                try:
                    d.rmdir()
                except OSError:  # not empty or gone: another rank's run has started in it
                    pass
