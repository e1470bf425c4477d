"""The device plan (pmf.train.plan, ``pmf train --dry-run``): the activation estimate extrapolated from small
instances against the measured saved-tensor bytes of a bigger model; the six ImageNet presets fit 8 x 80 GB; the
dry run's JSON; out-of-memory errors carry the plan and the knobs, and are never taken for a compile failure."""

import json
import os
import warnings

import pytest
import torch

from pmf.cli import main as cli_main
from pmf.method.model import PMFDiT
from pmf.train import plan
from pmf.train.config import load_config, model_kwargs
from pmf.train.loop import train
import pmf.train.loop
from pmf.train.speed import _EagerFallback
from pmf.train.precision import set_tf32

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGENET_PRESETS = ["pmf-b16-in256", "pmf-b32-in512", "pmf-h16-in256", "pmf-h32-in512", "pmf-l16-in256",
                    "pmf-l32-in512"]


SMALL = dict(input_size=32, patch_size=4, in_channels=3, hidden_size=96, depth=8, num_heads=4, num_classes=10,
             aux_head_depth=2, bottleneck_dim=16)  # 64 patch tokens + 20 prefix, 6 trunk + 2 head blocks
OFFICIAL_LAYOUT = dict(input_size=48, patch_size=8, in_channels=3, hidden_size=128, depth=6, num_heads=4,
                       num_classes=1000, aux_head_depth=3, bottleneck_dim=32)  # 36 patches, 3 trunk + 3 head blocks


@pytest.mark.parametrize("kwargs,precision,checkpointing", [
    (SMALL, "fp32", False), (SMALL, "bf16", False), (OFFICIAL_LAYOUT, "fp32", False), (SMALL, "fp32", True)])
def test_plan_against_a_measured_training_step(kwargs, precision, checkpointing):
    """The plan (weights, gradients, optimizer state, activations; extrapolated from instances of 1-2 blocks and
    2x2-8x8 patches measured on the meta device) against the real train_step on the CPU: its peak of allocated
    bytes (pmf.train.memtrack, every storage from creation to free; under bf16 with CUDA autocast's float32 ops)
    on top of the weights and optimizer state it starts from. Within 15 %."""
    from pmf.train.loop import train_step
    from pmf.train.memtrack import tracking
    from pmf.train.optim import build_optimizer

    B = 16
    cfg = load_config("tiny-test", overrides=[f"train.precision={precision}", f"train.batch_size={B}",
                                              "train.device=cpu", f"train.activation_checkpointing={checkpointing}"])
    terms = plan.estimate_memory(cfg, kwargs, 1, B)
    planned = sum(terms[k] for k in ("weights", "gradients", "optimizer_state", "activations"))
    torch.manual_seed(0)
    net = PMFDiT(**kwargs)
    net.activation_checkpointing = checkpointing
    opt = build_optimizer(net, cfg.optim)
    images = torch.randint(0, 256, (B, 3, kwargs["input_size"], kwargs["input_size"]), dtype=torch.uint8)
    labels = torch.arange(B) % kwargs["num_classes"]
    train_step(net, opt, images, labels, cfg, 0, torch.device("cpu"))  # the optimizer state exists from here on
    start = sum(t.numel() * t.element_size() for t in net.parameters()) + sum(
        v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    with tracking() as tracker:
        train_step(net, opt, images, labels, cfg, B, torch.device("cpu"))
    measured = start + tracker.peak
    assert abs(planned - measured) / measured < 0.15, (planned, measured, terms)


@pytest.mark.slow  # ~1 min per preset: the plan measures 12 instances of the full-width network (meta device)
@pytest.mark.parametrize("preset", IMAGENET_PRESETS)
def test_imagenet_presets_fit_8_gpus_of_80_gb(preset):
    """train.accum_steps: auto keeps the global batch of 1024 and fits 8 x 80 GB."""
    cfg = load_config(preset)
    assert cfg.train.accum_steps == "auto"
    p = plan.device_plan(cfg, model_kwargs(cfg), 8, 80)
    assert p["fits"], plan.format_plan(p)
    assert p["micro_batch_per_device"] * p["accum_steps"] * 8 == cfg.train.batch_size == 1024
    terms = p["est_gib_per_device"]
    assert set(terms) >= {"weights", "gradients", "optimizer_state", "ema_copies", "perceptual_networks",
                          "activations", "runtime"}
    assert terms["activations"] > terms["weights"] > 0 and terms["perceptual_networks"] > 0
    # the plan is not a constant: twice the micro-batch costs twice the activation memory
    m, ckpt = p["micro_batch_per_device"], p["activation_checkpointing"]
    bigger = plan.estimate_memory(cfg, model_kwargs(cfg), 8, 2 * m, p["accum_steps"], ckpt)
    assert bigger["activations"] == pytest.approx(2 * terms["activations"] * plan.GIB, rel=1e-3)


@pytest.mark.slow  # ~1 min: the plan of pMF-B/16 with and without checkpointing (24 instances, meta device)
def test_auto_plan_for_1_8_64_gpus_and_one_24_gb_gpu():
    """accum_steps: auto on 1, 8 and 64 GPUs of 80 GB and one of 24 GB: the global batch is kept, the plan fits,
    and the micro-batch is the largest that fits (twice it does not, unless it is the whole per-device batch);
    checkpointing only where it buys a micro-batch at least twice as large."""
    cfg = load_config("pmf-b16-in256")
    kw = model_kwargs(cfg)
    for world, gib in ((1, 80), (8, 80), (64, 80), (1, 24)):
        p = plan.device_plan(cfg, kw, world, gib)
        m, accum, ckpt = p["micro_batch_per_device"], p["accum_steps"], p["activation_checkpointing"]
        assert p["fits"] and m * accum * world == 1024, (world, gib, plan.format_plan(p))
        per_device = 1024 // world
        if m < per_device:
            twice = plan.estimate_memory(cfg, kw, world, 2 * m, accum // 2, ckpt)
            assert sum(twice.values()) > gib * plan.GIB, (world, gib, m)
        if ckpt:
            plain = plan.device_plan(load_config("pmf-b16-in256", overrides=["train.accum_steps=1"]), kw, world, gib)
            assert plain["largest_fitting_micro_batch"] is None or 2 * plain["largest_fitting_micro_batch"] <= m
    assert plan.device_plan(cfg, kw, 64, 80)["micro_batch_per_device"] == 16  # the whole per-device batch


def test_a_run_that_cannot_fit_is_refused_before_any_set_up(tmp_path, monkeypatch, capsys):
    """accum_steps: auto on a device too small even for one image with checkpointing: exit 2 and one line with the
    plan's numbers, before the data is opened or the run directory written."""
    def no_data(cfg):
        raise AssertionError("the data was opened")

    monkeypatch.setattr(pmf.train.loop, "load_dataset", no_data)
    monkeypatch.setattr(plan, "host_memory_gib", lambda: 0.5)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    status = cli_main(["train", "--preset", "tiny-test", "--run-dir", str(tmp_path / "r"), "--set",
                       "train.accum_steps=auto", "--set", "train.device=cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert "does not fit" in err[0] and "micro-batch 1 x 32 accumulation steps" in err[0] and "GiB" in err[0]
    assert not (tmp_path / "r").exists()


def test_auto_resolves_before_the_run(tmp_path, monkeypatch):
    """On a device with room, auto runs the whole per-device batch in one micro-batch and says so; the run's config
    holds the numbers it ran with (accum_steps is resumable: any split of the global batch is the same step)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = load_config("tiny-test", overrides=["train.accum_steps=auto", "train.total_kimg=0.032", "train.threads=1",
                                              "train.device=cpu"])
    summary = train(cfg, tmp_path / "r", quiet=True)
    assert summary["step"] == 1
    saved = json.loads((tmp_path / "r" / "config.json").read_text())["train"]
    assert saved["accum_steps"] == 1 and saved["activation_checkpointing"] is False


def test_allocator_default_is_set_unless_the_user_set_it(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    plan.set_allocator_defaults()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    plan.set_allocator_defaults()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


@pytest.mark.slow  # ~1 min: three plans of the full-width pMF-B/16
def test_memory_knobs_lower_the_estimate():
    fixed = ["train.precision=fp32", "train.accum_steps=2"]
    cfg = load_config("pmf-b16-in256", overrides=fixed)
    kw = model_kwargs(cfg)
    base = plan.device_plan(cfg, kw, 8, 80)["est_gib_per_device"]["activations"]
    for change in (["train.activation_checkpointing=true"], ["train.precision=bf16"]):
        other = load_config("pmf-b16-in256", overrides=[*fixed, *change])
        assert plan.device_plan(other, kw, 8, 80)["est_gib_per_device"]["activations"] < 0.8 * base, change
    fsdp = load_config("pmf-b16-in256", overrides=[*fixed, "train.parallel=fsdp"])
    assert plan.estimate_memory(fsdp, kw, 8, 64)["ema_copies"] < plan.estimate_memory(cfg, kw, 8, 64)["ema_copies"] / 4
    # FSDP with accumulation: the unsynced full gradients sit on every rank between micro-batches
    n = sum(p.numel() for p in PMFDiT(**kw).parameters())
    unsynced = plan.estimate_memory(fsdp, kw, 8, 64, 2)["gradients"] - plan.estimate_memory(fsdp, kw, 8, 128, 1)[
        "gradients"]
    assert unsynced > 0.9 * 4 * n


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
