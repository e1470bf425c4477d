"""Training: the loop (:mod:`.loop`), optimizers (:mod:`.optim`), EMA (:mod:`.ema`), the run configuration
(:mod:`.config`, checked by :mod:`.validate`), training state (:mod:`.checkpoint`, one directory per state:
:mod:`.state_dir`), the none / ddp / fsdp / hsdp strategies (:mod:`.modes`, FSDP2 in :mod:`.fsdp`), the memory
plan (:mod:`.plan`, :mod:`.dryrun`), speed (:mod:`.speed`), the run lock (:mod:`.runlock`), and one loader for every
``--checkpoint`` form, run directories included (:mod:`.load`)."""
