"""A network on disk: exports (:mod:`.export`), the Hugging Face folder (:mod:`.hub`), official checkpoints
(:mod:`.convert`, Orbax: :mod:`.orbax_io`), checks of what a file holds (:mod:`.userfiles`) and the diffusers
pipeline (:mod:`.pipelines`)."""
