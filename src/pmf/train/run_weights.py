"""Sampling from a run before its first export: the newest training state's EMA copy (or raw weights).

A run writes ``export/`` (one network folder per weight copy) when it stops, and ``checkpoints/`` every
``train.ckpt_every_kimg`` / ``ckpt_every_minutes``. ``pmf sample`` / ``pmf eval`` on a run that has a training state
but no export yet read the weights from the state (:func:`load_from_training_state`); on a run with neither,
:func:`no_weights_yet` says when the first will exist.
"""

from __future__ import annotations

import json
from pathlib import Path

from pmf.errors import PmfError

V_HEAD = ("v_heads.", "v_final_layer.")


def load_from_training_state(run_dir, ema: str | None = None):
    """``(net, meta)`` as :func:`pmf.train.load.load_checkpoint` returns them, from ``run_dir``'s newest training state:
    EMA copy ``ema`` (default the run's ``sample.ema``; "model" or "" = the raw weights), v-head dropped."""
    from pmf.method.model import PMFDiT
    from pmf.train.checkpoint import load_latest
    from pmf.train.config import from_dict
    from pmf.train.config import model_kwargs

    run_dir = Path(run_dir)
    state = load_latest(run_dir)
    if state is None:
        raise no_weights_yet(run_dir)
    cfg = from_dict(json.loads(state["config"]))
    name = ema if ema is not None else cfg.sample.ema
    if name in ("", "model"):
        sd, name = state["net"], "model"
    else:
        names = state["ema"]["names"]
        full = name if name.startswith("ema_") else f"ema_{name}"
        if full not in names:
            raise PmfError(f"--ema {name}: the run keeps {', '.join(names)} (or 'model' for the raw weights)")
        sd, name = state["ema"]["shadow"][full], full
    kwargs = {**model_kwargs(cfg), "v_head": False}
    net = PMFDiT(**kwargs)
    net.load_state_dict({k: v for k, v in sd.items() if not k.startswith(V_HEAD)}, strict=True)
    meta = {"noise_scale": cfg.objective.noise_scale, "omega": cfg.sample.omega, "t_min": cfg.sample.t_min,
            "t_max": cfg.sample.t_max, "kimg": int(state["nimg"]) / 1000, "model": cfg.model.name, "ema": name,
            "source": f"training state at step {int(state['step'])} (no export yet)"}
    return net.eval(), meta


def no_weights_yet(run_dir) -> PmfError:
    """The one-line error for a run directory with neither an export nor a training state."""
    run_dir = Path(run_dir)
    when = "when the run stops"
    try:
        cfg = json.loads((run_dir / "config.json").read_text())["train"]
        when = (f"at the first checkpoint, after train.ckpt_every_kimg={cfg['ckpt_every_kimg']:g} kimg or "
                f"train.ckpt_every_minutes={cfg['ckpt_every_minutes']:g} min of training, whichever comes first, "
                "or when the run stops")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return PmfError(f"{run_dir} has no weights yet (no export/ and no checkpoints/): they will exist {when}; "
                    "sample then, or point --checkpoint at an export")
