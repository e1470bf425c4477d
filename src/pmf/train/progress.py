"""The training progress bar's length: the images the run will actually reach.

A run ends at ``train.total_kimg`` or, with ``--minutes``, when the time is up, whichever comes first. The bar
counts images, so under a time budget its total is the smaller of the run's images and the images the measured
rate reaches by the deadline; tqdm's ETA then follows the same end.
"""

from __future__ import annotations


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
