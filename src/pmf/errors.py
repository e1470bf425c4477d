"""Exit statuses of the ``pmf`` command and the exception for expected failures.

An expected failure (a bad setting, a missing or damaged file, a busy run directory, a full disk) is a
:class:`PmfError` or one of the standard exceptions the CLI knows (``pmf.cli.main``): it is printed as one line that
names the file or key and the fix, with exit status :data:`EXIT_USAGE`. Anything else is a bug and keeps its
traceback (exit 1). docs/robustness.md lists every status.
"""

from __future__ import annotations

EXIT_OK = 0  # finished, or stopped by --minutes (rerun to continue)
EXIT_BUG = 1  # an unexpected exception (Python's own status for an uncaught exception; traceback printed)
EXIT_USAGE = 2  # an expected failure: bad setting or argument, unreadable file, busy run directory, disk full
EXIT_DIVERGED = 3  # training stopped by train.max_nonfinite non-finite steps in a row (checkpoint written)
EXIT_PREEMPTED = 75  # stopped by SIGTERM / SIGINT / SIGUSR1 after a checkpoint and the exports (sysexits EX_TEMPFAIL:
#   "try again later": rerun the same command to continue)


class PmfError(Exception):
    """An expected failure with a one-line message naming what is wrong (file, key, process) and the fix."""


class RunDirBusy(PmfError):
    """Another live process holds the run directory's lock."""


def exit_status(stop_reason: str) -> int:
    """The process exit status for a stop reason (docs/robustness.md)."""
    if stop_reason.startswith("preempted"):
        return EXIT_PREEMPTED
    if "non-finite" in stop_reason:
        return EXIT_DIVERGED
    return EXIT_OK
