"""The parallel strategies (pmf.train.modes) with gloo processes on CPU: the same run on 1 process, ddp(2),
fsdp(2) and hsdp(2x2) ends with the same losses and weights; a run resumed from a sharded checkpoint (on the same or
another layout) equals an uninterrupted one; meta-device initialisation equals the plain CPU build bit for bit;
the HSDP mesh and the bf16 all-gather policy; training states: round trip, strict load, damaged-state fallback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pmf.method.model import PMFDiT
from pmf.parallel import dist
from pmf.train import fsdp, modes, state_dir
from pmf.train.checkpoint import (DAMAGED_SUFFIX, STATE_DIR, load_latest, load_training_state, open_latest,
                                  save_training_state)
from pmf.train.config import load_config, model_kwargs
from pmf.train.loop import train
from pmf.train.validate import validate_config

from test_dist import ENV, _join_group, assert_close_per_tensor, assert_runs_match, read_log, two_process_results

# The objectives the sharded modes run with: every mode of the parity and resume tests runs with each (the lean
# objective's forward-mode pass enters FSDP2 units with plain tensors, pmf.method.objective_lean).
SHARDED_OBJECTIVE_IMPLS = ["reference", "lean"]

# 3 steps of a global batch of 16 in 2 micro-batches; one log record and a cross-rank check per step; checkpoints
# only where a test asks.
SETS = ["train.batch_size=16", "train.accum_steps=2", "train.sample_every_kimg=0", "train.log_every_kimg=0.016",
        "train.check_every_kimg=0.016", "train.ckpt_every_kimg=1000", "train.ckpt_every_minutes=1000",
        "train.threads=1", "train.device=cpu"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()  # train() sets the process-wide thread count
    yield
    torch.set_num_threads(n)


def torchrun(nproc: int, run_dir: Path, sets: list[str], timeout: float = 600) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "pmf",
           "train", "--preset", "tiny-test", "--run-dir", str(run_dir), "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


# ----------------------------------------------------------------------------------------------------------------
# One process, instant


def test_meta_init_equals_the_plain_cpu_build():
    """build_initialised (meta device -> to_empty -> seeded values) gives every parameter and buffer (also the
    non-persistent RoPE tables) of torch.manual_seed(seed); PMFDiT(**kw) bit for bit, and leaves the generator where
    the plain build leaves it; another seed gives other weights."""
    kw = model_kwargs(load_config("tiny-test"))
    torch.manual_seed(5)
    ref = PMFDiT(**kw)
    after_ref = torch.rand(3)
    net = modes.build_initialised(kw, 5, torch.device("cpu"))
    after = torch.rand(3)
    want = {**dict(ref.named_parameters()), **dict(ref.named_buffers())}
    got = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    assert set(got) == set(want) and "rope_cos" in got
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    assert torch.equal(after, after_ref)
    other = modes.build_initialised(kw, 6, torch.device("cpu"))
    assert not torch.equal(other.pos_embed, net.pos_embed)
    assert all(not p.is_meta for p in net.parameters())


def test_strategy_choice_and_hsdp_mesh_shape(monkeypatch):
    assert modes.mode_of("fsdp", 1) == modes.mode_of("ddp", 1) == "none"
    assert [modes.mode_of(m, 4) for m in ("ddp", "fsdp", "hsdp")] == ["ddp", "fsdp", "hsdp"]
    assert fsdp.hsdp_mesh_shape(8, 4) == (2, 4) and fsdp.hsdp_mesh_shape(4, 4) == (1, 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # default shard group: the processes of one node
    assert fsdp.hsdp_mesh_shape(8) == (4, 2)
    with pytest.raises(ValueError, match=r"shard group size 3 does not divide the world size 8.*hsdp_shard_size"):
        fsdp.hsdp_mesh_shape(8, 3)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="does not divide"):
        fsdp.hsdp_mesh_shape(8)
    with pytest.raises(ValueError, match="hsdp_shard_size=-1 must be >= 0"):
        validate_config(load_config("tiny-test", overrides=["train.hsdp_shard_size=-1"]))
    assert load_config("tiny-test", overrides=["train.parallel=hsdp"]).train.parallel == "hsdp"
    assert fsdp.mixed_precision("bf16").param_dtype == torch.bfloat16
    assert fsdp.mixed_precision("bf16").reduce_dtype == torch.float32
    assert fsdp.mixed_precision("fp32").param_dtype is None


def _tiny_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 4, generator=g)
    return {"net": {"w": w, "b": torch.randn(4, generator=g)},
            "optimizer": {"state": {0: {"momentum_buffer": torch.randn(6, 4, generator=g)},
                                    1: {"step": torch.tensor(3, dtype=torch.int64), "exp_avg": torch.randn(4, generator=g)}},
                          "param_groups": [{"params": [0], "lr": 0.1, "betas": (0.9, 0.95)}, {"params": [1], "lr": 0.2}]},
            "ema": {"names": ["ema_hl1"], "ramp": 0.05, "shadow": {"ema_hl1": {"w": w * 2, "b": torch.zeros(4)}}},
            "loader": {"nimg": 16 * seed, "seed": 0, "num_items": 100}, "nimg": 16 * seed, "nonfinite_run": 0,
            "nonfinite_total": 1, "config": "{}"}


def _assert_same_state(got: dict, want: dict) -> None:
    for key in ("nimg", "loader", "nonfinite_total", "config"):
        assert got[key] == want[key], key
    for k, v in want["net"].items():
        assert torch.equal(got["net"][k], v), k
    assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]  # tuples stay tuples
    for i, st in want["optimizer"]["state"].items():
        assert set(got["optimizer"]["state"][i]) == set(st)
        for k, v in st.items():
            assert torch.equal(got["optimizer"]["state"][i][k], v) and got["optimizer"]["state"][i][k].dtype == v.dtype
    assert got["ema"]["names"] == want["ema"]["names"] and got["ema"]["ramp"] == want["ema"]["ramp"]
    for k, v in want["ema"]["shadow"]["ema_hl1"].items():
        assert torch.equal(got["ema"]["shadow"]["ema_hl1"][k], v)


def test_a_state_loads_strictly(tmp_path):
    """A state loads into a run of the same network (into a fresh optimizer, whose state does not exist yet), and a
    state holding a tensor this run does not have is refused, naming it (DCP alone loads only the tensors asked for
    and would skip it without a word)."""
    cfg = load_config("tiny-test", overrides=["train.device=cpu"])
    kw = model_kwargs(cfg)
    strategy = modes.make_strategy(cfg, torch.device("cpu"), world=1)

    def built():
        net = strategy.build_net(kw)
        return net, strategy.build_optimizer(net), modes.EMA(net, cfg.train.ema, ramp=cfg.train.ema_ramp)

    net, opt, ema = built()
    for p in net.parameters():  # one step: every optimizer state tensor exists
        p.grad = torch.randn_like(p)
    opt.step()
    strategy.save_training_state(tmp_path / "same", 1, net, opt, ema, {"nimg": 0})
    net2, opt2, ema2 = built()
    load_training_state(open_latest(tmp_path / "same"), net2, opt2, ema2)
    for k, v in net.state_dict().items():
        assert torch.equal(net2.state_dict()[k], v), k
    for p, p2 in zip(net.parameters(), net2.parameters()):
        assert opt.state[p].keys() == opt2.state[p2].keys()
        assert all(torch.equal(v, opt2.state[p2][k]) for k, v in opt.state[p].items())
    state = {"net": {**net.state_dict(), "extra_scale": torch.ones(3)}, "optimizer": opt.state_dict(),
             "ema": ema.state_dict(), "nimg": 0}
    save_training_state(tmp_path / "other", state, 1)
    with pytest.raises(ValueError, match=r"1 of its tensors are not in this run, e\.g\. \['net/extra_scale'\]"):
        load_training_state(open_latest(tmp_path / "other"), *built())


def test_state_round_trip_rotation_and_damaged_fallback(tmp_path):
    """A state directory (written here by one process) is self-describing (manifest: kind, step, nimg, format
    version, per-file SHA-256), reads back as it was saved, rotates (keep 2), and a damaged newest one (a flipped
    byte in a data file, or no manifest: an unfinished write) is skipped for the previous one and, by the writer,
    renamed *.damaged."""
    for step in (1, 2, 3):
        save_training_state(tmp_path, _tiny_state(step), step)
    ckpt = tmp_path / STATE_DIR
    assert sorted(p.name for p in ckpt.iterdir()) == ["state-000000002", "state-000000003"]  # keep=2
    manifest = json.loads((ckpt / "state-000000003" / state_dir.MANIFEST).read_text())
    assert manifest["kind"] == state_dir.KIND and (manifest["step"], manifest["nimg"]) == (3, 48)
    assert manifest["format_version"] >= 1 and ".metadata" in manifest["files"] and "extra.pt" in manifest["files"]
    got = load_latest(tmp_path)
    assert got["step"] == 3
    _assert_same_state(got, _tiny_state(3))
    opened = open_latest(tmp_path)  # the trainer's form: no tensors, the path to read them from
    assert opened.path.name == "state-000000003" and opened["net"] == {"w": None, "b": None} and opened["nimg"] == 48

    shard = next(p for p in (ckpt / "state-000000003").iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="does not match its recorded SHA-256"):
        got = load_latest(tmp_path, set_aside=True)
    assert got["step"] == 2
    _assert_same_state(got, _tiny_state(2))
    assert (ckpt / ("state-000000003" + DAMAGED_SUFFIX)).is_dir()
    (ckpt / "state-000000002" / state_dir.MANIFEST).unlink()
    with pytest.raises(Exception, match="no readable training state"):
        load_latest(tmp_path)


def test_dry_run_reports_the_strategy_and_memory_per_mode(tmp_path, monkeypatch):
    """--dry-run on 16 planned devices: the chosen strategy, the HSDP mesh, and the per-device peak under each mode;
    sharding over 16 devices (fsdp) needs less than over a node's 8 (hsdp), which needs less than replicas (ddp);
    a shard group that does not divide the world is reported."""
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = load_config("pmf-b16-in256", overrides=["train.parallel=hsdp", "train.hsdp_shard_size=8",
                                                  "objective.impl=reference", "train.device=cpu",
                                                  "train.compile=false"])
    summary = train(cfg, tmp_path / "x", dry_run=True, plan_device_memory=80)
    assert (summary["strategy"], summary["shard_degree"], summary["hsdp_mesh"]) == ("hsdp", 8, [2, 8])
    by_mode = summary["est_peak_gib_per_device_by_mode"]
    assert by_mode["fsdp"] < by_mode["hsdp"] < by_mode["ddp"] and by_mode["hsdp"] == summary["est_peak_gib_per_device"]
    cfg.train.hsdp_shard_size = 6
    summary = train(cfg, tmp_path / "x", dry_run=True, plan_device_memory=80)
    assert any("shard group size 6 does not divide the world size 16" in n for n in summary["notes"])
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------------------------
# Two processes: sharded initialisation and the mixed-precision policy


def _build_worker(rank, port, out_dir):
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from pmf.method.objective import ObjectiveConfig, pmf_loss
    from pmf.method.rng import PerSampleGenerator
    from pmf.train.precision import autocast_context

    _join_group(rank, port)
    out = {}
    try:
        cpu = torch.device("cpu")
        base = ["train.device=cpu", "objective.impl=reference"]
        kw = model_kwargs(load_config("tiny-test"))
        torch.manual_seed(0)
        ref = dict(PMFDiT(**kw).named_parameters())
        for name, sets in (("fsdp", ["train.parallel=fsdp"]),
                           ("hsdp", ["train.parallel=hsdp", "train.hsdp_shard_size=1"])):
            cfg = load_config("tiny-test", overrides=[*base, *sets])
            strategy = modes.make_strategy(cfg, cpu)
            net = strategy.build_net(kw)
            params = dict(net.named_parameters())
            out[f"{name}_all_dtensor"] = all(isinstance(p, DTensor) for p in params.values())
            out[f"{name}_placements"] = sorted({str(tuple(p.placements)) for p in params.values()})
            out[f"{name}_equal"] = all(torch.equal(params[k].full_tensor(), v) for k, v in ref.items())
            out[f"{name}_describe"] = strategy.describe()
        out["expected_placements"] = {"fsdp": str((Shard(0),)), "hsdp": str((Replicate(), Shard(0)))}
        try:  # a rank-dependent seed: the copies the shards would be cut from differ, caught on every rank
            cfg = load_config("tiny-test", overrides=[*base, "train.parallel=fsdp", f"train.seed={rank}"])
            modes.make_strategy(cfg, cpu).build_net(kw)
            out["seed_mismatch"] = "not caught"
        except dist.ConsistencyError as e:
            out["seed_mismatch"] = str(e)

        # bf16: every block computes with bfloat16 weights (all-gathered in bf16); shards, gradients stay fp32.
        cfg = load_config("tiny-test", overrides=[*base, "train.parallel=fsdp", "train.precision=bf16"])
        net = modes.make_strategy(cfg, cpu).build_net(kw)
        seen = []
        for blk in fsdp.blocks_of(net):  # the linear layers gathered in bf16; the gates (as autocast) float32
            blk.attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(str(m.weight.dtype)))
            blk.register_forward_pre_hook(lambda m, a: seen.append("gate " + str(m.attn_scale.dtype)))
        x = torch.rand(2, 1, 28, 28) * 2 - 1
        y = torch.tensor([1, 2])
        idx = torch.arange(2) + 2 * rank
        with autocast_context("cpu", "bf16"):
            loss, _ = pmf_loss(net, x, y, ObjectiveConfig(impl="reference"), PerSampleGenerator((7 + idx).tolist(), idx))
        loss.backward()
        out["bf16_block_weights"] = sorted(set(seen))
        out["bf16_shards"] = sorted({str(p.dtype) for p in net.parameters()})
        out["bf16_grads"] = sorted({str(p.grad.dtype) for p in net.parameters() if p.grad is not None})
    finally:
        dist.shutdown()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))


def test_sharded_builds_and_the_bf16_policy(tmp_path):
    """fsdp (1-D mesh) and hsdp (2x1 mesh: replicate x shard) networks built from the meta device hold, gathered,
    exactly the plain CPU build's weights, with the placements of their mesh; ranks whose seeded copies differ are
    stopped before sharding; under train.precision=bf16 the blocks'
    linear layers run on bfloat16 all-gathered weights (their gates stay float32, as under autocast) while the shards
    and reduced gradients stay float32."""
    for f in two_process_results(_build_worker, tmp_path, timeout=300):
        for name in ("fsdp", "hsdp"):
            assert f[f"{name}_all_dtensor"] and f[f"{name}_equal"], (name, f)
            assert f[f"{name}_placements"] == [f["expected_placements"][name]], (name, f)
        assert f["hsdp_describe"] == {"mode": "hsdp", "world_size": 2, "sharded": True, "mesh": [2, 1]}
        assert f["seed_mismatch"].startswith("initial parameters differ across ranks"), f["seed_mismatch"]
        assert f["bf16_block_weights"] == ["gate torch.float32", "torch.bfloat16"], f
        assert f["bf16_shards"] == ["torch.float32"] and f["bf16_grads"] == ["torch.float32"], f


# ----------------------------------------------------------------------------------------------------------------
# Parity: 1 process == ddp(2) == fsdp(2) == hsdp(2x2)

# ~20-30 s each (make test-slow). The default suite keeps ddp(2) and fsdp(2) parity (tests/test_dist.py,
# tests/test_fsdp.py) and the hsdp build (test_sharded_builds_and_the_bf16_policy).
MODES = [("ddp", 2, []), ("fsdp", 2, []), ("hsdp", 4, ["train.hsdp_shard_size=2"])]


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
    """The uninterrupted 1-process reference of (objective impl, steps) (memoised across the tests of this module)."""
    cache = {}

    def get(impl: str, steps: int = 3) -> Path:
        if (impl, steps) not in cache:
            run_dir = tmp_path_factory.mktemp(f"one-{impl}-{steps}") / "run"
            train(load_config("tiny-test", overrides=[*SETS, f"objective.impl={impl}",
                                                      f"train.total_kimg={0.016 * steps:.3f}"]), run_dir, quiet=True)
            cache[impl, steps] = run_dir
        return cache[impl, steps]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("impl", SHARDED_OBJECTIVE_IMPLS)
@pytest.mark.parametrize("mode,nproc,extra", MODES, ids=[m[0] for m in MODES])
def test_every_strategy_matches_one_process(mode, nproc, extra, impl, one_process_runs, tmp_path):
    """The same 3 steps (2 micro-batches each) under ddp(2), fsdp(2) and hsdp(4 processes as 2 replicas x 2
    shards): losses and grad norms at rtol 1e-5 per step, weights and EMAs per tensor at 1e-4 (assert_runs_match);
    every run's final state is one directory (each rank wrote its part), read back here in one process."""
    run_dir = tmp_path / mode
    torchrun(nproc, run_dir, [*SETS, f"objective.impl={impl}", "train.total_kimg=0.048", f"train.parallel={mode}",
                              *extra])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["strategy"], summary["step"]) == (nproc, mode, 3)
    assert sorted(p.name for p in (run_dir / STATE_DIR).iterdir()) == ["state-000000003"]
    manifest = json.loads((run_dir / STATE_DIR / "state-000000003" / state_dir.MANIFEST).read_text())
    assert (manifest["mode"], manifest["world_size"]) == (mode, nproc)
    if mode == "hsdp":
        assert manifest["mesh"] == [2, 2]
    assert_runs_match(one_process_runs(impl), run_dir, steps=[1, 2, 3])
    assert (run_dir / "export" / "ema_hl1" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("impl", SHARDED_OBJECTIVE_IMPLS)
def test_resume_from_sharded_states_is_exact(impl, one_process_runs, tmp_path):
    """One run, one step per launch, each resuming the state the previous one wrote: fsdp(2) -> fsdp(2) (the same
    layout) -> hsdp(2 replicas x 1) (resharded onto a 2-D mesh); then ddp(2) reruns the finished run, which loads the
    sharded state into full-tensor replicas and writes it again, and one process reruns it once more (2 ranks' state
    into 1). The losses of every step, and the final state's weights, EMAs, optimizer state and data position, equal
    3 uninterrupted steps in one process (3 steps: the tolerance convention of assert_close_per_tensor; Muon lifts
    summation-order noise step by step)."""
    run_dir = tmp_path / "run"
    sets = [*SETS, f"objective.impl={impl}"]
    stages = [["train.parallel=fsdp"], ["train.parallel=fsdp"], ["train.parallel=hsdp", "train.hsdp_shard_size=1"]]
    for step, mode in enumerate(stages, start=1):
        out = torchrun(2, run_dir, [*sets, *mode, f"train.total_kimg={0.016 * step:.3f}"])
        assert (step == 1) or "resumed" in out
        manifest = json.loads((run_dir / STATE_DIR / f"state-{step:09d}" / state_dir.MANIFEST).read_text())
        assert (manifest["step"], manifest["nimg"], manifest["mode"]) == (step, 16 * step, mode[0][15:])
    assert manifest["mesh"] == [2, 1]
    out = torchrun(2, run_dir, [*sets, "train.parallel=ddp", "train.total_kimg=0.048"])
    manifest = json.loads((run_dir / STATE_DIR / "state-000000003" / state_dir.MANIFEST).read_text())
    assert "resumed" in out and (manifest["mode"], manifest["world_size"]) == ("ddp", 2)
    assert train(load_config("tiny-test", overrides=[*sets, "train.total_kimg=0.048"]), run_dir, quiet=True)["step"] == 3
    assert [r["step"] for r in read_log(run_dir)] == [1, 2, 3]

    a, b = assert_runs_match(one_process_runs(impl), run_dir, steps=[1, 2, 3])  # b: the final state
    assert b["loader"] == a["loader"] and b["nimg"] == a["nimg"] == 48
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert set(sa) == set(sb)
    for i, st in sa.items():
        assert set(st) == set(sb[i])
        assert_close_per_tensor({k: v for k, v in sb[i].items() if v.ndim}, {k: v for k, v in st.items() if v.ndim},
                                f"optimizer.state[{i}]")
        assert all(torch.equal(v, sb[i][k]) for k, v in st.items() if v.ndim == 0)  # step counters
