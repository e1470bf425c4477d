"""The compiled training step (``train.compile``) under 2 gloo processes: with the DDP reducer (replicas) a 3-step
run logs the same losses and grad norms (1e-5) and ends with the same weights and EMAs (per tensor) as the same run
eager. Captured with ``aot_eager`` (Dynamo + AOT autograd, no inductor code generation: minutes per graph on the
2-core test machine); slow. FSDP2 cannot run inside a whole-step graph (its hooks are ``torch._dynamo.disable``-d in
torch 2.13): the combination is refused before any work, and a hand-built compiled step over a sharded network
fails with that reason instead of running eagerly."""

import json
from pathlib import Path

import pytest
import torch

from test_dist import SETS, _join_group, assert_runs_match, two_process_results

BATCH = ["train.batch_size=16", "train.accum_steps=2", "objective.impl=lean"]


def _train_worker(rank, port, out_dir):
    """One rank of `pmf train` on tiny-test: eager, then compiled, in the mode named in out_dir/mode.txt."""
    import pmf.train.speed as speed
    from pmf.train.config import load_config
    from pmf.train.loop import train

    _join_group(rank, port)
    speed.BACKEND = "aot_eager"
    out = Path(out_dir)
    mode = (out / "mode.txt").read_text().strip()
    result = {}
    for compiled in (False, True):
        cfg = load_config("tiny-test", overrides=[*SETS, *BATCH, f"train.parallel={mode}",
                                                  f"train.compile={str(compiled).lower()}"])
        summary = train(cfg, out / ("compiled" if compiled else "eager"), quiet=True)
        result["compiled" if compiled else "eager"] = {"step": summary["step"], "compile": summary.get("compile")}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_compiled_equals_eager_on_two_processes_ddp(tmp_path):
    (tmp_path / "mode.txt").write_text("ddp")
    results = two_process_results(_train_worker, tmp_path, timeout=1500)
    for r in results:
        assert r["eager"]["step"] == r["compiled"]["step"] == 3
        assert r["compiled"]["compile"]["graph_breaks"] == 0 and r["compiled"]["compile"]["graphs_compiled"] >= 2
    assert_runs_match(tmp_path / "eager", tmp_path / "compiled", steps=[1, 2, 3])
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["fsdp", "hsdp"])
def test_compile_with_fsdp2_is_refused_with_the_reason(mode):
    from pmf.train.config import load_config
    from pmf.train.validate import ConfigError, validate_config

    with pytest.raises(ConfigError, match="skipping FSDP hooks"):
        validate_config(load_config("tiny-test", overrides=["train.compile=true", f"train.parallel={mode}"]))


def _fsdp_compiled_worker(rank, port, out_dir):
    """A compiled step over an FSDP2-sharded pMF-tiny: the CompileError it raises, per rank."""
    import pmf.train.speed as speed
    from pmf.method.model import build_model
    from pmf.method.objective import ObjectiveConfig, pmf_loss
    from pmf.method.rng import PerSampleGenerator
    from pmf.train import fsdp

    _join_group(rank, port)
    torch.manual_seed(0)
    net = fsdp.shard_model(build_model("pMF-tiny"), torch.device("cpu"))
    x, y = torch.rand(4, 1, 8, 8) * 2 - 1, torch.arange(4) % 3
    step = speed.compile_step(pmf_loss, True)
    step.compiler.backend = "eager"
    try:
        step(net, x, y, ObjectiveConfig(), PerSampleGenerator(range(4 * rank, 4 * rank + 4)))
        err = ""
    except speed.CompileError as e:
        err = str(e)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"error": err}))


@pytest.mark.slow
def test_a_compiled_step_over_fsdp2_fails_loudly(tmp_path):
    for r in two_process_results(_fsdp_compiled_worker, tmp_path, timeout=300):
        assert "graph break" in r["error"] and "skipped" in r["error"], r
