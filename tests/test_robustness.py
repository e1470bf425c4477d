"""Nothing lost: one writer per run directory (pmf.train.runlock), checked checkpoints (checksums, damaged states
skipped and set aside, rotation that never deletes the newest good state), no silent restart from step 0, the
state's config as the reference, honest exit statuses (3 after non-finite steps) with resumable settings declared in
the config dataclasses.

Runs are the ``tiny-test`` preset shrunk to a few steps of batch 16 on one CPU thread."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from pmf.cli import main as cli_main
from pmf.errors import EXIT_DIVERGED, EXIT_USAGE, PmfError, RunDirBusy
from pmf.train import state_dir
from pmf.train.checkpoint import load_latest, save_training_state
from pmf.train.config import RunConfig, config_differences, load_config, to_json
from pmf.train.loop import ConfigMismatch, train
import pmf.train.loop
from pmf.train.runlock import RunLock

from test_train import assert_identical

SMALL = ["train.total_kimg=0.128", "train.batch_size=16", "train.sample_every_kimg=0", "train.log_every_kimg=0.016",
         "train.ckpt_every_kimg=1000", "train.ckpt_every_minutes=1000", "train.threads=1", "train.device=cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def small_cfg(*overrides):
    return load_config("tiny-test", overrides=[*SMALL, *overrides])


def cli_train(run_dir, *sets, extra=()):
    argv = ["train", "--preset", "tiny-test", "--run-dir", str(run_dir), "--quiet", *extra]
    for s in [*SMALL, *sets]:
        argv += ["--set", s]
    return cli_main(argv)


def read_log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def losses(log) -> list[tuple]:
    return [(r["step"], r["loss"], r["loss_u"], r["grad_norm"]) for r in log]


def flip_tensor_bytes(path: Path, tensor: torch.Tensor, n: int = 4096) -> None:
    """Overwrite up to ``n`` bytes of ``tensor``'s data inside the saved file ``path`` with random bytes (found by
    content), leaving the zip structure intact: torch.load still succeeds."""
    raw = bytearray(path.read_bytes())
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    at = raw.find(data[:256])
    assert at >= 0, "tensor bytes not found in the file"
    n = min(n, len(data))
    noise = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    raw[at:at + n] = bytes(noise.tolist())
    path.write_bytes(bytes(raw))


# ----------------------------------------------------------------------------------------------------------------
# One writer per run directory


def test_lock_refuses_a_second_holder_and_names_pid_and_host(tmp_path):
    with RunLock(tmp_path / "run"):
        assert (tmp_path / "run" / ".lock").read_text().split() == [str(os.getpid()), socket.gethostname()]
        with pytest.raises(RunDirBusy, match=f"in use by PID {os.getpid()} on {socket.gethostname()}"):
            RunLock(tmp_path / "run").acquire()
    assert (tmp_path / "run" / ".lock").read_text() == ""  # released cleanly
    with RunLock(tmp_path / "run"):  # free again
        pass


def test_stale_lock_of_a_killed_process_is_taken_over_with_a_message(tmp_path, capfd):
    script = textwrap.dedent(f"""
        import time
        from pmf.train.runlock import RunLock
        RunLock({str(tmp_path / "run")!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusy, match=f"PID {proc.pid}"):
            RunLock(tmp_path / "run").acquire()
    finally:
        proc.kill()  # SIGKILL: no cleanup; the kernel drops the flock, the file still names the dead PID
        proc.wait()
    assert (tmp_path / "run" / ".lock").read_text().split()[0] == str(proc.pid)
    with RunLock(tmp_path / "run"):
        assert f"taking over the stale lock {tmp_path / 'run' / '.lock'} of PID {proc.pid}" in capfd.readouterr().err


def test_a_second_concurrent_run_is_refused_and_the_first_is_unaffected(tmp_path, capsys):
    """Run 1 (CLI subprocess, 8 steps) holds the directory; run 2 with other settings gets exit 2 and the message;
    run 1 finishes with exactly the losses and config of an undisturbed run."""
    run_dir = tmp_path / "shared"
    sets = SMALL
    cmd = [sys.executable, "-m", "pmf", "train", "--preset", "tiny-test", "--run-dir", str(run_dir), "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (run_dir / "log.jsonl").exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.02)
        capsys.readouterr()
        # the second run in this (already imported) process, so it surely starts while run 1 trains
        second = cli_train(run_dir, "objective.P_mean=0.3", "optim.lr=0.01")
        still_running = proc.poll() is None
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
        proc.wait()
    assert still_running, "run 1 ended before run 2 started: the test proves nothing"
    assert second == EXIT_USAGE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"in use by PID {proc.pid} on {socket.gethostname()}" in lines[0], lines
    assert proc.returncode == 0, err[-3000:]
    assert json.loads((run_dir / "config.json").read_text()) == json.loads(to_json(load_config("tiny-test",
                                                                                        overrides=sets)))
    ref = train(load_config("tiny-test", overrides=sets), tmp_path / "ref", quiet=True)
    assert ref["step"] == 8
    assert losses(read_log(run_dir)) == losses(read_log(tmp_path / "ref"))


# ----------------------------------------------------------------------------------------------------------------
# Checked checkpoints


def test_bit_flipped_newest_state_is_skipped_set_aside_and_the_previous_one_returned(tmp_path):
    save_training_state(tmp_path, {"w": torch.arange(4096.0)}, 1)
    newest = save_training_state(tmp_path, {"w": torch.arange(4096.0) * 2}, 2)
    flip_tensor_bytes(newest / "__0_0.distcp", torch.arange(4096.0) * 2)
    assert not torch.equal(state_dir.read_full_state(newest)["w"], torch.arange(4096.0) * 2)  # DCP alone reads it
    with pytest.warns(UserWarning, match="state-000000002.*does not match its recorded SHA-256.*renamed to"):
        state = load_latest(tmp_path, set_aside=True)
    assert state["step"] == 1 and torch.equal(state["w"], torch.arange(4096.0))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["state-000000001", "state-000000002.damaged"]


def test_rotation_deletes_only_older_states_and_never_the_newest_good_one(tmp_path):
    """A damaged state with a higher step (left in place) is neither counted nor deleted; the good state a run resumed
    from survives until a newer good state exists."""
    for step in (4, 8):
        save_training_state(tmp_path, {"w": torch.full((1024,), float(step))}, step)
    flip_tensor_bytes(tmp_path / "checkpoints" / "state-000000008" / "__0_0.distcp", torch.full((1024,), 8.0))
    with pytest.warns(UserWarning, match="does not match its recorded SHA-256"):
        assert load_latest(tmp_path)["step"] == 4  # resumed from 4; 8 left in place (no set_aside)
    save_training_state(tmp_path, {"w": torch.full((1024,), 6.0)}, 6, keep=2)
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == ["state-000000004", "state-000000006", "state-000000008"]
    save_training_state(tmp_path, {"w": torch.full((1024,), 7.0)}, 7, keep=2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["state-000000006", "state-000000007", "state-000000008"]


def test_training_resumes_from_the_previous_state_when_the_newest_is_bit_flipped(tmp_path):
    """A checkpoint after every step; 4 KB of random bytes in the newest state's weights. The rerun skips it (sets it
    aside), resumes from the previous one and ends bit-identical to an uninterrupted run."""
    sets = ["train.ckpt_every_kimg=0.016", "train.total_kimg=0.064"]  # 4 steps, a state after each
    train(small_cfg(*sets), tmp_path / "run", quiet=True)
    newest = tmp_path / "run" / "checkpoints" / "state-000000004"
    big = max(state_dir.read_full_state(newest)["net"].values(), key=lambda t: t.numel())
    flip_tensor_bytes(newest / "__0_0.distcp", big)
    with pytest.warns(UserWarning, match="does not match its recorded SHA-256"):
        again = train(small_cfg(*sets), tmp_path / "run", quiet=True)
    assert again["step"] == 4 and again["exit_status"] == 0
    names = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert names == ["state-000000003", "state-000000004", "state-000000004.damaged"]
    ref = train(small_cfg(*sets), tmp_path / "ref", quiet=True)
    assert_identical(load_latest(tmp_path / "ref"), load_latest(tmp_path / "run"))  # weights, optimizer, EMAs, loader
    assert ref["last_metrics"] == again["last_metrics"]


def test_log_or_export_without_a_state_refuses_step_0_unless_restart(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli_train(run_dir, "train.total_kimg=0.032") == 0
    shutil.rmtree(run_dir / "checkpoints")
    export_before = (run_dir / "export" / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert cli_train(run_dir, "train.total_kimg=0.032") == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no training state" in err and "--restart" in err
    assert (run_dir / "export" / "model" / "model.safetensors").read_bytes() == export_before  # nothing overwritten
    assert cli_train(run_dir, "train.total_kimg=0.032", extra=["--restart"]) == 0
    assert [r["step"] for r in read_log(run_dir)] == [1, 2]  # a fresh log; the old one moved aside
    assert len(list(run_dir.glob("log.old-*.jsonl"))) == 1


def test_without_config_json_the_state_config_is_the_reference(tmp_path):
    train(small_cfg("train.total_kimg=0.016"), tmp_path, quiet=True)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ConfigMismatch, match=r"per the training state.*objective\.P_mean: 0\.8 -> 0\.3"):
        train(small_cfg("train.total_kimg=0.016", "objective.P_mean=0.3"), tmp_path, quiet=True)
    # a resumable change (lr, length) is accepted
    assert train(small_cfg("train.total_kimg=0.032", "optim.lr=5e-4"), tmp_path, quiet=True)["step"] == 2


# ----------------------------------------------------------------------------------------------------------------
# Honest exit statuses; resumable settings


def test_resumable_settings_are_declared_in_the_dataclasses():
    assert not hasattr(pmf.train.loop, "RESUMABLE_CHANGES")
    old = json.loads(to_json(RunConfig()))  # as config.json holds it
    cfg = RunConfig()
    cfg.train.max_nonfinite, cfg.optim.lr, cfg.train.total_kimg, cfg.sample.ema = 50, 1e-5, 7.0, ""
    cfg.train.log_every_kimg, cfg.train.ckpt_every_kimg, cfg.eval.num_samples, cfg.data.path = 1.0, 3.0, 5, "/x"
    assert config_differences(old, cfg) == []
    cfg.train.batch_size, cfg.objective.P_mean, cfg.optim.betas = 64, 0.3, (0.9, 0.99)
    assert config_differences(old, cfg) == ["objective.P_mean: 0.8 -> 0.3", "optim.betas: [0.9, 0.95] -> [0.9, 0.99]",
                                            "train.batch_size: 128 -> 64"]


def test_lr_1e6_exits_3_and_a_rerun_with_a_lower_lr_is_accepted_and_trains_on(tmp_path, capsys):
    """lr = 1e6 ruins the weights in its first step (finite), the next ones are non-finite: exit 3 with a checkpoint.
    The rerun with a lower lr is accepted (lr is resumable) and trains on from that checkpoint; from weights this
    ruined it diverges again and says so (also when it reaches the end with non-finite last steps), and --restart
    starts over and finishes."""
    run_dir = tmp_path / "run"
    assert cli_train(run_dir, "optim.lr=1e6", "train.max_nonfinite=2") == EXIT_DIVERGED
    out = capsys.readouterr().out
    assert "2 non-finite steps in a row" in out and "lower optim.lr" in out
    stopped = load_latest(run_dir)
    assert stopped["nonfinite_run"] == 2
    rc = cli_train(run_dir, "optim.lr=1e-3", "train.max_nonfinite=4")
    out = capsys.readouterr().out
    assert f"(step {stopped['step']})" in out  # resumed, not refused as a config change
    after = load_latest(run_dir)
    assert after["step"] > stopped["step"] and read_log(run_dir)[-1]["lr"] == 1e-3
    assert rc == EXIT_DIVERGED and after["nonfinite_run"] == 4  # the ruined weights give NaN again: honest status
    # Allowing more non-finite steps reaches the end, but a run whose last steps trained nothing is not a success.
    assert cli_train(run_dir, "optim.lr=1e-3", "train.max_nonfinite=20") == EXIT_DIVERGED
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 8 and summary["stop_reason"].startswith("done, but the last")
    assert cli_train(run_dir, "optim.lr=1e-3", extra=["--restart"]) == 0
    assert load_latest(run_dir)["step"] == 8 and load_latest(run_dir)["nonfinite_total"] == 0


def test_nonfinite_stop_exits_3_and_raising_max_nonfinite_continues_to_the_end(tmp_path, monkeypatch, capsys):
    """Non-finite losses that leave the weights intact (steps 3-5 of the first process): exit 3 after 2 in a row; the
    rerun with train.max_nonfinite raised (resumable) continues to the end with exit 0."""
    real_loss = pmf.train.loop.pmf_loss
    calls = []

    def fake(net, x, y, cfg, gen, perceptual=None):
        calls.append(1)
        loss, metrics = real_loss(net, x, y, cfg, gen)
        if len(calls) in (3, 4):
            return loss * float("nan"), {k: v * float("nan") for k, v in metrics.items()}
        return loss, metrics

    monkeypatch.setattr(pmf.train.loop, "pmf_loss", fake)
    run_dir = tmp_path / "run"
    assert cli_train(run_dir, "train.max_nonfinite=2") == EXIT_DIVERGED
    assert load_latest(run_dir)["step"] == 4
    assert cli_train(run_dir, "train.max_nonfinite=5") == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 8 and summary["stop_reason"] == "done" and summary["nonfinite_total"] == 2


def test_pmferror_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    with RunLock(tmp_path / "run"):
        assert cli_train(tmp_path / "run") == EXIT_USAGE
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and "in use by PID" in err
        assert cli_train(tmp_path / "run", extra=["--debug"]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert "Traceback" in err and "RunDirBusy" in err
    assert issubclass(RunDirBusy, PmfError)
