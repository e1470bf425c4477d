"""What a ``--checkpoint`` names, resolved to one network folder (:mod:`pmf.method.pretrained`: config.json +
model.safetensors) and loaded. Returns the network in eval mode and its sampling defaults (noise scale, omega,
interval, provenance). Anything else is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

from pmf.errors import PmfError


def load_checkpoint(checkpoint: str, ema: str | None = None, device: str = "cpu"):
    """A network and its sampling defaults ``(net, meta)`` from:
    a network folder (what ``save_pretrained``, ``pmf export`` and ``pmf import-official`` write);
    a folder of them, one per weight copy (a run's ``export/``), copy ``ema`` (default "model");
    a run directory: its ``export/`` folder, copy ``ema`` (default the run's ``sample.ema``); before the first export,
    the newest training state (:mod:`pmf.train.run_weights`);
    a Hub repo id ``owner/name`` (not a local path)."""
    from pmf.io.userfiles import check_loaded_network, check_model_kwargs
    from pmf.method.model import PMFDiT
    from pmf.method.pretrained import CONFIG_NAME, is_network_folder, read_config
    from pmf.util.safe_load import read_json_object

    p = Path(checkpoint)
    name = None
    if not p.exists():  # a Hub repo id, or a clear error saying why it is neither a path nor a reachable repo
        folder = checkpoint
    elif is_network_folder(p):
        if ema is not None:
            raise PmfError(f"--ema {ema}: {p} holds one network; --ema picks a copy in a run directory or in a "
                           "folder of exports")
        folder = p
    elif p.is_dir() and _is_run_dir(p):
        if not (p / "export").is_dir():  # a run before its first export
            from pmf.train.run_weights import load_from_training_state

            net, meta = load_from_training_state(p, ema)
            check_loaded_network(net, meta, str(p))
            return net.to(device).eval(), meta
        run_cfg = read_json_object(p / "config.json", "the run's config") if (p / "config.json").exists() else {}
        name = ema or run_cfg.get("sample", {}).get("ema") or "model"
        folder = _copy_in(p / "export", name)
    elif p.is_dir() and _copies(p):
        name = ema or "model"
        folder = _copy_in(p, name)
    else:
        raise PmfError(f"{p} is not a network folder ({CONFIG_NAME} + model.safetensors), a folder of them (a run's "
                       "export/), a run directory or a Hub repo id. Convert an official .pt with `pmf import-official "
                       "FILE --model SIZE --out DIR`; a network exported by an older pmf is not read: export it again "
                       "with this pmf (rerun `pmf train` on its run directory)")
    if Path(folder).is_dir():  # local: the stored kwargs checked by the flags' rules before a network is built
        check_model_kwargs(read_config(folder)["model_kwargs"], str(Path(folder) / CONFIG_NAME))
    net = PMFDiT.from_pretrained(folder)
    meta = dict(net.pretrained_meta) if name is None else {**net.pretrained_meta, "ema": name}
    check_loaded_network(net, meta, str(p))  # the flags' rules for the stored defaults; finite weights
    return net.to(device).eval(), meta


def _copies(folder: Path) -> list[str]:
    """The names of the network folders directly inside ``folder``."""
    from pmf.method.pretrained import is_network_folder

    return sorted(d.name for d in folder.iterdir() if d.is_dir() and is_network_folder(d))


def _copy_in(folder: Path, name: str) -> Path:
    """``folder/name``, or a one-line error naming the copies ``folder`` holds."""
    if (folder / name).is_dir():
        return folder / name
    copies = _copies(folder)
    if not copies:
        raise PmfError(f"{folder} holds no network folder (config.json + model.safetensors): written by an older pmf "
                       "or not at all; export it again with this pmf (rerun `pmf train` on its run directory)")
    raise PmfError(f"--ema {name}: {folder} holds {', '.join(copies)}")


def _is_run_dir(p: Path) -> bool:
    """A training run's directory: an ``export/`` folder, or config.json holding a run config (sections model and
    train)."""
    if (p / "export").is_dir():
        return True
    try:
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and {"model", "train"} <= set(cfg)
