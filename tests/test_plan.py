"""The device plan (pmf.train.plan, ``pmf train --dry-run``): the activation estimate extrapolated from small
instances against the measured saved-tensor bytes of a bigger model; the six ImageNet presets fit 8 x 80 GB; the
dry run's JSON; out-of-memory errors carry the plan and the knobs, and are never taken for a compile failure."""

import json
import warnings

import pytest
import torch

import pmf.train.loop
from pmf.cli import main as cli_main
from pmf.model import PMFDiT
from pmf.objective import ObjectiveConfig
from pmf.train import plan
from pmf.train.config import load_config
from pmf.train.loop import model_kwargs, train
from pmf.train.speed import _EagerFallback, set_tf32

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGENET_PRESETS = ["pmf-b16-in256", "pmf-b32-in512", "pmf-h16-in256", "pmf-h32-in512", "pmf-l16-in256",
                    "pmf-l32-in512"]


@pytest.mark.parametrize("kwargs,precision", [
    # 64 patch tokens + 20 prefix, 6 trunk + 2 head blocks: 4x the proxies' tokens and depth
    (dict(input_size=32, patch_size=4, in_channels=3, hidden_size=96, depth=8, num_heads=4, num_classes=10,
          aux_head_depth=2, bottleneck_dim=16), "fp32"),
    (dict(input_size=32, patch_size=4, in_channels=3, hidden_size=96, depth=8, num_heads=4, num_classes=10,
          aux_head_depth=2, bottleneck_dim=16), "bf16"),
    # the official head / prefix layout at a small width: 36 patches, 3 trunk + 3 head blocks
    (dict(input_size=48, patch_size=8, in_channels=3, hidden_size=128, depth=6, num_heads=4, num_classes=1000,
          aux_head_depth=3, bottleneck_dim=32), "fp32"),
])
def test_activation_estimate_against_a_measurement(kwargs, precision):
    """The planner measures four small instances (1-2 trunk blocks, 1-2 head blocks, 2x2 or 4x4 patches) and
    extrapolates; the truth is the saved-tensor bytes of the full model's pmf_loss forward (CPU). Within 25 %."""
    cfg = ObjectiveConfig()
    estimate = plan.activation_bytes_per_sample(kwargs, cfg, precision)["saved"]
    torch.manual_seed(0)
    measured = plan.loss_saved_bytes(PMFDiT(**kwargs), cfg, 8, precision) / 8
    assert abs(estimate - measured) / measured < 0.25, (estimate, measured)


@pytest.mark.parametrize("preset", IMAGENET_PRESETS)
def test_imagenet_presets_fit_8_gpus_of_80_gb(preset):
    """The presets' micro-batch and accumulation keep the global batch of 1024 and fit 8 x 80 GB."""
    cfg = load_config(preset)
    p = plan.device_plan(cfg, model_kwargs(cfg), 8, 80)
    assert p["fits"], plan.format_plan(p)
    assert p["micro_batch_per_device"] * p["accum_steps"] * 8 == cfg.train.batch_size == 1024
    terms = p["est_gib_per_device"]
    assert set(terms) >= {"weights", "gradients", "optimizer_state", "ema_copies", "perceptual_networks",
                          "activations"}
    assert terms["activations"] > terms["weights"] > 0 and terms["perceptual_networks"] > 0
    # the plan is not a constant: twice the micro-batch costs more activation memory
    bigger = plan.estimate_memory(cfg, model_kwargs(cfg), 8, 2 * p["micro_batch_per_device"])
    assert bigger["activations"] == pytest.approx(2 * terms["activations"] * plan.GIB, rel=1e-3)


def test_memory_knobs_lower_the_estimate():
    cfg = load_config("pmf-b16-in256", overrides=["train.precision=fp32"])
    kw = model_kwargs(cfg)
    base = plan.device_plan(cfg, kw, 8, 80)["est_gib_per_device"]["activations"]
    for change in (["train.activation_checkpointing=true"], ["train.precision=bf16"]):
        other = load_config("pmf-b16-in256", overrides=["train.precision=fp32", *change])
        assert plan.device_plan(other, kw, 8, 80)["est_gib_per_device"]["activations"] < 0.8 * base, change
    fsdp = load_config("pmf-b16-in256", overrides=["train.parallel=fsdp"])
    assert plan.estimate_memory(fsdp, kw, 8, 64)["ema_copies"] < plan.estimate_memory(cfg, kw, 8, 64)["ema_copies"] / 4


def _dry_run_summary(args, capsys) -> dict:
    assert cli_main(["train", *args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    dec = json.JSONDecoder()
    _, end = dec.raw_decode(out)
    return dec.raw_decode(out[end:].lstrip())[0]


def test_dry_run_reports_the_device_plan(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    s = _dry_run_summary(["--preset", "tiny-test", "--run-dir", str(tmp_path / "r"), "--plan-devices", "2",
                          "--plan-device-memory", "80"], capsys)
    p = s["device_plan"]
    assert (s["world_size"], p["devices"], p["micro_batch_per_device"], p["accum_steps"]) == (2, 2, 16, 1)
    assert s["fits"] is True and s["est_peak_gib_per_device"] == p["est_peak_gib_per_device"] > 0
    # a device too small for it: fits false, and the notes say which knobs to turn
    s = _dry_run_summary(["--preset", "tiny-test", "--run-dir", str(tmp_path / "r"), "--plan-device-memory",
                          "0.5"], capsys)
    assert s["fits"] is False and any("activation_checkpointing" in n and "accum_steps" in n for n in s["notes"])
    assert not (tmp_path / "r").exists()


def test_out_of_memory_in_a_step_names_the_plan_and_the_knobs(tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pmf.train.loop, "pmf_loss", oom)
    cfg = load_config("tiny-test", overrides=["train.total_kimg=0.032", "train.threads=1", "train.compile=true"])
    with pytest.raises(plan.PlannedOutOfMemoryError) as info:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no "torch.compile ... failed" warning either
            train(cfg, tmp_path / "run", quiet=True)
    msg = str(info.value)
    assert "Tried to allocate 2.00 GiB" in msg and "micro-batch 32 x 1 accumulation steps" in msg
    assert "train.activation_checkpointing=true" in msg and "train.precision=bf16" in msg
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)


def test_compile_fallback_reraises_out_of_memory():
    """An OOM in the compiled call is not a compiler failure: re-raised, no eager fallback, no warning."""
    calls = []

    def compiled(*a):
        raise RuntimeError("CUDA error: out of memory")

    guard = _EagerFallback(compiled, lambda *a: calls.append(a), "f")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="out of memory"):
            guard(1)
    assert guard.state == "untried" and calls == []
    guard = _EagerFallback(lambda *a: 1 / 0, lambda *a: "eager", "f")  # a real compile failure still falls back
    with pytest.warns(RuntimeWarning, match="torch.compile of f failed"):
        assert guard() == "eager"


def test_tf32_switch_sets_cuda_flags_only_for_cuda():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        set_tf32(torch.device("cuda"), True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_tf32(torch.device("cpu"), False)  # nothing on the CPU
        assert torch.backends.cuda.matmul.allow_tf32
        set_tf32(torch.device("cuda"), False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
