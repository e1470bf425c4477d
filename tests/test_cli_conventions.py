"""The command line's one syntax (pmf.cli.args, pmf.cli.parser) and what the subcommands share (pmf.cli.session):
every list flag takes space-separated values and refuses a comma, one meaning per flag name, the new forms reach
the library with the values typed, the distributed session is joined and left once (1 and 2 processes), a run's
defaults are read in one place. The one-line errors of the old forms: tests/test_cli_errors.py."""

import argparse
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pmf.cli import build_parser, main
from pmf.cli.session import dist_session, run_defaults
from pmf.errors import PmfError


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def options(sp) -> dict[str, argparse.Action]:
    return {s: a for a in sp._actions for s in a.option_strings if s.startswith("--")}


def test_every_list_flag_takes_spaces_and_refuses_a_comma():
    seen = 0
    for name, sp in subcommands().items():
        for flag, action in options(sp).items():
            if action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1):
                seen += 1
                assert action.type is not None, f"pmf {name} {flag}: no type, so a comma would pass"
                with pytest.raises(argparse.ArgumentTypeError, match=f"lists are space-separated: {flag} 1 2"):
                    action.type("1,2")
    assert seen >= 9  # classes, eval steps, interval x3, omegas, emas, dims, kimg, only


def test_one_meaning_per_flag_name():
    """``--set`` is a config override and ``--steps`` a sampling step count wherever they appear."""
    found = {"--set": [], "--steps": []}
    for name, sp in subcommands().items():
        for flag in found:
            if flag in options(sp):
                found[flag].append(name)
                want = "config override" if flag == "--set" else "sampling step"
                assert want in options(sp)[flag].help, (name, flag, options(sp)[flag].help)
    assert sorted(found["--set"]) == ["import-official", "train"]
    assert sorted(found["--steps"]) == ["eval", "guidance-search", "sample"]


def test_the_new_forms_reach_the_library_typed(tmp_path, monkeypatch):
    import pmf.studies.ablate
    import pmf.studies.toy

    seen = {}
    monkeypatch.setattr(pmf.studies.toy, "toy_cli", lambda out, **kw: seen.update(toy=kw))
    assert main(["toy", "--out", str(tmp_path), "--dims", "2", "8", "--train-steps", "5"]) == 0
    assert seen["toy"]["dims"] == (2, 8) and seen["toy"]["steps"] == 5

    def dry_run(suite, settings, only):
        seen.update(suite=suite, settings=settings, only=only)
        return []

    monkeypatch.setattr(pmf.studies.ablate, "dry_run", dry_run)
    assert main(["ablate", "--out", str(tmp_path), "--kimg", "30", "60", "--only", "c3-full", "2", "--weight-file",
                 "perceptual.lpips_vgg_path=v.pth", "--weight-file", "perceptual.lpips_lin_path=l=2.pth",
                 "--dry-run"]) == 0
    assert seen["settings"].kimg == (30.0, 60.0) and seen["only"] == ["c3-full", "2"]
    assert seen["settings"].files == {"perceptual.lpips_vgg_path": "v.pth", "perceptual.lpips_lin_path": "l=2.pth"}
    args = build_parser().parse_args(["guidance-search", "--checkpoint", "c", "--omegas", "1", "2.5", "--interval",
                                      "0", "1", "--interval", "0.1", "0.8", "--out", "o"])
    assert args.omegas == [1.0, 2.5] and args.interval == [[0.0, 1.0], [0.1, 0.8]]


def test_sample_classes_space_separated_are_the_labels_in_turn(tmp_path):
    """``--classes 2 0``: class-balanced samples cycle through the listed labels in the given order."""
    from pmf.method.model import PMFDiT

    kw = dict(input_size=8, patch_size=4, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=3,
              aux_head_depth=1, bottleneck_dim=4, num_class_tokens=1, num_time_tokens=1, num_cfg_tokens=1,
              num_interval_tokens=2, v_head=False)
    PMFDiT(**kw).save_pretrained(tmp_path / "exp", meta={"noise_scale": 1.0, "omega": 1.0})
    assert main(["sample", "--checkpoint", str(tmp_path / "exp"), "--device", "cpu", "--classes", "2", "0",
                 "--num", "5", "--out", str(tmp_path / "s.npz")]) == 0
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_1"].tolist() == [2, 0, 2, 0, 2]


def test_dist_session_in_one_process_joins_nothing_and_leaves_what_it_started(tmp_path):
    assert not torch.distributed.is_initialized()
    for device in ("cpu", "cuda"):  # one process: no group, the device as given
        with dist_session(device) as d:
            assert d == device and not torch.distributed.is_initialized()

    def join():
        store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
        torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)

    with pytest.raises(RuntimeError, match="inside"):  # a group the block joined is left, also on error
        with dist_session(None):
            join()
            raise RuntimeError("inside")
    assert not torch.distributed.is_initialized()
    join()
    try:  # a group the caller had joined is the caller's to leave
        with dist_session("cpu"):
            pass
        assert torch.distributed.is_initialized()
    finally:
        torch.distributed.destroy_process_group()


def _two_rank_session(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    with dist_session("cpu") as device:
        t = torch.tensor([rank + 1.0])
        torch.distributed.all_reduce(t)
        inside = {"device": device, "world": torch.distributed.get_world_size(), "sum": t.item()}
    (out_dir / f"rank{rank}.json").write_text(json.dumps({**inside, "left": not torch.distributed.is_initialized()}))


@pytest.mark.slow  # two spawned interpreters: about 20 s on 2 busy cores
def test_dist_session_under_two_ranks_joins_one_group_and_leaves_it(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_two_rank_session, args=(port, tmp_path), nprocs=2, join=True, start_method="spawn")
    for r in range(2):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == {"device": "cpu", "world": 2, "sum": 3.0,
                                                                         "left": True}


def test_run_defaults_read_the_run_config_once(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"sample": {"ema": "ema_hl5"},
                                                              "eval": {"steps": [1, 2], "num_samples": 7}}))
    run = run_defaults(str(tmp_path / "run"))
    assert run.ema == "ema_hl5" and run.eval == {"steps": [1, 2], "num_samples": 7}
    assert run.ema_or(None) == "ema_hl5" and run.ema_or("model") == "model"
    export = run_defaults(str(tmp_path / "export.safetensors"))  # not a run directory: nothing set
    assert export.config == {} and export.eval == {} and export.ema == "model"
    (tmp_path / "run" / "config.json").write_text("{not json")
    with pytest.raises(PmfError, match="the run's config is not valid JSON"):
        run_defaults(str(tmp_path / "run"))


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_subcommand_prints_its_help(command, capsys):
    """argparse formats a help text only when asked: every flag's metavar and help must format."""
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"usage: pmf {command}")
