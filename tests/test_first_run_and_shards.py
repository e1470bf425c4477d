"""A first run killed before its first checkpoint resumes by rerunning the same command; a dry run refuses a run
directory that cannot be created; prepared shards are verified on open (data.verify) and by prepare-data --check,
so a tampered shard is caught."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pmf.cli import main as cli_main
from pmf.errors import EXIT_USAGE

SMALL = ["train.total_kimg=0.032", "train.batch_size=16", "train.sample_every_kimg=0", "train.log_every_kimg=0.016",
         "train.ckpt_every_kimg=1000", "train.ckpt_every_minutes=1000", "train.threads=1", "train.device=cpu"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def train_argv(run_dir, *sets, preset="tiny-test"):
    argv = ["train", "--preset", preset, "--run-dir", str(run_dir), "--quiet"]
    for s in [*SMALL, *sets]:
        argv += ["--set", s]
    return argv


def read_log(run_dir) -> list[tuple]:
    lines = (Path(run_dir) / "log.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_first_run_killed_before_its_first_checkpoint_restarts_by_rerunning_the_same_command(tmp_path, capsys):
    """What a run killed (kill -9) while writing its first checkpoint leaves: config.json, a log of the steps it
    did, and a partly written .state-*.tmp/. Rerunning the same command starts cleanly and trains the same losses."""
    run_dir = tmp_path / "run"
    assert cli_main(train_argv(run_dir)) == 0
    reference = read_log(run_dir)
    assert [s for s, _ in reference] == [1, 2]
    # the same directory as the kill left it: no state, no export, no summary; a partial log and a partial temp
    for p in (run_dir / "checkpoints").iterdir():
        shutil.rmtree(p)
    shutil.rmtree(run_dir / "export")
    (run_dir / "summary.json").unlink()
    log = run_dir / "log.jsonl"
    log.write_text(log.read_text().splitlines()[0] + "\n")
    tmp = run_dir / "checkpoints" / ".state-000000002.tmp"
    tmp.mkdir()
    (tmp / "__0_0.distcp").write_bytes(b"partial")
    capsys.readouterr()
    assert cli_main(train_argv(run_dir)) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "stopped before its first checkpoint" in out and "removed checkpoints/.state-000000002.tmp" in out
    assert not tmp.exists()
    assert read_log(run_dir) == reference  # the same losses, a fresh log
    (old,) = run_dir.glob("log.old-*.jsonl")
    assert len(old.read_text().splitlines()) == 1  # the killed run's log kept aside, not lost
    assert (run_dir / "export" / "model" / "model.safetensors").is_file()


def test_damaged_states_without_a_good_one_still_refuse_a_silent_restart(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "state-000000002.damaged").mkdir()
    (run_dir / "log.jsonl").write_text("{}\n")
    assert cli_main(train_argv(run_dir)) == EXIT_USAGE
    err = one_line(capsys)
    assert "log.jsonl, state-000000002.damaged of an earlier run" in err and "--restart" in err
    assert (run_dir / "log.jsonl").read_text() == "{}\n"  # nothing moved


def test_a_dry_run_refuses_a_run_directory_that_cannot_be_created(capsys):
    assert cli_main(train_argv("/proc/rd") + ["--dry-run"]) == EXIT_USAGE
    err = one_line(capsys)
    assert "--run-dir /proc/rd cannot be created" in err and "choose another --run-dir" in err
    assert not os.path.exists("/proc/rd")


def test_the_writable_check_tolerates_another_rank_creating_the_run_directory(tmp_path, monkeypatch):
    """N ranks check the run directory at once: one creates it while another probes. The probe that finds it made by
    the other process meanwhile (mkdir: FileExistsError) passes and leaves it alone; its own probe directories go."""
    from pmf.train.validate import check_writable_dir

    run_dir = tmp_path / "probe" / "run"
    real_mkdir = Path.mkdir

    def other_rank_first(self, *a, **k):
        if self == run_dir:  # the other rank wins the race for the leaf
            os.mkdir(self)
            raise FileExistsError(17, "File exists", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", other_rank_first)
    check_writable_dir(run_dir)
    assert run_dir.is_dir()  # the other rank's directory stays (and so its parent, now not empty)
    monkeypatch.setattr(Path, "mkdir", real_mkdir)
    shutil.rmtree(tmp_path / "probe")
    check_writable_dir(run_dir)  # alone: the probe creates and removes both levels
    assert not (tmp_path / "probe").exists()


def test_a_dry_run_creates_nothing(tmp_path, capsys):
    run_dir = tmp_path / "a" / "b" / "run"
    assert cli_main(train_argv(run_dir) + ["--dry-run"]) == 0
    assert not (tmp_path / "a").exists()


# ----------------------------------------------------------------------------------------------------------------
# Shards


@pytest.fixture
def shards(tmp_path):
    src = tmp_path / "src"
    g = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (src / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(g.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(src / c / f"{i}.png")
    out = tmp_path / "shards"
    assert cli_main(["prepare-data", "--source", str(src), "--resolution", "8", "--out", str(out), "--workers", "1",
                     "--shard-size", "5", "--quiet"]) == 0
    return src, out


def tamper(path: Path) -> None:
    """Change one pixel of the images (after the .npy header): the shapes stay valid, only the checksum can tell."""
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def test_prepare_data_check_verifies_every_shard_and_names_a_tampered_one(shards, capsys):
    src, out = shards
    capsys.readouterr()
    check = ["prepare-data", "--out", str(out), "--check"]  # the source is not needed to verify
    assert cli_main(check) == 0
    said = capsys.readouterr().out
    assert "3 shards, 12 images" in said and "every SHA-256 matches the manifest" in said
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    tamper(out / "shard-00001.npy")
    assert cli_main(check) == EXIT_USAGE
    err = one_line(capsys)
    assert "1 shard file(s) differ from the manifest's SHA-256 (shard-00001.npy)" in err and "rerun" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == {**before, "shard-00001.npy":
                                                                     (out / "shard-00001.npy").stat().st_mtime_ns}


def test_training_with_data_verify_refuses_a_tampered_shard_before_any_step(shards, tmp_path, capsys):
    _, out = shards
    tamper(out / "shard-00002.npy")
    sets = ["data.dataset=shards", f"data.path={out}", "data.resolution=8", "data.verify=true",
            "model.overrides={hidden_size: 32, depth: 2, num_heads: 2, aux_head_depth: 1, bottleneck_dim: 8, "
            "input_size: 8, patch_size: 4, in_channels: 3, num_classes: 2}"]
    run_dir = tmp_path / "run"
    assert cli_main(train_argv(run_dir, *sets)) == EXIT_USAGE
    err = one_line(capsys)
    assert "shard-00002.npy: SHA-256 differs from the manifest's" in err
    assert not (run_dir / "log.jsonl").exists() and not (run_dir / "checkpoints").exists()  # no step was taken
    # without data.verify the cheap open checks shapes only: that is the documented trade-off
    assert cli_main(train_argv(tmp_path / "run2", *sets[:-2], sets[-1])) == 0
