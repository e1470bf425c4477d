"""One writer per run directory: an exclusive ``fcntl.flock`` on ``run_dir/.lock``, holding "PID HOST".

Taken by rank 0 before anything in the run directory is read or written, held until training returns. The kernel
drops a flock when its process dies (even by SIGKILL), so the lock of a dead process is free: the next run takes it
over and says whose it was. A lock held by a live process refuses the second run with "run directory in use by PID
... on HOST". On a filesystem without flock support (some network mounts) the PID in the file decides instead: a
live PID on this host means busy, anything else is taken over.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
from pathlib import Path

from pmf.errors import PmfError, RunDirBusy

LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _parse(text: str) -> tuple[int | None, str]:
    parts = text.split()
    try:
        return int(parts[0]), (parts[1] if len(parts) > 1 else "?")
    except (IndexError, ValueError):
        return None, "?"


class RunLock:
    """``with RunLock(run_dir):`` hold the run directory's lock (creating the directory). :class:`RunDirBusy` when a
    live process holds it."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise PmfError(f"cannot create the run directory's lock {self.path} ({e.strerror or e}); choose a "
                           "writable --run-dir") from e
        try:
            previous = os.pread(fd, 256, 0).decode("utf-8", "replace")
            pid, host = _parse(previous)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunDirBusy(self._busy(pid, host)) from None
                # flock unsupported here (ENOLCK / EOPNOTSUPP): fall back to the PID in the file
                if pid is not None and host == socket.gethostname() and pid != os.getpid() and _pid_alive(pid):
                    raise RunDirBusy(self._busy(pid, host)) from None
            if pid is not None and pid != os.getpid():
                print(f"taking over the stale lock {self.path} of PID {pid} on {host} (that process has ended)",
                      file=sys.stderr, flush=True)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def _busy(self, pid, host) -> str:
        who = f"PID {pid} on {host}" if pid is not None else "another process"
        return (f"run directory {self.path.parent} in use by {who} (lock {self.path}); wait for that run to end, "
                f"stop it, or use another --run-dir")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # an empty file: released cleanly, not stale
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(run_dir: str | os.PathLike) -> RunLock | None:
    """Rank 0 takes the run directory's lock; every rank learns whether it could (one collective under torchrun), so
    a refused run stops on all ranks instead of leaving them waiting. Returns the held lock on rank 0, else None."""
    from pmf.parallel import dist

    lock, error = None, None
    if dist.is_main():
        try:
            lock = RunLock(run_dir).acquire()
        except Exception as e:  # busy, or the directory cannot be created
            error = e
    (failed,) = dist.any_rank(error is not None)
    if error is not None:
        raise error
    if failed:
        raise RunDirBusy(f"rank 0 could not lock the run directory {run_dir} (its message says why)")
    return lock
