"""Muon's Newton-Schulz partitioned across ranks (pmf.parallel.ns_partition, BatchedMuon(partition=True)): the FLOP
assignment against a brute-force optimum, and with 2 and 4 gloo processes the partitioned update against the
single-process BatchedMuon update, step by step, with each rank orthogonalising only its share."""

import itertools
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from pmf.parallel import ns_partition
from pmf.parallel.ns_partition import assign_owners, loads, ns_flops
from pmf.train.optim import BatchedMuon

# A mix of shapes: square, tall (transposed inside Newton-Schulz), wide, odd sizes; several shapes hold fewer
# matrices than 4 ranks, so a shape's stack is split across ranks or left to one.
SHAPES = [(16, 16), (32, 8), (16, 16), (8, 24), (5, 7), (40, 40), (32, 8), (16, 16)]
FEW = [(6, 4), (4, 6), (3, 3)]  # fewer matrices than ranks: some rank owns nothing
STEPS = 3
HYPER = dict(lr=0.02, weight_decay=0.01, momentum=0.95, nesterov=True, ns_coefficients=(3.4445, -4.7750, 2.0315),
             eps=1e-8, ns_steps=5, adjust_lr_fn="original")
NS_DTYPES = {"fp32": torch.float32, "default": None, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------------
# The assignment (no processes)


def test_ns_flops_counts_the_three_matmuls_per_step():
    # (m, n) = (8, 24): wide, s = 8, l = 24. A = X X^T: 8x24 @ 24x8 -> 2*8*8*24; A A: 2*8^3; (bA + cA^2) X: 2*8*8*24.
    per_step = 2 * 8 * 8 * 24 + 2 * 8**3 + 2 * 8 * 8 * 24
    assert ns_flops((8, 24), steps=5) == ns_flops((24, 8), steps=5) == 5 * per_step
    # Counted by instrumenting one real iteration: torch's FLOP counter over the same matmuls.
    from torch.utils.flop_counter import FlopCounterMode

    X = torch.randn(1, 8, 24)
    with FlopCounterMode(display=False) as fc:
        A = X @ X.mT
        torch.baddbmm(X, torch.baddbmm(A, A, A, beta=-4.775, alpha=2.0315), X, beta=3.4445)
    assert fc.get_total_flops() == per_step


def _brute_force_makespan(costs, world):
    return min(max(loads(costs, owners, world)) for owners in itertools.product(range(world), repeat=len(costs)))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_assignment_is_balanced_complete_and_deterministic(world):
    g = torch.Generator().manual_seed(world)
    for trial in range(20):
        n = int(torch.randint(1, 8, (1,), generator=g))
        shapes = [tuple(int(d) for d in torch.randint(1, 64, (2,), generator=g)) for _ in range(n)]
        costs = [ns_flops(s) for s in shapes]
        owners = assign_owners(costs, world)
        assert len(owners) == n and all(0 <= r < world for r in owners)
        assert assign_owners(list(costs), world) == owners  # same input, same answer (every rank computes it)
        load = loads(costs, owners, world)
        assert sum(load) == sum(costs)  # every matrix exactly once
        best = _brute_force_makespan(costs, world)  # the optimal split, by enumeration
        assert max(load) <= best * (4 / 3 - 1 / (3 * world)) + 1e-9, (shapes, load, best)  # Graham's LPT bound
        assert max(load) <= sum(costs) / world + max(costs)


def test_assignment_edge_cases():
    assert assign_owners([5, 3, 9], 1) == [0, 0, 0]  # one process owns everything
    assert sorted(assign_owners([5, 3, 9], 4)) == [0, 1, 2]  # more ranks than matrices: one each, rank 3 idle
    assert assign_owners([7, 7, 7, 7], 2) == [0, 1, 0, 1]  # ties: lower index first, least loaded lower rank first
    assert assign_owners([], 3) == []
    with pytest.raises(ValueError, match="world size"):
        assign_owners([1], 0)
    # Equal stacks of one shape split evenly: 12 equal blocks' worth of matrices over 4 ranks, 3 each.
    assert loads([10] * 12, assign_owners([10] * 12, 4), 4) == [30] * 4


def test_no_process_group_means_no_partition():
    assert not torch.distributed.is_initialized()
    assert ns_partition.active_world(True) == (1, 0) and ns_partition.active_world(False) == (1, 0)


# ----------------------------------------------------------------------------------------------------------------
# Partitioned vs single process


def make_params(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in shapes]


def grads_at(shapes, step):
    """The averaged gradients of step ``step``: identical on every rank, as after the DDP all-reduce."""
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=g) for s in shapes]


def run_steps(opt, params, shapes, steps, first=0):
    """``steps`` optimizer steps from step ``first``; the parameters after each."""
    out = []
    for k in range(first, first + steps):
        for p, gr in zip(params, grads_at(shapes, k)):
            p.grad = gr.clone()
        opt.step()
        out.append([p.detach().clone() for p in params])
    return out


def reference(shapes, ns_dtype):
    """One process, no partition: parameters after each step, the state after STEPS - 1 steps, and the state
    after STEPS."""
    params = make_params(shapes)
    opt = BatchedMuon(params, **HYPER, ns_dtype=ns_dtype)
    before = run_steps(opt, params, shapes, STEPS - 1)
    mid = {"params": [p.detach().clone() for p in params], "optimizer": _clone(opt.state_dict())}
    last = run_steps(opt, params, shapes, 1, first=STEPS - 1)
    return before + last, mid, _clone(opt.state_dict())


def _clone(sd):
    return {"state": {k: {n: v.clone() for n, v in st.items()} for k, st in sd["state"].items()},
            "param_groups": [dict(g) for g in sd["param_groups"]]}


def _partition_worker(rank, world, store, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = {}
        for case, shapes in (("mix", SHAPES), ("few", FEW)):
            for name, ns_dtype in NS_DTYPES.items():
                params = make_params(shapes)
                opt = BatchedMuon(params, **HYPER, ns_dtype=ns_dtype, partition=True)
                seen = []  # shapes of the matrices this rank orthogonalised, per call
                real = opt.orthogonalize
                opt.orthogonalize = lambda mats, group, real=real, seen=seen: (
                    seen.append([tuple(m.shape) for m in mats]) or real(mats, group))
                after = run_steps(opt, params, shapes, STEPS)
                # Resume: a single-process state after STEPS - 1 steps, loaded into a fresh partitioned optimizer.
                mid = torch.load(os.path.join(out_dir, f"mid-{case}-{name}.pt"))
                params2 = [torch.nn.Parameter(p.clone()) for p in mid["params"]]
                opt2 = BatchedMuon(params2, **HYPER, ns_dtype=ns_dtype, partition=True)
                opt2.load_state_dict(mid["optimizer"])
                resumed = run_steps(opt2, params2, shapes, 1, first=STEPS - 1)
                results[(case, name)] = {"after": after, "seen": seen, "state": _clone(opt.state_dict()),
                                         "resumed": resumed[0]}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def run_world(world, out_dir, timeout=240.0):
    """``_partition_worker`` on ``world`` spawned gloo processes; fail (killing them) instead of hanging."""
    store = os.path.join(out_dir, "store")
    ctx = mp.start_processes(_partition_worker, args=(world, store, out_dir), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.time() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.time())):
            if time.time() > deadline:
                pytest.fail(f"{world}-process run did not finish in {timeout:.0f} s (deadlocked collectives?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


def assert_update_close(got, want, start, ns_dtype, what):
    """Per parameter: ||got - want|| <= tol ||want - start|| (the update's size). fp32 Newton-Schulz: 1e-6 (float
    rounding of a different batch split); bf16: 2e-2 (bf16 keeps 8 significant bits, ~4e-3 relative)."""
    tol = 1e-6 if ns_dtype == torch.float32 else 2e-2
    for i, (g, w, s) in enumerate(zip(got, want, start)):
        err = float((g.double() - w.double()).norm() / (w.double() - s.double()).norm())
        assert err <= tol, f"{what}: matrix {i} {tuple(w.shape)}: relative difference {err:.3g} > {tol}"


@pytest.mark.parametrize("world", [2, 4])
def test_partitioned_muon_equals_one_process(world, tmp_path):
    """Each of ``world`` ranks orthogonalises only its FLOP share; after every step all ranks hold identical
    parameters equal to the single-process BatchedMuon's (fp32 Newton-Schulz tightly, bf16 and the default dtype at
    bf16 precision), the optimizer state equals the single process's in layout and value, and a single-process
    checkpoint resumes into the partitioned optimizer and continues like the single process."""
    refs = {}
    for case, shapes in (("mix", SHAPES), ("few", FEW)):
        for name, ns_dtype in NS_DTYPES.items():
            after, mid, state = reference(shapes, ns_dtype)
            refs[(case, name)] = (after, state)
            torch.save(mid, tmp_path / f"mid-{case}-{name}.pt")
    results = run_world(world, str(tmp_path))
    for (case, name), (want_after, want_state) in refs.items():
        shapes, ns_dtype = (SHAPES if case == "mix" else FEW), NS_DTYPES[name]
        owners = assign_owners([ns_flops(s, HYPER["ns_steps"]) for s in shapes], world)
        start = [p.detach() for p in make_params(shapes)]
        for r, res in enumerate(results):
            got = res[(case, name)]
            for k in range(STEPS):
                prev = start if k == 0 else want_after[k - 1]
                assert_update_close(got["after"][k], want_after[k], prev, ns_dtype, f"{case}/{name} rank {r} step {k}")
                assert all(torch.equal(a, b) for a, b in zip(got["after"][k], results[0][(case, name)]["after"][k])), \
                    f"{case}/{name}: rank {r} differs from rank 0 at step {k} (replicas must agree exactly)"
            assert_update_close(got["resumed"], want_after[-1], want_after[-2], ns_dtype, f"{case}/{name} resumed")
            # Only this rank's share was orthogonalised, every step.
            mine = sorted(s for s, o in zip(shapes, owners) if o == r)
            assert [sorted(call) for call in got["seen"]] == [mine] * STEPS, f"{case}/{name} rank {r}"
            # The state dict: same layout (groups, hyperparameters, keys) and the replicated momentum buffers.
            st = got["state"]
            assert st["param_groups"] == want_state["param_groups"]
            assert st["state"].keys() == want_state["state"].keys()
            for i, s in want_state["state"].items():
                assert st["state"][i].keys() == s.keys()
                torch.testing.assert_close(st["state"][i]["momentum_buffer"], s["momentum_buffer"], rtol=1e-5,
                                           atol=1e-6)
        # Together the ranks orthogonalised every matrix exactly once per step.
        per_step = sorted(s for res in results for s in res[(case, name)]["seen"][0])
        assert per_step == sorted(shapes)
        if case == "few" and world == 4:
            assert [] in [res[(case, name)]["seen"][0] for res in results]  # an idle rank still joins the gather


# ----------------------------------------------------------------------------------------------------------------
# The switch


@pytest.mark.parametrize("flag", [None, "true", "false"])
def test_loop_builds_the_ddp_optimizer_with_the_switch(flag, tmp_path):
    """optim.muon_partition (default true) reaches the Muon part of the DDP-mode optimizer that build_run makes;
    the state-dict layout does not depend on it (the flag is no group hyperparameter)."""
    from pmf.train.config import load_config
    from pmf.train.loop import build_run

    sets = ["train.device=cpu"] + ([f"optim.muon_partition={flag}"] if flag else [])
    cfg = load_config("tiny-test", overrides=sets)
    data = (torch.zeros(8, 1, 8, 8, dtype=torch.uint8), torch.zeros(8, dtype=torch.int64))
    run = build_run(cfg, tmp_path, torch.device("cpu"), data, None)
    assert isinstance(run.opt.muon, BatchedMuon) and run.opt.muon.partition is (flag != "false")
    keys = {k for g in run.opt.state_dict()["param_groups"] for k in g}
    assert "partition" not in keys and "ns_dtype" not in keys
