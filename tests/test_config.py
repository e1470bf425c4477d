"""Run configuration (pmf.train.config) and the official presets: every number of the official configs is in
the pmf-* YAML files with a comment citing its source, agrees with the model registry, and ``--dry-run`` prints
the run's derived numbers (steps per epoch = floor(1,281,167 / 1024) = 1251) without data or a real model."""

import json
import math
import re

import pytest
import torch
from PIL import Image

from pmf.cli import main as cli_main
from pmf.method.model import MODELS
from pmf.train.config import PRESET_DIR, list_presets, load_config
from pmf.train.validate import ConfigError, validate_config

GFLOPS = {"pmf-b16-in256": 33, "pmf-l16-in256": 117, "pmf-h16-in256": 271, "pmf-b32-in512": 34,
          "pmf-l32-in512": 117, "pmf-h32-in512": 272}  # pMF Sec. 6.3 / Tab. 6-7
IMAGENET_TRAIN = 1_281_167  # the ImageNet-1k train split

# The recipe's per-model table (released configs; H epochs from the paper, see the YAML comments) and
# the recount of inference parameters in millions (pMF Tab. 6/7).
RECIPE = {
    #                 model       res  P_mean noise beta  t_thr  unif  ep   omega t_min t_max ema   params_M
    "pmf-b16-in256": ("pMF-B/16", 256, 0.8, 1.0, 1.0, 0.8, 0.0, 320, 8.5, 0.1, 0.7, 2000, 118.2),
    "pmf-l16-in256": ("pMF-L/16", 256, 0.8, 1.0, 2.0, 0.8, 0.0, 320, 7.0, 0.2, 0.7, 1000, 410.3),
    "pmf-h16-in256": ("pMF-H/16", 256, 0.0, 2.0, 1.0, 0.6, 0.1, 360, 7.0, 0.2, 0.6, 1000, 955.5),
    "pmf-b32-in512": ("pMF-B/32", 512, 0.8, 2.0, 1.0, 0.8, 0.0, 320, 6.5, 0.1, 0.7, 2000, 120.3),
    "pmf-l32-in512": ("pMF-L/32", 512, 0.0, 4.0, 1.0, 0.6, 0.0, 320, 7.5, 0.2, 0.6, 2000, 413.0),
    "pmf-h32-in512": ("pMF-H/32", 512, 0.0, 4.0, 1.0, 0.6, 0.1, 360, 5.5, 0.1, 0.6, 500, 959.1),
}


def test_all_official_presets_exist():
    assert set(RECIPE) <= set(list_presets())


@pytest.mark.parametrize("preset", sorted(RECIPE))
def test_official_preset_matches_the_recipe_and_the_registry(preset):
    name, res, p_mean, noise, beta, t_thr, unif, epochs, omega, t_min, t_max, ema_hl, _ = RECIPE[preset]
    cfg = load_config(preset)
    spec = MODELS[name]
    o, t, s = cfg.objective, cfg.train, cfg.sample
    assert cfg.model.name == name and cfg.model.overrides == {}
    assert spec.kwargs["input_size"] == cfg.data.resolution == res and spec.kwargs["patch_size"] == res // 16
    assert (cfg.data.dataset, cfg.data.class_conditional) == ("imagefolder", True)
    # objective [official pmf.py, configs, utils/auxloss_util.py]
    assert (o.P_mean, o.P_std, o.tr_uniform, o.data_proportion) == (p_mean, 0.8, unif, 0.5)
    assert o.noise_scale == spec.noise_scale == noise
    assert (o.guidance, o.interval, o.cfg_max, o.cfg_beta, o.class_drop) == (True, True, 7.0, beta, 0.1)
    assert (o.tangent, o.use_v_head, o.drop_among_fm, o.time_region) == ("predicted", True, True, "full")
    assert (o.norm_p, o.norm_eps) == (1.0, 0.01)
    assert o.perceptual_weights == {"lpips": 0.4, "convnext": 0.1} and o.perceptual_max_t == t_thr
    # optimizer [P Tab. 8; official utils/trainstate_util.py]
    op = cfg.optim
    assert (op.name, op.lr, tuple(op.betas), op.eps, op.weight_decay) == ("muon", 1e-3, (0.9, 0.95), 1e-8, 0.0)
    assert (op.nesterov_adam, op.muon_momentum, op.muon_ns_steps) == (True, 0.95, 5)
    assert (op.warmup_kimg, op.schedule) == (0.0, "constant")
    # run length, batch, EMA [P Tab. 8; official utils/ema_util.py]
    assert t.batch_size == 1024 and t.grad_clip == 0.0 and t.parallel == "ddp"
    assert t.total_kimg == pytest.approx(epochs * IMAGENET_TRAIN / 1000, abs=1e-6)
    assert t.ema == ["hl500", "hl1000", "hl2000"] and t.ema_ramp == 0.05
    # sampling: the released eval settings, also in the registry [official eval configs]
    assert (s.omega, s.t_min, s.t_max, s.steps) == (omega, t_min, t_max, 1)
    assert (spec.omega, spec.t_min, spec.t_max, spec.ema_halflife_kimg) == (omega, t_min, t_max, ema_hl)
    assert s.ema == f"ema_hl{ema_hl}"


@pytest.mark.parametrize("preset", sorted(RECIPE))
def test_every_preset_value_has_a_comment_citing_its_source(preset):
    """Each ``key: value`` line of the preset and of its ``base:`` file carries a comment that cites its source (the
    paper or the official code and configs), or says the setting is ours."""
    own = (PRESET_DIR / f"{preset}.yaml").read_text()
    base = re.search(r"^base: (\S+)", own, re.M)
    text = ((PRESET_DIR / f"{base.group(1)}.yaml").read_text() if base else "") + own
    leaves = [ln for ln in text.splitlines() if re.match(r"^\s+\w+:\s*\S", ln)]
    assert len(leaves) > 40
    for line in leaves:
        assert "#" in line, f"no comment: {line}"
        comment = line.split("#", 1)[1]
        assert re.search(r"official|\bours\b|P Tab|P App|P Sec|configs|registry|data\.path", comment), \
            f"no source cited: {line}"


def _dry_run(args, capsys) -> tuple[dict, dict]:
    assert cli_main(["train", *args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    decoder = json.JSONDecoder()
    config, end = decoder.raw_decode(out)
    summary, _ = decoder.raw_decode(out[end:].lstrip())
    return config, summary


# Each dry run plans the auto accumulation (~10-25 s of meta-device measurement): one preset in the default suite,
# all six in `make test-slow`.
@pytest.mark.parametrize("preset", [p if p == "pmf-b16-in256" else pytest.param(p, marks=pytest.mark.slow)
                                    for p in sorted(RECIPE)])
def test_dry_run_of_official_preset(preset, tmp_path, capsys, monkeypatch):
    """No data, no process group, the model only on the meta device. steps_per_epoch is the floor of
    1,281,167 / 1024 (= 1251); the run length is exact in images: steps_total = ceil(images / 1024)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    _, res, *_, epochs, _, _, _, _, params_m = RECIPE[preset]
    run_dir = tmp_path / "never"
    config, summary = _dry_run(["--preset", preset, "--run-dir", str(run_dir)], capsys)
    assert not run_dir.exists() and not torch.distributed.is_initialized()
    assert config["data"]["resolution"] == res
    assert summary["dataset_size"] == IMAGENET_TRAIN and "ImageNet-1k" in summary["dataset_size_source"]
    assert summary["steps_per_epoch"] == IMAGENET_TRAIN // 1024 == 1251  # floor
    assert summary["steps_total"] == math.ceil(epochs * IMAGENET_TRAIN / 1024)
    assert summary["epochs"] == pytest.approx(epochs)
    assert summary["world_size"] == 1
    assert summary["accum_steps"] * summary["micro_batch_per_device"] == 1024  # the preset's accumulation
    assert summary["params_M_inference"] == pytest.approx(params_m, abs=0.1)  # recount from the official code
    assert summary["params_M"] > summary["params_M_inference"]  # + the training-only v-head
    # the paper's compute keys (pmf.method.compute; Sec. 6.3: Gflops as multiply-accumulates, generator only)
    assert summary["params_generator_M"] == pytest.approx(summary["params_M_inference"], abs=1e-3)
    assert summary["params_training_M"] == pytest.approx(summary["params_M"], abs=1e-3)
    assert summary["gflops_per_forward"] == pytest.approx(GFLOPS[preset], rel=0.02)
    assert summary["ema_beta_per_step"]["ema_hl500"] == pytest.approx(0.998581, abs=1e-6)  # official utils/ema_util.py
    assert any("perceptual" in n for n in summary["notes"])


def test_dry_run_plans_a_multi_process_launch(tmp_path, capsys, monkeypatch):
    """WORLD_SIZE (torchrun's, or set by hand) and accumulation split the global batch; nothing is joined."""
    monkeypatch.setenv("WORLD_SIZE", "8")
    _, summary = _dry_run(["--preset", "pmf-h16-in256", "--run-dir", str(tmp_path / "x"), "--set",
                           "train.accum_steps=4", "--set", "train.parallel=fsdp", "--set", "objective.impl=reference",
                           "--set", "train.compile=false"],  # (the compiled step needs replicas and the lean objective)
                          capsys)
    assert not torch.distributed.is_initialized()
    assert (summary["world_size"], summary["per_device_batch"], summary["micro_batch_per_device"]) == (8, 128, 32)
    assert summary["parallel"] == "fsdp" and summary["steps_per_epoch"] == 1251
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert cli_main(["train", "--preset", "pmf-b16-in256", "--run-dir", str(tmp_path / "x"), "--dry-run",
                     "--set", "train.accum_steps=1"]) != 0
    assert "must be divisible by world_size*accum_steps=3" in capsys.readouterr().err


def test_dry_run_lists_an_existing_image_folder_without_decoding(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / "data" / c / f"{i}.png")
    (tmp_path / "data" / "b" / "bad.png").write_bytes(b"not an image")  # listed, never opened
    _, summary = _dry_run(["--preset", "pmf-b16-in256", "--run-dir", str(tmp_path / "x"), "--set",
                           f"data.path={tmp_path / 'data'}", "--set", "train.batch_size=4"], capsys)
    assert summary["dataset_size"] == 7 and "listed" in summary["dataset_size_source"]
    assert summary["steps_per_epoch"] == 1


def test_every_section_is_validated_by_the_one_gate():
    """load_config only parses; validate_config (pmf.train.validate) refuses every bad value, all in one line,
    the objective section by ObjectiveConfig's own rules."""
    cfg = load_config("tiny-test", overrides=[
        "train.parallel=deepspeed", "train.accum_steps=0", "train.hsdp_shard_size=-1", "train.precision=fp16",
        "objective.impl=fast", "data.dataset=images"])
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("train.parallel='deepspeed' must be ddp, fsdp or hsdp", "train.accum_steps=0",
                 "train.hsdp_shard_size=-1 must be >= 0", "train.precision='fp16'", "use bf16",
                 "objective.impl must be 'lean' or 'reference', got 'fast'",
                 "data.dataset='images' must be fashion_mnist, imagefolder or shards"):
        assert part in msg, part
    assert load_config("tiny-test").train.parallel == "ddp"  # the manual all-reduce path is the default
    validate_config(load_config("tiny-test"))
