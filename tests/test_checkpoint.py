"""Persistence (pmf.train.checkpoint): atomic writes survive interruption, resume finds the newest readable state, and
exports round-trip a network exactly."""

import json
import os

import pytest
import torch

from pmf.method.model import MODELS, PMFDiT, build_model
from pmf.train.checkpoint import load_latest, open_latest, save_training_state
from pmf.util.format_version import UnsupportedFormat
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
    assert _names(tmp_path) == ["state-000000030", "state-000000040"]
    state = load_latest(tmp_path)
    assert state["step"] == 40 and torch.equal(state["w"], torch.full((2,), 40.0))


def test_a_nested_state_round_trips_with_its_types(tmp_path):
    """Tensors anywhere in nested dicts (int keys kept, as an optimizer's state has them), plain values, lists,
    bfloat16 and 0-d tensors: read back equal, and the trainer's form holds everything but the tensors."""
    state = {"net": {"w": torch.randn(5, 3), "b": torch.zeros(3, dtype=torch.bfloat16)},
             "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4)}, 1: {"n": 2}},
                           "param_groups": [{"params": [0, 1], "lr": 1e-3}]},
             "loader": {"nimg": 48, "seed": 0}, "config": "{}", "flag": True, "none": None}
    save_training_state(tmp_path, state, 3)
    got = load_latest(tmp_path)
    assert got.keys() == {*state, "step", "format_version"} and got["step"] == 3

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return a == b

    assert same(state, {k: got[k] for k in state})
    opened = open_latest(tmp_path)
    assert opened["loader"] == state["loader"] and opened["net"] == {"w": None, "b": None}
    assert opened["optimizer"]["state"][1] == {"n": 2} and opened.path == tmp_path / "checkpoints" / "state-000000003"


def test_save_removes_temporaries_of_crashed_writes(tmp_path):
    (tmp_path / "checkpoints" / ".state-000000005.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".state-000000005.tmp" / "__0_0.distcp").write_bytes(b"junk")
    save_training_state(tmp_path, {}, 7)
    assert _names(tmp_path) == ["state-000000007"]


def test_step_must_agree(tmp_path):
    with pytest.raises(ValueError, match="disagrees"):
        save_training_state(tmp_path, {"step": 3}, 4)


@pytest.mark.parametrize("damage", ["truncated data", "no manifest", "missing file"])
def test_load_latest_falls_back_past_a_damaged_newest(tmp_path, damage):
    """Cut short after the fact (disk fault, copy cut short), an unfinished write (no manifest: the manifest is
    written last), a file lost: the previous state is used."""
    save_training_state(tmp_path, {"x": torch.tensor(1.0)}, 1)
    newest = save_training_state(tmp_path, {"x": torch.tensor(2.0)}, 2)
    data = newest / "__0_0.distcp"
    if damage == "truncated data":
        data.write_bytes(data.read_bytes()[:50])
    else:
        (newest / ("pmf-state.json" if damage == "no manifest" else "__0_0.distcp")).unlink()
    with pytest.warns(UserWarning, match="state-000000002"):
        state = load_latest(tmp_path)
    assert state["step"] == 1 and state["x"].item() == 1.0


def test_load_latest_raises_when_nothing_is_readable(tmp_path):
    path = save_training_state(tmp_path, {}, 1)
    (path / "pmf-state.json").write_text("not a manifest")
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="no readable training state"):
        load_latest(tmp_path)


@pytest.mark.parametrize("case", ["single file", "other kind", "other version"])
def test_a_state_of_another_layout_is_refused_in_one_line(tmp_path, case):
    """Not skipped for an older state (of the same old layout) and not renamed aside as damaged: refused, with the
    way out."""
    save_training_state(tmp_path, {"x": torch.tensor(1.0)}, 1)
    ckpt = tmp_path / "checkpoints"
    if case == "single file":
        torch.save({"x": torch.tensor(2.0), "step": 2}, ckpt / "state-000000002.pt")
        name = "state-000000002.pt"
    else:
        path = save_training_state(tmp_path, {"x": torch.tensor(2.0)}, 2)
        manifest = json.loads((path / "pmf-state.json").read_text())
        manifest.update({"kind": "pmf-sharded-training-state"} if case == "other kind" else {"format_version": 1})
        (path / "pmf-state.json").write_text(json.dumps(manifest))
        name = "state-000000002"
    for load in (load_latest, open_latest):
        with pytest.raises(UnsupportedFormat, match=name) as e:
            load(tmp_path, set_aside=True)
        assert "\n" not in str(e.value) and "--restart" in str(e.value)
    assert sorted(os.listdir(ckpt)) == ["state-000000001", name]


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
