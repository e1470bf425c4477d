"""The training loop (pmf.train.loop): restart = rerun the command (bit-identical, also after SIGKILL), golden first-k
losses, config guards, periodic actions at the same images seen after a resume, non-finite steps, gradient
accumulation, ImageFolder with a corrupt file.

Every run is the ``tiny-test`` preset shrunk to a handful of steps of batch 16 on one CPU thread (a few seconds)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pmf.cli import main as cli_main
from pmf.train.checkpoint import load_latest
from pmf.train.config import from_dict, load_config
from pmf.train.loop import train
import pmf.train.loop

# 8 steps of 16 images; one log record per step; checkpoints only at the end; one thread (fast under load and
# independent of the machine's core count, which keeps bit-identical comparisons meaningful).
SMALL = ["train.total_kimg=0.128", "train.batch_size=16", "train.sample_every_kimg=0", "train.log_every_kimg=0.016",
         "train.ckpt_every_kimg=1000", "train.ckpt_every_minutes=1000", "train.threads=1"]
GOLDEN = Path(__file__).parent / "golden" / "tiny_train_losses.json"



@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()  # train() sets the process-wide thread count (train.threads)
    yield
    torch.set_num_threads(n)


def small_cfg(*overrides):
    return load_config("tiny-test", overrides=[*SMALL, *overrides])


def read_log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def assert_identical(a, b, where="state"):
    """Nested dicts / lists / tensors / numbers equal exactly (tensors bit for bit, dtypes included)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max |diff| {(a.double() - b.double()).abs().max().item():.3g}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ----------------------------------------------------------------------------------------------------------------
# Restart = rerun the command


def test_resume_is_bit_identical_to_uninterrupted(tmp_path):
    """Run to N/2 images, rerun with total_kimg = N (allowed to change): same weights, optimizer state, EMAs, data
    position and per-step losses as one run to N."""
    full = train(small_cfg(), tmp_path / "full", quiet=True)
    half = train(small_cfg("train.total_kimg=0.064"), tmp_path / "resumed", quiet=True)
    assert (half["step"], full["step"]) == (4, 8)
    resumed = train(small_cfg(), tmp_path / "resumed", quiet=True)
    assert resumed["step"] == 8 and resumed["stop_reason"] == "done"

    a, b = load_latest(tmp_path / "full"), load_latest(tmp_path / "resumed")
    assert a["step"] == b["step"] == 8 and a["nimg"] == b["nimg"] == 128
    assert_identical(a["net"], b["net"], "net")
    assert_identical(a["ema"], b["ema"], "ema")
    assert_identical(a, b)  # optimizer moments, loader position, counters
    assert resumed["last_metrics"]["loss"] == full["last_metrics"]["loss"]
    losses_full = [(r["step"], r["loss"], r["loss_u"]) for r in read_log(tmp_path / "full")]
    losses_resumed = [(r["step"], r["loss"], r["loss_u"]) for r in read_log(tmp_path / "resumed")]
    assert losses_resumed == losses_full


def test_rerunning_a_finished_run_is_a_no_op(tmp_path):
    """Rerunning the command of a finished run (e.g. killed after its final checkpoint) must not crash or train."""
    cfg = small_cfg("train.total_kimg=0.032")
    train(cfg, tmp_path, quiet=True)
    before = load_latest(tmp_path)
    again = train(cfg, tmp_path, quiet=True)
    assert again["step"] == 2 and again["stop_reason"] == "done"
    assert_identical(before, load_latest(tmp_path))
    assert len(read_log(tmp_path)) == 2


def test_sigkill_then_rerun_matches_uninterrupted(tmp_path):
    """A true kill: SIGKILL the CLI after its first checkpoint, rerun the same command, compare the final state
    with an uninterrupted run."""
    sets = [*SMALL, "train.ckpt_every_kimg=0.016"]  # 8 steps, a checkpoint after every step
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pmf", "train", "--preset", "tiny-test", "--run-dir", str(run_dir), "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    try:
        while not list((run_dir / "checkpoints").glob("state-*")):
            assert proc.poll() is None, f"trainer exited early: {proc.stderr.read().decode()[-2000:]}"
            assert time.time() < deadline, "no checkpoint within the deadline"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_latest(run_dir)["step"]
    assert not (run_dir / "summary.json").exists() and killed_at < 8, "the run finished before the kill"

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed" in done.stdout

    ref = train(load_config("tiny-test", overrides=sets), tmp_path / "ref", quiet=True)
    a, b = load_latest(tmp_path / "ref"), load_latest(run_dir)
    assert ref["step"] == b["step"] == 8
    assert_identical(a["net"], b["net"], "net")
    assert_identical(a["ema"], b["ema"], "ema")
    assert_identical(a["optimizer"], b["optimizer"], "optimizer")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["last_metrics"]["loss"] == ref["last_metrics"]["loss"]


# ----------------------------------------------------------------------------------------------------------------
# Golden first-k losses


def test_golden_first_losses(tmp_path):
    """The tiny-test preset's first 4 logged losses (one record per batch of 32). Regenerate deliberately with
    PMF_REGEN_GOLDEN=1 after an intended change of the objective, the model or the data order.

    The adaptive weight makes ``loss`` ~ 2 for any model, so the raw errors ``loss_u`` / ``loss_v`` are pinned
    too."""
    overrides = ["train.total_kimg=0.128", "train.threads=1"]  # neither changes the trajectory
    cfg = load_config("tiny-test", overrides=overrides)
    assert cfg.train.log_every_kimg * 1000 == cfg.train.batch_size  # one record per step
    train(cfg, tmp_path, quiet=True)
    records = read_log(tmp_path)[:4]
    got = {k: [r[k] for r in records] for k in ("loss", "loss_u", "loss_v")}
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    if os.environ.get("PMF_REGEN_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"preset": "tiny-test", "overrides": overrides, "torch": torch.__version__,
                                      **got}, indent=2) + "\n")
    golden = json.loads(GOLDEN.read_text())
    for k, values in got.items():
        np.testing.assert_allclose(values, golden[k], rtol=1e-4, err_msg=f"{k} differs from {GOLDEN.name}")


# ----------------------------------------------------------------------------------------------------------------
# Config guards


def test_resume_with_changed_trajectory_key_names_it(tmp_path):
    cfg = small_cfg("train.total_kimg=0.016")
    train(cfg, tmp_path, quiet=True)
    with pytest.raises(ValueError, match=r"objective\.P_mean: 0\.8 -> 0\.3"):
        train(small_cfg("train.total_kimg=0.016", "objective.P_mean=0.3"), tmp_path, quiet=True)
    assert load_latest(tmp_path)["step"] == 1  # nothing was overwritten
    # The resolved config saved with the run loads back to an equal config.
    assert from_dict(json.loads((tmp_path / "config.json").read_text())) == cfg


def test_dry_run_prints_config_and_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "never"
    rc = cli_main(["train", "--preset", "tiny-test", "--run-dir", str(run_dir), "--dry-run",
                   "--set", "train.threads=1"])
    out = capsys.readouterr().out
    assert rc == 0 and not run_dir.exists()
    decoder = json.JSONDecoder()
    config, end = decoder.raw_decode(out)
    summary, _ = decoder.raw_decode(out[end:].lstrip())
    assert from_dict(config) == load_config("tiny-test", overrides=["train.threads=1"])
    assert summary["steps_per_epoch"] == 60000 // 32
    assert summary["steps_total"] == 8 and summary["params_M"] > 0


# ----------------------------------------------------------------------------------------------------------------
# Periodic actions (pmf.train.schedule)


def test_periodic_actions_fire_at_the_same_images_after_a_resume(tmp_path, monkeypatch):
    """Log records, sample grids and checkpoints on intervals the batch (16) does not divide: a run stopped by its
    time budget after step 3 and rerun fires each at the same images seen as an uninterrupted run, namely after the
    first step at or past each point of its schedule (multiples of the interval; the log also at the batch, below
    its first multiple; the log and the checkpoint also at the end)."""
    sets = ["train.log_every_kimg=0.024", "train.sample_every_kimg=0.040", "train.ckpt_every_kimg=0.056"]
    fired = []
    real_checkpoint, real_step = pmf.train.loop.Run.checkpoint, pmf.train.loop.train_step

    def record_actions():
        def checkpoint(self):
            fired.append(("ckpt", self.nimg))
            real_checkpoint(self)

        monkeypatch.setattr(pmf.train.loop.Run, "checkpoint", checkpoint)
        monkeypatch.setattr(pmf.train.loop.Run, "grid", lambda self, tag, n: fired.append(("grid", self.nimg, tag)))

    def fires(run_dir, minutes=None):
        fired.clear()
        train(small_cfg(*sets), run_dir, minutes=minutes, quiet=True)
        return [*fired]

    record_actions()
    whole = fires(tmp_path / "whole")
    log_whole = [round(r["kimg"] * 1000) for r in read_log(tmp_path / "whole")]

    steps = [0]

    def counting_step(*a, **k):
        steps[0] += 1
        return real_step(*a, **k)

    class JumpingClock:  # 61 s per step: the 2.5-minute budget is over after step 3 (48 images)
        @staticmethod
        def time():
            return time.time() + 61.0 * steps[0]

    monkeypatch.setattr(pmf.train.loop, "train_step", counting_step)
    monkeypatch.setattr(pmf.train.loop, "time", JumpingClock)
    first = fires(tmp_path / "resumed", minutes=2.5)
    monkeypatch.undo()
    record_actions()
    second = fires(tmp_path / "resumed")
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["stop_reason"] == "done"

    def first_step_past(points):  # images seen after the first step (a multiple of 16) at or past each point
        return sorted({math.ceil(p / 16) * 16 for p in points})

    assert log_whole == first_step_past([16, 24, 48, 72, 96, 120, 128])
    assert [f[1] for f in whole if f[0] == "grid" and f[2] != "latest"] == first_step_past([40, 80, 120])
    assert [f[1] for f in whole if f[0] == "ckpt"] == first_step_past([56, 112, 128])
    assert first[-2:] == [("ckpt", 48), ("grid", 48, "latest")]  # what the time-budget stop adds
    assert first[:-2] + second == whole
    assert [round(r["kimg"] * 1000) for r in read_log(tmp_path / "resumed")] == log_whole


# ----------------------------------------------------------------------------------------------------------------
# Non-finite steps


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch):
    """Calls 3 and 5, 6, 7 return a NaN loss: step 3 is skipped (weights and EMA untouched), step 4 trains again,
    and the third NaN in a row stops the run with a checkpoint."""
    real_loss = pmf.train.loop.pmf_loss

    def make_fake(nan_calls):
        calls = []

        def fake(net, x, y, cfg, gen, perceptual=None):
            calls.append(1)
            loss, metrics = real_loss(net, x, y, cfg, gen)
            if len(calls) in nan_calls:
                return loss * float("nan"), {k: v * float("nan") for k, v in metrics.items()}
            return loss, metrics

        return fake

    monkeypatch.setattr(pmf.train.loop, "pmf_loss", make_fake({3, 5, 6, 7, 8}))
    summary = train(small_cfg("train.max_nonfinite=3"), tmp_path / "nan", quiet=True)
    assert summary["stop_reason"] == "3 non-finite steps in a row"
    assert summary["step"] == 7 and summary["nonfinite_total"] == 4
    state = load_latest(tmp_path / "nan")
    assert state["step"] == 7 and state["nonfinite_run"] == 3 and state["nonfinite_total"] == 4
    log = read_log(tmp_path / "nan")
    assert [r["nonfinite_total"] for r in log] == [0, 0, 1, 1, 2, 3]  # the stopping step is not logged
    assert math.isnan(log[2]["loss"]) and math.isfinite(log[3]["loss"])

    # Skipped steps change nothing: the state equals that of a 4-step run whose step 3 was skipped.
    monkeypatch.setattr(pmf.train.loop, "pmf_loss", make_fake({3}))
    train(small_cfg("train.total_kimg=0.064"), tmp_path / "ref", quiet=True)
    ref = load_latest(tmp_path / "ref")
    assert all(torch.isfinite(t).all() for t in state["net"].values())
    assert_identical(state["net"], ref["net"], "net")
    assert_identical(state["ema"], ref["ema"], "ema")
    assert_identical(state["optimizer"]["state"], ref["optimizer"]["state"], "optimizer")


# ----------------------------------------------------------------------------------------------------------------
# Gradient accumulation


def test_accumulation_matches_one_big_batch(tmp_path):
    """accum_steps=2 is the same optimizer step as accum_steps=1 on the same global batch: every random draw is keyed
    to the sample's global index, and the micro-batch losses are averaged."""
    steps2 = "train.total_kimg=0.032"
    one = train(small_cfg(steps2), tmp_path / "a1", quiet=True)
    two = train(small_cfg(steps2, "train.accum_steps=2"), tmp_path / "a2", quiet=True)
    assert one["step"] == two["step"] == 2
    for r1, r2 in zip(read_log(tmp_path / "a1"), read_log(tmp_path / "a2"), strict=True):
        np.testing.assert_allclose([r2["loss_u"], r2["loss_v"]], [r1["loss_u"], r1["loss_v"]], rtol=1e-5)
    a, b = load_latest(tmp_path / "a1")["net"], load_latest(tmp_path / "a2")["net"]
    for k in a:
        err = (a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)
        # Summation order differs between the splits (float32 rounding, ~1e-7); Muon's Newton-Schulz amplifies it
        # (1.75e-5 measured on an AVX2 CPU, where it runs in float32). A wrong split would be off by O(1).
        assert err <= 5e-5, f"{k}: relative difference {err:.3g}"


# ----------------------------------------------------------------------------------------------------------------
# ImageFolder


def test_imagefolder_with_a_corrupt_file_trains_and_reports_it(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(6):
            arr = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) // (c + 1)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    bad = root / "dog" / "3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    model = ("model.overrides={input_size: 16, patch_size: 4, in_channels: 3, num_classes: 2, hidden_size: 32, "
             "depth: 2, num_heads: 2, aux_head_depth: 1, bottleneck_dim: 8}")
    # 3 steps of 4 = the whole first epoch, so the corrupt file is certainly drawn.
    cfg = small_cfg(model, "data.dataset=imagefolder", f"data.path={root}", "data.resolution=16",
                    "train.batch_size=4", "train.total_kimg=0.012", "train.log_every_kimg=0.004")
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*3\.png"):
        summary = train(cfg, tmp_path / "run", quiet=True)
    assert summary["step"] == 3 and summary["stop_reason"] == "done" and summary["nonfinite_total"] == 0
    assert summary["skipped_files"] == 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_files"] == 1
    log = read_log(tmp_path / "run")
    assert log[-1]["skipped_files"] == 1 and all(math.isfinite(r["loss"]) for r in log)
    assert (tmp_path / "run" / "samples-latest.png").exists()


def test_bf16_precision_trains_close_to_fp32(tmp_path):
    """train.precision=bf16 autocasts the forward passes; the first logged raw loss stays within bf16 tolerance of
    fp32, and an unknown precision is refused before any work."""
    train(small_cfg(), tmp_path / "fp32", quiet=True)
    train(small_cfg("train.precision=bf16"), tmp_path / "bf16", quiet=True)
    a, b = read_log(tmp_path / "fp32"), read_log(tmp_path / "bf16")
    assert math.isfinite(b[-1]["loss_u"])
    assert abs(b[0]["loss_u"] - a[0]["loss_u"]) <= 0.05 * a[0]["loss_u"]
    with pytest.raises(ValueError, match="fp16 needs loss scaling"):
        train(small_cfg("train.precision=fp16"), tmp_path / "fp16", quiet=True)
    assert not (tmp_path / "fp16").exists()
