"""Official JAX (Orbax) checkpoints: the fixture written by the authors' code (tests/fixtures/official_jax/README.md)
against pmf's reader, mapping, run import, continued training and export."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tensorstore", reason="the Orbax reader needs tensorstore: pip install 'pixel-meanflow[orbax]'")

from pmf.errors import PmfError  # noqa: E402
from pmf.io.orbax_io import read_tree, write_tree  # noqa: E402
from pmf.train.official_jax import split_tree  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "official_jax"
FULL, INFER = FIXTURE / "full", FIXTURE / "infer"
OFFICIAL_KWARGS = dict(input_size=8, patch_size=2, hidden_size=8, depth=3, num_heads=2, aux_head_depth=1,
                       num_classes=4)


@pytest.fixture(scope="module")
def outputs():
    return dict(np.load(FIXTURE / "outputs.npz"))


def _forward(net, o):
    """The official call on the fixture's inputs: NHWC in and out, our net takes NCHW."""
    f = lambda k: torch.from_numpy(o[k])  # noqa: E731
    with torch.no_grad():
        u, v = net(f("x").permute(0, 3, 1, 2), f("t"), f("h"), f("omega"), f("t_min"), f("t_max"), f("y").long())
    return u.permute(0, 2, 3, 1).numpy(), (None if v is None else v.permute(0, 2, 3, 1).numpy())


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _same_trees(a: dict, b: dict) -> list:
    """Keys whose leaves differ in presence, dtype, shape or any bit."""
    bad = sorted(set(a) ^ set(b))
    for k in set(a) & set(b):
        x, y = a[k], b[k]
        if (x is None) != (y is None) or (x is not None and (x.dtype != y.dtype or x.shape != y.shape
                                                              or x.tobytes() != y.tobytes())):
            bad.append(k)
    return bad


def _cfg(tmp_path, total_kimg=100.018):
    """A run config for the fixture's size on a tiny class-folder dataset made here (8x8 RGB, 4 classes)."""
    from PIL import Image

    from pmf.train.config import load_config

    rng = np.random.default_rng(0)
    for c in range(4):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "data" / f"c{c}" / f"{i}.png")
    overrides = {**OFFICIAL_KWARGS, "in_channels": 3, "bottleneck_dim": 128}
    return load_config("tiny-test", None, ["model.name=pMF-tiny", f"model.overrides={json.dumps(overrides)}",
                                           "data.dataset=imagefolder", f"data.path={tmp_path / 'data'}",
                                           "data.resolution=8", "train.ema=[hl500, hl1000, hl2000]",
                                           "sample.ema=ema_hl2000", "train.batch_size=8",
                                           f"train.total_kimg={total_kimg}", "train.ckpt_every_kimg=1000"])


def test_converted_network_reproduces_official_outputs(outputs):
    """params and every EMA copy of the official TrainState, in pmf's network, give the official forward's u and v
    (float32, 1e-5 relative to the largest output)."""
    from pmf.io.convert import load_official, ours_to_official

    state = split_tree(read_tree(FULL))
    assert state.step == int(outputs["step"]) == 100002
    assert list(state.emas) == ["ema_hl500", "ema_hl1000", "ema_hl2000"]
    copies = {"params": state.params, **{f"ema_{n[len('ema_hl'):]}": sd for n, sd in state.emas.items()}}
    for name, sd in copies.items():
        net = load_official(ours_to_official(sd), **OFFICIAL_KWARGS)
        u, v = _forward(net, outputs)
        assert _rel(u, outputs[f"u_{name}"]) < 1e-5, name
        assert _rel(v, outputs[f"v_{name}"]) < 1e-5, name
    assert _same_trees({k: v.numpy() for k, v in state.emas["ema_hl500"].items()},
                       {k: v.numpy() for k, v in state.emas["ema_hl2000"].items()})  # the copies differ


def test_reader_writer_round_trip_every_leaf(tmp_path):
    """write_tree(read_tree(x)) == x leaf for leaf, bit for bit, masked (None) leaves included, and _METADATA is the
    one orbax 0.6.4 wrote."""
    tree = read_tree(FULL)
    out = write_tree(tmp_path / "checkpoint_100002", tree)
    assert _same_trees(tree, read_tree(out)) == []
    assert json.loads((out / "_METADATA").read_text()) == json.loads((FULL / "checkpoint_100002" / "_METADATA")
                                                                      .read_text())


def test_import_export_round_trip_continue_two_steps(tmp_path):
    """Orbax -> pmf run directory -> Orbax gives every array back bit for bit (network, v-head, three EMAs, Adam and
    Muon moments, counts, step); the run continues two steps under `pmf train` from the official step; its export
    keeps the tree and moves the weights."""
    from pmf.train.loop import train
    from pmf.train.official_run import export_official, import_to_run

    cfg = _cfg(tmp_path)
    run = tmp_path / "run"
    notes = import_to_run(FULL, cfg, run, images_per_step=1)
    assert notes == []  # everything the run keeps is in the tree
    back = read_tree(export_official(run, tmp_path / "back"))
    official = read_tree(FULL)
    assert _same_trees(official, back) == []

    summary = train(_cfg(tmp_path), run, quiet=True)
    assert summary["stop_reason"] == "done" and summary["step"] == 100002 + 2
    later = read_tree(export_official(run, tmp_path / "later"))
    assert set(later) == set(official) and int(later[("step",)]) == 100004
    assert int(later[("opt_state", "inner_states", "adam", "inner_state", "0", "count")]) == 4
    key = ("params", "net", "shared_blocks_0", "attn", "q_proj", "_flax_linear", "kernel")
    assert later[key].shape == official[key].shape and not np.array_equal(later[key], official[key])


def test_inference_tree_exports_and_matches(tmp_path, outputs):
    """The eval-only tree (no v-head, sgd(0) state, one EMA) -> network folders; ema_hl2000 reproduces the official
    u, through `pmf sample`'s loader too."""
    from pmf.train.load import load_checkpoint
    from pmf.train.official_run import import_to_export

    import_to_export(INFER, tmp_path / "exp", None, OFFICIAL_KWARGS)
    net, meta = load_checkpoint(str(tmp_path / "exp"), "ema_hl2000")
    u, v = _forward(net, outputs)
    assert v is None and meta["step"] == 100002
    assert _rel(u, outputs["u_infer_ema_2000"]) < 1e-5


def test_zip_and_workdir_inputs(tmp_path):
    """A .zip of the checkpoint directory and the workdir holding checkpoint_<step>/ read as the directory itself;
    the unpacked copy is removed afterwards."""
    import shutil

    from pmf.train.init_from import read_official

    archive = shutil.make_archive(str(tmp_path / "ckpt"), "zip", FULL / "checkpoint_100002")
    a, b = read_official(archive), read_official(FULL)
    assert a.step == b.step and all(torch.equal(v, b.params[k]) for k, v in a.params.items())
    assert not list(Path(__import__("tempfile").gettempdir()).glob("pmf-orbax-unpacked-*"))


def test_init_from_loads_weights_and_emas(tmp_path):
    """--init-from on a new run: network (v-head included) and EMA copies are the checkpoint's, the optimizer fresh."""
    from pmf.train.loop import build_run, load_dataset
    from pmf.train.init_from import init_run_from

    cfg = _cfg(tmp_path, total_kimg=1)
    run = build_run(cfg, tmp_path / "new", torch.device("cpu"), load_dataset(cfg)[0], None)
    assert init_run_from(run, FULL) == []
    state = split_tree(read_tree(FULL))
    for k, v in state.params.items():
        assert torch.equal(run.net.state_dict()[k], v), k
    for name in run.ema.names:
        assert all(torch.equal(run.ema.shadow[name][k], v) for k, v in state.emas[name].items()), name
    assert len(run.opt.state) == 0 and run.nimg == 0


def test_wrong_size_and_missing_tensorstore_are_one_line(tmp_path, monkeypatch):
    from pmf.cli import main
    from pmf.train.official_run import import_to_export

    with pytest.raises(PmfError, match="does not fit the model"):
        import_to_export(FULL, tmp_path / "x", None, {**OFFICIAL_KWARGS, "hidden_size": 16})
    monkeypatch.setitem(sys.modules, "tensorstore", None)
    assert main(["import-official", str(FULL), "--model-kwargs", json.dumps(OFFICIAL_KWARGS),
                 "--out", str(tmp_path / "y")]) == 2
    with pytest.raises(PmfError, match=r"pip install 'pixel-meanflow\[orbax\]'"):
        read_tree(FULL)


def _orbax_python() -> str | None:
    """A Python with orbax-checkpoint (PMF_ORBAX_PYTHON, else this one when it has it)."""
    exe = os.environ.get("PMF_ORBAX_PYTHON")
    if exe:
        return exe
    try:
        import orbax.checkpoint  # noqa: F401
    except Exception:
        return None
    return sys.executable


def test_orbax_restores_pmf_export(tmp_path):
    """orbax-checkpoint (0.6.4, the official pin) restores what `pmf export --format official-jax` wrote, and the
    arrays equal the ones it restores from the official fixture."""
    exe = _orbax_python()
    if exe is None:
        pytest.skip("orbax-checkpoint is not installed here (it needs JAX); set PMF_ORBAX_PYTHON to a Python with "
                    "orbax-checkpoint==0.6.4 to run this check")
    out = write_tree(tmp_path / "checkpoint_100002", read_tree(FULL))
    code = f"""
import numpy as np, jax, orbax.checkpoint as ocp
a = ocp.PyTreeCheckpointer().restore({str(out)!r})
b = ocp.PyTreeCheckpointer().restore({str(FULL / 'checkpoint_100002')!r})
la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
assert [p for p, _ in la] == [p for p, _ in lb] and len(la) > 400
assert all(np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y) for (_, x), (_, y) in zip(la, lb))
from flax.training import checkpoints
assert sorted(checkpoints.restore_checkpoint({str(tmp_path)!r}, None)) == ['ema_params', 'opt_state', 'params', 'step']
print("RESTORED", len(la))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([exe, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "RESTORED" in r.stdout, r.stderr[-2000:]


def test_cli_import_to_a_run_takes_the_preset_and_overrides(tmp_path, capsys):
    """`pmf import-official CKPT --preset P --set K=V ... --out RUN`: the flags reach the importer typed; it writes
    a run directory with the overrides applied and names the `pmf train` command that continues it."""
    from pmf.cli import main

    overrides = {**OFFICIAL_KWARGS, "in_channels": 3, "bottleneck_dim": 128}
    sets = ["model.name=pMF-tiny", f"model.overrides={json.dumps(overrides)}", "data.resolution=8",
            "train.ema=[hl500, hl1000, hl2000]", "sample.ema=ema_hl2000"]
    argv = ["import-official", str(FULL), "--preset", "tiny-test", "--images-per-step", "1", "--out",
            str(tmp_path / "run")]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    again = "pmf train --preset tiny-test " + " ".join(f"--set {s}" for s in sets) + f" --run-dir {tmp_path / 'run'}"
    assert f"continue with: {again}" in printed
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["sample"]["ema"] == "ema_hl2000" and cfg["model"]["overrides"]["bottleneck_dim"] == 128
