"""Exported inference weights: ``out_dir/{name}.safetensors`` + ``{name}.json``.

Weights only, plus the PMFDiT kwargs that rebuild the network and a ``meta`` dict (noise_scale, recommended omega /
t_min / t_max, provenance). We use safetensors because loading it cannot run code, and any framework can read it
without torch's pickle format. Written atomically (:mod:`pmf.util.atomic`).

The JSON carries ``format_version`` (:data:`FORMAT_VERSION`); a file of any other version, or of none, is refused
(:func:`check_format_version`): pmf reads the one format it writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pmf.errors import PmfError
from pmf.method.model import PMFDiT
from pmf.util.atomic import atomic_path, atomic_write_text

FORMAT_VERSION = 2  # of the exported JSON, the training state and the run directory (see the module docstring)


class UnsupportedFormat(PmfError, ValueError):
    """A file written in a format version other than :data:`FORMAT_VERSION`."""


def check_format_version(version, source) -> None:
    """Refuse, in one line, anything but this pmf's format version (``None``: the file carries none)."""
    if version != FORMAT_VERSION:
        found = "no format_version" if version is None else f"format_version {version!r}"
        raise UnsupportedFormat(f"{source} has {found}; this pmf reads only version {FORMAT_VERSION}: write it again "
                                "with this pmf (export, or train from step 0 with --restart)")

# ----------------------------------------------------------------------------------------------------------------
# Exported inference weights


def _unwrap(net: nn.Module) -> nn.Module:
    """The PMFDiT inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers, so exported key names have
    no wrapper prefix. An FSDP2-sharded model must be gathered to full tensors before export."""
    while True:
        if isinstance(getattr(net, "_orig_mod", None), nn.Module):
            net = net._orig_mod
        elif isinstance(getattr(net, "module", None), nn.Module):
            net = net.module
        else:
            return net


def _fit_problems(model_kwargs: dict, state_dict: dict) -> list[str]:
    """Differences between ``state_dict`` and what PMFDiT(**model_kwargs) expects. The model is built on the meta
    device, so this costs no memory. A wrong kwargs file is caught at export, not when someone loads it later."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in PMFDiT(**model_kwargs).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    problems = [f"unexpected '{k}' {got[k]}" for k in got.keys() - expected.keys()]
    problems += [f"missing '{k}' {expected[k]}" for k in expected.keys() - got.keys()]
    problems += [f"shape '{k}': net {got[k]}, kwargs {expected[k]}" for k in got.keys() & expected.keys()
                 if got[k] != expected[k]]
    return sorted(problems)


def export_model(net: nn.Module, out_dir: str | os.PathLike, model_kwargs: dict, meta: dict | None = None,
                 name: str = "model") -> Path:
    """Write ``out_dir/{name}.safetensors`` (the state dict) and ``out_dir/{name}.json`` ({"format_version",
    "model_kwargs", "meta"}),
    each atomically. Returns the safetensors path.

    ``model_kwargs`` must rebuild ``net`` exactly (this is checked) and be JSON-serialisable. The same JSON is also
    stored in the safetensors header under "pmf_config", so the weights file describes itself if the .json is lost.
    """
    net = _unwrap(net)
    try:
        config_text = json.dumps({"format_version": FORMAT_VERSION, "model_kwargs": model_kwargs, "meta": meta or {}},
                                 indent=2)
    except TypeError as e:
        raise TypeError(f"model_kwargs and meta must be JSON-serialisable: {e}") from None
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    if problems := _fit_problems(model_kwargs, state):
        raise ValueError("model_kwargs do not describe this network:\n  " + "\n  ".join(problems))
    out_dir = Path(out_dir)
    weights = out_dir / f"{name}.safetensors"
    with atomic_path(weights) as tmp:
        save_file(state, tmp, metadata={"pmf_config": config_text})
    atomic_write_text(out_dir / f"{name}.json", config_text + "\n")
    return weights


def _export_paths(path_or_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    p = Path(path_or_dir)
    if p.is_dir():
        return p / f"{name}.safetensors", p / f"{name}.json"
    return p.with_suffix(".safetensors"), p.with_suffix(".json")  # given the .safetensors, the .json or the stem


def load_exported(path_or_dir: str | os.PathLike, name: str = "model", **overrides) -> tuple[PMFDiT, dict]:
    """Rebuild an exported network: ``PMFDiT(**{**model_kwargs, **overrides})`` with a strict load. Returns
    ``(net in eval mode on CPU, meta)``.

    ``path_or_dir`` is the export directory, or the .safetensors / .json path. ``overrides`` replace stored kwargs
    that do not change the weights' shapes (e.g. ``attn_backend="math"``). Only this pmf's format version is read
    (:func:`check_format_version`).
    """
    weights, config_path = _export_paths(path_or_dir, name)
    from pmf.io.userfiles import check_model_kwargs
    from pmf.util.safe_load import read_json_object

    if config_path.exists():
        config = read_json_object(config_path, "the export's config")
    else:  # the .json went missing: the header carries the same JSON
        with safe_open(weights, framework="pt") as f:
            header = (f.metadata() or {}).get("pmf_config")
        if header is None:
            raise FileNotFoundError(f"{config_path} is missing and {weights} carries no pmf_config metadata")
        config = json.loads(header)
    source = config_path if config_path.exists() else weights
    check_format_version(config.get("format_version"), source)
    check_model_kwargs(config.get("model_kwargs"), str(source))
    net = PMFDiT(**{**config["model_kwargs"], **overrides})
    net.load_state_dict(load_file(weights, device="cpu"), strict=True)
    return net.eval(), config.get("meta", {})
