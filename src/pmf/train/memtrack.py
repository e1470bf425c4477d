"""Direct measurement of the memory of a training step on the CPU: the live bytes of every tensor storage the step
creates, over time (:class:`PeakTracker`), and the dtypes CUDA autocast would give (:class:`CudaAutocastDtypes`).

The CPU allocator keeps no statistics, so the tracker is a ``TorchDispatchMode``: every storage an aten operation
returns is counted from its creation until it is freed (a finalizer on the storage object, which torch keeps
alive exactly as long as the storage). No saved-tensor hook is involved, so nothing lives longer than it would
without the measurement. This is what :mod:`pmf.train.plan` measures on small instances of the network, and what
tests/test_plan.py checks the plan against on whole (small) steps.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakTracker(TorchDispatchMode):
    """Live and peak bytes of the storages created while active (storages that existed before are not counted).
    Storages first seen in a tensor of one of ``skip_shapes`` are not counted (the parameters' shapes: gradients and
    autocast's weight copies, which the plan counts per parameter, not per sample)."""

    def __init__(self, skip_shapes=()):
        super().__init__()
        self.skip_shapes = {tuple(s) for s in skip_shapes}
        self.live: dict[int, tuple[int, int]] = {}  # id(storage) -> (allocation id, bytes)
        self.current = self.peak = 0
        self.skipped = 0  # bytes of storages created with a skipped shape (never counted)
        self._next = 0

    def _freed(self, ptr: int, aid: int, nbytes: int) -> None:
        if self.live.get(ptr, (None,))[0] == aid:
            del self.live[ptr]
            self.current -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        if t.is_sparse:
            return
        try:
            st = t.untyped_storage()
            nbytes = st.nbytes()
        except (RuntimeError, NotImplementedError):
            return
        ptr = id(st)  # torch keeps one Python object per live storage: a key also on the meta device
        if not nbytes or ptr in self.live:
            return
        if tuple(t.shape) in self.skip_shapes:
            self.skipped += nbytes
            return
        aid, self._next = self._next, self._next + 1
        self.live[ptr] = (aid, nbytes)
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._freed, ptr, aid, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


# Operations CUDA autocast runs in float32 whatever their input dtype (torch's CUDA autocast policy: the "fp32" and
# "fp32 with optional dtype" lists) and that the network or the objective uses. CPU autocast runs them in the input's
# dtype, so a bf16 measurement on the CPU would keep bf16 temporaries where a GPU keeps float32 ones.
CUDA_FLOAT32_OPS = {"pow", "__pow__", "__rpow__", "rsqrt", "exp", "expm1", "log", "log1p", "log2", "log10",
                    "reciprocal", "softmax", "log_softmax", "sum", "prod", "cumsum", "cumprod", "logsumexp",
                    "softplus", "layer_norm", "group_norm", "mse_loss", "l1_loss", "norm", "vector_norm",
                    "__rtruediv__", "__rdiv__"}


class CudaAutocastDtypes(torch.overrides.TorchFunctionMode):
    """While CPU autocast is on with a low-precision dtype, runs :data:`CUDA_FLOAT32_OPS` on float32 inputs, as CUDA
    autocast does; everything else unchanged. For measurements only."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in CUDA_FLOAT32_OPS and torch.is_autocast_enabled("cpu"):
            def up(x):
                return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16) else x
            args = tuple(up(a) for a in args)
            kwargs = {k: up(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


# CUDA autocast's lower-precision list, as far as the network uses it: these run on bf16 copies of their inputs.
CUDA_LOW_PRECISION_OPS = {"linear", "conv2d", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum",
                          "scaled_dot_product_attention", "__matmul__"}


# Custom autograd Functions whose forward is one op of the list above (pmf.method.attention's fused attention with its
# forward-mode rule): under torch.func.jvp they are called through a higher-order op that runs them with the
# function modes off, so their inputs are cast where the call is seen.
LOW_PRECISION_FUNCTIONS = {"_JvpSDPA"}


class MetaAutocast(torch.overrides.TorchFunctionMode):
    """CUDA autocast's dtype rules for tensors on the meta device (autocast has no meta backend): the ops of
    :data:`CUDA_LOW_PRECISION_OPS` run on ``dtype`` copies of their floating inputs (a parameter's copy made once
    and kept while gradients are recorded, as autocast's weight cache does), :data:`CUDA_FLOAT32_OPS` on float32 ones,
    the rest as they are; off inside ``torch.autocast(..., enabled=False)`` regions (their float32 code stays float32).
    Shapes and dtypes
    only: for measuring what a step allocates without computing it."""

    def __init__(self, dtype=torch.bfloat16):
        super().__init__()
        self.dtype, self.cache, self.disabled = dtype, {}, 0

    def _cast(self, x, dtype):
        if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype):
            return x
        if (isinstance(x, torch.nn.Parameter) and dtype == self.dtype and torch.is_grad_enabled()
                and not torch.is_inference_mode_enabled() and torch.is_autocast_cache_enabled()):
            if x not in self.cache:
                self.cache[x] = x.to(dtype)
            return self.cache[x]
        return x.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if not self.disabled:
            if name == "custom_function_call" and getattr(args[0], "__name__", "") in LOW_PRECISION_FUNCTIONS:
                # under torch.func transforms a custom Function runs with the modes off: cast its inputs here
                args = (args[0], *(self._cast(a, self.dtype) for a in args[1:]))
            elif name in CUDA_LOW_PRECISION_OPS:
                args = tuple(self._cast(a, self.dtype) for a in args)
                kwargs = {k: self._cast(v, self.dtype) for k, v in kwargs.items()}
            elif name in CUDA_FLOAT32_OPS:
                args = tuple(self._cast(a, torch.float32) for a in args)
                kwargs = {k: self._cast(v, torch.float32) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_autocast(precision: str):
    """Autocast for a step on the meta device: :class:`MetaAutocast` under bf16 (nothing under fp32), with
    ``torch.autocast`` answering for device type "meta" (regions that turn autocast off turn the emulation off)."""
    real = torch.autocast
    mode = MetaAutocast() if precision == "bf16" else None

    @contextlib.contextmanager
    def meta_aware(device_type, *args, enabled=True, **kwargs):
        if device_type != "meta":
            with real(device_type, *args, enabled=enabled, **kwargs):
                yield
            return
        if mode is not None and not enabled:
            mode.disabled += 1
        try:
            yield
        finally:
            if mode is not None and not enabled:
                mode.disabled -= 1

    torch.autocast = meta_aware
    try:
        with mode if mode is not None else contextlib.nullcontext():
            yield
    finally:
        torch.autocast = real


@contextlib.contextmanager
def tracking(skip_shapes=(), cuda_dtypes: bool = True):
    """``with tracking(...) as tracker:`` a :class:`PeakTracker` (and :class:`CudaAutocastDtypes` when asked)."""
    tracker = PeakTracker(skip_shapes)
    with contextlib.ExitStack() as stack:
        if cuda_dtypes:
            stack.enter_context(CudaAutocastDtypes())
        stack.enter_context(tracker)
        yield tracker
