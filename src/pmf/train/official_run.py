"""Official JAX checkpoints as pmf runs: import into a run directory, fine-tune from one (``--init-from``), export a
run back to the official tree. The tree mapping itself is :mod:`pmf.train.official_jax`, the file format
:mod:`pmf.io.orbax_io`; docs/hub.md lists what maps and what does not.

* :func:`import_to_run`: an Orbax TrainState -> ``run_dir`` with ``config.json``, a training state at the official
  step (network with v-head, every EMA copy of the run's ``train.ema`` found in the tree, Muon / Adam moments,
  images seen = step x images per step) and the exports, so ``pmf train --run-dir`` with the same settings continues.
* :func:`import_to_export`: without a training config, the network and every EMA copy as network folders
  ``out/<name>/`` (:mod:`pmf.method.pretrained`), for ``pmf sample`` / ``pmf eval``; also takes the inference-only
  trees of ``just_evaluate``.
* ``--init-from`` (a new run's weights and EMAs): :mod:`pmf.train.init_from`.
* :func:`export_official`: a run (newest training state) or any exported network -> ``checkpoint_<step>/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pmf.errors import PmfError
from pmf.io import orbax_io
from pmf.io.convert import ours_to_official, load_official
from pmf.train import official_jax
from pmf.train.init_from import V_HEAD, _checked_net, _fill_emas, _load_weights, _v_head_note, read_official

# ----------------------------------------------------------------------------------------------------------------
# Import


def import_to_run(ckpt, cfg, run_dir, images_per_step: int = official_jax.OFFICIAL_IMAGES_PER_STEP) -> list[str]:
    """Write ``run_dir`` (new or empty) so that ``pmf train --run-dir run_dir`` with the settings ``cfg`` continues
    the official run of ``ckpt``. Returns notes on what did not map."""
    from pmf.util.atomic import atomic_write_text
    from pmf.train.checkpoint import load_latest
    from pmf.train.config import to_json
    from pmf.train.loop import build_run, load_dataset
    from pmf.train.config import model_kwargs
    from pmf.train.runlock import lock_run_dir
    from pmf.train.validate import validate_config

    run_dir = Path(run_dir)
    if run_dir.exists() and (load_latest(run_dir) is not None or (run_dir / "log.jsonl").exists()):
        raise PmfError(f"{run_dir} already holds a run; import into a new --out directory")
    validate_config(cfg)
    state = read_official(ckpt)
    kwargs = model_kwargs(cfg)
    params = _checked_net(state.params, {**kwargs, "v_head": any(k.startswith(V_HEAD) for k in state.params)},
                          "the checkpoint's network")
    notes = [n for n in [_v_head_note(kwargs, params)] if n]
    data, _ = load_dataset(cfg)
    lock = lock_run_dir(run_dir)
    try:
        run = build_run(cfg, run_dir, torch.device("cpu"), data, None)
        _load_weights(run.net, params)
        notes += _fill_emas(run.ema, state, run.net.state_dict())
        if state.has_optimizer and cfg.optim.name == "muon":
            notes += official_jax.optimizer_state_to_ours(state, run.net, run.opt)
        else:
            notes.append("optimizer state not carried (" + ("an eval-only tree" if not state.has_optimizer else
                                                           f"optim.name={cfg.optim.name}, not muon") + ")")
        run.step = state.step
        run.nimg = official_jax.nimg_of_step(state.step, images_per_step)
        run.loader.load_state_dict({**run.loader.state_dict(), "nimg": run.nimg})
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", to_json(cfg) + "\n")
        run.checkpoint()
        run.export()
    finally:
        if lock is not None:
            lock.release()
    return notes


def import_to_export(ckpt, out_dir, model: str | None, model_kwargs: dict) -> list[str]:
    """The network (``model``) and every EMA copy (``ema_hl<kimg>``) of an Orbax checkpoint as network folders
    ``out_dir/<name>/`` (v-head dropped), loadable by ``pmf sample --checkpoint out_dir --ema ema_hl2000``."""
    from pmf.io.convert import _resolve_kwargs, official_meta

    state = read_official(ckpt)
    kwargs = {**_resolve_kwargs(model, model_kwargs), "v_head": False}
    meta = {**(official_meta(model, str(ckpt)) if model else {"source": str(ckpt), "imported_from_official": True}),
            "step": state.step}
    for name, sd in {"model": state.params, **state.emas}.items():
        infer = {k: v for k, v in sd.items() if not k.startswith(V_HEAD)}
        try:
            net = load_official(ours_to_official(infer, with_rope_freqs=False), **kwargs)
        except ValueError as e:
            raise PmfError(f"{name} of {ckpt} does not fit the model: {e}".replace("\n", " ")) from None
        net.save_pretrained(Path(out_dir) / name, meta=meta)
    return [f"wrote {', '.join(['model', *state.emas])} (v-head dropped) to {out_dir}"]


# ----------------------------------------------------------------------------------------------------------------
# --init-from


# ----------------------------------------------------------------------------------------------------------------
# Export


def export_official(checkpoint, out_dir, ema: str | None = None) -> Path:
    """Write ``out_dir/checkpoint_<step>/``: from a run directory with a training state, the full TrainState
    (step, params with v-head, every EMA copy, the Muon / Adam state); from any other checkpoint form
    (:func:`pmf.train.load.load_checkpoint`), the eval-only tree of `train.py`'s ``just_evaluate`` (params, one EMA copy
    under its half-life when ``ema`` names one, the empty sgd state)."""
    from pmf.train.checkpoint import load_latest

    src = Path(checkpoint)
    state = load_latest(src) if (src / "checkpoints").is_dir() else None
    if state is not None:
        from pmf.train.config import from_dict
        from pmf.train.config import model_kwargs
        from pmf.train.optim import build_optimizer
        from pmf.method.model import PMFDiT

        cfg = from_dict(json.loads(state["config"]))
        net = PMFDiT(**model_kwargs(cfg))
        net.load_state_dict(state["net"], strict=True)
        opt_tree = None
        if cfg.optim.name == "muon":
            opt = build_optimizer(net, cfg.optim)
            opt.load_state_dict(state["optimizer"])
            opt_tree = official_jax.optimizer_state_to_official(net, opt)
        emas = {n: state["ema"]["shadow"][n] for n in state["ema"]["names"]}
        tree = official_jax.build_tree(int(state["step"]), state["net"], emas, opt_tree)
        step = int(state["step"])
    else:
        from pmf.train.load import load_checkpoint

        net, meta = load_checkpoint(str(checkpoint), ema)
        name = meta.get("ema") or ema or "model"
        sd = net.state_dict()
        emas = {name: sd} if name.startswith("ema_") else {}
        step = int(meta.get("step", 0))
        tree = official_jax.build_tree(step, sd, emas, None)
    return orbax_io.write_tree(Path(out_dir) / f"checkpoint_{step}", tree)


# ----------------------------------------------------------------------------------------------------------------
# Command line (pmf import-official on an Orbax checkpoint)


def is_orbax_input(path) -> bool:
    """An Orbax checkpoint (directory or .zip), as opposed to an official .pt."""
    p = Path(path)
    return p.is_dir() or (p.is_file() and p.suffix == ".zip")


def import_official_jax_main(source, out, model: str | None = None, model_kwargs: str | None = None,
                             preset: str | None = None, config: str | None = None, sets: list | tuple = (),
                             images_per_step: int = 1024) -> int:
    """``pmf import-official CKPT --out DIR``: a run directory when a training config is given (--preset, --config,
    --set), else inference exports; prints what maps and what does not. ``model_kwargs``: the --model-kwargs JSON
    text."""
    from pmf.io.convert import official_kwargs_to_ours
    from pmf.train.config import load_config

    try:
        official_kwargs = json.loads(model_kwargs) if model_kwargs else {}
    except json.JSONDecodeError as e:
        raise PmfError(f"--model-kwargs is not JSON ({e}); e.g. '{{\"hidden_size\": 768, \"depth\": 16}}'") from None
    if not isinstance(official_kwargs, dict):
        raise PmfError("--model-kwargs must be a JSON object of the official pmfDiT constructor kwargs")
    if preset or config or sets:
        cfg = load_config(preset, config, list(sets))
        if model:
            cfg.model.name = model
        if official_kwargs:
            cfg.model.overrides = {**cfg.model.overrides, **official_kwargs_to_ours(official_kwargs)}
        notes = import_to_run(source, cfg, out, images_per_step)
        again = " ".join(f"--{k} {v}" for k, v in (("preset", preset), ("config", config)) if v)
        again += "".join(f" --set {s}" for s in sets)
        if official_kwargs:
            again += f" --set 'model.overrides={json.dumps(cfg.model.overrides)}'"
        if model:
            again += f" --set model.name={model}"
        print(f"imported {source} -> run {out}; continue with: pmf train {again.strip()} --run-dir {out}")
    else:
        if model is None and not official_kwargs:
            raise PmfError("an Orbax checkpoint needs --model SIZE or --model-kwargs JSON (the official pmfDiT kwargs)")
        notes = import_to_export(source, out, model, official_kwargs)
        print(f"imported {source} -> exports in {out} (pmf sample --checkpoint {out} --ema NAME)")
    for note in notes:
        print(f"  note: {note}")
    return 0
