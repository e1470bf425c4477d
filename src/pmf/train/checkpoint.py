"""Training state for resuming: ``run_dir/checkpoints/state-{step:09d}.pt``.

Whatever the trainer needs to resume (model, EMA, optimizer, RNG, config, step), written atomically with
``torch.save`` (:mod:`pmf.util.atomic`). Each state carries a SHA-256 of its payload (every tensor's dtype, shape and
bytes, every number and string; :func:`payload_digest`) under ``"sha256"``; the file is read back and checked before
older states are deleted, and :func:`load_latest` skips, with a message, a file that cannot be read or whose digest
does not match (bit rot, a partial copy), and returns the newest good one. Rotation deletes only states older than
the one just written and verified. Restarting is rerunning the command. Exported inference weights, kept apart from
training state, are network folders (:mod:`pmf.method.pretrained`).

Sharded runs (``train.parallel=fsdp`` / ``hsdp``) write ``state-{step:09d}/`` directories instead
(:mod:`pmf.train.sharded_state`: every rank its own shards, per-file SHA-256 in a manifest); listing, rotation, the
fallback past damaged states and :func:`load_latest` treat both forms alike, ordered by step. Single-file states are
read memory-mapped (``torch.load(mmap=True)``): the N processes of a node share the page cache instead of each
holding a private copy.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import torch

from pmf.errors import PmfError
from pmf.util.format_version import FORMAT_VERSION, UnsupportedFormat, check_format_version
from pmf.train import sharded_state
from pmf.util.atomic import atomic_save

STATE_DIR = "checkpoints"
_STATE_RE = re.compile(r"^state-(\d{9,})\.pt$")
_STATE_DIR_RE = re.compile(r"^state-(\d{9,})$")  # a sharded state (pmf.train.sharded_state)
DIGEST_KEY = "sha256"  # the payload digest stored in each state (not part of the payload)
DAMAGED_SUFFIX = ".damaged"  # an unreadable state is renamed aside with this suffix (kept for inspection)


class DamagedState(RuntimeError):
    """A state file that was read but whose digest does not match its payload."""


class NoReadableState(PmfError, RuntimeError):
    """State files exist but none can be used."""


def payload_digest(obj) -> str:
    """SHA-256 over a nested state: dict keys (sorted), list order, tensors (dtype, shape, raw bytes), numbers,
    strings, bools, None. Independent of the file format, so it checks what was loaded, not how it was stored."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for k in sorted(x, key=repr):
                walk(k)
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                walk(v)
        elif isinstance(x, float):
            h.update(b"F" + (repr(x) if math.isfinite(x) else str(x)).encode())
        elif isinstance(x, (bool, int, str, bytes)) or x is None:
            h.update(f"{type(x).__name__}:{x!r}".encode())
        else:
            raise TypeError(f"cannot digest a {type(x).__name__} in a training state")

    walk(obj)
    return h.hexdigest()


def verify_state(state: dict, path: str | os.PathLike = "state") -> None:
    """Raise :class:`UnsupportedFormat` for a state of another format version or without a digest (not written by
    this pmf), :class:`DamagedState` when the stored digest does not match the payload."""
    check_format_version(state.get("format_version"), path)
    stored = state.get(DIGEST_KEY)
    if stored is None:
        raise UnsupportedFormat(f"{path} carries no checksum: not a training state this pmf wrote; train from step 0 "
                                "with --restart")
    actual = payload_digest({k: v for k, v in state.items() if k != DIGEST_KEY})
    if actual != stored:
        raise DamagedState(f"checksum mismatch (stored {stored[:12]}..., content {actual[:12]}...): the file was "
                           "damaged after it was written")


# ----------------------------------------------------------------------------------------------------------------
# Training state


def _state_files(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every state file in run_dir/checkpoints, oldest step first."""
    ckpt_dir = Path(run_dir) / STATE_DIR
    if not ckpt_dir.is_dir():
        return []
    found = ((_STATE_DIR_RE.match(p.name) if p.is_dir() else _STATE_RE.match(p.name), p) for p in ckpt_dir.iterdir())
    return sorted((int(m.group(1)), p) for m, p in found if m)


def _remove_state(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _rotate(run_dir: str | os.PathLike, step: int, keep: int) -> None:
    """Delete the states older than ``step`` beyond the ``keep`` newest (``step``'s included) and the temp files and
    directories of writes that crashed (we are the only writer)."""
    ckpt_dir = Path(run_dir) / STATE_DIR
    older = [p for s, p in _state_files(run_dir) if s < step]
    for old in older[:max(0, len(older) - (keep - 1))]:
        _remove_state(old)
    for stale in ckpt_dir.glob(".state-*.tmp"):
        _remove_state(stale)


def save_training_state(run_dir: str | os.PathLike, state: dict, step: int, keep: int = 2,
                        verify: bool = True) -> Path:
    """Write ``{**state, "step": step, "format_version": FORMAT_VERSION, "sha256": digest}`` to
    run_dir/checkpoints/state-{step:09d}.pt atomically;
    read it back and check the digest (``verify``; memory-mapped, so no second copy in RAM); then delete the older
    states beyond the ``keep`` newest (this one included) and any temp files left by writes that crashed. States with
    a higher step (left by a run that resumed from an older state because they were damaged) are not touched.
    Returns the path.

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
    payload = {k: v for k, v in state.items() if k != DIGEST_KEY}
    payload["step"] = step
    payload["format_version"] = FORMAT_VERSION
    atomic_save({**payload, DIGEST_KEY: payload_digest(payload)}, path)
    if verify:  # the newest verified state is this one: only then may older ones go
        try:
            verify_state(torch.load(path, map_location="cpu", weights_only=True, mmap=True), path)
        except Exception as e:
            raise OSError(f"training state {path} did not read back intact ({type(e).__name__}: {e}); the older "
                          "states were kept") from e
    _rotate(run_dir, step, keep)
    return path


def save_sharded_training_state(run_dir: str | os.PathLike, step: int, tensors: dict, extra: dict, info: dict,
                                keep: int = 2) -> Path:
    """The sharded counterpart of :func:`save_training_state` (a collective: every rank calls it with its shards;
    :func:`pmf.train.sharded_state.split_state` makes ``tensors`` and ``extra``): ``run_dir/checkpoints/
    state-{step:09d}/``, atomically, with the format version in the manifest and in ``extra``; then rank 0 deletes
    the older states beyond ``keep``."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    extra = {**extra, "step": step, "format_version": FORMAT_VERSION}
    info = {**info, "format_version": FORMAT_VERSION}
    path = sharded_state.save_sharded_state(Path(run_dir) / STATE_DIR, step, tensors, extra, info)
    from pmf.parallel import dist

    if dist.is_main():
        _rotate(run_dir, step, keep)
    dist.barrier()
    return path


def _load_file(path: Path, weights_only: bool) -> dict:
    """A single-file state, memory-mapped (torch's zip format, which every state this pmf writes has)."""
    return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)


def load_latest(run_dir: str | os.PathLike, weights_only: bool = True, set_aside: bool = False,
                lazy_sharded: bool = False) -> dict | None:
    """The newest readable, verified training state in run_dir/checkpoints (a dict with "step" and "format_version"),
    or None if there is none. A state of another format version is refused (:class:`UnsupportedFormat`), not
    skipped: an older one of the same run would be no better.

    A sharded state (a ``state-*/`` directory) is returned in the single-file layout with full tensors, read in
    this process (:func:`pmf.train.sharded_state.read_full_state`); with ``lazy_sharded`` (the trainer, every rank
    calling: a collective) its files are checked, split over the ranks, and only its non-tensor part is returned,
    with ``"sharded_path"``: the strategy then reads each rank's shards into the built model
    (:mod:`pmf.train.modes`).

    If the newest state cannot be read or fails its checksum (:func:`verify_state`), it warns and tries the previous
    one; with ``set_aside`` (the single writer, rank 0) it also renames the bad file to ``*.pt.damaged``, so that
    rotation and later resumes no longer see it. If files exist but none is good, it raises instead of returning
    None: returning None would let the trainer start again from step 0 and overwrite the run.
    """
    files = _state_files(run_dir)
    failures = []
    for _, path in reversed(files):
        try:
            if path.is_dir():
                manifest = sharded_state.verify_sharded_state(path, collective=lazy_sharded)
                check_format_version(manifest.get("format_version"), path)
                if lazy_sharded:
                    return {**sharded_state.read_extra(path), "sharded_path": str(path)}
                return sharded_state.read_full_state(path)
            state = _load_file(path, weights_only)
            if not isinstance(state, dict):
                raise TypeError(f"holds a {type(state).__name__}, not a dict")
            verify_state(state, path)
            return state
        except UnsupportedFormat:
            raise
        except Exception as e:  # truncated zip, bad pickle, wrong type, bad digest: cannot resume from this file
            failures.append(f"{path}: {type(e).__name__}: {e}")
            aside = ""
            if set_aside:
                try:
                    path.rename(path.with_name(path.name + DAMAGED_SUFFIX))
                    aside = f"; renamed to {path.name + DAMAGED_SUFFIX}"
                except OSError:
                    pass
            warnings.warn(f"cannot use training state {path} ({type(e).__name__}: {e}){aside}; trying an older one",
                          stacklevel=2)
    if files:
        raise NoReadableState(f"no readable training state in {Path(run_dir) / STATE_DIR} ("
                              + "; ".join(failures) + "); pass --restart to start again from step 0, or restore a "
                              "state file")
    return None


# ----------------------------------------------------------------------------------------------------------------
# The run directory's history


def clear_unfinished_first_run(run_dir: Path) -> list[str]:
    """A run killed before its first checkpoint left no state, only temporaries (``.state-*.tmp`` of an unfinished
    write) and perhaps a log of steps that will be trained again: the temporaries are removed and the log moved
    aside (``log.old-TIMESTAMP.jsonl``), by the single writer (rank 0). Returns what was removed or moved."""
    from pmf.parallel import dist

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
