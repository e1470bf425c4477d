"""Reading files a user hands pmf without running what is in them: pickles with ``weights_only``, YAML with
``safe_load``, JSON objects; a bad file is one :class:`UserFileError` line naming it and the fix (exit status 2,
:mod:`pmf.errors`)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

from pmf.errors import PmfError


class UserFileError(PmfError, ValueError):
    """A file given by the user that cannot be used as what it was given for."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load_torch_file(path, what: str, fix: str):
    """``torch.load(path, weights_only=True)`` on CPU; a pickle that would need code to load (weights_only refuses
    it), or a file that is no torch file at all, is a :class:`UserFileError` naming ``path`` as ``what`` and
    ``fix``."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserFileError(f"{path}: {what} holds objects that torch.load(weights_only=True) refuses to unpickle "
                            f"(only tensors, numbers, strings and containers of these are read; {_first_line(e)}); "
                            f"{fix}") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise UserFileError(f"{path}: {what} cannot be read as a PyTorch file ({type(e).__name__}: "
                            f"{_first_line(e)}); it is truncated or of another format: {fix}") from e


def load_yaml(text: str, where: str):
    """``yaml.safe_load(text)``; what safe_load refuses (``!!python/...`` tags) or cannot parse is a
    :class:`UserFileError` naming ``where`` (a file or ``--set KEY``)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        why = " ".join(str(e).split())
        raise UserFileError(f"{where} is not plain YAML data ({why}); write numbers, strings, lists and mappings "
                            "only (no !!python tags)") from e


def read_json_object(path, what: str) -> dict:
    """The JSON object in ``path``; a file that is not valid JSON or not an object is a :class:`UserFileError`
    naming it (never silently ignored)."""
    import json

    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserFileError(f"{path}: {what} is not UTF-8 text ({e.reason}); restore or re-export it") from e
    except ValueError as e:
        raise UserFileError(f"{path}: {what} is not valid JSON ({e}); restore or re-export it") from e
    if not isinstance(obj, dict):
        raise UserFileError(f"{path}: {what} holds a JSON {type(obj).__name__}, not an object; restore or re-export "
                            "it")
    return obj
