"""pmf.parallel.dist.GradReducer: bucketed, asynchronous gradient all-reduce on 2 gloo processes. The reduced gradients
equal the mean of the per-rank gradients computed independently in one process; the first bucket is launched while
backward still runs; earlier micro-batches launch nothing; unused and rank-dependent parameters agree across ranks."""

import copy
import json
from pathlib import Path

import torch
from torch import nn

from pmf.parallel import dist
from pmf.parallel.dist import GradReducer
from pmf.train.config import load_config
from pmf.train.loop import train

from test_dist import SETS, _join_group, _restore_threads, assert_runs_match, run_two, two_process_results  # noqa: F401 (autouse fixture)

ACCUM = 3  # micro-batches per step
STEPS = 2  # the first reduction also learns which parameters are unused; the second runs on the learned layout
SMALL_MB = 2.5 * 1024 / 2**20  # 2.5 KB: two 16x16 layers per bucket, the 64-wide layers over the cap


class Net(nn.Module):
    """Small MLP with a layer used on rank 1 only (``extra``), two layers bigger than SMALL_MB (``big``, ``down``)
    and a layer never used (``unused``), registered last so that it opens the reverse-order bucket list."""

    def __init__(self):
        super().__init__()
        self.extra = nn.Linear(16, 16)
        self.big = nn.Linear(16, 64)  # 1088 floats = 4352 bytes > SMALL_MB
        self.down = nn.Linear(64, 16)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))
        self.unused = nn.Linear(16, 16)

    def forward(self, x, use_extra: bool):
        h = x + torch.tanh(self.extra(x)) if use_extra else x
        h = self.down(torch.tanh(self.big(h)))
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
        return h.pow(2).mean()


def batches(rank: int) -> list[torch.Tensor]:
    """Rank ``rank``'s micro-batches for all steps (each rank its own data)."""
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(4, 16, generator=g) for _ in range(STEPS * ACCUM)]


def local_grads(net: Net, rank: int, step: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s accumulated gradient of one step, in this process, without any communication (zeros for a
    parameter it does not use)."""
    net.zero_grad(set_to_none=True)
    for a in range(ACCUM):
        (net(batches(rank)[step * ACCUM + a], use_extra=rank == 1) / ACCUM).backward()
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in net.named_parameters()}


def _reduce_worker(rank, port, out_dir):
    _join_group(rank, port)
    real_all_reduce = torch.distributed.all_reduce
    try:
        torch.manual_seed(0)
        net = Net()
        ref = copy.deepcopy(net)  # no hooks: the independent truth
        events: list = []

        def logged_all_reduce(tensor, *a, **k):
            events.append(["launch" if k.get("async_op") else "sync", tensor.numel()])
            return real_all_reduce(tensor, *a, **k)

        torch.distributed.all_reduce = logged_all_reduce
        out = {}
        for bucket_mb in (SMALL_MB, 1e-9, 25.0):  # several buckets; one parameter each; all in one
            model = copy.deepcopy(net)
            reducer = GradReducer(model, bucket_mb=bucket_mb)
            for name, p in model.named_parameters():  # registered after the reducer's hooks: they run after them
                p.register_post_accumulate_grad_hook(lambda p, name=name: events.append(["grad", name]))
            runs = []
            for step in range(STEPS):
                model.zero_grad(set_to_none=True)
                events.clear()
                layout = [[reducer.names[id(p)] for p in b.params] for b in reducer.buckets]  # this step's buckets
                for a in range(ACCUM):
                    reducer.start_micro_batch(last=a == ACCUM - 1)
                    events.append(["micro", a])
                    (model(batches(rank)[step * ACCUM + a], use_extra=rank == 1) / ACCUM).backward()
                events.append(["finish"])
                reducer.finish()
                truth = [local_grads(ref, r, step) for r in (0, 1)]
                err = {n: float((p.grad - (truth[0][n] + truth[1][n]) / 2).abs().max())
                       for n, p in model.named_parameters()}
                torch.save({n: p.grad for n, p in model.named_parameters()},
                           Path(out_dir, f"grads-{bucket_mb:g}-{step}-rank{rank}.pt"))
                runs.append({"events": list(events), "err": err, "buckets": len(layout), "bucket_params": layout})
            out[f"{bucket_mb:g}"] = runs
        # The hook-less variant: the same buckets after backward.
        model = copy.deepcopy(net)
        local_grads(model, rank, 0)
        dist.all_reduce_grads(model, bucket_mb=SMALL_MB)
        truth = [local_grads(ref, r, 0) for r in (0, 1)]
        out["all_reduce_grads_err"] = max(float((p.grad - (truth[0][n] + truth[1][n]) / 2).abs().max())
                                          for n, p in model.named_parameters())
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        torch.distributed.all_reduce = real_all_reduce
        dist.shutdown()


def test_bucketed_reduction_matches_mean_and_overlaps_backward(tmp_path):
    res = two_process_results(_reduce_worker, tmp_path, timeout=120)
    names = [n for n, _ in Net().named_parameters()]
    for out in res:
        assert out["all_reduce_grads_err"] < 1e-6
        for key, runs in out.items():
            if key == "all_reduce_grads_err":
                continue
            for step, run in enumerate(runs):
                # the reduced gradient is the mean of the two ranks' gradients (unused: zeros; extra: rank 1's / 2)
                assert max(run["err"].values()) < 1e-6, (key, step, run["err"])
                ev = run["events"]
                micro_last = ev.index(["micro", ACCUM - 1])
                launches = [i for i, e in enumerate(ev) if e[0] == "launch"]
                # earlier micro-batches launch nothing; every bucket is launched exactly once per step
                assert launches and min(launches) > micro_last, (key, step, ev)
                assert len(launches) == run["buckets"]
                grads = [i for i, e in enumerate(ev) if e[0] == "grad" and i > micro_last]
                if step == STEPS - 1 and key != "25":
                    # learned layout: the first bucket goes out before the last gradient of the backward exists
                    assert launches[0] < max(grads), (key, ev)
    # after the first reduction the never-used layer moves to the end; the rank-1-only layer stays with the used ones
    small = res[0][f"{SMALL_MB:g}"]
    # (16 + 256 + 16 + 256 + 16) floats = 2240 bytes fit in 2.5 KB; layers.2.weight (1024 bytes) does not
    assert small[0]["bucket_params"][0] == ["unused.bias", "unused.weight", "layers.3.bias", "layers.3.weight",
                                            "layers.2.bias"]
    assert small[1]["bucket_params"][-1] == ["unused.bias", "unused.weight"]
    assert "extra.weight" in sum(small[1]["bucket_params"][:-1], [])
    # a parameter over the cap gets a bucket of its own; each parameter is in exactly one bucket
    for run in small:
        assert ["big.weight"] in run["bucket_params"] and ["down.weight"] in run["bucket_params"]
        assert sorted(sum(run["bucket_params"], [])) == sorted(names)
    one_each = res[0]["1e-09"][0]["bucket_params"]
    assert len(one_each) == len(names)
    assert res[0]["25"][0]["buckets"] == 1 and res[0]["25"][1]["buckets"] == 2  # then: used + unused
    # both ranks hold the same gradients, bit for bit, including the unused layer (zeros, not None)
    for f in tmp_path.glob("grads-*-rank0.pt"):
        g0, g1 = torch.load(f), torch.load(str(f).replace("rank0", "rank1"))
        assert g0.keys() == g1.keys() == set(names)
        for n in names:
            assert torch.equal(g0[n], g1[n]), (f.name, n)
        assert not g0["unused.weight"].any()


def test_one_process_registers_and_launches_nothing():
    """Without a process group the reducer is inert: no hooks, gradients untouched (None stays None)."""
    assert not torch.distributed.is_initialized()
    torch.manual_seed(0)
    net = Net()
    reducer = dist.grad_reducer(net)
    assert dist.grad_reducer(net) is reducer and not reducer.active
    assert all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in net.parameters())
    reducer.start_micro_batch(last=True)
    net(torch.randn(4, 16), use_extra=False).backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()}
    reducer.finish()
    for n, p in net.named_parameters():
        assert (grads[n] is None and p.grad is None) or torch.equal(grads[n], p.grad), n
    assert net.unused.weight.grad is None


def test_bucket_layout():
    """Reverse parameter order, a cap in bytes, a parameter over the cap alone, each parameter once, offsets
    contiguous; a bad size is refused."""
    net = Net()
    params = list(net.parameters())
    r = GradReducer(net, bucket_mb=SMALL_MB)
    flat = [p for b in r.buckets for p in b.params]
    assert [id(p) for p in flat] == [id(p) for p in reversed(params)]
    for b in r.buckets:
        assert b.offsets == [sum(p.numel() for p in b.params[:i]) for i in range(len(b.params))]
        assert b.numel == sum(p.numel() for p in b.params)
        assert len(b.params) == 1 or b.numel * 4 <= r.bucket_bytes
    assert [b.params for b in r.buckets if b.numel * 4 > r.bucket_bytes] == [[net.down.weight], [net.big.weight]]
    try:
        GradReducer(net, bucket_mb=0)
    except ValueError as e:
        assert "bucket_mb" in str(e)
    else:
        raise AssertionError("bucket_mb=0 accepted")


ACCUM_SETS = [*SETS, "train.accum_steps=2"]


def _train_worker(rank, port, out_dir):
    """`pmf train` as torchrun would start it: the command joins the process group and must leave it."""
    import os

    from pmf.cli import main

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    argv = ["train", "--preset", "tiny-test", "--run-dir", str(Path(out_dir, "two")), "--quiet"]
    for s in ACCUM_SETS:
        argv += ["--set", s]
    status = main(argv)
    Path(out_dir, f"exit{rank}.json").write_text(json.dumps([status, torch.distributed.is_initialized()]))


def test_trainer_with_accumulation_two_processes_match_one(tmp_path):
    """The trainer's DDP step (GradReducer armed on the last of 2 micro-batches) gives the losses, grad norms and
    weights of one process on the same global batch (tolerances of tests/test_dist.py); `pmf train` destroys the
    process group it joined."""
    run_two(_train_worker, (str(tmp_path),), timeout=150)
    assert [json.loads((tmp_path / f"exit{r}.json").read_text()) for r in (0, 1)] == [[0, False], [0, False]]
    ref = train(load_config("tiny-test", overrides=ACCUM_SETS), tmp_path / "one", quiet=True)
    assert ref["world_size"] == 1 and ref["step"] == 3
    assert_runs_match(tmp_path / "one", tmp_path / "two", steps=[1, 2, 3])


def test_init_binds_the_gpu_on_cuda_only(monkeypatch):
    """Under torchrun on CUDA, init_process_group gets nccl and device_id=cuda:LOCAL_RANK; on CPU gloo and no
    device_id (recorded instead of joining a group)."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **k: calls.append(k))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append({"set_device": d}))
    dist.init("cuda")
    dist.init("cpu")
    assert calls[0] == {"set_device": torch.device("cuda", 1)}
    assert calls[1]["backend"] == "nccl" and calls[1]["device_id"] == torch.device("cuda", 1)
    assert calls[2]["backend"] == "gloo" and "device_id" not in calls[2]
