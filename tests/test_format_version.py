"""One format version (pmf.io.export.FORMAT_VERSION) for what pmf writes: exports, Hugging Face folders, training
states (those: tests/test_checkpoint.py). New files carry it; a file of any other version, or without one, is refused
with one line naming the file (a PmfError: exit status 2 from the CLI), never read in another meaning."""

import json

import pytest
import torch
from safetensors.torch import save_file

from pmf.errors import PmfError
from pmf.io.export import FORMAT_VERSION, UnsupportedFormat, export_model, load_exported
from pmf.method.model import MODELS, PMFDiT

TINY_KW = {**MODELS["pMF-tiny"].kwargs, "v_head": False}


def _perturbed(**kw) -> PMFDiT:
    torch.manual_seed(0)
    net = PMFDiT(**kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net.eval()


def _outputs(net):
    g = torch.Generator().manual_seed(1)
    B = 3
    t = torch.rand(B, generator=g)
    with torch.no_grad():
        u, _ = net(torch.randn(B, 1, 8, 8, generator=g), t, t * torch.rand(B, generator=g), torch.full((B,), 2.0),
                   torch.full((B,), 0.1), torch.full((B,), 0.9), torch.tensor([0, 1, 3]))
    assert u.abs().max() > 0
    return u


def test_new_exports_carry_the_version_and_round_trip(tmp_path):
    net = _perturbed(**TINY_KW, num_interval_tokens=3)
    export_model(net, tmp_path, {**TINY_KW, "num_interval_tokens": 3})
    assert json.loads((tmp_path / "model.json").read_text())["format_version"] == FORMAT_VERSION
    loaded, _ = load_exported(tmp_path)
    assert tuple(loaded.t_max_tokens.shape) == (1, 3, 32)
    assert torch.equal(_outputs(loaded), _outputs(net))


@pytest.mark.parametrize("where", ["json", "safetensors header"])
@pytest.mark.parametrize("version", [None, 1, FORMAT_VERSION + 1])
def test_exports_of_another_version_are_refused(tmp_path, where, version):
    """An export whose JSON (or, with the .json gone, the weights' header) has no or another format_version."""
    net = _perturbed(**TINY_KW)
    config = {"model_kwargs": TINY_KW, "meta": {}} | ({} if version is None else {"format_version": version})
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "model.safetensors",
              metadata={"pmf_config": json.dumps(config)})
    if where == "json":
        (tmp_path / "model.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedFormat) as e:
        load_exported(tmp_path)
    msg = str(e.value)
    assert isinstance(e.value, PmfError) and "\n" not in msg
    assert ("model.json" if where == "json" else "model.safetensors") in msg
    assert ("no format_version" if version is None else f"format_version {version}") in msg
    assert f"reads only version {FORMAT_VERSION}" in msg
