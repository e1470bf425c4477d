"""Leaf helpers that import nothing of pmf but :mod:`pmf.errors`: atomic writes (:mod:`.atomic`), the stop signals
(:mod:`.preempt`) and safe reading of files a user hands pmf (:mod:`.safe_load`)."""
