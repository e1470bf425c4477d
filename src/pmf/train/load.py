"""One loader for every form a ``--checkpoint`` takes: run directory, export, Hugging Face folder or Hub repo id,
official .pt. Returns the network in eval mode and its sampling defaults (noise scale, omega, interval, provenance)."""

from __future__ import annotations

import json
from pathlib import Path


def load_checkpoint(checkpoint: str, ema: str | None = None, device: str = "cpu"):
    """A network and its sampling defaults ``(net, meta)`` from any of:
    a run directory (its ``export/`` folder, EMA copy chosen by ``ema``, default the run's ``sample.ema``; before
    the first export, the newest training state: :mod:`pmf.train.run_weights`);
    a Hugging Face layout folder (:mod:`pmf.io.hub`) or a Hub repo id ``owner/name``;
    an export directory or its .safetensors / .json (:mod:`pmf.io.export`, copy ``ema``, default "model");
    an official .pt (its size found from its keys and shapes; ``ema`` picks a top-level entry such as "ema")."""
    from pmf.io import hub
    from pmf.io.export import load_exported
    from pmf.io.userfiles import check_loaded_network
    from pmf.util.safe_load import read_json_object

    p = Path(checkpoint)
    if not p.exists():  # a Hub repo id, or a clear error saying why it is neither a path nor a reachable repo
        net, meta = hub.load_pretrained(checkpoint)
    elif p.is_dir() and (p / "export").is_dir():
        cfg = read_json_object(p / "config.json", "the run's config") if (p / "config.json").exists() else {}
        name = ema or cfg.get("sample", {}).get("ema") or "model"
        net, meta = load_exported(p / "export", name=name)
        meta = {**meta, "ema": name}
    elif p.is_dir() and _is_run_dir(p):  # a run before its first export
        from pmf.train.run_weights import load_from_training_state

        net, meta = load_from_training_state(p, ema)
    elif p.is_dir() and (p / hub.CONFIG_NAME).is_file() and (p / hub.WEIGHTS_NAME).is_file() and (
            read_json_object(p / hub.CONFIG_NAME, "the model config") is not None  # a damaged one is named
            and hub.is_pretrained_folder(p)):
        net, meta = hub.load_pretrained(p)
    elif p.is_dir():
        net, meta = load_exported(p, name=ema or "model")
    elif p.suffix in (".pt", ".pth", ".bin"):
        from pmf.io.convert import infer_model, load_official, official_meta
        from pmf.util.safe_load import load_torch_file

        state = load_torch_file(p, "the checkpoint", "give an official pMF checkpoint (a state dict of tensors), or "
                                "load it yourself if you trust it and save its state dict")
        if ema is not None:
            if not (isinstance(state, dict) and isinstance(state.get(ema), dict)):
                raise KeyError(f"--ema {ema}: {p} has no top-level entry {ema!r}")
            state = state[ema]
        model = infer_model(state)
        net, meta = load_official(state, model=model), official_meta(model, p.name)
    else:
        net, meta = load_exported(p)
    check_loaded_network(net, meta, str(p))  # the flags' rules for the stored defaults; finite weights
    return net.to(device).eval(), meta


def _is_run_dir(p: Path) -> bool:
    """A training run's directory: config.json holding a run config (sections model and train)."""
    try:
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and {"model", "train"} <= set(cfg)
