"""One training state on disk: a ``torch.distributed.checkpoint`` (DCP) directory, the same in every mode.

Every rank writes its own part with DCP, so no rank ever holds the full state when the network is sharded (for
pMF-H/16 with optimizer and three EMA copies, ~22 GB); replicated tensors (one process, ``ddp``) are written once,
and one process needs no process group. The directory is self-describing:

* ``pmf-state.json``: ``{"kind": "pmf-training-state", "step", "nimg", "format_version", "world_size", "mode",
  "files": {name: sha256}}``; written last, so a directory without it is unfinished;
* ``.metadata`` and ``__{rank}_{i}.distcp``: DCP's index and data files, one flat dict of tensors keyed by each
  tensor's path in the nested state (``net/{parameter}``, ``ema/shadow/{copy}/{parameter}``,
  ``optimizer/state/{index}/{key}``);
* ``extra.pt``: the nested state with every tensor left out (``None`` at its place) and the paths of the tensors (a
  small ``torch.save`` file, read with ``weights_only=True``): optimizer param groups, EMA names and ramp, data
  position, counters, config.

Atomic: the ranks write into ``.state-{step:09d}.tmp/``; after a barrier the ranks agree on one list of the files
(the union of their listings), each rank hashes its share of it (SHA-256), rank 0 writes the manifest and renames the
directory into place. A reader checks the hashes (split over the ranks) before trusting a state, so bit rot or a
partial copy is found. The hashes are of the files as written; that the files hold what was in memory is DCP's (it
serialises each tensor's storage itself). All ranks must see the same filesystem (as DCP requires).

DCP reshards on load: a state saved by N ranks loads into M ranks, into an FSDP (1-D) or HSDP (2-D) mesh, or into
full tensors (``ddp``, one process, or :func:`read_full_state` offline).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from pmf.util.format_version import UnsupportedFormat
from pmf.parallel import dist
from pmf.util.atomic import atomic_save, atomic_write_text, fsync_dir, sha256_file

KIND = "pmf-training-state"
MANIFEST = "pmf-state.json"
EXTRA = "extra.pt"


class DamagedState(RuntimeError):
    """A state directory whose files are missing or do not match their recorded hashes."""


def _my_share(names: list[str]) -> list[str]:
    """This rank's share of ``names`` (round robin over the ranks; everything in one process)."""
    return names[dist.rank()::dist.world_size()]


def _gather_dicts(part: dict) -> dict:
    """The union over ranks of each rank's dict (all_gather_object; the identity in one process)."""
    if not torch.distributed.is_initialized():
        return dict(part)
    parts = [None] * dist.world_size()
    torch.distributed.all_gather_object(parts, part)
    out = {}
    for p in parts:
        out.update(p)
    return out


def _union_over_ranks(names) -> list[str]:
    """The sorted union of every rank's ``names``, on every rank (all_gather_object; sorted in one process)."""
    mine = sorted(set(names))
    if not torch.distributed.is_initialized():
        return mine
    parts = [None] * dist.world_size()
    torch.distributed.all_gather_object(parts, mine)
    return sorted(set().union(*parts))


def _hash_or_problem(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as e:
        return f"unreadable at rank {dist.rank()}: {type(e).__name__}: {e}"


@contextlib.contextmanager
def _quiet_dcp():
    """DCP warns that it assumes a single process when no group is joined: that is what we mean there."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.distributed is disabled.*")
        yield


# ----------------------------------------------------------------------------------------------------------------
# The nested state <-> flat tensors + the rest


def split_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """(flat tensors keyed by their path joined with ``/``, extra): ``extra["tree"]`` is ``state`` with ``None`` in
    place of each tensor, ``extra["tensor_paths"]`` the path (a list of keys, ints kept) of each tensor."""
    tensors, paths = {}, []

    def walk(x, path):
        if isinstance(x, torch.Tensor):
            key = "/".join(map(str, path))
            if key in tensors:
                raise ValueError(f"two tensors of the training state have the path {key!r}")
            tensors[key] = x
            paths.append(list(path))
            return None
        if isinstance(x, dict):
            return {k: walk(v, (*path, k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            if any(isinstance(v, torch.Tensor) for v in x):
                raise TypeError(f"tensors in a list at {'/'.join(map(str, path))}: keep tensors in dicts")
            return x
        return x

    tree = walk(state, ())
    return tensors, {"tree": tree, "tensor_paths": paths}


def join_tensors(extra: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """The nested state of :func:`split_tensors`' ``extra`` with ``tensors`` (flat, by path) put back in place."""
    tree = extra["tree"]
    for path in extra["tensor_paths"]:
        node = tree
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = tensors["/".join(map(str, path))]
    return tree


# ----------------------------------------------------------------------------------------------------------------
# Write, check, read


def save_state_dir(ckpt_dir: str | os.PathLike, step: int, state: dict, info: dict) -> Path:
    """Write the nested ``state`` (tensors plain or DTensors; a collective: every rank calls with its own shards) to
    ``ckpt_dir/state-{step:09d}/`` atomically; ``info`` (nimg, world_size, mode, format_version) goes into the
    manifest. Returns the directory. A failed write (a full disk) raises one OSError naming it and leaves no
    temporary directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    tensors, extra = split_tensors(state)
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"state-{step:09d}"
    tmp = ckpt_dir / f".state-{step:09d}.tmp"
    if dist.is_main():
        if tmp.exists():  # left by a run that died mid-write
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    try:
        with _quiet_dcp():
            dcp.save(tensors, checkpoint_id=str(tmp))
        if dist.is_main():
            atomic_save(extra, tmp / EXTRA)
    except (OSError, RuntimeError, CheckpointException) as e:  # DCP reports a failed write as CheckpointException
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        cause = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
        raise OSError(f"writing training state {final} failed ({cause}); check free disk space and quotas") from None
    dist.barrier()
    # One list of the files for every rank: the union of what each rank sees (a rank always sees the files it wrote),
    # the same on every rank, each rank hashing its share of it. On storage with lagging directory listings
    # (NFS-like, several nodes) a rank's own listing can miss another node's files; per-rank lists would then split
    # the files differently on each rank and leave one unhashed. A file a rank cannot read is reported by every rank
    # together, never one rank raising while the others wait in a collective.
    names = _union_over_ranks(p.name for p in tmp.iterdir() if p.is_file())
    digests = _gather_dicts({n: _hash_or_problem(tmp / n) for n in _my_share(names)})
    unreadable = sorted(n for n, d in digests.items() if d.startswith("unreadable"))
    if unreadable:
        raise DamagedState(f"{tmp}: files written by the ranks could not be read back for hashing: "
                           + "; ".join(f"{n} ({digests[n]})" for n in unreadable[:4])
                           + ". Do all ranks see the same filesystem (DCP needs shared storage)?")
    if dist.is_main():
        manifest = {"kind": KIND, "step": step, **info, "files": {n: digests[n] for n in names}}
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        aside = ckpt_dir / f".state-{step:09d}.old"
        if final.exists():  # the same step written again (a resume from an older state): replace it
            final.rename(aside)
        os.replace(tmp, final)
        if aside.exists():
            shutil.rmtree(aside)
        fsync_dir(ckpt_dir)
    dist.barrier()
    return final


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the state at ``path``: :class:`DamagedState` if it is missing or unreadable (an unfinished
    write, damage), :class:`UnsupportedFormat` if it is of another layout."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise DamagedState(f"{path}: no {MANIFEST} (an unfinished write?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedState(f"{path}: {MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        kind = manifest.get("kind") if isinstance(manifest, dict) else None
        raise UnsupportedFormat(f"{path} is not a training state this pmf reads (kind {kind!r}, expected {KIND!r}); train "
                          "from step 0 with --restart, or use a new --run-dir")
    return manifest


def verify_state_dir(path: str | os.PathLike, collective: bool = True) -> dict:
    """The manifest of the state at ``path`` after checking that every listed file exists and matches its hash;
    raises :class:`DamagedState` otherwise. ``collective``: the ranks of the joined group split the hashing and agree
    on the outcome (call on every rank); else this process checks everything."""
    path = Path(path)
    problem = ""
    try:
        manifest = read_manifest(path)  # UnsupportedFormat passes through: every rank reads the same manifest
        names = sorted(manifest["files"])
        for n in (_my_share(names) if collective else names):
            f = path / n
            if not f.is_file():
                problem = f"{f.name} is missing"
                break
            if sha256_file(f) != manifest["files"][n]:
                problem = f"{f.name} does not match its recorded SHA-256 (damaged after it was written)"
                break
    except DamagedState as e:
        manifest, problem = None, str(e).removeprefix(f"{path}: ")
    except OSError as e:  # e.g. a file this rank may not read: reported by every rank together
        manifest, problem = None, f"{type(e).__name__}: {e}"
    bad = dist.any_rank(bool(problem))[0] if collective else bool(problem)
    if bad:
        raise DamagedState(f"{path}: {problem or 'a file checked by another rank is damaged'}")
    return manifest


def read_extra(path: str | os.PathLike) -> dict:
    """The state's ``extra`` (:func:`split_tensors`): its nested non-tensor part and the paths of its tensors."""
    return torch.load(Path(path) / EXTRA, map_location="cpu", weights_only=True)


def tensor_sizes(path: str | os.PathLike) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """(global shape, dtype) of every tensor in the state at ``path``, from DCP's index."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k: (m.size, m.properties.dtype) for k, m in meta.items() if isinstance(m, TensorStorageMetadata)}


def load_tensors(path: str | os.PathLike, templates: dict[str, torch.Tensor], no_dist: bool = False) -> None:
    """Fill ``templates`` (flat, DTensors or plain tensors, each rank its own) in place from the state at ``path``;
    DCP reads each rank's part, resharding as needed. A collective when a group is joined, unless ``no_dist`` (read
    everything locally, outside any group's collectives)."""
    import torch.distributed.checkpoint as dcp

    with _quiet_dcp():
        dcp.load(templates, checkpoint_id=str(path), no_dist=no_dist)


def read_full_state(path: str | os.PathLike) -> dict:
    """The state at ``path`` as it was saved, with full CPU tensors, read in this process (no group needed; e.g. to
    inspect a state, or to compare two)."""
    full = {k: torch.empty(size, dtype=dtype) for k, (size, dtype) in tensor_sizes(path).items()}
    load_tensors(path, full, no_dist=True)
    return join_tensors(read_extra(path), full)
