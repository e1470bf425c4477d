"""Files a user hands pmf (pmf.io.userfiles): a pickle that would run code, YAML that is not plain data, a sample
archive or reference the extractor cannot read, a checkpoint whose stored defaults, kwargs or weights are broken.
Each is built here; each must end in exit 2 with one line naming the file, run nothing, and write nothing."""

import json
import os

import numpy as np
import pytest
import torch

from pmf.cli import main as cli_main
from pmf.errors import EXIT_USAGE
import pmf.eval.samples
from pmf.method.model import PMFDiT
import pmf.train.loop

KW = dict(input_size=8, patch_size=4, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=3,
          aux_head_depth=1, bottleneck_dim=4, num_class_tokens=1, num_time_tokens=1, num_cfg_tokens=1,
          num_interval_tokens=2, v_head=False)


class Payload:
    """Unpickling this runs ``touch MARKER`` (what a malicious checkpoint does); torch.save only records it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def run_cli(argv, capsys) -> tuple[int, str]:
    rc = cli_main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return rc, err


def assert_one_line(rc, err, *expect):
    lines = err.splitlines()
    assert rc == EXIT_USAGE, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in expect:
        assert text in lines[0], lines[0]


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return PMFDiT(**KW)


# ----------------------------------------------------------------------------------------------------------------
# Pickles


@pytest.mark.parametrize("command", ["import-official", "sample", "export"])
def test_a_pickle_that_would_run_code_is_refused_in_one_line_and_never_runs(tmp_path, capsys, command):
    marker, bad = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": Payload(marker)}, bad)
    out = tmp_path / "out"
    argv = {"import-official": ["import-official", bad, "--model", "pMF-B/16", "--out", out],
            "sample": ["sample", "--checkpoint", bad, "--device", "cpu", "--out", out / "g.png"],
            "export": ["export", "--checkpoint", bad, "--out", out]}[command]
    rc, err = run_cli(argv, capsys)
    # import-official opens it with weights_only; --checkpoint takes only network folders, so never opens a .pt
    expect = ("refuses to unpickle", "weights_only") if command == "import-official" else ("pmf import-official",)
    assert_one_line(rc, err, str(bad), *expect)
    assert not marker.exists()  # the payload never ran
    assert not out.exists()  # nothing written


def test_a_file_that_is_no_torch_file_is_named(tmp_path, capsys):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"\x00not a checkpoint" * 10)
    rc, err = run_cli(["import-official", bad, "--model", "pMF-B/16", "--out", tmp_path / "out"], capsys)
    assert_one_line(rc, err, str(bad))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# YAML


def test_yaml_python_tags_in_config_and_set_are_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pmf.train.loop, "load_dataset", lambda cfg: pytest.fail("reached the data"))
    marker = tmp_path / "pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"train:\n  batch_size: !!python/object/apply:os.system ['touch {marker}']\n")
    run_dir = tmp_path / "run"
    rc, err = run_cli(["train", "--config", cfg, "--run-dir", run_dir, "--dry-run"], capsys)
    assert_one_line(rc, err, f"config file {cfg} is not plain YAML data", "!!python")
    rc, err = run_cli(["train", "--preset", "tiny-test", "--run-dir", run_dir, "--dry-run", "--set",
                       f"train.batch_size=!!python/object/apply:os.system ['touch {marker}']"], capsys)
    assert_one_line(rc, err, "--set train.batch_size=", "is not plain YAML data")
    cfg.write_text("- just\n- a list\n")
    rc, err = run_cli(["train", "--config", cfg, "--run-dir", run_dir, "--dry-run"], capsys)
    assert_one_line(rc, err, f"config file {cfg} holds a YAML list, not a mapping")
    assert not marker.exists() and not run_dir.exists()


# ----------------------------------------------------------------------------------------------------------------
# Sample archives and references: checked before any feature is computed


def _archive(path, images):
    np.savez(path, images, np.zeros(len(images), dtype=np.int64))
    return path


@pytest.mark.parametrize("name,images,extractor,expect", [
    ("float", np.zeros((4, 28, 28, 1), np.float32), "fmnist", "images must be uint8 [0, 255], got float32"),
    ("int16", np.zeros((4, 28, 28, 1), np.int16), "inception", "images must be uint8 [0, 255], got int16"),
    ("3-channel for fmnist", np.zeros((4, 28, 28, 3), np.uint8), "fmnist",
     "holds 3-channel images but the fmnist extractor reads 1-channel ones"),
    ("32 px for fmnist", np.zeros((4, 32, 32, 1), np.uint8), "fmnist",
     "holds 32 x 32 images but the fmnist extractor reads 28 x 28"),
    ("4 channels", np.zeros((4, 8, 8, 4), np.uint8), "inception", "expected images (N, H, W, 1 or 3)"),
])
def test_a_sample_archive_the_extractor_cannot_read_is_refused_before_extraction(tmp_path, capsys, monkeypatch, name,
                                                                                  images, extractor, expect):
    for f in ("fmnist_extractor_and_reference", "inception_extractor", "load_reference", "evaluate_samples"):
        monkeypatch.setattr(pmf.eval.samples, f, lambda *a, **k: pytest.fail("an extractor was built: too late"))
    samples = _archive(tmp_path / "s.npz", images)
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048, dtype=np.float32))
    argv = ["eval-samples", "--samples", samples, "--extractor", extractor, "--device", "cpu", "--out", tmp_path / "m.json"]
    rc, err = run_cli(argv + (["--ref-stats", ref] if extractor == "inception" else []), capsys)
    assert_one_line(rc, err, str(samples), expect)
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("arrays,expect", [
    (dict(mu=np.zeros(64), sigma=np.eye(64)), "holds 64-dimensional statistics but the Inception extractor's features are "
                                              "2048-dimensional"),
    (dict(mu=np.zeros(2048), sigma=np.eye(64)), "sigma is (64, 64), not (2048, 2048)"),
    (dict(mu=np.zeros(2048), sigma=np.eye(2048, dtype=np.float32), features=np.zeros((5, 64), np.float32)),
     "holds features (5, 64) but the Inception extractor's are 2048-dimensional"),
    (dict(something=np.zeros(3)), "neither statistics (mu, sigma) nor images (arr_0)"),
])
def test_a_reference_of_the_wrong_dimension_is_named_before_any_feature_is_computed(tmp_path, capsys, monkeypatch,
                                                                                     arrays, expect):
    for f in ("load_reference", "evaluate_samples"):
        monkeypatch.setattr(pmf.eval.samples, f, lambda *a, **k: pytest.fail("features computed: checked too late"))
    monkeypatch.setattr(pmf.eval.samples, "inception_extractor", lambda *a, **k: pmf.eval.samples.Extractor(
        lambda images: pytest.fail("features computed: checked too late"), feature_dim=2048))
    samples = _archive(tmp_path / "s.npz", np.zeros((4, 8, 8, 3), np.uint8))
    ref = tmp_path / "ref.npz"
    np.savez(ref, **arrays)
    rc, err = run_cli(["eval-samples", "--samples", samples, "--extractor", "inception", "--ref-stats", ref, "--device",
                       "cpu"], capsys)
    assert_one_line(rc, err, f"--ref-stats {ref}", expect)


# ----------------------------------------------------------------------------------------------------------------
# What a checkpoint says about itself: the flags' rules


def _edit_json(path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("key,value,expect", [
    ("omega", "NaN", "meta.omega=nan must be a finite number"),
    ("omega", float("nan"), "meta.omega=nan must be a finite number"),
    ("num_steps", -1, "meta.num_steps=-1 must be an integer >= 1"),
    ("t_min", 0.9, "meta.t_min/meta.t_max 0.9 0.5 must satisfy 0 <= t_min <= t_max <= 1"),
    ("noise_scale", 0, "meta.noise_scale=0 must be a positive number"),
])
def test_stored_sampling_defaults_obey_the_flags_rules(tmp_path, capsys, tiny_net, key, value, expect):
    tiny_net.save_pretrained(tmp_path / "exp", meta={"noise_scale": 1.0, "omega": 1.0, "t_min": 0.1, "t_max": 0.5,
                                                     "num_steps": 1})
    _edit_json(tmp_path / "exp" / "config.json", lambda d: d["meta"].update({key: value}))
    grid = tmp_path / "g.png"
    rc, err = run_cli(["sample", "--checkpoint", tmp_path / "exp", "--device", "cpu", "--out", grid], capsys)
    assert_one_line(rc, err, str(tmp_path / "exp"), expect)
    assert not grid.exists()


def test_the_same_check_covers_a_hugging_face_folder_and_a_run_directory(tmp_path, capsys, tiny_net):
    tiny_net.save_pretrained(tmp_path / "hf", meta={"omega": 2.0})
    _edit_json(tmp_path / "hf" / "config.json", lambda d: d["meta"].update(omega="NaN"))
    rc, err = run_cli(["export", "--checkpoint", tmp_path / "hf", "--out", tmp_path / "out"], capsys)
    assert_one_line(rc, err, str(tmp_path / "hf"), "meta.omega=nan must be a finite number")
    assert not (tmp_path / "out").exists()


def test_nan_weights_are_refused_naming_the_tensor(tmp_path, capsys, tiny_net):
    with torch.no_grad():
        next(tiny_net.parameters())[0].fill_(float("nan"))
    tiny_net.save_pretrained(tmp_path / "exp", meta={"noise_scale": 1.0})
    name = next(n for n, _ in tiny_net.named_parameters())
    rc, err = run_cli(["sample", "--checkpoint", tmp_path / "exp", "--device", "cpu", "--out", tmp_path / "g.png"],
                      capsys)
    assert_one_line(rc, err, "hold NaN or infinity", name, "earlier checkpoint")
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("text,expect", [("{\"model_kwargs\": ", "is not valid JSON"),
                                         ("[1, 2]", "holds a JSON list, not an object")])
def test_a_damaged_config_json_is_named(tmp_path, capsys, tiny_net, text, expect):
    tiny_net.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(text)
    rc, err = run_cli(["sample", "--checkpoint", tmp_path / "hf", "--device", "cpu", "--out", tmp_path / "g.png"],
                      capsys)
    assert_one_line(rc, err, str(tmp_path / "hf" / "config.json"), expect)
    assert not (tmp_path / "g.png").exists()


def test_stored_model_kwargs_are_checked_before_a_network_is_built(tmp_path, capsys, tiny_net):
    tiny_net.save_pretrained(tmp_path / "hf")
    _edit_json(tmp_path / "hf" / "config.json", lambda d: d["model_kwargs"].update(depth=-1, dept=2))
    rc, err = run_cli(["sample", "--checkpoint", tmp_path / "hf", "--device", "cpu", "--out", tmp_path / "g.png"],
                      capsys)
    assert_one_line(rc, err, str(tmp_path / "hf" / "config.json"), "unknown PMFDiT argument 'dept'",
                    "model_kwargs.depth=-1 must be a positive integer")
