"""Atomic file writes: a crash, kill or full disk leaves the old file or the new one, never a truncated one; and the
SHA-256 of a written file (:func:`sha256_file`), the checksum the manifests of shards and sharded states record.

Every write goes to a hidden temp file in the target's directory, is fsynced, and is then moved over the target with
``os.replace``. The temp file must be in the same directory because ``os.replace`` is atomic only within one
filesystem. Only rank 0 should call the writers; this module does not check.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from pathlib import Path

import torch

# ----------------------------------------------------------------------------------------------------------------
# Atomic writes


def sha256_file(path, chunk: int = 1 << 24) -> str:
    """Hex SHA-256 of the file at ``path``, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(directory: Path) -> None:
    """Persist the rename itself (POSIX). Not possible or needed on Windows."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
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
    fsync_dir(path.parent)


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically: ``path`` holds either its previous content or all of ``obj``."""
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:  # torch's zip writer reports a failed write (disk full, quota) as a RuntimeError
            raise OSError(f"writing {path} failed ({e}); check free disk space and quotas") from e


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")




def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
