"""``torch.compile`` for a training or sampling step: the whole training step (:class:`StepCompiler`) and the
sampling forward (:class:`InferenceNet`, with the precision of :mod:`pmf.train.precision`).

Opt-in. Measured numbers (CPU) are in ``benchmarks/README.md``.

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
"""

from __future__ import annotations

import functools
import time
import warnings

import torch
import torch.nn as nn

from pmf.train.precision import autocast_context, is_out_of_memory

def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() \
        else 0


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
