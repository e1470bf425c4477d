"""Optional speed switches for a training or sampling step: ``torch.compile`` of the whole training step
(:class:`StepCompiler`), and bf16 autocast.

Both are opt-in. Measured numbers (CPU) are in ``benchmarks/README.md``.

The compiled step
-----------------
``train.compile`` runs :func:`pmf.method.objective.pmf_loss` with a :class:`StepCompiler`: the host draws the per-sample
scalars and plans the rows (eagerly: host generators, host index lists), then the two device steps run as one
compiled graph each, ``fullgraph=True``: the guidance forwards (:func:`pmf.method.objective.guidance_step`) and the
tangent pass, plain and v-head passes and the heads' losses (:func:`pmf.method.objective.heads_step`), whose backward
AOT autograd compiles with it (``force_non_lazy_backward_lowering``). The tangent pass is the explicit one of
:meth:`pmf.method.model.PMFDiT.u_and_tangent` (plain ops, attention's closed form included), the same code as eager
training. Shapes are static: the row plan pads its counts to buckets (:func:`pmf.method.objective_lean.row_buckets`), so
a run compiles at most that many graphs; a graph break or the recompile limit raises :class:`CompileError` naming
the reason, never a silent eager run. ``train.compile_mode`` passes the mode to inductor ("reduce-overhead": CUDA
graphs on CUDA; the step reads no device value on the host, so it can be captured).

bf16 and the JVP
----------------
Under ``torch.autocast(..., torch.bfloat16)`` the matmuls of the primal *and* of the tangent run in bf16 (autocast
casts the tangent with its primal), everything else keeps its input dtype. What keeps the pMF step stable:

- The attention tangent's ``P`` and ``P * dS`` terms in float32: :mod:`pmf.method.attention` computes them in
  ``promote_types(dtype, float32)`` whatever q, k, v are (the ``jvp_sdpa`` backend; the ``math`` backend's softmax is
  float32 too). Keep it that way: the ``rowsum(P * dS) * O`` term is a difference of nearly equal numbers.
- The x -> u conversion ``u = (z - x) / max(t, 0.05)`` and ``V = u + (t - r) du/dt`` in float32: z, t and r stay
  float32 (they are inputs, not autocast outputs), so type promotion lifts the bf16 head output to float32 before
  the division; ``1 / 0.05 = 20`` would otherwise amplify bf16's 3 significant digits.
- The time embedding's sinusoid in float32 (the model computes it in ``promote_types(weight dtype, float32)``; the
  weights stay float32 under autocast), and the losses' per-sample sums in float32 (they are reductions of float32
  tensors after the promotion above).
- Parameters, gradients and optimizer state in float32 (autocast does not touch them). No loss scaling is needed
  for bf16; fp16 would need a GradScaler, which the loop does not have, so :func:`autocast_context` refuses it.

On CPUs without native bf16 matmuls (no AVX512-BF16 / AMX) bf16 is *much slower* than float32 (a 1024^3 matmul:
3.3 s against 50 ms on a 2-core EPYC without AVX-512), so internal bf16 defaults (Muon's Newton-Schulz) run in
float32 there (:func:`internal_dtype`), and asking for bf16 on such a CPU warns once with the measured slowdown
(:func:`warn_if_slow_bf16`). :func:`cpu_native_bf16` decides it from torch's CPU feature report (AVX512-BF16, AMX-BF16,
Arm BF16), or, where torch has none, from a cached micro-benchmark.
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings

import torch
import torch.nn as nn

PRECISIONS = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------------
# Does this CPU compute in bf16 natively?

_CPU_BF16_FEATURES = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512-BF16, x86 AMX-BF16, Arm v8.6 BF16


def _matmul_ms(dtype: torch.dtype, n: int = 256, min_s: float = 0.05) -> float:
    """Milliseconds per n^3 CPU matmul in ``dtype`` on one thread (best of repeated runs over at least ``min_s``
    seconds; one thread: on a loaded machine, multi-thread timings are dominated by waiting for busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # warm-up (and the one-off packing of the BLAS library)
        best, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < min_s:
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return best * 1e3


@functools.lru_cache(maxsize=None)
def bf16_matmul_slowdown() -> float:
    """Measured once per process: time of a 256^3 CPU matmul in bf16 / the same in float32 (> 1: bf16 is slower)."""
    return _matmul_ms(torch.bfloat16) / _matmul_ms(torch.float32)


def _cpu_features() -> dict | None:
    """torch's report of the CPU's instruction-set features (``torch.cpu.get_capabilities``), or None without one."""
    get = getattr(torch.cpu, "get_capabilities", None)
    try:
        return dict(get()) if get is not None else None
    except Exception:  # noqa: BLE001  (an unusual platform: the callers fall back to measuring)
        return None


@functools.lru_cache(maxsize=None)
def cpu_native_bf16() -> bool:
    """True when bf16 matmuls run in hardware on this CPU, cached for the process. Decided in two steps:

    1. torch's CPU feature report (``torch.cpu.get_capabilities``) has none of AVX512-BF16 / AMX-BF16 / Arm BF16: no.
    2. Otherwise a micro-benchmark decides: a 256^3 bf16 matmul no slower than 1.5x float32 (measured ratios: ~0.3
       with AVX512-BF16, 3.4 without; the benchmark also catches kernels capped below the hardware, e.g. by
       ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``; ~0.1 s, once)."""
    features = _cpu_features()
    if features is not None and not any(features.get(f) for f in _CPU_BF16_FEATURES):
        return False
    return bf16_matmul_slowdown() <= 1.5


def cpu_capability() -> str:
    """One line for logs: torch's SIMD dispatch level (``torch.backends.cpu.get_cpu_capability()``), the CPU's bf16
    features, and whether bf16 is native, e.g. "AVX512 (avx512_bf16), bf16 native"."""
    features = _cpu_features() or {}
    found = [f for f in _CPU_BF16_FEATURES if features.get(f)]
    head = f"{torch.backends.cpu.get_cpu_capability()} ({', '.join(found) or 'no bf16 features'})"
    if cpu_native_bf16():
        return f"{head}, bf16 native"
    return f"{head}, no native bf16: internal bf16 defaults run in fp32"


def internal_dtype(device: torch.device | str, preferred: torch.dtype = torch.bfloat16) -> torch.dtype:
    """The dtype for an internal computation whose default is bf16 (e.g. Muon's Newton-Schulz): ``preferred`` on
    accelerators and on CPUs with native bf16, float32 on other CPUs (where bf16 is emulated, ~10-60x slower)."""
    if preferred == torch.bfloat16 and torch.device(device).type == "cpu" and not cpu_native_bf16():
        return torch.float32
    return preferred


_warned_slow_bf16 = False


def warn_if_slow_bf16(device_type: str, what: str = "bf16") -> None:
    """Warn once per process when bf16 was asked for on a CPU without native bf16, with the measured slowdown."""
    global _warned_slow_bf16
    if _warned_slow_bf16 or device_type != "cpu" or cpu_native_bf16():
        return
    _warned_slow_bf16 = True
    warnings.warn(f"{what} was asked for on a CPU without native bf16 ({torch.backends.cpu.get_cpu_capability()}, no "
                  f"AVX512-BF16 / AMX): a bf16 matmul takes {bf16_matmul_slowdown():.1f}x the float32 time here "
                  "(measured); fp32 is faster on this machine", RuntimeWarning, stacklevel=3)


@contextlib.contextmanager
def _autocast(device_type: str, dtype: torch.dtype):
    if dtype == torch.bfloat16:
        warn_if_slow_bf16(device_type, "bf16 autocast (precision=bf16)")  # on entry only, not when validating
    with torch.autocast(device_type=device_type, dtype=dtype):
        yield


def autocast_context(device_type: str, dtype: str | None = None):
    """A context manager for the forward (and loss) of a step: ``torch.autocast(device_type, bfloat16)`` for
    dtype "bf16" / "bfloat16", a no-op for None / "fp32" / "float32". Run ``backward`` outside it (autograd replays the
    recorded casts). fp16 is refused (it needs loss scaling; MeanFlow runs report NaNs with it). Entering a bf16
    context on a CPU without native bf16 warns once (:func:`warn_if_slow_bf16`)."""
    key = None if dtype is None else str(dtype).lower()
    if key not in (None, *PRECISIONS):
        raise ValueError(f"precision must be one of None, {', '.join(PRECISIONS)}; got {dtype!r}"
                         + (" (fp16 needs a GradScaler; use bf16)" if key in ("fp16", "float16", "half") else ""))
    target = None if key is None else PRECISIONS[key]
    if target is None:
        return contextlib.nullcontext()
    return _autocast(device_type, target)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() \
        else 0


def is_out_of_memory(e: BaseException) -> bool:
    """A device out-of-memory error, whichever layer raised it (eager allocator, a compiled kernel's launcher)."""
    while e is not None:
        if isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e)):
            return True
        e = e.__cause__
    return False


def set_tf32(device: torch.device, enabled: bool) -> None:
    """On CUDA, let float32 matmuls and convolutions use TF32 tensor cores (``train.tf32``: inputs rounded to 10
    mantissa bits, float32 accumulation; several times faster than true fp32 on A100 / H100). Nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
        torch.backends.cudnn.allow_tf32 = bool(enabled)


def _generators(args, kwargs) -> list[torch.Generator]:
    """The torch.Generators among a call's arguments: plain, in a list/tuple, or in a ``.generators`` list (the
    objective's PerSampleGenerator)."""
    found = []
    for a in (*args, *kwargs.values()):
        for g in (a if isinstance(a, (list, tuple)) else getattr(a, "generators", [a])):
            if isinstance(g, torch.Generator):
                found.append(g)
    return found


class _RngSnapshot:
    """The state of the global CPU (and initialised CUDA) RNGs and of the given generators, to replay a call."""

    def __init__(self, generators):
        self.gens = [(g, g.get_state()) for g in generators]
        self.cpu = torch.random.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self):
        for g, state in self.gens:
            g.set_state(state)
        torch.random.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _is_control_flow(e: BaseException) -> bool:
    """An exception that is not an error: activation checkpointing's early stop of a recomputation
    (``torch.utils.checkpoint``'s ``_StopRecomputationError``, raised through the recomputed forward once it has
    rebuilt what the backward needs)."""
    return type(e).__name__ == "_StopRecomputationError"


class _EagerFallback:
    """Call ``compiled``; the first time it raises, warn once and run ``eager`` from then on, this call included.

    Before the eager re-run the random state is rewound (global RNGs and the generators passed in), so the fallback
    call draws the same numbers the compiled one would have. Other side effects of a failed compiled call are not
    undone: wrap functions that have none before they return, e.g. a loss function, and call ``backward`` outside.
    Note that inductor compiles the backward graph lazily, at the first ``backward``; an error there is raised by
    ``backward`` itself, outside this guard."""

    def __init__(self, compiled, eager, name: str, replay_rng: bool = True):
        self.compiled, self.eager, self.name, self.replay_rng = compiled, eager, name, replay_rng
        self.state = "untried"  # -> "compiled" after a successful call, "eager" after a failure
        functools.update_wrapper(self, eager, updated=())

    def __call__(self, *args, **kwargs):
        if self.state == "eager":
            return self.eager(*args, **kwargs)
        rng = _RngSnapshot(_generators(args, kwargs)) if self.replay_rng else None
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001  (any compiler failure: fall back, say why; real errors recur eagerly)
            if is_out_of_memory(e) or _is_control_flow(e):  # not compiler failures: re-raise
                raise
            self._fall_back(e)
            if rng is not None:
                rng.restore()
            return self.eager(*args, **kwargs)
        self.state = "compiled"
        return out

    def _fall_back(self, e: Exception):
        self.state = "eager"
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        if _rank() == 0:  # once (the state changes to "eager"), on rank 0 only
            warnings.warn(f"torch.compile of {self.name} failed ({msg}); running eagerly from now on",
                          RuntimeWarning, stacklevel=3)


class _Wrapper(nn.Module):
    """A module wrapping one child, registered under the class's ``_inner`` name; every attribute the wrapper lacks
    is looked up on that child (``net.trunk``, ``net.num_classes`` keep working through the wrapper)."""

    _inner = ""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules[self._inner], name)


class CompiledModule(_Wrapper):
    """A module whose ``forward`` runs through ``torch.compile`` with an eager fallback.

    The wrapped module lives under ``_orig_mod`` (torch.compile's own attribute, which :mod:`pmf.train.checkpoint`
    strips from state-dict keys), and every attribute this wrapper lacks is looked up on it, so ``net.trunk``,
    ``net.head``, ``net.num_classes`` keep working. Only ``forward`` is compiled: methods called directly (the lean
    objective calls
    ``trunk`` / ``head``) stay eager; compile the loss function for those."""

    _inner = "_orig_mod"

    def __init__(self, module: nn.Module, call):
        super().__init__()
        self._orig_mod = module
        self._call = call  # an _EagerFallback (not a Module, so not registered as a child)

    def forward(self, *args, **kwargs):
        return self._call(*args, **kwargs)


def maybe_compile(fn_or_module, enabled: bool, **compile_kwargs):
    """``torch.compile`` when ``enabled``; ``enabled=False`` returns the argument unchanged. For sampling, where a
    failed compile may fall back: a module comes back as a :class:`CompiledModule` (its ``forward`` compiled; same
    parameters, same state-dict keys up to the ``_orig_mod.`` prefix), a function as a wrapper compiled whole.
    Either falls back to eager execution for good if ``torch.compile`` itself or a compiled call raises (one
    RuntimeWarning says why; the failed call is re-run eagerly with its random state rewound). The training step
    compiles strictly instead (:class:`StepCompiler`)."""
    if not enabled:
        return fn_or_module
    is_module = isinstance(fn_or_module, nn.Module)
    name = type(fn_or_module).__name__ if is_module else getattr(fn_or_module, "__qualname__", repr(fn_or_module))
    try:
        compiled = torch.compile(fn_or_module, **compile_kwargs)
    except Exception as e:  # noqa: BLE001
        compiled, error = None, e
    else:
        error = None
    guard = _EagerFallback(compiled, fn_or_module, name)
    if error is not None:
        guard._fall_back(error)
    return CompiledModule(fn_or_module, guard) if is_module else guard


# ----------------------------------------------------------------------------------------------------------------
# The compiled training step

COMPILE_MODES = ("default", "reduce-overhead")
BACKEND = "inductor"  # what StepCompiler compiles with by default; tests set "aot_eager" (same capture, no codegen)


class CompileError(RuntimeError):
    """The compiled step could not run as compiled (a graph break, the recompile limit, a compiler failure)."""


class StepCompiler:
    """The ``compiler`` argument of :func:`pmf.method.objective.pmf_loss` under ``train.compile``: each step function it
    is given is compiled once (``torch.compile(fn, fullgraph=True, dynamic=False)``, inductor in ``mode``) and run
    strictly: a graph break raises (``fullgraph``), the backward compiles with the forward, and more than
    ``recompile_limit`` graphs of one function raise (``fail_on_recompile_limit_hit``): each is a
    :class:`CompileError` with the reason. Counts what it compiled: :meth:`report` (graphs compiled, graph breaks,
    recompiles, compile seconds). ``backend="aot_eager"`` (tests) captures the same graphs without inductor's code
    generation."""

    def __init__(self, mode: str = "default", recompile_limit: int = 27, backend: str | None = None):
        if mode not in COMPILE_MODES:
            raise ValueError(f"train.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
        self.mode, self.recompile_limit, self.backend = mode, recompile_limit, backend or BACKEND
        self.graphs = 0  # graphs compiled (each first compile and each recompile)
        self.compile_s = 0.0  # seconds spent in calls that compiled
        self.breaks0 = _graph_breaks()
        self._compiled: dict = {}

    def _backend(self, gm, example_inputs):
        self.graphs += 1
        if self.backend != "inductor":  # "aot_eager": the same capture (Dynamo, AOT autograd's joint graph), no
            return torch._dynamo.lookup_backend(self.backend)(gm, example_inputs)  # code generation
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs, config_patches=list_mode_options(self.mode, False))

    def __call__(self, fn):
        compiled = self._compiled.get(fn)
        if compiled is None:
            compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend=self._backend)
            self._compiled[fn] = compiled
        return functools.partial(self._strict_call, compiled, getattr(fn, "__qualname__", repr(fn)))

    def _strict_call(self, compiled, name, *args, **kwargs):
        import torch._dynamo
        import torch._functorch.config

        before, t0 = self.graphs, time.perf_counter()
        try:
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=self.recompile_limit), \
                    torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
                out = compiled(*args, **kwargs)
        except Exception as e:
            if is_out_of_memory(e):
                raise
            raise CompileError(f"train.compile: the compiled step {name} cannot run compiled: {_why(e)}; set "
                               "train.compile=false to train eagerly") from e
        if self.graphs > before:
            self.compile_s += time.perf_counter() - t0
        return out

    def step_begin(self, device_type: str) -> None:
        """Before each micro-batch: under CUDA graphs, mark a new step (the previous step's graph outputs may be
        overwritten from here on)."""
        if self.mode == "reduce-overhead" and device_type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()

    def report(self) -> dict:
        """{"graphs_compiled", "recompiles", "graph_breaks", "compile_s"}: recompiles are graphs beyond the first
        of each compiled function."""
        return {"graphs_compiled": self.graphs,
                "recompiles": max(0, self.graphs - sum(1 for _ in self._compiled)),
                "graph_breaks": _graph_breaks() - self.breaks0, "compile_s": round(self.compile_s, 3)}


def _why(e: BaseException) -> str:
    """What kind of compile failure ``e`` is, and its first line."""
    import torch._dynamo.exc as exc

    first = f"{type(e).__name__}: {e}".splitlines()[0][:400]
    if isinstance(e, exc.Unsupported):
        return f"a graph break in a region compiled whole (fullgraph=True): {first}"
    if isinstance(e, getattr(exc, "FailOnRecompileLimitHit", ())) or "recompile" in first.lower():
        return f"the recompile limit was hit (more row-plan shapes than the bound): {first}"
    return f"a compiler failure: {first}"


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


class CompiledLoss:
    """``loss_fn(net, x, y, cfg, generator, perceptual=...)`` (the training loop's interface) running
    :func:`pmf.method.objective.pmf_loss` with a :class:`StepCompiler`: the whole step compiled (module doc). The lean
    objective only: the reference one's ``torch.func.jvp`` needs forward-mode rules that the fused attention kernel
    traced by ``torch.compile`` does not have."""

    def __init__(self, loss_fn, mode: str = "default", recompile_limit: int = 27, backend: str | None = None):
        self.loss_fn, self.compiler = loss_fn, StepCompiler(mode, recompile_limit, backend)
        functools.update_wrapper(self, loss_fn, updated=())

    def __call__(self, net, x, y, cfg, generator=None, **kwargs):
        if cfg.impl != "lean":
            raise CompileError(f"train.compile compiles the lean objective only (objective.impl={cfg.impl!r}); set "
                               "objective.impl=lean or train.compile=false")
        self.compiler.step_begin(x.device.type)
        return self.loss_fn(net, x, y, cfg, generator, compiler=self.compiler, **kwargs)

    def report(self) -> dict:
        return self.compiler.report()


def compile_step(loss_fn, enabled: bool, mode: str = "default", recompile_limit: int = 27):
    """``train.compile``: ``loss_fn`` (:func:`pmf.method.objective.pmf_loss`) as a :class:`CompiledLoss` when
    ``enabled``, else unchanged. ``recompile_limit``: graphs per compiled function before it is an error, the row plan's
    bound
    on distinct shapes (:func:`pmf.method.objective_lean.row_buckets` of the micro-batch)."""
    return CompiledLoss(loss_fn, mode, recompile_limit) if enabled else loss_fn


class InferenceNet(_Wrapper):
    """A network's forward for sampling, optionally under bf16 autocast and/or ``torch.compile`` with inductor
    *freezing* (the weights become constants of the compiled graph: folded and pre-packed for the CPU's GEMM
    library). Same call signature and attributes as the wrapped network, so :func:`pmf.method.sampler.sample` and
    :mod:`pmf.eval.generate` take it unchanged.

    Freezing assumes the weights do not change after the first call: build one per fixed network (e.g. an EMA copy
    loaded for sampling), never around a network that is still training. Velocities come back in float32 under
    bf16 too: the x -> u conversion divides float32 z by float32 t (see the module docstring).
    Measured on the 2-core CPU (``benchmarks/step.py --bf16 --compile``): numbers in ``benchmarks/README.md``."""

    _inner = "net"

    def __init__(self, net: nn.Module, precision: str | None = None, compile: bool = False):
        super().__init__()
        autocast_context("cpu", precision)  # rejects an unknown precision now
        self.net, self.precision = net, precision
        call = maybe_compile(net, True, options={"freezing": True}) if compile else net
        object.__setattr__(self, "_call", call)  # not a registered child: the state dict stays the net's

    def forward(self, *args, **kwargs):
        device = next(self.net.parameters()).device
        with autocast_context(device.type, self.precision):
            return self._call(*args, **kwargs)
