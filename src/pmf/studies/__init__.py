"""Studies built on the method, training and evaluation: the toy study (:mod:`.toy`) and the paper's ablations
(:mod:`.ablate`)."""
