"""Orbax PyTree checkpoints (the official JAX code's format) read and written with tensorstore and numpy, no JAX.

The official trainer saves its flax ``TrainState`` with ``flax.training.checkpoints.save_checkpoint_multiprocess``
(`utils/ckpt_util.py`), which hands it to orbax-checkpoint (0.6.4 pinned in `scripts/install.sh`). On disk that is a
directory ``checkpoint_<step>/`` holding

* ``_METADATA``: JSON ``{"tree_metadata": {"('params', 'net', ...)": {"key_metadata": [...], "value_metadata":
  {"value_type": "np.ndarray" | "None", "skip_deserialize": bool}}, ...}, "use_zarr3": false}``; one entry per leaf,
  keyed by the tuple of its tree keys. ``None`` leaves are optax's masked entries (``MaskedNode``, e.g. the Adam
  moments of a matrix that Muon owns) and hold no data.
* ``manifest.ocdbt`` and ``d/`` (plus ``ocdbt.process_<i>/`` per writing process): one OCDBT key-value store in which
  every array is a zarr v2 array (zstd level 1) at the dotted path, e.g. ``params.net.pos_embed/.zarray``;
* ``_CHECKPOINT_METADATA``: timestamps.

:func:`read_tree` returns ``{key tuple: numpy array or None}``; :func:`write_tree` writes the same layout, which
orbax's ``PyTreeCheckpointer().restore`` (and so the official ``restore_checkpoint``) reads. A ``.zip`` of a
checkpoint directory is unpacked to a temporary directory first. tensorstore is an optional extra
(``pip install 'pixel-meanflow[orbax]'``); without it the functions raise :class:`pmf.errors.PmfError` saying so.
"""

from __future__ import annotations

import ast
import json
import re
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from pmf.errors import PmfError

METADATA = "_METADATA"
CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
_CKPT_RE = re.compile(r"^checkpoint_(\d+)$")
KEY_TYPE_SEQUENCE, KEY_TYPE_DICT = 1, 2  # orbax's key_metadata "key_type": a list/tuple index or a dict key
UNPACK_PREFIX = "pmf-orbax-unpacked-"  # temporary directory of an unpacked .zip
INSTALL_HINT = "pip install 'pixel-meanflow[orbax]' (tensorstore)"


def _tensorstore():
    try:
        import tensorstore as ts
    except ImportError:
        raise PmfError(f"reading and writing official JAX (Orbax) checkpoints needs tensorstore: {INSTALL_HINT}") \
            from None
    return ts


# ----------------------------------------------------------------------------------------------------------------
# Finding the checkpoint directory


def find_checkpoint(path: str | Path, tmp_root: str | None = None) -> Path:
    """The ``checkpoint_<step>/`` directory (the one holding ``_METADATA``) that ``path`` names: that directory, a
    workdir holding several (the highest step is taken, as flax's ``restore_checkpoint`` does), or a .zip of either
    (unpacked under ``tmp_root`` or a new temporary directory, which the caller may delete)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such Orbax checkpoint: {p}")
    if p.is_file():
        if not zipfile.is_zipfile(p):
            raise PmfError(f"{p} is neither an Orbax checkpoint directory nor a .zip of one")
        out = Path(tempfile.mkdtemp(prefix=UNPACK_PREFIX, dir=tmp_root))
        with zipfile.ZipFile(p) as z:
            z.extractall(out)
        p = out
    if (p / METADATA).is_file():
        return p
    steps = sorted((int(m.group(1)), q) for q in p.iterdir() if q.is_dir() and (m := _CKPT_RE.match(q.name))
                   and (q / METADATA).is_file())
    if steps:
        return steps[-1][1]
    found = sorted({q.parent for q in p.rglob(METADATA)})
    if len(found) == 1:
        return found[0]
    what = f"several ({', '.join(map(str, found[:4]))})" if found else "none"
    raise PmfError(f"{path} holds {what} Orbax checkpoint directories with a {METADATA} file; pass the "
                   "checkpoint_<step> directory itself")


# ----------------------------------------------------------------------------------------------------------------
# Reading


def _kvstore(directory: Path) -> dict:
    return {"driver": "ocdbt", "base": f"file://{directory.resolve()}/"}


def read_metadata(directory: Path) -> dict[tuple, dict]:
    """``{key tuple: value_metadata}`` from ``_METADATA`` (keys as strings, in file order)."""
    meta_path = directory / METADATA
    try:
        tree = json.loads(meta_path.read_text())["tree_metadata"]
    except FileNotFoundError:
        raise PmfError(f"{directory} has no {METADATA}: not an Orbax PyTree checkpoint (orbax-checkpoint >= 0.5 "
                       "writes one; an older msgpack checkpoint must be re-saved with the official code)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PmfError(f"{meta_path} is not an Orbax tree metadata file ({type(e).__name__}: {e})") from None
    return {tuple(str(k) for k in ast.literal_eval(key)): entry["value_metadata"] for key, entry in tree.items()}


def read_tree(path: str | Path) -> dict[tuple, np.ndarray | None]:
    """Every leaf of an Orbax checkpoint: ``{key tuple: array}``; masked leaves (value type "None") map to None.
    ``path``: anything :func:`find_checkpoint` takes."""
    ts = _tensorstore()
    directory = find_checkpoint(path)
    context = ts.Context({"cache_pool": {"total_bytes_limit": 1 << 28}})  # the OCDBT index is read once, not per array
    pending: dict[tuple, object] = {}
    for key, value_meta in read_metadata(directory).items():
        if value_meta.get("value_type") == "None" or value_meta.get("skip_deserialize"):
            pending[key] = None
            continue
        spec = {"driver": "zarr", "kvstore": {**_kvstore(directory), "path": ".".join(key)}}
        pending[key] = ts.open(spec, context=context, open=True)  # futures: every array is read concurrently
    out: dict[tuple, np.ndarray | None] = {}
    for key, future in pending.items():
        try:
            out[key] = None if future is None else future.result().read()
        except Exception as e:  # tensorstore raises ValueError with the store's message
            raise PmfError(f"cannot read array {'.'.join(key)} of {directory} ({type(e).__name__}: {e}); the "
                           "checkpoint is incomplete or damaged") from None
    for key, value in out.items():
        if value is not None:
            out[key] = np.asarray(value.result())
    return out


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _zarr_dtype(a: np.ndarray) -> str:
    if a.dtype.name == "bfloat16":
        return "bfloat16"
    return a.dtype.str


def _sequence_levels(tree: dict[tuple, object]) -> set[tuple]:
    """Prefixes whose children are the indices 0..n-1 of a list or tuple (optax's chained states). Any other node
    is a dict, including one keyed by digits such as ``ema_params`` ({"500": ..., "1000": ...})."""
    children: dict[tuple, set[str]] = {}
    for key in tree:
        for i in range(len(key)):
            children.setdefault(key[:i], set()).add(key[i])
    return {prefix for prefix, ks in children.items() if ks == {str(i) for i in range(len(ks))}}


def write_tree(directory: str | Path, tree: dict[tuple, np.ndarray | None]) -> Path:
    """Write ``tree`` ({key tuple: array or None}) as the Orbax checkpoint directory ``directory`` (normally
    ``.../checkpoint_<step>``; it must not exist). Keys are strings; the children of a node keyed exactly "0".."n-1" are
    written as a sequence (optax's tuples of states), any other node as a dict. Written under a temporary name and renamed at the end,
    as orbax does, so a crash leaves no directory that looks complete."""
    ts = _tensorstore()
    directory = Path(directory)
    if directory.exists():
        raise PmfError(f"{directory} already exists; choose a new --out (an Orbax checkpoint is never overwritten)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f"{directory.name}.orbax-checkpoint-tmp-{time.time_ns()}")
    tmp.mkdir()
    t0 = time.time_ns()
    context = ts.Context()
    txn = ts.Transaction()  # one OCDBT commit for every array, not one per array
    tree_meta, writes = {}, []
    sequences = _sequence_levels(tree)
    for key, value in tree.items():
        key_meta = [{"key": k, "key_type": KEY_TYPE_SEQUENCE if key[:i] in sequences else KEY_TYPE_DICT}
                    for i, k in enumerate(key)]
        if value is None:
            tree_meta[str(key)] = {"key_metadata": key_meta,
                                   "value_metadata": {"value_type": "None", "skip_deserialize": True}}
            continue
        a = np.asarray(value, order="C")  # (np.ascontiguousarray would make a scalar 1-D)
        spec = {"driver": "zarr", "kvstore": {**_kvstore(tmp), "path": ".".join(key)}, "rank": a.ndim,  # scalars too
                "metadata": {"shape": list(a.shape), "chunks": list(a.shape), "dtype": _zarr_dtype(a),
                             "compressor": {"id": "zstd", "level": 1}, "fill_value": None, "filters": None,
                             "order": "C", "dimension_separator": "."}}
        writes.append(ts.open(spec, context=context, create=True, transaction=txn).result().write(a))
        tree_meta[str(key)] = {"key_metadata": key_meta,
                               "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False}}
    for w in writes:
        w.result()
    txn.commit_sync()
    (tmp / METADATA).write_text(json.dumps({"tree_metadata": tree_meta, "use_zarr3": False}))
    (tmp / CHECKPOINT_METADATA).write_text(json.dumps({"init_timestamp_nsecs": t0,
                                                       "commit_timestamp_nsecs": time.time_ns()}))
    tmp.rename(directory)
    return directory
