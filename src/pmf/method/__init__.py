"""The method of the paper: the network (:mod:`.model`, :mod:`.attention`), the objective (Alg. 2, :mod:`.objective`,
its lean step :mod:`.objective_lean`), keyed per-sample randomness (:mod:`.rng`), the sampler (:mod:`.sampler`), the
perceptual terms (:mod:`.perceptual`) and compute counts (:mod:`.compute`). Imports nothing else of pmf but the leaf
helpers."""
