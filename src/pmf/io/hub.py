"""Hugging Face model layout for :class:`pmf.method.model.PMFDiT`: ``save_pretrained`` / ``from_pretrained`` /
``push_to_hub``.

A saved network is a folder of three files, the layout the Hugging Face Hub shows and downloads:

    config.json         {"_class_name", "pmf_format_version", "model_kwargs", "meta"}
    model.safetensors   the state dict; its header repeats {"model_kwargs", "meta"} under "pmf_config"
    README.md           the model card

``model_kwargs`` are exactly the constructor kwargs the network was built with (recorded by PMFDiT itself, see the
end of :mod:`pmf.method.model`), so ``PMFDiT(**model_kwargs)`` rebuilds it whatever the defaults of the running version.
``meta`` holds the sampling defaults (``noise_scale``: the scale s of z_1 = s * n [pMF section 6]; ``omega``, ``t_min``,
``t_max``: guidance scale and interval, network inputs [pMF section 4.3]; ``num_steps``) and the provenance
(``model``, ``source``, ...). The header copy keeps the weights file self-describing, and lets
:func:`pmf.io.export.load_exported` read the folder too.

Importing :mod:`pmf` imports this module, which attaches the three functions to PMFDiT as methods, so
``PMFDiT.from_pretrained(...)`` works without importing anything else. huggingface_hub is needed only for repo
ids and ``push_to_hub`` (optional extra ``pixel-meanflow[hub]``); local folders need only safetensors.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pmf.util.atomic import atomic_path, atomic_write_text
# one format version for exports and this layout
from pmf.io.export import FORMAT_VERSION, _fit_problems, _unwrap, check_format_version
from pmf.io.userfiles import check_model_kwargs
from pmf.method.model import MODELS, PMFDiT
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
    """A Hub repo id that cannot be downloaded now (offline, no network, or no huggingface_hub)."""


# ----------------------------------------------------------------------------------------------------------------
# Saving


def model_kwargs_of(net: torch.nn.Module) -> dict:
    """The constructor kwargs ``net`` was built with (DDP / torch.compile wrappers looked through)."""
    net = _unwrap(net)
    kwargs = getattr(net, "init_kwargs", None)
    if not isinstance(net, PMFDiT) or kwargs is None:
        raise TypeError(f"expected a PMFDiT (built by pmf.method.model), got {type(net).__name__}")
    return dict(kwargs)


def sampling_meta(net: torch.nn.Module, meta: dict | None = None) -> dict:
    """The ``meta`` a save writes: ``meta`` over what the network was loaded with (``pretrained_meta``) over the
    registered size's recommended settings (``meta["model"]`` in :data:`pmf.method.model.MODELS`) over
    :data:`DEFAULT_SAMPLING`; the noise scale defaults to the network's own."""
    net = _unwrap(net)
    merged = {**getattr(net, "pretrained_meta", {}), **(meta or {})}
    out = {"noise_scale": float(net.noise_scale), **DEFAULT_SAMPLING}
    if (spec := MODELS.get(merged.get("model"))) is not None:
        out.update(noise_scale=spec.noise_scale, omega=spec.omega, t_min=spec.t_min, t_max=spec.t_max)
    return {**out, **merged}


def save_pretrained(self: PMFDiT, save_directory: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``README.md`` into ``save_directory`` (each atomically).

    ``meta``: sampling defaults and provenance, merged over the defaults of :func:`sampling_meta` (e.g.
    ``{"model": "pMF-B/16", "source": "...", "omega": 7.5}``). Returns the folder.
    """
    net = _unwrap(self)
    kwargs = model_kwargs_of(net)
    config = {"_class_name": "PMFDiT", "pmf_format_version": FORMAT_VERSION, "model_kwargs": kwargs,
              "meta": sampling_meta(net, meta)}
    try:
        config_text = json.dumps(config, indent=2)
    except TypeError as e:
        raise TypeError(f"model kwargs and meta must be JSON-serialisable: {e}") from None
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    if problems := _fit_problems(kwargs, state):  # cannot happen for a PMFDiT unless its modules were edited
        raise ValueError("the recorded constructor kwargs do not describe this network:\n  " + "\n  ".join(problems))
    folder = Path(save_directory)
    header = json.dumps({"model_kwargs": kwargs, "meta": config["meta"], "pmf_format_version": FORMAT_VERSION,
                         "format_version": FORMAT_VERSION})  # the key pmf.io.export.load_exported reads
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(state, tmp, metadata={"format": "pt", "pmf_config": header})
    atomic_write_text(folder / CONFIG_NAME, config_text + "\n")
    n_params = sum(v.numel() for v in state.values())
    atomic_write_text(folder / CARD_NAME, model_card(config, n_params))
    return folder


def push_to_hub(self: PMFDiT, repo_id: str, meta: dict | None = None, private: bool | None = None,
                token: str | None = None, commit_message: str = "Upload pMF model", revision: str | None = None,
                create_pr: bool = False):
    """``save_pretrained`` into a temporary folder, then upload it to the Hub repo ``repo_id`` (created if missing)
    with huggingface_hub's ``HfApi.create_repo`` / ``upload_folder``. Returns upload_folder's commit info."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ImportError("push_to_hub needs huggingface_hub: pip install 'pixel-meanflow[hub]'") from None
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(self, tmp, meta)
        return api.upload_folder(repo_id=getattr(repo, "repo_id", repo_id), folder_path=tmp,
                                 commit_message=commit_message, revision=revision, create_pr=create_pr)


# ----------------------------------------------------------------------------------------------------------------
# The model card


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
from pmf.io.pipelines import PMFDiT, PMFPipeline  # pip install 'pixel-meanflow[diffusers]'
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
# Loading


def _hub_cache_dir(cache_dir) -> str:
    if cache_dir is not None:
        return str(cache_dir)
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
        return os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub"))


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _unavailable(repo_id: str, why: str, cache_dir) -> HubUnavailableError:
    return HubUnavailableError(
        f"{repo_id!r} is not a local path, so it was taken as a Hugging Face Hub repo id, and it cannot be downloaded: "
        f"{why}. It is not in the Hugging Face cache ({_hub_cache_dir(cache_dir)}). Fix: go online (unset "
        f"HF_HUB_OFFLINE=1 if it is set), or download it on another machine ('hf download {repo_id} --local-dir "
        f"DIR', or {CONFIG_NAME} and {WEIGHTS_NAME} from https://huggingface.co/{repo_id}) and pass the folder DIR "
        "instead of the repo id.")


def resolve_pretrained(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
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
    offline = _hub_offline()
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError
    except ImportError:
        if offline:
            raise _unavailable(repo_id, "offline mode is on (HF_HUB_OFFLINE=1) and huggingface_hub is not installed",
                               cache_dir) from None
        raise HubUnavailableError(f"{repo_id!r} is not a local path, so it was taken as a Hugging Face Hub repo id; "
                                  "downloading needs huggingface_hub: pip install 'pixel-meanflow[hub]'") from None
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
    """The checked ``config.json`` of a saved network."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {folder} is not a pmf model folder (save_pretrained layout)")
    config = read_json_object(path, "the model config")
    version = config.get("pmf_format_version")
    if not isinstance(config.get("model_kwargs"), dict) or version is None:
        raise ValueError(f"{path} is not a pmf config (no 'model_kwargs' / 'pmf_format_version'): was it written "
                         "by pmf's save_pretrained?")
    check_format_version(version, path)
    return config


def is_pretrained_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder in this layout (config.json with pmf's keys, and model.safetensors)."""
    p = Path(path)
    try:
        return (p / WEIGHTS_NAME).is_file() and "pmf_format_version" in json.loads(
            (p / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def load_pretrained(name_or_path: str | os.PathLike, cls: type = PMFDiT, cache_dir=None, revision=None, token=None,
                    **overrides) -> tuple[PMFDiT, dict]:
    """``(net in eval mode on CPU, meta)`` from a folder or a Hub repo id; ``overrides`` replace stored kwargs
    that do not change the weights' shapes (e.g. ``attn_backend="math"``). Strict load."""
    folder = resolve_pretrained(name_or_path, cache_dir, revision, token)
    config = read_config(folder)
    check_model_kwargs(config["model_kwargs"], str(Path(folder) / CONFIG_NAME))
    net = cls(**{**config["model_kwargs"], **overrides})
    net.load_state_dict(load_file(folder / WEIGHTS_NAME, device="cpu"), strict=True)
    net.pretrained_meta = dict(config.get("meta", {}))  # so a re-save keeps the sampling defaults and provenance
    return net.eval(), dict(net.pretrained_meta)


def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, cache_dir=None, revision=None,
                    token=None, **overrides) -> PMFDiT:
    """The network saved by ``save_pretrained`` in a local folder, or in a Hub repo ``owner/name`` (downloaded
    through huggingface_hub; offline, a clear error). In eval mode, on CPU; sampling defaults in
    ``net.pretrained_meta``."""
    return load_pretrained(pretrained_model_name_or_path, cls, cache_dir, revision, token, **overrides)[0]


PMFDiT.save_pretrained = save_pretrained
PMFDiT.from_pretrained = classmethod(from_pretrained)
PMFDiT.push_to_hub = push_to_hub
