"""Training state for resuming: ``run_dir/checkpoints/state-{step:09d}.pt``.

Whatever the trainer needs to resume (model, EMA, optimizer, RNG, config, step), written atomically with
``torch.save`` (:mod:`pmf.atomic`). Only the newest ``keep`` files are kept. Restarting is rerunning the command:
:func:`load_latest` returns the newest readable file. Exported inference weights, kept apart from training state
(design habit 5), are :mod:`pmf.export`.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

from pmf.atomic import atomic_path, atomic_save, atomic_write_text  # noqa: F401 (re-exported)
from pmf.export import FORMAT_VERSION, export_model, load_exported  # noqa: F401 (re-exported)

STATE_DIR = "checkpoints"
_STATE_RE = re.compile(r"^state-(\d{9,})\.pt$")


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
    """Write ``{**state, "step": step, "format_version": FORMAT_VERSION}`` to run_dir/checkpoints/state-{step:09d}.pt
    atomically; the version says how the run's config is to be read (:func:`pmf.export.upgrade_model_kwargs`). Then
    delete all but the ``keep`` files with the highest steps, and any temp files left by writes that crashed. Returns
    the path.

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
    atomic_save({**state, "step": step, "format_version": FORMAT_VERSION}, path)
    for _, old in _state_files(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    for stale in ckpt_dir.glob(".state-*.tmp"):  # a previous process died mid-write; we are the only writer
        stale.unlink(missing_ok=True)
    return path


def load_latest(run_dir: str | os.PathLike, weights_only: bool = True) -> dict | None:
    """The newest readable training state in run_dir/checkpoints (a dict with "step" and "format_version", 1 for a
    file written before versions were stored), or None if there is none.

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
            state.setdefault("format_version", 1)  # written before versions were stored
            return state
        except Exception as e:  # truncated zip, bad pickle, wrong type: all mean "cannot resume from this file"
            failures.append(f"{path}: {type(e).__name__}: {e}")
            warnings.warn(f"cannot read training state {path} ({type(e).__name__}: {e}); trying an older one",
                          stacklevel=2)
    if files:
        raise RuntimeError("no readable training state in " + str(Path(run_dir) / STATE_DIR) + ":\n  "
                           + "\n  ".join(failures))
    return None


