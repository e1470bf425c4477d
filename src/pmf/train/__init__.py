"""Training infrastructure: the loop (:mod:`.loop`), optimizers (:mod:`.optim`), EMA (:mod:`.ema`), data
(:mod:`.data`), training state (:mod:`.checkpoint`), processes (:mod:`.dist`, :mod:`.fsdp`), speed (:mod:`.speed`)
and the run configuration (:mod:`.config`). The method itself (network, objective, sampler) lives one level up."""
