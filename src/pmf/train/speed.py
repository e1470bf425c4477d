"""Optional speed switches for a training or sampling step: ``torch.compile`` (by regions for training, with a loud
eager fallback per region), and bf16 autocast.

Both are opt-in. Measured numbers (CPU) are in ``benchmarks/README.md``.

Compile by regions
------------------
``train.compile`` wraps the loss with :func:`maybe_compile`, which compiles the *network* by regions
(:func:`compile_regions`) and runs the loss eagerly: the repeated transformer blocks are compiled for every call
without forward-mode tangents (the guidance pass, the r = t rows, the v-head, checkpoint recomputation); the
forward-AD pass runs the same blocks eagerly. Compiled code has no
forward-mode rule, and Dynamo cannot trace ``make_dual`` under symbolic shapes or an autograd.Function with a custom
``jvp`` while grad is on, so compiling the loss whole paid the compile time and then ran eagerly.

bf16 and the JVP
----------------
Under ``torch.autocast(..., torch.bfloat16)`` the matmuls of the primal *and* of the tangent run in bf16 (autocast
casts the tangent with its primal), everything else keeps its input dtype. What keeps the pMF step stable:

- The attention tangent's ``P`` and ``P * dS`` terms in float32: :mod:`pmf.attention` computes them in
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
import inspect
import time
import warnings

import torch
import torch.autograd.forward_ad as fwAD
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

    The wrapped module lives under ``_orig_mod`` (torch.compile's own attribute, which :mod:`pmf.train.checkpoint` strips
    from state-dict keys), and every attribute this wrapper lacks is looked up on it, so ``net.trunk``, ``net.head``,
    ``net.num_classes`` keep working. Only ``forward`` is compiled: methods called directly (the lean objective calls
    ``trunk`` / ``head``) stay eager; compile the loss function for those."""

    _inner = "_orig_mod"

    def __init__(self, module: nn.Module, call):
        super().__init__()
        self._orig_mod = module
        self._call = call  # an _EagerFallback (not a Module, so not registered as a child)

    def forward(self, *args, **kwargs):
        return self._call(*args, **kwargs)


class _FunctionCompile(_EagerFallback):
    """:func:`maybe_compile` of a function. A call whose first argument is a module (a loss, ``loss(net, x, ...)``)
    runs the function eagerly with the module's regions compiled (:func:`compile_regions`, installed at the first
    such call); any other call runs the whole function compiled, with the eager fallback of :class:`_EagerFallback`.

    Why not the whole loss: pMF's loss holds a forward-mode pass (``make_dual`` / ``torch.func.jvp``) that Dynamo
    cannot compile (make_dual under symbolic shapes; an autograd.Function with a custom ``jvp`` while grad is on), so
    compiling it whole paid the compile time and then ran eagerly."""

    def __init__(self, compiled, eager, name: str, compile_kwargs: dict):
        super().__init__(compiled, eager, name)
        self.compile_kwargs = compile_kwargs

    def __call__(self, *args, **kwargs):
        if args and isinstance(args[0], nn.Module):
            if not compiled_regions(args[0]):
                compile_regions(args[0], **self.compile_kwargs)
            return self.eager(*args, **kwargs)
        return super().__call__(*args, **kwargs)


def maybe_compile(fn_or_module, enabled: bool, **compile_kwargs):
    """``torch.compile`` when ``enabled``; ``enabled=False`` returns the argument unchanged.

    - A module comes back as a :class:`CompiledModule` (its ``forward`` compiled; same parameters, same state-dict
      keys up to the ``_orig_mod.`` prefix).
    - A function comes back as a wrapper: called with a module first (a loss ``loss(net, ...)``, what
      ``train.compile`` wraps) it runs eagerly with that module's regions compiled (:func:`compile_regions`: the
      repeated blocks, on the passes without tangents); called otherwise it runs compiled whole.

    Whole compiles fall back to eager execution for good if ``torch.compile`` itself or a compiled call raises (one
    RuntimeWarning says why; the failed call is re-run eagerly with its random state rewound); regions do the same,
    per region (:class:`CompiledRegion`)."""
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
    guard = _EagerFallback(compiled, fn_or_module, name) if is_module else \
        _FunctionCompile(compiled, fn_or_module, name, compile_kwargs)
    if error is not None:
        guard._fall_back(error)
    return CompiledModule(fn_or_module, guard) if is_module else guard


# ----------------------------------------------------------------------------------------------------------------
# Regional compile: the repeated blocks on the passes without tangents (optionally the whole no-grad forward)


def carries_tangent(*values) -> bool:
    """Whether a tensor among ``values`` carries a forward-mode tangent: a dual tensor of
    ``torch.autograd.forward_ad`` (the lean objective's JVP) or a tensor wrapped by a ``torch.func`` transform
    (``torch.func.jvp`` of the reference objective; also vmap / grad). Compiled code cannot take those: a compiled
    block called on a dual input raises "You must implement the jvp function" (inductor's graph has no forward-AD
    rule; measured with torch 2.13)."""
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(isinstance(a, torch.Tensor) and (is_wrapped(a) or fwAD.unpack_dual(a).tangent is not None)
               for a in values)


class CompiledRegion:
    """``torch.compile`` of one module class's ``forward``, installed on instances by :func:`compile_regions` and
    shared by all of them: the compiled code takes the module's parameters as inputs (Dynamo inlines built-in
    modules), so one compile serves every block of the class. A call runs

    - **compiled** when no argument carries a tangent (:func:`carries_tangent`) and, for a region compiled only
      without gradient (``grad_off_only``), gradients are off;
    - **eagerly, by design**, on arguments with a tangent (the forward-AD pass), or with gradients on for a
      ``grad_off_only`` region (its blocks are regions of their own);
    - **eagerly, for good, after a failure**: the first compiled call that raises (compile, lowering, C++ build, an
      eager backward compile, a graph break under ``fullgraph``, the recompile limit) warns once, naming the region,
      and every later call runs eagerly;
    - traced as plain code when an enclosing compiled function calls it (no compile inside a compile).

    ``calls`` counts the first three kinds, so a benchmark or a log shows what actually ran compiled (:meth:`summary`).
    The compile is strict so that nothing falls back silently: ``fullgraph=True`` (a graph break is an error, not a
    silent split into compiled pieces and eager ones), the backward compiled with the forward
    (``force_non_lazy_backward_lowering``: a backward that fails to compile fails inside the guarded call, not later
    in ``loss.backward()``), and hitting Dynamo's recompile limit raises instead of running eagerly without a word.
    The first ``batch_args`` positional tensors are marked dynamic in dim 0 (``maybe_mark_dynamic``): the lean
    objective calls the blocks on row subsets of varying size, and one dynamic graph beats a recompile per size."""

    def __init__(self, cls: type, name: str, batch_args: int = 1, grad_off_only: bool = False, **compile_kwargs):
        self.cls, self.name, self.batch_args, self.grad_off_only = cls, name, batch_args, grad_off_only
        self.calls = {"compiled": 0, "eager: tangents": 0, "eager: grad on": 0, "eager: fallback": 0}
        self.installed_on = 0  # how many modules call it
        compile_kwargs.setdefault("fullgraph", True)
        try:
            compiled = torch.compile(cls.forward, **compile_kwargs)
        except Exception as e:  # noqa: BLE001
            self.guard = _EagerFallback(None, cls.forward, name, replay_rng=False)
            self.guard._fall_back(e)
        else:
            self.guard = _EagerFallback(functools.partial(self._strict_call, compiled), cls.forward, name,
                                        replay_rng=False)

    def _strict_call(self, compiled, module, *args, **kwargs):
        import torch._dynamo
        import torch._functorch.config

        for a in args[: self.batch_args]:
            if isinstance(a, torch.Tensor) and a.ndim > 0:
                torch._dynamo.maybe_mark_dynamic(a, 0)
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), \
                torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
            return compiled(module, *args, **kwargs)

    def __call__(self, module, *args, **kwargs):
        eager = self.cls.forward
        if torch.compiler.is_compiling():  # an enclosing compile traces through: plain code, no nested compile
            return eager(module, *args, **kwargs)
        if carries_tangent(*args, *kwargs.values()):
            self.calls["eager: tangents"] += 1
            return eager(module, *args, **kwargs)
        if self.grad_off_only and torch.is_grad_enabled():
            self.calls["eager: grad on"] += 1
            return eager(module, *args, **kwargs)
        out = self.guard(module, *args, **kwargs)
        self.calls["compiled" if self.guard.state == "compiled" else "eager: fallback"] += 1
        return out

    def __deepcopy__(self, memo):
        return self  # a deep copy of a module (an EMA copy) shares the compiled code; it holds no tensors

    @property
    def state(self) -> str:
        """"untried", "compiled" or "eager" (after a failure)."""
        return self.guard.state

    def summary(self) -> str:
        """One line: the region, on how many modules, its state and its call counts."""
        counts = ", ".join(f"{k} {v}" for k, v in self.calls.items() if v)
        return f"{self.name} (x{self.installed_on}): {self.state}; calls: {counts or 'none'}"


def _region_of(module: nn.Module) -> CompiledRegion | None:
    fwd = module.__dict__.get("forward")
    return fwd.func if isinstance(fwd, functools.partial) and isinstance(fwd.func, CompiledRegion) else None


def compiled_regions(net: nn.Module) -> list[CompiledRegion]:
    """The :class:`CompiledRegion` objects installed in ``net`` (each once), in module order."""
    found = []
    for m in net.modules():
        r = _region_of(m)
        if r is not None and r not in found:
            found.append(r)
    return found


def _install(region: CompiledRegion, module: nn.Module) -> None:
    # An instance attribute shadows the class's forward; nn.Module.__call__ (and its hooks) run as before. Not a
    # parameter, buffer or child module: the state dict and its keys do not change. A deep copy of the module gets
    # a partial bound to the copy (the region itself is shared, see CompiledRegion.__deepcopy__).
    object.__setattr__(module, "forward", functools.partial(region, module))
    region.installed_on += 1


def _fsdp_sharded(net: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed
        return False
    return any(isinstance(m, FSDPModule) for m in net.modules())


def compile_regions(net: nn.Module, whole_forward: bool = False, **compile_kwargs) -> list[CompiledRegion]:
    """Compile ``net`` by regions, in place, and return the regions (:class:`CompiledRegion`):

    - every entry of every ``nn.ModuleList`` in ``net`` (the repeated transformer blocks), one region per class,
      compiled for the calls without tangents: the guidance pass, the lean objective's r = t rows and its v-head,
      flow matching, sampling. The forward-AD pass runs the same blocks eagerly.
    - with ``whole_forward``, ``net``'s own ``forward`` (embeddings, blocks, final layers, x -> u) compiled whole for
      calls without gradient (the guidance pass under inference mode, sampling grids), all of its inputs dynamic in
      the batch dimension. Off by default (and in ``train.compile``): on the CPU it gave no consistent gain over the
      compiled blocks (0.83-1.13x their step time in four runs) for 15-45 % more compile time (benchmarks/README.md).

    Under FSDP2 (blocks that are ``FSDPModule``) only the blocks are compiled: their all-gather / reshard hooks run
    eagerly around the compiled forward (the per-block pattern FSDP2 is built for), while a compiled whole forward
    would have to trace those hooks. Not measured here (no multi-GPU run yet).

    The model is not edited: only instance attributes are added (the blocks' RMSNorm, RoPE, SwiGLU and gates fuse
    inside the compiled block). Parameters, buffers and state-dict keys stay the same, so checkpoints load into eager
    models and back. :func:`remove_regions` undoes it. Compiling again returns the regions already there."""
    found = compiled_regions(net)
    if found:
        return found
    by_class: dict[type, CompiledRegion] = {}
    for lst in [m for m in net.modules() if isinstance(m, nn.ModuleList)]:
        for block in lst:
            cls = type(block)
            if cls not in by_class:
                by_class[cls] = CompiledRegion(cls, f"{cls.__qualname__}.forward", 1, **compile_kwargs)
            _install(by_class[cls], block)
    regions = list(by_class.values())
    if whole_forward and not _fsdp_sharded(net):
        cls = type(net)
        n_args = len([p for p in inspect.signature(cls.forward).parameters.values()
                      if p.default is inspect.Parameter.empty]) - 1  # positional inputs, all batched
        whole = CompiledRegion(cls, f"{cls.__qualname__}.forward (no grad)", n_args, grad_off_only=True,
                               **compile_kwargs)
        _install(whole, net)
        regions.append(whole)
    return regions


def remove_regions(net: nn.Module) -> None:
    """Undo :func:`compile_regions`: every module runs its class's ``forward`` again."""
    for m in net.modules():
        if _region_of(m) is not None:
            del m.__dict__["forward"]


class InferenceNet(_Wrapper):
    """A network's forward for sampling, optionally under bf16 autocast and/or ``torch.compile`` with inductor
    *freezing* (the weights become constants of the compiled graph: folded and pre-packed for the CPU's GEMM
    library). Same call signature and attributes as the wrapped network, so :func:`pmf.sampler.sample` and
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
