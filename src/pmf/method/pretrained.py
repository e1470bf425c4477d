"""The one on-disk layout of a network: a Hugging Face model folder, written and read by
:meth:`pmf.method.model.PMFDiT.save_pretrained` / :meth:`~pmf.method.model.PMFDiT.from_pretrained`.

    config.json         {"_class_name": "PMFDiT", "pmf_format_version", "model_kwargs", "meta"}
    model.safetensors   the state dict (safetensors: loading it cannot run code)
    README.md           the model card

``model_kwargs`` are exactly the constructor kwargs the network was built with (``PMFDiT.init_kwargs``), so
``PMFDiT(**model_kwargs)`` rebuilds it whatever the defaults of the running version. ``meta`` holds the sampling
defaults (``noise_scale``: the scale s of z_1 = s * n [pMF section 6]; ``omega``, ``t_min``, ``t_max``: guidance scale
and interval, network inputs [pMF section 4.3]; ``num_steps``) and the provenance (``model``, ``source``, ``kimg``, ...).

Training writes one such folder per weight copy (``run_dir/export/<name>/``); ``pmf import-official`` and
``pmf export`` write one; ``pmf sample / eval / export --checkpoint`` read one; the diffusers pipeline's
``transformer/`` component is one. A folder may live on the Hugging Face Hub: :func:`resolve_folder` downloads it
(huggingface_hub), or says in one line why it cannot.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from pmf.util.atomic import atomic_path, atomic_write_text
from pmf.util.format_version import FORMAT_VERSION, check_format_version
from pmf.util.safe_load import read_json_object

CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"
PAPER_URL = "https://arxiv.org/abs/2601.22158"
OFFICIAL_CODE_URL = "https://github.com/Lyy-iiis/pMF"
# Sampling defaults when neither the caller, the network, nor a registered size gives one: no guidance, one step.
DEFAULT_SAMPLING = {"omega": 1.0, "t_min": 0.0, "t_max": 1.0, "num_steps": 1}
# FID-50K / IS of the released sizes, 1 NFE, class-conditional ImageNet (paper Tab. 6: 256 px, Tab. 7: 512 px), at
# the registered omega and interval. Shown in the model card of an imported official checkpoint.
PAPER_FID = {
    "pMF-B/16": (3.12, 254.6, "Tab. 6"), "pMF-L/16": (2.52, 262.6, "Tab. 6"), "pMF-H/16": (2.22, 268.8, "Tab. 6"),
    "pMF-B/32": (3.70, 271.9, "Tab. 7"), "pMF-L/32": (2.75, 276.8, "Tab. 7"), "pMF-H/32": (2.48, 284.9, "Tab. 7"),
}
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]$")  # owner/name, as the Hub spells them


class HubUnavailableError(FileNotFoundError):
    """A Hub repo id that cannot be downloaded now (offline, or no network)."""


def is_network_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder in this layout (both files present; their contents are checked on load)."""
    p = Path(path)
    return (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file()


# ----------------------------------------------------------------------------------------------------------------
# Writing


def write_folder(folder: str | os.PathLike, model_kwargs: dict, meta: dict, state: dict) -> Path:
    """Write the three files into ``folder``, each atomically (weights first: a kill between two writes leaves the
    old config beside new weights of the same architecture, never a config without its weights)."""
    config = {"_class_name": "PMFDiT", "pmf_format_version": FORMAT_VERSION, "model_kwargs": model_kwargs,
              "meta": meta}
    try:
        config_text = json.dumps(config, indent=2)
    except TypeError as e:
        raise TypeError(f"the constructor kwargs and meta must be JSON-serialisable: {e}") from None
    from safetensors.torch import save_file

    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    atomic_write_text(folder / CONFIG_NAME, config_text + "\n")
    atomic_write_text(folder / CARD_NAME, model_card(config, sum(v.numel() for v in state.values())))
    return folder


def _fmt(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def model_card(config: dict, n_params: int) -> str:
    """README.md for a saved network: what it is, the paper, where the weights came from, how to sample, FID."""
    kw, meta = config["model_kwargs"], config["meta"]
    name = meta.get("model") or "a pMF network"
    res, channels, classes = kw.get("input_size", 256), kw.get("in_channels", 3), kw.get("num_classes", 1000)
    source = meta.get("source")
    if meta.get("imported_from_official"):
        origin = (f"Imported from the authors' official PyTorch checkpoint `{source}` ({OFFICIAL_CODE_URL}) with "
                  "`pmf import-official`: every key mapped and shape-checked, RoPE buffer verified, strict load.")
    elif source:
        origin = f"Trained with pmf: {source}."
    else:
        origin = "Saved with pmf's `save_pretrained`."
    fid = PAPER_FID.get(meta.get("model")) if meta.get("imported_from_official") else None
    if fid:
        evaluation = (f"FID-50K {fid[0]}, IS {fid[1]} (1 NFE, class-conditional ImageNet {res}x{res}, paper "
                      f"{fid[2]}; the authors' evaluation with the sampling defaults above).")
    elif meta.get("fid") is not None:
        evaluation = f"FID {meta['fid']} ({meta.get('fid_reference', 'reference statistics not recorded')})."
    else:
        evaluation = "Not measured for these weights."
    args = ", ".join(f"{k}={_fmt(v)}" for k, v in kw.items())
    return f"""---
tags:
- pixel-meanflow
- meanflow
- image-generation
- class-conditional
- one-step
---

# {name}

A **pixel MeanFlow (pMF)** network: a one-step, latent-free, class-conditional image generator that works directly
in pixels ({res}x{res}, {channels} channel(s), {classes} classes; {n_params / 1e6:.2f}M parameters). The network
predicts a clean image x; one step from noise z_1 to an image is `x = z_1 - u(z_1, 0, 1)` with the average velocity
u = (z_t - x) / t, and classifier-free guidance is a network input (scale omega, interval [t_min, t_max]), so one
image costs one network evaluation.

- Paper: Lu et al. 2026, *One-step Latent-free Image Generation with Pixel Mean Flows*, [{PAPER_URL}]({PAPER_URL})
- Official code: {OFFICIAL_CODE_URL}
- Weights: {origin}

## Sampling defaults

| noise scale s (z_1 = s n) | omega | t_min | t_max | steps |
|---|---|---|---|---|
| {_fmt(meta["noise_scale"])} | {_fmt(meta["omega"])} | {_fmt(meta["t_min"])} | {_fmt(meta["t_max"])} | \
{meta["num_steps"]} |

## Usage

```python
from pmf import PMFDiT
from pmf.io.pipelines import PMFPipeline  # pip install 'pixel-meanflow[diffusers]'
pipe = PMFPipeline(transformer=PMFDiT.from_pretrained("THIS_REPO_OR_FOLDER"))
images = pipe(class_labels=[0, 1, 2]).images  # PIL images, with the sampling defaults above
```

or `pmf sample --checkpoint THIS_REPO_OR_FOLDER --out grid.png`.

## Evaluation

{evaluation}

## Architecture

`PMFDiT({args})`; `config.json` holds these constructor arguments and the sampling defaults
(format version {config["pmf_format_version"]}).
"""


# ----------------------------------------------------------------------------------------------------------------
# Reading


def _unavailable(repo_id: str, why: str, cache_dir) -> HubUnavailableError:
    from huggingface_hub import constants

    cache = cache_dir if cache_dir is not None else constants.HF_HUB_CACHE
    return HubUnavailableError(
        f"{repo_id!r} is not a local path, so it was taken as a Hugging Face Hub repo id, and it cannot be downloaded: "
        f"{why}. It is not in the Hugging Face cache ({cache}). Fix: go online (unset HF_HUB_OFFLINE=1 if it is set), "
        f"or download it on another machine ('hf download {repo_id} --local-dir DIR', or {CONFIG_NAME} and "
        f"{WEIGHTS_NAME} from https://huggingface.co/{repo_id}) and pass the folder DIR instead of the repo id.")


def resolve_folder(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                   revision: str | None = None, token: str | None = None) -> Path:
    """A local folder as is; otherwise ``owner/name`` is downloaded from the Hub (or found in its cache)."""
    path = Path(name_or_path)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} is a file: from_pretrained wants the folder holding {CONFIG_NAME} and "
                             f"{WEIGHTS_NAME}")
        return path
    repo_id = str(name_or_path)
    if not _REPO_ID_RE.match(repo_id) or repo_id.endswith((".pt", ".pth", ".safetensors", ".json")):
        raise FileNotFoundError(f"{repo_id} does not exist and is not a Hugging Face Hub repo id (owner/name)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError

    # read now, not when huggingface_hub was imported: HF_HUB_OFFLINE may be set after that
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes",
                                                                                                   "on")
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token,
                                   local_files_only=offline, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"Hugging Face Hub repo {repo_id!r} does not exist, or is private (pass a token / "
                                "run 'hf auth login')") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as e:  # OSError: connection failures
        why = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else f"the Hub could not be reached ({e})"
        raise _unavailable(repo_id, why, cache_dir) from None
    return Path(folder)


def read_config(folder: str | os.PathLike) -> dict:
    """The checked ``config.json`` of a network folder: this pmf's format version, ``model_kwargs`` and ``meta``
    objects."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {folder} is not a pmf network folder ({CONFIG_NAME} + "
                                f"{WEIGHTS_NAME}, written by save_pretrained)")
    config = read_json_object(path, "the network's config")
    if not {"model_kwargs", "pmf_format_version"} & set(config):
        raise ValueError(f"{path} is not a pmf config (no 'model_kwargs' / 'pmf_format_version'): was it written "
                         "by pmf's save_pretrained?")
    check_format_version(config.get("pmf_format_version"), path)
    if not isinstance(config.get("model_kwargs"), dict):
        raise ValueError(f"{path}: 'model_kwargs' must be a JSON object of PMFDiT arguments")
    if not isinstance(config.setdefault("meta", {}), dict):
        raise ValueError(f"{path}: 'meta' must be a JSON object, got {type(config['meta']).__name__}")
    return config
