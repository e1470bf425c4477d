"""Training state for resuming: ``run_dir/checkpoints/state-{step:09d}/``, one format for every mode.

Whatever the trainer needs to resume (network, EMA copies, optimizer, data position, counters, config, step) is one
directory that every rank writes its part of with ``torch.distributed.checkpoint`` (:mod:`pmf.train.state_dir`:
atomic, a SHA-256 per file in its manifest, resharded on load; one process needs no process group).
:func:`save_training_state` writes it and then deletes the states older than the ``keep`` newest;
:func:`open_latest` (the trainer, every rank) and :func:`load_latest` (one process, full tensors) skip, with a
message, a state whose files are missing or do not match their hashes (bit rot, a partial copy, an unfinished write)
and use the newest good one. A state of another layout or format version (e.g. the ``state-*.pt`` files of an older
pmf) is refused in one line. Restarting is rerunning the command. Exported inference weights, kept apart from
training state, are network folders (:mod:`pmf.method.pretrained`).
"""

from __future__ import annotations

import copy
import re
import shutil
import time
import warnings
from pathlib import Path

import torch

from pmf.errors import PmfError
from pmf.util.format_version import FORMAT_VERSION, UnsupportedFormat, check_format_version
from pmf.parallel import dist
from pmf.train import state_dir

STATE_DIR = "checkpoints"
_STATE_RE = re.compile(r"^state-(\d{9,})$")
_FILE_STATE_RE = re.compile(r"^state-\d{9,}\.pt$")  # the single-file layout of pmf before one format: refused
DAMAGED_SUFFIX = ".damaged"  # a damaged state is renamed aside with this suffix (kept for inspection)


class NoReadableState(PmfError, RuntimeError):
    """States exist but none can be used."""


class OpenedState(dict):
    """A training state's non-tensor part (step, nimg, loader, counters, config, optimizer param groups, EMA names;
    ``None`` where a tensor was) and where its tensors are: :func:`load_training_state` reads them into a built run."""

    def __init__(self, tree: dict, path: Path, tensor_paths: list[list]):
        super().__init__(tree)
        self.path, self.tensor_paths = path, tensor_paths


def _states(run_dir) -> list[tuple[int, Path]]:
    """(step, path) of every state directory in run_dir/checkpoints, oldest step first."""
    ckpt_dir = Path(run_dir) / STATE_DIR
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        if _FILE_STATE_RE.match(p.name):
            raise UnsupportedFormat(f"{p} is a training state of an older pmf (one .pt file); this pmf reads only "
                                    "state-NNNNNNNNN/ directories: train from step 0 with --restart, or use a new "
                                    "--run-dir")
        m = _STATE_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _remove_state(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _rotate(run_dir, step: int, keep: int) -> None:
    """Delete the states older than ``step`` beyond the ``keep`` newest (``step``'s included) and the temporary
    directories of writes that crashed (we are the only writer)."""
    ckpt_dir = Path(run_dir) / STATE_DIR
    older = [p for s, p in _states(run_dir) if s < step]
    for old in older[:max(0, len(older) - (keep - 1))]:
        _remove_state(old)
    for stale in [*ckpt_dir.glob(".state-*.tmp"), *ckpt_dir.glob(".state-*.old")]:
        _remove_state(stale)


def save_training_state(run_dir, state: dict, step: int, keep: int = 2, info: dict | None = None) -> Path:
    """Write ``{**state, "step": step, "format_version": FORMAT_VERSION}`` (nested dicts of tensors, plain or
    sharded, and plain values; a collective: every rank calls it with its own shards) to
    run_dir/checkpoints/state-{step:09d}/ atomically; then rank 0 deletes the older states beyond the ``keep`` newest
    (this one included) and the temporaries of writes that crashed. States with a higher step (left by a run that
    resumed from an older state because they were damaged) are not touched. ``info`` (e.g. the parallel mode) goes
    into the manifest. Returns the path.

    We keep more than one state so that a load can fall back if the newest one is damaged after it was written."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if "step" in state and state["step"] != step:
        raise ValueError(f"state['step'] = {state['step']} disagrees with step = {step}")
    payload = {**state, "step": step, "format_version": FORMAT_VERSION}
    info = {"nimg": state.get("nimg"), **(info or {}), "format_version": FORMAT_VERSION}
    path = state_dir.save_state_dir(Path(run_dir) / STATE_DIR, step, payload, info)
    if dist.is_main():
        _rotate(run_dir, step, keep)
    dist.barrier()
    return path


def _newest_good(run_dir, set_aside: bool, collective: bool) -> Path | None:
    """The newest state in run_dir/checkpoints whose files match their hashes, or None if there is none. A damaged
    one is skipped with a warning (and renamed ``*.damaged`` with ``set_aside``: the single writer, rank 0, so that
    rotation and later resumes no longer see it). Another layout or format version is refused
    (:class:`UnsupportedFormat`), not skipped: an older state of the same run would be no better. States exist but
    none is good: :class:`NoReadableState` (returning None would let the trainer start again from step 0 and overwrite
    the run)."""
    states = _states(run_dir)
    failures = []
    for _, path in reversed(states):
        try:
            manifest = state_dir.verify_state_dir(path, collective=collective)
        except state_dir.DamagedState as e:
            failures.append(str(e))
            aside = ""
            if set_aside:
                try:
                    path.rename(path.with_name(path.name + DAMAGED_SUFFIX))
                    aside = f"; renamed to {path.name + DAMAGED_SUFFIX}"
                except OSError:
                    pass
            warnings.warn(f"cannot use training state {e}{aside}; trying an older one", stacklevel=3)
            continue
        check_format_version(manifest.get("format_version"), path)
        return path
    if states:
        raise NoReadableState(f"no readable training state in {Path(run_dir) / STATE_DIR} (" + "; ".join(failures)
                              + "); pass --restart to start again from step 0, or restore a state directory")
    return None


def open_latest(run_dir, set_aside: bool = False) -> OpenedState | None:
    """The newest good training state's non-tensor part (a dict with "step", "nimg", "loader", "config", ...) and
    where its tensors are, or None if there is none (a collective: the ranks split the hash check); the trainer reads
    the tensors into the built run with :func:`load_training_state`. Damaged states: see :func:`_newest_good`."""
    path = _newest_good(run_dir, set_aside, collective=True)
    if path is None:
        return None
    extra = state_dir.read_extra(path)
    return OpenedState(extra["tree"], path, extra["tensor_paths"])


def load_latest(run_dir, set_aside: bool = False) -> dict | None:
    """The newest good training state as it was saved, with full CPU tensors, read in this process (no group
    needed: exports, an init from another run, tests), or None if there is none. Damaged states: see
    :func:`_newest_good`."""
    path = _newest_good(run_dir, set_aside, collective=False)
    return None if path is None else state_dir.read_full_state(path)


def load_training_state(state: OpenedState, net: torch.nn.Module, opt: torch.optim.Optimizer, ema) -> None:
    """Read the tensors of ``state`` (:func:`open_latest`) into the built network, optimizer and EMA, whatever their
    layout (sharded on any mesh, or full tensors; a collective): the network's and EMA's tensors are filled in place,
    the optimizer's allocated like their parameters (they may not exist yet), then DCP reads each rank's part. Strict:
    the state must hold exactly this run's tensors."""
    live, _ = state_dir.split_tensors({"net": net.state_dict(), "ema": ema.state_dict()})
    sizes = state_dir.tensor_sizes(state.path)
    saved_groups = state["optimizer"]["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"optimizer state in {state.path} has {len(saved_groups)} parameter groups, expected "
                         f"{len(opt.param_groups)}")
    param_of = {}
    for g, s in zip(opt.param_groups, saved_groups):
        param_of.update(zip(s["params"], g["params"]))
    templates = {}
    for path in state.tensor_paths:
        key = "/".join(map(str, path))
        if key in live:
            templates[key] = live[key]
        elif path[:2] == ["optimizer", "state"] and path[2] in param_of:
            size, dtype = sizes[key]
            p = param_of[path[2]]
            if tuple(size) == tuple(p.shape) and len(size):
                templates[key] = torch.zeros_like(p, dtype=dtype)  # a DTensor shard when p is one
            else:
                templates[key] = torch.zeros(size, dtype=dtype)  # e.g. a step count (torch keeps these on the CPU)
    saved = {"/".join(map(str, p)) for p in state.tensor_paths}
    missing, unexpected = sorted(set(live) - saved), sorted(saved - set(templates))
    if missing or unexpected:  # strict, as load_state_dict is: DCP alone would skip tensors nobody asked for
        raise ValueError(f"{state.path} does not match this run (another model?): {len(missing)} of this run's tensors "
                         f"are not in it, e.g. {missing[:3]}; {len(unexpected)} of its tensors are not in this run, "
                         f"e.g. {unexpected[:3]}")
    state_dir.load_tensors(state.path, templates)
    full = state_dir.join_tensors({"tree": copy.deepcopy(dict(state)), "tensor_paths": state.tensor_paths}, templates)
    net.load_state_dict(full["net"], strict=True)  # DCP loaded in place; this makes it explicit for any aliasing
    opt.load_state_dict(full["optimizer"])
    ema.load_state_dict(full["ema"])  # checks names and ramp; the values are already in place


# ----------------------------------------------------------------------------------------------------------------
# The run directory's history


def clear_unfinished_first_run(run_dir: Path) -> list[str]:
    """A run killed before its first checkpoint left no state, only temporaries (``.state-*.tmp`` of an unfinished
    write) and perhaps a log of steps that will be trained again: the temporaries are removed and the log moved
    aside (``log.old-TIMESTAMP.jsonl``), by the single writer (rank 0). Returns what was removed or moved."""
    if not dist.is_main():
        return []
    done = []
    ckpt_dir = run_dir / STATE_DIR
    for tmp in sorted(ckpt_dir.glob(".state-*.tmp")) if ckpt_dir.is_dir() else []:
        _remove_state(tmp)
        done.append(f"removed {STATE_DIR}/{tmp.name}")
    log = run_dir / "log.jsonl"
    if log.exists():
        target = log.with_name(f"log.old-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        log.rename(target)
        done.append(f"moved {log.name} aside as {target.name}")
    if done:
        print(f"{run_dir}: the earlier run stopped before its first checkpoint, so there is nothing to resume; "
              f"starting from step 0 ({'; '.join(done)})", flush=True)
    return done


def set_aside_previous_run(run_dir: Path) -> list[str]:
    """``--restart``: move the states and the log of the run in ``run_dir`` aside (``*.old-TIMESTAMP``), so the new
    run starts from step 0 and nothing of the old one is deleted. Exports and grids are overwritten later."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for name in (STATE_DIR, "log.jsonl", "summary.json"):
        p = run_dir / name
        if p.exists():
            target = p.with_name(f"{p.stem}.old-{stamp}{p.suffix}")
            p.rename(target)
            moved.append(target.name)
    return moved


def refuse_silent_restart(run_dir: Path) -> None:
    """No training state but an export, a summary or damaged states of an earlier run: starting from step 0 would
    overwrite them. An earlier run stopped before its first checkpoint (a log at most) holds nothing to resume:
    :func:`clear_unfinished_first_run` starts it cleanly, so rerunning the same command just works."""
    ckpt_dir = run_dir / STATE_DIR
    found = [n for n in ("export", "summary.json") if (run_dir / n).exists()]
    found += [p.name for p in sorted(ckpt_dir.glob(f"*{DAMAGED_SUFFIX}"))] if ckpt_dir.is_dir() else []
    if not found:
        clear_unfinished_first_run(run_dir)
        return
    if (run_dir / "log.jsonl").exists():
        found.insert(0, "log.jsonl")
    raise PmfError(f"{run_dir} holds {', '.join(found)} of an earlier run but no training state in "
                   f"{run_dir / STATE_DIR}; pass --restart to train again from step 0 (the old log and states are "
                   "moved aside, the exports overwritten), or use a new --run-dir")
