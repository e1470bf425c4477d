"""Bad input gets one line naming the file or key and the fix, exit status 2, before any work (pmf.cli.main,
pmf.train.validate); --debug adds the traceback; unexpected exceptions keep theirs. One row per bad input of
issue 23's probe list."""

import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pmf.cli import main as cli_main
from pmf.errors import EXIT_USAGE
from pmf.method.model import PMFDiT
import pmf.train.dryrun
import pmf.train.loop

TINY = ["--set", "train.threads=1", "--set", "train.device=cpu"]
KW = dict(input_size=8, patch_size=4, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=3,
          aux_head_depth=1, bottleneck_dim=4, num_class_tokens=1, num_time_tokens=1, num_cfg_tokens=1,
          num_interval_tokens=2, v_head=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An intact export, a damaged one, reference statistics of the wrong size, a truncated .npz, a file where a
    directory is expected."""
    root = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    PMFDiT(**KW).save_pretrained(root / "good", meta={"noise_scale": 1.0, "omega": 1.0})
    PMFDiT(**KW).save_pretrained(root / "bad", meta={"noise_scale": 1.0, "omega": 1.0})
    w = root / "bad" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])  # a partial copy
    np.savez(root / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(root / "full.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    data = (root / "full.npz").read_bytes()
    (root / "truncated.npz").write_bytes(data[: len(data) // 2])
    (root / "a_file").write_text("not a directory")
    return root


def train_argv(run_dir, *sets, dry_run=True):
    argv = ["train", "--preset", "tiny-test", "--run-dir", str(run_dir), "--quiet", *TINY]
    for s in sets:
        argv += ["--set", s]
    return argv + (["--dry-run"] if dry_run else [])


# (id, argv builder(files, tmp_path), text the one line must contain)
CASES = [
    ("sample.ema misspelt", lambda f, t: train_argv(t / "r", "sample.ema=ema_hl5"),
     "sample.ema='ema_hl5' is not one of train.ema's copies (ema_hl1, ema_0.99)"),
    ("batch_size=0", lambda f, t: train_argv(t / "r", "train.batch_size=0"),
     "train.batch_size=0 must be a positive integer"),
    ("batch_size=abc", lambda f, t: train_argv(t / "r", "train.batch_size=abc"),
     "train.batch_size='abc' is not a valid int"),
    ("unknown model override", lambda f, t: train_argv(t / "r", "model.overrides={dept: 2}"),
     "unknown PMFDiT argument(s) 'dept'; known: input_size, patch_size"),
    ("total_kimg=-1", lambda f, t: train_argv(t / "r", "train.total_kimg=-1"),
     "train.total_kimg=-1.0 must be a positive number"),
    ("train.device=cuda without CUDA", lambda f, t: train_argv(t / "r", "train.device=cuda"),
     "train.device='cuda' but CUDA is not available"),
    ("run dir under a file", lambda f, t: train_argv(f / "a_file" / "run"),
     "is a file, not a directory; choose another --run-dir"),
    ("run dir cannot be created", lambda f, t: train_argv("/proc/pmf-no-such-run", dry_run=False),
     "--run-dir /proc/pmf-no-such-run cannot be created"),
    ("unknown config key", lambda f, t: train_argv(t / "r", "train.batchsize=4"),
     "unknown config key 'train.batchsize'"),
    ("sample --num 0", lambda f, t: ["sample", "--checkpoint", str(f / "good"), "--num", "0", "--out",
                                     str(t / "x.npz")], "--num=0 must be >= 1"),
    ("sample --omega nan", lambda f, t: ["sample", "--checkpoint", str(f / "good"), "--omega", "nan"],
     "--omega=nan must be a finite number"),
    ("inverted --interval", lambda f, t: ["sample", "--checkpoint", str(f / "good"), "--interval", "0.8", "0.2"],
     "--interval 0.8 0.2 must satisfy 0 <= t_min <= t_max <= 1"),
    ("sample --device cuda without CUDA", lambda f, t: ["sample", "--checkpoint", str(f / "good"), "--device",
                                                        "cuda"], "--device='cuda' but CUDA is not available"),
    ("corrupt export safetensors", lambda f, t: ["sample", "--checkpoint", str(f / "bad"), "--device", "cpu",
                                                 "--out", str(t / "g.png")], "cannot load the export"),
    ("missing checkpoint", lambda f, t: ["sample", "--checkpoint", str(t / "nowhere")], "does not exist"),
    ("ref stats of the wrong size", lambda f, t: ["eval", "--checkpoint", str(f / "good"), "--device", "cpu",
                                                  "--extractor", "inception", "--ref-stats", str(f / "small.npz")],
     "holds 64-dimensional statistics but the Inception extractor's features are 2048-dimensional"),
    ("truncated npz", lambda f, t: ["eval", "--checkpoint", str(f / "good"), "--device", "cpu", "--extractor",
                                    "inception", "--ref-stats", str(f / "truncated.npz")],
     "truncated.npz cannot be read"),
    ("eval --steps 0", lambda f, t: ["eval", "--checkpoint", str(f / "good"), "--device", "cpu", "--steps", "0"],
     "every step count must be >= 1"),
    ("inverted guidance-search --interval", lambda f, t: ["guidance-search", "--checkpoint", str(f / "good"),
                                                          "--omegas", "1", "--interval", "0.8", "0.2", "--out",
                                                          str(t / "gs")],
     "--interval 0.8 0.2 must satisfy 0 <= t_min <= t_max <= 1"),
    ("sample --rows 0", lambda f, t: ["sample", "--checkpoint", str(f / "good"), "--rows", "0"],
     "--rows=0 must be >= 1"),
    ("eval-samples --k 0", lambda f, t: ["eval-samples", "--samples", str(t / "s.npz"), "--k", "0"],
     "--k=0 must be >= 1"),
]

# Old or wrong forms of the command line (comma lists, renamed or moved flags): (argv, the fix the line names)
OLD_FORMS = [
    (["sample", "--checkpoint", "x", "--classes", "0,3,7"], "lists are space-separated: --classes 0 3 7"),
    (["eval", "--checkpoint", "x", "--steps", "1,2,4"], "lists are space-separated: --steps 1 2 4"),
    (["guidance-search", "--checkpoint", "x", "--omegas", "1,2", "--out", "o"], "space-separated: --omegas 1 2"),
    (["guidance-search", "--checkpoint", "x", "--omegas", "1", "--intervals", "0,1", "0.1,0.8", "--out", "o"],
     "give each interval as --interval T_MIN T_MAX, once per interval"),
    (["guidance-search", "--checkpoint", "x", "--omegas", "1", "--interval", "0,1", "0.1,0.8", "--out", "o"],
     "lists are space-separated: --interval 0 1"),
    (["guidance-search", "--checkpoint", "x", "--omegas", "1", "--interval", "0,1", "--out", "o"],
     "--interval T_MIN T_MAX, e.g. --interval 0.1 0.8"),
    (["sample", "--checkpoint", "x", "--interval", "0.1,0.8"], "--interval T_MIN T_MAX, e.g. --interval 0.1 0.8"),
    (["toy", "--out", "o", "--dims", "2,8,16"], "lists are space-separated: --dims 2 8 16"),
    (["toy", "--out", "o", "--steps", "100"], "the toy study's training steps are --train-steps N"),
    (["ablate", "--out", "o", "--kimg", "30,60"], "lists are space-separated: --kimg 30 60"),
    (["ablate", "--out", "o", "--set", "perceptual.lpips_vgg_path=v.pth"], "weight files are --weight-file KEY=PATH"),
    (["ablate", "--out", "o", "--weight-file", "v.pth"], "'v.pth' is not KEY=VALUE: --weight-file perceptual."),
    (["eval", "--samples", "s.npz", "--extractor", "fmnist"], "pmf eval-samples --samples FILE.npz"),
    (["eval", "--checkpoint", "x", "--k", "5"], "pmf eval-samples --samples FILE.npz --k K"),
    (["sample", "--out", "g.png"], "the following arguments are required: --checkpoint"),
    (["smaple", "--checkpoint", "x"], "invalid choice: 'smaple'"),
]


@pytest.mark.parametrize("argv,fix", OLD_FORMS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in OLD_FORMS])
def test_an_old_or_wrong_command_line_gets_one_line_naming_the_fix(argv, fix, capsys, monkeypatch):
    import pmf.cli.commands

    for name in dir(pmf.cli.commands):
        if name.startswith("cmd_"):
            monkeypatch.setattr(pmf.cli.commands, name, lambda args: pytest.fail("ran a command line that is wrong"))
    assert cli_main(argv) == EXIT_USAGE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pmf") and "error: " in lines[0], lines
    assert fix in lines[0], lines[0]


def test_the_installed_entry_point_prints_the_one_line_too(tmp_path):
    """Through ``python -m pmf`` (the console script's main): exit status 2, one line on stderr, no usage block."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src") + os.pathsep
           + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "pmf", "sample", "--checkpoint", "x", "--classes", "0,3,7"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_USAGE and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["pmf sample: error: argument --classes: '0,3,7': lists are "
                                                "space-separated: --classes 0 3 7 (`pmf sample --help` lists the "
                                                "options)"]


@pytest.mark.parametrize("name,argv,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_exit_2(files, tmp_path, capsys, monkeypatch, name, argv, expect):
    if "CUDA" in expect and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    monkeypatch.setattr(pmf.train.loop, "load_dataset", lambda cfg: pytest.fail("reached the data: checked too late"))
    rc = cli_main(argv(files, tmp_path))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == EXIT_USAGE, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("pmf ") and expect in lines[0], lines[0]
    assert not (tmp_path / "r").exists()  # nothing written


def test_debug_prints_the_traceback_of_an_expected_error(tmp_path, capsys):
    assert cli_main(train_argv(tmp_path / "r", "train.batch_size=0") + ["--debug"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConfigError" in err and err.strip().splitlines()[-1].startswith("pmf train:")


def test_unexpected_exceptions_keep_their_traceback(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(pmf.train.dryrun, "run_plan", boom)
    with pytest.raises(ZeroDivisionError, match="a bug"):  # not turned into a one-line "expected" error
        cli_main(train_argv(tmp_path / "r"))


def test_sample_num_1_writes_exactly_1(files, tmp_path):
    """The fix of `--num 0 writes 80 images` does not change a positive --num."""
    assert cli_main(["sample", "--checkpoint", str(files / "good"), "--device", "cpu", "--num", "1", "--out",
                     str(tmp_path / "one.npz")]) == 0
    with np.load(tmp_path / "one.npz") as f:
        assert len(f[f.files[0]]) == 1


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_a_full_disk_gives_one_line_naming_the_file(tmp_path):
    """A write that fails part-way (RLIMIT_FSIZE: the kernel refuses bytes past 50 kB, as a full disk would) ends in
    one line naming the state, exit 2, and leaves no temp file or directory behind."""
    run_dir = tmp_path / "run"
    script = ("import resource, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (50000, resource.RLIM_INFINITY))\n"
              "from pmf.cli import main\n"
              f"sys.exit(main({train_argv(run_dir, 'train.total_kimg=0.032', dry_run=False)!r}))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src") + os.pathsep
           + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == EXIT_USAGE, proc.stderr[-3000:]
    assert len(lines) == 1 and "state-000000001 failed" in lines[0] and "disk space" in lines[0], lines
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
