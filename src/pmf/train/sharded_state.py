"""Sharded training states (``train.parallel=fsdp`` / ``hsdp``): ``run_dir/checkpoints/state-{step:09d}/``.

Every rank writes its own shards with ``torch.distributed.checkpoint`` (DCP), so no rank ever holds the full state
(for pMF-H/16 with optimizer and three EMA copies, ~22 GB). The directory is self-describing:

* ``pmf-state.json``: ``{"kind": "pmf-sharded-training-state", "step", "nimg", "format_version", "world_size",
  "parallel", "files": {name: sha256}}``; written last, so a directory without it is unfinished;
* ``.metadata`` and ``__{rank}_{i}.distcp``: DCP's index and shard files, one flat dict of tensors keyed
  ``net/{parameter}``, ``ema/{copy}/{parameter}``, ``optim/{index}/{key}``;
* ``extra.pt``: everything that is not a tensor (optimizer param groups, the per-parameter optimizer state keys, EMA
  names and ramp, data position, counters, config), a small ``torch.save`` file.

Atomic: the ranks write into ``.state-{step:09d}.tmp/``; after a barrier the ranks agree on one list of the files
(the union of their listings), each rank hashes its share of it (SHA-256), rank 0 writes the manifest and renames the
directory into place. A reader checks the hashes (split over the ranks) before trusting a state, so bit rot or a partial
copy is found like a bad digest of a single-file state (:mod:`pmf.train.checkpoint`). The hashes are of the files as
written; that the files hold what was in memory is DCP's (it writes through ``torch.save`` per shard). All ranks must
see the same filesystem (as DCP requires).

DCP reshards on load: a state saved by N ranks loads into M ranks, into an FSDP (1-D) or HSDP (2-D) mesh, or into
full tensors (``ddp``, one process, or :func:`read_full_state` offline, which returns the single-file layout).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from pmf.parallel import dist
from pmf.util.atomic import atomic_save, atomic_write_text, fsync_dir, sha256_file

KIND = "pmf-sharded-training-state"
MANIFEST = "pmf-state.json"
EXTRA = "extra.pt"


class DamagedShardedState(RuntimeError):
    """A sharded state directory whose files are missing or do not match their recorded hashes."""


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


def save_sharded_state(ckpt_dir: str | os.PathLike, step: int, tensors: dict[str, torch.Tensor], extra: dict,
                       info: dict) -> Path:
    """Write ``tensors`` (flat, DTensors or plain; a collective: every rank calls with its own shards) and ``extra``
    (rank 0's copy is written) to ``ckpt_dir/state-{step:09d}/`` atomically; ``info`` (nimg, world_size, parallel,
    format_version) goes into the manifest. Returns the directory."""
    import torch.distributed.checkpoint as dcp

    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"state-{step:09d}"
    tmp = ckpt_dir / f".state-{step:09d}.tmp"
    if dist.is_main():
        if tmp.exists():  # left by a run that died mid-write
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    with _quiet_dcp():
        dcp.save(tensors, checkpoint_id=str(tmp))
    if dist.is_main():
        atomic_save(extra, tmp / EXTRA)
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
        raise DamagedShardedState(f"{tmp}: files written by the ranks could not be read back for hashing: "
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
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise DamagedShardedState(f"{path} has no {MANIFEST} (an unfinished write?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedShardedState(f"{path / MANIFEST} is not valid JSON ({e})") from None
    if manifest.get("kind") != KIND:
        raise DamagedShardedState(f"{path / MANIFEST} is not a pmf sharded training state (kind "
                                  f"{manifest.get('kind')!r})")
    return manifest


def verify_sharded_state(path: str | os.PathLike, collective: bool = True) -> dict:
    """The manifest of the sharded state at ``path`` after checking that every listed file exists and matches its
    hash; raises :class:`DamagedShardedState` otherwise. ``collective``: the ranks of the joined group split the
    hashing and agree on the outcome (call on every rank); else this process checks everything."""
    path = Path(path)
    problem = ""
    try:
        manifest = read_manifest(path)
        names = sorted(manifest["files"])
        for n in (_my_share(names) if collective else names):
            f = path / n
            if not f.is_file():
                problem = f"{f.name} is missing"
                break
            if sha256_file(f) != manifest["files"][n]:
                problem = f"{f.name} does not match its recorded SHA-256 (damaged after it was written)"
                break
    except DamagedShardedState as e:
        manifest, problem = None, str(e)
    bad = dist.any_rank(bool(problem))[0] if collective else bool(problem)
    if bad:
        raise DamagedShardedState(f"{path}: {problem or 'a file checked by another rank is damaged'}")
    return manifest


def read_extra(path: str | os.PathLike) -> dict:
    return torch.load(Path(path) / EXTRA, map_location="cpu", weights_only=True)


def load_sharded_tensors(path: str | os.PathLike, templates: dict[str, torch.Tensor]) -> None:
    """Fill ``templates`` (flat, DTensors or plain tensors, each rank its own) in place from the state at ``path``;
    DCP reads each rank's part, resharding as needed. A collective when a group is joined."""
    import torch.distributed.checkpoint as dcp

    with _quiet_dcp():
        dcp.load(templates, checkpoint_id=str(path))


def read_full_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the state at ``path`` as a full CPU tensor (one process, no group needed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    out = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
           if isinstance(m, TensorStorageMetadata)}
    with _quiet_dcp():  # no_dist: read everything locally, outside any group's collectives
        dcp.load(out, checkpoint_id=str(path), no_dist=True)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The training-state layout <-> flat tensors + extra


def split_state(net_sd: dict, optimizer_sd: dict, ema_sd: dict, rest: dict) -> tuple[dict, dict]:
    """(flat tensors, extra) of a training state whose tensors may be sharded: the single-file layout
    ``{"net", "optimizer", "ema", **rest}`` taken apart (see module doc)."""
    tensors = {f"net/{k}": v for k, v in net_sd.items()}
    keys = {}
    for idx, st in optimizer_sd["state"].items():
        keys[idx] = {}
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{idx}/{key}"] = v
                keys[idx][key] = "tensor"
            else:
                keys[idx][key] = v  # a plain number kept as it is
    for name, shadow in ema_sd["shadow"].items():
        tensors.update({f"ema/{name}/{k}": v for k, v in shadow.items()})
    extra = {**rest, "optimizer_param_groups": optimizer_sd["param_groups"], "optimizer_state_keys": keys,
             "ema_names": list(ema_sd["names"]), "ema_ramp": ema_sd["ramp"]}
    return tensors, extra


def join_state(tensors: dict[str, torch.Tensor], extra: dict) -> dict:
    """The single-file layout from flat tensors and extra (the inverse of :func:`split_state`)."""
    net = {k[4:]: v for k, v in tensors.items() if k.startswith("net/")}
    state = {}
    for idx, keys in extra["optimizer_state_keys"].items():
        state[idx] = {key: tensors[f"optim/{idx}/{key}"] if kind == "tensor" else kind for key, kind in keys.items()}
    shadow = {name: {} for name in extra["ema_names"]}
    for k, v in tensors.items():
        if k.startswith("ema/"):
            name, key = k[4:].split("/", 1)
            shadow[name][key] = v
    rest = {k: v for k, v in extra.items()
            if k not in ("optimizer_param_groups", "optimizer_state_keys", "ema_names", "ema_ramp")}
    return {"net": net, "optimizer": {"state": state, "param_groups": extra["optimizer_param_groups"]},
            "ema": {"names": list(extra["ema_names"]), "ramp": extra["ema_ramp"], "shadow": shadow}, **rest}


def read_full_state(path: str | os.PathLike) -> dict:
    """The sharded state at ``path`` in the single-file layout, full tensors, in this process (no group needed;
    e.g. to inspect it, or convert it: ``torch.save(read_full_state(dir), "state.pt")``)."""
    manifest = read_manifest(path)
    state = join_state(read_full_tensors(path), read_extra(path))
    state.setdefault("step", manifest["step"])
    state.setdefault("format_version", manifest.get("format_version"))
    return state
