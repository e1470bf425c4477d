"""FSDP2 / HSDP under train.precision=bf16 compute what the replicated run computes under bf16 autocast: the residual
stream (every block's input, the first one being the tokens + position embedding) stays float32, only the linear
layers' weights are gathered in bfloat16, and the loss and the reduced gradients equal the ddp run's. 2 gloo
processes on CPU. For contrast, a network sharded with one bf16 policy per block (every parameter bfloat16) is run
the same way: its residual stream is bfloat16, and its loss moves off the ddp loss."""

import json
from pathlib import Path

import torch

from pmf.parallel import dist
from pmf.train import fsdp, modes
from pmf.train.config import load_config, model_kwargs
from pmf.train.step_end import end_of_step

from test_dist import _join_group, two_process_results

B_GLOBAL, B_LOCAL = 8, 4


def _perturbed_state(kw: dict) -> dict:
    """tiny-test weights with the zero-initialised gates and final layers moved off zero (every block acts)."""
    from pmf.method.model import PMFDiT

    torch.manual_seed(0)
    net = PMFDiT(**kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.state_dict()


def _one_step(net, strategy, cfg, x, y, gen) -> dict:
    """Block-input dtypes, the linear weights' dtype inside the blocks, the global loss and the reduced gradients of
    one bf16 micro-batch (the loss: loss_u, the raw MSE; the adaptively weighted total sits near its number of
    terms by construction)."""
    from pmf.method.objective import pmf_loss
    from pmf.train.precision import autocast_context

    inputs, weights, handles = set(), set(), []
    for blk in fsdp.blocks_of(net):
        handles.append(blk.register_forward_pre_hook(lambda m, a: inputs.add(str(a[0].dtype))))
        handles.append(blk.attn.q_proj.register_forward_pre_hook(lambda m, a: weights.add(str(m.weight.dtype))))
    strategy.start_micro_batch(net, last=True)
    with autocast_context("cpu", "bf16"):
        loss, metrics = pmf_loss(net, x, y, cfg.objective, gen)
    loss.backward()
    strategy.finish_gradients(net, 0)
    for h in handles:
        h.remove()
    # the step's gradient norm from local shards (pmf.train.step_end): sharded, each element counted once
    norm = end_of_step([p for p in net.parameters() if p.grad is not None], {}, (), 0, torch.device("cpu")).grad_norm
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).double()
             for n, p in net.named_parameters() if p.grad is not None}
    return {"norm": norm, "block_inputs": sorted(inputs), "linear_weights": sorted(weights),
            "loss": dist.all_reduce_scalar(float(metrics["loss_u"]), "sum") / dist.world_size(), "grads": grads}


def _worker(rank, port, out_dir):
    from torch.distributed.fsdp import fully_shard

    from pmf.method.rng import PerSampleGenerator

    _join_group(rank, port)
    out = {}
    try:
        cpu = torch.device("cpu")
        kw = model_kwargs(load_config("tiny-test"))
        state = _perturbed_state(kw)
        g = torch.Generator().manual_seed(3)
        X = torch.rand(B_GLOBAL, 1, 28, 28, generator=g) * 2 - 1
        Y = torch.randint(0, 10, (B_GLOBAL,), generator=g)
        mine = torch.arange(B_LOCAL) + B_LOCAL * rank
        x, y = X[mine], Y[mine]

        def gen():
            return PerSampleGenerator((11 + mine).tolist(), mine)

        runs = {}
        for mode, sets in (("ddp", []), ("fsdp", ["train.parallel=fsdp"]),
                           ("hsdp", ["train.parallel=hsdp", "train.hsdp_shard_size=1"])):
            cfg = load_config("tiny-test", overrides=["train.device=cpu", "train.precision=bf16", *sets])
            strategy = modes.make_strategy(cfg, cpu)
            net = strategy.build_net(kw)
            if strategy.sharded:
                fsdp.load_full_model_state_dict(net, state)
            else:
                net.load_state_dict(state)
            runs[mode] = _one_step(net, strategy, cfg, x, y, gen())

        # The contrast: one bf16 policy per unit, as FSDP2 is usually set up (every parameter gathered in bf16).
        cfg = load_config("tiny-test", overrides=["train.device=cpu", "train.precision=bf16", "train.parallel=fsdp"])
        strategy = modes.make_strategy(cfg, cpu)
        net = modes.PMFDiT(**kw)
        net.load_state_dict(state)
        for blk in fsdp.blocks_of(net):
            fully_shard(blk, mp_policy=fsdp.mixed_precision("bf16"))
        fully_shard(net, mp_policy=fsdp.mixed_precision("bf16"))
        for name in fsdp.FORWARD_METHODS:
            fsdp.register_fsdp_forward_method(net, name)
        runs["one_bf16_policy"] = _one_step(net, strategy, cfg, x, y, gen())

        ref = runs["ddp"]
        for mode, r in runs.items():
            rel = {k: float((r["grads"][k] - w).norm() / w.norm().clamp_min(1e-12)) for k, w in ref["grads"].items()
                   if k in r["grads"]}
            grad_rel = max(rel.values())
            out[mode] = {"block_inputs": r["block_inputs"], "linear_weights": r["linear_weights"], "loss": r["loss"],
                         "loss_rel": abs(r["loss"] - ref["loss"]) / abs(ref["loss"]), "grad_rel": grad_rel,
                         "grads_missing": sorted(set(ref["grads"]) - set(r["grads"])), "norm": r["norm"],
                         "norm_of_grads": float(torch.cat([g.flatten() for g in r["grads"].values()]).norm())}
    finally:
        dist.shutdown()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))


def test_sharded_bf16_keeps_the_residual_stream_float32_like_ddp(tmp_path):
    """ddp, fsdp and hsdp (2 replicas x 1) under bf16 autocast, the same weights and draws: every block input is
    float32 in all three, the sharded blocks' linear layers run on bfloat16 gathered weights (ddp: autocast casts its
    float32 weights), the loss equals ddp's (1e-6; measured: bitwise) and every reduced gradient is within 4e-3 per
    tensor of ddp's. The gradients are not bitwise: a weight used by several passes (forward-mode, plain, guidance)
    has its per-pass gradients summed in bfloat16 where ddp's autocast cache shares one bf16 copy, and in float32
    where the sharded path casts per pass (the root's embedders; measured 1.8e-3 worst, in x_embedder). The
    gradient norm of the step (pmf.train.step_end, from local shards: hsdp's replicas counted once) is the full
    gradient's. The single-policy contrast puts bfloat16 on the residual stream: loss and gradients move several times further."""
    for r in two_process_results(_worker, tmp_path, timeout=300):
        assert r["ddp"]["block_inputs"] == ["torch.float32"] and r["ddp"]["linear_weights"] == ["torch.float32"]
        for mode in ("fsdp", "hsdp"):
            c = r[mode]
            assert c["block_inputs"] == ["torch.float32"], (mode, c)
            assert c["linear_weights"] == ["torch.bfloat16"], (mode, c)
            assert c["grads_missing"] == [], (mode, c)
            assert c["loss_rel"] < 1e-6 and c["grad_rel"] < 4e-3, (mode, c)
        for mode in ("ddp", "fsdp", "hsdp"):  # the step's norm, from this rank's shards, is the full gradient's
            assert abs(r[mode]["norm"] - r[mode]["norm_of_grads"]) < 1e-6 * r[mode]["norm_of_grads"], r[mode]
        contrast = r["one_bf16_policy"]
        assert "torch.bfloat16" in contrast["block_inputs"], contrast
        assert contrast["loss_rel"] > 1e-5 and contrast["grad_rel"] > 2 * r["fsdp"]["grad_rel"], contrast
