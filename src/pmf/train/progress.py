"""What a training run reports while it runs: the log file, the progress bar, and the clocks both read.

The log is JSONL (``run_dir/log.jsonl``, always) and TensorBoard (when installed), written by rank 0. The bar counts
images; a run ends at ``train.total_kimg`` or, with ``--minutes``, when the time is up, whichever comes first, so
under a time budget the bar's total is the smaller of the run's images and the images the measured rate reaches by
the deadline; tqdm's ETA then follows the same end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


def bar_total(total_nimg: int, nimg: int, nimg_loop_start: int, t_loop_start: float, deadline: float | None,
              now: float) -> int:
    """Images at which the run will stop: ``total_nimg``, or fewer when ``deadline`` (a time.time() value, None
    without --minutes) comes first at the rate measured since the loop started (``nimg_loop_start`` images at
    ``t_loop_start``). Before any step has been timed the rate is unknown and ``total_nimg`` is returned."""
    if deadline is None or nimg <= nimg_loop_start or now <= t_loop_start:
        return total_nimg
    rate = (nimg - nimg_loop_start) / (now - t_loop_start)  # images per second
    reachable = nimg + max(deadline - now, 0.0) * rate
    return max(nimg, min(total_nimg, int(reachable)))


class Logger:
    """JSONL (always) + TensorBoard (when installed); rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled, self.path, self.tb = enabled, run_dir / "log.jsonl", None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "kimg":
                    self.tb.add_scalar(k, v, global_step=int(record["kimg"] * 1000))
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


def open_bar(total_nimg: int, nimg: int, enabled: bool):
    """The tqdm bar over images (None when disabled: other ranks, ``--quiet``)."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total_nimg, initial=nimg, unit="img", unit_scale=True, dynamic_ncols=True, smoothing=0.05)


@dataclass
class Progress:
    """The loop's clocks and reports; not saved (a resumed run starts them again). Times are time.time() values."""

    t_start: float  # when train() was called
    minutes: float | None  # --minutes: the time budget from t_start; None = none
    logger: Logger
    bar: object = None  # tqdm bar (rank 0 without --quiet), else None
    t_loop: float = 0.0  # when the loop started ...
    nimg_loop: int = 0  # ... at these images seen (the rate of the bar and of the log's img_per_s)
    last_ckpt_time: float = 0.0  # the last checkpoint (or the start): train.ckpt_every_minutes counts from here
    losses: list = field(default_factory=list)  # each step's loss since the last log record (its loss_avg)

    def time_up(self, now: float) -> bool:
        return self.minutes is not None and now - self.t_start > self.minutes * 60

    def deadline(self) -> float | None:
        return None if self.minutes is None else self.t_start + self.minutes * 60

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.logger.close()
