"""Preemption-safe stopping: SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 ask the training loop to stop after the current
step, with a checkpoint and the exports; a second signal ends the process at once.

Cluster schedulers preempt with SIGTERM and a grace period (Kubernetes: 30 s by default; SLURM: ``KillWait``, and
``--signal=USR1@SECONDS`` sends SIGUSR1 ahead of the time limit). The handler only sets a flag; the loop reads it
once per step and, under torchrun, ORs it over ranks in its existing per-step collective (``dist.any_rank``), so
every rank stops after the same step even when only one rank got the signal.

A second signal ends the process with the default action of that signal (the shell sees "killed by SIGTERM",
status 128 + signum), as if no handler were installed. Copies of the first signal that arrive within
:data:`REPEAT_WINDOW_S` count as the same request: a scheduler that signals every process of the job and a launcher
(torchrun) that forwards the signal to its workers deliver it twice within milliseconds. Python runs the handler when
the main thread next executes Python code, so a process stuck inside one long native call (a hung collective) is
ended by the launcher's or the scheduler's SIGKILL instead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGUSR1")) if s is not None)
REPEAT_WINDOW_S = 1.0  # repeats of a signal within this time after the first are one request (see module doc)


class StopRequest:
    """The flag the handlers set: ``requested`` (bool) and ``signal_name`` of the first signal."""

    def __init__(self):
        self.signum: int | None = None
        self.first_at = 0.0

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self.first_at = signum, now
            print(f"\n{signal.Signals(signum).name} received: stopping after this step with a checkpoint and the "
                  f"exports (send it again to stop at once)", file=sys.stderr, flush=True)
            return
        if now - self.first_at < REPEAT_WINDOW_S:
            return  # the same request delivered twice (scheduler + launcher)
        print(f"\n{signal.Signals(signum).name} received again: exiting now without a checkpoint", file=sys.stderr,
              flush=True)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # die by the signal itself: the parent sees the usual status


@contextlib.contextmanager
def stop_on_signals():
    """Install the handlers for the duration of the block; yield the :class:`StopRequest`. Outside the main thread
    (where Python cannot install handlers) nothing is installed and the request never fires."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, request._handle)
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """DataLoader ``worker_init_fn``: data workers outlive the stop signals meant for the trainer. A scheduler signals
    every process of the job (Ctrl-C the whole foreground group); a worker killed by it would make the DataLoader raise
    in the main process in the middle of its final checkpoint. SIGINT and SIGUSR1 are ignored; the first SIGTERM is
    ignored and the next one terminates, so the main process can still end a worker with ``terminate()``
    (pmf.data.datasets shuts its workers down cleanly at exit)."""
    for s in SIGNALS:
        signal.signal(s, _ignore_first_sigterm if s == signal.SIGTERM else signal.SIG_IGN)


def _ignore_first_sigterm(signum, frame) -> None:
    signal.signal(signum, signal.SIG_DFL)
