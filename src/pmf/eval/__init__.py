"""Evaluation: pure statistics (:mod:`.stats`), generation and the metric driver (:mod:`.generate`), feature
extractors (:mod:`.inception`, the Fashion-MNIST CNN in :mod:`.fmnist`) and the guidance search
(:mod:`.guidance_search`)."""
