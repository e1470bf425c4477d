"""Persistence: atomic writes, training state for resuming, and exported inference weights.

Two kinds of files, kept apart (design habit 5):

- Training state, ``run_dir/checkpoints/state-{step:09d}.pt``: whatever the trainer needs to resume (model, EMA,
  optimizer, RNG, config, step), written with ``torch.save``. Only the newest ``keep`` files are kept. Restarting
  is rerunning the command: :func:`load_latest` returns the newest readable file.
- Exports, ``out_dir/{name}.safetensors`` + ``{name}.json``: weights only, plus the PMFDiT kwargs that rebuild the
  network and a ``meta`` dict (noise_scale, recommended omega / t_min / t_max, provenance). We use safetensors
  because loading it cannot run code, and any framework can read it without torch's pickle format.

Every write goes to a temp file in the target's directory, is fsynced, and is then moved over the target with
``os.replace``. So a crash, kill or full disk leaves the old file or the new one, never a truncated one. The temp
file must be in the same directory because ``os.replace`` is atomic only within one filesystem. Only rank 0 should
call the writers; this module does not check.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pmf.model import PMFDiT

STATE_DIR = "checkpoints"
_STATE_RE = re.compile(r"^state-(\d{9,})\.pt$")


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (POSIX). Not possible or needed on Windows."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_path(path: str | os.PathLike):
    """Yield a temp path next to ``path``. The caller writes the whole file there. On normal exit the temp file is
    fsynced and renamed over ``path``. On any exception it is deleted and ``path`` is left untouched.

    The temp name is hidden (leading dot) and ends in ``.tmp``, so globs for real files never see it. It is created
    by the writer, not by mkstemp, so the final file gets the usual umask permissions instead of 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically: ``path`` holds either its previous content or all of ``obj``."""
    with _atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with _atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------
# Training state


def _state_files(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every state file in run_dir/checkpoints, oldest step first."""
    ckpt_dir = Path(run_dir) / STATE_DIR
    if not ckpt_dir.is_dir():
        return []
    found = ((_STATE_RE.match(p.name), p) for p in ckpt_dir.iterdir())
    return sorted((int(m.group(1)), p) for m, p in found if m)


def save_training_state(run_dir: str | os.PathLike, state: dict, step: int, keep: int = 2) -> Path:
    """Write ``{**state, "step": step}`` to run_dir/checkpoints/state-{step:09d}.pt atomically. Then delete all but
    the ``keep`` files with the highest steps, and any temp files left by writes that crashed. Returns the path.

    We keep more than one file so that :func:`load_latest` can fall back if the newest one is damaged anyway (for
    example by a disk fault after the write). ``state`` must be loadable with ``weights_only=True``: tensors,
    numbers, strings and containers of these. Store RNG states as torch tensors, not numpy arrays.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if "step" in state and state["step"] != step:
        raise ValueError(f"state['step'] = {state['step']} disagrees with step = {step}")
    ckpt_dir = Path(run_dir) / STATE_DIR
    path = ckpt_dir / f"state-{step:09d}.pt"
    atomic_save({**state, "step": step}, path)
    for _, old in _state_files(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    for stale in ckpt_dir.glob(".state-*.tmp"):  # a previous process died mid-write; we are the only writer
        stale.unlink(missing_ok=True)
    return path


def load_latest(run_dir: str | os.PathLike, weights_only: bool = True) -> dict | None:
    """The newest readable training state in run_dir/checkpoints (a dict with "step"), or None if there is none.

    If the newest file cannot be read, it warns and tries the previous one. If files exist but none can be read,
    it raises instead of returning None. Returning None would let the trainer start again from step 0 and
    overwrite the run.
    """
    files = _state_files(run_dir)
    failures = []
    for _, path in reversed(files):
        try:
            state = torch.load(path, map_location="cpu", weights_only=weights_only)
            if not isinstance(state, dict):
                raise TypeError(f"holds a {type(state).__name__}, not a dict")
            return state
        except Exception as e:  # truncated zip, bad pickle, wrong type: all mean "cannot resume from this file"
            failures.append(f"{path}: {type(e).__name__}: {e}")
            warnings.warn(f"cannot read training state {path} ({type(e).__name__}: {e}); trying an older one",
                          stacklevel=2)
    if files:
        raise RuntimeError("no readable training state in " + str(Path(run_dir) / STATE_DIR) + ":\n  "
                           + "\n  ".join(failures))
    return None


# ----------------------------------------------------------------------------------------------------------------
# Exported inference weights


def _unwrap(net: nn.Module) -> nn.Module:
    """The PMFDiT inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers, so exported key names have
    no wrapper prefix. An FSDP2-sharded model must be gathered to full tensors before export."""
    while True:
        if isinstance(getattr(net, "_orig_mod", None), nn.Module):
            net = net._orig_mod
        elif isinstance(getattr(net, "module", None), nn.Module):
            net = net.module
        else:
            return net


def _fit_problems(model_kwargs: dict, state_dict: dict) -> list[str]:
    """Differences between ``state_dict`` and what PMFDiT(**model_kwargs) expects. The model is built on the meta
    device, so this costs no memory. A wrong kwargs file is caught at export, not when someone loads it later."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in PMFDiT(**model_kwargs).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    problems = [f"unexpected '{k}' {got[k]}" for k in got.keys() - expected.keys()]
    problems += [f"missing '{k}' {expected[k]}" for k in expected.keys() - got.keys()]
    problems += [f"shape '{k}': net {got[k]}, kwargs {expected[k]}" for k in got.keys() & expected.keys()
                 if got[k] != expected[k]]
    return sorted(problems)


def export_model(net: nn.Module, out_dir: str | os.PathLike, model_kwargs: dict, meta: dict | None = None,
                 name: str = "model") -> Path:
    """Write ``out_dir/{name}.safetensors`` (the state dict) and ``out_dir/{name}.json`` ({"model_kwargs", "meta"}),
    each atomically. Returns the safetensors path.

    ``model_kwargs`` must rebuild ``net`` exactly (this is checked) and be JSON-serialisable. The same JSON is also
    stored in the safetensors header under "pmf_config", so the weights file describes itself if the .json is lost.
    """
    net = _unwrap(net)
    try:
        config_text = json.dumps({"model_kwargs": model_kwargs, "meta": meta or {}}, indent=2)
    except TypeError as e:
        raise TypeError(f"model_kwargs and meta must be JSON-serialisable: {e}") from None
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    if problems := _fit_problems(model_kwargs, state):
        raise ValueError("model_kwargs do not describe this network:\n  " + "\n  ".join(problems))
    out_dir = Path(out_dir)
    weights = out_dir / f"{name}.safetensors"
    with _atomic_path(weights) as tmp:
        save_file(state, tmp, metadata={"pmf_config": config_text})
    atomic_write_text(out_dir / f"{name}.json", config_text + "\n")
    return weights


def _export_paths(path_or_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    p = Path(path_or_dir)
    if p.is_dir():
        return p / f"{name}.safetensors", p / f"{name}.json"
    return p.with_suffix(".safetensors"), p.with_suffix(".json")  # given the .safetensors, the .json or the stem


def load_exported(path_or_dir: str | os.PathLike, name: str = "model", **overrides) -> tuple[PMFDiT, dict]:
    """Rebuild an exported network: ``PMFDiT(**{**model_kwargs, **overrides})`` with a strict load. Returns
    ``(net in eval mode on CPU, meta)``.

    ``path_or_dir`` is the export directory, or the .safetensors / .json path. ``overrides`` replace stored kwargs
    that do not change the weights' shapes (e.g. ``attn_backend="math"``).
    """
    weights, config_path = _export_paths(path_or_dir, name)
    if config_path.exists():
        config = json.loads(config_path.read_text(encoding="utf-8"))
    else:  # the .json went missing: the header carries the same JSON
        with safe_open(weights, framework="pt") as f:
            header = (f.metadata() or {}).get("pmf_config")
        if header is None:
            raise FileNotFoundError(f"{config_path} is missing and {weights} carries no pmf_config metadata")
        config = json.loads(header)
    net = PMFDiT(**{**config["model_kwargs"], **overrides})
    net.load_state_dict(load_file(weights, device="cpu"), strict=True)
    return net.eval(), config.get("meta", {})
