"""Preemption (pmf.util.preempt + the loop): SIGTERM / SIGINT / SIGUSR1 stop training after the current step with a
checkpoint and the exports and exit 75; the rerun continues with the same losses as an uninterrupted run, in one
process and under torchrun with 2 processes (where only one rank gets the signal); a second signal ends the process
at once, while a repeat within the debounce window (scheduler + launcher) counts as one.

Runs are the ``tiny-test`` preset shrunk to 16 steps of batch 16 on one CPU thread."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pmf.errors import EXIT_PREEMPTED
from pmf.method.model import PMFDiT
from pmf.train.checkpoint import load_latest
from pmf.train.config import load_config
from pmf.train.loop import train
from pmf.util import preempt

# 16 steps of 16 images, a log record after every step, checkpoints only when stopping.
SETS = ["train.total_kimg=0.256", "train.batch_size=16", "train.sample_every_kimg=0", "train.log_every_kimg=0.016",
        "train.ckpt_every_kimg=1000", "train.ckpt_every_minutes=1000", "train.threads=1", "train.device=cpu",
        "train.check_every_kimg=0.016"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
STEPS = 16


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def read_log(run_dir) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train_cmd(run_dir, nproc: int = 1) -> list[str]:
    head = [sys.executable, "-m", "pmf"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "pmf"]
    cmd = [*head, "train", "--preset", "tiny-test", "--run-dir", str(run_dir), "--quiet"]
    for s in SETS:
        cmd += ["--set", s]
    return cmd


def wait_for_steps(proc, run_dir, n: int, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while len(read_log(run_dir)) < n:
        assert proc.poll() is None, f"trainer exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, f"fewer than {n} steps within {timeout} s"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 16-step run (in process): its per-step log."""
    run_dir = tmp_path_factory.mktemp("ref")
    n = torch.get_num_threads()
    try:
        summary = train(load_config("tiny-test", overrides=SETS), run_dir, quiet=True)
    finally:
        torch.set_num_threads(n)
    assert summary["step"] == STEPS and summary["exit_status"] == 0
    return read_log(run_dir)


def losses(log) -> list[tuple]:
    return [(r["step"], r["loss"], r["loss_u"], r["grad_norm"]) for r in log]


# ----------------------------------------------------------------------------------------------------------------
# The handler itself


def test_first_signal_sets_the_flag_and_repeats_within_the_window_count_once():
    with preempt.stop_on_signals() as stop:
        assert not stop.requested
        signal.raise_signal(signal.SIGUSR1)
        assert stop.requested and stop.signal_name == "SIGUSR1"
        signal.raise_signal(signal.SIGTERM)  # within REPEAT_WINDOW_S: the same request (we are still alive)
        assert stop.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGTERM) is not stop._handle  # handlers restored on exit


def test_a_second_signal_after_the_window_ends_the_process_at_once(tmp_path):
    """A process busy in its loop: the first SIGTERM only sets the flag, the second (after the debounce window) kills
    it by SIGTERM itself, without waiting for the loop."""
    script = textwrap.dedent("""
        import sys, time
        from pmf.util.preempt import stop_on_signals
        with stop_on_signals() as stop:
            print("ready", flush=True)
            while True:
                time.sleep(0.01)
                if stop.requested:
                    print("flag", flush=True)
                    while True:
                        time.sleep(0.01)  # a long final checkpoint
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.readline().strip() == "flag"
        assert proc.poll() is None
        time.sleep(preempt.REPEAT_WINDOW_S + 0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGTERM
    assert "received again: exiting now" in proc.stderr.read()


# ----------------------------------------------------------------------------------------------------------------
# The training loop under SIGTERM: one process


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_mid_run_checkpoints_exports_exits_75_and_the_rerun_matches(tmp_path, reference, sig):
    run_dir = tmp_path / "run"
    cmd = train_cmd(run_dir)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_steps(proc, run_dir, 2)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    state = load_latest(run_dir)
    stopped = state["step"]
    assert 2 <= stopped < STEPS, "the signal arrived after the run finished"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == f"preempted ({sig.name})" and summary["step"] == stopped
    assert [r["step"] for r in read_log(run_dir)] == list(range(1, stopped + 1))  # the current step finished
    # Exports of the stopping step: raw weights and every EMA, equal to the checkpoint's.
    net = PMFDiT.from_pretrained(run_dir / "export" / "model")
    assert net.pretrained_meta["kimg"] == state["nimg"] / 1000
    for k, v in net.state_dict().items():
        assert torch.equal(v, state["net"][k]), k
    assert (run_dir / "export" / "ema_hl1" / "model.safetensors").exists()

    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"(step {stopped})" in done.stdout
    assert losses(read_log(run_dir)) == losses(reference)  # bit-identical continuation


# ----------------------------------------------------------------------------------------------------------------
# torchrun with 2 processes: only rank 1 gets the signal; both stop after the same step


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        kids += [int(t) for t in text]
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to find the worker processes")
def test_torchrun_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, reference):
    run_dir = tmp_path / "two"
    cmd = train_cmd(run_dir, nproc=2)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_steps(proc, run_dir, 2, timeout=300)
        ranks = {_rank_of(p): p for p in _children(proc.pid)}
        assert set(ranks) >= {0, 1}, ranks
        os.kill(ranks[1], signal.SIGTERM)  # rank 0 gets nothing: the per-step collective carries the flag
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode != 0  # torchrun reports the workers' non-zero exit
    assert "exitcode  : 75" in err or "exitcode: 75" in err.replace("  ", " "), err[-3000:]
    state = load_latest(run_dir)
    stopped = state["step"]
    assert 2 <= stopped < STEPS
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "preempted (signal on another rank)" and summary["step"] == stopped
    assert (run_dir / "export" / "model" / "model.safetensors").exists()

    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log, ref = read_log(run_dir), reference
    assert [r["step"] for r in log] == [r["step"] for r in ref]
    for key in ("loss", "loss_u", "grad_norm"):  # 2 ranks sum the gradient mean in another order: rtol as test_dist
        np.testing.assert_allclose([r[key] for r in log], [r[key] for r in ref], rtol=1e-5, err_msg=key)


# ----------------------------------------------------------------------------------------------------------------
# A signal to the whole process group (a scheduler, Ctrl-C) with DataLoader workers


def test_group_sigterm_with_data_workers_still_checkpoints_and_exits(tmp_path):
    """SIGTERM to every process of the job, DataLoader workers included: the workers outlive it (else the DataLoader
    raises "worker killed by signal" in the middle of the final checkpoint) and are shut down at exit (no hang)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    run_dir = tmp_path / "run"
    sets = ["model.overrides={input_size: 16, patch_size: 4, in_channels: 3, num_classes: 2, hidden_size: 32, "
            "depth: 2, num_heads: 2, aux_head_depth: 1, bottleneck_dim: 8}", "data.dataset=imagefolder",
            f"data.path={root}", "data.resolution=16", "data.num_workers=1", "train.batch_size=4",
            "train.total_kimg=0.4", "train.log_every_kimg=0.004", "train.sample_every_kimg=0",
            "train.ckpt_every_kimg=1000", "train.threads=1", "train.device=cpu"]
    cmd = [sys.executable, "-m", "pmf", "train", "--preset", "tiny-test", "--run-dir", str(run_dir), "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for_steps(proc, run_dir, 2)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "killed by signal" not in err
    state = load_latest(run_dir)
    assert 2 <= state["step"] < 100 and (run_dir / "export" / "model" / "model.safetensors").exists()
