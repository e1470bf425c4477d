"""Cost of one pMF training step relative to a flow-matching step of the same network, measured in one run.

    python benchmarks/step.py [--model pMF-T/7-28] [--batch 64] [--device cpu|cuda] [--iters 10] [--warmup 2]
                              [--threads N] [--sample-batch N] [--profile] [--breakdown] [--bf16] [--compile]
                              [--no-optimizer | --optimizer-only] [--json OUT]
    python benchmarks/step.py --fsdp 2 [--model ...] [--batch B per process] [--iters N] [--threads T per process]
    python benchmarks/step.py --compiled-step [--preset fmnist-demo] [--model-kw hidden_size=768 ...]
                              [--threads N] [--batch N] [--iters N] [--warm-cache] [--json OUT]
    python benchmarks/step.py --meta [--model pMF-B/16] [--batch 64] [--iters N]

Configurations, each forward + backward of the loss only (no optimizer step, gradients set to None before each),
on the same batch and the same random draws per iteration:

  a   flow matching: both heads at r = t, loss sum|u - v_t|^2 + sum|v - v_t|^2, fused SDPA attention ("sdpa")
  b   pMF, impl="reference": two guidance calls + torch.func.jvp over the whole net, default attention ("jvp_sdpa")
  b'  pMF, impl="reference" with "math" attention (explicit einsum + float32 softmax): the naive port
  c   pMF, impl="lean" (the default), "jvp_sdpa" attention
  c16 (--bf16) c under bf16 autocast

Timing: the configurations run round-robin (iteration i of every configuration, then i + 1), so load drift on a
shared machine hits all of them alike; medians over ``--iters`` after ``--warmup``. On CUDA each step is synchronised.
On CPU both wall time and process CPU time (all threads) are reported: on a shared machine wall time includes time
spent descheduled, CPU time does not (with ``--threads 1`` it is the uncontended step time).

Peak memory: CUDA: ``torch.cuda.max_memory_allocated`` during one step minus the allocation before it. CPU: each
configuration runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc then serves every buffer over
64 KiB by mmap and returns it on free, so the resident set tracks live tensors); the number is the high-water
resident set (``VmHWM``, reset after set-up) over three steps minus the resident set before the first. It includes
allocator slack and the gradients (the same in every configuration), so it is a fair ratio, not an exact tensor count.

Sampling: 1-NFE throughput (images/s) of ``pmf.method.sampler.sample`` under ``torch.inference_mode`` with the model's
attention ("jvp_sdpa", whose primal is the fused kernel) and with plain "sdpa", against a straightforward baseline:
the same network with the "math" backend (explicit einsum attention, float32 softmax) under ``torch.no_grad``;
with --bf16 also our path and the baseline under bf16 autocast (the baseline's softmax stays float32); with
--compile our path through ``speed.InferenceNet`` (``torch.compile`` with inductor weight freezing: what
``pmf sample / eval --compile [--precision bf16]`` run).

Optimizer step: the Muon + Adam step (``build_optimizer``, the official recipe's optimizer) of the same network
with Newton-Schulz in bf16 and in fp32, round-robin on the same gradients, with the CPU's capability
(``precision.cpu_capability``: SIMD level, native bf16 or not) and the dtype the default picks on this device. On a CPU
without native bf16 the bf16 step is many times slower (emulated bf16 matmuls); on GPUs and CPUs with AVX512-BF16 /
AMX it is the faster one.

--fsdp N (CPU only) replaces all of the above: a, b and c each unsharded and sharded with FSDP2
(``pmf.train.fsdp.shard_model``) in N gloo processes, round-robin in every process (the unsharded steps of the N
processes run side by side, so both kinds see the same load), batch ``--batch`` per process; ratios sharded /
unsharded and c/a, b/a in each kind.
--compiled-step: what ``train.compile`` does (``speed.StepCompiler``: the guidance forwards and the tangent pass +
losses + backward each one graph) against the eager step, and flow matching eager against compiled
(``torch.compile(fm_core, fullgraph=True)``), in the same run, round-robin, the same draws every iteration; plus the
compile time (first step minus a later one, wall and CPU seconds with the C++ builds; a fresh inductor cache unless
--warm-cache), the break-even step count, aten ops dispatched per eager step (a counting TorchDispatchMode) and, per
compiled step, inductor's generated kernels and the top-level aten calls left (profiler). Only this comparison runs.
--meta: the host time of an eager pMF and flow-matching step with the network and batch on the ``meta`` device
(shapes only) and the aten ops each dispatches.

--breakdown times the lean step's named parts (guidance, the forward-AD pass, ...); --profile prints the top 15 ops
of one lean step (torch.profiler, by self CPU time, or self CUDA time on a GPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch

from pmf.method.model import Attention, build_model
from pmf.method.objective import ObjectiveConfig, conditional_velocity, noisy_image, pmf_loss
from pmf.method.rng import PerSampleGenerator
from pmf.method.sampler import sample
from pmf.train.optim import OptimConfig, build_optimizer
from pmf.train.speed import InferenceNet
from pmf.train.precision import autocast_context, cpu_capability, internal_dtype

CONFIGS = {  # name: (label, objective impl or None for flow matching, attention backend)
    "a": ("flow matching (sdpa)", None, "sdpa"),
    "b": ("pMF reference (jvp_sdpa)", "reference", "jvp_sdpa"),
    "b'": ("pMF reference, math attn", "reference", "math"),
    "c": ("pMF lean (jvp_sdpa)", "lean", "jvp_sdpa"),
    "c16": ("pMF lean, bf16 autocast", "lean", "jvp_sdpa"),
}


def set_backend(net, backend: str) -> None:
    for m in net.modules():
        if isinstance(m, Attention):
            m.backend = backend


def make_net_and_batch(model: str, batch: int, device, **overrides):
    """The registered model (constructor ``overrides`` applied) with every parameter perturbed by N(0, 0.02^2)
    (zero-init gates and final layers would make every head output 0), a random batch in [-1, 1] and labels; all
    from fixed seeds."""
    torch.manual_seed(0)
    net = build_model(model, **overrides).to(device)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g).to(device))
    shape = (batch, net.in_channels, net.input_size, net.input_size)
    x = (torch.rand(shape, generator=g) * 2 - 1).to(device)
    y = torch.randint(0, net.num_classes, (batch,), generator=g).to(device)
    return net, x, y


def fm_loss(net, x, y, gen):
    """Plain flow matching with both heads: t ~ logit-normal(0.8, 0.8), r = t, no guidance (omega = 1, [0, 1])."""
    B = x.shape[0]
    t = torch.sigmoid(torch.randn(B, generator=gen, device=x.device) * 0.8 + 0.8)
    e = torch.randn(x.shape, generator=gen, device=x.device)
    z = noisy_image(x, t, e)
    v_t = conditional_velocity(z, x, t)
    zero, one = torch.zeros_like(t), torch.ones_like(t)
    u, v = net(z, t, zero, one, zero, one, y)
    return (u - v_t).pow(2).flatten(1).sum(1).mean() + (v - v_t).pow(2).flatten(1).sum(1).mean()


def make_step(name: str, net, x, y, device):
    """A closure running configuration ``name`` once (forward + backward) with draws seeded by the iteration."""
    _, impl, backend = CONFIGS[name]
    precision = "bf16" if name == "c16" else None
    if impl is None:
        def loss_fn(net, x, y, gen):
            loss = fm_loss(net, x, y, gen)
            return loss, {"loss": loss.detach()}
    else:
        cfg = ObjectiveConfig(impl=impl)

        def loss_fn(net, x, y, gen):
            return pmf_loss(net, x, y, cfg, gen)

    model = net

    def step(i: int):
        set_backend(net, backend)
        net.zero_grad(set_to_none=True)
        gen = torch.Generator(device).manual_seed(1000 + i)
        with autocast_context(device.type, precision):
            loss, metrics = loss_fn(model, x, y, gen)
        loss.backward()
        return metrics

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_round_robin(fns: dict, iters: int, warmup: int, device) -> tuple[dict, dict]:
    """Per configuration: wall-clock seconds and process CPU seconds (all threads) of each timed iteration."""
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for i in range(warmup + iters):
        for k, fn in fns.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn(i)
            sync(device)
            if i >= warmup:
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    return wall, cpu


def proc_status_bytes(key: str) -> int:
    """VmRSS (resident set now) or VmHWM (its high-water mark) of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(key)


def reset_rss_high_water() -> None:
    """Set VmHWM to the current VmRSS (Linux >= 4.0). getrusage's ru_maxrss cannot be used: it survives exec and
    would report the parent's resident set in a subprocess."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_memory_cuda(step, net, device) -> int:
    step(0)  # warm: allocator caches, workspaces, lazily built buffers
    net.zero_grad(set_to_none=True)  # gradients count in the step's peak, as in the CPU measurement
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step(1)
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def peak_memory_cpu_child(args) -> None:
    """Subprocess entry: one configuration, three steps, print the RSS high-water delta in bytes."""
    device = torch.device("cpu")
    net, x, y = make_net_and_batch(args.model, args.batch, device)
    step = make_step(args.memory_child, net, x, y, device)
    reset_rss_high_water()
    base = proc_status_bytes("VmRSS")
    for i in range(3):
        step(i)
    print(json.dumps({"peak_bytes": proc_status_bytes("VmHWM") - base}))


def peak_memory_cpu(name: str, args) -> int | None:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--device", "cpu",
           "--threads", str(torch.get_num_threads()), "--memory-child", name]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=1800)
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
    except (subprocess.SubprocessError, ValueError, KeyError, IndexError) as e:
        print(f"  memory of {name}: measurement failed ({e})", file=sys.stderr)
        return None


def sampling_throughput(args, device) -> dict:
    """images/s of 1-NFE sampling, median over iterations, round-robin between the three paths."""
    torch.manual_seed(0)
    net = build_model(args.model, v_head=False).to(device).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g).to(device))
    B = args.sample_batch or args.batch
    noise = torch.randn(B, net.in_channels, net.input_size, net.input_size, generator=g).to(device)
    y = torch.randint(0, net.num_classes, (B,), generator=g).to(device)

    def ours(backend, precision=None, model=net):
        def run(i):
            set_backend(net, backend)
            with torch.inference_mode(), autocast_context(device.type, precision):
                return sample(model, noise, y, 1, omega=2.0)
        return run

    def baseline(precision=None):
        def run(i):
            set_backend(net, "math")
            with torch.no_grad(), autocast_context(device.type, precision):
                return sample(net, noise, y, 1, omega=2.0)
        return run

    paths = {"ours (jvp_sdpa, inference_mode)": ours("jvp_sdpa"), "ours (sdpa, inference_mode)": ours("sdpa"),
             "baseline (einsum attention, no_grad)": baseline()}
    if args.bf16:
        paths["ours + bf16 autocast (jvp_sdpa)"] = ours("jvp_sdpa", "bf16")
        paths["baseline + bf16 autocast (einsum, fp32 softmax)"] = baseline("bf16")
    if args.compile:
        # InferenceNet = what `pmf sample/eval --compile [--precision bf16]` use: compiled with weight freezing.
        # Its own net copy: freezing bakes the weights and the backend in at the first call.
        frozen = copy.deepcopy(net).requires_grad_(False)
        set_backend(frozen, "sdpa")
        paths["ours + compile, freezing (sdpa)"] = ours("sdpa", model=InferenceNet(frozen, compile=True))
        if args.bf16:
            frozen16 = copy.deepcopy(frozen)
            paths["ours + bf16 + compile, freezing (sdpa)"] = ours("sdpa", model=InferenceNet(frozen16, "bf16", True))
    outs = {k: f(0) for k, f in paths.items()}  # also the compile, if any
    ref = outs["baseline (einsum attention, no_grad)"]
    max_diff = {k: (o.float() - ref.float()).abs().max().item() for k, o in outs.items()}
    wall, cpu = time_round_robin(paths, args.iters, args.warmup, device)
    return {"batch": B, "max_abs_diff_vs_baseline": max_diff,
            "images_per_s": {k: B / statistics.median(v) for k, v in wall.items()},
            "images_per_cpu_s": {k: B / statistics.median(v) for k, v in cpu.items()}}


def breakdown_lean(net, x, y, device, iters: int) -> dict:
    """Median milliseconds (CPU time on CPU, synchronised wall time on CUDA) of the lean step's parts and of the
    flow-matching step's forward and backward, from timers wrapped around pmf.method.objective's named steps."""
    import pmf.method.objective as O
    import pmf.method.objective_lean as L

    on_cpu = device.type == "cpu"

    def now():
        sync(device)
        return time.process_time() if on_cpu else time.perf_counter()

    acc: dict[str, list] = {}

    def timed(label, fn):
        def run(*a, **k):
            t0 = now()
            out = fn(*a, **k)
            acc.setdefault(label, []).append(now() - t0)
            return out
        return run

    names = {"guidance_velocities": "c: guidance (no grad)", "u_and_dudt": "c: u, du/dt, v (with grad)",
             "tangent_pass": "c:   of which the tangent pass"}  # pmf.method.objective_lean's lean passes
    saved = {n: getattr(L, n) for n in names}
    try:
        for n, label in names.items():
            setattr(L, n, timed(label, saved[n]))
        cfg = ObjectiveConfig(impl="lean")
        for i in range(iters + 1):
            for kind in ("a", "c"):
                set_backend(net, CONFIGS[kind][2])
                net.zero_grad(set_to_none=True)
                gen = torch.Generator(device).manual_seed(1000 + i)
                t0 = now()
                loss = fm_loss(net, x, y, gen) if kind == "a" else O.pmf_loss(net, x, y, cfg, gen)[0]
                t1 = now()
                loss.backward()
                t2 = now()
                acc.setdefault(f"{kind}: forward (loss)", []).append(t1 - t0)
                acc.setdefault(f"{kind}: backward", []).append(t2 - t1)
    finally:
        for n in names:
            setattr(L, n, saved[n])
    return {k: statistics.median(v[1:]) * 1e3 for k, v in sorted(acc.items())}


def profile_lean(net, x, y, device, rows: int = 15) -> str:
    step = make_step("c", net, x, y, device)
    step(0)
    acts = [torch.profiler.ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
        sort = "self_cuda_time_total"
    with torch.profiler.profile(activities=acts) as prof:
        step(1)
        sync(device)
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


def optimizer_step_times(net, device, iters: int, warmup: int) -> dict:
    """Median ms of ``opt.step()`` (Muon + Adam, default OptimConfig) with Newton-Schulz in bf16 and in fp32, on
    fixed random gradients; each dtype on its own copy of the network, timed round-robin."""
    steps = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        model = copy.deepcopy(net)
        g = torch.Generator(device="cpu").manual_seed(2)
        for prm in model.parameters():
            prm.grad = (1e-3 * torch.randn(prm.shape, generator=g)).to(device)
        opt = build_optimizer(model, OptimConfig())
        muon = getattr(opt, "muon", opt)
        muon.ns_dtype = dtype  # what the default would pick is printed separately

        def step(i, opt=opt):
            opt.step()

        steps[name] = step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the slow-bf16 warning: this measures it
        wall, cpu = time_round_robin(steps, iters, warmup, device)
    return {"median_wall_ms": {k: statistics.median(v) * 1e3 for k, v in wall.items()},
            "median_cpu_ms": {k: statistics.median(v) * 1e3 for k, v in cpu.items()},
            "default_ns_dtype": str(internal_dtype(device)).replace("torch.", "")}


# ----------------------------------------------------------------------------------------------------------------
# --fsdp N: the step under FSDP2 (N processes, gloo on CPU) against the same step in one process, in the same run

FSDP_CONFIGS = ("a", "b", "c")  # flow matching, reference, lean: each in one process ("1p") and sharded ("fsdp")


def _fsdp_worker(rank, world, port, args, out_dir):
    """One rank of ``--fsdp``: an unsharded copy and a ``fully_shard``-ed copy of the same network (the trainer's
    ``pmf.train.fsdp.shard_model``), every configuration of FSDP_CONFIGS on both, round-robin in this process. The
    unsharded steps of all ranks run at the same time as N independent single processes on the same cores, so
    both kinds see the same load; the sharded steps add the all-gathers, reduce-scatters and FSDP's hooks."""
    from pmf.parallel import dist as pdist
    from pmf.train import fsdp as pfsdp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(args.threads if args.threads > 0 else 1)
    torch.set_flush_denormal(True)
    device = torch.device("cpu")
    pdist.init("cpu")
    try:
        plain, x, y = make_net_and_batch(args.model, args.batch, device)
        sharded, _, _ = make_net_and_batch(args.model, args.batch, device)  # same seeds: the same weights
        pfsdp.shard_model(sharded, device)
        steps = {}
        for n in FSDP_CONFIGS:
            steps[f"{n} 1p"] = make_step(n, plain, x, y, device)
            steps[f"{n} fsdp"] = make_step(n, sharded, x, y, device)
        metrics = {k: {m: float(v) for m, v in fn(0).items()} for k, fn in steps.items()}  # warm-up, first draws
        wall, cpu = time_round_robin(steps, args.iters, args.warmup, device)
        out = {"wall_ms": {k: statistics.median(v) * 1e3 for k, v in wall.items()},
               "cpu_ms": {k: statistics.median(v) * 1e3 for k, v in cpu.items()}, "first_step_metrics": metrics}
    finally:
        pdist.shutdown()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


def fsdp_step_times(args) -> dict:
    """``--fsdp N``: per-rank step times (forward + backward of the loss, batch ``--batch`` per rank, 1 thread per
    process unless ``--threads``) of flow matching (a), reference (b) and lean (c), each unsharded and sharded,
    medians over ranks of each rank's median; and the ratios: sharded / unsharded per configuration (FSDP's cost
    at equal work per process), and c/a, b/a within each kind (the lean step's cost relative to a flow-matching
    step, the number the lean path is for)."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_fsdp_worker, args=(args.fsdp, port, args, out_dir), nprocs=args.fsdp,
                           start_method="spawn")
        ranks = []
        for r in range(args.fsdp):
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    res = {"world_size": args.fsdp, "per_rank": ranks}
    for kind in ("wall_ms", "cpu_ms"):
        res[kind] = {k: statistics.median(r[kind][k] for r in ranks) for k in ranks[0][kind]}
    return res


def print_fsdp(res: dict, args) -> None:
    print(f"\nFSDP2, {res['world_size']} processes (gloo), batch {args.batch} per process; medians over ranks of "
          f"{args.iters} round-robin iterations after {args.warmup} warm-up")
    w, c = res["wall_ms"], res["cpu_ms"]
    print(f"{'':4s}{'configuration':30s}{'1p wall':>9s}{'fsdp wall':>11s}{'x 1p':>6s}{'1p cpu':>9s}{'fsdp cpu':>10s}"
          f"{'x 1p':>6s}")
    for n in FSDP_CONFIGS:
        one, sh = f"{n} 1p", f"{n} fsdp"
        print(f"{n:4s}{CONFIGS[n][0]:30s}{w[one]:9.1f}{w[sh]:11.1f}{w[sh] / w[one]:6.2f}{c[one]:9.1f}{c[sh]:10.1f}"
              f"{c[sh] / c[one]:6.2f}")
    for label, t in (("wall", w), ("cpu", c)):
        print(f"{label:4s} ratios: lean fsdp / lean 1p = {t['c fsdp'] / t['c 1p']:.2f};  c/a: 1p {t['c 1p'] / t['a 1p']:.2f}"
              f", fsdp {t['c fsdp'] / t['a fsdp']:.2f};  b/a: 1p {t['b 1p'] / t['a 1p']:.2f}, fsdp "
              f"{t['b fsdp'] / t['a fsdp']:.2f};  reference fsdp / lean fsdp = {t['b fsdp'] / t['c fsdp']:.2f}")
    m = res["per_rank"][0]["first_step_metrics"]
    print("first-step metrics (rank 0), lean 1p vs fsdp: " + ", ".join(
        f"{k} {m['c 1p'][k]:.6g} / {m['c fsdp'][k]:.6g}" for k in m["c 1p"]))


# ----------------------------------------------------------------------------------------------------------------
# --compiled-step: the eager step against train.compile's compiled step, pMF and flow matching, in the same run


def _parse_kw(items) -> dict:
    """["hidden_size=768", "num_heads=12"] -> {"hidden_size": 768, "num_heads": 12} (ints, floats, else strings)."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        for cast in (int, float, str):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
    return out


def count_dispatched_ops(step) -> int:
    """aten operations that one call of ``step`` dispatches (forward and backward: CPU autograd runs the backward on
    the calling thread, under the same dispatch mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return Count.n


def count_profiled_aten_calls(step) -> int:
    """Top-level aten calls of one call of ``step`` in the profiler (for a compiled step: the extern kernels its
    generated code calls through the dispatcher: matmuls, attention, convolutions)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    evs = prof.events()
    return sum(1 for e in evs if e.name.startswith("aten::") and not (e.cpu_parent and
                                                                       e.cpu_parent.name.startswith("aten::")))


def fm_core(net, x, y, t, e):
    """The flow-matching loss of :func:`fm_loss` from given draws (t, e): traceable whole by torch.compile."""
    z = noisy_image(x, t, e)
    v_t = conditional_velocity(z, x, t)
    zero, one = torch.zeros_like(t), torch.ones_like(t)
    u, v = net(z, t, zero, one, zero, one, y)
    return (u - v_t).pow(2).flatten(1).sum(1).mean() + (v - v_t).pow(2).flatten(1).sum(1).mean()


def compiled_step_comparison(args, device) -> dict:
    """pMF lean step and flow-matching step, eager and compiled (pmf's StepCompiler; FM: its loss compiled whole),
    same run, round-robin, same draws every iteration (so the compiled step keeps one row plan: the shapes the
    timing sees are compiled once). Compile time: the first compiled step's wall and CPU seconds (this process and
    its C++ compiler children) minus a later step's, with a fresh inductor cache unless --warm-cache."""
    import resource
    import tempfile

    from pmf.train.config import load_config
    from pmf.train.speed import compile_step

    if not args.warm_cache:  # a cold inductor cache: the compile time a first run pays
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="pmf-inductor-")
    cfg = load_config(args.preset) if args.preset else None
    model = cfg.model.name if cfg is not None else args.model
    objective = cfg.objective if cfg is not None else ObjectiveConfig()
    overrides = _parse_kw(args.model_kw)
    net, x, y = make_net_and_batch(model, args.batch, device, **overrides)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"{model}{' ' + str(overrides) if overrides else ''}  batch {args.batch}  {n_params / 1e6:.2f}M params  "
          f"device {device}  threads {torch.get_num_threads()}  torch {torch.__version__}  objective: "
          f"{args.preset or 'ObjectiveConfig()'} (r = t fraction {objective.data_proportion})  load average "
          f"{os.getloadavg()[0]:.1f}")
    nets = {n: copy.deepcopy(net) for n in ("fm eager", "fm compiled", "pmf eager", "pmf compiled")}
    for n in ("fm eager", "fm compiled"):
        set_backend(nets[n], "sdpa")
    pmf_compiled = compile_step(pmf_loss, True)
    fm_compiled = torch.compile(fm_core, fullgraph=True, dynamic=False)
    seeds = range(x.shape[0])
    g = torch.Generator().manual_seed(7)
    t_fm = torch.sigmoid(torch.randn(x.shape[0], generator=g) * 0.8 + 0.8).to(device)
    e_fm = torch.randn(x.shape, generator=g).to(device)

    def make(n):
        m = nets[n]

        def step(i=0):
            m.zero_grad(set_to_none=True)
            if n.startswith("fm"):
                loss = (fm_compiled if n == "fm compiled" else fm_core)(m, x, y, t_fm, e_fm)
            else:
                loss, _ = (pmf_compiled if n == "pmf compiled" else pmf_loss)(
                    m, x, y, objective, PerSampleGenerator(seeds))
            loss.backward()
            sync(device)
            return loss.detach()
        return step

    steps = {n: make(n) for n in nets}

    def cpu_now():  # this process and its finished children (the C++ compiler runs): CPU seconds
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + ch.ru_utime + ch.ru_stime

    from torch._inductor import metrics as inductor_metrics

    compile_s, compile_cpu_s, kernels, losses = {}, {}, {}, {}
    for n in nets:
        k0 = inductor_metrics.generated_kernel_count
        walls, cpus = [], []
        for i in range(2):
            t0, c0 = time.perf_counter(), cpu_now()
            losses[n] = float(steps[n]())
            walls.append(time.perf_counter() - t0)
            cpus.append(cpu_now() - c0)
        if n.endswith("compiled"):
            compile_s[n], compile_cpu_s[n] = walls[0] - walls[1], cpus[0] - cpus[1]
            kernels[n] = inductor_metrics.generated_kernel_count - k0
        print(f"  {n}: first step {walls[0]:.1f} s, second {walls[1]:.2f} s", flush=True)
    ops = {n: count_dispatched_ops(steps[n]) for n in ("fm eager", "pmf eager")}
    extern = {n: count_profiled_aten_calls(steps[n]) for n in ("fm compiled", "pmf compiled")}
    wall, cpu = time_round_robin(steps, args.iters, args.warmup, device)
    med = {n: statistics.median(wall[n]) * 1e3 for n in nets}
    med_cpu = {n: statistics.median(cpu[n]) * 1e3 for n in nets}
    print(f"forward + backward of the loss; medians of {args.iters} round-robin iterations after {args.warmup} warm-up")
    print(f"{'':14s}{'wall ms':>9s}{'cpu ms':>9s}{'compile s':>11s}{'(cpu s)':>9s}{'host work per step':>34s}  loss")
    for n in nets:
        if n.endswith("eager"):
            work = f"{ops[n]} aten ops dispatched"
            comp = comp_cpu = ""
        else:
            work = f"{kernels[n]} kernels + {extern[n]} aten calls"
            comp, comp_cpu = f"{compile_s[n]:.1f}", f"{compile_cpu_s[n]:.1f}"
        print(f"{n:14s}{med[n]:9.1f}{med_cpu[n]:9.1f}{comp:>11s}{comp_cpu:>9s}{work:>34s}  {losses[n]:.6g}")
    for label, t in (("wall", med), ("cpu", med_cpu)):
        print(f"{label}: pmf/fm eager {t['pmf eager'] / t['fm eager']:.2f}, compiled {t['pmf compiled'] / t['fm compiled']:.2f};"
              f"  compiled/eager: pmf {t['pmf compiled'] / t['pmf eager']:.2f}, fm {t['fm compiled'] / t['fm eager']:.2f}")
    saved = med_cpu["pmf eager"] - med_cpu["pmf compiled"]
    print("break-even (compile CPU s / CPU ms saved per step): "
          + (f"{compile_cpu_s['pmf compiled'] / (saved / 1e3):.0f} steps" if saved > 0 else "never"))
    print("compiled step:", pmf_compiled.report())
    return {"model": model, "overrides": overrides, "preset": args.preset, "batch": args.batch, "params": n_params,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "load_average": os.getloadavg()[0],
            "cold_inductor_cache": not args.warm_cache, "median_wall_ms": med, "median_cpu_ms": med_cpu,
            "compile_s": compile_s, "compile_cpu_s": compile_cpu_s, "eager_aten_ops": ops,
            "compiled_kernels": kernels, "compiled_aten_calls": extern, "first_loss": losses,
            "compile_report": pmf_compiled.report()}


def meta_host_time(args) -> dict:
    """Host time per eager step with the network and batch on the ``meta`` device (shapes only: what is left is the
    host's work: Python, dispatcher, autograd), pMF lean step and flow matching, and the aten ops each dispatches."""
    from pmf.method.model import PMFDiT, MODELS

    with torch.device("meta"):
        net = PMFDiT(**MODELS[args.model].kwargs)
    B, dev = args.batch, torch.device("meta")
    x = torch.empty(B, net.in_channels, net.input_size, net.input_size, device=dev)
    y = torch.zeros(B, dtype=torch.long, device=dev)
    t_fm, e_fm = torch.empty(B, device=dev).fill_(0.5), torch.empty_like(x)

    def pmf_step(i=0):
        loss, _ = pmf_loss(net, x, y, ObjectiveConfig(), PerSampleGenerator(range(i * B, (i + 1) * B)))
        loss.backward()

    def fm_step(i=0):
        fm_core(net, x, y, t_fm, e_fm).backward()

    out = {}
    for name, step in (("pmf eager", pmf_step), ("fm eager", fm_step)):
        step(0)
        times = []
        for i in range(args.iters):
            t0 = time.perf_counter()
            step(i + 1)
            times.append(time.perf_counter() - t0)
        out[name] = {"host_ms": statistics.median(times) * 1e3, "aten_ops": count_dispatched_ops(step)}
        print(f"{args.model} batch {B} on meta, {name}: {out[name]['host_ms']:.0f} ms host time per step "
              f"(median of {args.iters}), {out[name]['aten_ops']} aten ops dispatched", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="pMF-T/7-28")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--sample-batch", type=int, default=0, help="sampling batch (0: --batch)")
    p.add_argument("--profile", action="store_true", help="print the top ops of the lean step")
    p.add_argument("--breakdown", action="store_true", help="time the lean step's parts (guidance, forward AD, ...)")
    p.add_argument("--bf16", action="store_true", help="add c16 (the lean step under bf16 autocast) and bf16 sampling")
    p.add_argument("--compile", action="store_true", help="add compiled sampling (speed.InferenceNet)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--no-sampling", action="store_true", help="skip the sampling throughput")
    p.add_argument("--sampling-only", action="store_true", help="only the sampling throughput")
    p.add_argument("--no-optimizer", action="store_true", help="skip the optimizer step (bf16 vs fp32 Newton-Schulz)")
    p.add_argument("--optimizer-only", action="store_true", help="only the optimizer step (bf16 vs fp32 Newton-Schulz)")
    p.add_argument("--compiled-step", action="store_true",
                   help="only: eager vs compiled (train.compile) pMF and flow-matching steps, with compile time and "
                        "the host work per step")
    p.add_argument("--meta", action="store_true",
                   help="only: host time per eager step with the network on the meta device (e.g. --model pMF-B/16)")
    p.add_argument("--preset", default="", help="--compiled-step: take the model and objective from this preset")
    p.add_argument("--model-kw", nargs="*", default=[], metavar="KEY=VALUE",
                   help="--compiled-step: model constructor overrides, e.g. hidden_size=768 num_heads=12")
    p.add_argument("--warm-cache", action="store_true",
                   help="--compiled-step: keep the inductor cache (default: a fresh one, a first run's compile)")
    p.add_argument("--json", default="", help="write all numbers to this file")
    p.add_argument("--fsdp", type=int, default=0, metavar="N",
                   help="only the FSDP2 comparison: a, b, c sharded over N gloo processes vs unsharded (CPU)")
    p.add_argument("--memory-child", default="", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormal arithmetic stalls CPU steps (see the pitfalls notes)
    if args.memory_child:
        peak_memory_cpu_child(args)
        return 0
    if args.fsdp:
        if device.type != "cpu":
            p.error("--fsdp runs on the CPU (gloo); on GPUs use torchrun with train.parallel=fsdp")
        res = fsdp_step_times(args)
        print_fsdp(res, args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"model": args.model, "batch": args.batch, "torch": torch.__version__, "fsdp": res}, f,
                          indent=1)
        return 0

    if args.compiled_step or args.meta:
        result = compiled_step_comparison(args, device) if args.compiled_step else meta_host_time(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return 0

    names = ["a", "b", "b'", "c"] + (["c16"] if args.bf16 else [])
    names = [] if args.sampling_only or args.optimizer_only else names
    net, x, y = make_net_and_batch(args.model, args.batch, device)
    n_params = sum(p.numel() for p in net.parameters())
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"{args.model}  batch {args.batch}  {n_params / 1e6:.2f}M params  device {device} ({dev_name})  "
          f"threads {torch.get_num_threads()}  torch {torch.__version__}")
    result = {"model": args.model, "batch": args.batch, "device": str(device), "device_name": dev_name,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu_capability": cpu_capability()}
    print(f"CPU capability: {result['cpu_capability']}")
    show_cpu = device.type == "cpu"
    if names:
        print("forward + backward of the loss only (no optimizer step); medians of "
              f"{args.iters} round-robin iterations after {args.warmup} warm-up")

        steps = {n: make_step(n, net, x, y, device) for n in names}
        metrics = {n: {k: float(v) for k, v in steps[n](0).items()} for n in names}  # also warm-up (and compile)
        wall, cpu = time_round_robin(steps, args.iters, args.warmup, device)
        med = {n: statistics.median(wall[n]) for n in names}
        med_cpu = {n: statistics.median(cpu[n]) for n in names}

        mem = {}
        if not args.no_memory:
            for n in names:
                if device.type == "cuda":
                    mem[n] = peak_memory_cuda(steps[n], net, device)
                else:
                    mem[n] = peak_memory_cpu(n, args)

        # On a shared CPU, wall time includes time spent descheduled; the process CPU time (all threads) does not, and
        # with one thread it is the uncontended step time. Both are printed; compare ratios, not absolute numbers.
        head = f"\n{'':4s}{'configuration':30s}{'wall ms':>9s}{'(min-max)':>15s}{'x a':>6s}"
        head += f"{'cpu ms':>9s}{'x a':>6s}" if show_cpu else ""
        print(head + f"{'peak MB':>9s}{'x a':>6s}  first-step metrics")
        for n in names:
            lo, hi = min(wall[n]) * 1e3, max(wall[n]) * 1e3
            m, m_a = mem.get(n), mem.get("a")
            row = f"{n:4s}{CONFIGS[n][0]:30s}{med[n] * 1e3:9.1f}{f'({lo:.0f}-{hi:.0f})':>15s}{med[n] / med['a']:6.2f}"
            row += f"{med_cpu[n] * 1e3:9.1f}{med_cpu[n] / med_cpu['a']:6.2f}" if show_cpu else ""
            row += f"{m / 2**20:9.1f}{m / m_a:6.2f}" if m and m_a else f"{'-':>9s}{'-':>6s}"
            print(row + "  " + " ".join(f"{k} {v:.5g}" for k, v in metrics[n].items() if k != "loss" or n == "a"))
        b_math = "b'"
        for label, t in (("wall", med), ("cpu", med_cpu)) if show_cpu else (("wall", med),):
            print(f"{label:4s} ratios: c/a = {t['c'] / t['a']:.2f} (target <= 1.8);  b/a = {t['b'] / t['a']:.2f};  "
                  f"b'/a = {t[b_math] / t['a']:.2f}")
        if "c16" in names:
            rel = {k: abs(metrics["c16"][k] - metrics["c"][k]) / abs(metrics["c"][k]) for k in ("loss_u", "loss_v")}
            print(f"bf16 vs fp32 lean step, same draws: relative difference loss_u {rel['loss_u']:.1e}, "
                  f"loss_v {rel['loss_v']:.1e}")
        if mem.get("c") and mem.get("a"):
            print(f"peak memory: c/a = {mem['c'] / mem['a']:.2f} (target <= 1.5);  b/a = {mem['b'] / mem['a']:.2f};  "
                  f"b'/a = {mem[b_math] / mem['a']:.2f}")

        result.update({
            "iters": args.iters, "warmup": args.warmup, "params": n_params, "first_step_metrics": metrics,
            "median_wall_ms": {n: med[n] * 1e3 for n in names},
            "median_cpu_ms": {n: med_cpu[n] * 1e3 for n in names},
            "wall_ms": {n: [t * 1e3 for t in wall[n]] for n in names},
            "cpu_ms": {n: [t * 1e3 for t in cpu[n]] for n in names},
            "ratio_wall_vs_a": {n: med[n] / med["a"] for n in names},
            "ratio_cpu_vs_a": {n: med_cpu[n] / med_cpu["a"] for n in names},
            "peak_memory_bytes": mem,
            "memory_method": "cuda max_memory_allocated delta" if device.type == "cuda"
            else "subprocess VmHWM (reset after set-up) minus VmRSS before the steps, MALLOC_MMAP_THRESHOLD_=65536"})

    if not (args.no_optimizer or args.sampling_only):
        o = optimizer_step_times(net, device, args.iters, args.warmup)
        w, c = o["median_wall_ms"], o["median_cpu_ms"]
        print(f"\noptimizer step (Muon + Adam), Newton-Schulz dtype; medians of {args.iters} after {args.warmup} "
              f"warm-up; CPU {result['cpu_capability']}")
        for k in ("bf16", "fp32"):
            row = f"  NS {k:5s}{w[k]:9.1f} ms wall"
            row += f"{c[k]:9.1f} ms cpu" if show_cpu else ""
            print(row)
        print(f"  bf16 / fp32 = {w['bf16'] / w['fp32']:.2f} (wall)" + (f", {c['bf16'] / c['fp32']:.2f} (cpu)"
                                                                        if show_cpu else "")
              + f";  the default on {device.type} runs NS in {o['default_ns_dtype']}")
        result["optimizer_step"] = o

    if not (args.no_sampling or args.optimizer_only):
        s = sampling_throughput(args, device)
        base_key = "baseline (einsum attention, no_grad)"
        print(f"\n1-NFE sampling, batch {s['batch']}, omega 2; images/s by wall time"
              + (" | by CPU time" if show_cpu else "") + " | max |x - x_baseline|")
        for k in s["images_per_s"]:
            w, c = s["images_per_s"][k], s["images_per_cpu_s"][k]
            row = f"  {k:40s}{w:9.1f}  {w / s['images_per_s'][base_key]:5.2f}x"
            row += f"  | {c:9.1f}  {c / s['images_per_cpu_s'][base_key]:5.2f}x" if show_cpu else ""
            print(row + f"  | {s['max_abs_diff_vs_baseline'][k]:.1e}")
        print("  target: ours >= 1.5x baseline")
        result["sampling"] = s

    if args.breakdown and not args.optimizer_only:
        parts = breakdown_lean(net, x, y, device, args.iters)
        unit = "CPU ms" if device.type == "cpu" else "ms"
        print(f"\nwhere the time goes ({unit}, medians of {args.iters}):")
        for k, v in parts.items():
            print(f"  {k:40s}{v:9.1f}")
        result["breakdown_ms"] = parts

    if args.profile and not args.optimizer_only:
        table = profile_lean(net, x, y, device)
        print("\nlean step (c), top ops:\n" + table)
        result["profile_lean"] = table

    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
