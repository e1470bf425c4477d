"""The loop's "each N kimg" schedule (pmf.train.schedule.Every) against a brute-force enumeration of its points:
an action fires after the first step at or past each point, once per step, never for interval 0, and a run stopped
anywhere and resumed fires at the same images seen as an uninterrupted one."""

import math

import pytest

from pmf.train.schedule import Every


def points(interval_img: int, early_img: int, up_to: int) -> set[int]:
    """Every point up to ``up_to`` images, listed one by one: the multiples of the interval and, below the first of
    them, early_img, 2 * early_img, 4 * early_img, ..."""
    pts = set(range(interval_img, up_to + 1, interval_img)) if interval_img else set()
    e = early_img
    while interval_img and 0 < e < interval_img:
        pts.add(e)
        e *= 2
    return pts


def expected_fires(interval_img: int, early_img: int, batch: int, total: int) -> list[int]:
    """The images seen after each step that the action follows: the first step end (a multiple of the batch) at or
    past each point."""
    ends = range(batch, total + 1, batch)
    return sorted({min(s for s in ends if s >= p) for p in points(interval_img, early_img, total) if p <= ends[-1]})


def run_fires(every: Every, batch: int, start: int, stop: int) -> list[int]:
    """Images seen after the steps at which ``every`` is due, stepping from ``start`` to ``stop`` images."""
    return [n for n in range(start + batch, stop + 1, batch) if every.due(n - batch, n)]


CASES = [  # (kimg, early_img, batch, total images)
    (0.016, 0, 16, 256),  # interval = batch: every step
    (0.024, 0, 16, 400),  # interval not a multiple of the batch
    (0.040, 0, 16, 400),
    (0.007, 0, 16, 160),  # interval below the batch: once per step, not twice
    (0.1, 0, 48, 1008),
    (2.0, 32, 32, 9600),  # the log's early points 32, 64, ..., 1024 below 2000, then every 2000
    (0.024, 16, 16, 400),  # one early point (16); 32 is past the first multiple
    (0.016, 16, 16, 160),  # early point = interval: no extra
    (0.0, 0, 16, 320),  # 0 = never
    (0.0, 16, 16, 320),  # 0 = never, early points included
]


@pytest.mark.parametrize("kimg,early,batch,total", CASES)
def test_fires_after_the_first_step_at_or_past_each_point(kimg, early, batch, total):
    every = Every(kimg, early_img=early)
    assert every.interval_img == round(kimg * 1000)
    assert run_fires(every, batch, 0, total) == expected_fires(round(kimg * 1000), early, batch, total)


@pytest.mark.parametrize("kimg,early,batch,total", CASES)
def test_a_resumed_run_fires_where_an_uninterrupted_one_does(kimg, early, batch, total):
    """Stopped after any step and resumed (a new schedule, the images seen from the training state): the union of
    both parts' firing points is the uninterrupted run's."""
    whole = run_fires(Every(kimg, early_img=early), batch, 0, total)
    for stop_at in range(batch, total, batch):
        first = run_fires(Every(kimg, early_img=early), batch, 0, stop_at)
        second = run_fires(Every(kimg, early_img=early), batch, stop_at, total)
        assert first + second == whole, stop_at


def test_next_after_and_the_edges():
    assert Every(0).next_after(0) == math.inf and not Every(0).due(0, 10**9)
    assert Every(0.05).next_after(0) == 50 and Every(0.05).next_after(49) == 50 and Every(0.05).next_after(50) == 100
    assert Every(0.05).due(49, 50) and not Every(0.05).due(50, 99) and Every(0.05).due(99, 150)
    assert Every(0.0004).interval_img == 1  # a positive interval is at least one image
    assert Every(2.5).interval_img == 2500 and Every(0.128).interval_img == 128  # whole images, no float drift
    assert Every(2.0, early_img=32).next_after(1024) == 2000  # 2048 is past the first multiple
    assert Every(2.0, early_img=32).next_after(100) == 128
