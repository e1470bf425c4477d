"""Files a user hands pmf, checked where they are read: a file that is not what its flag needs becomes one
:class:`UserFileError` line naming the file and the fix (exit status 2, :mod:`pmf.errors`), before any work.

- pickles (``.pt`` / ``.pth``: official checkpoints, Inception and perceptual weights) are read with
  ``torch.load(weights_only=True)``; what it refuses (code, foreign classes) is named, never unpickled
  (:func:`load_torch_file`);
- YAML (``--config``, ``--set``) is read with ``yaml.safe_load``; tags that would build Python objects are named
  (:func:`load_yaml`);
- sample archives are checked from their ``.npy`` header for the extractor's dtype, channels and size
  (:func:`check_sample_archive`);
- reference files are checked for the extractor's feature dimension before any feature is computed
  (:func:`check_reference_file`);
- the sampling defaults, model kwargs and weights of a checkpoint or export pass the checks the command-line flags
  pass (:func:`check_loaded_network`).
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from pmf.util.safe_load import UserFileError

# ----------------------------------------------------------------------------------------------------------------
# Sample archives and reference files: checked from their headers, before any feature is computed


def check_sample_archive(path, extractor: str, channels: tuple[int, ...], size: int | None) -> tuple[int, ...]:
    """(N, H, W, C) of the sample archive ``path`` (header only) if ``extractor`` can read it: uint8 images with C in
    ``channels`` and, when ``size`` is given, H = W = ``size``; else a :class:`UserFileError` naming the file."""
    from pmf.data.images import npz_sample_shape

    try:
        shape = npz_sample_shape(path)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise UserFileError(f"--samples {path} cannot be read as a sample archive ({type(e).__name__}: {msg}); "
                            "write one with `pmf sample --num N --out FILE.npz` (arr_0: uint8 N x H x W x C)") from e
    n, h, w, c = shape
    if c not in channels:
        raise UserFileError(f"--samples {path} holds {c}-channel images but the {extractor} extractor reads "
                            f"{' or '.join(map(str, channels))}-channel ones; use --extractor "
                            f"{'inception' if extractor == 'fmnist' else 'fmnist'} or samples of that model")
    if size is not None and (h, w) != (size, size):
        raise UserFileError(f"--samples {path} holds {h} x {w} images but the {extractor} extractor reads "
                            f"{size} x {size}; evaluate samples of a {size} px model")
    return shape


def _npz_member_shape(zf: zipfile.ZipFile, key: str, path) -> tuple[tuple[int, ...], np.dtype]:
    from pmf.data.images import _read_npy_header

    with zf.open(f"{key}.npy") as f:
        shape, _, dtype = _read_npy_header(f, path)
    return tuple(shape), dtype


def check_reference_file(path, feature_dim: int | None, extractor: str = "Inception", flag: str = "--ref-stats") -> None:
    """The reference .npz ``path`` can be read and its statistics (``mu``, ``sigma``, ``mu_s`` / ``sigma_s`` pairs)
    and ``features`` have the extractor's ``feature_dim`` (None: agree with each other), from the .npy headers alone
    (nothing is computed); else a :class:`UserFileError` naming the file. A reference of images only (``arr_0``)
    must hold uint8 images."""
    from pmf.data.images import npz_sample_shape

    path = Path(path)
    if not path.is_file():
        raise UserFileError(f"{flag} {path} not found: give reference statistics (`pmf ref-stats`, JiT's or ADM's "
                            ".npz) or an .npz of reference images (arr_0)")
    try:
        with zipfile.ZipFile(path) as zf:
            keys = {n.removesuffix(".npy") for n in zf.namelist()}
            shapes = {k: _npz_member_shape(zf, k, path) for k in ("mu", "sigma", "mu_s", "sigma_s", "features")
                      if k in keys}
        if "mu" not in shapes and not keys & {"arr_0", "images"}:
            raise KeyError(f"it holds {sorted(keys)}: neither statistics (mu, sigma) nor images (arr_0)")
        if "mu" not in shapes:
            npz_sample_shape(path)  # uint8 images of 1 or 3 channels
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise UserFileError(f"{flag} {path} cannot be read ({type(e).__name__}: {msg}); recompute it with "
                            "`pmf ref-stats` or fetch it again") from e
    fix = f"use statistics of the {extractor} features (`pmf ref-stats`)"
    if feature_dim is None:
        feature_dim = shapes["mu"][0][0] if "mu" in shapes and len(shapes["mu"][0]) == 1 else None
    if feature_dim is None:
        return
    if "mu" in shapes:
        (mu, _), (sigma, _) = shapes["mu"], shapes.get("sigma", ((), None))
        if len(mu) != 1 or mu[0] != feature_dim:
            raise UserFileError(f"{flag} {path} holds {'x'.join(map(str, mu))}-dimensional statistics but the "
                                f"{extractor} extractor's features are {feature_dim}-dimensional; {fix}")
        if sigma != (feature_dim, feature_dim):
            raise UserFileError(f"{flag} {path}: sigma is {sigma}, not ({feature_dim}, {feature_dim}) as mu needs; "
                                f"{fix}")
    if "mu_s" in shapes and (len(shapes["mu_s"][0]) != 1 or shapes.get("sigma_s", ((),))[0] != shapes["mu_s"][0] * 2):
        raise UserFileError(f"{flag} {path}: mu_s {shapes['mu_s'][0]} and sigma_s "
                            f"{shapes.get('sigma_s', ((),))[0]} do not fit together; {fix}")
    if "features" in shapes and (len(shapes["features"][0]) != 2 or shapes["features"][0][1] != feature_dim):
        raise UserFileError(f"{flag} {path} holds features {shapes['features'][0]} but the {extractor} extractor's are "
                            f"{feature_dim}-dimensional; {fix}")


# ----------------------------------------------------------------------------------------------------------------
# Outputs that grow with --num: refused before work when the disk cannot hold them


def format_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def check_free_space(path, need: int, what: str, flag: str = "--out") -> None:
    """A :class:`UserFileError` unless the filesystem that will hold ``path`` has ``need`` bytes free (an existing
    file at ``path`` counts as free: it is replaced)."""
    import os
    import shutil

    path = Path(path).absolute()
    probe = path.parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return  # not a filesystem we can ask; the write itself reports a full disk
    if path.is_file():
        free += os.stat(path).st_size
    if need > free:
        raise UserFileError(f"{flag} {path}: {what} need {format_bytes(need)} but {format_bytes(free)} are free on "
                            f"{probe}; lower --num, free space, or choose another {flag}")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_evaluation_memory(n: int, feature_dim: int) -> None:
    """Evaluating ``n`` samples keeps their pool features (float32, precision / recall) and Inception-Score split
    indices (int64, a few per sample): refused before work when that cannot fit in the available memory."""
    need = int(n) * (4 * int(feature_dim) + 4 * 8)
    avail = available_memory()
    if avail is not None and need > avail:
        raise UserFileError(f"evaluating {n:,} samples needs {format_bytes(need)} of memory (their {feature_dim}-d "
                            f"features for precision / recall, Inception-Score splits) but {format_bytes(avail)} are "
                            "available; evaluate fewer with --num")


# ----------------------------------------------------------------------------------------------------------------
# What a checkpoint or an export says about itself


def sampling_default_problems(meta: dict, where: str) -> list[str]:
    """Problems of the stored sampling defaults in ``meta`` (``noise_scale``, ``omega``, ``t_min`` / ``t_max``,
    ``num_steps``), by the rules of the command-line flags (:func:`pmf.method.sampler.sampling_problems`); each
    names ``where``."""
    from pmf.method.sampler import sampling_problems

    def num(key):
        v = meta.get(key)
        if isinstance(v, str):  # JSON has no NaN literal; a string "NaN" is what an edited file holds
            try:
                v = float(v)
            except ValueError:
                pass
        return v

    problems = sampling_problems(num("omega"), num("t_min"), num("t_max"), prefix="meta.")
    steps = meta.get("num_steps")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        problems.append(f"meta.num_steps={steps!r} must be an integer >= 1")
    s = num("noise_scale")
    if "noise_scale" in meta and not (isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
                                      and s > 0):
        problems.append(f"meta.noise_scale={meta['noise_scale']!r} must be a positive number")
    return [f"{where}: {p}" for p in dict.fromkeys(problems)]


def model_kwargs_problems(kwargs, where: str) -> list[str]:
    """Problems of stored PMFDiT constructor kwargs: a mapping of known arguments, positive integer sizes."""
    from pmf.method.model import pmfdit_kwargs

    if not isinstance(kwargs, dict):
        return [f"{where}: model_kwargs must be a mapping of PMFDiT arguments, got {type(kwargs).__name__}"]
    known = pmfdit_kwargs()
    problems = [f"{where}: unknown PMFDiT argument {k!r} in model_kwargs" for k in sorted(kwargs) if k not in known]
    for k in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
        v = kwargs.get(k)
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            problems.append(f"{where}: model_kwargs.{k}={v!r} must be a positive integer")
    return problems


def check_model_kwargs(kwargs, where: str) -> None:
    """Raise :class:`UserFileError` listing :func:`model_kwargs_problems`, before a network is built from them."""
    if problems := model_kwargs_problems(kwargs, where):
        raise UserFileError("; ".join(problems) + "; restore the file or re-export the network")


def nonfinite_weights(net) -> list[str]:
    """Names of the parameters and buffers of ``net`` holding NaN or infinity (floating-point ones)."""
    import torch

    return [name for name, t in (*net.named_parameters(), *net.named_buffers())
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_loaded_network(net, meta: dict, where: str) -> None:
    """A network and the sampling defaults read from ``where`` (a checkpoint or an export): the defaults by the
    flags' rules, the weights finite; else one :class:`UserFileError` listing every problem."""
    problems = sampling_default_problems(meta or {}, where)
    bad = nonfinite_weights(net)
    if bad:
        problems.append(f"{where}: {len(bad)} weight tensor(s) hold NaN or infinity ({', '.join(bad[:3])}"
                        f"{', ...' if len(bad) > 3 else ''}): the weights are ruined; use an earlier checkpoint or "
                        "another --ema copy")
    if problems:
        raise UserFileError("; ".join(problems) + ("" if bad else "; fix the file's meta, or override with "
                                                   "--omega / --interval / --steps, or re-export it"))


