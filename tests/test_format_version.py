"""One format version (pmf.util.format_version.FORMAT_VERSION) for what pmf writes: network folders, training
states (those: tests/test_checkpoint.py). New files carry it; a file of any other version, or without one, is
refused with one line naming the file (a PmfError: exit status 2 from the CLI), never read in another meaning."""

import json

import pytest
import torch

from pmf.cli import main
from pmf.errors import PmfError
from pmf.method.model import MODELS, PMFDiT
from pmf.util.format_version import FORMAT_VERSION, UnsupportedFormat

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


def test_network_folders_carry_the_version_and_round_trip(tmp_path):
    net = _perturbed(**TINY_KW, num_interval_tokens=3)
    net.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["pmf_format_version"] == FORMAT_VERSION
    loaded = PMFDiT.from_pretrained(tmp_path)
    assert tuple(loaded.t_max_tokens.shape) == (1, 3, 32)
    assert torch.equal(_outputs(loaded), _outputs(net))


@pytest.mark.parametrize("version", [None, 1, FORMAT_VERSION + 1])
def test_network_folders_of_another_version_are_refused(tmp_path, version):
    """A config.json with no or another pmf_format_version: one line naming the file, from the library and the CLI."""
    _perturbed(**TINY_KW).save_pretrained(tmp_path / "net")
    config = json.loads((tmp_path / "net" / "config.json").read_text())
    config.pop("pmf_format_version")
    (tmp_path / "net" / "config.json").write_text(json.dumps(config | ({} if version is None else
                                                                        {"pmf_format_version": version})))
    with pytest.raises(UnsupportedFormat) as e:
        PMFDiT.from_pretrained(tmp_path / "net")
    msg = str(e.value)
    assert isinstance(e.value, PmfError) and "\n" not in msg and "config.json" in msg
    assert ("no format_version" if version is None else f"format_version {version}") in msg
    assert f"reads only version {FORMAT_VERSION}" in msg
    assert main(["sample", "--checkpoint", str(tmp_path / "net"), "--out", str(tmp_path / "g.png")]) == 2
