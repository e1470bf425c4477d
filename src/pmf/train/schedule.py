"""When an "each N kimg" action of the training loop is due: at fixed points of the images seen.

An action (log record, sample grid, checkpoint, cross-rank check) has a set of points on the images-seen axis: the
multiples of its interval, and optionally a few early points before the first multiple. It fires after the step
whose images cross a point, i.e. when a point lies in (images seen before the step, images seen after it]. That is a
function of the images seen only, with no counter of its own, so

- a resumed run (its images seen restored from the training state) fires every action at the same images seen as
  an uninterrupted run: nothing has to be recomputed or saved;
- the batch size need not divide the interval: the action fires after the first step at or past each point;
- a step that crosses several points (an interval below the batch) fires the action once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Every:
    """The points ``m * kimg * 1000`` images (m = 1, 2, ...) and, with ``early_img`` > 0, also ``early_img * 2**k``
    (k = 0, 1, ...) below the first multiple: the first log records of a slow run (one GPU, a large global batch)
    then come after 1, 2, 4, 8, ... steps instead of hours in."""

    kimg: float  # interval in thousands of images; 0 = never
    early_img: int = 0  # first early point in images (the batch: after the 1st, 2nd, 4th, ... step); 0 = none

    @property
    def interval_img(self) -> int:
        """The interval in whole images (0 = never); at least one image for any positive ``kimg``."""
        return max(1, round(self.kimg * 1000)) if self.kimg > 0 else 0

    def next_after(self, nimg: int) -> float:
        """The first point strictly after ``nimg`` images (``math.inf``: none)."""
        every = self.interval_img
        if every == 0:
            return math.inf
        regular = (nimg // every + 1) * every
        early = self.early_img
        if early <= 0:
            return regular
        while early <= nimg:
            early *= 2
        return early if early < every else regular

    def due(self, nimg_before: int, nimg: int) -> bool:
        """A point lies in (``nimg_before``, ``nimg``]: the step that took the images seen from ``nimg_before`` to
        ``nimg`` crossed (or reached) one."""
        return self.next_after(nimg_before) <= nimg
