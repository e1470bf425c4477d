"""Format versions of what pmf writes (pmf.export.FORMAT_VERSION): exports, training state and run directories
written before ``num_interval_tokens`` meant "per endpoint" (version 1: the total over t_min and t_max) keep loading
into the same network, with identical outputs."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pmf.export import FORMAT_VERSION, export_model, load_exported, upgrade_model_kwargs
from pmf.model import MODELS, PMFDiT
from pmf.train.checkpoint import load_latest, save_training_state
from pmf.train.config import load_config
from pmf.train.loop import train

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


def test_upgrade_model_kwargs():
    assert upgrade_model_kwargs({"num_interval_tokens": 4, "depth": 3}, 1) == {"num_interval_tokens": 2, "depth": 3}
    assert upgrade_model_kwargs({"depth": 3}, 1) == {"depth": 3}  # v1 default 4 total = v2 default 2 per endpoint
    assert upgrade_model_kwargs({"num_interval_tokens": 3}, 2) == {"num_interval_tokens": 3}
    with pytest.raises(ValueError, match="must be even"):
        upgrade_model_kwargs({"num_interval_tokens": 3}, 1)
    with pytest.raises(ValueError, match="newer pmf"):
        upgrade_model_kwargs({}, FORMAT_VERSION + 1)


@pytest.mark.parametrize("where", ["json", "safetensors header"])
@pytest.mark.parametrize("total", [4, 2])
def test_old_format_export_loads_into_the_per_endpoint_network(tmp_path, where, total):
    """A version-1 export written by hand (JSON without format_version, num_interval_tokens = the total) loads into
    the network with total/2 tokens per endpoint and gives bit-identical outputs; the same from the weights file's
    header when the .json is gone."""
    net = _perturbed(**TINY_KW, num_interval_tokens=total // 2)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    old_config = json.dumps({"model_kwargs": {**TINY_KW, "num_interval_tokens": total}, "meta": {"omega": 2.0}})
    save_file(state, tmp_path / "model.safetensors", metadata={"pmf_config": old_config})
    if where == "json":
        (tmp_path / "model.json").write_text(old_config)
    loaded, meta = load_exported(tmp_path)
    assert meta == {"omega": 2.0}
    assert tuple(loaded.t_min_tokens.shape) == (1, total // 2, 32) and loaded.num_prefix == 16 + total
    assert torch.equal(_outputs(loaded), _outputs(net))


def test_new_exports_carry_the_version_and_round_trip(tmp_path):
    net = _perturbed(**TINY_KW, num_interval_tokens=3)
    export_model(net, tmp_path, {**TINY_KW, "num_interval_tokens": 3})
    assert json.loads((tmp_path / "model.json").read_text())["format_version"] == FORMAT_VERSION
    loaded, _ = load_exported(tmp_path)
    assert tuple(loaded.t_max_tokens.shape) == (1, 3, 32)
    assert torch.equal(_outputs(loaded), _outputs(net))


def test_training_state_version(tmp_path):
    """New states carry format_version; a state file written without one reads as version 1."""
    save_training_state(tmp_path, {"x": torch.tensor(1.0)}, 1)
    assert load_latest(tmp_path)["format_version"] == FORMAT_VERSION
    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    torch.save({"x": torch.tensor(2.0), "step": 3}, old / "checkpoints" / "state-000000003.pt")
    assert load_latest(old)["format_version"] == 1


SMALL = ["train.batch_size=16", "train.sample_every_kimg=0", "train.log_every_kimg=0.016",
         "train.ckpt_every_kimg=1000", "train.ckpt_every_minutes=1000", "train.threads=1"]


@pytest.fixture
def _restore_threads():
    n = torch.get_num_threads()  # train() sets the process-wide thread count
    yield
    torch.set_num_threads(n)


def test_old_run_directory_resumes_with_its_old_command(tmp_path, _restore_threads):
    """A version-1 run dir (config and command say num_interval_tokens=2 in total; state without format_version)
    resumes when its command is rerun, and ends bit-identical to an uninterrupted run with 1 token per endpoint."""
    def cfg(tokens, kimg):
        return load_config("tiny-test", overrides=[*SMALL, f"train.total_kimg={kimg}", "model.overrides={hidden_size: "
                           f"32, depth: 2, num_heads: 2, aux_head_depth: 1, bottleneck_dim: 8, num_interval_tokens: "
                           f"{tokens}}}"])

    train(cfg(1, 0.064), tmp_path / "full", quiet=True)
    train(cfg(1, 0.032), tmp_path / "old", quiet=True)
    # age "old" to version 1: the total in its config, no version in its state
    config_path = tmp_path / "old" / "config.json"
    config = json.loads(config_path.read_text())
    config["model"]["overrides"]["num_interval_tokens"] = 2
    config_path.write_text(json.dumps(config))
    for path in (tmp_path / "old" / "checkpoints").glob("state-*.pt"):
        state = torch.load(path, weights_only=True)
        del state["format_version"]
        state.pop("sha256", None)  # written before versions, checksums and stored configs
        state.pop("config", None)
        torch.save(state, path)

    resumed = train(cfg(2, 0.064), tmp_path / "old", quiet=True)  # the old command, total 2
    assert resumed["step"] == 4
    a, b = load_latest(tmp_path / "full"), load_latest(tmp_path / "old")
    assert b["format_version"] == FORMAT_VERSION and tuple(b["net"]["t_min_tokens"].shape) == (1, 1, 32)
    for key in a["net"]:
        assert torch.equal(a["net"][key], b["net"][key]), key
    assert json.loads(config_path.read_text())["model"]["overrides"]["num_interval_tokens"] == 1  # now v2
    assert Path(tmp_path / "old" / "export").is_dir()
