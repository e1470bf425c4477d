"""Persistence (pmf.train.checkpoint): atomic writes survive interruption, resume finds the newest readable state, and
exports round-trip a network exactly."""

import os

import pytest
import torch

from pmf.method.model import MODELS, PMFDiT, build_model
from pmf.train.checkpoint import load_latest, save_training_state
from pmf.util.atomic import atomic_save, atomic_write_text

TINY = "pMF-tiny"


def tiny_net(v_head: bool = True, seed: int = 0):
    """pMF-tiny with every parameter perturbed (the zero-init gates / final layers would make outputs trivial)."""
    torch.manual_seed(seed)
    net = build_model(TINY, v_head=v_head)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net.eval()


def tiny_kwargs(v_head: bool = True) -> dict:
    spec = MODELS[TINY]
    return {"noise_scale": spec.noise_scale, **spec.kwargs, "v_head": v_head}


def outputs(net):
    g = torch.Generator().manual_seed(1)
    t = torch.rand(3, generator=g)
    with torch.no_grad():
        return net(torch.randn(3, 1, 8, 8, generator=g), t, 0.5 * t, torch.full((3,), 2.0), torch.zeros(3),
                   torch.ones(3), torch.tensor([0, 1, 3]))


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes


def test_atomic_save_round_trip_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "x.pt"  # the directory is created
    atomic_save({"a": torch.arange(3)}, path)
    atomic_save({"a": torch.arange(4)}, path)  # overwrite
    assert torch.equal(torch.load(path)["a"], torch.arange(4))
    assert os.listdir(path.parent) == ["x.pt"]


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    atomic_save({"v": 1}, path)

    def dying_save(obj, f, *a, **k):  # write half a file, then "crash"
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"v": 1}
    assert os.listdir(tmp_path) == ["x.pt"]


def test_atomic_write_text(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two ✓")
    assert path.read_text(encoding="utf-8") == "two ✓"
    assert os.listdir(tmp_path) == ["a.json"]


# ----------------------------------------------------------------------------------------------------------------
# Training state


def _names(run_dir):
    return sorted(os.listdir(run_dir / "checkpoints"))


def test_save_prunes_to_keep_and_load_latest_returns_newest(tmp_path):
    assert load_latest(tmp_path) is None  # nothing yet
    for step in (10, 20, 30, 40):
        save_training_state(tmp_path, {"w": torch.full((2,), float(step))}, step, keep=2)
    assert _names(tmp_path) == ["state-000000030.pt", "state-000000040.pt"]
    state = load_latest(tmp_path)
    assert state["step"] == 40 and torch.equal(state["w"], torch.full((2,), 40.0))


def test_save_removes_stale_temp_files(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".state-000000005.pt.123.abcd.tmp").write_bytes(b"junk")
    save_training_state(tmp_path, {}, 7)
    assert _names(tmp_path) == ["state-000000007.pt"]


def test_step_must_agree(tmp_path):
    with pytest.raises(ValueError, match="disagrees"):
        save_training_state(tmp_path, {"step": 3}, 4)


def test_load_latest_falls_back_past_a_corrupt_newest(tmp_path):
    save_training_state(tmp_path, {"x": torch.tensor(1.0)}, 1)
    newest = save_training_state(tmp_path, {"x": torch.tensor(2.0)}, 2)
    newest.write_bytes(newest.read_bytes()[:50])  # truncated after the fact (disk fault, copy cut short)
    with pytest.warns(UserWarning, match="state-000000002.pt"):
        state = load_latest(tmp_path)
    assert state["step"] == 1 and state["x"].item() == 1.0


def test_load_latest_raises_when_nothing_is_readable(tmp_path):
    path = save_training_state(tmp_path, {}, 1)
    path.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="no readable training state"):
        load_latest(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Exports


def test_from_pretrained_overrides_kwargs_that_keep_the_shapes(tmp_path):
    net = tiny_net()
    net.save_pretrained(tmp_path)
    loaded = PMFDiT.from_pretrained(tmp_path, attn_backend="math")
    assert loaded.shared_blocks[0].attn.backend == "math" and loaded.init_kwargs["attn_backend"] == "math"
    assert torch.allclose(outputs(net)[0], outputs(loaded)[0], atol=1e-5)


def test_save_refuses_kwargs_json_cannot_hold_and_writes_nothing(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        PMFDiT(**{**tiny_kwargs(), "noise_scale": torch.tensor(1.0)}).save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists() or os.listdir(tmp_path / "m") == []
