"""The one network layout (pmf.method.pretrained: PMFDiT.save_pretrained / from_pretrained) and the CLI's checkpoint
forms. Offline, local folders only: a Hub repo id is tested
only for its offline error. Truth: the network that was saved (bit-identical outputs after a round trip),
``load_official`` for imported weights, and PMFDiT's own signature for the recorded kwargs."""

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pmf.cli import main
from pmf.cli.session import load_net
from pmf.io.convert import load_official, ours_to_official
from pmf.errors import PmfError
from pmf.method.model import MODELS, PMFDiT, build_model
from pmf.method.pretrained import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, HubUnavailableError, model_card
from pmf.util.format_version import FORMAT_VERSION

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = "pMF-tiny"


def tiny_net(v_head: bool = False, seed: int = 0, **overrides) -> PMFDiT:
    """pMF-tiny with every parameter perturbed, so the zero-init gates and final layers do not hide a lost weight."""
    torch.manual_seed(seed)
    net = build_model(TINY, v_head=v_head, **overrides)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net.eval()


def outputs(net):
    g = torch.Generator().manual_seed(1)
    B = 3
    t = torch.rand(B, generator=g)
    with torch.no_grad():
        return net(torch.randn(B, 1, 8, 8, generator=g), t, t * torch.rand(B, generator=g),
                   1 + 2 * torch.rand(B, generator=g), torch.full((B,), 0.1), torch.full((B,), 0.9),
                   torch.tensor([0, 2, 3]))


def assert_same_files(a: Path, b: Path):
    """Same file names, same config and card bytes, same tensors and header metadata in the weights (the header's
    key order is not fixed by safetensors, so its bytes may differ)."""
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for name in (CONFIG_NAME, CARD_NAME):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    (wa, ma), (wb, mb) = ((load_file(d / WEIGHTS_NAME), safe_open(d / WEIGHTS_NAME, "pt").metadata()) for d in (a, b))
    assert ma == mb and list(wa) == list(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


def assert_same_network(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    (ua, va), (ub, vb) = outputs(a), outputs(b)
    assert ua.abs().max() > 0 and torch.equal(ua, ub)
    assert (va is None) == (vb is None) and (va is None or torch.equal(va, vb))


# ----------------------------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained


@pytest.mark.parametrize("v_head", [False, True])
def test_save_load_gives_identical_outputs(tmp_path, v_head):
    net = tiny_net(v_head)
    net.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [CARD_NAME, CONFIG_NAME, WEIGHTS_NAME]
    loaded = PMFDiT.from_pretrained(tmp_path / "m")
    assert type(loaded) is PMFDiT and not loaded.training and loaded.has_v_head == v_head
    assert_same_network(net, loaded)
    loaded.save_pretrained(tmp_path / "again")  # a re-save writes the same files
    assert_same_files(tmp_path / "m", tmp_path / "again")


def test_recorded_kwargs_are_exactly_the_constructor_arguments():
    """Positional, keyword and default arguments alike, with None kept None (bottleneck_dim), against the
    signature's own binding; so config.json rebuilds the network whatever the running version's defaults are."""
    sig = inspect.signature(PMFDiT)
    args, kwargs = (8, 2, 1, 32), dict(depth=3, num_heads=2, num_classes=3, aux_head_depth=1, num_time_tokens=2)
    net = PMFDiT(*args, **kwargs)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    assert net.init_kwargs == dict(bound.arguments)
    assert net.init_kwargs["bottleneck_dim"] is None and list(net.init_kwargs) == list(sig.parameters)


def test_config_and_model_card_contents(tmp_path):
    net = tiny_net(omega_max=5.0)
    net.save_pretrained(tmp_path, meta={"model": TINY, "source": "run 'demo', weights 'ema_hl500'", "omega": 1.5})
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert set(config) == {"_class_name", "pmf_format_version", "model_kwargs", "meta"}
    assert config["_class_name"] == "PMFDiT" and config["pmf_format_version"] == FORMAT_VERSION
    assert config["model_kwargs"] == net.init_kwargs and set(config["model_kwargs"]) == set(
        inspect.signature(PMFDiT).parameters)  # every architecture kwarg, nothing else
    assert config["model_kwargs"]["omega_max"] == 5.0 and config["model_kwargs"]["v_head"] is False
    spec = MODELS[TINY]  # registered defaults, overridden by what the caller gave
    assert config["meta"] == {"noise_scale": spec.noise_scale, "omega": 1.5, "t_min": spec.t_min, "t_max": spec.t_max,
                              "num_steps": 1, "model": TINY, "source": "run 'demo', weights 'ema_hl500'"}
    card = (tmp_path / CARD_NAME).read_text()
    assert card.startswith("---\ntags:") and "# pMF-tiny" in card
    assert "arxiv.org/abs/2601.22158" in card and "Pixel Mean Flows" in card
    assert "Trained with pmf: run 'demo', weights 'ema_hl500'." in card
    assert "| 1 | 1.5 | 0 | 1 | 1 |" in card  # noise scale, omega, t_min, t_max, steps
    assert "Not measured" in card
    n_params = sum(p.numel() for p in net.parameters())
    assert f"{n_params / 1e6:.2f}M parameters" in card and "omega_max=5" in card


def test_model_card_of_imported_official_weights_quotes_the_paper_fid():
    spec = MODELS["pMF-B/16"]
    meta = {"model": "pMF-B/16", "noise_scale": spec.noise_scale, "omega": spec.omega, "t_min": spec.t_min,
            "t_max": spec.t_max, "num_steps": 1, "source": "pMF-B-16.pt", "imported_from_official": True}
    card = model_card({"model_kwargs": spec.kwargs, "meta": meta, "pmf_format_version": 1}, 118_000_000)
    assert "FID-50K 3.12, IS 254.6" in card and "Tab. 6" in card and "ImageNet 256x256" in card
    assert "official PyTorch checkpoint `pMF-B-16.pt`" in card and "| 1 | 8.5 | 0.1 | 0.7 | 1 |" in card


def test_other_formats_and_foreign_folders_are_refused(tmp_path):
    tiny_net().save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    for version in (FORMAT_VERSION - 1, FORMAT_VERSION + 1):
        (tmp_path / "m" / CONFIG_NAME).write_text(json.dumps({**cfg, "pmf_format_version": version}))
        with pytest.raises(ValueError, match=f"format_version {version}; this pmf reads only version {FORMAT_VERSION}"):
            PMFDiT.from_pretrained(tmp_path / "m")
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        PMFDiT.from_pretrained(tmp_path / "x")
    with pytest.raises(ValueError, match="is a file"):
        PMFDiT.from_pretrained(tmp_path / "m" / WEIGHTS_NAME)


# ----------------------------------------------------------------------------------------------------------------
# Hub repo ids


def test_hub_repo_id_offline_gives_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError) as e:
        PMFDiT.from_pretrained("someone/pmf-b16", cache_dir=tmp_path / "hf-cache")
    msg = str(e.value)
    for part in ("'someone/pmf-b16'", "HF_HUB_OFFLINE", str(tmp_path / "hf-cache"), "hf download someone/pmf-b16",
                 "https://huggingface.co/someone/pmf-b16", "pass the folder"):
        assert part in msg, part
    # the CLI prints the same message as one error line and exits 2
    assert main(["sample", "--checkpoint", "someone/pmf-b16", "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pmf sample: error: 'someone/pmf-b16' is not a local path") and "HF_HUB_OFFLINE" in err


def test_a_missing_path_is_not_taken_for_a_repo_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist and is not a Hugging Face Hub repo id"):
        PMFDiT.from_pretrained(str(tmp_path / "no" / "such" / "folder"))


def test_push_to_hub_uploads_the_saved_layout(tmp_path, monkeypatch):
    """huggingface_hub's HfApi replaced by a recorder: the upload is the save_pretrained folder, to the created
    repo. (No network.)"""
    import huggingface_hub

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["create"] = (repo_id, private, exist_ok)
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, repo_id, folder_path, **kw):
            shutil.copytree(folder_path, tmp_path / "uploaded")
            calls["upload"] = (repo_id, kw)
            return "commit-info"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    net = tiny_net()
    assert net.push_to_hub("me/pmf-tiny", meta={"model": TINY}, private=True, token="tok") == "commit-info"
    assert calls["token"] == "tok" and calls["create"] == ("me/pmf-tiny", True, True)
    repo_id, kw = calls["upload"]
    net.save_pretrained(tmp_path / "saved", meta={"model": TINY})
    assert repo_id == "me/pmf-tiny"
    assert_same_files(tmp_path / "uploaded", tmp_path / "saved")
    assert kw["commit_message"] == "Upload pMF model"


# ----------------------------------------------------------------------------------------------------------------
# CLI: import-official, export, and every --checkpoint form


def test_import_official_then_from_pretrained_equals_load_official(tmp_path):
    net = tiny_net(seed=3)
    src = tmp_path / "pMF-tiny.pt"
    torch.save({"model": ours_to_official(net.state_dict(), prefix="net.")}, src)  # official layout, nested
    assert main(["import-official", str(src), "--model", TINY, "--out", str(tmp_path / "hf")]) == 0
    assert_same_network(load_official(str(src), model=TINY), PMFDiT.from_pretrained(tmp_path / "hf"))
    assert_same_network(net, PMFDiT.from_pretrained(tmp_path / "hf"))
    meta = json.loads((tmp_path / "hf" / CONFIG_NAME).read_text())["meta"]
    assert meta["imported_from_official"] is True and meta["model"] == TINY and meta["omega"] == MODELS[TINY].omega


def fake_run(tmp_path: Path) -> tuple[Path, dict]:
    """A run directory as training leaves it: config.json naming the sampling EMA, export/ with two EMA copies."""
    run = tmp_path / "run"
    nets = {"ema_a": tiny_net(seed=1), "ema_b": tiny_net(seed=2)}
    meta = {"noise_scale": 1.0, "omega": 1.75, "t_min": 0.1, "t_max": 0.9, "kimg": 12.5, "model": TINY}
    for name, n in nets.items():
        n.save_pretrained(run / "export" / name, meta=meta)
    (run / "config.json").write_text(json.dumps({"sample": {"ema": "ema_a"}}))
    return run, nets


def test_export_writes_the_chosen_ema_of_a_run(tmp_path, capsys):
    run, nets = fake_run(tmp_path)
    assert main(["export", "--checkpoint", str(run), "--ema", "ema_b", "--out", str(tmp_path / "b")]) == 0
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "a")]) == 0  # the run's sample.ema
    assert "weights ema_b" in capsys.readouterr().out
    b = PMFDiT.from_pretrained(tmp_path / "b")
    meta = b.pretrained_meta
    assert_same_network(nets["ema_b"], b)
    assert_same_network(nets["ema_a"], PMFDiT.from_pretrained(tmp_path / "a"))
    assert meta["omega"] == 1.75 and meta["t_min"] == 0.1 and meta["ema"] == "ema_b" and meta["kimg"] == 12.5
    assert meta["source"] == "run 'run', weights 'ema_b' after 12.5 kimg"
    assert "weights 'ema_b' after 12.5 kimg" in (tmp_path / "b" / CARD_NAME).read_text()


def test_every_checkpoint_form_loads_the_same_network(tmp_path, monkeypatch):
    run, nets = fake_run(tmp_path)
    ref = nets["ema_b"]
    main(["export", "--checkpoint", str(run), "--ema", "ema_b", "--out", str(tmp_path / "hf")])
    forms = {"run dir": (str(run), "ema_b"), "folder of exports": (str(run / "export"), "ema_b"),
             "exported folder": (str(run / "export" / "ema_b"), None), "pmf export folder": (str(tmp_path / "hf"), None)}
    for form, (path, ema) in forms.items():
        net, meta = load_net(path, ema)
        assert_same_network(ref, net)
        assert meta["noise_scale"] == 1.0 and meta["omega"] == 1.75, form
    assert load_net(str(run))[1]["ema"] == "ema_a"  # the run's sample.ema
    with pytest.raises(PmfError, match="--ema ema_c: .* holds ema_a, ema_b"):
        load_net(str(run), "ema_c")
    with pytest.raises(PmfError, match="holds one network"):
        load_net(str(tmp_path / "hf"), "ema_b")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError, match="HF_HUB_OFFLINE"):
        load_net("someone/not-downloaded-pmf")


def test_other_layouts_are_refused_in_one_line(tmp_path, capsys):
    """An official .pt (convert it first), and the single-file export of an earlier pmf (model.safetensors +
    model.json, no config.json) on its own or in a run's export/: one error line naming the fix, exit status 2."""
    official = tmp_path / "official.pt"
    torch.save(ours_to_official(tiny_net().state_dict(), prefix="net."), official)
    old = tmp_path / "run" / "export"
    old.mkdir(parents=True)
    for name in ("model.safetensors", "model.json"):
        (old / name).write_bytes(b"{}")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"sample": {"ema": "model"}}))
    for path, fix in ((official, "pmf import-official"), (old, "export it again with this pmf"),
                      (old / "model.safetensors", "export it again"), (tmp_path / "run", "export it again")):
        assert main(["sample", "--checkpoint", str(path), "--out", str(tmp_path / "g.png")]) == 2, path
        err = capsys.readouterr().err.strip()
        assert err.startswith("pmf sample: error: ") and fix in err and "\n" not in err, err


def test_local_layout_works_without_diffusers(tmp_path):
    """A fresh interpreter where diffusers cannot be imported: import pmf, save, load, the CLI resolution all work;
    pmf.io.pipelines fails with an error that names the extra to install."""
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "diffusers":
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import torch
from pmf import PMFDiT, build_model, load_checkpoint
net = build_model("pMF-tiny")
net.save_pretrained({str(tmp_path / 'm')!r})
assert PMFDiT.from_pretrained({str(tmp_path / 'm')!r}).state_dict().keys() == net.state_dict().keys()
assert load_checkpoint({str(tmp_path / 'm')!r})[0].state_dict().keys() == net.state_dict().keys()
try:
    import pmf.io.pipelines
except ImportError as e:
    assert "pixel-meanflow[diffusers]" in str(e), e
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                          os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
